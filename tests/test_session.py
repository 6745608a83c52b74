"""Unit tests of the sans-IO session: bytes in, events and bytes out, explicit ``now``.

No network, no trio: the broker is a :class:`helpers.FakeBrokerPeer` that decodes
what the session sends and lets each test write the replies.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import mqtt5
import pytest
from helpers import (
    FakeBrokerPeer,
    connected_pair,
    encode,
    normalize,
    only,
    receive_bytewise,
    send_packets,
    transfer,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqtt5 import QoS

from sheri_trio.mqtt._errors import (
    AckTimeout,
    ConnectError,
    KeepAliveTimeout,
    LocalProtocolError,
    PacketTooLarge,
    RemoteProtocolError,
)
from sheri_trio.mqtt._session import (
    Connected,
    Disconnected,
    Message,
    OutgoingPublish,
    PublishAcked,
    Session,
    SessionState,
    SubscribeAcked,
    UnsubscribeAcked,
    connack_reason_name,
    disconnect_reason_name,
    topic_matches,
)

R = mqtt5.ConnAckReasonCode
GRANT0 = mqtt5.SubAckReasonCode.GRANTED_QOS_AT_MOST_ONCE
GRANT1 = mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE
UNSUB_OK = mqtt5.UnsubAckReasonCode.SUCCESS
PANIC_INPUT = bytes.fromhex("30 05 00 02 ff fe 00")
#: mqtt5 0.8 panics on any string that is not UTF-8 (PUBLISH topic, reason string...),
#: and on its way out reports the UnicodeDecodeError behind the panic through
#: sys.unraisablehook, which pytest turns into a warning (an error here). The session
#: itself raises RemoteProtocolError; the tests that feed such input allow the report.
CODEC_PANICS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def tf(pattern: str, qos: QoS = QoS.AT_LEAST_ONCE) -> mqtt5.TopicFilter:
    return mqtt5.TopicFilter(pattern, max_qos=qos)


def suback(packet_id: int, *codes: Any) -> mqtt5.SubAckPacket:
    return mqtt5.SubAckPacket(packet_id, list(codes) or [GRANT1])


def reconnect(
    session: Session, peer: FakeBrokerPeer, now: float = 0.0, **connack: Any
) -> tuple[list[Any], list[Any]]:
    """Lose the connection, reconnect, answer CONNACK: (events, packets sent after CONNACK)."""
    session.connection_lost()
    session.start_connection(now)
    (connect,) = transfer(session, peer, now)
    assert isinstance(connect, mqtt5.ConnectPacket)
    assert connect.clean_start is False
    events = send_packets(session, mqtt5.ConnAckPacket(**connack), now=now)
    return events, transfer(session, peer, now)


# ---------------------------------------------------------------- CONNECT / CONNACK


def test_connect_contents() -> None:
    will = mqtt5.Will("clients/c1/status", payload=b"gone", qos=QoS.AT_LEAST_ONCE, retain=True)
    s = Session(
        "c1",
        username="user",
        password=b"secret",
        keep_alive=10,
        session_expiry_interval=300,
        will=will,
        receive_maximum=5,
        max_packet_size=4096,
    )
    assert s.state is SessionState.DISCONNECTED
    peer = FakeBrokerPeer()
    s.start_connection(0.0)
    assert s.state is SessionState.CONNECTING
    (connect,) = transfer(s, peer)
    assert isinstance(connect, mqtt5.ConnectPacket)
    assert connect.client_id == "c1"
    assert connect.username == "user"
    assert connect.password == b"secret"
    assert connect.keep_alive == 10
    assert connect.clean_start is True
    assert connect.session_expiry_interval == 300
    assert connect.receive_max == 5
    assert connect.max_packet_size == 4096
    assert connect.topic_alias_max == 0
    assert connect.request_problem_info is True
    assert connect.will == will
    assert connect.will is not None
    assert connect.will.topic == "clients/c1/status"
    assert connect.will.payload == b"gone"
    assert connect.will.retain is True
    assert peer.pending_bytes == 0
    assert not s.has_data_to_send()


def test_connect_without_optional_fields() -> None:
    s = Session("c2")
    peer = FakeBrokerPeer()
    s.start_connection(0.0)
    (connect,) = transfer(s, peer)
    assert connect.username is None
    assert connect.password is None
    assert connect.will is None
    assert connect.keep_alive == 60
    assert connect.session_expiry_interval == 0
    assert connect.max_packet_size == 1024 * 1024


def test_clean_start_only_on_first_connection() -> None:
    s, peer = connected_pair(session_expiry_interval=60)
    assert peer.received[0].clean_start is True
    for _ in range(2):
        events, _ = reconnect(s, peer, session_present=True)
        assert [type(e) for e in events] == [Connected]
        assert peer.received[-1].clean_start is False  # no data sent after the CONNACK
    assert s.connections == 3


def test_clean_start_false_requested() -> None:
    s = Session("c", clean_start=False)
    peer = FakeBrokerPeer()
    s.start_connection(0.0)
    assert transfer(s, peer)[0].clean_start is False


def test_refused_first_connection_keeps_clean_start() -> None:
    s = Session("c")
    peer = FakeBrokerPeer()
    s.start_connection(0.0)
    transfer(s, peer)
    with pytest.raises(ConnectError):
        send_packets(s, mqtt5.ConnAckPacket(reason_code=R.SERVER_UNAVAILABLE))
    assert s.connections == 0
    s.connection_lost()
    s.start_connection(1.0)
    assert transfer(s, peer, 1.0)[0].clean_start is True


def test_connack_success() -> None:
    s = Session("c", keep_alive=30)
    peer = FakeBrokerPeer()
    s.start_connection(0.0)
    transfer(s, peer)
    connack = mqtt5.ConnAckPacket(
        session_present=False,
        receive_max=7,
        max_packet_size=2048,
        max_qos=QoS.AT_LEAST_ONCE,
        retain_available=False,
        assigned_client_id="assigned-1",
        user_properties=[("k", "v")],
    )
    events = s.receive_data(connack.write(), 0.5)
    assert len(events) == 1
    (ev,) = events
    assert isinstance(ev, Connected)
    assert ev.session_present is False
    assert ev.connack == connack
    assert s.connected
    assert s.state is SessionState.CONNECTED
    assert s.connections == 1
    assert s.window == 7
    assert s.broker_receive_maximum == 7
    assert s.broker_max_packet_size == 2048
    assert s.broker_max_qos == 1
    assert s.retain_available is False
    assert s.client_id == "assigned-1"
    assert s.effective_keep_alive == 30
    assert s.statistics()["state"] == "connected"
    assert transfer(s, peer) == []


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (R.UNSPECIFIED_ERROR, True),
        (R.CLIENT_ID_NOT_VALID, False),
        (R.BAD_USER_NAME_OR_PASSWORD, False),  # 0x86
        (R.NOT_AUTHORIZED, False),  # 0x87
        (R.SERVER_UNAVAILABLE, True),  # 0x88
        (R.SERVER_BUSY, True),  # 0x89
        (R.BANNED, False),  # 0x8A
        (R.QUOTA_EXCEEDED, True),
        (R.USE_ANOTHER_SERVER, True),
        (R.CONNECTION_RATE_EXCEEDED, True),
    ],
)
def test_connack_refused(code: Any, retryable: bool) -> None:
    s = Session("c")
    peer = FakeBrokerPeer()
    s.start_connection(0.0)
    transfer(s, peer)
    with pytest.raises(ConnectError) as info:
        send_packets(s, mqtt5.ConnAckPacket(reason_code=code, reason_str="go away"))
    assert info.value.reason_code == int(code)
    assert info.value.retryable is retryable
    assert f"0x{int(code):02X}" in str(info.value)
    assert "go away" in str(info.value)
    assert s.state is SessionState.DISCONNECTED
    assert not s.connected
    # The session can try again.
    s.start_connection(1.0)
    assert isinstance(transfer(s, peer, 1.0)[0], mqtt5.ConnectPacket)


def test_unexpected_connack_when_connected() -> None:
    s, _ = connected_pair()
    with pytest.raises(RemoteProtocolError, match="CONNACK"):
        send_packets(s, mqtt5.ConnAckPacket())


def test_connack_in_the_same_chunk_twice() -> None:
    s = Session("c")
    s.start_connection(0.0)
    s.data_to_send(0.0)
    with pytest.raises(RemoteProtocolError):
        send_packets(s, mqtt5.ConnAckPacket(), mqtt5.ConnAckPacket())


def test_connect_twice_is_local_error() -> None:
    s = Session("c")
    s.start_connection(0.0)
    with pytest.raises(LocalProtocolError):
        s.start_connection(0.0)
    s2, _ = connected_pair()
    with pytest.raises(LocalProtocolError):
        s2.start_connection(0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_alive": -1},
        {"keep_alive": 65536},
        {"receive_maximum": 0},
        {"receive_maximum": 65536},
        {"max_packet_size": 63},
    ],
)
def test_invalid_session_arguments(kwargs: dict[str, int]) -> None:
    with pytest.raises(LocalProtocolError):
        Session("c", **kwargs)


def test_reason_names() -> None:
    assert connack_reason_name(0x87) == "NOT_AUTHORIZED (0x87)"
    assert connack_reason_name(0x01) == "UNKNOWN (0x01)"
    assert disconnect_reason_name(0x8E) == "SESSION_TAKEN_OVER (0x8E)"


# --------------------------------------------------------------------- publishing


def test_qos0_publish_bytes() -> None:
    s, peer = connected_pair()
    assert s.publish("a/b", b"hello") is None
    data = s.data_to_send(1.0)
    assert data == mqtt5.PublishPacket("a/b", b"hello").write()
    assert data[0] == 0x30
    (pkt,) = peer.receive_data(data)
    assert pkt.qos is QoS.AT_MOST_ONCE
    assert pkt.packet_id is None
    assert s.inflight_count == 0


def test_qos0_publish_with_properties_and_retain() -> None:
    s, peer = connected_pair()
    s.publish(
        "a/b",
        b"{}",
        retain=True,
        message_expiry_interval=30,
        content_type="application/json",
        response_topic="reply/here",
        correlation_data=b"\x01\x02",
        user_properties=[("x", "y")],
        payload_format_indicator=1,
    )
    (pkt,) = transfer(s, peer)
    assert pkt.retain is True
    assert pkt.message_expiry_interval == 30
    assert pkt.content_type == "application/json"
    assert pkt.response_topic == "reply/here"
    assert pkt.correlation_data == b"\x01\x02"
    assert pkt.user_properties == [("x", "y")]
    assert pkt.payload_format_indicator == 1
    assert peer.raw[-1][0] == 0x31


def test_qos1_packet_ids_assigned() -> None:
    s, peer = connected_pair()
    pubs = [s.publish(f"t/{i}", b"p%d" % i, qos=1) for i in range(3)]
    assert all(isinstance(p, OutgoingPublish) for p in pubs)
    assert [p.packet_id for p in pubs if p] == [1, 2, 3]
    packets = transfer(s, peer)
    assert [(p.topic, p.payload, p.qos, p.packet_id, p.duplicate) for p in packets] == [
        (f"t/{i}", b"p%d" % i, QoS.AT_LEAST_ONCE, i + 1, False) for i in range(3)
    ]
    assert all(raw[0] == 0x32 for raw in peer.raw[1:])
    assert s.inflight_count == 3
    assert s.queued_count == 0


def test_qos1_window_limited_by_broker_receive_max() -> None:
    s, peer = connected_pair(connack={"receive_max": 2})
    assert s.window == 2
    p1 = s.publish("t", b"1", qos=1)
    p2 = s.publish("t", b"2", qos=1)
    p3 = s.publish("t", b"3", qos=1)
    assert p1
    assert p2
    assert p3
    assert [p.payload for p in transfer(s, peer)] == [b"1", b"2"]
    assert (s.inflight_count, s.queued_count) == (2, 1)
    assert p3.packet_id is None
    # A QoS 0 publish must not overtake the queued QoS 1 one.
    s.publish("t", b"0", qos=0)
    assert transfer(s, peer) == []
    assert s.queued_count == 2

    events = send_packets(s, mqtt5.PubAckPacket(p1.packet_id or 0), now=1.0)
    assert len(events) == 1
    assert isinstance(events[0], PublishAcked)
    assert events[0].publish is p1
    assert p1.reason_code == 0
    out = transfer(s, peer, 1.0)
    assert [(p.payload, int(p.qos)) for p in out] == [(b"3", 1), (b"0", 0)]
    assert out[0].packet_id == p3.packet_id
    assert p3.packet_id not in (None, p2.packet_id)
    assert (s.inflight_count, s.queued_count) == (2, 0)


@pytest.mark.parametrize(
    ("code", "reason_str"),
    [
        (mqtt5.PubAckReasonCode.SUCCESS, None),
        (mqtt5.PubAckReasonCode.NO_MATCHING_SUBSCRIBERS, None),
        (mqtt5.PubAckReasonCode.NOT_AUTHORIZED, "denied"),
        (mqtt5.PubAckReasonCode.QUOTA_EXCEEDED, "full"),
    ],
)
def test_puback_reason_code_carried(code: Any, reason_str: str | None) -> None:
    s, peer = connected_pair()
    pub = s.publish("t", b"x", qos=1)
    assert pub is not None
    assert pub.packet_id is not None
    transfer(s, peer)
    events = send_packets(
        s, mqtt5.PubAckPacket(pub.packet_id, reason_code=code, reason_str=reason_str)
    )
    assert [type(e) for e in events] == [PublishAcked]
    assert pub.reason_code == int(code)
    assert pub.reason_string == reason_str
    assert s.inflight_count == 0


def test_unknown_and_duplicate_puback_ignored() -> None:
    s, peer = connected_pair()
    pub = s.publish("t", b"x", qos=1)
    assert pub is not None
    transfer(s, peer)
    assert send_packets(s, mqtt5.PubAckPacket(999)) == []
    assert s.inflight_count == 1
    assert len(send_packets(s, mqtt5.PubAckPacket(1))) == 1
    assert send_packets(s, mqtt5.PubAckPacket(1)) == []
    assert s.connected


def test_acks_in_short_form_and_messages_keep_their_order_in_one_read() -> None:
    # A success PUBACK without properties is 4 bytes (decoded without the codec);
    # one with a reason code takes the codec. Events come out in wire order.
    s, peer = connected_pair(connack={"receive_max": 2})
    pubs = [s.publish("t", b"%d" % i, qos=1) for i in range(4)]
    assert all(pubs)
    transfer(s, peer)
    p1, p2, _, _ = (p for p in pubs if p)
    data = (
        bytes((0x40, 2, 0, p1.packet_id or 0))
        + encode(mqtt5.PublishPacket("in", b"m", qos=QoS.AT_LEAST_ONCE, packet_id=9))
        + encode(
            mqtt5.PubAckPacket(
                p2.packet_id or 0, reason_code=mqtt5.PubAckReasonCode.NO_MATCHING_SUBSCRIBERS
            )
        )
    )
    events = s.receive_data(data, 0.0)
    assert [type(e).__name__ for e in events] == ["PublishAcked", "Message", "PublishAcked"]
    assert [p1.reason_code, p2.reason_code] == [0, 0x10]
    out = peer.receive_data(s.data_to_send(0.0))
    # the window refilled in order, and our own PUBACK for id 9 uses the short form
    assert [(type(p).__name__, getattr(p, "payload", None)) for p in out] == [
        ("PublishPacket", b"2"),
        ("PubAckPacket", None),
        ("PublishPacket", b"3"),
    ]
    assert bytes((0x40, 2, 0, 9)) in peer.raw
    # split byte by byte: the same events
    s2, peer2 = connected_pair()
    q = s2.publish("t", b"x", qos=1)
    assert q is not None
    transfer(s2, peer2)
    events = receive_bytewise(s2, bytes((0x40, 2, 0, q.packet_id or 0)))
    assert [type(e) for e in events] == [PublishAcked]
    assert s2.inflight_count == 0


def test_packet_ids_wrap_and_skip_ids_in_use() -> None:
    s, peer = connected_pair()
    first = s.publish("t", b"a", qos=1)  # id 1, left unacknowledged
    assert first is not None
    assert first.packet_id == 1
    s._next_packet_id = 0xFFFF
    last = s.publish("t", b"b", qos=1)
    wrapped = s.publish("t", b"c", qos=1)
    assert last is not None
    assert wrapped is not None
    assert last.packet_id == 0xFFFF
    assert wrapped.packet_id == 2  # 1 is still in flight
    assert [p.packet_id for p in transfer(s, peer)] == [1, 0xFFFF, 2]


def test_packet_ids_exhausted() -> None:
    s, peer = connected_pair()
    pid, handle = s.subscribe([tf("a")])
    transfer(s, peer)
    send_packets(s, suback(pid))
    s._inflight = {pid: OutgoingPublish(b"", 1) for pid in range(1, 0xFFFF)}
    s.publish("t", b"x", qos=1)  # the window (65535) has room: takes the last id
    assert s.inflight_count == 0xFFFF
    with pytest.raises(LocalProtocolError, match="packet ids"):
        s.subscribe([tf("b")])
    with pytest.raises(LocalProtocolError, match="packet ids"):
        s.unsubscribe(handle)
    # A failed call leaves no trace: one subscription, still known.
    assert s.statistics()["subscriptions"] == 1
    assert s.statistics()["requests"] == 0
    send_packets(s, mqtt5.PubAckPacket(7))
    assert s.unsubscribe(handle) == 7


def test_publishes_queued_while_disconnected_sent_in_order() -> None:
    s = Session("c")
    peer = FakeBrokerPeer()
    assert s.publish("t", b"a") is None
    b = s.publish("t", b"b", qos=1)
    s.publish("t", b"c")
    assert s.queued_count == 3
    assert not s.has_data_to_send()
    s.start_connection(0.0)
    (connect,) = transfer(s, peer)  # nothing but CONNECT before the CONNACK
    assert isinstance(connect, mqtt5.ConnectPacket)
    s.publish("t", b"d", qos=1)  # while CONNECTING: still queued
    assert transfer(s, peer) == []
    send_packets(s, mqtt5.ConnAckPacket())
    out = transfer(s, peer)
    assert [(p.payload, int(p.qos)) for p in out] == [(b"a", 0), (b"b", 1), (b"c", 0), (b"d", 1)]
    assert b is not None
    assert out[1].packet_id == b.packet_id
    assert s.queued_count == 0
    assert s.inflight_count == 2


def test_publishes_queued_while_disconnected_respect_window() -> None:
    s = Session("c")
    peer = FakeBrokerPeer()
    for i in range(4):
        s.publish("t", b"%d" % i, qos=1)
    s.start_connection(0.0)
    transfer(s, peer)
    send_packets(s, mqtt5.ConnAckPacket(receive_max=3))
    assert [p.payload for p in transfer(s, peer)] == [b"0", b"1", b"2"]
    assert s.queued_count == 1
    send_packets(s, mqtt5.PubAckPacket(2))
    assert [p.payload for p in transfer(s, peer)] == [b"3"]


def test_outgoing_publish_too_large_for_broker() -> None:
    s, peer = connected_pair(connack={"max_packet_size": 100})
    exact = mqtt5.PublishPacket("t", b"", qos=QoS.AT_LEAST_ONCE, packet_id=1).write()
    room = 100 - len(exact)
    assert s.publish("t", b"x" * room, qos=1) is not None  # exactly 100 bytes: fine
    assert len(transfer(s, peer)) == 1
    assert len(peer.raw[-1]) == 100
    with pytest.raises(LocalProtocolError, match="maximum packet size"):
        s.publish("t", b"x" * (room + 1), qos=1)
    with pytest.raises(LocalProtocolError):
        s.publish("t", b"x" * 200)
    assert s.inflight_count == 1
    assert transfer(s, peer) == []


# -------------------------------------------------------------------- reconnecting


def test_reconnect_session_present_resends_with_dup() -> None:
    s, peer = connected_pair(session_expiry_interval=600)
    p1 = s.publish("t/1", b"one", qos=1)
    p2 = s.publish("t/2", b"two", qos=1)
    assert p1
    assert p2
    transfer(s, peer)
    originals = peer.raw[1:3]
    events, out = reconnect(s, peer, 5.0, session_present=True)
    assert [type(e) for e in events] == [Connected]
    assert events[0].session_present is True
    assert [(p.topic, p.payload, p.packet_id, p.duplicate) for p in out] == [
        ("t/1", b"one", p1.packet_id, True),
        ("t/2", b"two", p2.packet_id, True),
    ]
    resent = peer.raw[-2:]
    for old, new in zip(originals, resent, strict=True):
        assert new[0] == old[0] | 0x08
        assert new[1:] == old[1:]
    # The acknowledgements then complete the original handles.
    acked = send_packets(s, mqtt5.PubAckPacket(p2.packet_id or 0), mqtt5.PubAckPacket(1))
    assert [e.publish for e in acked if isinstance(e, PublishAcked)] == [p2, p1]


def test_reconnect_without_session_resends_and_resubscribes() -> None:
    s, peer = connected_pair()
    sub_pid, handle = s.subscribe([tf("a/#"), tf("b/+", QoS.AT_MOST_ONCE)], subscription_id=7)
    (subscribe,) = transfer(s, peer)
    assert [type(e) for e in send_packets(s, suback(sub_pid, GRANT1, GRANT0))] == [SubscribeAcked]
    pub = s.publish("t", b"x", qos=1)
    assert pub is not None
    transfer(s, peer)
    original = peer.raw[-1]

    events, out = reconnect(s, peer, session_present=False)
    assert [type(e) for e in events] == [Connected]
    subs = only(out, mqtt5.SubscribePacket)
    pubs = only(out, mqtt5.PublishPacket)
    assert len(subs) == 1
    assert subs[0].topic_filters == subscribe.topic_filters
    assert subs[0].subscription_id == 7
    assert subs[0].packet_id not in (sub_pid, pub.packet_id)
    assert len(pubs) == 1
    assert pubs[0].packet_id == pub.packet_id
    assert original in peer.raw  # resent as it was (no broker session: not a duplicate)

    # The resubscription's SUBACK is internal: no event.
    assert send_packets(s, suback(subs[0].packet_id, GRANT1, GRANT0)) == []
    assert s.statistics()["requests"] == 0
    # And the subscription is still the caller's to unsubscribe.
    unsub_pid = s.unsubscribe(handle)
    (unsub,) = transfer(s, peer)
    assert unsub.patterns == ["a/#", "b/+"]
    assert unsub.packet_id == unsub_pid


def test_subscribes_sent_at_connack_are_bounded_by_ack_timeout() -> None:
    """Nobody waits for a resubscription's SUBACK: the session times it itself."""
    s, peer = connected_pair(keep_alive=0, ack_timeout=10)
    pid, _ = s.subscribe([tf("a/#"), tf("b")])
    transfer(s, peer)
    send_packets(s, suback(pid, GRANT1, GRANT1))
    # a SUBSCRIBE sent while connected is its caller's to bound, not the session's
    pending_pid, _ = s.subscribe([tf("c")])
    transfer(s, peer)
    assert s.next_deadline() is None
    _, out = reconnect(s, peer, now=100.0, session_present=False)
    assert {p.packet_id for p in only(out, mqtt5.SubscribePacket)} >= {pending_pid}
    assert s.next_deadline() == 110.0
    assert s.overdue_subscribes(109.9) == []
    s.handle_timer(109.9)
    assert s.overdue_subscribes(110.0) == ["c", "a/#", "b"]  # in the order sent
    with pytest.raises(AckTimeout) as info:
        s.handle_timer(110.0)
    assert str(info.value) == "SUBSCRIBE 'c', 'a/#', 'b' (sent at CONNACK): no SUBACK within 10 s"
    assert (info.value.packet, info.value.timeout) == ("SUBSCRIBE", 10)
    # once acknowledged, nothing is due
    resub = [p for p in only(out, mqtt5.SubscribePacket) if p.packet_id != pending_pid]
    send_packets(s, suback(pending_pid), suback(resub[0].packet_id, GRANT1, GRANT1))
    assert s.overdue_subscribes(200.0) == []
    assert s.next_deadline() is None
    # each connection bounds what it sent: a new CONNACK starts the bound again
    s.subscribe([tf("d")])
    reconnect(s, peer, now=300.0, session_present=True)
    assert s.next_deadline() == 310.0
    s.connection_lost()
    assert s.next_deadline() is None
    assert s.overdue_subscribes(1e9) == []
    reconnect(s, peer, now=400.0, session_present=True)
    assert s.next_deadline() == 410.0
    # no bound configured: none kept
    s2, peer2 = connected_pair(keep_alive=0)
    s2.subscribe([tf("a")])
    transfer(s2, peer2)
    reconnect(s2, peer2, session_present=False)
    assert s2.next_deadline() is None
    assert s2.overdue_subscribes(1e9) == []


