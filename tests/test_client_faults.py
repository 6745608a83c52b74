"""The native client against a real mosquitto: retained, will, shared subscriptions,
errors, broker restart, keep-alive, interop with paho-mqtt."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

import paho.mqtt.client as paho
import pytest
import trio
import trio.lowlevel
from childproc import freeze_broker_on, read_line
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sheri_trio.mqtt import ConnectError, Will, open_client

if TYPE_CHECKING:
    from sheri_trio.testing import MosquittoBroker


async def test_retained_message(broker: MosquittoBroker) -> None:
    topic = "t/retained/one"
    with trio.fail_after(10):
        async with open_client(broker.tcp_url) as pub:
            await pub.publish(topic, b"kept", qos=1, retain=True)
        async with open_client(broker.tcp_url) as sub:
            async with sub.subscribe(topic) as messages:
                message = await messages.receive()
            assert (message.payload, message.retain) == (b"kept", True)
            await sub.publish(topic, b"", qos=1, retain=True)  # clear it


async def test_properties_round_trip(broker: MosquittoBroker) -> None:
    topic = "t/props"
    with trio.fail_after(10):
        async with open_client(broker.tcp_url) as client:
            async with client.subscribe(topic) as messages:
                await client.publish(
                    topic,
                    b"{}",
                    qos=1,
                    message_expiry_interval=60,
                    content_type="application/json",
                    response_topic="t/reply",
                    correlation_data=b"\x01\x02",
                    user_properties=[("k", "v"), ("k", "w")],
                )
                m = await messages.receive()
    assert m.content_type == "application/json"
    assert m.response_topic == "t/reply"
    assert m.correlation_data == b"\x01\x02"
    assert m.user_properties == [("k", "v"), ("k", "w")]
    assert m.message_expiry_interval is not None
    assert 0 < m.message_expiry_interval <= 60


_CRASHER = """
import sys, trio
from sheri_trio.mqtt import open_client, Will
async def main():
    will = Will(sys.argv[2], b"gone", qos=1)
    async with open_client(sys.argv[1], client_id=sys.argv[3], will=will):
        print("up", flush=True)
        await trio.sleep_forever()
