"""The native client (and the gmqtt backend) against a real mosquitto."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import pytest
import trio

from sheri_trio.mqtt import open_client

if TYPE_CHECKING:
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
