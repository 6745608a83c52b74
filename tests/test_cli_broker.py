"""The options every command shares and the commands' own clients (over the memory bus)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio

from sheri_trio.cli import NoAnswer
from sheri_trio.cli._broker import BrokerArgs, BrokerLink, decode
from sheri_trio.config import Connection, parse_config
from sheri_trio.testing import MemoryBus

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


def test_the_options_win_over_the_file() -> None:
    file_config = parse_config({"broker": {"url": "mqtt://file:1883", "connect_timeout": 3}})
    conn = BrokerArgs(swarm="s1", username="u").connection(file_config)
    assert (conn.broker, conn.swarm) == ("mqtt://file:1883", "s1")
    assert conn.client_options == {"username": "u", "connect_timeout": 3.0}
    flagged = BrokerArgs(broker="mqtt://flag:1884").connection(file_config)
    assert flagged.broker == "mqtt://flag:1884"


def test_each_wait_is_bounded_by_the_connect_timeout() -> None:
    assert BrokerLink(Connection("mqtt://h:1", "s", {"connect_timeout": 2.5})).bound == 2.5
    assert BrokerLink(Connection("mqtt://h:1", "s", {})).bound == 10.0  # the client's default


async def test_retained_messages_arrive_before_the_sync_marker() -> None:
    bus = MemoryBus()
    link = BrokerLink(Connection("mqtt://h:1", "s", {}))
    async with bus.connect("agent") as agent, bus.connect("cli") as client:
        await agent.publish("s/tasks/state/t1", b'{"payload": {"task_id": "t1"}}', retain=True)
        await agent.publish("s/tasks/state/t2", b"junk", retain=True)
        await agent.publish("s/tasks/new", b"not retained")
        found = await link.read_retained(client, link.topics.tasks_state_all, what="states")
    assert [m.topic for m in found] == ["s/tasks/state/t1", "s/tasks/state/t2"]
    assert [decode(m) is not None for m in found] == [True, False]
    (marker,) = [r.topic for r in bus.records("s/agents/cli/sync/+")]  # Topics.sync_marker
    assert marker.startswith("s/agents/cli/sync/")


class _Silent:
    """A client that connected, then the broker answers nothing."""

    @asynccontextmanager
    async def subscribe(
        self, *filters: str, **options: Any
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Any]]:
        send, receive = trio.open_memory_channel[Any](0)
        async with send, receive:
            yield receive  # nothing ever comes

    async def publish(self, *args: Any, **options: Any) -> None:
        await trio.sleep_forever()


async def test_a_silent_broker_is_no_answer_after_the_bound(autojump_clock: trio.abc.Clock) -> None:
    link = BrokerLink(Connection("mqtt://h:1", "s", {"connect_timeout": 2}))
    began = trio.current_time()
    with pytest.raises(NoAnswer, match=r"^no answer from the broker within 2 s while reading x: "):
        await link.read_retained(_Silent(), "s/#", what="x")  # type: ignore[arg-type]
    assert trio.current_time() - began == 2