def test_reconnect_with_session_does_not_resubscribe() -> None:
    s, peer = connected_pair()
    pid, _ = s.subscribe([tf("a")])
    transfer(s, peer)
    send_packets(s, suback(pid))
    _, out = reconnect(s, peer, session_present=True)
    assert out == []


def test_pending_subscribe_and_unsubscribe_resent_on_reconnect() -> None:
    s, peer = connected_pair()
    pid_a, _h_a = s.subscribe([tf("a")])
    pid_b, h_b = s.subscribe([tf("b")])
    transfer(s, peer)
    send_packets(s, suback(pid_b))
    unsub_pid = s.unsubscribe(h_b)
    transfer(s, peer)
    for present in (True, False):
        _, out = reconnect(s, peer, session_present=present)
        assert [(type(p), p.packet_id) for p in out] == [
            (mqtt5.SubscribePacket, pid_a),
            (mqtt5.UnsubscribePacket, unsub_pid),
        ]
    events = send_packets(s, suback(pid_a), mqtt5.UnsubAckPacket(unsub_pid or 0, [UNSUB_OK]))
    assert [type(e) for e in events] == [SubscribeAcked, UnsubscribeAcked]
    assert events[0].packet_id == pid_a


def test_requests_made_while_disconnected_sent_after_connack() -> None:
    s, peer = connected_pair()
    pid, handle = s.subscribe([tf("x")])
    transfer(s, peer)
    send_packets(s, suback(pid))
    s.connection_lost()
    pid2, _ = s.subscribe([tf("y")])
    unsub_pid = s.unsubscribe(handle)
    assert not s.has_data_to_send()
    s.start_connection(1.0)
    transfer(s, peer, 1.0)
    assert transfer(s, peer, 1.0) == []
    send_packets(s, mqtt5.ConnAckPacket(session_present=True), now=1.0)
    out = transfer(s, peer, 1.0)
    assert [(type(p), p.packet_id) for p in out] == [
        (mqtt5.SubscribePacket, pid2),
        (mqtt5.UnsubscribePacket, unsub_pid),
    ]


