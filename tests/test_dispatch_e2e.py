"""Dispatch mode end to end on a real mosquitto: real agents, one of them elected
dispatcher (docs/dispatch.md). Submissions are the prototype's mosquitto_pub JSON.

A killed holder and a broker restart mid-burst are in tests/test_agent.py, which runs
every behaviour test under both dispatch rules."""

from __future__ import annotations

import json
import signal
from collections import Counter
from typing import TYPE_CHECKING, Any

import trio
from childproc import online_process
from swarm_helpers import (
    AGENT_PROC,
    Counting,
    agent_config,
    follow_outcomes,
    start_agents,
    submission,
)

from sheri_trio.executors import ExecutorRegistry, TaskPayloadError
from sheri_trio.mqtt import open_client
from sheri_trio.stores import parse_store_url
from sheri_trio.swarm._dispatching import DispatcherShell
from sheri_trio.swarm._messages import encode
from sheri_trio.testing import RedisServer

if TYPE_CHECKING:
    from pathlib import Path

    from sheri_trio.executors import TaskContext
    from sheri_trio.swarm import AgentConfig
    from sheri_trio.testing import MosquittoBroker


def _config(
    broker: MosquittoBroker, role: str, agent_id: str, swarm: str, **kw: Any
) -> AgentConfig:
    return agent_config(broker, role, agent_id, swarm, dispatch="dispatcher", **kw)


async def test_five_agents_300_tasks_each_runs_once_within_capacity(
    broker: MosquittoBroker,
) -> None:
    swarm = "t-dispatch-contention"
    counting = Counting(delay=0.002)
    ids = [f"c-{i}" for i in range(300)]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            configs = [
                _config(broker, "testing", f"d-agent-{i}", swarm, max_tasks=3) for i in range(5)
            ]
            await start_agents(nursery, configs, executors=counting.registry, shutdown=shutdown)

            async def publish(watcher: Any) -> None:
                for task_id in ids:
                    await watcher.publish(f"{swarm}/tasks/new", submission(task_id), qos=1)

            finals, _ = await follow_outcomes(broker, swarm, len(ids), publish)
            shutdown.set()
    assert set(finals) == set(ids)
    assert set(finals.values()) == {1}
    assert set(counting.executions.values()) == {1}
    assert max(counting.peak.values()) <= 3  # never beyond an agent's max_tasks
    assert len(counting.peak) >= 2  # the work was spread


async def test_duplicate_ids_run_once_and_a_role_nobody_has_waits_for_one(
    broker: MosquittoBroker,
) -> None:
    swarm = "t-dispatch-dup"
    counting = Counting()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            tester = _config(broker, "testing", "only-tester", swarm)
            await start_agents(nursery, [tester], executors=counting.registry, shutdown=shutdown)
            async with open_client(broker.tcp_url) as watcher:
                async with watcher.subscribe(f"{swarm}/tasks/complete") as msgs:
                    for _ in range(3):
                        await watcher.publish(f"{swarm}/tasks/new", submission("dup-1"), qos=1)
                    await watcher.publish(
                        f"{swarm}/tasks/new", submission("deploy-1", "deployment.deploy"), qos=1
                    )
                    m = await msgs.receive()
                    assert json.loads(m.payload)["payload"]["task_id"] == "dup-1"
                    with trio.move_on_after(1.5):  # nobody can deploy: it waits, queued
                        m = await msgs.receive()
                        raise AssertionError(f"unexpected outcome {m.payload!r}")
                    deployer = _config(broker, "deployment", "late-deployer", swarm)
                    await start_agents(
                        nursery, [deployer], executors=counting.registry, shutdown=shutdown
                    )
                    m = await msgs.receive()
                    late = json.loads(m.payload)["payload"]
                    with trio.move_on_after(1.0):
                        m = await msgs.receive()
                        raise AssertionError(f"a second outcome {m.payload!r}")
            shutdown.set()
    assert (late["task_id"], late["agent_id"]) == ("deploy-1", "late-deployer")
    assert counting.executions == Counter({"dup-1": 1, "deploy-1": 1})


async def test_the_dispatcher_publishes_its_view_of_the_swarm(broker: MosquittoBroker) -> None:
    """What monitoring.alerts reads in dispatch mode: agents and outcomes, retained."""
    swarm = "t-dispatch-view"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            configs = [_config(broker, "monitoring", f"viewer-{i}", swarm) for i in range(3)]
            await start_agents(nursery, configs, shutdown=shutdown)
            async with open_client(broker.tcp_url) as watcher:
                async with watcher.subscribe(f"{swarm}/dispatch/view") as views:
                    async for m in views:
                        view = json.loads(m.payload)["payload"]
                        if len(view["agents"]) == 2 and all(a["online"] for a in view["agents"]):
                            break
            shutdown.set()
    assert {a["role"] for a in view["agents"]} == {"monitoring"}
    assert view["outcomes"] == {"completed": 0, "failed": 0}
    assert view["epoch"] >= 1


