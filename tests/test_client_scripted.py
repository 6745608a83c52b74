"""The native client over an in-memory byte stream, against a scripted broker.

Every reply of the broker is written by the test (``sheri_trio.testing.ScriptedBroker``),
and time is trio's autojump clock, so timeouts, keep-alive and backoff are asserted to
the exact instant.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import mqtt5
import pytest
import trio
import trio.testing

from sheri_trio.mqtt import (
    AckTimeout,
    ClientClosed,
    ConnectError,
    LocalProtocolError,
    MQTTClient,
    open_client,
)
from sheri_trio.testing import BrokerConnection, ScriptedBroker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

URL = "mqtt://scripted-broker.invalid:1883"


@asynccontextmanager
async def connected(
    broker: ScriptedBroker, **options: Any
) -> AsyncIterator[tuple[MQTTClient, BrokerConnection]]:
    """A native client over ``broker``, its first connection accepted (CONNACK sent, with
    the fields of the ``connack`` option)."""
    first: list[BrokerConnection] = []
    connack = options.pop("connack", {})

    async def accept_first() -> None:
        conn = await broker.accept()
        await conn.handshake(**connack)
        first.append(conn)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_first)
        await trio.lowlevel.checkpoint()
        async with open_client(
            broker.url, stream_factory=broker.stream_factory, **options
        ) as client:
            assert isinstance(client, MQTTClient)
            yield client, first[0]


async def _reconnected(broker: ScriptedBroker, **connack: Any) -> BrokerConnection:
    conn = await broker.accept()
    await conn.handshake(**connack)
    return conn


def suback(subscribe: mqtt5.SubscribePacket, code: int = 1) -> mqtt5.SubAckPacket:
    codes = [mqtt5.SubAckReasonCode(code)] * len(subscribe.topic_filters)
    return mqtt5.SubAckPacket(subscribe.packet_id, codes)


# ---------------------------------------------------------------- ack_timeout
async def test_subscribe_without_suback_times_out_and_reconnects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = ScriptedBroker()
    async with connected(broker, ack_timeout=10) as (client, conn):
        start = trio.current_time()
        with pytest.raises(AckTimeout) as info:
            async with client.subscribe("t/a", "t/b/#"):
                pytest.fail("subscribed without a SUBACK")
        assert trio.current_time() - start == 10
        assert str(info.value) == (f"SUBSCRIBE 't/a', 't/b/#': no SUBACK from {URL} within 10 s")
        assert (info.value.packet, info.value.timeout) == ("SUBSCRIBE", 10)
        # the broker is treated as misbehaving: the connection is dropped...
        assert not client.connected
        (subscribe,) = await conn.wait_closed()
        assert isinstance(subscribe, mqtt5.SubscribePacket)
        assert trio.current_time() - start == 10
        # ... and made again, with the usual backoff (first delay in [0.05, 0.1])
        conn2 = await _reconnected(broker, session_present=True)
        assert 10.05 <= trio.current_time() - start <= 10.1
        await client.wait_connected()
        # the pending SUBSCRIBE goes again (same id), then the UNSUBSCRIBE of the caller
        again = await conn2.expect(mqtt5.SubscribePacket)
        assert again.packet_id == subscribe.packet_id
        unsubscribe = await conn2.expect(mqtt5.UnsubscribePacket)
        assert unsubscribe.patterns == ["t/a", "t/b/#"]
        assert client.statistics()["connections"] == 2
        assert "no SUBACK" in (client.statistics()["last_error"] or "")


async def test_unsubscribe_without_unsuback_times_out_and_reconnects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = ScriptedBroker()
    async with connected(broker, ack_timeout=2) as (client, conn):

        async def grant() -> None:
            subscribe = await conn.expect(mqtt5.SubscribePacket)
            await conn.send(suback(subscribe))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(grant)
            with pytest.raises(AckTimeout) as info:
                async with client.subscribe("t/u"):
                    start = trio.current_time()
        assert trio.current_time() - start == 2
        assert str(info.value) == f"UNSUBSCRIBE 't/u': no UNSUBACK from {URL} within 2 s"
        assert info.value.packet == "UNSUBSCRIBE"
        (unsubscribe,) = await conn.wait_closed()
        assert isinstance(unsubscribe, mqtt5.UnsubscribePacket)
        conn2 = await _reconnected(broker, session_present=True)
        again = await conn2.expect(mqtt5.UnsubscribePacket)
        assert again.packet_id == unsubscribe.packet_id
        assert len(broker.connections) == 2


async def test_waited_publish_without_puback_times_out_and_reconnects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = ScriptedBroker()
    async with connected(broker, ack_timeout=10) as (client, conn):
        start = trio.current_time()
        with pytest.raises(AckTimeout) as info:
            await client.publish("t/p", b"x", qos=1)
        assert trio.current_time() - start == 10
        assert str(info.value) == f"PUBLISH to 't/p': no PUBACK from {URL} within 10 s"
        assert info.value.packet == "PUBLISH"
        (publish,) = await conn.wait_closed()
        assert isinstance(publish, mqtt5.PublishPacket)
        assert not publish.duplicate
        # the message is not forgotten: resent, DUP, on the next connection
        conn2 = await _reconnected(broker, session_present=True)
        resent = await conn2.expect(mqtt5.PublishPacket)
        assert (resent.topic, resent.payload, resent.duplicate) == ("t/p", b"x", True)
        assert resent.packet_id == publish.packet_id
        await conn2.send(mqtt5.PubAckPacket(resent.packet_id))


async def test_callers_own_shorter_scope_still_wins(autojump_clock: trio.testing.MockClock) -> None:
    broker = ScriptedBroker()
    async with connected(broker, ack_timeout=10) as (client, _conn):
        start = trio.current_time()
        with trio.move_on_after(3) as scope:
            await client.publish("t/p", b"x", qos=1)
        assert scope.cancelled_caught
        assert trio.current_time() - start == 3
        assert client.connected  # a caller giving up is not the broker's fault
        assert client.statistics()["connections"] == 1


async def test_no_ack_timeout_waits_unbounded(autojump_clock: trio.testing.MockClock) -> None:
    broker = ScriptedBroker()
    async with connected(broker, ack_timeout=None, keep_alive=0) as (client, _conn):
        with trio.move_on_after(3600) as scope:
            await client.publish("t/p", b"x", qos=1)
        assert scope.cancelled_caught
        assert client.connected


async def test_acknowledged_in_time_is_no_timeout(autojump_clock: trio.testing.MockClock) -> None:
    broker = ScriptedBroker()
    async with connected(broker, ack_timeout=10) as (client, conn):

        async def answer() -> None:
            publish = await conn.expect(mqtt5.PublishPacket)
            await trio.sleep(9.5)
            await conn.send(mqtt5.PubAckPacket(publish.packet_id))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            await client.publish("t/p", b"x", qos=1)
        assert trio.current_time() == 9.5
        assert client.connected


async def test_resubscription_without_suback_drops_the_connection(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker that keeps no session and never acknowledges the resubscription (aedes
    2.0.0-beta.1 on a resumed session) would leave the client connected but deaf."""
    broker = ScriptedBroker()
    options = {"ack_timeout": 10, "keep_alive": 0, "reconnect_initial_delay": 1}
    async with (
        connected(broker, **options) as (client, conn),
        granted(client, conn, "t/a", "t/b/#"),
    ):
        await conn.close()
        conn2 = await _reconnected(broker, session_present=False)
        connack_at = trio.current_time()
        resubscribe = await conn2.expect(mqtt5.SubscribePacket)
        assert [f.pattern for f in resubscribe.topic_filters] == ["t/a", "t/b/#"]
        # no SUBACK: at exactly ack_timeout after the CONNACK the connection is dropped
        assert await conn2.wait_closed() == []
        assert trio.current_time() - connack_at == 10
        expected = f"SUBSCRIBE 't/a', 't/b/#' (sent at reconnect): no SUBACK from {URL} within 10 s"
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1
        assert errors[0].getMessage().startswith(expected)
        assert f"now {trio.current_time():.3f}" in errors[0].getMessage()
        # ... and made again with backoff (first delay in [0.5, 1]), resubscribing again
        conn3 = await _reconnected(broker, session_present=False)
        assert 10.5 <= trio.current_time() - connack_at <= 11
        assert client.statistics()["last_error"] == expected
        again = await conn3.expect(mqtt5.SubscribePacket)
        assert again.subscription_id == resubscribe.subscription_id
        await conn3.send(suback(again))
        # acknowledged this time: the connection stays up
        assert await nothing_within(conn3, 60)
        assert client.connected
        assert len(broker.connections) == 3