def test_unsubscribed_filters_are_not_resubscribed() -> None:
    s, peer = connected_pair()
    pid, handle = s.subscribe([tf("x")])
    transfer(s, peer)
    send_packets(s, suback(pid))
    upid = s.unsubscribe(handle)
    transfer(s, peer)
    send_packets(s, mqtt5.UnsubAckPacket(upid or 0, [UNSUB_OK]))
    _, out = reconnect(s, peer, session_present=False)
    assert out == []


def test_lost_resubscription_is_made_again() -> None:
    """The internal resubscription of one reconnect is lost with that connection too."""
    s, peer = connected_pair()
    pid, _ = s.subscribe([tf("keep/me")])
    transfer(s, peer)
    send_packets(s, suback(pid))
    _, out = reconnect(s, peer, session_present=False)
    assert [p.topic_filters[0].pattern for p in only(out, mqtt5.SubscribePacket)] == ["keep/me"]
    # That connection breaks before the SUBACK; the next broker has no session either.
    _, out = reconnect(s, peer, session_present=False)
    subs = only(out, mqtt5.SubscribePacket)
    assert [p.topic_filters[0].pattern for p in subs] == ["keep/me"]
    assert send_packets(s, suback(subs[0].packet_id)) == []
    assert s.statistics()["requests"] == 0


