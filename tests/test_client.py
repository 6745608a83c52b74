"""The native client (and the gmqtt backend) against a real mosquitto."""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Any, Literal

import pytest
import trio

from sheri_trio.mqtt import AckTimeout, open_client

if TYPE_CHECKING:
    from sheri_trio.mqtt import Client
    from sheri_trio.testing import MosquittoBroker

SCHEMES = ["mqtt", "mqtts", "ws", "wss"]
GMQTT_SCHEMES = ["mqtt", "mqtts"]  # gmqtt has no WebSocket transport
BACKENDS = [pytest.param(s, "trio", id=f"{s}-trio") for s in SCHEMES] + [
    pytest.param(s, "gmqtt", id=f"{s}-gmqtt") for s in GMQTT_SCHEMES
]


def _tls(broker: MosquittoBroker, scheme: str) -> dict[str, object]:
    from sheri_trio.mqtt import TLSOptions

    return {"tls": TLSOptions(ca_file=str(broker.ca_path))} if scheme in ("mqtts", "wss") else {}


@pytest.mark.parametrize(("scheme", "backend"), BACKENDS)
@pytest.mark.parametrize("qos", [0, 1])
async def test_round_trip(
    broker: MosquittoBroker, scheme: str, backend: Literal["trio", "gmqtt"], qos: int
) -> None:
    url = broker.url(scheme)  # type: ignore[arg-type]
    topic = f"t/round/{scheme}/{backend}/{qos}"
    with trio.fail_after(10):
        async with open_client(url, backend=backend, **_tls(broker, scheme)) as client:
            async with client.subscribe(topic, qos=qos) as messages:
                for i in range(20):
                    await client.publish(topic, f"m{i}".encode(), qos=qos)
                got = [(await messages.receive()).payload for _ in range(20)]
    assert got == [f"m{i}".encode() for i in range(20)]


@pytest.mark.parametrize("take", [0, 7], ids=["writer-only", "partial-writes"])
async def test_direct_writes_that_the_socket_only_partly_takes(
    broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch, take: int
) -> None:
    """The reader writes acks and window refills straight to the socket; what the
    socket does not take goes through the writer task, in order. Forced here: the socket
    takes nothing (take=0) or 7 bytes per direct write."""
    from sheri_trio.mqtt import _streams

    direct = _streams._TrioStream.send_nowait
    calls = []

    def stingy(self: _streams._TrioStream, data: bytes) -> int:
        calls.append(len(data))
        return direct(self, data[:take]) if take else 0

    monkeypatch.setattr(_streams._TrioStream, "send_nowait", stingy)
    n = 2000
    with trio.fail_after(30):
        async with (
            open_client(broker.tcp_url, client_id=f"stingy-sub-{take}") as sub,
            open_client(broker.tcp_url, client_id=f"stingy-pub-{take}") as pub,
            sub.subscribe(f"t/stingy/{take}", qos=1) as messages,
        ):
            for i in range(n):
                await pub.publish(f"t/stingy/{take}", b"%d" % i, qos=1, wait_ack=False)
            got = [int((await messages.receive()).payload) for _ in range(n)]
            await pub.aclose()  # waits for every PUBACK
            assert pub.statistics()["inflight"] == 0
    assert got == list(range(n))
    assert calls  # the direct path was taken (acks and refills of QoS 1)


@pytest.mark.parametrize("backend", ["trio", "gmqtt"])
@pytest.mark.parametrize("request_kind", ["subscribe", "publish"])
async def test_frozen_broker_request_times_out_and_client_reconnects(
    fresh_broker: MosquittoBroker, backend: Literal["trio", "gmqtt"], request_kind: str
) -> None:
    """mosquitto SIGSTOPped after CONNACK: the request fails after ack_timeout with
    AckTimeout, the client drops the connection, and reconnects once it is resumed."""
    pid = fresh_broker.pid
    assert pid is not None
    async with open_client(
        fresh_broker.tcp_url,
        backend=backend,
        ack_timeout=1,
        connect_timeout=2,
        reconnect_initial_delay=0.05,
    ) as client:

        async def request() -> None:
            if request_kind == "publish":
                await client.publish("t/frozen", b"x", qos=1)
            else:
                async with client.subscribe("t/frozen"):
                    pytest.fail("subscribed to a frozen broker")

        os.kill(pid, signal.SIGSTOP)
        try:
            start = trio.current_time()
            with trio.fail_after(5), pytest.raises(AckTimeout) as info:
                await request()
            elapsed = trio.current_time() - start
            assert not client.connected  # dropped at once, without waiting for keep-alive
        finally:
            os.kill(pid, signal.SIGCONT)
        assert 1 <= elapsed < 1.5
        ack = "PUBACK" if request_kind == "publish" else "SUBACK"
        assert f"no {ack} from mqtt://sheri:***@127.0.0.1:" in str(info.value)
        assert fresh_broker.password not in str(info.value)
        with trio.fail_after(20):
            await client.wait_connected()
        assert client.statistics()["connections"] == 2


