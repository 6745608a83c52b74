"""Agents on a real mosquitto: claiming, exactly once, takeover, shutdown."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import trio

from sheri_trio.mqtt import open_client
from sheri_trio.swarm._agent import AgentConfig, run_agent
from sheri_trio.testing import MosquittoBroker

SEED_DEPLOY = {
    "id": "msg_test_deploy",
    "timestamp": "2026-02-22T20:00:00Z",
    "payload": {
        "task_id": "task_deploy_test",
        "type": "deployment.deploy",
        "priority": "high",
        "payload": {"service": "test-service", "version": "1.0.0"},
    },
}


def _config(broker: MosquittoBroker, role: str, agent_id: str, swarm: str, **kw: Any) -> AgentConfig:
    return AgentConfig(
        role=role,
        agent_id=agent_id,
        swarm=swarm,
        broker=broker.tcp_url,
        heartbeat_interval=0.5,
        lease_time=2.0,
        grace_period=2.0,
        retry_initial_delay=0.01,
        **kw,
    )


async def test_seed_task_runs_once(broker: MosquittoBroker) -> None:
    swarm = "t-seed"
    outcomes: list[dict[str, Any]] = []
    with trio.fail_after(20):
        async with open_client(broker.tcp_url) as watcher:
            async with watcher.subscribe(f"{swarm}/tasks/complete", f"{swarm}/tasks/failed") as msgs:
                async with trio.open_nursery() as nursery:
                    shutdown = trio.Event()
                    for i in range(2):
                        await nursery.start(
                            lambda task_status, i=i: run_agent(
                                _config(broker, "deployment", f"deploy-{i}", swarm),
                                shutdown=shutdown,
                                task_status=task_status,
                            )
                        )
                    await watcher.publish(f"{swarm}/tasks/new", json.dumps(SEED_DEPLOY), qos=1)
                    m = await msgs.receive()
                    outcomes.append(json.loads(m.payload))
                    shutdown.set()
    payload = outcomes[0]["payload"]
    assert payload["task_id"] == "task_deploy_test"
    assert payload["status"] == "success"
    assert payload["result"]["status"] == "deployed"


def _counting_registry(counter: Counter[str], delay: float = 0.0) -> Any:
    from sheri_trio.executors import ExecutorRegistry, TaskContext

    async def count(ctx: TaskContext) -> dict[str, Any]:
        counter[ctx.task_id] += 1
        if delay:
            await trio.sleep(delay)
        return {"ok": True}

    registry = ExecutorRegistry()
    registry.fallback = count
    return registry


async def _collect_outcomes(
    broker: MosquittoBroker, swarm: str, expected: int, publish: Any
) -> tuple[Counter[str], list[dict[str, Any]]]:
    """Publish tasks, return the number of final outcomes per task id."""
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


async def test_contention_six_agents_thousand_tasks_each_runs_once(broker: MosquittoBroker) -> None:
    swarm = "t-contention"
    executions: Counter[str] = Counter()
    total = 1000
    registry = _counting_registry(executions)

    async def submit(client: Any) -> None:
        for i in range(total):
            body = {"payload": {"task_id": f"c-{i}", "type": "testing.run", "payload": {}}}
            await client.publish(f"{swarm}/tasks/new", json.dumps(body), qos=1, wait_ack=False)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            for i in range(6):
                await nursery.start(
                    lambda task_status, i=i: run_agent(
                        _config(broker, "testing", f"tester-{i}", swarm),
                        executors=registry,
                        shutdown=shutdown,
                        task_status=task_status,
                    )
                )
            finals, records = await _collect_outcomes(broker, swarm, total, submit)
            shutdown.set()
    assert len(executions) == total
    assert max(executions.values()) == 1, [t for t, n in executions.items() if n > 1]
    assert set(finals) == {f"c-{i}" for i in range(total)}
    assert max(finals.values()) == 1
    assert all(r["status"] == "success" for r in records)
    by_agent = Counter(r["agent_id"] for r in records)
    assert len(by_agent) > 1  # the work was shared
