"""The gmqtt backend (gmqtt on trio-asyncio) against a real mosquitto."""

from __future__ import annotations

import os
import signal
import socket
import uuid
from contextlib import AsyncExitStack
from functools import partial
from typing import TYPE_CHECKING, Any

import mqtt5
import pytest
import trio

from sheri_trio.mqtt import (
    ConnectError,
    LocalProtocolError,
    PublishError,
    TLSOptions,
    Will,
    open_client,
)
from sheri_trio.mqtt._gmqtt import GMQTTClient
from sheri_trio.testing import BrokerConnection, MosquittoBroker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path

    from sheri_trio.mqtt import Client


def _topic(name: str) -> str:
    return f"t/gmqtt/{name}/{uuid.uuid4().hex[:12]}"


def _gmqtt(url: str, **options: Any) -> AbstractAsyncContextManager[Client]:
    return open_client(url, backend="gmqtt", **options)


@pytest.fixture
def stopped_port() -> Iterator[int]:
    """A local TCP port nobody listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_websocket_refused_clearly(broker: MosquittoBroker, scheme: str) -> None:
    url = broker.url(scheme)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="gmqtt backend has no WebSocket support"):
        async with _gmqtt(url):
            pytest.fail("connected over WebSocket")


async def test_wrong_password_names_the_reason(broker: MosquittoBroker) -> None:
    url = broker.url("mqtt", credentials=False)
    with trio.fail_after(5), pytest.raises(ConnectError) as info:
        async with _gmqtt(url, username=broker.username, password="wrong"):
            pytest.fail("connected with a wrong password")
    assert type(info.value) is ConnectError  # ours, not a group nor gmqtt's
    assert info.value.reason_code == 0x87
    assert "NOT_AUTHORIZED (0x87)" in str(info.value)
    assert not info.value.retryable
    assert "wrong" not in str(info.value)  # the password is never shown


async def test_connection_refused_fails_promptly(stopped_port: int) -> None:
    with trio.fail_after(5), pytest.raises(ConnectError, match="connection refused"):
        async with _gmqtt(f"mqtt://u:p@127.0.0.1:{stopped_port}"):
            pytest.fail("connected to a closed port")


async def test_silent_broker_times_out() -> None:
    """A server that accepts TCP but never answers CONNECT: ConnectError after connect_timeout."""
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        async with stream:
            held.append(stream)
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(5), pytest.raises(ConnectError, match=r"no answer within 0\.3 s"):
            async with _gmqtt(f"mqtt://u:p@127.0.0.1:{port}", connect_timeout=0.3):
                pytest.fail("connected to a silent server")
        nursery.cancel_scope.cancel()


async def test_resubscription_without_suback_drops_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker that keeps no session and never acknowledges the resubscription made
    after a reconnect: after ack_timeout the connection is dropped and made again."""
    new_conns, accepted = trio.open_memory_channel[BrokerConnection](10)

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            await new_conns.send(BrokerConnection(stream, 0))
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        url = f"mqtt://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        first: list[BrokerConnection] = []

        async def accept_and_grant() -> None:
            conn = await accepted.receive()
            first.append(conn)
            await conn.handshake()
            subscribe = await conn.expect(mqtt5.SubscribePacket)
            await conn.send(_suback(subscribe))

        nursery.start_soon(accept_and_grant)
        with trio.fail_after(10):
            async with _gmqtt(
                url, ack_timeout=1, reconnect_initial_delay=0.05, reconnect_max_delay=0.1
            ) as client:
                async with client.subscribe("t/a", "t/b/#"):
                    (conn,) = first
                    await conn.close()
                    conn2 = await accepted.receive()
                    await conn2.handshake(session_present=False)
                    connack_at = trio.current_time()
                    resubscribe = await conn2.expect(mqtt5.SubscribePacket)
                    assert [f.pattern for f in resubscribe.topic_filters] == ["t/a", "t/b/#"]
                    assert await conn2.wait_closed() == []
                    assert 1 <= trio.current_time() - connack_at < 1.5
                    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
                    assert error.startswith(
                        f"SUBSCRIBE 't/a', 't/b/#' (sent at reconnect): no SUBACK from {url}"
                        " within 1 s (connected at "
                    )
                    conn3 = await accepted.receive()
                    await conn3.handshake(session_present=False)
                    again = await conn3.expect(mqtt5.SubscribePacket)
                    await conn3.send(_suback(again))
                    await client.wait_connected()
                    await trio.sleep(1.5)
                    assert client.connected
                    assert client.statistics()["connections"] == 3
                    nursery.start_soon(_answer_unsubscribe, conn3)
        nursery.cancel_scope.cancel()