async def test_pending_subscribe_sent_again_at_reconnect_is_bounded(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscribe() still waiting when the connection broke: its SUBSCRIBE goes again at
    CONNACK, and that one is bounded from the CONNACK on (its caller's bound began on the
    earlier connection, which does not count against the new one)."""
    broker = ScriptedBroker()
    options = {"ack_timeout": 10, "keep_alive": 0, "reconnect_initial_delay": 1}
    async with connected(broker, **options) as (client, conn):

        async def subscriber() -> None:
            with pytest.raises(AckTimeout):
                async with client.subscribe("t/p"):
                    pytest.fail("subscribed without a SUBACK")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(subscriber)
            first = await conn.expect(mqtt5.SubscribePacket)
            await trio.sleep(4)
            await conn.close()
            conn2 = await _reconnected(broker, session_present=True)
            connack_at = trio.current_time()
            again = await conn2.expect(mqtt5.SubscribePacket)
            assert again.packet_id == first.packet_id
        # the caller gave up at 10 s after its call; its UNSUBSCRIBE went out
        await conn2.expect(mqtt5.UnsubscribePacket)
        # the resent SUBSCRIBE stays unanswered: dropped 10 s after the CONNACK
        assert await conn2.wait_closed() == []
        assert trio.current_time() - connack_at == 10
        (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert error.startswith(f"SUBSCRIBE 't/p' (sent at reconnect): no SUBACK from {URL}")


async def test_no_ack_timeout_leaves_resubscriptions_unbounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = ScriptedBroker()
    options = {"ack_timeout": None, "keep_alive": 0, "reconnect_initial_delay": 1}
    async with connected(broker, **options) as (client, conn):
        async with granted(client, conn, "t/a"):
            await conn.close()
            conn2 = await _reconnected(broker, session_present=False)
            await conn2.expect(mqtt5.SubscribePacket)
            assert await nothing_within(conn2, 3600)
            assert client.connected


# ------------------------------------------------------------ manual acknowledgement
def publish(pid: int, topic: str, sub_ids: list[int] | None = None) -> mqtt5.PublishPacket:
    return mqtt5.PublishPacket(
        topic,
        b"m%d" % pid,
        qos=mqtt5.QoS.AT_LEAST_ONCE,
        packet_id=pid,
        subscription_ids=sub_ids,
    )


async def nothing_within(conn: BrokerConnection, seconds: float) -> bool:
    """True if the client sends nothing for ``seconds`` (of the autojump clock)."""
    with trio.move_on_after(seconds):
        packet = await conn.receive()
        raise AssertionError(f"the client sent {packet!r}")
    return True


@pytest.mark.parametrize(
    ("filters", "qos", "retain_handling"),
    [((), 1, 0), (("a/#/b",), 1, 0), (("t",), 3, 0), (("t",), 1, 3)],
)
async def test_a_subscription_out_of_range_is_refused_before_anything_is_sent(
    autojump_clock: trio.testing.MockClock,
    filters: tuple[str, ...],
    qos: int,
    retain_handling: int,
) -> None:
    broker = ScriptedBroker()
    async with connected(broker, keep_alive=0) as (client, conn):
        with pytest.raises(LocalProtocolError):
            async with client.subscribe(*filters, qos=qos, retain_handling=retain_handling):
                pass
        assert await nothing_within(conn, 60)
        assert client.statistics()["subscriptions"] == 0


@asynccontextmanager
async def granted(
    client: MQTTClient, conn: BrokerConnection, *filters: str, **kwargs: Any
) -> AsyncIterator[tuple[Any, int]]:
    """subscribe(), the scripted broker granting it; yields (subscription, its id)."""
    sub_id: list[int] = []

    async def grant() -> None:
        subscribe = await conn.expect(mqtt5.SubscribePacket)
        sub_id.append(subscribe.subscription_id)
        await conn.send(suback(subscribe))

    async def answer_unsubscribe() -> None:
        while not isinstance(packet := await conn.receive(), mqtt5.UnsubscribePacket):
            if packet is None:
                return
        await conn.send(mqtt5.UnsubAckPacket(packet.packet_id, [mqtt5.UnsubAckReasonCode.SUCCESS]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(grant)
        async with client.subscribe(*filters, **kwargs) as messages:
            yield messages, sub_id[0]
            nursery.start_soon(answer_unsubscribe)


async def test_manual_ack_holds_the_puback_until_ack(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = ScriptedBroker()
    async with (
        connected(broker, keep_alive=0) as (client, conn),
        granted(client, conn, "t/#", manual_ack=True) as (messages, sub_id),
    ):
        await conn.send(publish(5, "t/a", [sub_id]))
        message = await messages.receive()
        assert message.needs_ack
        assert await nothing_within(conn, 60)
        assert client.statistics()["held_acks"] == 1
        message.ack()
        ack = await conn.expect(mqtt5.PubAckPacket)
        assert (ack.packet_id, int(ack.reason_code)) == (5, 0)
        message.ack()  # idempotent
        assert await nothing_within(conn, 60)
        assert client.statistics()["held_acks"] == 0


async def test_manual_and_auto_subscription_of_one_message_waits_for_ack(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Manual wins: the message is acknowledged at ack(), which any of its
    subscriptions may call (it is one object, delivered to both)."""
    broker = ScriptedBroker()
    async with (
        connected(broker, keep_alive=0) as (client, conn),
        granted(client, conn, "t/#") as (auto, auto_id),
        granted(client, conn, "t/a", manual_ack=True) as (manual, manual_id),
    ):
        await conn.send(publish(6, "t/a", [auto_id, manual_id]))
        got_auto, got_manual = await auto.receive(), await manual.receive()
        assert got_auto is got_manual
        assert await nothing_within(conn, 60)
        # an auto-only message is acknowledged at once meanwhile (PUBACKs follow acks,
        # not the order of receipt)
        await conn.send(publish(7, "t/b", [auto_id]))
        assert (await auto.receive()).payload == b"m7"
        assert (await conn.expect(mqtt5.PubAckPacket)).packet_id == 7
        got_auto.ack()
        assert (await conn.expect(mqtt5.PubAckPacket)).packet_id == 6


async def test_orphans_acked_at_once_without_the_manual_ack_option(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = ScriptedBroker()
    async with connected(broker, keep_alive=0) as (client, conn):
        await conn.send(publish(8, "t/early", [99]))  # not one of ours: an orphan
        assert (await conn.expect(mqtt5.PubAckPacket)).packet_id == 8
        async with granted(client, conn, "t/#", manual_ack=True) as (messages, _):
            message = await messages.receive()  # replayed from the backlog
            assert (message.payload, message.needs_ack) == (b"m8", False)


@pytest.mark.parametrize("manual", [True, False])
async def test_orphans_wait_for_their_subscription_with_the_manual_ack_option(
    autojump_clock: trio.testing.MockClock, manual: bool
) -> None:
    broker = ScriptedBroker()
    async with connected(broker, keep_alive=0, manual_ack=True) as (client, conn):
        await conn.send(publish(9, "t/early", [99]))
        assert await nothing_within(conn, 60)
        assert client.statistics()["orphans"] == 1
        async with granted(client, conn, "t/#", manual_ack=manual) as (messages, _):
            message = await messages.receive()
            assert message.payload == b"m9"
            assert message.needs_ack is manual
            if manual:
                assert await nothing_within(conn, 60)
                message.ack()
            assert (await conn.expect(mqtt5.PubAckPacket)).packet_id == 9


async def test_ack_after_reconnect_is_void(autojump_clock: trio.testing.MockClock) -> None:
    broker = ScriptedBroker()
    async with (
        connected(broker, keep_alive=0, reconnect_initial_delay=1) as (client, conn),
        granted(client, conn, "t/#", manual_ack=True) as (messages, sub_id),
    ):
        await conn.send(publish(3, "t/a", [sub_id]))
        message = await messages.receive()
        await conn.close()
        conn2 = await _reconnected(broker, session_present=True)
        await client.wait_connected()
        message.ack()  # the id belonged to the first connection: nothing is sent
        assert not message.needs_ack
        assert await nothing_within(conn2, 60)
        # the broker redelivers it, DUP, and that one is acknowledged
        await conn2.send(publish(3, "t/a", [sub_id]))
        again = await messages.receive()
        again.ack()
        assert (await conn2.expect(mqtt5.PubAckPacket)).packet_id == 3


# ------------------------------------------------------------------------ writes
async def test_what_a_woken_task_publishes_goes_out_with_its_waker_s_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A publish that starts another task, which publishes too, makes one write, not
    two: the writer takes the data one scheduler pass after it is woken (trio shuffles
    each pass's tasks, so without that pass the writer came first about half the time)."""
    broker = ScriptedBroker()
    writes: list[bytes] = []

    @asynccontextmanager
    async def counting(url: Any) -> AsyncIterator[Any]:
        async with broker.stream_factory(url) as stream:
            send_all = stream.send_all

            async def counted(data: bytes) -> None:
                writes.append(data)
                await send_all(data)

            stream.send_all = counted  # type: ignore[method-assign]
            yield stream

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_reconnected, broker)
        async with open_client(broker.url, stream_factory=counting) as client:
            for i in range(20):
                writes.clear()

                async def second(i: int = i) -> None:
                    await client.publish(f"t/{i}/b", b"b", qos=0)

                async with trio.open_nursery() as tasks:
                    await client.publish(f"t/{i}/a", b"a", qos=0)
                    tasks.start_soon(second)
                await trio.testing.wait_all_tasks_blocked()
                assert len(writes) == 1, i
                assert f"t/{i}/a".encode() in writes[0]
                assert f"t/{i}/b".encode() in writes[0]


# ------------------------------------------------------------------ keep-alive
async def test_keep_alive_pings_and_declares_a_silent_broker_dead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = ScriptedBroker()
    async with connected(broker, keep_alive=10) as (client, conn):
        # one keep-alive of silence: PINGREQ; answered, the next one a keep-alive later
        await conn.expect(mqtt5.PingReqPacket)
        assert trio.current_time() == 10
        await conn.send(mqtt5.PingRespPacket())
        await conn.expect(mqtt5.PingReqPacket)
        assert trio.current_time() == 20
        # unanswered: dead 1.5 keep-alives after the last thing heard (t=10)
        assert await conn.wait_closed() == []
        assert trio.current_time() == 25
        await _reconnected(broker)
        await client.wait_connected()
        assert "no data from the broker for 15.0 s" in (client.statistics()["last_error"] or "")
        assert client.statistics()["connections"] == 2


async def test_traffic_from_the_broker_alone_does_not_stop_pings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A ping goes out after one keep-alive without *sending*, even while the broker
    talks (MQTT asks the client to send something within each keep-alive)."""
    broker = ScriptedBroker()
    async with connected(broker, keep_alive=10) as (client, conn):

        async def chatter() -> None:
            for _ in range(3):
                await trio.sleep(4)
                await conn.send(mqtt5.PublishPacket("t/x", b"."))  # QoS 0: no answer

        async with trio.open_nursery() as nursery:
            nursery.start_soon(chatter)
            await conn.expect(mqtt5.PingReqPacket)
            assert trio.current_time() == 10
        assert client.connected


# -------------------------------------------------------------------- reconnect
async def test_reconnect_backoff_doubles_with_equal_jitter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = ScriptedBroker()
    options = {"reconnect_initial_delay": 1, "reconnect_max_delay": 4, "keep_alive": 0}
    async with connected(broker, **options) as (client, conn):
        broker.refuse(times=4)
        await conn.close()
        lost_at = trio.current_time()
        await _reconnected(broker)
        await client.wait_connected()
        attempts = broker.attempts[1:]  # the first is the initial connection
        assert len(attempts) == 5
        gaps = [b - a for a, b in zip([lost_at, *attempts], attempts, strict=False)]
        # each delay drawn from [cap/2, cap], cap = 1, 2, 4, 4, 4 (reconnect_max_delay)
        for gap, cap in zip(gaps, [1, 2, 4, 4, 4], strict=True):
            assert cap / 2 <= gap <= cap
        # a successful connection starts the sequence again
        await broker.connections[-1].close()
        lost_at = trio.current_time()
        await _reconnected(broker)
        assert 0.5 <= broker.attempts[-1] - lost_at <= 1


async def test_max_reconnect_attempts_then_the_client_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = ScriptedBroker()
    async with connected(broker, max_reconnect_attempts=2, keep_alive=0) as (client, conn):
        broker.refuse()
        await conn.close()
        await broker.wait_attempts(2)  # disconnected, reconnecting
        with pytest.raises(ClientClosed, match="gave up after 2 reconnects"):
            await client.wait_connected()
        assert len(broker.attempts) == 3  # the first connection, then 2 reconnects
        with pytest.raises(ClientClosed):
            await client.publish("t/x", b"late")


async def test_a_waited_publish_hears_at_once_that_the_client_stopped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Taken over (DISCONNECT 0x8E) without reconnecting: a publish waiting for its PUBACK
    gets ClientClosed then, not AckTimeout ack_timeout later (a dispatcher's term that was
    taken over hung 10 s so)."""
    broker = ScriptedBroker()
    async with connected(broker, ack_timeout=10, reconnect=False, keep_alive=0) as (client, conn):
        errors: list[BaseException] = []

        async def publish() -> None:
            try:
                await client.publish("t/p", b"x", qos=1)
            except ClientClosed as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            await conn.expect(mqtt5.PublishPacket)
            start = trio.current_time()
            await conn.send(
                mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER)
            )
        assert trio.current_time() - start < 1
        (error,) = errors
        assert "before the PUBACK came" in str(error)


# ------------------------------------------------------------------------ close
async def test_close_waits_close_timeout_for_unacknowledged_publishes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = ScriptedBroker()
    async with connected(broker, close_timeout=5, keep_alive=0) as (client, conn):
        await client.publish("t/x", b"1", qos=1, wait_ack=False)
    # the client gave up after close_timeout, without a DISCONNECT
    assert trio.current_time() == 5
    packets = await conn.wait_closed()
    assert [type(p) for p in packets] == [mqtt5.PublishPacket]


async def test_close_flushes_then_disconnects_and_waits_for_the_broker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = ScriptedBroker()
    async with trio.open_nursery() as nursery:
        async with connected(broker, close_timeout=5, keep_alive=0) as (client, conn):

            async def broker_side() -> None:
                publish = await conn.expect(mqtt5.PublishPacket)
                await trio.sleep(2)
                await conn.send(mqtt5.PubAckPacket(publish.packet_id))
                disconnect = await conn.expect(mqtt5.DisconnectPacket)
                assert int(disconnect.reason_code) == 0  # normal: the will is discarded
                assert trio.current_time() == 2
                await trio.sleep(1)
                await conn.close()

            nursery.start_soon(broker_side)
            await client.publish("t/x", b"1", qos=1, wait_ack=False)
        assert trio.current_time() == 3  # closed when the broker closed, not at 5


async def test_a_full_queue_makes_the_publisher_wait_until_a_puback_makes_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Receive Maximum 1, max_queued 2: one publish in flight, two queued, the fourth
    waits (backpressure) until the broker acknowledges the first."""
    broker = ScriptedBroker()
    connack = {"receive_max": 1}
    async with connected(broker, keep_alive=0, max_queued=2, connack=connack) as (client, conn):
        for n in range(3):
            await client.publish("t/x", b"%d" % n, qos=1, wait_ack=False)
        assert trio.current_time() == 0
        first = await conn.expect(mqtt5.PublishPacket)
        async with trio.open_nursery() as nursery:
            fourth_queued = trio.Event()

            async def fourth() -> None:
                await client.publish("t/x", b"3", qos=1, wait_ack=False)
                fourth_queued.set()

            nursery.start_soon(fourth)
            await trio.sleep(60)
            assert not fourth_queued.is_set()
            await conn.send(mqtt5.PubAckPacket(first.packet_id))
            await fourth_queued.wait()
            assert trio.current_time() == 60
        second = await conn.expect(mqtt5.PublishPacket)
        assert second.payload == b"1"
        assert await nothing_within(conn, 60)  # the window is full again


# ---------------------------------------------------------------------- routing
async def test_messages_are_routed_by_subscription_id_then_by_topic(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = ScriptedBroker()
    async with (
        connected(broker, keep_alive=0) as (client, conn),
        granted(client, conn, "t/#") as (wide, wide_id),
        granted(client, conn, "t/a") as (narrow, narrow_id),
    ):
        assert wide_id != narrow_id
        await conn.send(mqtt5.PublishPacket("t/a", b"by-id", subscription_ids=[narrow_id]))
        await conn.send(mqtt5.PublishPacket("t/a", b"by-topic"))  # ids lost: topic fallback
        assert [(await narrow.receive()).payload for _ in range(2)] == [b"by-id", b"by-topic"]
        assert (await wide.receive()).payload == b"by-topic"
        assert client.statistics()["messages_received"] == 2


async def test_orphans_wait_in_a_bounded_backlog_and_are_replayed_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = ScriptedBroker()
    async with connected(broker, keep_alive=0, orphan_buffer=2) as (client, conn):
        for i in range(3):
            await conn.send(mqtt5.PublishPacket("t/x", b"%d" % i))
        await conn.send(mqtt5.PublishPacket("other/y", b"o"))
        # the messages are read only when the reader runs: wait on a round trip
        async with granted(client, conn, "nothing/here"):
            pass
        stats = client.statistics()
        assert (stats["orphans"], stats["messages_dropped"]) == (2, 2)  # 0 and 1 pushed out
        async with granted(client, conn, "t/#") as (messages, _):
            assert messages.receive_nowait().payload == b"2"
            with pytest.raises(trio.WouldBlock):
                messages.receive_nowait()
        assert client.statistics()["orphans"] == 1
        async with granted(client, conn, "other/#") as (messages, _):
            assert messages.receive_nowait().payload == b"o"
        assert client.statistics()["orphans"] == 0


async def test_wait_connected_survives_failed_reconnect_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: each failed attempt used to replace the event wait_connected() was
    parked on, so it never returned even after the client reconnected."""
    broker = ScriptedBroker()
    async with connected(broker, keep_alive=0) as (client, conn):
        broker.refuse(times=3)
        await conn.close()
        await broker.wait_attempts(2)  # disconnected; the first reconnect was refused
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_reconnected, broker)
            with trio.fail_after(100):
                await client.wait_connected()
        assert len(broker.attempts) == 5
        assert client.connected


