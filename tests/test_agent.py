"""Agents on a real mosquitto: claiming, exactly once, takeover, shutdown."""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest
import trio
from swarm_helpers import (
    Counting,
    agent_config,
    follow_outcomes,
    kill_the_holder,
    restart_mid_burst,
    start_agents,
)

from sheri_trio.mqtt import open_client

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from sheri_trio.swarm import AgentConfig
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


#: the dispatch rule of every agent _config makes: each test runs under both
_DISPATCH = {"mode": "broadcast"}


@pytest.fixture(autouse=True, params=["broadcast", "dispatcher"])
def dispatch(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every behaviour test runs with both dispatch rules (docs/dispatch.md)."""
    _DISPATCH["mode"] = request.param
    yield request.param
    _DISPATCH["mode"] = "broadcast"


def _config(
    broker: MosquittoBroker, role: str, agent_id: str, swarm: str, **kw: Any
) -> AgentConfig:
    return agent_config(broker, role, agent_id, swarm, dispatch=_DISPATCH["mode"], **kw)


async def test_seed_task_runs_once(broker: MosquittoBroker, tmp_path: Path) -> None:
    swarm = f"t-seed-{_DISPATCH['mode']}"  # each rule its own swarm: no retained leftovers
    outcomes: list[dict[str, Any]] = []
    # the real deploy executor, with the seed's service configured: it writes a file
    script = "import os; open('deployed.txt', 'a').write(os.environ['SHERI_VERSION'] + '\\n')"
    executor_config = {
        "deploy": {"test-service": {"command": [sys.executable, "-c", script]}},
        "workspace": {"root": str(tmp_path)},
    }
    with trio.fail_after(20):
        async with open_client(broker.tcp_url) as watcher:
            async with watcher.subscribe(
                f"{swarm}/tasks/complete", f"{swarm}/tasks/failed"
            ) as msgs:
                async with trio.open_nursery() as nursery:
                    shutdown = trio.Event()
                    configs = [
                        _config(
                            broker,
                            "deployment",
                            f"deploy-{i}",
                            swarm,
                            executor_config={
                                **executor_config,
                                "state_dir": str(tmp_path / str(i)),
                            },
                        )
                        for i in range(2)
                    ]
                    await start_agents(nursery, configs, shutdown=shutdown)
                    await watcher.publish(f"{swarm}/tasks/new", json.dumps(SEED_DEPLOY), qos=1)
                    m = await msgs.receive()
                    outcomes.append(json.loads(m.payload))
                    shutdown.set()
    payload = outcomes[0]["payload"]
    assert payload["task_id"] == "task_deploy_test"
    assert payload["status"] == "success"
    assert payload["result"]["status"] == "deployed"
    assert payload["result"]["version"] == "1.0.0"
    assert (tmp_path / "deployed.txt").read_text() == "1.0.0\n"  # deployed once


async def test_contention_six_agents_thousand_tasks_each_runs_once(broker: MosquittoBroker) -> None:
    swarm = f"t-contention-{_DISPATCH['mode']}"  # each rule its own swarm: no retained leftovers
    counting = Counting()
    executions = counting.executions
    total = 1000

    async def submit(client: Any) -> None:
        for i in range(total):
            body = {"payload": {"task_id": f"c-{i}", "type": "testing.run", "payload": {}}}
            await client.publish(f"{swarm}/tasks/new", json.dumps(body), qos=1, wait_ack=False)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            configs = [_config(broker, "testing", f"tester-{i}", swarm) for i in range(6)]
            await start_agents(nursery, configs, shutdown=shutdown, executors=counting.registry)
            finals, records = await follow_outcomes(broker, swarm, total, submit)
            shutdown.set()
    assert len(executions) == total
    assert max(executions.values()) == 1, [t for t, n in executions.items() if n > 1]
    assert set(finals) == {f"c-{i}" for i in range(total)}
    assert max(finals.values()) == 1
    assert all(r["status"] == "success" for r in records)
    by_agent = Counter(r["agent_id"] for r in records)
    assert len(by_agent) > 1  # the work was shared


ALL_TYPES = [
    "code.review",
    "code.generate",
    "deployment.deploy",
    "deployment.rollback",
    "testing.run",
    "testing.coverage",
    "security.scan",
    "security.audit",
    "monitoring.health",
    "monitoring.alerts",
    "documentation.generate",
    "database.migrate",
    "database.backup",
]
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


async def test_nine_agent_swarm_300_tasks_all_types(broker: MosquittoBroker) -> None:
    from sheri_trio.swarm._protocol import roles_for

    swarm = f"t-nine-{_DISPATCH['mode']}"  # each rule its own swarm: no retained leftovers
    counting = Counting()
    executions = counting.executions
    total = 300
    types = {f"n-{i}": ALL_TYPES[i % len(ALL_TYPES)] for i in range(total)}

    async def submit(client: Any) -> None:
        for task_id, task_type in types.items():
            body = {"payload": {"task_id": task_id, "type": task_type, "payload": {}}}
            await client.publish(f"{swarm}/tasks/new", json.dumps(body), qos=1, wait_ack=False)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            configs = [
                _config(broker, role, f"nine-{role}-{i}", swarm)
                for i, role in enumerate(NINE_ROLES)
            ]
            await start_agents(nursery, configs, shutdown=shutdown, executors=counting.registry)
            finals, records = await follow_outcomes(broker, swarm, total, submit)
            shutdown.set()
    assert sorted(executions) == sorted(types)
    assert set(executions.values()) == {1}
    assert set(finals.values()) == {1}
    for r in records:
        assert r["status"] == "success"
        assert r["role"] in roles_for(types[r["task_id"]])


def assert_each_ran_once(finals: Counter[str], counting: Counting, total: int) -> None:
    """Every task of the burst (``r-0`` ... ``r-{total-1}``) ran once and has one final
    outcome."""
    assert set(finals) == {f"r-{i}" for i in range(total)}
    assert counting.executions == Counter(dict.fromkeys(finals, 1))
    assert finals == Counter(dict.fromkeys(finals, 1))


async def test_killed_agent_task_completes_elsewhere_once(
    broker: MosquittoBroker, dispatch: str
) -> None:
    with trio.fail_after(40):
        final = await kill_the_holder(broker, f"t-crash-{dispatch}", dispatch=dispatch, seconds=0.5)
    assert final["agent_id"] == "survivor"
    assert final["attempt"] == 2
    assert final["status"] == "success"


async def test_broker_restart_every_task_once(fresh_broker: MosquittoBroker, dispatch: str) -> None:
    counting = Counting(delay=0.01)
    total = 200
    with trio.fail_after(90):
        finals, _ = await restart_mid_burst(
            fresh_broker, f"t-restart-{dispatch}", counting, total=total, dispatch=dispatch
        )
    # mosquitto publishes every client's will as it stops, so every agent looks gone for
    # a moment: a will is not a takeover (docs/protocol.md, "Sessions, presence and
    # absence"), so nothing runs twice and each task has one final outcome
    assert_each_ran_once(finals, counting, total)


async def test_broker_restart_while_tasks_run_runs_none_twice(
    fresh_broker: MosquittoBroker, dispatch: str
) -> None:
    """The broker restarted (SIGTERM, then started again on the same port and data) while
    tasks of about a second run: each runs once, on its first attempt, and has one
    final outcome."""
    counting = Counting(delay=1.0)
    total = 24
    with trio.fail_after(90):
        finals, records = await restart_mid_burst(
            fresh_broker,
            f"t-restart-run-{dispatch}",
            counting,
            total=total,
            dispatch=dispatch,
            running=6,
        )
    assert_each_ran_once(finals, counting, total)
    assert {r["attempt"] for r in records} == {1}  # nothing was taken over
    assert {r["status"] for r in records} == {"success"}


async def test_a_broker_down_longer_than_the_lease_takes_nothing_over(
    fresh_broker: MosquittoBroker, dispatch: str
) -> None:
    """Stopped for twice the lease time while tasks run: nobody heard anybody meanwhile,
    so no silence counts (leases restart at each observer's reconnect: an agent's own,
    or the dispatcher's next term); each task runs once, on its first attempt."""
    counting = Counting(delay=6.0)
    total = 12
    with trio.fail_after(90):
        finals, records = await restart_mid_burst(
            fresh_broker,
            f"t-down-{dispatch}",
            counting,
            total=total,
            dispatch=dispatch,
            running=6,
            down=4.0,
            lease_time=2.0,
        )
    assert_each_ran_once(finals, counting, total)
    assert {r["attempt"] for r in records} == {1}


async def test_after_a_broker_restart_the_retained_status_says_online_again(
    fresh_broker: MosquittoBroker, dispatch: str
) -> None:
    """mosquitto publishes every client's will as it stops: the agent's retained status
    says offline though it reconnects; its next heartbeat interval says online again."""
    swarm = f"t-online-{dispatch}"
    options: dict[str, Any] = {"reconnect_initial_delay": 0.05, "reconnect_max_delay": 0.5}
    config = _config(fresh_broker, "testing", "back", swarm, client_options=options)
    seen: list[str] = []
    with trio.fail_after(30):
        async with (
            open_client(
                fresh_broker.tcp_url,
                client_id=f"{swarm}-watcher",
                clean_start=False,
                session_expiry_interval=300,
                **options,
            ) as watcher,
            watcher.subscribe(f"{swarm}/agents/back/status") as statuses,
            trio.open_nursery() as nursery,
        ):
            shutdown = trio.Event()
            await start_agents(nursery, [config], shutdown=shutdown)

            async def next_status() -> str:
                m = await statuses.receive()
                status = str(json.loads(m.payload)["payload"]["status"])
                seen.append(status)
                return status

            while await next_status() != "online":
                pass
            await trio.to_thread.run_sync(fresh_broker.restart)
            while await next_status() != "offline":  # the will
                pass
            while await next_status() != "online":
                pass
            shutdown.set()
    assert seen[-2:] == ["offline", "online"]


async def test_graceful_shutdown_releases_running_task(broker: MosquittoBroker) -> None:
    swarm = f"t-release-{_DISPATCH['mode']}"  # each rule its own swarm: no retained leftovers
    release_gate = trio.Event()
    started: list[str] = []

    from sheri_trio.executors import ExecutorRegistry, TaskContext

    async def slow(ctx: TaskContext) -> dict[str, Any]:
        started.append(ctx.agent_id)
        if ctx.agent_id == "leaver":
            await trio.sleep_forever()
        return {"by": ctx.agent_id}

    registry = ExecutorRegistry()
    registry.fallback = slow
    with trio.fail_after(30):
        async with open_client(broker.tcp_url) as watcher:
            async with watcher.subscribe(f"{swarm}/#") as msgs:
                async with trio.open_nursery() as nursery:
                    leaver_stop = trio.Event()
                    leaver = _config(broker, "testing", "leaver", swarm, grace_period=0.5)
                    await start_agents(nursery, [leaver], executors=registry, shutdown=leaver_stop)
                    body = {"payload": {"task_id": "rel-1", "type": "testing.run"}}
                    await watcher.publish(f"{swarm}/tasks/new", json.dumps(body), qos=1)
                    seen: list[tuple[str, dict[str, Any]]] = []
                    while not started:
                        m = await msgs.receive()
                        if m.payload.startswith(b"{"):
                            seen.append((m.topic, json.loads(m.payload)["payload"]))
                    stayer_stop = trio.Event()
                    stayer = _config(broker, "testing", "stayer", swarm)
                    await start_agents(nursery, [stayer], executors=registry, shutdown=stayer_stop)
                    leaver_stop.set()
                    final = None
                    while final is None:
                        m = await msgs.receive()
                        if not m.payload.startswith(b"{"):
                            continue  # sync markers of probes
                        p = json.loads(m.payload)
                        seen.append((m.topic, p["payload"]))
                        if m.topic.endswith("/tasks/complete"):
                            final = p["payload"]
                    stayer_stop.set()
                    release_gate.set()
    topics = [t for t, _ in seen]
    assert f"{swarm}/tasks/released" in topics
    assert f"{swarm}/agents/shutdown" in topics
    offline = [
        p for t, p in seen if t == f"{swarm}/agents/leaver/status" and p["status"] == "offline"
    ]
    assert offline
    assert offline[0]["reason"] == "shutdown"
    assert final["agent_id"] == "stayer"
    assert final["attempt"] == 2
    assert started == ["leaver", "stayer"]


BAD_INPUTS: list[bytes] = [
    b"{not json",
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",
    b'{"id": "x"}',
    json.dumps({"payload": {"task_id": "../../etc/passwd", "type": "testing.run"}}).encode(),
    json.dumps({"payload": {"task_id": "x" * 500, "type": "testing.run"}}).encode(),
    json.dumps(
        {"payload": {"task_id": "big", "type": "testing.run", "payload": "y" * 300_000}}
    ).encode(),
]


async def test_bad_input_is_reported_and_agent_keeps_working(broker: MosquittoBroker) -> None:
    swarm = f"t-bad-{_DISPATCH['mode']}"  # each rule its own swarm: no retained leftovers
    errors: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    with trio.fail_after(30):
        async with open_client(broker.tcp_url) as watcher:
            async with watcher.subscribe(
                f"{swarm}/errors", f"{swarm}/tasks/failed", f"{swarm}/tasks/complete"
            ) as msgs:
                async with trio.open_nursery() as nursery:
                    stop = trio.Event()
                    configs = [_config(broker, "testing", f"bad-{i}", swarm) for i in range(3)]
                    await start_agents(nursery, configs, shutdown=stop)
                    for raw in BAD_INPUTS:
                        await watcher.publish(f"{swarm}/tasks/new", raw, qos=1)
                    # usable task id, invalid fields: claimed once, fails once
                    wrong = {
                        "payload": {"task_id": "wrong-prio", "type": "testing.run", "priority": 5}
                    }
                    await watcher.publish(f"{swarm}/tasks/new", json.dumps(wrong), qos=1)
                    # valid envelope, payload the executor refuses: fails once, no retries
                    bad_payload = {
                        "payload": {"task_id": "bad-payload", "type": "testing.run", "payload": [1]}
                    }
                    await watcher.publish(f"{swarm}/tasks/new", json.dumps(bad_payload), qos=1)
                    good = {"payload": {"task_id": "good-1", "type": "testing.run", "payload": {}}}
                    await watcher.publish(f"{swarm}/tasks/new", json.dumps(good), qos=1)
                    done: dict[str, Any] = {}
                    while "good-1" not in done or len(failed) < 2 or len(errors) < len(BAD_INPUTS):
                        m = await msgs.receive()
                        p = json.loads(m.payload)["payload"]
                        if m.topic.endswith("/errors"):
                            errors.append(p)
                        elif m.topic.endswith("/failed"):
                            failed.append(p)
                        else:
                            done[p["task_id"]] = p
                    # one more valid task after all that: still handled
                    await watcher.publish(
                        f"{swarm}/tasks/new",
                        json.dumps({"payload": {"task_id": "good-2", "type": "testing.run"}}),
                        qos=1,
                    )
                    while "good-2" not in done:
                        m = await msgs.receive()
                        p = json.loads(m.payload)["payload"]
                        if m.topic.endswith("/complete"):
                            done[p["task_id"]] = p
                        elif m.topic.endswith("/failed"):
                            failed.append(p)
                        else:
                            errors.append(p)
                    stop.set()
    assert len(errors) == len(BAD_INPUTS)  # one report per bad message, not one per agent
    reasons = " | ".join(e["error"] for e in errors)
    for expected in (
        "not valid JSON",
        "not UTF-8",
        "JSON object",
        "no 'payload'",
        "is not allowed",
        "exceeds",
    ):
        assert expected in reasons
    assert sorted(f["task_id"] for f in failed) == ["bad-payload", "wrong-prio"]
    by_id = {f["task_id"]: f for f in failed}
    assert by_id["wrong-prio"]["reason"] == "invalid_task"
    assert by_id["bad-payload"]["reason"] == "invalid_payload"


async def test_every_type_with_empty_payload_on_real_executors(
    broker: MosquittoBroker, tmp_path: Any, monkeypatch: Any
) -> None:
    """Issue 4's check: a 9-agent swarm on the real executors, unconfigured, one task of
    every type with an empty payload: exactly one final outcome each, a success or a clear,
    specific error."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "tests").mkdir()
    (workspace / "tests" / "test_ok.py").write_text("def test_ok():\n    assert True\n")
    (workspace / "app.py").write_text("X = 1\n")
    swarm = f"t-real-{_DISPATCH['mode']}"  # each rule its own swarm: no retained leftovers
    executor_config = {"workspace": {"root": str(workspace)}, "state_dir": str(tmp_path / "state")}
    records: list[dict[str, Any]] = []
    finals: Counter[str] = Counter()
    with trio.fail_after(120):
        async with open_client(broker.tcp_url) as watcher:
            async with watcher.subscribe(
                f"{swarm}/tasks/complete", f"{swarm}/tasks/failed"
            ) as msgs:
                async with trio.open_nursery() as nursery:
                    stop = trio.Event()
                    configs = [
                        _config(
                            broker, role, f"real-{role}-{i}", swarm, executor_config=executor_config
                        )
                        for i, role in enumerate(NINE_ROLES)
                    ]
                    await start_agents(nursery, configs, shutdown=stop)
                    for n, task_type in enumerate(ALL_TYPES):
                        body = {"payload": {"task_id": f"e-{n}", "type": task_type, "payload": {}}}
                        await watcher.publish(f"{swarm}/tasks/new", json.dumps(body), qos=1)
                    while len(finals) < len(ALL_TYPES):
                        m = await msgs.receive()
                        p = json.loads(m.payload)["payload"]
                        finals[p["task_id"]] += 1
                        records.append(p)
                    stop.set()
    assert set(finals.values()) == {1}
    by_type = {r["type"]: r for r in records}
    assert set(by_type) == set(ALL_TYPES)
    for task_type, r in by_type.items():
        if r["status"] == "success":
            assert isinstance(r["result"], dict), task_type
        else:
            # clear and specific: a reason code and an error that names the cause
            assert r["reason"] in ("not_configured", "invalid_payload", "error"), (task_type, r)
            assert len(r["error"]) > 20, (task_type, r["error"])
    assert by_type["testing.run"]["status"] == "success"
    assert by_type["testing.run"]["result"]["passed"] == 1
    for llm in ("code.review", "code.generate", "documentation.generate"):
        # no input to work on, or no API key: either way said at once, without retries
        assert "API key" in by_type[llm]["error"] or "needs" in by_type[llm]["error"]
    assert "documentation.generate" in by_type
    assert "API key" in by_type["documentation.generate"]["error"]
    assert "service" in by_type["deployment.deploy"]["error"]
    assert by_type["database.backup"]["reason"] == "not_configured"


async def test_task_for_absent_role_waits_as_pending_marker(broker: MosquittoBroker) -> None:
    swarm = f"t-pending-{_DISPATCH['mode']}"  # each rule its own swarm: no retained leftovers
    with trio.fail_after(30):
        async with open_client(broker.tcp_url) as watcher:
            async with watcher.subscribe(
                f"{swarm}/tasks/pending/+", f"{swarm}/tasks/complete"
            ) as msgs:
                async with trio.open_nursery() as nursery:
                    stop = trio.Event()
                    tester = _config(broker, "testing", "only-tester", swarm)
                    await start_agents(nursery, [tester], shutdown=stop)
                    body = {"payload": {"task_id": "needs-db", "type": "database.backup"}}
                    await watcher.publish(f"{swarm}/tasks/new", json.dumps(body), qos=1)
                    marker = await msgs.receive()
                    assert marker.topic == f"{swarm}/tasks/pending/needs-db"
                    assert json.loads(marker.payload)["payload"]["task_id"] == "needs-db"
                    # a database agent comes online later and picks it up
                    late = _config(broker, "database", "late-db", swarm)
                    await start_agents(nursery, [late], shutdown=stop)
                    # the marker is cleared (broadcast: once it is done; dispatcher: once
                    # it is assigned) and the task done, by the agent that came
                    later = {m.topic: m.payload for m in [await msgs.receive() for _ in "ab"]}
                    done = json.loads(later[f"{swarm}/tasks/complete"])
                    assert done["payload"]["agent_id"] == "late-db"
                    assert later[f"{swarm}/tasks/pending/needs-db"] == b""
                    stop.set()