def _suback(subscribe: mqtt5.SubscribePacket) -> mqtt5.SubAckPacket:
    codes = [mqtt5.SubAckReasonCode(1)] * len(subscribe.topic_filters)
    return mqtt5.SubAckPacket(subscribe.packet_id, codes)


async def _answer_unsubscribe(conn: BrokerConnection) -> None:
    while not isinstance(packet := await conn.receive(), mqtt5.UnsubscribePacket):
        if packet is None:
            return
    await conn.send(mqtt5.UnsubAckPacket(packet.packet_id, [mqtt5.UnsubAckReasonCode.SUCCESS]))


# --------------------------------------------------------------------- will
async def test_will_published_on_abrupt_close(broker: MosquittoBroker) -> None:
    topic = _topic("will-abrupt")
    with trio.fail_after(10):
        async with open_client(broker.tcp_url) as watcher, watcher.subscribe(topic) as wills:
            async with _gmqtt(
                broker.tcp_url, will=Will(topic, b"gone", qos=1), reconnect=False
            ) as client:
                assert isinstance(client, GMQTTClient)
                client.abort_connection()  # a crash: the socket goes, no DISCONNECT
                will = await wills.receive()
    assert will.payload == b"gone"
    assert will.topic == topic


async def test_no_will_on_graceful_close(broker: MosquittoBroker) -> None:
    topic = _topic("will-graceful")
    with trio.fail_after(10):
        async with open_client(broker.tcp_url) as watcher, watcher.subscribe(topic) as wills:
            async with _gmqtt(broker.tcp_url, will=Will(topic, b"gone", qos=1)) as client:
                await client.publish(_topic("x"), b"work", qos=1)
            await client.aclose()  # idempotent
            # Anything the broker published on the will topic for the closed
            # client would come before this marker, published after the close.
            await watcher.publish(topic, b"marker", qos=1)
            first = await wills.receive()
    assert first.payload == b"marker"


# ----------------------------------------------------------------- messages
async def test_retained_round_trip(broker: MosquittoBroker) -> None:
    topic = _topic("retained")
    with trio.fail_after(10):
        async with _gmqtt(broker.tcp_url) as client:
            await client.publish(topic, b"kept", qos=1, retain=True)
            async with client.subscribe(topic, qos=1) as messages:
                message = await messages.receive()
            await client.publish(topic, b"", qos=1, retain=True)  # clear it
    assert message.payload == b"kept"
    assert message.retain
    assert message.qos == 1


async def test_properties_and_subscription_ids(broker: MosquittoBroker) -> None:
    base = _topic("props")
    with trio.fail_after(10):
        async with (
            _gmqtt(broker.tls_url, tls=TLSOptions(ca_file=str(broker.ca_path))) as client,
            client.subscribe(f"{base}/#") as everything,
            client.subscribe(f"{base}/a") as only_a,
        ):
            await client.publish(
                f"{base}/a",
                "payload",
                qos=1,
                content_type="text/plain",
                response_topic=f"{base}/reply",
                correlation_data=b"\x00\x01",
                message_expiry_interval=120,
                user_properties=[("k", "v"), ("k", "w")],
            )
            await client.publish(f"{base}/b", b"b only", qos=0)
            got_all = [await everything.receive(), await everything.receive()]
            got_a = await only_a.receive()
            with pytest.raises(trio.WouldBlock):
                only_a.receive_nowait()  # b went to the "#" subscription alone
    assert [m.payload for m in got_all] == [b"payload", b"b only"]
    message = got_a
    assert message.payload == b"payload"
    assert message.content_type == "text/plain"
    assert message.response_topic == f"{base}/reply"
    assert message.correlation_data == b"\x00\x01"
    assert message.message_expiry_interval is not None
    assert 0 < message.message_expiry_interval <= 120
    assert message.user_properties == [("k", "v"), ("k", "w")]
    assert message.subscription_ids  # routed by identifier


async def test_slow_subscriber_gets_everything_in_order(broker: MosquittoBroker) -> None:
    topic = _topic("slow")
    count = 500
    with trio.fail_after(20):
        async with _gmqtt(broker.tcp_url) as client:
            assert isinstance(client, GMQTTClient)  # the Client protocol has no buffer=
            async with client.subscribe(topic, qos=0, buffer=1) as messages:
                async with open_client(broker.tcp_url) as publisher:
                    for i in range(count):
                        await publisher.publish(topic, f"{i}".encode())
                    await publisher.publish(topic, b"end", qos=1)
                got = []
                async for message in messages:
                    if message.payload == b"end":
                        break
                    got.append(int(message.payload))
                # the pump pops an entry after handing it over: let it finish that step
                with trio.fail_after(5):
                    while client.statistics()["backlog"]:
                        await trio.lowlevel.checkpoint()
                assert client.statistics()["backlog"] == 0
    assert got == list(range(count))


