"""Test helpers for the sans-IO session, in the spirit of h11's ``tests/helpers.py``.

``FakeBrokerPeer`` is the broker side of a byte stream, reduced to what a test
needs: it decodes whatever the :class:`~sheri_trio.mqtt._session.Session` sent
(with ``mqtt5.read``, independently of the session's own framing) and lets the
test write replies as ``mqtt5`` packets. It keeps no protocol state of its own:
the test decides every reply. Nothing here does I/O or touches a clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import mqtt5

from sheri_trio.mqtt._session import (
    Connected,
    Disconnected,
    Message,
    PublishAcked,
    Session,
    SubscribeAcked,
    UnsubscribeAcked,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from sheri_trio.mqtt._session import Event

P = TypeVar("P")


def encode(*packets: Any) -> bytes:
    """The wire bytes of ``packets``, back to back."""
    return b"".join(p.write() for p in packets)


def _frame_length(buf: bytes | bytearray, pos: int) -> int | None:
    """Total length of the packet starting at ``pos``, or None if the header is incomplete."""
    value = 0
    for i in range(4):
        at = pos + 1 + i
        if at >= len(buf):
            return None
        byte = buf[at]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return 1 + (i + 1) + value
    raise AssertionError(f"the session sent a malformed remaining length: {bytes(buf[pos:])!r}")


class FakeBrokerPeer:
    """The broker end of one session's byte stream (test-only, sans-IO).

    ``receive_data`` decodes complete packets the session sent and remembers
    them in ``received``; partial packets wait in a buffer, so bytes may be fed
    in any chunking. ``to_session`` encodes replies.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.received: list[Any] = []
        self.raw: list[bytes] = []  # the encoded form of each received packet

    def receive_data(self, data: bytes) -> list[Any]:
        self._buf += data
        packets: list[Any] = []
        while self._buf:
            total = _frame_length(self._buf, 0)
            if total is None or len(self._buf) < total:
                break
            frame = bytes(self._buf[:total])
            packet, used = mqtt5.read(memoryview(frame))
            assert used == total, f"codec used {used} of {total} bytes"
            del self._buf[:total]
            packets.append(packet)
            self.raw.append(frame)
        self.received += packets
        return packets

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete packet still waiting (should be 0 between exchanges)."""
        return len(self._buf)

    @staticmethod
    def to_session(*packets: Any) -> bytes:
        return encode(*packets)

    @staticmethod
    def connack(**kwargs: Any) -> mqtt5.ConnAckPacket:
        return mqtt5.ConnAckPacket(**kwargs)


def transfer(session: Session, peer: FakeBrokerPeer, now: float = 0.0) -> list[Any]:
    """Move everything the session has queued to the peer; return the packets decoded."""
    return peer.receive_data(session.data_to_send(now))


def send_packets(session: Session, *packets: Any, now: float = 0.0) -> list[Event]:
    """Deliver broker packets to the session in one chunk; return its events."""
    return session.receive_data(encode(*packets), now)


def receive_bytewise(session: Session, data: bytes, now: float = 0.0) -> list[Event]:
    """Feed ``data`` one byte at a time; return all the events, in order."""
    events: list[Event] = []
    for i in range(len(data)):
        events += session.receive_data(data[i : i + 1], now)
    return events


def only(packets: Iterable[Any], kind: type[P]) -> list[P]:
    return [p for p in packets if isinstance(p, kind)]


def connected_pair(
    client_id: str = "test-client",
    *,
    now: float = 0.0,
    connack: dict[str, Any] | None = None,
    **session_kwargs: Any,
) -> tuple[Session, FakeBrokerPeer]:
    """A session that has sent CONNECT and received a successful CONNACK."""
    session = Session(client_id, **session_kwargs)
    peer = FakeBrokerPeer()
    session.start_connection(now)
    (connect,) = transfer(session, peer, now)
    assert isinstance(connect, mqtt5.ConnectPacket)
    events = send_packets(session, mqtt5.ConnAckPacket(**(connack or {})), now=now)
    assert [type(e) for e in events] == [Connected]
    return session, peer


def normalize(event: Event) -> tuple[Any, ...]:
    """A comparable form of an event (Message and the codec's packets have no __eq__)."""
    if isinstance(event, Message):
        return ("Message", repr(event.packet))
    if isinstance(event, Connected):
        return ("Connected", event.session_present, repr(event.connack))
    if isinstance(event, PublishAcked):
        pub = event.publish
        return ("PublishAcked", pub.packet_id, pub.reason_code, pub.reason_string)
    if isinstance(event, SubscribeAcked | UnsubscribeAcked | Disconnected):
        return (type(event).__name__, *(getattr(event, f) for f in event.__slots__))
    raise AssertionError(f"unknown event {event!r}")