trio.run(main)
"""


async def test_will_published_when_client_dies(broker: MosquittoBroker) -> None:
    topic = "t/will/abrupt"
    with trio.fail_after(20):
        async with open_client(broker.tcp_url) as watcher:
            async with watcher.subscribe(topic) as messages:
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-c", _CRASHER, broker.tcp_url, topic, "crasher-1"],
                    stdout=subprocess.PIPE,
                )
                try:
                    assert proc.stdout is not None
                    line = await read_line(proc.stdout)
                    assert line.strip() == b"up"
                    proc.send_signal(signal.SIGKILL)
                    message = await messages.receive()
                finally:
                    proc.kill()
                    assert proc.stdout is not None
                    with trio.CancelScope(shield=True):
                        await proc.wait()
                        await proc.stdout.aclose()
    assert message.payload == b"gone"


async def test_disconnect_with_will_message(broker: MosquittoBroker) -> None:
    topic = "t/will/0x04"
    with trio.fail_after(10):
        async with open_client(broker.tcp_url) as watcher:
            async with watcher.subscribe(topic) as messages:
                async with open_client(broker.tcp_url, will=Will(topic, b"gone")) as other:
                    await other.disconnect(0x04)  # "disconnect with will message"
                message = await messages.receive()
    assert message.payload == b"gone"


async def test_will_not_published_on_graceful_close(broker: MosquittoBroker) -> None:
    topic = "t/will/graceful2"
    with trio.fail_after(10):
        async with open_client(broker.tcp_url) as watcher:
            async with watcher.subscribe(topic, qos=1) as messages:
                async with open_client(broker.tcp_url, will=Will(topic, b"gone", qos=1)):
                    pass
                await watcher.publish(topic, b"marker", qos=1)
                first = await messages.receive()
    assert first.payload == b"marker"


async def test_shared_subscription_splits_messages(broker: MosquittoBroker) -> None:
    shared = "$share/workers/t/shared/jobs"
    got: dict[str, list[bytes]] = {"a": [], "b": []}
    total = 100
    done = trio.Event()

    async def worker(name: str, ready: trio.Event) -> None:
        async with open_client(broker.tcp_url) as client:
            async with client.subscribe(shared, qos=1) as messages:
                ready.set()
                async for m in messages:
                    got[name].append(m.payload)
                    if len(got["a"]) + len(got["b"]) == total:
                        done.set()

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            for name in got:
                ready = trio.Event()
                nursery.start_soon(worker, name, ready)
                await ready.wait()
            async with open_client(broker.tcp_url) as pub:
                for i in range(total):
                    await pub.publish("t/shared/jobs", str(i).encode(), qos=1)
            await done.wait()
            nursery.cancel_scope.cancel()
    assert sorted(got["a"] + got["b"], key=int) == [str(i).encode() for i in range(total)]
    assert got["a"]
    assert got["b"]


async def test_wrong_password_names_reason_code(broker: MosquittoBroker) -> None:
    url = broker.tcp_url.replace(broker.password, "wrong-password")
    with trio.fail_after(10), pytest.raises(ConnectError) as info:
        async with open_client(url):
            pass  # pragma: no cover
    assert info.value.reason_code == 0x87
    assert "NOT_AUTHORIZED (0x87)" in str(info.value)
    assert info.value.retryable is False
    assert "wrong-password" not in str(info.value)


async def test_refused_port_fails_at_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with trio.fail_after(5), pytest.raises(ConnectError, match="connection refused"):
        async with open_client(f"mqtt://u:secret@127.0.0.1:{port}"):
            pass  # pragma: no cover
    assert time.monotonic() - start < 2


async def test_silent_listener_times_out() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    port = listener.getsockname()[1]
    try:
        start = time.monotonic()
        with trio.fail_after(10), pytest.raises(ConnectError, match=r"no answer within 0.5 s"):
            async with open_client(f"mqtt://127.0.0.1:{port}", connect_timeout=0.5):
                pass  # pragma: no cover
        assert time.monotonic() - start >= 0.5
    finally:
        listener.close()


async def test_bad_url_is_a_clear_error() -> None:
    from sheri_trio.mqtt import LocalProtocolError

    with pytest.raises(LocalProtocolError, match="scheme must be"):
        async with open_client("http://u:hunter2@localhost:1883"):
            pass  # pragma: no cover


async def test_broker_restart_loses_no_qos1_message(fresh_broker: MosquittoBroker) -> None:
    """mosquitto is stopped (SIGTERM) and restarted on the same port mid-stream."""
    total = 1000
    topic = "t/restart/stream"
    seen: set[int] = set()
    all_seen = trio.Event()
    stats: dict[str, int] = {}
    options = {
        # mosquitto 2.0.11 persists no session that began with clean start
        "clean_start": False,
        "session_expiry_interval": 300,
        "reconnect_initial_delay": 0.05,
        "reconnect_max_delay": 0.5,
    }

    async def subscriber(task_status: trio.TaskStatus[None]) -> None:
        async with open_client(fresh_broker.tcp_url, client_id="restart-sub", **options) as client:
            async with client.subscribe(topic, qos=1) as messages:
                task_status.started()
                async for m in messages:
                    seen.add(int(m.payload))
                    if len(seen) == total:
                        stats["sub_connections"] = client.statistics()["connections"]
                        all_seen.set()
                        return

    restarted = trio.Event()

    async def restart() -> None:
        stats["seen_at_restart"] = len(seen)
        await trio.to_thread.run_sync(fresh_broker.restart)
        restarted.set()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(subscriber)
            async with open_client(fresh_broker.tcp_url, client_id="restart-pub", **options) as pub:
                for i in range(total):
                    if i == total // 3:  # the next third goes out while the broker stops
                        await pub.publish(topic, str(i).encode(), qos=1)
                        nursery.start_soon(restart)
                        continue
                    if i == 2 * total // 3:  # the last third after it is back
                        await restarted.wait()
                    await pub.publish(topic, str(i).encode(), qos=1, wait_ack=False)
                    await trio.lowlevel.checkpoint()
                stats["pub_connections"] = pub.statistics()["connections"]
            await all_seen.wait()
    assert seen == set(range(total))
    assert stats["seen_at_restart"] < total  # the restart really happened mid-stream
    assert stats["sub_connections"] == 2  # and both clients reconnected
    assert stats["pub_connections"] == 2


async def test_dead_broker_detected_by_keep_alive(fresh_broker: MosquittoBroker) -> None:
    pid = fresh_broker.pid
    assert pid is not None
    async with open_client(
        fresh_broker.tcp_url, keep_alive=1, reconnect_initial_delay=0.05
    ) as client:
        os.kill(pid, signal.SIGSTOP)
        try:
            start = trio.current_time()
            with trio.fail_after(5):
                # polled: the client has no public "disconnected" event to wait on
                while client.connected:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            elapsed = trio.current_time() - start
        finally:
            os.kill(pid, signal.SIGCONT)
        assert elapsed <= 1.5 + 0.3
        assert "no data from the broker" in (client.statistics()["last_error"] or "")
        with trio.fail_after(10):
            await client.wait_connected()


@pytest.mark.parametrize("backend", ["trio", "gmqtt"])
async def test_broker_frozen_after_a_reconnects_connack(
    fresh_broker: MosquittoBroker, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """mosquitto stopped (SIGSTOP) right after the CONNACK of a reconnect that found no
    session: the resubscription is never acknowledged. Within ack_timeout the client
    gives the connection up, and once the broker runs again it is subscribed again."""
    pid = fresh_broker.pid
    assert pid is not None
    topic = f"t/frozen/{backend}"
    frozen_at: list[float] = []
    async with open_client(
        fresh_broker.tcp_url,
        backend=backend,  # type: ignore[arg-type]
        ack_timeout=1,
        connect_timeout=1,
        reconnect_initial_delay=0.05,
        reconnect_max_delay=0.1,
    ) as client:
        async with client.subscribe(topic, qos=1) as messages:
            with freeze_broker_on(
                pid,
                r"^connected to .*session present: no",
                lambda: frozen_at.append(trio.current_time()),
            ):
                client.abort_connection()  # (session expiry 0: the broker forgets us)
                with trio.fail_after(10):
                    # polled: the client has no public "disconnected" event to wait on
                    while not frozen_at or client.connected:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                elapsed = trio.current_time() - frozen_at[0]
                assert 1 <= elapsed <= 1.5
            errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
            assert len(errors) == 1
            assert errors[0].startswith(f"SUBSCRIBE {topic!r} (sent at reconnect): no SUBACK")
            with trio.fail_after(15):
                await client.wait_connected()
                await client.publish(topic, b"heard", qos=1)
                message = await messages.receive()
            assert message.payload == b"heard"


# --------------------------------------------------------------- interop with paho
def _paho(broker: MosquittoBroker, client_id: str) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    c.username_pw_set(broker.username, broker.password)
    return c


async def test_paho_publishes_to_us(broker: MosquittoBroker) -> None:
    topic = "t/interop/paho-to-us"
    with trio.fail_after(15):
        async with open_client(broker.tcp_url) as client:
            async with client.subscribe(topic, qos=1) as messages:
                p = _paho(broker, "paho-pub")
                p.connect("127.0.0.1", broker.tcp_port)
                p.loop_start()
                try:
                    props = Properties(PacketTypes.PUBLISH)
                    props.UserProperty = [("from", "paho")]
                    info = p.publish(topic, b"hello from paho", qos=1, properties=props)
                    await trio.to_thread.run_sync(info.wait_for_publish, 5)
                    m = await messages.receive()
                finally:
                    p.disconnect()
                    p.loop_stop()
    assert m.payload == b"hello from paho"
    assert ("from", "paho") in m.user_properties


async def test_we_publish_to_paho(broker: MosquittoBroker) -> None:
    topic = "t/interop/us-to-paho"
    received: list[bytes] = []
    got = threading.Event()
    subscribed = threading.Event()
    p = _paho(broker, "paho-sub")

    def on_connect(c: paho.Client, *_: object) -> None:
        c.subscribe(topic, qos=1)

    def on_subscribe(*_: object) -> None:
        subscribed.set()

    def on_message(c: paho.Client, u: object, msg: paho.MQTTMessage) -> None:
        received.append(msg.payload)
        got.set()

    p.on_connect = on_connect
    p.on_subscribe = on_subscribe
    p.on_message = on_message
    p.connect("127.0.0.1", broker.tcp_port)
    p.loop_start()
    try:
        assert await trio.to_thread.run_sync(subscribed.wait, 5)
        with trio.fail_after(10):
            async with open_client(broker.ws_url) as client:
                await client.publish(topic, json.dumps({"a": 1}).encode(), qos=1)
        assert await trio.to_thread.run_sync(got.wait, 5)
    finally:
        p.disconnect()
        p.loop_stop()
    assert received == [b'{"a": 1}']
