"""A sans-IO MQTT v5 client session on the ``mqtt5`` codec.

``Session`` turns bytes from the broker into events (:meth:`Session.receive_data`)
and our calls into bytes (:meth:`Session.data_to_send`). It never touches a
socket, a clock or trio: callers pass ``now`` (seconds, any monotonic origin)
where time matters. One ``Session`` outlives many connections: packet ids,
unacknowledged QoS 1 publishes and subscriptions survive a reconnect, and are
resent when the next connection is accepted.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import mqtt5
from mqtt5 import QoS

from ._errors import (
    AckTimeout,
    ConnectError,
    KeepAliveTimeout,
    LocalProtocolError,
    PacketTooLarge,
    RemoteProtocolError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

# What the package re-exports; the events and the rest are the backends' (the
# native client's events are its own business, see _client.py).
__all__ = [
    "QOS_LEVELS",
    "Message",
    "Session",
    "check_publish",
    "check_subscription",
    "check_topic_filter",
    "check_topic_name",
    "topic_matches",
]

DEFAULT_MAX_PACKET_SIZE: Final = 1024 * 1024
MAX_PACKET_ID: Final = 0xFFFF
MAX_SUBSCRIPTION_ID: Final = 268_435_455
#: our QoS numbers as the codec's values (the one table: every module uses this)
QOS_LEVELS: Final = (QoS.AT_MOST_ONCE, QoS.AT_LEAST_ONCE, QoS.EXACTLY_ONCE)

#: CONNACK reason codes after which retrying with the same settings cannot succeed.
FATAL_CONNACK_CODES: Final = frozenset({0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C, 0x95, 0x9A, 0x9B})


def reason_names(codes: type) -> dict[int, str]:
    """{value: NAME} of one of the codec's reason-code classes (not Python enums)."""
    return {int(getattr(codes, n)): n for n in dir(codes) if n.isupper()}


_CONNACK_NAMES: Final = reason_names(mqtt5.ConnAckReasonCode)
_DISCONNECT_NAMES: Final = reason_names(mqtt5.DisconnectReasonCode)


def connack_reason_name(code: int) -> str:
    return f"{_CONNACK_NAMES.get(code, 'UNKNOWN')} (0x{code:02X})"


def disconnect_reason_name(code: int) -> str:
    return f"{_DISCONNECT_NAMES.get(code, 'UNKNOWN')} (0x{code:02X})"


class SessionState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSING = "closing"


class Message:
    """An application message received from the broker.

    A thin view over the decoded PUBLISH packet: the common fields are plain
    attributes, the MQTT v5 properties are read from ``packet``.

    ``ack_id`` is set by the session when it holds this QoS 1 message's PUBACK
    (``Session.hold_acks``): ``(connection number, packet id)``, for
    :meth:`Session.ack`. The client decides who acknowledges: it hangs an acker on
    the messages of ``manual_ack`` subscriptions, which :meth:`ack` calls.
    """

    __slots__ = ("_acker", "ack_id", "packet", "payload", "qos", "retain", "topic")

    def __init__(self, packet: mqtt5.PublishPacket) -> None:
        self.packet = packet
        self.topic: str = packet.topic
        self.payload: bytes = packet.payload
        self.qos: int = int(packet.qos)
        self.retain: bool = packet.retain
        self.ack_id: tuple[int, int] | None = None
        self._acker: Callable[[Message], None] | None = None

    def ack(self) -> None:
        """Acknowledge (PUBACK) a message of a ``manual_ack`` subscription.

        Call it once the message is safely recorded: until then the broker keeps it
        and redelivers it (DUP set) on the next connection of a persistent session.
        Idempotent; a no-op for QoS 0, for messages acknowledged automatically, and
        for a message received on an earlier connection (its packet id is no longer
        valid: the broker redelivers it instead).
        """
        acker = self._acker
        if acker is not None:
            self._acker = None
            acker(self)

    def wait_for_ack(self, acker: Callable[[Message], None]) -> None:
        """Make :meth:`ack` call ``acker(self)`` once (for backends, not applications)."""
        self._acker = acker

    @property
    def needs_ack(self) -> bool:
        """True until :meth:`ack` of a message that waits for one (manual_ack)."""
        return self._acker is not None

    @property
    def duplicate(self) -> bool:
        return self.packet.duplicate

    @property
    def subscription_ids(self) -> list[int]:
        return self.packet.subscription_ids

    @property
    def message_expiry_interval(self) -> int | None:
        return self.packet.message_expiry_interval

    @property
    def content_type(self) -> str | None:
        return self.packet.content_type

    @property
    def response_topic(self) -> str | None:
        return self.packet.response_topic

    @property
    def correlation_data(self) -> bytes | None:
        return self.packet.correlation_data

    @property
    def user_properties(self) -> list[tuple[str, str]]:
        return self.packet.user_properties

    def __repr__(self) -> str:
        return (
            f"Message(topic={self.topic!r}, payload={self.payload[:64]!r}"
            f"{'...' if len(self.payload) > 64 else ''}, qos={self.qos}, retain={self.retain})"
        )