def test_lost_resubscription_with_session_present_is_made_again() -> None:
    # The broker kept the session of the connection whose SUBSCRIBE may never have
    # arrived: subscribing again is the only way to be sure.
    s, peer = connected_pair()
    pid, _ = s.subscribe([tf("keep/me")])
    transfer(s, peer)
    send_packets(s, suback(pid))
    reconnect(s, peer, session_present=False)
    _, out = reconnect(s, peer, session_present=True)
    assert [p.topic_filters[0].pattern for p in only(out, mqtt5.SubscribePacket)] == ["keep/me"]


def test_smaller_window_after_reconnect_keeps_inflight() -> None:
    s, peer = connected_pair(connack={"receive_max": 3})
    for i in range(4):
        s.publish("t", b"%d" % i, qos=1)
    transfer(s, peer)
    _, out = reconnect(s, peer, session_present=True, receive_max=1)
    assert [p.payload for p in out] == [b"0", b"1", b"2"]
    assert (s.inflight_count, s.queued_count) == (3, 1)
    send_packets(s, mqtt5.PubAckPacket(1), mqtt5.PubAckPacket(2))
    assert transfer(s, peer) == []  # 1 still in flight, window of 1
    send_packets(s, mqtt5.PubAckPacket(3))
    assert [p.payload for p in transfer(s, peer)] == [b"3"]


def test_connection_lost_discards_partial_input_and_output() -> None:
    s, _ = connected_pair()
    s.publish("t", b"x")
    assert s.receive_data(mqtt5.PublishPacket("t", b"abc").write()[:4], 0.0) == []
    assert s.statistics()["buffered_in"] == 4
    s.connection_lost()
    assert s.statistics()["buffered_in"] == 0
    assert s.statistics()["buffered_out"] == 0
    assert not s.connected
    assert s.next_deadline() is None


# ---------------------------------------------------------------- incoming PUBLISH


def test_incoming_qos0() -> None:
    s, peer = connected_pair()
    events = send_packets(s, mqtt5.PublishPacket("a/b", b"payload"))
    assert len(events) == 1
    msg = events[0]
    assert isinstance(msg, Message)
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("a/b", b"payload", 0, False)
    assert transfer(s, peer) == []


def test_incoming_qos1_is_acknowledged() -> None:
    s, peer = connected_pair()
    events = send_packets(s, mqtt5.PublishPacket("a", b"1", qos=QoS.AT_LEAST_ONCE, packet_id=42))
    assert [type(e) for e in events] == [Message]
    assert events[0].qos == 1
    (ack,) = transfer(s, peer)
    assert isinstance(ack, mqtt5.PubAckPacket)
    assert ack.packet_id == 42
    assert int(ack.reason_code) == 0


# ----------------------------------------------------- held acknowledgements
def _qos1(pid: int, topic: str = "a", *, dup: bool = False) -> mqtt5.PublishPacket:
    return mqtt5.PublishPacket(
        topic, b"m%d" % pid, qos=QoS.AT_LEAST_ONCE, packet_id=pid, duplicate=dup
    )


def test_held_puback_waits_for_ack() -> None:
    s, peer = connected_pair()
    s.hold_acks = True
    (message,) = send_packets(s, _qos1(42))
    assert isinstance(message, Message)
    assert message.ack_id == (1, 42)
    assert transfer(s, peer) == []  # no PUBACK yet
    assert s.held_acks == 1
    assert s.statistics()["held_acks"] == 1
    assert s.ack((1, 42)) is True
    (ack,) = transfer(s, peer)
    assert isinstance(ack, mqtt5.PubAckPacket)
    assert (ack.packet_id, int(ack.reason_code)) == (42, 0)
    assert s.held_acks == 0
    # idempotent: a second ack sends nothing
    assert s.ack((1, 42)) is False
    assert transfer(s, peer) == []


def test_held_pubacks_go_out_in_ack_order() -> None:
    s, peer = connected_pair()
    s.hold_acks = True
    messages = send_packets(s, _qos1(1), _qos1(2), _qos1(3))
    assert [m.ack_id for m in messages if isinstance(m, Message)] == [(1, 1), (1, 2), (1, 3)]
    assert transfer(s, peer) == []
    assert s.ack((1, 3))
    assert s.ack((1, 1))
    assert [p.packet_id for p in transfer(s, peer)] == [3, 1]  # the application's order
    assert s.ack((1, 2))
    assert [p.packet_id for p in transfer(s, peer)] == [2]


def test_held_ack_of_an_earlier_connection_is_void() -> None:
    s, peer = connected_pair()
    s.hold_acks = True
    (message,) = send_packets(s, _qos1(7))
    assert isinstance(message, Message)
    s.connection_lost()
    assert s.held_acks == 0
    assert s.ack((1, 7)) is False  # not connected
    s.start_connection(1.0)
    transfer(s, peer, 1.0)
    send_packets(s, mqtt5.ConnAckPacket(session_present=True), now=1.0)
    assert s.ack((1, 7)) is False  # the old id means nothing on connection 2
    assert transfer(s, peer, 1.0) == []
    # the broker redelivers it (DUP): a new message, held again, acked on this connection
    (again,) = send_packets(s, _qos1(7, dup=True), now=1.0)
    assert isinstance(again, Message)
    assert again.duplicate
    assert again.ack_id == (2, 7)
    assert s.ack((2, 7)) is True
    assert [p.packet_id for p in only(transfer(s, peer, 1.0), mqtt5.PubAckPacket)] == [7]


def test_hold_acks_only_holds_qos1() -> None:
    s, peer = connected_pair()
    s.hold_acks = True
    (m0,) = send_packets(s, mqtt5.PublishPacket("a", b"0"))
    assert isinstance(m0, Message)
    assert m0.ack_id is None
    m0.ack()  # a no-op for QoS 0
    (m2,) = send_packets(s, mqtt5.PublishPacket("a", b"2", qos=QoS.EXACTLY_ONCE, packet_id=5))
    assert isinstance(m2, Message)
    assert m2.ack_id is None
    assert [type(p) for p in transfer(s, peer)] == [mqtt5.PubRecPacket]


def test_message_ack_calls_its_acker_once() -> None:
    s, _peer = connected_pair()
    s.hold_acks = True
    (message,) = send_packets(s, _qos1(3))
    assert isinstance(message, Message)
    calls: list[Message] = []
    message.wait_for_ack(calls.append)
    assert message.needs_ack
    message.ack()
    message.ack()
    assert calls == [message]
    assert not message.needs_ack


def test_without_hold_acks_puback_is_immediate_and_ack_is_a_no_op() -> None:
    s, peer = connected_pair()
    (message,) = send_packets(s, _qos1(4))
    assert isinstance(message, Message)
    assert message.ack_id is None
    message.ack()
    assert [p.packet_id for p in transfer(s, peer)] == [4]


