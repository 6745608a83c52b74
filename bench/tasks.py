"""End-to-end task rate: K agents in one process, M no-op tasks, through a real broker."""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter
from typing import Any

import trio

from sheri_trio.executors import ExecutorRegistry, TaskContext
from sheri_trio.mqtt import open_client
from sheri_trio.swarm._agent import Agent, AgentConfig, run_agent

NINE_ROLES = [
    "general",
    "deployment",
    "testing",
    "review",
    "security",
    "monitoring",
    "documentation",
    "database",
    "general",
]


async def task_rate(
    url: str,
    *,
    agents: int = 9,
    tasks: int = 2000,
    max_tasks: int = 16,
    max_wait: float | None = None,
    lone: int = 0,
) -> dict[str, Any]:
    """Submit ``tasks`` no-op tasks of an unknown type (any general agent may take them).

    With ``max_wait`` (seconds from the first submission), waiting for outcomes stops
    then and the tasks without one are counted as lost. Then, with ``lone``, that many
    more tasks one at a time, each submitted when the previous one completed: the
    latency of a task in an idle swarm (submission to ``tasks/complete`` at the
    submitter), which the burst's latencies (mostly queueing) do not show.
    """
    swarm = f"bench-{time.monotonic_ns() % 10**9}"
    executions: Counter[str] = Counter()

    async def noop(ctx: TaskContext) -> dict[str, Any]:
        executions[ctx.task_id] += 1
        return {}

    registry = ExecutorRegistry()
    registry.fallback = noop
    roles = [NINE_ROLES[i % len(NINE_ROLES)] for i in range(agents)]
    submitted: dict[str, float] = {}
    latencies: list[float] = []
    lone_latencies: list[float] = []
    finals: Counter[str] = Counter()
    running: list[Agent] = []
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        for i, role in enumerate(roles):
            cfg = AgentConfig(
                role=role,
                agent_id=f"{swarm}-{role}-{i}",
                swarm=swarm,
                broker=url,
                max_tasks=max_tasks,
                check_duplicate=False,
                default_timeout=None,
                state_retention=600,  # retained task states expire 10 minutes after the run
            )
            running.append(
                await nursery.start(
                    lambda task_status, cfg=cfg: run_agent(
                        cfg, executors=registry, shutdown=stop, task_status=task_status
                    )
                )
            )
        async with open_client(url, client_id=f"{swarm}-submitter") as client:
            async with client.subscribe(f"{swarm}/tasks/complete", f"{swarm}/tasks/failed") as msgs:
                base = [a.client.statistics()["messages_received"] for a in running]
                t0 = time.perf_counter()

                async def submit() -> None:
                    for i in range(tasks):
                        task_id = f"b-{i}"
                        submitted[task_id] = time.perf_counter()
                        body = {"payload": {"task_id": task_id, "type": "bench.noop"}}
                        await client.publish(
                            f"{swarm}/tasks/new", json.dumps(body).encode(), qos=1, wait_ack=False
                        )

                nursery.start_soon(submit)
                with trio.move_on_after(max_wait if max_wait is not None else math.inf):
                    while len(finals) < tasks:
                        m = await msgs.receive()
                        task_id = json.loads(m.payload)["payload"]["task_id"]
                        if task_id not in finals:
                            latencies.append(time.perf_counter() - submitted[task_id])
                        finals[task_id] += 1
                elapsed = time.perf_counter() - t0
                received = sum(
                    a.client.statistics()["messages_received"] - b
                    for a, b in zip(running, base, strict=True)
                )
                for i in range(lone if len(finals) == tasks else 0):
                    task_id = f"lone-{i}"
                    body = {"payload": {"task_id": task_id, "type": "bench.noop"}}
                    sent = time.perf_counter()
                    await client.publish(f"{swarm}/tasks/new", json.dumps(body).encode(), qos=1)
                    with trio.fail_after(10):
                        while True:
                            m = await msgs.receive()
                            if json.loads(m.payload)["payload"]["task_id"] == task_id:
                                break
                    lone_latencies.append(time.perf_counter() - sent)
        stop.set()
    # Leave no retained agent status behind (task states expire by themselves).
    async with open_client(url, client_id=f"{swarm}-cleaner") as client:
        for a in running:
            await client.publish(a.topics.agent_status(a.agent_id), b"", qos=1, retain=True)
    latencies.sort() if latencies else latencies.append(math.nan)
    deliveries = received + len(finals)  # the agents' deliveries plus the submitter's outcomes
    return {
        "agents": agents,
        "tasks": tasks,
        "completed": len(finals),
        "seconds": round(elapsed, 3),
        "tasks_per_s": round(len(finals) / elapsed, 1),
        "latency_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "latency_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        "duplicates": sum(n - 1 for n in executions.values() if n > 1)
        + sum(n - 1 for n in finals.values() if n > 1),
        "losses": tasks - min(len(executions), len(finals)),
        "deliveries_per_task": round(deliveries / tasks, 2),
        **_lone_summary(lone_latencies),
    }


def _lone_summary(latencies: list[float]) -> dict[str, Any]:
    if not latencies:
        return {}
    latencies.sort()
    return {
        "lone_tasks": len(latencies),
        "lone_latency_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "lone_latency_p99_ms": round(latencies[max(int(len(latencies) * 0.99) - 1, 0)] * 1000, 2),
    }