class OutgoingPublish:
    """A publish handed to the session: queued, then in flight, then acknowledged.

    ``reason_code`` is set when the broker's PUBACK arrives (QoS 1). ``waiter``
    belongs to the caller (the client hangs a completion object on it).
    """

    __slots__ = ("data", "packet_id", "qos", "reason_code", "reason_string", "waiter")

    def __init__(self, data: bytes | bytearray, qos: int) -> None:
        # Encoded; for QoS 1 a bytearray whose packet id is set when it goes in flight.
        self.data = data
        self.qos = qos
        self.packet_id: int | None = None
        self.reason_code: int | None = None
        self.reason_string: str | None = None
        self.waiter: Any = None


@dataclass(slots=True)
class Connected:
    session_present: bool
    connack: mqtt5.ConnAckPacket


@dataclass(slots=True)
class PublishAcked:
    publish: OutgoingPublish


@dataclass(slots=True)
class SubscribeAcked:
    packet_id: int
    reason_codes: list[int]
    reason_string: str | None


@dataclass(slots=True)
class UnsubscribeAcked:
    packet_id: int
    reason_codes: list[int]
    reason_string: str | None


@dataclass(slots=True)
class Disconnected:
    """The broker sent DISCONNECT; the connection is over."""

    reason_code: int
    reason_string: str | None
    server_reference: str | None


Event = Message | Connected | PublishAcked | SubscribeAcked | UnsubscribeAcked | Disconnected


@dataclass(slots=True)
class _Request:
    """A SUBSCRIBE or UNSUBSCRIBE waiting for its acknowledgement."""

    packet: mqtt5.SubscribePacket | mqtt5.UnsubscribePacket
    internal: bool = False  # a resubscription the session made on its own
    #: for a SUBSCRIBE (re)sent at CONNACK, when its SUBACK is overdue (see ack_timeout)
    deadline: float | None = None


@dataclass(slots=True)
class _Subscription:
    filters: list[mqtt5.TopicFilter]
    subscription_id: int | None
    packet_ids: set[int] = field(default_factory=set)


def _decode_remaining_length(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int] | None:
    """Variable byte integer at ``pos`` (after the fixed header's first byte).

    Returns (value, bytes used), or None when more bytes are needed.
    """
    value = 0
    shift = 0
    for i in range(4):
        if pos + i >= end:
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    raise RemoteProtocolError("malformed remaining length", reason_code=0x81)


def _codec_read(view: memoryview) -> tuple[mqtt5.Packet, int]:
    """The one place the codec decodes: every codec failure becomes RemoteProtocolError."""
    try:
        return mqtt5.read(view)
    except IndexError as exc:
        raise RemoteProtocolError(f"malformed packet: {exc}", reason_code=0x81) from None
    except (ValueError, UnicodeDecodeError, TypeError, OverflowError) as exc:
        raise RemoteProtocolError(f"malformed packet: {exc}", reason_code=0x81) from None
    except BaseException as exc:
        # mqtt5 0.8 panics on some malformed input: pyo3_runtime.PanicException
        # derives from BaseException, so ``except Exception`` would miss it.
        if type(exc).__name__ == "PanicException":
            raise RemoteProtocolError(
                f"malformed packet: codec panic: {exc}", reason_code=0x81
            ) from None
        raise