async def test_protocol_violation_before_the_first_connack_fails_open_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: open_client used to wait forever (the loop took the violation for
    the loss of an established connection and never reported itself started)."""
    broker = ScriptedBroker()

    async def misbehave() -> None:
        conn = await broker.accept()
        await conn.expect(mqtt5.ConnectPacket)
        await conn.send(suback(mqtt5.SubscribePacket(5, [mqtt5.TopicFilter("t")])))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(misbehave)
        with pytest.raises(ConnectError, match="SUBACK for unknown packet id 5"):
            async with open_client(broker.url, stream_factory=broker.stream_factory):
                pytest.fail("connected")
    assert len(broker.attempts) == 1


async def test_an_orphan_acknowledged_on_arrival_stays_settled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With a manual subscription live (acks held) but no manual_ack option, an orphan
    is acknowledged on arrival; the manual subscription that later takes it owes no ack."""
    broker = ScriptedBroker()
    async with (
        connected(broker, keep_alive=0) as (client, conn),
        granted(client, conn, "a/#", manual_ack=True),
    ):
        await conn.send(publish(11, "b/x", [99]))
        assert (await conn.expect(mqtt5.PubAckPacket)).packet_id == 11
        async with granted(client, conn, "b/#", manual_ack=True) as (messages, _):
            message = messages.receive_nowait()
            assert (message.payload, message.needs_ack) == (b"m11", False)