async def test_the_dispatcher_killed_mid_burst_loses_nothing_and_runs_nothing_twice(
    broker: MosquittoBroker,
) -> None:
    """kill -9 of the agent that is the dispatcher while 300 tasks are in flight: another
    agent is elected and every task ends with exactly one outcome."""
    swarm = "t-dispatch-kill-dispatcher"
    counting = Counting(delay=0.005)
    ids = [f"k-{i}" for i in range(300)]
    finals: Counter[str] = Counter()
    with trio.fail_after(90):
        async with open_client(broker.tcp_url) as watcher:
            async with (
                watcher.subscribe(f"{swarm}/dispatch/status") as statuses,
                watcher.subscribe(f"{swarm}/tasks/complete", f"{swarm}/tasks/failed") as outs,
            ):
                async with online_process(
                    AGENT_PROC, broker.tcp_url, "first", swarm, "dispatcher"
                ) as proc:
                    async for m in statuses:  # the first agent became the dispatcher
                        status = json.loads(m.payload)["payload"]
                        if status.get("status") == "online":
                            assert status["agent_id"] == "first"
                            break
                    async with trio.open_nursery() as nursery:
                        shutdown = trio.Event()
                        heirs = [_config(broker, "testing", f"heir-{i}", swarm) for i in range(2)]
                        await start_agents(
                            nursery, heirs, executors=counting.registry, shutdown=shutdown
                        )
                        for n, task_id in enumerate(ids):
                            await watcher.publish(f"{swarm}/tasks/new", submission(task_id), qos=1)
                            if n == 100:
                                proc.send_signal(signal.SIGKILL)
                        await proc.wait()
                        async for m in statuses:  # the place is taken again
                            status = json.loads(m.payload)["payload"]
                            if status.get("status") == "online" and status["agent_id"] != "first":
                                break
                        while len(finals) < len(ids):
                            m = await outs.receive()
                            finals[json.loads(m.payload)["payload"]["task_id"]] += 1
                        with trio.move_on_after(1.0):  # nothing more comes
                            m = await outs.receive()
                            finals[json.loads(m.payload)["payload"]["task_id"]] += 1
                        shutdown.set()
    assert set(finals) == set(ids)
    assert set(finals.values()) == {1}
    assert all(n == 1 for n in counting.executions.values())
    assert status["epoch"] >= 2


async def test_an_agent_killed_between_receiving_and_starting_never_runs_that_attempt(
    broker: MosquittoBroker,
) -> None:
    """The assignment reaches a frozen agent, which is then killed: the dispatcher revokes
    attempt 1 and queues attempt 2 (only that agent may take it, assigned_to); the agent,
    started again on its persistent session, reads its backlog first and runs attempt 2
    only: one outcome, attempt 1 never started."""
    swarm = "t-dispatch-kill-between"
    events: list[tuple[str, dict[str, Any]]] = []
    with trio.fail_after(90):
        async with open_client(broker.tcp_url) as watcher:
            async with (
                watcher.subscribe(f"{swarm}/dispatch/status") as statuses,
                watcher.subscribe(f"{swarm}/tasks/#") as tasks,
                trio.open_nursery() as nursery,
            ):
                shutdown = trio.Event()
                dispatching = _config(broker, "testing", "dispatching-one", swarm)
                await start_agents(nursery, [dispatching], shutdown=shutdown)
                async for m in statuses:
                    if json.loads(m.payload)["payload"].get("status") == "online":
                        break

                async def until(pred: Any) -> dict[str, Any]:
                    async for m in tasks:
                        p = json.loads(m.payload)["payload"] if m.payload else {}
                        events.append((m.topic, p))
                        if pred(m.topic, p):
                            return p
                    raise AssertionError("subscription ended")

                victim = (AGENT_PROC, broker.tcp_url, "victim", swarm, "dispatcher")
                async with online_process(*victim) as first:
                    first.send_signal(signal.SIGSTOP)
                    body = {"payload": {"task_id": "between-1", "type": "testing.run",
                                        "assigned_to": "victim"}}  # fmt: skip
                    await watcher.publish(f"{swarm}/tasks/new", json.dumps(body), qos=1)
                    await until(lambda t, p: t.endswith("/state/between-1")
                                and p.get("state") == "assigned")  # fmt: skip
                    first.send_signal(signal.SIGKILL)
                    await first.wait()
                    await until(
                        lambda t, p: (
                            t.endswith("/state/between-1")
                            and (p.get("state"), p.get("attempt")) == ("queued", 2)
                        )
                    )
                async with online_process(*victim):  # started again, on its session
                    done = await until(lambda t, p: t.endswith(("/complete", "/failed")))
                    with trio.move_on_after(1.0):
                        await until(lambda t, p: t.endswith(("/complete", "/failed")))
                shutdown.set()
    assert (done["task_id"], done["agent_id"], done["attempt"]) == ("between-1", "victim", 2)
    outcomes = [p for t, p in events if t.endswith(("/complete", "/failed"))]
    assert len(outcomes) == 1
    started = [
        p["attempt"] for t, p in events if t.endswith("/progress") and p.get("event") == "start"
    ]
    assert started == [2]  # attempt 1 never started