class Session:
    """The client side of one MQTT v5 session, without I/O.

    Typical use by an I/O driver::

        s.start_connection(now)            # queue CONNECT
        send(s.data_to_send(now))
        for event in s.receive_data(data, now): ...
        s.handle_timer(now)                # at s.next_deadline()
        s.connection_lost()                # the byte stream broke: keep state, reconnect
    """

    def __init__(
        self,
        client_id: str,
        *,
        username: str | None = None,
        password: bytes | None = None,
        keep_alive: int = 60,
        clean_start: bool = True,
        session_expiry_interval: int = 0,
        will: mqtt5.Will | None = None,
        receive_maximum: int = 65535,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        ack_timeout: float | None = None,
    ) -> None:
        if not 0 <= keep_alive <= 0xFFFF:
            raise LocalProtocolError("keep_alive must be within 0..65535 seconds")
        if not 1 <= receive_maximum <= 0xFFFF:
            raise LocalProtocolError("receive_maximum must be within 1..65535")
        if max_packet_size < 64:
            raise LocalProtocolError("max_packet_size must be at least 64 bytes")
        self.client_id = client_id
        self.username = username
        self.password = password
        self.keep_alive = keep_alive
        self.clean_start = clean_start
        self.session_expiry_interval = session_expiry_interval
        self.will = will
        self.receive_maximum = receive_maximum
        self.max_packet_size = max_packet_size
        #: how long the SUBSCRIBEs the session sends on its own at CONNACK (its
        #: resubscriptions, and pending ones sent again) may wait for their SUBACK:
        #: nobody else waits for them, so :meth:`handle_timer` raises AckTimeout
        self.ack_timeout = ack_timeout

        self.state = SessionState.DISCONNECTED
        self.connections = 0
        # what the broker told us in CONNACK
        self.broker_receive_maximum = 65535
        self.broker_max_packet_size: int | None = None
        self.broker_max_qos = 2
        self.retain_available = True
        self.subscription_ids_available = True
        self.shared_subscriptions_available = True
        self.effective_keep_alive = keep_alive

        self._out = bytearray()
        self._in = b""
        self._next_packet_id = 1
        self._inflight: dict[int, OutgoingPublish] = {}
        self._queued: deque[OutgoingPublish] = deque()
        self._requests: dict[int, _Request] = {}
        self._subscriptions: dict[int, _Subscription] = {}  # keyed by a local handle
        self._next_handle = 1
        self._incoming_qos2: set[int] = set()
        #: While True, the PUBACK of each QoS 1 PUBLISH received is held until
        #: :meth:`ack` (the driver sets it while manual acknowledgement is in use).
        self.hold_acks = False
        self._held: set[int] = set()  # packet ids of held PUBACKs, this connection
        self._last_sent = 0.0
        self._last_received = 0.0
        self._ping_outstanding = False

    # ------------------------------------------------------------------ status
    @property
    def connected(self) -> bool:
        return self.state is SessionState.CONNECTED

    @property
    def queued_count(self) -> int:
        """Publishes accepted but not yet in flight (waiting for a window slot or a connection)."""
        return len(self._queued)

    @property
    def inflight_count(self) -> int:
        return len(self._inflight)

    @property
    def window(self) -> int:
        """How many QoS 1 publishes may be in flight at once (the broker's Receive Maximum)."""
        return self.broker_receive_maximum

    def statistics(self) -> dict[str, int | str]:
        return {
            "state": self.state.value,
            "connections": self.connections,
            "inflight": len(self._inflight),
            "queued": len(self._queued),
            "requests": len(self._requests),
            "held_acks": len(self._held),
            "subscriptions": len(self._subscriptions),
            "buffered_out": len(self._out),
            "buffered_in": len(self._in),
        }

    # ------------------------------------------------------------ connections
    def start_connection(self, now: float) -> None:
        """Queue CONNECT for a new byte stream."""
        if self.state is not SessionState.DISCONNECTED:
            raise LocalProtocolError(f"cannot connect while {self.state.value}")
        self._out.clear()
        self._in = b""
        self._ping_outstanding = False
        # A server keep-alive applied to its own connection only.
        self.effective_keep_alive = self.keep_alive
        clean = self.clean_start if self.connections == 0 else False
        packet = mqtt5.ConnectPacket(
            self.client_id,
            username=self.username,
            password=self.password,
            clean_start=clean,
            will=self.will,
            keep_alive=self.keep_alive,
            session_expiry_interval=self.session_expiry_interval,
            receive_max=self.receive_maximum,
            max_packet_size=self.max_packet_size,
            request_problem_info=True,
        )
        self._out += packet.write()
        self.state = SessionState.CONNECTING
        self._last_received = now
        self._last_sent = now

    def connection_lost(self) -> None:
        """The byte stream is gone. State that must survive (in-flight, subscriptions) stays."""
        self.state = SessionState.DISCONNECTED
        self._out.clear()
        self._in = b""
        self._ping_outstanding = False
        # The broker redelivers what we did not acknowledge; these ids are void now.
        self._held.clear()

    def disconnect(
        self,
        reason_code: int = 0,
        *,
        session_expiry_interval: int | None = None,
        reason_string: str | None = None,
    ) -> None:
        """Queue DISCONNECT. Reason 0 (normal) means the broker discards the will."""
        if self.state is not SessionState.CONNECTED:
            self.state = SessionState.CLOSING
            return
        packet = mqtt5.DisconnectPacket(
            reason_code=mqtt5.DisconnectReasonCode(reason_code),
            session_expiry_interval=session_expiry_interval,
            reason_str=reason_string,
        )
        self._out += packet.write()
        self.state = SessionState.CLOSING

    # ------------------------------------------------------------- outgoing
    def data_to_send(self, now: float) -> bytes:
        """All bytes queued for the broker (possibly empty)."""
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        self._last_sent = now
        return data

    def has_data_to_send(self) -> bool:
        return bool(self._out)

    @property
    def held_acks(self) -> int:
        """QoS 1 messages of this connection received and not yet acknowledged."""
        return len(self._held)

    def ack(self, ack_id: tuple[int, int]) -> bool:
        """Queue the held PUBACK of a received message (its :attr:`Message.ack_id`).

        Returns False, queueing nothing, when there is none to send: acknowledged
        already, or received on an earlier connection (the broker redelivers it).
        PUBACKs go out in the order of these calls, not necessarily in the order the
        messages arrived (see docs/transports.md, "Manual acknowledgement").
        """
        connection, pid = ack_id
        if (
            connection != self.connections
            or self.state is not SessionState.CONNECTED
            or pid not in self._held
        ):
            return False
        self._held.discard(pid)
        self._out += bytes((0x40, 2, pid >> 8, pid & 0xFF))
        return True

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        message_expiry_interval: int | None = None,
        content_type: str | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: list[tuple[str, str]] | None = None,
        payload_format_indicator: int = 0,
    ) -> OutgoingPublish | None:
        """Queue a PUBLISH. Returns a handle for QoS 1 (acknowledged later), None for QoS 0.

        QoS 0 is written at once when connected, else queued. QoS 1 goes in flight
        when the broker's window has room, else waits in the queue; the caller
        bounds the queue (``queued_count``).
        """
        check_publish(topic, qos)
        if self.state is SessionState.CLOSING:
            raise LocalProtocolError("session is closing")
        if retain and not self.retain_available:
            raise LocalProtocolError("the broker does not support retained messages")
        if qos > self.broker_max_qos:
            raise LocalProtocolError(f"the broker accepts QoS <= {self.broker_max_qos}")
        try:
            packet = mqtt5.PublishPacket(
                topic,
                payload,
                qos=QOS_LEVELS[qos],
                retain=retain,
                packet_id=1 if qos else None,
                message_expiry_interval=message_expiry_interval,
                content_type=content_type,
                response_topic=response_topic,
                correlation_data=correlation_data,
                user_properties=user_properties,
                payload_format_indicator=payload_format_indicator,
            )
            data = packet.write()
        except (ValueError, TypeError, OverflowError) as exc:
            raise LocalProtocolError(f"cannot encode PUBLISH: {exc}") from None
        limit = self.broker_max_packet_size
        if limit is not None and len(data) > limit:
            raise LocalProtocolError(
                f"PUBLISH of {len(data)} bytes exceeds the broker's maximum packet size {limit}"
            )
        if qos == 0:
            if self.state is SessionState.CONNECTED and not self._queued:
                self._out += data
                return None
            self._queued.append(OutgoingPublish(data, 0))
            return None
        pub = OutgoingPublish(bytearray(data), 1)
        if (
            self.state is SessionState.CONNECTED
            and not self._queued
            and len(self._inflight) < self.broker_receive_maximum
        ):
            self._send_inflight(pub)
        else:
            self._queued.append(pub)
        return pub

    def subscribe(
        self,
        filters: list[mqtt5.TopicFilter],
        *,
        subscription_id: int | None = None,
    ) -> tuple[int, int]:
        """Queue SUBSCRIBE. Returns (packet id, subscription handle).

        The handle names the subscription for :meth:`unsubscribe`; the session
        resubscribes it by itself when a reconnect finds no session on the broker.
        """
        if not filters:
            raise LocalProtocolError("subscribe needs at least one topic filter")
        for f in filters:
            check_topic_filter(f.pattern)
            if f.pattern.startswith("$share/") and not self.shared_subscriptions_available:
                raise LocalProtocolError("the broker does not support shared subscriptions")
        if subscription_id is not None and not 1 <= subscription_id <= MAX_SUBSCRIPTION_ID:
            raise LocalProtocolError("subscription id out of range")
        if not self.subscription_ids_available:
            subscription_id = None
        handle = self._next_handle
        self._next_handle += 1
        sub = _Subscription(filters, subscription_id)
        packet_id = self._send_subscribe(sub)
        self._subscriptions[handle] = sub
        return packet_id, handle

    def unsubscribe(self, handle: int) -> int | None:
        """Queue UNSUBSCRIBE for a subscription. Returns its packet id (None if not connected)."""
        sub = self._subscriptions.get(handle)
        if sub is None:
            raise LocalProtocolError(f"unknown subscription handle {handle}")
        packet_id = self._allocate_packet_id()
        del self._subscriptions[handle]
        packet = mqtt5.UnsubscribePacket(packet_id, [f.pattern for f in sub.filters])
        self._requests[packet_id] = _Request(packet)
        if self.state is SessionState.CONNECTED:
            self._out += packet.write()
        return packet_id

    # -------------------------------------------------------------- incoming
    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes from the broker; returns every event they complete.

        Raises RemoteProtocolError (or ConnectError for a refused CONNECT) when
        the broker misbehaves; the connection must then be closed.
        """
        if self._in:
            data = self._in + data
            self._in = b""
        if not data:
            return []
        self._last_received = now
        self._ping_outstanding = False
        events: list[Event] = []
        view = memoryview(data)
        end = len(data)
        pos = 0
        limit = self.max_packet_size
        while pos < end:
            if end - pos < 2:
                break
            first = data[pos]
            remaining = data[pos + 1]
            if remaining < 0x80:  # one-byte remaining length: most packets
                total = 2 + remaining
            else:
                header = _decode_remaining_length(view, pos + 1, end)
                if header is None:
                    break
                remaining, nlen = header
                total = 1 + nlen + remaining
            if total > limit:
                raise PacketTooLarge(
                    f"incoming packet of {total} bytes exceeds the maximum packet size {limit}"
                )
            if end - pos < total:
                break
            if first == 0x40 and remaining == 2 and self.state is SessionState.CONNECTED:
                # PUBACK, success, no properties (the common case): no codec round trip
                pub = self._inflight.pop((data[pos + 2] << 8) | data[pos + 3], None)
                if pub is not None:
                    self._acked(pub, 0, None, events)
                pos += total
                continue
            packet, used = _codec_read(view[pos : pos + total])
            if used != total:
                raise RemoteProtocolError("packet length mismatch", reason_code=0x81)
            pos += total
            self._handle_packet(packet, events, now)
        if pos < end:
            self._in = bytes(view[pos:])
        return events

    def _handle_packet(self, packet: mqtt5.Packet, events: list[Event], now: float) -> None:
        if isinstance(packet, mqtt5.PublishPacket):
            if self.state is not SessionState.CONNECTED:
                raise RemoteProtocolError("PUBLISH before CONNACK")
            if packet.topic_alias is not None:
                raise RemoteProtocolError(
                    "topic alias used although we allow none", reason_code=0x94
                )
            qos = packet.qos
            if qos is QoS.AT_LEAST_ONCE:
                pid = packet.packet_id
                if pid is None:
                    raise RemoteProtocolError("QoS 1 PUBLISH without a packet id")
                if self.hold_acks:
                    self._held.add(pid)
                    message = Message(packet)
                    message.ack_id = (self.connections, pid)
                    events.append(message)
                    return
                # PUBACK, success, no properties: reason code and properties omitted
                self._out += bytes((0x40, 2, pid >> 8, pid & 0xFF))
            elif qos is QoS.EXACTLY_ONCE:
                pid = packet.packet_id
                if pid is None:
                    raise RemoteProtocolError("QoS 2 PUBLISH without a packet id")
                self._out += mqtt5.PubRecPacket(pid).write()
                if pid in self._incoming_qos2:
                    return  # a redelivery of one we already passed on
                self._incoming_qos2.add(pid)
            events.append(Message(packet))
        elif isinstance(packet, mqtt5.PubAckPacket):
            pub = self._inflight.pop(packet.packet_id, None)
            if pub is not None:  # an unknown id is a stale ack from a previous connection
                self._acked(pub, int(packet.reason_code), packet.reason_str, events)
        elif isinstance(packet, mqtt5.ConnAckPacket):
            self._handle_connack(packet, events, now)
        elif isinstance(packet, mqtt5.SubAckPacket):
            req = self._requests.pop(packet.packet_id, None)
            if req is None or not isinstance(req.packet, mqtt5.SubscribePacket):
                raise RemoteProtocolError(f"SUBACK for unknown packet id {packet.packet_id}")
            for sub in self._subscriptions.values():
                sub.packet_ids.discard(packet.packet_id)
            if not req.internal:
                codes = [int(c) for c in packet.reason_codes]
                events.append(SubscribeAcked(packet.packet_id, codes, packet.reason_str))
        elif isinstance(packet, mqtt5.UnsubAckPacket):
            req = self._requests.pop(packet.packet_id, None)
            if req is None or not isinstance(req.packet, mqtt5.UnsubscribePacket):
                raise RemoteProtocolError(f"UNSUBACK for unknown packet id {packet.packet_id}")
            codes = [int(c) for c in packet.reason_codes]
            events.append(UnsubscribeAcked(packet.packet_id, codes, packet.reason_str))
        elif isinstance(packet, mqtt5.PingRespPacket):
            pass
        elif isinstance(packet, mqtt5.PubRelPacket):
            self._incoming_qos2.discard(packet.packet_id)
            self._out += mqtt5.PubCompPacket(packet.packet_id).write()
        elif isinstance(packet, mqtt5.DisconnectPacket):
            self.state = SessionState.DISCONNECTED
            events.append(
                Disconnected(int(packet.reason_code), packet.reason_str, packet.server_reference)
            )
        else:
            name = type(packet).__name__.removesuffix("Packet").upper()
            raise RemoteProtocolError(f"a broker must not send {name} to a client")

    def _acked(
        self, pub: OutgoingPublish, code: int, reason: str | None, events: list[Event]
    ) -> None:
        """A PUBACK: the publish left the window; the next queued one takes its slot."""
        pub.reason_code = code
        pub.reason_string = reason
        events.append(PublishAcked(pub))
        if self._queued:
            self._fill_window()

    def _handle_connack(self, packet: mqtt5.ConnAckPacket, events: list[Event], now: float) -> None:
        if self.state is not SessionState.CONNECTING:
            raise RemoteProtocolError("unexpected CONNACK")
        code = int(packet.reason_code)
        if code != 0:
            self.state = SessionState.DISCONNECTED
            detail = f": {packet.reason_str}" if packet.reason_str else ""
            raise ConnectError(
                f"broker refused the connection: {connack_reason_name(code)}{detail}",
                reason_code=code,
                retryable=code not in FATAL_CONNACK_CODES,
            )
        self.state = SessionState.CONNECTED
        self.connections += 1
        self.broker_receive_maximum = packet.receive_max or 65535
        self.broker_max_packet_size = packet.max_packet_size
        self.broker_max_qos = int(packet.max_qos)
        self.retain_available = packet.retain_available
        self.subscription_ids_available = packet.subscription_id_available
        self.shared_subscriptions_available = packet.shared_subscription_available
        if packet.server_keep_alive is not None:
            self.effective_keep_alive = packet.server_keep_alive
        if packet.assigned_client_id:
            self.client_id = packet.assigned_client_id
        present = packet.session_present
        if not present:
            # No session on the broker: it will not resend the QoS 2 PUBLISHes we
            # acknowledged with PUBREC, so their ids no longer mark duplicates.
            self._incoming_qos2.clear()
        # Requests that never got their acknowledgement are sent again with the same ids.
        # Our own resubscriptions are dropped and made afresh below.
        dropped: set[int] = set()
        for pid, req in list(self._requests.items()):
            if req.internal:
                del self._requests[pid]
                dropped.add(pid)
            else:
                self._out += req.packet.write()
        for sub in self._subscriptions.values():
            unconfirmed = not sub.packet_ids.isdisjoint(dropped)
            sub.packet_ids -= dropped
            # The broker forgot our subscriptions, or a resubscription may never have
            # reached it: make them again.
            if (not present or unconfirmed) and not sub.packet_ids:
                self._send_subscribe(sub, internal=True)
        # Nobody waits for these SUBACKs (a subscribe() still waiting started its bound
        # on an earlier connection): the session bounds them itself, from now.
        for req in self._requests.values():
            if isinstance(req.packet, mqtt5.SubscribePacket):
                req.deadline = None if self.ack_timeout is None else now + self.ack_timeout
        # Unacknowledged QoS 1 publishes are resent (DUP when the broker kept the session).
        for pub in self._inflight.values():
            data = pub.data
            if present:
                data = bytes([data[0] | 0x08]) + data[1:]
            self._out += data
        # A smaller window than before: the extra in-flight ones simply stay in flight.
        self._fill_window()
        events.append(Connected(present, packet))

    # ------------------------------------------------------------ keep-alive
    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must next run (None: nothing to time)."""
        overdue = self._resubscribe_deadline()
        keep_alive = self._keep_alive_deadline()
        if overdue is None or keep_alive is None:
            return keep_alive if overdue is None else overdue
        return min(overdue, keep_alive)

    def _keep_alive_deadline(self) -> float | None:
        ka = self.effective_keep_alive
        if ka == 0 or self.state not in (SessionState.CONNECTED, SessionState.CONNECTING):
            return None
        if self._ping_outstanding or self.state is SessionState.CONNECTING:
            return self._last_received + 1.5 * ka
        return min(self._last_sent, self._last_received) + ka

    def _resubscribe_deadline(self) -> float | None:
        if self.state is not SessionState.CONNECTED:
            return None
        deadlines = [r.deadline for r in self._requests.values() if r.deadline is not None]
        return min(deadlines) if deadlines else None

    def overdue_subscribes(self, now: float) -> list[str]:
        """The filters of SUBSCRIBEs sent at CONNACK and unacknowledged for ``ack_timeout``.

        (What :meth:`handle_timer` raises AckTimeout for; a driver may tell it first,
        naming the broker.)
        """
        if self.state is not SessionState.CONNECTED:
            return []
        return [
            f.pattern
            for r in self._requests.values()
            if r.deadline is not None
            and r.deadline <= now
            and isinstance(r.packet, mqtt5.SubscribePacket)
            for f in r.packet.topic_filters
        ]

    def handle_timer(self, now: float) -> None:
        """Send PINGREQ when idle; raise KeepAliveTimeout when the broker went silent.

        A ping goes out when nothing was sent, or nothing was heard, for one
        keep-alive; the connection is declared dead when nothing at all was
        heard for 1.5 keep-alives. Raises AckTimeout when a SUBSCRIBE sent at
        CONNACK (see ``ack_timeout``) is still unacknowledged ``ack_timeout`` later:
        a broker that never answers it would leave us connected but deaf.
        """
        overdue = self.overdue_subscribes(now)
        if overdue and self.ack_timeout is not None:
            raise AckTimeout(
                f"SUBSCRIBE {', '.join(map(repr, overdue))} (sent at CONNACK): no SUBACK "
                f"within {self.ack_timeout:g} s",
                packet="SUBSCRIBE",
                timeout=self.ack_timeout,
            )
        ka = self.effective_keep_alive
        if ka == 0 or self.state not in (SessionState.CONNECTED, SessionState.CONNECTING):
            return
        if now - self._last_received >= 1.5 * ka:
            raise KeepAliveTimeout(f"no data from the broker for {now - self._last_received:.1f} s")
        if self.state is SessionState.CONNECTED and not self._ping_outstanding:
            if now - self._last_sent >= ka or now - self._last_received >= ka:
                self._out += b"\xc0\x00"
                self._ping_outstanding = True

    # -------------------------------------------------------------- helpers
    def _allocate_packet_id(self) -> int:
        for _ in range(MAX_PACKET_ID):
            pid = self._next_packet_id
            self._next_packet_id = 1 if pid == MAX_PACKET_ID else pid + 1
            if pid not in self._inflight and pid not in self._requests:
                return pid
        raise LocalProtocolError("all 65535 packet ids are in use")

    def _send_inflight(self, pub: OutgoingPublish) -> None:
        pid = self._allocate_packet_id()
        pub.packet_id = pid
        # The packet id sits right after the topic: patch it into the encoded bytes.
        data = pub.data
        assert isinstance(data, bytearray)
        at = _packet_id_offset(data)
        data[at] = pid >> 8
        data[at + 1] = pid & 0xFF
        self._inflight[pid] = pub
        self._out += data

    def _fill_window(self) -> None:
        if self.state is not SessionState.CONNECTED:
            return
        queued = self._queued
        limit = self.broker_receive_maximum
        while queued:
            pub = queued[0]
            if pub.qos == 0:
                queued.popleft()
                self._out += pub.data
                continue
            if len(self._inflight) >= limit:
                break
            queued.popleft()
            self._send_inflight(pub)

    def _send_subscribe(self, sub: _Subscription, *, internal: bool = False) -> int:
        pid = self._allocate_packet_id()
        packet = mqtt5.SubscribePacket(pid, sub.filters, subscription_id=sub.subscription_id)
        self._requests[pid] = _Request(packet, internal=internal)
        sub.packet_ids.add(pid)
        if self.state is SessionState.CONNECTED:
            self._out += packet.write()
        return pid


