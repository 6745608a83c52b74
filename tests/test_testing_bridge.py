"""sheri_trio.testing.BridgedBrokers: two real mosquittos bridged as in issue 11."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import trio

from sheri_trio.mqtt import open_client
from sheri_trio.testing import BridgedBrokers, bridge_config

if TYPE_CHECKING:
    from pathlib import Path

    from sheri_trio.testing import MosquittoBroker


def test_the_bridge_configuration_is_the_issue_s(bridged: BridgedBrokers) -> None:
    text = bridged.second.config_path.read_text()
    for line in (
        f"address 127.0.0.1:{bridged.first.tcp_port}",
        "bridge_protocol_version mqttv50",
        "cleansession true",
        "try_private true",
        "topic # both 1",
    ):
        assert line in text.splitlines(), line
    assert "connection" not in bridged.first.config_path.read_text()
    assert bridged.first.tcp_port != bridged.second.tcp_port


async def _carried(source: MosquittoBroker, target: MosquittoBroker, topic: str) -> bytes:
    async with (
        open_client(target.tcp_url, client_id=f"t-{secrets.token_hex(3)}") as sub,
        open_client(source.tcp_url, client_id=f"s-{secrets.token_hex(3)}") as pub,
        sub.subscribe(topic, qos=1) as messages,
    ):
        await pub.publish(topic, b"across", qos=1)
        message = await messages.receive()
        return message.payload


async def test_messages_cross_the_bridge_both_ways(bridged: BridgedBrokers) -> None:
    """Started means bridged: the first message crosses, no wait needed."""
    with trio.fail_after(10):
        first, second = bridged.brokers
        assert await _carried(first, second, "x/one") == b"across"
        assert await _carried(second, first, "x/two") == b"across"


async def test_a_pair_on_a_swarm_topic_only_bridges_that_swarm(tmp_path: Path) -> None:
    with BridgedBrokers(tmp_path, topic="sw-1/#", tls=False) as pair, trio.fail_after(10):
        assert await _carried(pair.first, pair.second, "sw-1/tasks/new") == b"across"
        async with (
            open_client(pair.second.tcp_url, client_id="other-sub") as sub,
            open_client(pair.first.tcp_url, client_id="other-pub") as pub,
            sub.subscribe("sw-2/#", "sw-1/marker", qos=1) as messages,
        ):
            await pub.publish("sw-2/tasks/new", b"not bridged", qos=1)
            await pub.publish("sw-1/marker", b"bridged", qos=1)  # after it, in order
            assert (await messages.receive()).topic == "sw-1/marker"
    assert not pair.first.running
    assert not pair.second.running
    assert "topic sw-1/# both 1" in bridge_config(pair.first, topic="sw-1/#")