async def test_a_submissions_fields_keep_their_meaning_in_dispatch_mode(
    broker: MosquittoBroker,
) -> None:
    """What tests/test_agent_timing.py checks of the broadcast rule on the memory bus,
    checked here through the dispatcher: ``assigned_to``, expiry, an invalid payload (one
    failure, no retries), a retried failure, an invalid submission (failed by the
    dispatcher) and an unknown type (a general agent's)."""
    swarm = "t-dispatch-fields"
    executions: Counter[str] = Counter()
    ran_on: dict[str, str] = {}

    async def script(ctx: TaskContext) -> dict[str, Any]:
        executions[ctx.task_id] += 1
        ran_on[ctx.task_id] = ctx.agent_id
        p = ctx.payload if isinstance(ctx.payload, dict) else {}
        if p.get("invalid"):
            raise TaskPayloadError("payload refused by the executor")
        if ctx.try_number <= p.get("fail", 0):
            raise RuntimeError(f"failure on try {ctx.try_number}")
        return {"ok": True}

    registry = ExecutorRegistry()
    registry.fallback = script
    bad_priority = {"task_id": "bad-priority", "type": "testing.run", "priority": "urgent"}
    to_b = {"task_id": "to-b", "type": "testing.run", "assigned_to": "f-b"}
    expired = {"task_id": "expired", "type": "testing.run", "expires_at": "2000-01-01T00:00:00Z"}
    submissions = [
        json.dumps({"id": "m1", "payload": to_b}),
        json.dumps({"id": "m2", "payload": expired}),
        submission("invalid", invalid=True),
        submission("flaky", fail=1),
        json.dumps({"id": "m3", "payload": bad_priority}),
        submission("odd", "custom.thing"),
    ]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            configs = [
                _config(broker, "testing", "f-a", swarm),
                _config(broker, "testing", "f-b", swarm),
                _config(broker, "general", "f-g", swarm),
            ]
            await start_agents(nursery, configs, executors=registry, shutdown=shutdown)

            async def publish(watcher: Any) -> None:
                for body in submissions:
                    await watcher.publish(f"{swarm}/tasks/new", body, qos=1)

            finals, records = await follow_outcomes(broker, swarm, len(submissions), publish)
            shutdown.set()
    assert set(finals.values()) == {1}
    outcome = {r["task_id"]: (r["status"], r.get("reason")) for r in records}
    assert outcome == {
        "to-b": ("success", None),
        "expired": ("failed", "expired"),
        "invalid": ("failed", "invalid_payload"),
        "flaky": ("success", None),
        "bad-priority": ("failed", "invalid_task"),
        "odd": ("success", None),
    }
    assert executions == Counter({"to-b": 1, "invalid": 1, "flaky": 2, "odd": 1})
    assert (ran_on["to-b"], ran_on["odd"]) == ("f-b", "f-g")


