"""The in-memory bus of :mod:`sheri_trio.testing`: routing, retained messages, wills."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sheri_trio.mqtt import ClientClosed, LocalProtocolError, Message, Subscription, Will
from sheri_trio.testing import BusRecord, MemoryBus, MemoryClient


def drain(sub: Subscription) -> list[Message]:
    out: list[Message] = []
    while True:
        try:
            out.append(sub.receive_nowait())
        except trio.WouldBlock:
            return out


def topics(messages: list[Message]) -> list[str]:
    return [m.topic for m in messages]


async def test_wildcards_and_dollar_topics() -> None:
    bus = MemoryBus()
    async with bus.connect("a") as a, bus.connect("b") as b:
        async with (
            a.subscribe("s/+/x") as plus,
            a.subscribe("s/#") as hash_,
            b.subscribe("#") as everything,
            b.subscribe("$SYS/#") as sys,
        ):
            for topic in ("s/1/x", "s/1/y", "s", "s/1/x/z", "$SYS/up", "t"):
                await b.publish(topic, b"p", qos=1)
            assert topics(drain(plus)) == ["s/1/x"]
            assert topics(drain(hash_)) == ["s/1/x", "s/1/y", "s", "s/1/x/z"]
            assert topics(drain(everything)) == ["s/1/x", "s/1/y", "s", "s/1/x/z", "t"]
            assert topics(drain(sys)) == ["$SYS/up"]


async def test_one_global_order_and_one_copy_per_subscription() -> None:
    bus = MemoryBus()
    async with bus.connect("a") as a, bus.connect("b") as b, bus.connect("c") as c:
        async with a.subscribe("x/#", "x/1") as sa, b.subscribe("x/#") as sb:

            async def talk(client: MemoryClient, name: str) -> None:
                for i in range(20):
                    await client.publish(f"x/{i % 3}", f"{name}{i}", qos=1)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(talk, b, "b")
                nursery.start_soon(talk, c, "c")
            got_a = [m.payload for m in drain(sa)]
            got_b = [m.payload for m in drain(sb)]
    assert len(got_a) == 40  # x/1 matches both filters of sa: still one copy
    assert got_a == got_b
    assert [r.payload for r in bus.records("x/#")] == got_a


async def test_shared_subscriptions_round_robin() -> None:
    bus = MemoryBus()
    async with bus.connect("a") as a, bus.connect("b") as b, bus.connect("pub") as pub:
        async with (
            a.subscribe("$share/g/jobs/+") as sa,
            b.subscribe("$share/g/jobs/+") as sb,
            b.subscribe("jobs/#") as plain,
        ):
            for i in range(6):
                await pub.publish(f"jobs/{i}", str(i), qos=1)
            assert [m.payload for m in drain(sa)] == [b"0", b"2", b"4"]
            assert [m.payload for m in drain(sb)] == [b"1", b"3", b"5"]
            assert len(drain(plain)) == 6
            assert bus.subscribers("jobs/9") == ["a", "b"]


async def test_retained_delivered_on_subscribe_and_cleared_by_empty_payload() -> None:
    bus = MemoryBus()
    async with bus.connect("a") as a:
        await a.publish("r/1", b"one", qos=1, retain=True)
        await a.publish("r/2", b"two", qos=1, retain=True, message_expiry_interval=1)
        await a.publish("r/2", b"", qos=1, retain=True)
        await a.publish("r/3", b"three", retain=True)
        await a.publish("r/4", b"live")
        assert set(bus.retained) == {"r/1", "r/3"}
        async with a.subscribe("r/+", "r/#") as sub:
            got = drain(sub)
            assert [(m.topic, m.payload, m.retain) for m in got] == [
                ("r/1", b"one", True),
                ("r/3", b"three", True),
            ]
            assert got[1].qos == 0  # min(publish QoS, subscription QoS)
        async with a.subscribe("r/#", retain_handling=2) as sub:
            assert drain(sub) == []
        async with a.subscribe("$share/g/r/#") as sub:
            assert drain(sub) == []


async def test_qos_downgrade_and_properties_kept() -> None:
    bus = MemoryBus()
    async with bus.connect("a") as a, a.subscribe("t", qos=0) as sub:
        await a.publish(
            "t",
            "text",
            qos=1,
            content_type="application/json",
            message_expiry_interval=9,
            user_properties=[("k", "v")],
        )
        (m,) = drain(sub)
        assert (m.payload, m.qos, m.retain) == (b"text", 0, False)
        assert m.content_type == "application/json"
        assert m.message_expiry_interval == 9
        assert m.user_properties == [("k", "v")]


async def test_no_local() -> None:
    bus = MemoryBus()
    async with bus.connect("a") as a, bus.connect("b") as b:
        async with a.subscribe("t", no_local=True) as sub:
            await a.publish("t", b"mine")
            await b.publish("t", b"theirs")
            assert [m.payload for m in drain(sub)] == [b"theirs"]


WILL = Will("w/a/status", b"offline", qos=1, retain=True)


async def test_will_on_kill_not_on_graceful_close() -> None:
    bus = MemoryBus()
    async with bus.connect("watch") as watch, watch.subscribe("w/#") as wills:
        async with bus.connect("a", will=WILL) as a:
            pass
        assert drain(wills) == []
        assert not a.connected
        assert not a.killed

        async with bus.connect("a", will=WILL) as a:
            async with a.subscribe("x") as own:
                a.kill()
                with pytest.raises(trio.EndOfChannel):
                    await own.receive()
            with pytest.raises(ClientClosed):
                await a.publish("x", b"late")
            with pytest.raises(ClientClosed):
                await a.wait_connected()
        (will,) = drain(wills)
        assert (will.topic, will.payload, will.retain) == ("w/a/status", b"offline", True)
        assert a.killed
        assert bus.retained["w/a/status"].payload == b"offline"
        assert bus.history[-1].will
        assert "a" not in bus.clients

        async with bus.connect("a", will=WILL) as a:
            await a.disconnect(0x04)
        assert topics(drain(wills)) == ["w/a/status"]


async def test_takeover_publishes_the_old_will() -> None:
    bus = MemoryBus()
    async with bus.connect("watch") as watch, watch.subscribe("w/#") as wills:
        old = bus.open("a", will=WILL)
        new = bus.open("a")
        assert not old.connected
        assert old.close_reason == "session taken over"
        assert bus.clients["a"] is new
        assert len(drain(wills)) == 1
        await new.aclose()
        await old.aclose()  # idempotent


async def test_iteration_ends_on_kill_after_buffered_messages() -> None:
    bus = MemoryBus()
    a = bus.open("a")
    seen: list[bytes] = []
    async with a.subscribe("t") as sub:
        await a.publish("t", b"1")
        await a.publish("t", b"2")
        a.kill()
        async for m in sub:
            seen.append(m.payload)
    assert seen == [b"1", b"2"]


async def test_a_full_subscription_makes_the_publisher_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """As the real client: a full subscription holds the delivery back, nothing is lost."""
    bus = MemoryBus()
    async with bus.connect("a") as a, bus.connect("b") as b, b.subscribe("t", buffer=2) as sub:
        await a.publish("t", b"0", qos=1)
        await a.publish("t", b"1", qos=1)
        published = trio.Event()

        async def third() -> None:
            await a.publish("t", b"2", qos=1)
            published.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(third)
            await trio.sleep(5)
            assert not published.is_set()  # waiting for room
            assert b.statistics()["messages_waiting"] == 1
            assert (await sub.receive()).payload == b"0"
            await published.wait()
            assert trio.current_time() == 5
        assert [m.payload for m in drain(sub)] == [b"1", b"2"]
        assert b.statistics()["messages_dropped"] == 0
        assert b.statistics()["messages_received"] == 3


async def test_a_slow_subscriber_gets_every_message_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = MemoryBus()
    got: list[bytes] = []
    async with bus.connect("pub") as pub, bus.connect("slow") as slow:
        async with slow.subscribe("t/#", buffer=3) as sub, bus.connect("fast") as fast:
            async with fast.subscribe("t/#", buffer=1000) as quick:

                async def publisher() -> None:
                    for i in range(50):
                        await pub.publish(f"t/{i % 3}", b"%d" % i, qos=i % 2)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(publisher)
                    while len(got) < 50:
                        got.append((await sub.receive()).payload)
                        await trio.sleep(1)  # one message a second
                assert [m.payload for m in drain(quick)] == [b"%d" % i for i in range(50)]
    assert got == [b"%d" % i for i in range(50)]
    # the publisher was held back by the slow one: its last message went in at ~47 s
    assert 45 <= trio.current_time() <= 50


async def test_nowait_publishes_and_wills_wait_on_the_bus_in_order() -> None:
    """What cannot wait (publish_nowait, a will, retained on subscribe) waits on the bus
    behind the full buffer: in order, none dropped, also with a buffer of 0."""
    bus = MemoryBus()
    will = Will("w", b"gone")
    async with bus.connect("a") as a, a.subscribe("#", buffer=0) as sub:
        b = bus.open("b", will=will)
        for i in range(3):
            assert a.publish_nowait("t", str(i)) == 1
        b.kill()
        assert a.statistics()["messages_waiting"] == 4
        assert [(m.topic, m.payload) for m in drain(sub)] == [
            ("t", b"0"),
            ("t", b"1"),
            ("t", b"2"),
            ("w", b"gone"),
        ]
        assert a.statistics()["messages_waiting"] == 0
        a.publish_nowait("t", b"last")
        with trio.fail_after(1):
            assert (await sub.receive()).payload == b"last"


async def test_leaving_a_full_subscription_releases_its_publishers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = MemoryBus()
    async with bus.connect("a") as a, bus.connect("b") as b:
        async with trio.open_nursery() as nursery:
            async with b.subscribe("t", buffer=1):
                await a.publish("t", b"0")
                nursery.start_soon(a.publish, "t", b"1")
                await trio.sleep(3)
                assert b.statistics()["messages_waiting"] == 1
            # left unread: dropped with the subscription (as the real client), the
            # publisher goes on
        assert trio.current_time() == 3


async def test_a_closed_publisher_stops_waiting(autojump_clock: trio.testing.MockClock) -> None:
    bus = MemoryBus()
    async with bus.connect("b") as b, b.subscribe("t", buffer=0):
        a = bus.open("a")

        async def blocked() -> None:
            with pytest.raises(ClientClosed):
                await a.publish("t", b"x")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked)
            await trio.sleep(1)
            a.kill()


async def test_misuse_is_refused() -> None:
    bus = MemoryBus()
    async with bus.connect() as a:
        assert a.client_id.startswith("memory-")
        with pytest.raises(LocalProtocolError):
            await a.publish("a/+", b"")
        with pytest.raises(LocalProtocolError):
            await a.publish("a", b"", qos=2)
        for bad in ("a/#/b", "a+", "$share/g", ""):
            with pytest.raises(LocalProtocolError):
                async with a.subscribe(bad):
                    pass
        with pytest.raises(LocalProtocolError):
            async with a.subscribe():
                pass


async def test_statistics_and_history_times(autojump_clock: trio.testing.MockClock) -> None:
    bus = MemoryBus()
    async with bus.connect("a") as a, a.subscribe("t") as sub:
        await trio.sleep(5)
        await a.publish("t", b"x", qos=1)
        stats = a.statistics()
        assert stats["backend"] == "memory"
        assert stats["connected"]
        assert stats["subscriptions"] == 1
        assert (stats["messages_sent"], stats["messages_received"]) == (1, 1)
        assert drain(sub)[0].payload == b"x"
    (record,) = bus.history
    assert (record.time, record.sender, record.topic) == (5.0, "a", "t")
    assert a.statistics()["subscriptions"] == 0


async def test_wait_for_returns_past_or_future_records(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = MemoryBus()
    async with bus.connect("a") as a:
        await a.publish("x/1", b"early")
        record = await bus.wait_for("x/+")
        assert record.payload == b"early"

        async def later() -> None:
            await trio.sleep(3)
            await a.publish("x/2", b'{"n": 2}')

        async with trio.open_nursery() as nursery:
            nursery.start_soon(later)
            record = await bus.wait_for("x/#", lambda r: r.topic == "x/2")
        assert (record.time, record.json()) == (3.0, {"n": 2})
        assert (await bus.wait_for("x/#", start=1)).topic == "x/2"
    with pytest.raises(RuntimeError, match="record=True"):
        await MemoryBus(record=False).wait_for()


async def test_listeners_act_between_two_messages() -> None:
    bus = MemoryBus()
    async with bus.connect("a") as a, bus.connect("b") as b, b.subscribe("#") as sub:

        def react(record: BusRecord) -> None:
            if record.topic == "ping":
                a.publish_nowait("pong", b"", qos=1)

        bus.listeners.append(react)
        await a.publish("ping", b"", qos=1)
        await a.publish("after", b"", qos=1)
        assert topics(drain(sub)) == ["ping", "pong", "after"]
        assert [r.sender for r in bus.history] == ["a", "a", "a"]


async def test_publish_returns_a_reason_code_like_a_broker() -> None:
    bus = MemoryBus()
    async with bus.connect("a") as a, bus.connect("b") as b:
        assert await a.publish("t/x", b"1", qos=1) == 0x10  # no matching subscribers
        assert await a.publish("t/x", b"1", qos=0) is None
        assert await a.publish("t/x", b"1", qos=1, wait_ack=False) is None
        async with b.subscribe("t/#"):
            assert await a.publish("t/x", b"2", qos=1) == 0


async def test_manual_ack_is_accepted_and_counted() -> None:
    bus = MemoryBus()
    async with (
        bus.connect("a") as a,
        bus.connect("b") as b,
        b.subscribe("t/#", manual_ack=True) as manual,
        b.subscribe("t/#") as auto,
    ):
        await a.publish("t/x", b"1", qos=1)
        await a.publish("t/x", b"0", qos=0)
        one, zero = await manual.receive(), await manual.receive()
        assert (one.needs_ack, zero.needs_ack) == (True, False)
        assert not (await auto.receive()).needs_ack
        assert b.statistics()["held_acks"] == 1
        one.ack()
        one.ack()  # idempotent
        zero.ack()  # a no-op for QoS 0
        assert (b.statistics()["held_acks"], b.statistics()["messages_acked"]) == (0, 1)
