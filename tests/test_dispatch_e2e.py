"""Dispatch mode end to end on a real mosquitto: real agents, one of them elected
dispatcher (docs/dispatch.md). Submissions are the prototype's mosquitto_pub JSON."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import trio
from childproc import read_line

from sheri_trio.executors import ExecutorRegistry, TaskContext
from sheri_trio.mqtt import open_client
from sheri_trio.swarm import AgentConfig, run_agent

if TYPE_CHECKING:
    from sheri_trio.testing import MosquittoBroker


def _config(
    broker: MosquittoBroker, role: str, agent_id: str, swarm: str, **kw: Any
) -> AgentConfig:
    options: dict[str, Any] = {
        "heartbeat_interval": 0.5,
        "lease_time": 2.0,
        "grace_period": 2.0,
        "retry_initial_delay": 0.01,
        "dispatch": "dispatcher",
        "executor_config": {"executors": {"simulate": True}},
    }
    options.update(kw)
    return AgentConfig(role=role, agent_id=agent_id, swarm=swarm, broker=broker.tcp_url, **options)


class Counting:
    """An executor for every type that counts executions and concurrency per agent."""

    def __init__(self, delay: float = 0.0) -> None:
        self.executions: Counter[str] = Counter()
        self.running: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.delay = delay
        self.registry = ExecutorRegistry()
        self.registry.fallback = self

    async def __call__(self, ctx: TaskContext) -> dict[str, Any]:
        self.executions[ctx.task_id] += 1
        self.running[ctx.agent_id] += 1
        self.peak[ctx.agent_id] = max(self.peak[ctx.agent_id], self.running[ctx.agent_id])
        try:
            if self.delay:
                await trio.sleep(self.delay)
        finally:
            self.running[ctx.agent_id] -= 1
        return {"ok": True}


def submission(task_id: str, task_type: str = "testing.run") -> str:
    return json.dumps({"id": f"msg_{task_id}", "payload": {"task_id": task_id, "type": task_type}})


async def follow_outcomes(
    broker: MosquittoBroker, swarm: str, expected: int, publish: Any
) -> Counter[str]:
    finals: Counter[str] = Counter()
    async with open_client(broker.tcp_url) as watcher:
        async with watcher.subscribe(f"{swarm}/tasks/complete", f"{swarm}/tasks/failed") as msgs:
            await publish(watcher)
            while sum(finals.values()) < expected:
                m = await msgs.receive()
                finals[json.loads(m.payload)["payload"]["task_id"]] += 1
    return finals


async def test_five_agents_300_tasks_each_runs_once_within_capacity(
    broker: MosquittoBroker,
) -> None:
    swarm = "t-dispatch-contention"
    counting = Counting(delay=0.002)
    ids = [f"c-{i}" for i in range(300)]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            for i in range(5):
                config = _config(broker, "testing", f"d-agent-{i}", swarm, max_tasks=3)
                await nursery.start(
                    lambda task_status, c=config: run_agent(
                        c, executors=counting.registry, shutdown=shutdown, task_status=task_status
                    )
                )

            async def publish(watcher: Any) -> None:
                for task_id in ids:
                    await watcher.publish(f"{swarm}/tasks/new", submission(task_id), qos=1)

            finals = await follow_outcomes(broker, swarm, len(ids), publish)
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
            await nursery.start(
                lambda task_status: run_agent(
                    _config(broker, "testing", "only-tester", swarm),
                    executors=counting.registry,
                    shutdown=shutdown,
                    task_status=task_status,
                )
            )
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
                    await nursery.start(
                        lambda task_status: run_agent(
                            _config(broker, "deployment", "late-deployer", swarm),
                            executors=counting.registry,
                            shutdown=shutdown,
                            task_status=task_status,
                        )
                    )
                    m = await msgs.receive()
                    late = json.loads(m.payload)["payload"]
                    with trio.move_on_after(1.0):
                        m = await msgs.receive()
                        raise AssertionError(f"a second outcome {m.payload!r}")
            shutdown.set()
    assert (late["task_id"], late["agent_id"]) == ("deploy-1", "late-deployer")
    assert counting.executions == Counter({"dup-1": 1, "deploy-1": 1})


_AGENT_PROC = """
import sys, trio, logging
logging.basicConfig(level=logging.INFO)
from sheri_trio.swarm import AgentConfig, run_agent
cfg = AgentConfig(role="testing", agent_id=sys.argv[2], swarm=sys.argv[3], broker=sys.argv[1],
                  heartbeat_interval=0.5, lease_time=2.0, keep_alive=5, dispatch="dispatcher",
                  executor_config={"executors": {"simulate": True}})
async def main():
    async with trio.open_nursery() as n:
        await n.start(run_agent, cfg)
        print("online", flush=True)
trio.run(main)
"""


async def test_a_killed_holder_s_task_completes_elsewhere_once(broker: MosquittoBroker) -> None:
    swarm = "t-dispatch-crash"
    with trio.fail_after(60):
        async with open_client(broker.tcp_url) as watcher:
            async with watcher.subscribe(f"{swarm}/tasks/#") as msgs:
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-c", _AGENT_PROC, broker.tcp_url, "victim", swarm],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    assert proc.stdout is not None
                    assert (await read_line(proc.stdout)).strip() == b"online"
                    body = {
                        "payload": {
                            "task_id": "slow-1",
                            "type": "testing.run",
                            "payload": {"simulate_seconds": 2},
                        }
                    }
                    await watcher.publish(f"{swarm}/tasks/new", json.dumps(body), qos=1)
                    while True:
                        m = await msgs.receive()
                        p = json.loads(m.payload)["payload"]
                        if m.topic.endswith("/progress") and p.get("state") == "running":
                            assert p["agent_id"] == "victim"
                            break
                    proc.send_signal(signal.SIGKILL)
                    await proc.wait()
                    async with trio.open_nursery() as nursery:
                        shutdown = trio.Event()
                        await nursery.start(
                            lambda task_status: run_agent(
                                _config(
                                    broker,
                                    "testing",
                                    "survivor",
                                    swarm,
                                    executor_config={"executors": {"simulate": True}},
                                ),
                                shutdown=shutdown,
                                task_status=task_status,
                            )
                        )
                        finals = []
                        while not finals:
                            m = await msgs.receive()
                            if m.topic.endswith(("/complete", "/failed")):
                                finals.append(json.loads(m.payload)["payload"])
                        shutdown.set()
                finally:
                    proc.kill()
                    assert proc.stdout is not None
                    with trio.CancelScope(shield=True):
                        await proc.wait()
                        await proc.stdout.aclose()
    assert finals[0]["agent_id"] == "survivor"
    assert finals[0]["attempt"] == 2


async def test_the_dispatcher_publishes_its_view_of_the_swarm(broker: MosquittoBroker) -> None:
    """What monitoring.alerts reads in dispatch mode: agents and outcomes, retained."""
    swarm = "t-dispatch-view"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            for i in range(3):
                config = _config(broker, "monitoring", f"viewer-{i}", swarm)
                await nursery.start(
                    lambda task_status, c=config: run_agent(
                        c, shutdown=shutdown, task_status=task_status
                    )
                )
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
