"""What docs/operations.md states about the agents' subscriptions matches the code.

"Brokers compared" tells operators how many topic filters each client subscribes to in
one SUBSCRIBE (AWS IoT Core takes at most 8, EMQX Cloud Serverless 10 per client): the
counts are taken here from the first ``subscribe()`` of a real agent and dispatcher shell
on the in-memory bus, and looked up on the page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from sheri_trio.executors import simulated_registry
from sheri_trio.swarm import AgentConfig
from sheri_trio.swarm._agent import Agent
from sheri_trio.swarm._dispatching import DispatcherShell
from sheri_trio.testing import MemoryBus

#: the page, its line breaks made spaces (a phrase may wrap)
DOC = " ".join(
    (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text().split()
)


class Recording:
    """A client that notes the filters of each ``subscribe()`` and otherwise delegates."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.filters: list[tuple[str, ...]] = []
        self.subscribed = trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def subscribe(self, *filters: str, **options: Any) -> Any:
        self.filters.append(filters)
        self.subscribed.set()
        return self._client.subscribe(*filters, **options)


async def _first_subscription(run: Any, client: Recording) -> tuple[str, ...]:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await client.subscribed.wait()
            nursery.cancel_scope.cancel()
    return client.filters[0]


def _config(dispatch: str) -> AgentConfig:
    return AgentConfig(role="testing", agent_id="a1", swarm="s", dispatch=dispatch)


async def test_filter_counts_on_the_page_are_the_codes() -> None:
    bus = MemoryBus()
    executors = simulated_registry()
    broadcast = Recording(bus.open("a1"))
    agent = Agent(_config("broadcast"), broadcast, executors=executors)
    n_broadcast = len(await _first_subscription(agent.run, broadcast))

    dispatched = Recording(bus.open("a2"))
    agent = Agent(_config("dispatcher"), dispatched, executors=executors)
    n_dispatched = len(await _first_subscription(agent.run, dispatched))

    session = Recording(bus.open("sheri-dispatch.s"))
    shell = DispatcherShell(_config("dispatcher"), session, bus.open("r"), 1)
    n_dispatcher = len(await _first_subscription(shell.run, session))

    for phrase in (
        f"{n_broadcast} filters (broadcast), {n_dispatched} (dispatch mode)",
        f"{n_dispatcher} on the dispatcher's session",
        f"8 filters per SUBSCRIBE (a broadcast agent sends {n_broadcast}",
        f"one subscription has {n_broadcast} filters",
        f"its dispatcher {n_dispatcher})",
        f"the dispatcher's session needs {n_dispatcher}",
    ):
        assert phrase in DOC, phrase
    assert n_broadcast > 8 >= n_dispatched  # what the page concludes for AWS IoT Core