def test_incoming_qos2_flow() -> None:
    s, peer = connected_pair()
    pub = mqtt5.PublishPacket("a", b"2", qos=QoS.EXACTLY_ONCE, packet_id=9)
    events = send_packets(s, pub)
    assert [type(e) for e in events] == [Message]
    assert events[0].qos == 2
    (rec,) = transfer(s, peer)
    assert isinstance(rec, mqtt5.PubRecPacket)
    assert rec.packet_id == 9
    # The broker did not see our PUBREC and sends it again: not delivered twice.
    dup = mqtt5.PublishPacket("a", b"2", qos=QoS.EXACTLY_ONCE, packet_id=9, duplicate=True)
    assert send_packets(s, dup) == []
    assert [type(p) for p in transfer(s, peer)] == [mqtt5.PubRecPacket]
    assert send_packets(s, mqtt5.PubRelPacket(9)) == []
    (comp,) = transfer(s, peer)
    assert isinstance(comp, mqtt5.PubCompPacket)
    assert comp.packet_id == 9
    # After PUBREL the id is free: a new message with it is a new message.
    assert [type(e) for e in send_packets(s, pub)] == [Message]


def test_qos2_duplicate_after_reconnect_with_session() -> None:
    s, peer = connected_pair(session_expiry_interval=60)
    pub = mqtt5.PublishPacket("a", b"once", qos=QoS.EXACTLY_ONCE, packet_id=5)
    assert len(send_packets(s, pub)) == 1
    transfer(s, peer)  # PUBREC, lost with the connection
    reconnect(s, peer, session_present=True)
    dup = mqtt5.PublishPacket("a", b"once", qos=QoS.EXACTLY_ONCE, packet_id=5, duplicate=True)
    assert send_packets(s, dup) == []
    assert [(type(p), p.packet_id) for p in transfer(s, peer)] == [(mqtt5.PubRecPacket, 5)]
    send_packets(s, mqtt5.PubRelPacket(5))
    assert [type(p) for p in transfer(s, peer)] == [mqtt5.PubCompPacket]


def test_qos2_state_dropped_when_broker_has_no_session() -> None:
    s, peer = connected_pair()
    pub = mqtt5.PublishPacket("a", b"first", qos=QoS.EXACTLY_ONCE, packet_id=5)
    send_packets(s, pub)
    reconnect(s, peer, session_present=False)
    new = mqtt5.PublishPacket("a", b"second", qos=QoS.EXACTLY_ONCE, packet_id=5)
    assert [m.payload for m in send_packets(s, new) if isinstance(m, Message)] == [b"second"]


def test_pubrel_for_unknown_id_completes() -> None:
    s, peer = connected_pair()
    assert send_packets(s, mqtt5.PubRelPacket(77)) == []
    (comp,) = transfer(s, peer)
    assert isinstance(comp, mqtt5.PubCompPacket)
    assert comp.packet_id == 77


def test_message_attributes() -> None:
    s, _ = connected_pair()
    pkt = mqtt5.PublishPacket(
        "sensors/1/temp",
        b"21.5" * 30,
        qos=QoS.AT_LEAST_ONCE,
        packet_id=3,
        retain=True,
        duplicate=True,
        message_expiry_interval=120,
        content_type="text/plain",
        response_topic="replies/1",
        correlation_data=b"corr",
        subscription_ids=[4, 268_435_455],
        user_properties=[("a", "1"), ("a", "2")],
        payload_format_indicator=1,
    )
    (msg,) = send_packets(s, pkt)
    assert isinstance(msg, Message)
    assert msg.topic == "sensors/1/temp"
    assert msg.payload == b"21.5" * 30
    assert msg.qos == 1
    assert msg.retain is True
    assert msg.duplicate is True
    assert msg.message_expiry_interval == 120
    assert msg.content_type == "text/plain"
    assert msg.response_topic == "replies/1"
    assert msg.correlation_data == b"corr"
    assert msg.subscription_ids == [4, 268_435_455]
    assert msg.user_properties == [("a", "1"), ("a", "2")]
    assert msg.packet.payload_format_indicator == 1
    assert msg.packet == pkt
    text = repr(msg)
    assert "sensors/1/temp" in text
    assert text.count("21.5") == 16  # payload shown up to 64 bytes
    assert "..." in text


def test_message_defaults() -> None:
    s, _ = connected_pair()
    (msg,) = send_packets(s, mqtt5.PublishPacket("t", b""))
    assert isinstance(msg, Message)
    assert msg.payload == b""
    assert msg.subscription_ids == []
    assert msg.user_properties == []
    assert msg.message_expiry_interval is None
    assert msg.content_type is None
    assert msg.duplicate is False
    assert "..." not in repr(msg)


def test_incoming_topic_alias_refused() -> None:
    s, peer = connected_pair()
    pkt = mqtt5.PublishPacket("a", b"", qos=QoS.EXACTLY_ONCE, packet_id=1, topic_alias=1)
    with pytest.raises(RemoteProtocolError) as info:
        send_packets(s, pkt)
    assert info.value.reason_code == 0x94
    # Nothing was acknowledged, nor remembered as received.
    assert transfer(s, peer) == []
    assert not s._incoming_qos2


def test_several_packets_in_one_chunk() -> None:
    s, peer = connected_pair()
    pub = s.publish("t", b"x", qos=1)
    transfer(s, peer)
    data = encode(
        mqtt5.PublishPacket("a", b"1"),
        mqtt5.PubAckPacket(1),
        mqtt5.PingRespPacket(),
        mqtt5.PublishPacket("b", b"2", qos=QoS.AT_LEAST_ONCE, packet_id=8),
    )
    events = s.receive_data(data + b"\x30", 0.0)  # and the first byte of the next one
    assert [type(e) for e in events] == [Message, PublishAcked, Message]
    assert events[1].publish is pub
    assert s.statistics()["buffered_in"] == 1
    assert [type(e) for e in s.receive_data(b"\x04\x00\x01c\x00", 0.0)] == [Message]
    assert s.statistics()["buffered_in"] == 0


# ------------------------------------------------------------ SUBSCRIBE/UNSUBSCRIBE


def test_subscribe_and_suback() -> None:
    s, peer = connected_pair()
    filters = [
        tf("a/#"),
        mqtt5.TopicFilter(
            "$share/g/jobs/+",
            max_qos=QoS.AT_MOST_ONCE,
            no_local=True,
            retain_as_published=False,
            retain_handling=mqtt5.RetainHandling.SEND_NEVER,
        ),
        tf("forbidden"),
        tf("denied"),
    ]
    pid, handle = s.subscribe(filters, subscription_id=12)
    assert isinstance(handle, int)
    (sub,) = transfer(s, peer)
    assert isinstance(sub, mqtt5.SubscribePacket)
    assert sub.packet_id == pid
    assert sub.subscription_id == 12
    assert sub.topic_filters == filters
    assert peer.raw[-1][0] == 0x82
    codes = [
        mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE,
        mqtt5.SubAckReasonCode.GRANTED_QOS_AT_MOST_ONCE,
        mqtt5.SubAckReasonCode.UNSPECIFIED_ERROR,
        mqtt5.SubAckReasonCode.NOT_AUTHORIZED,
    ]
    events = send_packets(s, mqtt5.SubAckPacket(pid, codes, reason_str="partly"))
    assert events == [SubscribeAcked(pid, [1, 0, 0x80, 0x87], "partly")]


def test_unsubscribe_and_unsuback() -> None:
    s, peer = connected_pair()
    pid, handle = s.subscribe([tf("a"), tf("b")])
    transfer(s, peer)
    send_packets(s, suback(pid, GRANT1, GRANT1))
    upid = s.unsubscribe(handle)
    (unsub,) = transfer(s, peer)
    assert isinstance(unsub, mqtt5.UnsubscribePacket)
    assert unsub.packet_id == upid
    assert unsub.patterns == ["a", "b"]
    assert peer.raw[-1][0] == 0xA2
    codes = [mqtt5.UnsubAckReasonCode.SUCCESS, mqtt5.UnsubAckReasonCode.NO_SUBSCRIPTION_EXISTED]
    events = send_packets(s, mqtt5.UnsubAckPacket(upid or 0, codes))
    assert events == [UnsubscribeAcked(upid or 0, [0, 0x11], None)]
    with pytest.raises(LocalProtocolError):
        s.unsubscribe(handle)


def test_subscribe_while_disconnected_is_queued() -> None:
    s = Session("c")
    peer = FakeBrokerPeer()
    pid, _ = s.subscribe([tf("a")])
    assert not s.has_data_to_send()
    s.start_connection(0.0)
    transfer(s, peer)
    send_packets(s, mqtt5.ConnAckPacket())
    out = transfer(s, peer)
    assert [(type(p), p.packet_id) for p in out] == [(mqtt5.SubscribePacket, pid)]
    assert [type(e) for e in send_packets(s, suback(pid))] == [SubscribeAcked]


@pytest.mark.parametrize(
    "ack",
    [
        mqtt5.SubAckPacket(99, [mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE]),
        mqtt5.UnsubAckPacket(99, [mqtt5.UnsubAckReasonCode.SUCCESS]),
    ],
    ids=["suback", "unsuback"],
)
def test_ack_for_unknown_id(ack: Any) -> None:
    s, _ = connected_pair()
    with pytest.raises(RemoteProtocolError, match="unknown packet id"):
        send_packets(s, ack)


