"""A swarm on two bridged mosquittos (issue 11), for tests/test_divergence_bridge.py and
tests/test_stores_bridge.py: a watcher on each broker (claims, outcomes, error reports,
markers), agents on both sides of the bridge (or all on the first), tasks published on
one broker or on both at once, and the wait until both brokers are quiet."""

from __future__ import annotations

import collections
import json
import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from sheri_trio.executors import ExecutorRegistry
from sheri_trio.mqtt import open_client
from sheri_trio.swarm import AgentConfig, Topics, encode, run_agent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable

    import pytest

    from sheri_trio.executors import TaskContext
    from sheri_trio.mqtt import Client
    from sheri_trio.swarm import Agent
    from sheri_trio.testing import BridgedBrokers, MosquittoBroker

#: the issue's reproduction: 300 tasks, 3 agents on each broker
TASKS = 300
PER_BROKER = 3


def counting_probe(
    result: dict[str, Any] | None = None,
) -> tuple[ExecutorRegistry, collections.Counter[str]]:
    """A registry whose ``probe.run`` counts its executions per task id (yielding once,
    then returning ``result``), and that count."""
    executions: collections.Counter[str] = collections.Counter()

    async def count(ctx: TaskContext) -> dict[str, Any]:
        executions[ctx.task_id] += 1
        await trio.lowlevel.checkpoint()
        return dict(result or {})

    return ExecutorRegistry({"probe.run": count}), executions


class Watcher:
    """Outcomes and error reports seen on one broker."""

    def __init__(self) -> None:
        self.outcomes: dict[str, set[tuple[int, str]]] = collections.defaultdict(set)
        #: (task, attempt) -> the first claim this broker delivered: its holder here
        self.holders: dict[tuple[str, int], str] = {}
        self.reports: list[dict[str, Any]] = []
        self.markers: set[str] = set()
        self.changed = trio.Event()

    async def run(self, client: Client, topics: Topics, started: trio.Event) -> None:
        async with client.subscribe(
            topics.tasks_assigned,
            topics.tasks_complete,
            topics.tasks_failed,
            topics.errors,
            topics.broadcast,
            qos=1,
        ) as messages:
            started.set()
            async for m in messages:
                p = json.loads(m.payload)["payload"]
                if m.topic == topics.errors:
                    self.reports.append(p)
                elif m.topic == topics.broadcast:
                    self.markers.add(p["marker"])
                elif m.topic == topics.tasks_assigned:
                    self.holders.setdefault((p["task_id"], p["attempt"]), p["agent_id"])
                else:
                    self.outcomes[p["task_id"]].add((p["attempt"], p["agent_id"]))
                self.changed.set()
                self.changed = trio.Event()

    async def wait(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self.changed.wait()


class LogWaiter(logging.Handler):
    """Wakes a waiter on every log record (handled synchronously, in the trio thread)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, text: str) -> None:
        while not any(text in m for m in self.messages):
            await self._changed.wait()

    def seen(self, text: str) -> bool:
        return any(text in m for m in self.messages)


def log_waiter(request: pytest.FixtureRequest) -> LogWaiter:
    """A :class:`LogWaiter` on ``sheri_trio``'s logs for the test's duration."""
    logs = LogWaiter()
    logger = logging.getLogger("sheri_trio")
    logger.addHandler(logs)
    request.addfinalizer(lambda: logger.removeHandler(logs))
    return logs


async def watch_client(
    broker: MosquittoBroker, client_id: str, *, task_status: trio.TaskStatus[Client]
) -> None:
    """A plain client of ``broker`` for the test (``nursery.start`` it)."""
    async with open_client(broker.tcp_url, client_id=client_id) as client:
        task_status.started(client)
        await trio.sleep_forever()


@dataclass
class BridgeSwarm:
    """What :func:`bridge_swarm` started: a client and a watcher per broker, the agents."""

    topics: Topics
    brokers: tuple[MosquittoBroker, MosquittoBroker]
    nursery: trio.Nursery
    shutdown: trio.Event
    clients: list[Client] = field(default_factory=list)
    watchers: list[Watcher] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)

    async def start_agent(
        self, config: AgentConfig, executors: ExecutorRegistry | None = None
    ) -> Agent:
        agent: Agent = await self.nursery.start(
            partial(run_agent, config, executors=executors, shutdown=self.shutdown)
        )
        self.agents.append(agent)
        return agent

    async def publish_tasks(
        self, ids: Iterable[str], task_type: str = "probe.run", *, on_both: bool = False
    ) -> None:
        """Each task on the first broker (``on_both``: on each broker at once, a
        duplicate task id)."""
        for task_id in ids:
            data = encode(None, None, {"task_id": task_id, "type": task_type, "payload": {}})
            async with trio.open_nursery() as at_once:
                for client in self.clients if on_both else self.clients[:1]:
                    at_once.start_soon(partial(client.publish, self.topics.tasks_new, data, qos=1))

    async def wait_outcomes(self, ids: Iterable[str]) -> None:
        """Until every one of ``ids`` has an outcome, as seen on both brokers."""
        wanted = list(ids)
        for watcher in self.watchers:
            await watcher.wait(lambda w=watcher: all(t in w.outcomes for t in wanted))

    async def quiet(self) -> None:
        """Until a marker from each broker has reached both watchers: what was published
        before it, on either broker, has arrived."""
        for client in self.clients:
            marker = secrets.token_hex(4)
            await client.publish(self.topics.broadcast, encode(None, None, {"marker": marker}))
            for watcher in self.watchers:
                await watcher.wait(lambda w=watcher, m=marker: m in w.markers)


@asynccontextmanager
async def bridge_swarm(
    bridged: BridgedBrokers,
    swarm: str,
    executors: ExecutorRegistry | None = None,
    *,
    per_broker: int = PER_BROKER,
    split: bool = True,
    **config: Any,
) -> AsyncIterator[BridgeSwarm]:
    """A watcher on each broker, then ``per_broker`` agents ``{swarm}-a0...`` on the
    first and ``{swarm}-b0...`` on the second (``split=False``: all on the first), of
    role ``general`` with ``config``'s settings. On the way out the agents are told to
    leave and everything is cancelled."""
    brokers: tuple[MosquittoBroker, MosquittoBroker] = bridged.brokers
    async with trio.open_nursery() as nursery:
        run = BridgeSwarm(Topics(swarm), brokers, nursery, trio.Event())
        for broker in brokers:
            watcher = Watcher()
            client = await nursery.start(watch_client, broker, f"watch-{secrets.token_hex(3)}")
            started = trio.Event()
            nursery.start_soon(watcher.run, client, run.topics, started)
            await started.wait()
            run.clients.append(client)
            run.watchers.append(watcher)
        for side, broker in enumerate(brokers):
            for i in range(per_broker):
                options: dict[str, Any] = {"role": "general", **config}
                agent_config = AgentConfig(
                    agent_id=f"{swarm}-{'ab'[side]}{i}",
                    swarm=swarm,
                    broker=(broker if split else brokers[0]).tcp_url,
                    **options,
                )
                await run.start_agent(agent_config, executors)
        yield run
        run.shutdown.set()
        nursery.cancel_scope.cancel()