@pytest.mark.parametrize("backend", ["trio", "gmqtt"])
async def test_publish_returns_the_puback_reason_code(
    broker: MosquittoBroker, backend: Literal["trio", "gmqtt"]
) -> None:
    """mosquitto answers 0x10 (no matching subscribers) to a QoS 1 publish nobody
    subscribes to, 0x00 when someone does; QoS 0 and wait_ack=False give None."""
    topic = f"t/reason/{backend}"
    with trio.fail_after(10):
        async with open_client(broker.tcp_url, backend=backend) as client:
            assert await client.publish(f"{topic}/nobody", b"x", qos=1) == 0x10
            assert await client.publish(f"{topic}/nobody", b"x", qos=0) is None
            assert await client.publish(f"{topic}/nobody", b"x", qos=1, wait_ack=False) is None
            async with client.subscribe(topic, qos=1) as messages:
                assert await client.publish(topic, b"y", qos=1) == 0x00
                assert (await messages.receive()).payload == b"y"


# ------------------------------------------------------------ manual acknowledgement
def _persistent(client_id: str, backend: str, **options: Any) -> dict[str, Any]:
    return {
        "backend": backend,
        "client_id": client_id,
        "clean_start": False,
        "session_expiry_interval": 60,
        "reconnect_initial_delay": 0.05,
        **options,
    }


async def _flush(client: Client) -> None:
    """Our PUBACKs so far have reached the broker: a QoS 1 round trip behind them."""
    assert await client.publish("t/manual/flush", b"", qos=1) == 0x10


@pytest.mark.parametrize("backend", ["trio", "gmqtt"])
async def test_manual_ack_unacked_message_comes_again_after_a_drop(
    broker: MosquittoBroker, backend: Literal["trio", "gmqtt"]
) -> None:
    topic = f"t/manual/drop/{backend}"
    sub_id = f"manual-drop-{backend}"
    with trio.fail_after(20):
        async with (
            open_client(broker.tcp_url, **_persistent(sub_id, backend)) as sub,
            open_client(broker.tcp_url, backend=backend) as pub,
            sub.subscribe(topic, qos=1, manual_ack=True) as messages,
        ):
            await pub.publish(topic, b"m1", qos=1)
            first = await messages.receive()
            assert (first.payload, first.duplicate) == (b"m1", False)
            assert first.needs_ack
            sub.abort_connection()  # type: ignore[attr-defined]  # "killed" before ack()
            # the broker kept it unacknowledged: redelivered (DUP) on the next connection
            again = await messages.receive()
            assert (again.payload, again.duplicate) == (b"m1", True)
            assert sub.statistics()["connections"] == 2
            first.ack()  # of an earlier connection: void, nothing is sent
            again.ack()
            again.ack()  # idempotent
            assert not again.needs_ack
            await _flush(sub)
            sub.abort_connection()  # type: ignore[attr-defined]
            await pub.publish(topic, b"m2", qos=1)
            # acknowledged: not redelivered; the next message is the new one
            nxt = await messages.receive()
            assert nxt.payload == b"m2"
            nxt.ack()


@pytest.mark.parametrize("backend", ["trio", "gmqtt"])
async def test_manual_ack_message_survives_the_client_being_replaced(
    broker: MosquittoBroker, backend: Literal["trio", "gmqtt"]
) -> None:
    """A client that dies before ack(): the next client with the same id and session
    gets the message again, even though it arrives before that client's subscribe()
    (the manual_ack option holds such orphans)."""
    topic = f"t/manual/new/{backend}"
    client_id = f"manual-new-{backend}"
    options = _persistent(client_id, backend, manual_ack=True, reconnect=False)
    with trio.fail_after(20):
        async with open_client(broker.tcp_url, backend=backend) as pub:
            async with open_client(broker.tcp_url, **options) as first:
                async with first.subscribe(topic, qos=1) as messages:
                    await pub.publish(topic, b"task", qos=1)
                    assert (await messages.receive()).payload == b"task"
                    first.abort_connection()  # type: ignore[attr-defined]
            # a new client of the same session, killed again before its ack()
            for acks in (False, True):
                async with open_client(broker.tcp_url, **options) as client:
                    async with client.subscribe(topic, qos=1) as messages:
                        message = await messages.receive()
                        assert (message.payload, message.duplicate) == (b"task", True)
                        if acks:
                            message.ack()
                            await _flush(client)
                        client.abort_connection()  # type: ignore[attr-defined]
            # acknowledged: the third client is not given it again
            async with open_client(broker.tcp_url, **options) as last:
                async with last.subscribe(topic, qos=1) as messages:
                    await pub.publish(topic, b"last", qos=1)
                    message = await messages.receive()
                    assert message.payload == b"last"
                    message.ack()
                    await _flush(last)