def test_ack_of_the_wrong_kind() -> None:
    s, peer = connected_pair()
    pid, _ = s.subscribe([tf("a")])
    transfer(s, peer)
    with pytest.raises(RemoteProtocolError):
        send_packets(s, mqtt5.UnsubAckPacket(pid, [mqtt5.UnsubAckReasonCode.SUCCESS]))


@pytest.mark.parametrize(
    "pattern",
    [
        "a/#/b",
        "a+",
        "a#",
        "+a/b",
        "a/b#",
        "$share/g",
        "$share/g/",
        "$share//a",
        "$share/g+/a",
        "$share/g#/a",
        "",
        "a\x00b",
    ],
)
def test_invalid_filters(pattern: str) -> None:
    s, _ = connected_pair()
    # The codec's TopicFilter refuses some of these itself; an object with just a
    # ``pattern`` shows the session's own check refuses all of them.
    with pytest.raises(LocalProtocolError):
        s.subscribe([SimpleNamespace(pattern=pattern)])  # type: ignore[list-item]
    assert not s.has_data_to_send()
    assert s.statistics()["subscriptions"] == 0


@pytest.mark.parametrize(
    "pattern",
    ["#", "+", "a/+/b", "a/#", "+/+", "/", "a//b", "$share/g/a/#", "$SYS/#", "$share/g/+"],
)
def test_valid_filters(pattern: str) -> None:
    s, peer = connected_pair()
    s.subscribe([tf(pattern)])
    (sub,) = transfer(s, peer)
    assert sub.topic_filters[0].pattern == pattern


def test_subscribe_misuse() -> None:
    s, _ = connected_pair()
    with pytest.raises(LocalProtocolError):
        s.subscribe([])
    for sid in (0, 268_435_456):
        with pytest.raises(LocalProtocolError):
            s.subscribe([tf("a")], subscription_id=sid)
    with pytest.raises(LocalProtocolError):
        s.unsubscribe(12345)


def test_broker_capabilities_limit_subscribe() -> None:
    s, peer = connected_pair(
        connack={"shared_subscription_available": False, "subscription_id_available": False}
    )
    with pytest.raises(LocalProtocolError, match="shared"):
        s.subscribe([tf("$share/g/a")])
    s.subscribe([tf("a")], subscription_id=3)
    (sub,) = transfer(s, peer)
    assert sub.subscription_id is None  # the broker cannot take one


# ----------------------------------------------------------------------- keep-alive


def test_keep_alive_ping_and_timeout() -> None:
    s = Session("c", keep_alive=10)
    peer = FakeBrokerPeer()
    assert s.next_deadline() is None
    s.start_connection(0.0)
    assert s.next_deadline() == 15.0  # waiting for CONNACK: 1.5 keep-alives
    transfer(s, peer, 0.0)
    send_packets(s, mqtt5.ConnAckPacket(), now=0.0)
    assert s.next_deadline() == 10.0
    s.handle_timer(9.99)
    assert not s.has_data_to_send()
    s.handle_timer(10.0)
    assert s.data_to_send(10.0) == b"\xc0\x00"
    assert isinstance(peer.receive_data(b"\xc0\x00")[0], mqtt5.PingReqPacket)
    assert s.next_deadline() == 15.0
    s.handle_timer(12.0)
    s.handle_timer(14.99)
    assert not s.has_data_to_send()  # no second ping while one is outstanding
    with pytest.raises(KeepAliveTimeout):
        s.handle_timer(15.0)


def test_pingresp_clears_outstanding_ping() -> None:
    s, _ = connected_pair(keep_alive=10)
    s.handle_timer(10.0)
    assert s.data_to_send(10.0) == b"\xc0\x00"
    assert send_packets(s, mqtt5.PingRespPacket(), now=11.0) == []
    assert s.next_deadline() == 20.0  # min(last sent 10, last received 11) + 10
    s.handle_timer(19.0)
    assert not s.has_data_to_send()
    s.handle_timer(20.0)
    assert s.data_to_send(20.0) == b"\xc0\x00"
    assert s.next_deadline() == 11.0 + 15.0


def test_any_received_data_clears_outstanding_ping() -> None:
    s, _ = connected_pair(keep_alive=10)
    s.handle_timer(10.0)
    s.data_to_send(10.0)
    # Even a partial packet is a sign of life.
    assert s.receive_data(b"\x30", 14.0) == []
    s.handle_timer(16.0)  # more than 15 s after the CONNACK, but 2 s after the last byte
    assert s.next_deadline() == 20.0
    s.handle_timer(20.0)
    assert s.data_to_send(20.0) == b"\xc0\x00"
    s.handle_timer(28.99)
    with pytest.raises(KeepAliveTimeout):
        s.handle_timer(29.0)


def test_timeout_measured_from_last_received_byte() -> None:
    s, _ = connected_pair(keep_alive=10)
    send_packets(s, mqtt5.PublishPacket("t", b""), now=4.0)
    assert s.next_deadline() == 10.0  # nothing sent since 0
    s.handle_timer(10.0)
    s.data_to_send(10.0)
    assert s.next_deadline() == 19.0
    s.handle_timer(18.999)
    with pytest.raises(KeepAliveTimeout, match="no data"):
        s.handle_timer(19.0)


def test_ping_when_nothing_received_even_if_sending() -> None:
    s, _ = connected_pair(keep_alive=10)
    for t in range(1, 10):
        s.publish("t", b"x")
        s.data_to_send(float(t))
    assert s.next_deadline() == 10.0  # nothing received since 0
    s.handle_timer(10.0)
    assert s.data_to_send(10.0) == b"\xc0\x00"


def test_ping_when_nothing_sent_even_if_receiving() -> None:
    s, _ = connected_pair(keep_alive=10)
    for t in range(1, 10):
        send_packets(s, mqtt5.PublishPacket("t", b""), now=float(t))
    assert s.next_deadline() == 10.0  # nothing sent since 0
    s.handle_timer(10.0)
    assert s.data_to_send(10.0) == b"\xc0\x00"


def test_connack_timeout() -> None:
    s = Session("c", keep_alive=10)
    s.start_connection(100.0)
    s.data_to_send(100.0)
    s.handle_timer(114.9)
    assert not s.has_data_to_send()  # no PINGREQ before CONNACK
    with pytest.raises(KeepAliveTimeout):
        s.handle_timer(115.0)


def test_server_keep_alive_overrides() -> None:
    s, _ = connected_pair(keep_alive=60, connack={"server_keep_alive": 5})
    assert s.effective_keep_alive == 5
    assert s.next_deadline() == 5.0
    s.handle_timer(5.0)
    assert s.data_to_send(5.0) == b"\xc0\x00"
    assert s.next_deadline() == 7.5
    with pytest.raises(KeepAliveTimeout):
        s.handle_timer(7.5)


def test_server_keep_alive_zero_disables() -> None:
    s, _ = connected_pair(keep_alive=60, connack={"server_keep_alive": 0})
    assert s.next_deadline() is None
    s.handle_timer(1e9)
    assert not s.has_data_to_send()


def test_server_keep_alive_does_not_outlive_its_connection() -> None:
    s, peer = connected_pair(keep_alive=10, connack={"server_keep_alive": 3})
    assert s.effective_keep_alive == 3
    s.connection_lost()
    s.start_connection(100.0)
    (connect,) = transfer(s, peer, 100.0)
    assert connect.keep_alive == 10
    assert s.next_deadline() == 115.0
    send_packets(s, mqtt5.ConnAckPacket(), now=100.0)  # this broker accepts our value
    assert s.effective_keep_alive == 10
    assert s.next_deadline() == 110.0


def test_keep_alive_zero() -> None:
    s, _ = connected_pair(keep_alive=0)
    assert s.next_deadline() is None
    s.handle_timer(1e9)
    assert not s.has_data_to_send()


# ---------------------------------------------------------------------- DISCONNECT


def test_broker_disconnect() -> None:
    s, _ = connected_pair(keep_alive=10)
    pkt = mqtt5.DisconnectPacket(
        reason_code=mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER,
        reason_str="someone else",
        server_reference="other:1883",
    )
    events = send_packets(s, pkt)
    assert events == [Disconnected(0x8E, "someone else", "other:1883")]
    assert s.state is SessionState.DISCONNECTED
    assert s.next_deadline() is None
    s.handle_timer(1e9)


def test_broker_disconnect_normal() -> None:
    s, _ = connected_pair()
    assert send_packets(s, mqtt5.DisconnectPacket()) == [Disconnected(0, None, None)]


def test_client_disconnect_bytes() -> None:
    s, _ = connected_pair()
    s.disconnect()
    assert s.data_to_send(0.0) == b"\xe0\x00"
    assert s.state is SessionState.CLOSING
    with pytest.raises(LocalProtocolError):
        s.publish("t", b"x")
    with pytest.raises(LocalProtocolError):
        s.start_connection(0.0)