# ------------------------------------------------------------------ QoS 1
async def test_qos1_publish_waits_for_puback(fresh_broker: MosquittoBroker) -> None:
    pid = fresh_broker.pid
    assert pid is not None
    topic = _topic("ack")
    acked = trio.Event()
    with trio.fail_after(15):
        async with _gmqtt(fresh_broker.tcp_url, keep_alive=60) as client:

            async def publish() -> None:
                await client.publish(topic, b"x", qos=1)
                acked.set()

            os.kill(pid, signal.SIGSTOP)  # the broker cannot answer
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(publish)
                    await client.publish(topic, b"no wait", qos=1, wait_ack=False)
                    with trio.move_on_after(0.5):
                        await acked.wait()
                    assert not acked.is_set(), "publish returned before the PUBACK"
                    assert client.statistics()["inflight"] == 2
                    os.kill(pid, signal.SIGCONT)
                    await acked.wait()
            finally:
                os.kill(pid, signal.SIGCONT)
            await client.publish(topic, b"after", qos=1)
            assert client.statistics()["inflight"] == 0


async def test_refused_publish_raises_publish_error(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("user sheri\ntopic readwrite ok/#\ntopic read ro/#\n")
    with MosquittoBroker(tmp_path / "mosquitto", tls=False, extra_config=f"acl_file {acl}") as b:
        with trio.fail_after(10):
            async with _gmqtt(b.tcp_url) as client:
                await client.publish("ok/x", b"1", qos=1)
                with pytest.raises(PublishError, match=r"NOT_AUTHORIZED \(0x87\)") as info:
                    await client.publish("ro/x", b"1", qos=1)
    assert info.value.reason_code == 0x87


# -------------------------------------------------------------- reconnects
async def _expect(messages: AsyncIterator[Any], payload: bytes) -> None:
    async for message in messages:
        if message.payload == payload:
            return


async def test_reconnect_resubscribes_and_resends(broker: MosquittoBroker) -> None:
    topic = _topic("reconnect")
    with trio.fail_after(15):
        async with _gmqtt(
            broker.tcp_url, reconnect_initial_delay=0.05, reconnect_max_delay=0.2
        ) as client:
            assert isinstance(client, GMQTTClient)
            async with client.subscribe(topic, qos=1) as messages:
                await client.publish(topic, b"before", qos=1)
                await _expect(messages, b"before")
                client.abort_connection()
                # Sent into the dying connection or after the reconnect: either
                # way it is delivered once the subscription is back.
                await client.publish(topic, b"after", qos=1)
                await _expect(messages, b"after")
            stats = client.statistics()
    assert stats["connections"] == 2
    assert stats["backend"] == "gmqtt"


async def test_reconnect_restores_more_than_the_packet_id_window(broker: MosquittoBroker) -> None:
    """mosquitto allows 20 packet ids in flight; gmqtt fails beyond, so restores wait for ids."""
    base = _topic("window")
    count = 30
    with trio.fail_after(20):
        async with (
            _gmqtt(broker.tcp_url, reconnect_initial_delay=0.05, reconnect_max_delay=0.2) as client,
            AsyncExitStack() as stack,
        ):
            assert isinstance(client, GMQTTClient)
            subs = [
                await stack.enter_async_context(client.subscribe(f"{base}/{i}"))
                for i in range(count)
            ]
            client.abort_connection()
            for i in range(count):
                await client.publish(f"{base}/{i}", f"after {i}", qos=1, wait_ack=False)
            got = [(await sub.receive()).payload for sub in subs]
            await client.publish(f"{base}/0", b"last", qos=1)
            assert client.statistics()["connections"] == 2
    assert got == [f"after {i}".encode() for i in range(count)]


async def test_reconnect_after_broker_restart(fresh_broker: MosquittoBroker) -> None:
    topic = _topic("restart")
    with trio.fail_after(20):
        async with _gmqtt(
            fresh_broker.tcp_url, reconnect_initial_delay=0.05, reconnect_max_delay=0.2
        ) as client:
            async with client.subscribe(topic, qos=1) as messages:
                await trio.to_thread.run_sync(fresh_broker.restart)
                await client.publish(topic, b"after restart", qos=1)
                await _expect(messages, b"after restart")
            assert client.statistics()["connections"] >= 2
