"""A claim store on two bridged mosquittos (issue 11): the same contention as
tests/test_divergence_bridge.py (3 agents on each broker, 300 tasks published on one),
now with a Redis or a PostgreSQL store deciding, in either dispatch mode (broadcast: each
agent's claims; dispatcher: the election's terms and each assignment). Every task runs
exactly once and has exactly one final outcome, as seen on both brokers; nothing is
reported; a store that goes away holds new work back; a dead holder's task, and a dead
dispatcher's term, are taken over through the store."""

from __future__ import annotations

import collections
import json
import logging
import secrets
import signal
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
import trio
from bridge_helpers import (
    TASKS,
    Watcher,
    bridge_swarm,
    counting_probe,
    log_waiter,
    watch_client,
)
from childproc import online_process
from store_helpers import (
    create_database,
    drop_database,
    pg_url,
    require_postgres,
    set_accepting,
)
from swarm_helpers import AGENT_PROC

from sheri_trio.executors import ExecutorRegistry
from sheri_trio.stores import Verdict, open_store, parse_store_url
from sheri_trio.swarm import AgentConfig, Topics, encode, run_agent
from sheri_trio.testing import RedisServer

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from sheri_trio.executors import TaskContext
    from sheri_trio.stores import StoreConfig
    from sheri_trio.testing import BridgedBrokers, MosquittoBroker

#: both dispatch modes decide through the store
MODES = pytest.mark.parametrize("dispatch", ["broadcast", "dispatcher"])


