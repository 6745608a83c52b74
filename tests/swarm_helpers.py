"""Helpers for tests of real agents on a real mosquitto, in both dispatch modes
(tests/test_agent.py: broadcast, tests/test_dispatch_e2e.py: dispatcher)."""

from __future__ import annotations

import json
import signal
from collections import Counter
from typing import TYPE_CHECKING, Any

import trio
from childproc import online_process

from sheri_trio.executors import ExecutorRegistry, TaskContext
from sheri_trio.mqtt import open_client
from sheri_trio.swarm import AgentConfig, run_agent

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from sheri_trio.mqtt import Client
    from sheri_trio.swarm import Agent
    from sheri_trio.testing import MosquittoBroker


def agent_config(
    broker: MosquittoBroker, role: str, agent_id: str, swarm: str, **kw: Any
) -> AgentConfig:
    """An agent's config with fast heartbeats and leases and the simulated executors (the
    swarm's mechanics, not the executors: tests/test_executors_*.py)."""
    options: dict[str, Any] = {
        "heartbeat_interval": 0.5,
        "lease_time": 2.0,
        "grace_period": 2.0,
        "retry_initial_delay": 0.01,
        "executor_config": {"executors": {"simulate": True}},
    }
    options.update(kw)
    return AgentConfig(role=role, agent_id=agent_id, swarm=swarm, broker=broker.tcp_url, **options)


async def start_agents(
    nursery: trio.Nursery, configs: Iterable[AgentConfig], **kw: Any
) -> list[Agent]:
    """``run_agent(config, **kw)`` for every config in *nursery*, once each is online."""
    agents = []
    for config in configs:
        agents.append(
            await nursery.start(
                lambda task_status, c=config: run_agent(c, task_status=task_status, **kw)
            )
        )
    return agents


class Counting:
    """An executor for every type that counts executions and concurrency per agent."""

    def __init__(self, delay: float = 0.0) -> None:
        self.executions: Counter[str] = Counter()
        self.running: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.delay = delay
        self.registry = ExecutorRegistry()
        self.registry.fallback = self
        self._waiters: list[tuple[int, trio.Event]] = []

    async def wait_running(self, n: int) -> None:
        """Until at least *n* executions run at once (over all agents)."""
        if sum(self.running.values()) >= n:
            return
        event = trio.Event()
        self._waiters.append((n, event))
        await event.wait()

    async def __call__(self, ctx: TaskContext) -> dict[str, Any]:
        self.executions[ctx.task_id] += 1
        self.running[ctx.agent_id] += 1
        self.peak[ctx.agent_id] = max(self.peak[ctx.agent_id], self.running[ctx.agent_id])
        now_running = sum(self.running.values())
        for n, event in self._waiters:
            if now_running >= n:
                event.set()
        try:
            if self.delay:
                await trio.sleep(self.delay)
        finally:
            self.running[ctx.agent_id] -= 1
        return {"ok": True}


def submission(task_id: str, task_type: str = "testing.run", **payload: Any) -> str:
    """A task on ``tasks/new`` as the prototype's mosquitto_pub JSON."""
    task: dict[str, Any] = {"task_id": task_id, "type": task_type}
    if payload:
        task["payload"] = payload
    return json.dumps({"id": f"msg_{task_id}", "payload": task})


async def follow_outcomes(
    broker: MosquittoBroker,
    swarm: str,
    expected: int,
    publish: Callable[[Client], Awaitable[None]],
) -> tuple[Counter[str], list[dict[str, Any]]]:
    """Subscribe to the outcomes, ``publish(client)``, and return once *expected* final
    outcomes arrived: their number per task id, and their payloads."""
    finals: Counter[str] = Counter()
    records: list[dict[str, Any]] = []
    async with open_client(broker.tcp_url) as watcher:
        async with watcher.subscribe(f"{swarm}/tasks/complete", f"{swarm}/tasks/failed") as msgs:
            await publish(watcher)
            while sum(finals.values()) < expected:
                m = await msgs.receive()
                body = json.loads(m.payload)["payload"]
                finals[body["task_id"]] += 1
                records.append(body)
    return finals, records