async def test_a_cancelled_receive_takes_no_message() -> None:
    """A receive cancelled by a deadline that expires while a message is already buffered
    leaves it for the next receive (as trio's channels do): nothing is lost."""
    from sheri_trio.mqtt import Message, Subscription

    send, receive = trio.open_memory_channel[Message](10)
    sub = Subscription(("t",), send, receive)
    for i in range(3):
        send.send_nowait(Message(mqtt5.PublishPacket("t", payload=str(i).encode())))
    with trio.CancelScope() as scope:
        scope.cancel()
        await sub.receive()
    assert scope.cancelled_caught
    got = [sub.receive_nowait().payload for _ in range(3)]
    assert got == [b"0", b"1", b"2"]


def test_a_full_orphan_backlog_warns_at_doubling_counts_not_per_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """100 messages nobody subscribed to, 2 kept: 98 dropped, logged 7 times (1, 2, 4, ...)."""
    from sheri_trio.mqtt import Message
    from sheri_trio.mqtt._routing import Router

    router = Router(2)
    with caplog.at_level(logging.WARNING, logger="sheri_trio.mqtt"):
        for i in range(100):
            router.park(Message(mqtt5.PublishPacket(f"t/{i}", b"")))
    assert router.dropped == 98
    counts = [r.args[1] for r in caplog.records if "backlog is full" in r.getMessage()]
    assert counts == [1, 2, 4, 8, 16, 32, 64]