def _packet_id_offset(data: bytes | bytearray) -> int:
    """Where the packet id of an encoded QoS>0 PUBLISH is (it follows the topic)."""
    offset = 2
    while data[offset - 1] & 0x80:  # remaining length: 1-4 bytes
        offset += 1
    return offset + 2 + ((data[offset] << 8) | data[offset + 1])


def check_topic_name(topic: str) -> None:
    """Refuse a topic name that cannot be published to (empty, wildcards, NUL)."""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise LocalProtocolError(f"invalid topic name for publishing: {topic!r}")


def check_publish(topic: str, qos: int) -> None:
    """Refuse a publish no backend makes: QoS other than 0 and 1, a bad topic name."""
    if qos not in (0, 1):
        raise LocalProtocolError(f"QoS {qos} is not supported for publishing (use 0 or 1)")
    check_topic_name(topic)


def check_subscription(filters: Sequence[str], qos: int, retain_handling: int) -> None:
    """Refuse a subscription no backend makes: no filter, a malformed one, QoS or retain
    handling out of range."""
    if not filters:
        raise LocalProtocolError("subscribe needs at least one topic filter")
    for pattern in filters:
        check_topic_filter(pattern)
    if qos not in (0, 1, 2):
        raise LocalProtocolError(f"invalid QoS {qos}")
    if retain_handling not in (0, 1, 2):
        raise LocalProtocolError(f"invalid retain handling {retain_handling}")