def test_client_disconnect_with_reason() -> None:
    s, _ = connected_pair()
    s.disconnect(4, session_expiry_interval=0, reason_string="bye")
    assert (
        s.data_to_send(0.0)
        == mqtt5.DisconnectPacket(
            reason_code=mqtt5.DisconnectReasonCode.DISCONNECT_WITH_WILL_MESSAGE,
            session_expiry_interval=0,
            reason_str="bye",
        ).write()
    )


def test_client_disconnect_when_not_connected_sends_nothing() -> None:
    s = Session("c")
    s.disconnect()
    assert s.state is SessionState.CLOSING
    assert not s.has_data_to_send()
    s.connection_lost()
    s.start_connection(0.0)  # a closed session may be reused after connection_lost
    assert s.has_data_to_send()


# ------------------------------------------------------------------ packet sizes


def test_packet_too_large_refused_from_header() -> None:
    s, _ = connected_pair(max_packet_size=1024)
    header = bytes([0x30, 0xFF, 0xFF, 0xFF, 0x7F])  # announces 268435455 bytes
    assert s.receive_data(header[:4], 0.0) == []
    assert s.statistics()["buffered_in"] == 4  # only the header is ever held
    with pytest.raises(PacketTooLarge) as info:
        s.receive_data(header[4:], 0.0)
    assert isinstance(info.value, RemoteProtocolError)
    assert info.value.reason_code == 0x95


def test_packet_too_large_refused_in_one_chunk() -> None:
    s, _ = connected_pair()
    with pytest.raises(PacketTooLarge):
        s.receive_data(bytes([0x30, 0xFF, 0xFF, 0xFF, 0x7F]), 0.0)


def test_incoming_packet_size_limit_is_inclusive() -> None:
    s, _ = connected_pair(max_packet_size=256)
    empty = len(mqtt5.PublishPacket("t", b"").write())
    fits = mqtt5.PublishPacket("t", b"x" * (256 - empty - 1)).write()  # 2-byte length
    assert len(fits) == 256
    assert len(s.receive_data(fits, 0.0)) == 1
    too_big = mqtt5.PublishPacket("t", b"x" * (256 - empty)).write()
    assert len(too_big) == 257
    with pytest.raises(PacketTooLarge):
        s.receive_data(too_big[:3], 0.0)


# ----------------------------------------------------------------- local misuse


@pytest.mark.parametrize("qos", [2, 3, -1])
def test_publish_unsupported_qos(qos: int) -> None:
    s, _ = connected_pair()
    with pytest.raises(LocalProtocolError):
        s.publish("t", b"x", qos=qos)


@pytest.mark.parametrize("topic", ["", "a/+", "+", "#", "a/#", "a+b", "a\x00b"])
def test_publish_invalid_topic(topic: str) -> None:
    s, _ = connected_pair()
    with pytest.raises(LocalProtocolError):
        s.publish(topic, b"x")
    assert not s.has_data_to_send()


def test_publish_beyond_broker_capabilities() -> None:
    s, _ = connected_pair(connack={"max_qos": QoS.AT_MOST_ONCE, "retain_available": False})
    with pytest.raises(LocalProtocolError):
        s.publish("t", b"x", qos=1)
    with pytest.raises(LocalProtocolError):
        s.publish("t", b"x", retain=True)
    assert s.publish("t", b"x") is None


def test_publish_unencodable_properties() -> None:
    s, _ = connected_pair()
    with pytest.raises(LocalProtocolError):
        s.publish("t", b"x", message_expiry_interval=-1)


# ------------------------------------------------------------ remote violations


@pytest.mark.parametrize(
    "packet",
    [
        mqtt5.ConnectPacket("evil"),
        mqtt5.SubscribePacket(1, [mqtt5.TopicFilter("a")]),
        mqtt5.UnsubscribePacket(1, ["a"]),
        mqtt5.PingReqPacket(),
        mqtt5.PubRecPacket(1),
        mqtt5.PubCompPacket(1),
        mqtt5.AuthPacket(),
    ],
    ids=lambda p: type(p).__name__,
)
def test_packets_a_broker_must_not_send(packet: Any) -> None:
    s, _ = connected_pair()
    with pytest.raises(RemoteProtocolError, match="must not send"):
        send_packets(s, packet)


def test_publish_before_connack() -> None:
    s = Session("c")
    s.start_connection(0.0)
    s.data_to_send(0.0)
    with pytest.raises(RemoteProtocolError, match="before CONNACK"):
        send_packets(s, mqtt5.PublishPacket("t", b"x"))


def test_publish_after_broker_disconnect_in_same_chunk() -> None:
    s, _ = connected_pair()
    with pytest.raises(RemoteProtocolError):
        send_packets(s, mqtt5.DisconnectPacket(), mqtt5.PublishPacket("t", b"x"))


@CODEC_PANICS
@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00",  # reserved packet type 0
        bytes.fromhex("30 ff ff ff ff 01"),  # remaining length longer than 4 bytes
        bytes.fromhex("30 01 00"),  # PUBLISH too short for its topic length
        bytes.fromhex("40 01 00"),  # PUBACK too short for its packet id
        bytes.fromhex("d0 02 00 00"),  # PINGRESP with a body
        bytes.fromhex("30 05 00 02 61 62 63"),  # PUBLISH missing its properties length
        PANIC_INPUT,  # mqtt5 0.8 panics on this one
    ],
    ids=[
        "type0",
        "remaining-length",
        "short-publish",
        "short-puback",
        "pingresp-body",
        "no-properties",
        "codec-panic",
    ],
)
def test_malformed_bytes(data: bytes) -> None:
    s, _ = connected_pair()
    with pytest.raises(RemoteProtocolError) as info:
        s.receive_data(data, 0.0)
    assert info.value.reason_code in (0x81, 0x82)


@CODEC_PANICS
@pytest.mark.parametrize("cuts", [(1,), (2,), (1, 3, 5), (6,), (1, 2, 3, 4, 5, 6)])
def test_codec_panic_input_split(cuts: tuple[int, ...]) -> None:
    s, _ = connected_pair()
    bounds = [0, *cuts, len(PANIC_INPUT)]
    chunks = [PANIC_INPUT[a:b] for a, b in itertools.pairwise(bounds)]
    for chunk in chunks[:-1]:
        assert s.receive_data(chunk, 0.0) == []
    with pytest.raises(RemoteProtocolError, match="malformed"):
        s.receive_data(chunks[-1], 0.0)


# --------------------------------------------- round trips and byte-at-a-time feeding


def _busy_session(max_packet_size: int = 1024 * 1024) -> Session:
    """Connected, with publishes 1 and 2 in flight, SUBSCRIBE 3 and UNSUBSCRIBE 5 pending."""
    s, peer = connected_pair(max_packet_size=max_packet_size)
    s.publish("out", b"1", qos=1)
    s.publish("out", b"2", qos=1)
    pid, _ = s.subscribe([tf("in/#")])
    assert pid == 3
    _, handle = s.subscribe([tf("gone")])
    assert s.unsubscribe(handle) == 5
    transfer(s, peer)
    return s


def _connecting_session() -> Session:
    s = Session("c")
    s.start_connection(0.0)
    s.data_to_send(0.0)
    return s