#: an agent in a child process: python -c AGENT_PROC <broker url> <agent id> <swarm> <dispatch>
#: [<claim store url>, default "broker"]
AGENT_PROC = """
import sys, trio, logging
logging.basicConfig(level=logging.INFO)
from sheri_trio.stores import parse_store_url
from sheri_trio.swarm import AgentConfig, run_agent
store = parse_store_url(sys.argv[5] if len(sys.argv) > 5 else "broker", source="flag")
cfg = AgentConfig(role="testing", agent_id=sys.argv[2], swarm=sys.argv[3], broker=sys.argv[1],
                  heartbeat_interval=0.5, lease_time=2.0, keep_alive=5, dispatch=sys.argv[4],
                  store=store, executor_config={"executors": {"simulate": True}})
async def main():
    async with trio.open_nursery() as n:
        await n.start(run_agent, cfg)
        print("online", flush=True)
trio.run(main)
"""


async def kill_the_holder(
    broker: MosquittoBroker, swarm: str, *, dispatch: str, seconds: float
) -> dict[str, Any]:
    """A task of *seconds* runs on an agent in a child process ("victim"), which is killed
    (SIGKILL) once it runs it; another agent ("survivor") starts then. The task's one
    final outcome is returned."""
    async with open_client(broker.tcp_url) as watcher:
        async with watcher.subscribe(f"{swarm}/tasks/#") as msgs:
            victim = online_process(AGENT_PROC, broker.tcp_url, "victim", swarm, dispatch)
            async with victim as proc:
                task = submission("slow-1", simulate_seconds=seconds)
                await watcher.publish(f"{swarm}/tasks/new", task, qos=1)
                # wait until the victim is running it, then kill it
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
                    survivor = agent_config(broker, "testing", "survivor", swarm, dispatch=dispatch)
                    await start_agents(nursery, [survivor], shutdown=shutdown)
                    while True:
                        m = await msgs.receive()
                        if m.topic.endswith(("/complete", "/failed")):
                            shutdown.set()
                            return dict(json.loads(m.payload)["payload"])


async def restart_mid_burst(
    broker: MosquittoBroker,
    swarm: str,
    counting: Counting,
    *,
    total: int,
    dispatch: str,
    running: int | None = None,
    down: float = 0.0,
    lease_time: float = 3.0,
) -> tuple[Counter[str], list[dict[str, Any]]]:
    """Three agents; half of *total* tasks submitted, the broker restarted (SIGTERM, its
    persistence keeps the sessions and the retained records) while the agents hold
    tasks, then the other half. The restart comes once a quarter have ended, or, with
    *running*, once that many executions run at once; with *down*, the broker stays
    stopped that many seconds (an outage, not a synchronisation). The final outcomes per
    task id are returned (one message delivered twice counted once: QoS 1), and their
    payloads."""
    finals: Counter[str] = Counter()
    records: list[dict[str, Any]] = []
    seen: set[str] = set()  # envelope ids: QoS 1 may bring one message twice
    options: dict[str, Any] = {"reconnect_initial_delay": 0.05, "reconnect_max_delay": 0.5}
    async with trio.open_nursery() as nursery:
        shutdown = trio.Event()
        configs = [
            agent_config(
                broker,
                "testing",
                f"{swarm}-{i}",
                swarm,
                client_options=options,
                lease_time=lease_time,
                dispatch=dispatch,
            )
            for i in range(3)
        ]
        await start_agents(nursery, configs, shutdown=shutdown, executors=counting.registry)
        async with open_client(
            broker.tcp_url,
            client_id=f"{swarm}-watcher",
            clean_start=False,
            session_expiry_interval=300,
            **options,
        ) as watcher:
            async with watcher.subscribe(
                f"{swarm}/tasks/complete", f"{swarm}/tasks/failed"
            ) as msgs:

                async def next_outcome() -> None:
                    m = await msgs.receive()
                    envelope = json.loads(m.payload)
                    if envelope["id"] in seen:
                        # the same message again (at least once: delivered as the broker
                        # stopped, and again from the persistent session after), not a
                        # second outcome
                        return
                    seen.add(envelope["id"])
                    body = envelope["payload"]
                    finals[body["task_id"]] += 1
                    records.append(body)

                for i in range(total):
                    if i == total // 2:
                        if running is None:
                            while sum(finals.values()) < total // 4:
                                await next_outcome()
                        else:
                            await counting.wait_running(running)
                        if down:
                            await trio.to_thread.run_sync(broker.stop)
                            await trio.sleep(down)
                            await trio.to_thread.run_sync(broker.start)
                        else:
                            await trio.to_thread.run_sync(broker.restart)
                    await watcher.publish(
                        f"{swarm}/tasks/new", submission(f"r-{i}"), qos=1, wait_ack=False
                    )
                while len(finals) < total:
                    await next_outcome()
        shutdown.set()
    return finals, records
