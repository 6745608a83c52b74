"""The exceptions users of the MQTT layer catch.

Local misuse and remote violations are different types (as in h11); transport
errors (trio, trio-websocket, ssl, the codec) are mapped to these at the
boundary, so callers never need to catch a library's exception.
"""

from __future__ import annotations

__all__ = [
    "AckTimeout",
    "ClientClosed",
    "ConnectError",
    "ConnectionLost",
    "KeepAliveTimeout",
    "LocalProtocolError",
    "MQTTError",
    "PacketTooLarge",
    "PublishError",
    "RemoteProtocolError",
    "SessionTakenOver",
    "SubscribeError",
]


class MQTTError(Exception):
    """Base class of every error raised by ``sheri_trio.mqtt``."""


class LocalProtocolError(MQTTError):
    """We were asked to do something the protocol or the session forbids."""


class RemoteProtocolError(MQTTError):
    """The peer sent something malformed or forbidden; the connection is unusable."""

    def __init__(self, message: str, *, reason_code: int = 0x82) -> None:
        super().__init__(message)
        #: The DISCONNECT reason code we send back (0x81 malformed, 0x82 protocol error...).
        self.reason_code = reason_code


class PacketTooLarge(RemoteProtocolError):
    """A packet exceeded the maximum packet size we announced."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason_code=0x95)


class KeepAliveTimeout(MQTTError):
    """Nothing was heard from the broker within 1.5 times the keep-alive."""


class ConnectError(MQTTError):
    """The connection could not be established (refused, unreachable, timed out).

    ``reason_code`` is the CONNACK reason code when the broker refused us, else None.
    ``retryable`` says whether reconnecting later can help (bad credentials cannot).
    """

    def __init__(
        self, message: str, *, reason_code: int | None = None, retryable: bool = True
    ) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.retryable = retryable


class ConnectionLost(MQTTError):
    """An established connection broke (transport error or broker DISCONNECT)."""

    def __init__(self, message: str, *, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class SessionTakenOver(ConnectionLost):
    """Another client connected with our client id (DISCONNECT reason 0x8E)."""


class PublishError(MQTTError):
    """The broker acknowledged a QoS 1 publish with a failure reason code."""

    def __init__(self, message: str, *, reason_code: int) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class SubscribeError(MQTTError):
    """The broker refused a subscription (SUBACK/UNSUBACK failure reason code)."""

    def __init__(self, message: str, *, reason_codes: list[int]) -> None:
        super().__init__(message)
        self.reason_codes = reason_codes


class AckTimeout(MQTTError):
    """The broker did not acknowledge a request within ``ack_timeout``.

    Raised by ``subscribe()`` (no SUBACK), leaving a subscription (no UNSUBACK) and a
    QoS 1 ``publish()`` waiting for its PUBACK. The message names the packet, the broker
    (without password) and the time waited. The client then treats the broker as
    misbehaving: it drops the connection (when that connection had the whole bound) and
    reconnects with its usual backoff. Nothing is forgotten: an unacknowledged QoS 1
    publish is resent on the next connection, a pending SUBSCRIBE too (followed by the
    UNSUBSCRIBE of the subscribe() that gave up). The SUBSCRIBEs a reconnect sends on
    its own are bounded too: their timeout ends the connection (and is logged), it
    reaches no caller.
    """

    def __init__(self, message: str, *, packet: str, timeout: float) -> None:
        super().__init__(message)
        #: "SUBSCRIBE", "UNSUBSCRIBE" or "PUBLISH"
        self.packet = packet
        #: seconds waited
        self.timeout = timeout


class ClientClosed(MQTTError):
    """The client was closed; no more operations are possible."""