INCOMING: list[tuple[str, Any, Any, Any]] = [
    # (id, session factory, packet, expected event type or exception type)
    ("connack", _connecting_session, mqtt5.ConnAckPacket(receive_max=10), Connected),
    (
        "connack-present",
        _connecting_session,
        mqtt5.ConnAckPacket(session_present=True, server_keep_alive=5, reason_str="hi"),
        Connected,
    ),
    (
        "connack-refused",
        _connecting_session,
        mqtt5.ConnAckPacket(reason_code=R.NOT_AUTHORIZED),
        ConnectError,
    ),
    ("connack-unexpected", _busy_session, mqtt5.ConnAckPacket(), RemoteProtocolError),
    ("publish-qos0", _busy_session, mqtt5.PublishPacket("in/a", b"zero"), Message),
    (
        "publish-qos1",
        _busy_session,
        mqtt5.PublishPacket(
            "in/b",
            b"one" * 100,
            qos=QoS.AT_LEAST_ONCE,
            packet_id=300,
            user_properties=[("k", "v")],
            subscription_ids=[1],
        ),
        Message,
    ),
    (
        "publish-qos2",
        _busy_session,
        mqtt5.PublishPacket("in/c", b"two", qos=QoS.EXACTLY_ONCE, packet_id=301, retain=True),
        Message,
    ),
    ("publish-early", _connecting_session, mqtt5.PublishPacket("a", b""), RemoteProtocolError),
    ("puback", _busy_session, mqtt5.PubAckPacket(1), PublishAcked),
    (
        "puback-failure",
        _busy_session,
        mqtt5.PubAckPacket(2, reason_code=mqtt5.PubAckReasonCode.NOT_AUTHORIZED, reason_str="x"),
        PublishAcked,
    ),
    ("puback-unknown", _busy_session, mqtt5.PubAckPacket(1000), None),
    ("pubrel", _busy_session, mqtt5.PubRelPacket(301), None),
    (
        "suback",
        _busy_session,
        mqtt5.SubAckPacket(3, [mqtt5.SubAckReasonCode.NOT_AUTHORIZED]),
        SubscribeAcked,
    ),
    (
        "suback-unknown",
        _busy_session,
        mqtt5.SubAckPacket(6, [mqtt5.SubAckReasonCode.UNSPECIFIED_ERROR]),
        RemoteProtocolError,
    ),
    (
        "unsuback",
        _busy_session,
        mqtt5.UnsubAckPacket(5, [mqtt5.UnsubAckReasonCode.SUCCESS]),
        UnsubscribeAcked,
    ),
    (
        "unsuback-unknown",
        _busy_session,
        mqtt5.UnsubAckPacket(3, [mqtt5.UnsubAckReasonCode.SUCCESS]),
        RemoteProtocolError,
    ),
    ("pingresp", _busy_session, mqtt5.PingRespPacket(), None),
    (
        "disconnect",
        _busy_session,
        mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode.SERVER_SHUTTING_DOWN),
        Disconnected,
    ),
    ("connect", _busy_session, mqtt5.ConnectPacket("x"), RemoteProtocolError),
    (
        "subscribe",
        _busy_session,
        mqtt5.SubscribePacket(9, [mqtt5.TopicFilter("a")]),
        RemoteProtocolError,
    ),
    ("unsubscribe", _busy_session, mqtt5.UnsubscribePacket(9, ["a"]), RemoteProtocolError),
    ("pingreq", _busy_session, mqtt5.PingReqPacket(), RemoteProtocolError),
    ("pubrec", _busy_session, mqtt5.PubRecPacket(1), RemoteProtocolError),
    ("pubcomp", _busy_session, mqtt5.PubCompPacket(1), RemoteProtocolError),
    ("auth", _busy_session, mqtt5.AuthPacket(), RemoteProtocolError),
]


@pytest.mark.parametrize(
    ("make", "packet", "expected"), [c[1:] for c in INCOMING], ids=[c[0] for c in INCOMING]
)
def test_round_trip(make: Any, packet: Any, expected: Any) -> None:
    data = packet.write()
    decoded, used = mqtt5.read(memoryview(data))
    assert used == len(data)
    assert decoded == packet
    s = make()
    if isinstance(expected, type) and issubclass(expected, Exception):
        with pytest.raises(expected):
            s.receive_data(data, 0.0)
        return
    events = s.receive_data(data, 0.0)
    assert [type(e) for e in events] == ([] if expected is None else [expected])
    if expected is Message:
        assert events[0].packet == packet
    if expected is Connected:
        assert events[0].connack == packet


VALID = [c for c in INCOMING if not (isinstance(c[3], type) and issubclass(c[3], Exception))]


@pytest.mark.parametrize(("make", "packet"), [c[1:3] for c in VALID], ids=[c[0] for c in VALID])
def test_byte_at_a_time(make: Any, packet: Any) -> None:
    data = packet.write()
    whole, split = make(), make()
    expected = whole.receive_data(data, 0.0)
    got = receive_bytewise(split, data)
    assert [normalize(e) for e in got] == [normalize(e) for e in expected]
    assert split.data_to_send(0.0) == whole.data_to_send(0.0)
    assert split.statistics() == whole.statistics()


def _stream() -> bytes:
    """Every packet a busy session accepts, back to back."""
    return encode(*(c[2] for c in VALID if c[1] is _busy_session and c[0] != "disconnect"))


def test_byte_at_a_time_whole_stream() -> None:
    data = _stream() + mqtt5.DisconnectPacket().write()
    whole, split = _busy_session(), _busy_session()
    expected = whole.receive_data(data, 0.0)
    got = receive_bytewise(split, data)
    assert len(expected) == 8
    assert [normalize(e) for e in got] == [normalize(e) for e in expected]
    assert split.data_to_send(0.0) == whole.data_to_send(0.0)


# ---------------------------------------------------------------------- fuzzing

FUZZ = settings(
    max_examples=600,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

_EVENT_TYPES = (Message, Connected, PublishAcked, SubscribeAcked, UnsubscribeAcked, Disconnected)


def _feed_chunks(s: Session, chunks: list[bytes]) -> None:
    """Feed chunks until the end or a RemoteProtocolError; anything else fails the test."""
    limit = s.max_packet_size
    for i, chunk in enumerate(chunks):
        try:
            events = s.receive_data(chunk, float(i))
        except RemoteProtocolError:
            return
        assert all(isinstance(e, _EVENT_TYPES) for e in events)
        assert len(s._in) < limit
        assert s.statistics()["buffered_in"] == len(s._in)
        s.data_to_send(float(i))


@CODEC_PANICS
@pytest.mark.parametrize("max_packet_size", [1024 * 1024, 256])
@FUZZ
@given(chunks=st.lists(st.binary(max_size=600), max_size=8))
def test_fuzz_arbitrary_bytes(max_packet_size: int, chunks: list[bytes]) -> None:
    _feed_chunks(_busy_session(max_packet_size), chunks)


@CODEC_PANICS
@pytest.mark.parametrize("max_packet_size", [1024 * 1024, 256])
@FUZZ
@given(data=st.binary(min_size=1, max_size=16).map(lambda b: bytes([0x30 | (b[0] & 0x0F)]) + b))
def test_fuzz_publish_headers(max_packet_size: int, data: bytes) -> None:
    _feed_chunks(_busy_session(max_packet_size), [data[:3], data[3:]])


_PACKETS = [c[2].write() for c in INCOMING if c[1] is _busy_session] + [
    PANIC_INPUT,
    mqtt5.PublishPacket("in/x", b"y" * 300, qos=QoS.AT_LEAST_ONCE, packet_id=7).write(),
]


@st.composite
def mutated_streams(draw: st.DrawFn) -> list[bytes]:
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(_PACKETS), min_size=1, max_size=6))))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=5))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 5))]
        else:
            del data[at:]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=5)))
    bounds = [0, *cuts, len(data)]
    return [bytes(data[a:b]) for a, b in itertools.pairwise(bounds)]


@CODEC_PANICS
@pytest.mark.parametrize("max_packet_size", [1024 * 1024, 256])
@FUZZ
@given(chunks=mutated_streams())
def test_fuzz_mutated_streams(max_packet_size: int, chunks: list[bytes]) -> None:
    _feed_chunks(_busy_session(max_packet_size), chunks)


_GOOD = [c[2].write() for c in VALID if c[1] is _busy_session and c[0] != "disconnect"]


@FUZZ
@given(
    packets=st.lists(st.sampled_from(_GOOD), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 4000), max_size=8),
)
def test_fuzz_chunking_does_not_matter(packets: list[bytes], cuts: list[int]) -> None:
    data = b"".join(packets)
    whole, split = _busy_session(), _busy_session()
    try:
        expected = [normalize(e) for e in whole.receive_data(data, 0.0)]
    except RemoteProtocolError:  # e.g. the same SUBACK twice
        expected = None
    bounds = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
    got: list[Any] = []
    try:
        for a, b in itertools.pairwise(bounds):
            got += [normalize(e) for e in split.receive_data(data[a:b], 0.0)]
    except RemoteProtocolError:
        assert expected is None
    else:
        assert got == expected
        assert split.data_to_send(0.0) == whole.data_to_send(0.0)


# ------------------------------------------------------------------ topic_matches


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
        ("#", "a", True),
        ("#", "a/b/c", True),
        ("#", "/", True),
        ("a/#", "a", True),  # '#' also matches the parent level
        ("a/#", "a/b", True),
        ("a/#", "a/b/c", True),
        ("a/#", "b/a", False),
        ("+", "a", True),
        ("+", "a/b", False),
        ("+", "", True),
        ("+/+", "/", True),
        ("+/b", "a/b", True),
        ("+/b", "a/c", False),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a//c", True),
        ("a/+/c", "a/b/d", False),
        ("a/+", "a", False),
        ("a/+/#", "a/b", True),
        ("#", "$SYS/broker/uptime", False),
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("+/#", "$SYS/x", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("$SYS/+/uptime", "$SYS/broker/uptime", True),
        ("$share/group/a/+", "a/b", True),
        ("$share/group/a/+", "a/b/c", False),
        ("$share/group/#", "x/y", True),
        ("$share/group/#", "$SYS/x", False),
        ("$share/g/$SYS/#", "$SYS/x", True),
        ("a/b", "A/b", False),
    ],
)
def test_topic_matches(pattern: str, topic: str, matches: bool) -> None:
    assert topic_matches(pattern, topic) is matches