def check_topic_filter(pattern: str) -> None:
    """Refuse a malformed topic filter (wildcard placement, shared-subscription form)."""
    if not pattern or "\x00" in pattern:
        raise LocalProtocolError(f"invalid topic filter {pattern!r}")
    levels = pattern.split("/")
    if pattern.startswith("$share/"):
        if (
            len(levels) < 3
            or not levels[1]
            or "+" in levels[1]
            or "#" in levels[1]
            or (levels[2:] == [""])
        ):
            raise LocalProtocolError(f"invalid shared subscription {pattern!r}")
        levels = levels[2:]
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise LocalProtocolError(f"'#' must be the last level of a filter: {pattern!r}")
        if "+" in level and level != "+":
            raise LocalProtocolError(f"'+' must occupy a whole level: {pattern!r}")


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether a topic name matches a filter (shared-subscription prefix removed first)."""
    if pattern.startswith("$share/"):
        pattern = pattern.split("/", 2)[2]
    if pattern == topic:
        return True
    p_levels = pattern.split("/")
    t_levels = topic.split("/")
    if topic.startswith("$") and p_levels[0] in ("+", "#"):
        return False
    for i, p in enumerate(p_levels):
        if p == "#":
            return True
        if i >= len(t_levels):
            return False
        if p != "+" and p != t_levels[i]:
            return False
    return len(p_levels) == len(t_levels)