@pytest.fixture(params=["redis", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreConfig]:
    if request.param == "redis":
        with RedisServer(tmp_path / "redis") as server:
            yield parse_store_url(server.url(), source="flag")
        return
    require_postgres()
    name = create_database()
    try:
        yield parse_store_url(pg_url(name), source="flag")
    finally:
        drop_database(name)


@MODES
async def test_with_a_store_every_task_runs_once_on_a_bridge(
    bridged: BridgedBrokers, store: StoreConfig, dispatch: str
) -> None:
    swarm = f"stored-{secrets.token_hex(3)}"
    registry, executions = counting_probe({"ran": True})
    ids = [f"t{n:03d}" for n in range(TASKS)]
    options = {"heartbeat_interval": 1.0, "lease_time": 10.0, "max_tasks": 4}
    with trio.fail_after(90):
        async with bridge_swarm(
            bridged, swarm, registry, dispatch=dispatch, store=store, **options
        ) as run:
            assert all(agent.store is not None for agent in run.agents)
            await run.publish_tasks(ids)
            await run.wait_outcomes(ids)
            await run.quiet()
    assert executions == dict.fromkeys(ids, 1)  # each ran exactly once
    for watcher in run.watchers:
        assert all(len(watcher.outcomes[t]) == 1 for t in ids)  # one accepted outcome each
        assert [r for r in watcher.reports if r.get("kind") == "divergence"] == []
    first, second = (w.holders for w in run.watchers)
    assert first == second  # one holder per attempt, whichever broker one asks
    holders = {agent for outcomes in run.watchers[0].outcomes.values() for _, agent in outcomes}
    assert len(holders) > 1  # the work was shared
    print(f"{dispatch}/{store.kind}: {sum(executions.values())} executions of {TASKS} tasks")


class Outage:
    """A store of the test's own that can go away and come back: a redis-server
    (stopped, then started empty: no persistence) or a PostgreSQL database (connections
    refused and the open ones ended, then allowed again: its data kept)."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self._redis: RedisServer | None = None
        self._database = ""
        if kind == "redis":
            self._redis = RedisServer(tmp_path / "redis")
            self._redis.start()
            self.config = parse_store_url(self._redis.url(), source="flag")
        else:
            require_postgres()
            self._database = create_database()
            self.config = parse_store_url(pg_url(self._database), source="flag")

    async def stop(self) -> None:
        if self._redis is not None:
            self._redis.stop()
        else:
            await trio.to_thread.run_sync(set_accepting, self._database, False)

    async def start(self) -> None:
        if self._redis is not None:
            self._redis.start()
        else:
            await trio.to_thread.run_sync(set_accepting, self._database, True)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.stop()
        else:
            drop_database(self._database)


@pytest.fixture(params=["redis", "postgresql"])
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outage]:
    store = Outage(request.param, tmp_path)
    try:
        yield store
    finally:
        store.close()


@MODES
async def test_a_store_that_stops_holds_new_work_back_then_comes_back(
    bridged: BridgedBrokers, outage: Outage, request: pytest.FixtureRequest, dispatch: str
) -> None:
    """On the bridged pair, an agent on each broker: the store goes away mid-run; no new
    work is taken (no fallback to the broker's order: broadcast claims nothing, the
    dispatcher assigns nothing), the outcome of a task running meanwhile waits; the store
    back (Redis: empty, so a dispatcher's term is gone and it steps down for a new one):
    every task runs once and has one outcome, as seen on both brokers."""
    swarm = f"outage-{secrets.token_hex(3)}"
    executions: collections.Counter[str] = collections.Counter()
    gate = trio.Event()  # the first task runs until the store is down
    running = trio.Event()

    async def work(ctx: TaskContext) -> dict[str, Any]:
        executions[ctx.task_id] += 1
        if ctx.task_id == "t00":
            running.set()
            await gate.wait()
        return {"ran": True}

    registry = ExecutorRegistry({"probe.run": work})
    logs = log_waiter(request)
    held_back = "no new tasks" if dispatch == "broadcast" else "no new assignments"
    with trio.fail_after(60):
        async with bridge_swarm(
            bridged, swarm, registry, per_broker=1, dispatch=dispatch, store=outage.config,
            heartbeat_interval=1.0, lease_time=10.0,
        ) as run:  # fmt: skip
            await run.publish_tasks(["t00"])
            await running.wait()
            await outage.stop()
            ids = [f"t{n:02d}" for n in range(1, 11)]
            await run.publish_tasks(ids)
            await logs.wait(f"claim store unavailable: {held_back}")
            gate.set()  # t00 ends while the store is down: its outcome waits
            await logs.wait("claim store unavailable: outcome waits")
            assert sum(executions[t] for t in ids) == 0  # nothing new taken meanwhile
            assert all("t00" not in w.outcomes for w in run.watchers)
            await outage.start()  # Redis: empty
            await run.wait_outcomes(["t00", *ids])
            await run.quiet()
    assert executions == dict.fromkeys(["t00", *ids], 1)
    for watcher in run.watchers:
        assert all(len(v) == 1 for v in watcher.outcomes.values())


@MODES
async def test_a_holder_re_asserts_its_hold_after_redis_restarts_empty(
    fresh_broker: MosquittoBroker,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    dispatch: str,
) -> None:
    """The holder's next renewal finds nothing and re-creates its hold (no other holder
    exists); the other agent does not take the task over (dispatcher mode: the
    dispatcher's term is gone too, it steps down and the next term keeps the holder); it
    runs once."""
    caplog.set_level(logging.INFO, logger="sheri_trio")
    swarm = f"empty-{secrets.token_hex(3)}"
    topics = Topics(swarm)
    executions: collections.Counter[str] = collections.Counter()
    gate, running = trio.Event(), trio.Event()

    async def work(ctx: TaskContext) -> dict[str, Any]:
        executions[ctx.task_id] += 1
        running.set()
        await gate.wait()
        return {"by": ctx.agent_id}

    watcher = Watcher()
    shutdown = trio.Event()
    logs = log_waiter(request)
    with RedisServer(tmp_path / "redis") as redis_server, trio.fail_after(60):
        store = parse_store_url(redis_server.url(), source="flag")
        async with trio.open_nursery() as nursery:
            client = await nursery.start(watch_client, fresh_broker, "watch")
            started = trio.Event()
            nursery.start_soon(watcher.run, client, topics, started)
            await started.wait()
            for i in range(2):
                config = AgentConfig(
                    dispatch=dispatch,
                    role="general",
                    agent_id=f"{swarm}-{i}",
                    swarm=swarm,
                    broker=fresh_broker.tcp_url,
                    heartbeat_interval=0.2,
                    lease_time=1.0,
                    store=store,
                )
                registry = ExecutorRegistry({"probe.run": work})
                await nursery.start(
                    partial(run_agent, config, executors=registry, shutdown=shutdown)
                )
            body = {"task_id": "t1", "type": "probe.run", "payload": {}}
            await client.publish(topics.tasks_new, encode(None, None, body), qos=1)
            await running.wait()
            redis_server.restart()  # empty
            await logs.wait("hold re-asserted in the claim store")
            if dispatch == "dispatcher":  # its term is gone: deposed, then a new one
                await logs.wait("dispatcher term 1 deposed: the claim store did not renew")
                await logs.wait(f"is the dispatcher of {swarm} (epoch 2)")  # epochs grow
            async with open_store(store, swarm) as probe:
                hold = await probe.hold("t1")
            assert hold is not None
            assert hold.live
            assert hold.attempt == 1
            gate.set()
            await watcher.wait(lambda: "t1" in watcher.outcomes)
            shutdown.set()
            nursery.cancel_scope.cancel()
    assert executions == {"t1": 1}
    ((attempt, holder),) = watcher.outcomes["t1"]
    assert (attempt, holder) == (1, hold.holder)


@MODES
async def test_an_outcome_stored_but_never_published_is_published_again(
    broker: MosquittoBroker, tmp_path: Path, dispatch: str
) -> None:
    """Its holder died between the store's finish and its publish: an agent that claims
    the task (a re-submission), or the dispatcher that assigns it, gets FINISHED and
    publishes the stored outcome."""
    swarm = f"ghost-{secrets.token_hex(3)}"
    topics = Topics(swarm)
    ran: list[str] = []

    async def work(ctx: TaskContext) -> dict[str, Any]:
        ran.append(ctx.task_id)
        return {}

    watcher = Watcher()
    shutdown = trio.Event()
    with RedisServer(tmp_path / "redis") as redis_server, trio.fail_after(30):
        store = parse_store_url(redis_server.url(), source="flag")
        lost = {"task_id": "t1", "agent_id": "ghost", "status": "success", "attempt": 1,
                "type": "probe.run", "result": {"n": 7}}  # fmt: skip
        async with open_store(store, swarm) as ghost:
            assert await ghost.claim("t1", 1, "ghost", 30.0) is Verdict.WON
            assert await ghost.finish("t1", 1, "ghost", lost)
        async with trio.open_nursery() as nursery:
            client = await nursery.start(watch_client, broker, "watch")
            started = trio.Event()
            nursery.start_soon(watcher.run, client, topics, started)
            await started.wait()
            config = AgentConfig(role="general", agent_id=f"{swarm}-0", swarm=swarm,
                                 broker=broker.tcp_url, store=store,
                                 dispatch=dispatch)  # fmt: skip
            registry = ExecutorRegistry({"probe.run": work})
            await nursery.start(partial(run_agent, config, executors=registry, shutdown=shutdown))
            body = {"task_id": "t1", "type": "probe.run", "payload": {}}
            await client.publish(topics.tasks_new, encode(None, None, body), qos=1)
            await watcher.wait(lambda: "t1" in watcher.outcomes)
            shutdown.set()
            nursery.cancel_scope.cancel()
    assert ran == []  # not run again
    assert watcher.outcomes["t1"] == {(1, "ghost")}


@MODES
async def test_a_task_published_on_both_brokers_runs_once_with_a_store(
    bridged: BridgedBrokers, store: StoreConfig, dispatch: str
) -> None:
    """The same task ids submitted on each broker at once (a duplicate task id, each
    side's agents seeing their own copy first): each runs once."""
    swarm = f"dup-{secrets.token_hex(3)}"
    registry, executions = counting_probe()
    ids = [f"d{n:02d}" for n in range(50)]
    with trio.fail_after(60):
        async with bridge_swarm(bridged, swarm, registry, dispatch=dispatch, store=store) as run:
            await run.publish_tasks(ids, on_both=True)
            await run.wait_outcomes(ids)
            await run.quiet()
    assert executions == dict.fromkeys(ids, 1)
    for watcher in run.watchers:
        assert all(len(watcher.outcomes[t]) == 1 for t in ids)


@MODES
async def test_a_crashed_holder_s_task_is_taken_over_once_through_the_store(
    bridged: BridgedBrokers, store: StoreConfig, dispatch: str
) -> None:
    """The holder (on the second broker) is killed mid-task; agents on the first broker
    take it over through the store once its lease ran out there: attempt 2 runs once.
    Dispatcher mode: the holder is the dispatcher too (it came first); its term is taken
    over through the store once its lease ran out, and the next dispatcher takes the
    task over."""
    swarm = f"crash-{secrets.token_hex(3)}"
    topics = Topics(swarm)
    first, second = bridged.brokers
    ran: list[tuple[str, int]] = []

    async def quick(ctx: TaskContext) -> dict[str, Any]:
        ran.append((ctx.agent_id, ctx.attempt))
        return {}

    watcher = Watcher()
    shutdown = trio.Event()
    survivors = [f"{swarm}-s{i}" for i in range(2)]
    url = store.url.replace(":***@", "@")  # no password in these stores
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            client = await nursery.start(watch_client, first, "watch")
            started = trio.Event()
            nursery.start_soon(watcher.run, client, topics, started)
            await started.wait()
            victim = (AGENT_PROC, second.tcp_url, f"{swarm}-v", swarm, dispatch, url)
            async with online_process(*victim) as proc:
                body = {"task_id": "t1", "type": "testing.run",
                        "payload": {"simulate_seconds": 60}}  # fmt: skip
                async with client.subscribe(topics.task_state("t1"), qos=1) as states:
                    await client.publish(topics.tasks_new, encode(None, None, body), qos=1)
                    while True:  # its claimed record is retained on the first broker too
                        state = json.loads((await states.receive()).payload)["payload"]
                        if state.get("state") in ("claimed", "running"):
                            break
                assert state["agent_id"] == f"{swarm}-v"
                for agent_id in survivors:
                    config = AgentConfig(
                        dispatch=dispatch,
                        role="testing", agent_id=agent_id, swarm=swarm, broker=first.tcp_url,
                        heartbeat_interval=0.25, lease_time=1.0, store=store,
                    )  # fmt: skip
                    registry = ExecutorRegistry({"testing.run": quick})
                    await nursery.start(
                        partial(run_agent, config, executors=registry, shutdown=shutdown)
                    )
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
            await watcher.wait(lambda: "t1" in watcher.outcomes)
            marker = secrets.token_hex(4)
            await client.publish(topics.broadcast, encode(None, None, {"marker": marker}))
            await watcher.wait(lambda: marker in watcher.markers)
            if dispatch == "dispatcher":
                async with open_store(store, swarm) as probe:
                    term = await probe.leader("dispatcher")
            shutdown.set()
            nursery.cancel_scope.cancel()
    ((attempt, holder),) = watcher.outcomes["t1"]
    assert attempt == 2
    assert holder in survivors
    assert ran == [(holder, 2)]  # once
    if dispatch == "dispatcher":  # the victim's term (epoch 1) was taken over
        assert term is not None
        assert term.holder in survivors
        assert term.epoch >= 2


async def test_two_dispatchers_cannot_both_serve_with_a_store(
    bridged: BridgedBrokers,
    store: StoreConfig,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    """tests/test_divergence_bridge.py's two dispatchers, with a store: a is the
    dispatcher (on the first broker); b, on the second, is made to see a vacancy (an
    offline status of a's term published there) and stands, but the store gives the term
    to a: b never serves, nothing is reported, and a's assignments go on."""
    caplog.set_level(logging.INFO, logger="sheri_trio")
    swarm = f"leaders-{secrets.token_hex(3)}"
    first, second = bridged.brokers
    logs = log_waiter(request)
    registry, executions = counting_probe()
    options = {"heartbeat_interval": 0.5, "lease_time": 2.0, "store": store}
    with trio.fail_after(60):
        async with bridge_swarm(bridged, swarm, per_broker=0) as run:
            for agent_id, broker in ((f"{swarm}-a", first), (f"{swarm}-b", second)):
                config = AgentConfig(
                    role="general", agent_id=agent_id, swarm=swarm, broker=broker.tcp_url,
                    **options,
                )  # fmt: skip
                await run.start_agent(config, registry)
            topics = run.topics
            other = await run.nursery.start(watch_client, second, f"forge-{secrets.token_hex(3)}")
            async with other.subscribe(topics.dispatch_status, qos=1) as statuses:
                status = json.loads((await statuses.receive()).payload)["payload"]
            assert (status["agent_id"], status["status"], status["epoch"]) == (
                f"{swarm}-a", "online", 1
            )  # fmt: skip
            offline = {"agent_id": status["agent_id"], "epoch": 1, "status": "offline"}
            await other.publish(
                topics.dispatch_status, encode(status["agent_id"], "general", offline), retain=True
            )
            await logs.wait(f"{swarm}-b: the claim store gives the dispatcher's term to another")
            ids = [f"t{n}" for n in range(10)]
            await run.publish_tasks(ids)  # a still assigns
            await run.wait_outcomes(ids)
            await run.quiet()
            async with open_store(store, swarm) as probe:
                term = await probe.leader("dispatcher")
    assert term is not None
    assert (term.holder, term.epoch) == (f"{swarm}-a", 1)
    assert not logs.seen(f"{swarm}-b is the dispatcher")
    assert executions == dict.fromkeys(ids, 1)
    for watcher in run.watchers:
        assert [r for r in watcher.reports if r.get("incident") == "second_leader"] == []


async def test_a_dispatcher_without_its_store_for_a_lease_steps_down(
    bridged: BridgedBrokers,
    outage: Outage,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Dispatcher mode on the bridged pair: the store goes away for longer than a lease;
    the dispatcher, unable to renew its term, steps down (no fallback: nobody serves
    without a term); the store back, a candidate gets the next term (epoch 2) and every
    task published then runs once."""
    caplog.set_level(logging.INFO, logger="sheri_trio")
    swarm = f"deposed-{secrets.token_hex(3)}"
    logs = log_waiter(request)
    registry, executions = counting_probe()
    with trio.fail_after(60):
        async with bridge_swarm(
            bridged, swarm, registry, per_broker=1, dispatch="dispatcher", store=outage.config,
            heartbeat_interval=0.2, lease_time=1.0,
        ) as run:  # fmt: skip
            await logs.wait(f"is the dispatcher of {swarm} (epoch 1)")
            await outage.stop()
            await logs.wait("dispatcher term 1 deposed: the claim store did not answer")
            await logs.wait("cannot stand for dispatcher")  # no term without the store
            assert not logs.seen(f"is the dispatcher of {swarm} (epoch 2)")
            await outage.start()
            await logs.wait(f"is the dispatcher of {swarm} (epoch 2)")
            ids = [f"t{n}" for n in range(20)]
            await run.publish_tasks(ids)
            await run.wait_outcomes(ids)
            await run.quiet()
    assert executions == dict.fromkeys(ids, 1)
    for watcher in run.watchers:
        assert all(len(watcher.outcomes[t]) == 1 for t in ids)