async def test_an_agent_refuses_the_inbox_messages_of_an_older_dispatcher_term(
    broker: MosquittoBroker,
) -> None:
    """docs/dispatch.md, "Fencing by epoch": the elected dispatcher's inbox messages
    carry its term's epoch; an assignment of an older epoch (a deposed dispatcher's,
    played by the test) is refused: reported on {swarm}/errors, never run, and the
    current term's tasks still run."""
    swarm = "t-dispatch-epoch"
    counting = Counting()
    inbox = f"{swarm}/agents/fenced-1/inbox"
    seen: list[tuple[str, dict[str, Any]]] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            config = _config(broker, "testing", "fenced-1", swarm)
            await start_agents(nursery, [config], executors=counting.registry, shutdown=shutdown)
            async with open_client(broker.tcp_url) as watcher:
                topics = ("dispatch/status", "agents/fenced-1/inbox", "errors", "tasks/complete")
                async with watcher.subscribe(*[f"{swarm}/{t}" for t in topics]) as msgs:

                    async def until(topic: str, task_id: str | None = None) -> dict[str, Any]:
                        async for m in msgs:
                            payload: dict[str, Any] = json.loads(m.payload)["payload"]
                            seen.append((m.topic, payload))
                            if m.topic == f"{swarm}/{topic}" and (
                                task_id is None or payload.get("task_id") == task_id
                            ):
                                return payload
                        raise AssertionError("subscription ended")

                    status = await until("dispatch/status")
                    epoch = status["epoch"]
                    await watcher.publish(f"{swarm}/tasks/new", submission("now-1"), qos=1)
                    await until("tasks/complete", "now-1")
                    stale = {
                        "kind": "assignment",
                        "task_id": "old-1",
                        "attempt": 1,
                        "epoch": epoch - 1,
                        "task": {"task_id": "old-1", "type": "testing.run"},
                    }
                    await watcher.publish(inbox, encode("deposed", "general", stale), qos=1)
                    report = await until("errors", "old-1")
                    await watcher.publish(f"{swarm}/tasks/new", submission("now-2"), qos=1)
                    await until("tasks/complete", "now-2")
            shutdown.set()
    assert status["status"] == "online"
    assigned = [p for t, p in seen if t == inbox and p.get("kind") == "assignment"]
    assert [(p["task_id"], p.get("epoch")) for p in assigned] == [
        ("now-1", epoch),
        ("old-1", epoch - 1),
        ("now-2", epoch),
    ]
    assert report["error"] == (
        f"assignment from a deposed dispatcher (epoch {epoch - 1}; current epoch {epoch})"
    )
    assert report["reported_by"] == "fenced-1"
    assert counting.executions == {"now-1": 1, "now-2": 1}


async def test_a_second_dispatcher_of_an_older_epoch_stops_no_run_and_starts_none(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """Two dispatchers serving at once, as a deposed one that has not noticed yet may
    (docs/stores.md, "Still to do", item 3; on a bridge each has its own session), played
    on one broker: the elected term (from Redis: epoch 1) and a second DispatcherShell of
    epoch 0 on another client id, without a store (its assignments go out at once). It
    hands every submission to an agent and revokes (not_holder) each claim that does not
    match its own record; the agents refuse all of it, so every task runs once, attempt
    1, from the elected term's assignment."""
    swarm = "t-dispatch-two-terms"
    counting = Counting(delay=0.05)
    ids = [f"two-{i}" for i in range(30)]
    with RedisServer(tmp_path / "redis") as redis_server, trio.fail_after(60):
        store = parse_store_url(redis_server.url(), source="flag")
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            configs = [
                _config(broker, "testing", f"two-agent-{i}", swarm, store=store, max_tasks=3)
                for i in range(2)
            ]
            agents = await start_agents(
                nursery, configs, executors=counting.registry, shutdown=shutdown
            )
            deposed = _config(broker, "general", "deposed", swarm)
            async with (
                open_client(broker.tcp_url, client_id="deposed-dispatch", manual_ack=True) as dc,
                open_client(broker.tcp_url, client_id="deposed-reader") as reader,
            ):
                shell = DispatcherShell(deposed, dc, reader, 0)
                online = trio.Event()
                shell.on_online = online.set
                nursery.start_soon(shell.run)
                await online.wait()
                # two heartbeats of each agent since it subscribed: it knows their slots
                async with (
                    open_client(broker.tcp_url) as hb,
                    hb.subscribe(f"{swarm}/agents/heartbeat") as beats,
                ):
                    seen: Counter[str] = Counter()
                    while min((seen[c.agent_id] for c in configs), default=0) < 2:
                        beat = json.loads((await beats.receive()).payload)["payload"]
                        seen[beat["agent_id"]] += 1

                async def publish(watcher: Any) -> None:
                    for task_id in ids:
                        await watcher.publish(f"{swarm}/tasks/new", submission(task_id), qos=1)

                finals, records = await follow_outcomes(broker, swarm, len(ids), publish)
                shutdown.set()
                nursery.cancel_scope.cancel()
    assert finals == dict.fromkeys(ids, 1)
    assert {(r["status"], r["attempt"]) for r in records} == {("success", 1)}
    assert counting.executions == dict.fromkeys(ids, 1)
    assert shell.core.counters["assigned"] > 0  # the second dispatcher did send
    refused = sum(a.scheduler.counters["stale_epoch"] for a in agents)
    assert refused >= shell.core.counters["assigned"]
