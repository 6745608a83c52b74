"""``sheri cancel`` and ``sheri retry`` end to end: the commands as subprocesses, real
agents (in this process) on a real mosquitto, in both dispatch modes."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections import Counter
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
import trio

from sheri_trio.executors import ExecutorRegistry, TaskContext
from sheri_trio.mqtt import open_client
from sheri_trio.swarm import AgentConfig, encode, run_agent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from sheri_trio.mqtt import Client
    from sheri_trio.testing import MosquittoBroker

MODES = ["broadcast", "dispatcher"]


class Work:
    """The executor of every type: ``sleep`` seconds; ``fail`` unless it is a retry.
    Counts runs, and the runs that were stopped (cancelled)."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()
        self.stopped: set[str] = set()
        self.started: dict[str, trio.Event] = {}
        self.registry = ExecutorRegistry()
        self.registry.fallback = self

    def started_event(self, task_id: str) -> trio.Event:
        return self.started.setdefault(task_id, trio.Event())

    async def __call__(self, ctx: TaskContext) -> dict[str, Any]:
        p = ctx.payload_dict()
        self.runs[ctx.task_id] += 1
        self.started_event(ctx.task_id).set()
        try:
            await trio.sleep(float(p.get("sleep", 0)))
        except trio.Cancelled:
            self.stopped.add(ctx.task_id)
            raise
        if p.get("fail") and ".retry-" not in ctx.task_id:
            raise RuntimeError("failing as asked")
        return {"ok": True}


class Watch:
    """Every message of a swarm, in order: (topic, payload or None, retained)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any] | None, bool]] = []
        self._changed = trio.Event()

    async def pump(self, client: Client, swarm: str, *, task_status: Any) -> None:
        async with client.subscribe(f"{swarm}/#") as messages:
            task_status.started()
            async for m in messages:
                try:
                    body = json.loads(m.payload)["payload"] if m.payload else None
                except (ValueError, KeyError, TypeError):
                    body = None
                self.items.append((m.topic, body, m.retain))
                self._changed.set()
                self._changed = trio.Event()

    async def until(self, predicate: Callable[[], Any]) -> Any:
        while not (result := predicate()):
            await self._changed.wait()
        return result

    def on(self, topic: str, task_id: str | None = None) -> list[dict[str, Any]]:
        return [
            b
            for t, b, _ in self.items
            if t == topic and b is not None and (task_id is None or b.get("task_id") == task_id)
        ]

    def outcomes(self, swarm: str, task_id: str) -> list[dict[str, Any]]:
        return self.on(f"{swarm}/tasks/complete", task_id) + self.on(
            f"{swarm}/tasks/failed", task_id
        )


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHERI_")}
    env["COLUMNS"] = "200"
    return env


async def sheri(broker: MosquittoBroker, swarm: str, *args: str) -> tuple[int, str]:
    """Run ``sheri ARGS --broker ... --swarm ...``: its exit code and its output. The
    credentials go in the environment, as docs/operations.md says (on the command line
    the CLI warns that ``ps`` shows them)."""
    url = broker.url("mqtt", credentials=False)
    env = {**_env(), "SHERI_USERNAME": broker.username, "SHERI_PASSWORD": broker.password}
    result = await trio.run_process(
        [sys.executable, "-m", "sheri_trio", *args, "--broker", url, "--swarm", swarm],
        capture_stdout=True,
        capture_stderr=True,
        stdin=subprocess.DEVNULL,
        check=False,
        env=env,
    )
    out = result.stdout.decode() + result.stderr.decode()
    return result.returncode, out


@asynccontextmanager
async def swarm_of(
    broker: MosquittoBroker, mode: str, work: Work, *roles: str
) -> AsyncIterator[tuple[str, Client, Watch]]:
    """Agents of ``roles`` (max_tasks 1) in a new swarm, and a watcher of all of it."""
    swarm = f"ctl-{mode[:4]}-{secrets.token_hex(3)}"
    shutdown = trio.Event()
    watch = Watch()
    async with (
        open_client(broker.tcp_url) as client,
        trio.open_nursery() as watching,
    ):
        await watching.start(partial(watch.pump, client, swarm))
        async with trio.open_nursery() as agents:
            for i, role in enumerate(roles):
                config = AgentConfig(
                    role=role,
                    agent_id=f"{swarm}-{role}-{i}",
                    swarm=swarm,
                    broker=broker.tcp_url,
                    max_tasks=1,
                    heartbeat_interval=0.5,
                    lease_time=2.0,
                    retry_initial_delay=0.01,
                    dispatch=mode,
                )
                await agents.start(
                    partial(run_agent, config, executors=work.registry, shutdown=shutdown)
                )
            try:
                yield swarm, client, watch
            finally:
                shutdown.set()
        watching.cancel_scope.cancel()


async def submit(client: Client, swarm: str, task_id: str, task_type: str, **fields: Any) -> None:
    body = {"task_id": task_id, "type": task_type, **fields}
    await client.publish(f"{swarm}/tasks/new", encode(None, None, body), qos=1)


def retained_state(watch: Watch, swarm: str, task_id: str) -> dict[str, Any] | None:
    """The last retained state of the task the watcher saw."""
    states = watch.on(f"{swarm}/tasks/state/{task_id}")
    return states[-1] if states else None


@pytest.mark.parametrize("mode", MODES)
async def test_cancel_stops_a_running_task_and_queued_ones_never_start(
    broker: MosquittoBroker, mode: str
) -> None:
    work = Work()
    with trio.fail_after(60):
        async with swarm_of(broker, mode, work, "testing", "general") as (swarm, client, watch):
            await submit(client, swarm, "long-1", "testing.run", payload={"sleep": 600})
            await work.started_event("long-1").wait()
            # behind it (max_tasks 1), and one for a role nobody online has
            await submit(client, swarm, "queued-1", "testing.run", payload={})
            await submit(client, swarm, "db-1", "database.backup", payload={})
            if mode == "broadcast":  # kept as a pending marker by the one agent
                await watch.until(lambda: watch.on(f"{swarm}/tasks/pending/db-1"))
            else:  # the dispatcher's queued records
                await watch.until(lambda: retained_state(watch, swarm, "db-1"))

            code, out = await sheri(broker, swarm, "retry", "long-1")
            assert code == 1, out  # it has not failed
            assert "task long-1 is running (held by" in out
            assert "it has not failed" in out

            code, out = await sheri(broker, swarm, "cancel", "queued-1")
            assert code == 0, out
            assert "cancelled task queued-1: it had not started and never will" in out
            code, out = await sheri(broker, swarm, "cancel", "db-1", "--json")
            assert code == 0, out
            assert json.loads(out)["outcome"] == "cancelled"
            code, out = await sheri(broker, swarm, "cancel", "long-1")
            assert code == 0, out
            assert "cancelled task long-1: its run on" in out
            assert "was stopped" in out
            code, out = await sheri(broker, swarm, "cancel", "long-1")
            assert code == 1, out
            assert "task long-1 had already finished: cancelled" in out
            code, out = await sheri(broker, swarm, "cancel", "no-such-task", "--timeout", "5")
            assert code == 2, out
            assert "unknown task no-such-task" in out
            if mode == "broadcast":  # both agents said so
                assert "none of the 2 online agents knows it" in out

            # the agent keeps working: a task after all this runs
            await submit(client, swarm, "after-1", "testing.run", payload={})
            await watch.until(lambda: watch.outcomes(swarm, "after-1"))
            for task_id in ("long-1", "queued-1", "db-1"):
                (failed,) = watch.outcomes(swarm, task_id)
                assert failed["reason"] == "cancelled", failed
                state = retained_state(watch, swarm, task_id)
                assert state is not None
                assert state["state"] == "cancelled"
                assert state["task"]["task_id"] == task_id  # kept for a retry
            if mode == "broadcast":  # its pending marker was cleared (an empty retained)
                marker = [b for t, b, _ in watch.items if t == f"{swarm}/tasks/pending/db-1"]
                assert marker[-1] is None
    assert work.stopped == {"long-1"}
    assert work.runs == Counter({"long-1": 1, "after-1": 1})  # queued-1 never ran


@pytest.mark.parametrize("mode", MODES)
async def test_retry_submits_a_failed_task_again_and_keeps_its_outcome(
    broker: MosquittoBroker, mode: str
) -> None:
    work = Work()
    with trio.fail_after(60):
        async with swarm_of(broker, mode, work, "testing") as (swarm, client, watch):
            await submit(
                client, swarm, "flaky-1", "testing.run", payload={"fail": True}, max_retries=0
            )
            await watch.until(lambda: watch.outcomes(swarm, "flaky-1"))
            await watch.until(lambda: retained_state(watch, swarm, "flaky-1"))

            code, out = await sheri(broker, swarm, "retry", "flaky-1")
            assert code == 0, out
            assert "retrying task flaky-1 as flaky-1.retry-1" in out
            await watch.until(lambda: watch.outcomes(swarm, "flaky-1.retry-1"))
            (new,) = watch.on(f"{swarm}/tasks/new", "flaky-1.retry-1")
            assert new["retry_of"] == "flaky-1"
            assert (new["payload"], new["max_retries"]) == ({"fail": True}, 0)
            (done,) = watch.outcomes(swarm, "flaky-1.retry-1")
            assert done["status"] == "success"
            await watch.until(
                lambda: (
                    (s := retained_state(watch, swarm, "flaky-1.retry-1")) and s["state"] == "done"
                )
            )

            code, out = await sheri(broker, swarm, "retry", "flaky-1", "--json")
            assert code == 0, out
            assert json.loads(out)["retry_id"] == "flaky-1.retry-2"  # the next free number
            await watch.until(lambda: watch.outcomes(swarm, "flaky-1.retry-2"))

            code, out = await sheri(broker, swarm, "retry", "flaky-1.retry-1")
            assert code == 1, out
            assert "completed: only a failed task is retried" in out
            code, out = await sheri(broker, swarm, "retry", "no-such-task")
            assert code == 2, out
            assert "unknown task no-such-task" in out
            code, out = await sheri(broker, swarm, "retry", "../x")
            assert code == 2, out
            assert "is not a task id" in out

            # the old task keeps its one final outcome and its state
            (failed,) = watch.outcomes(swarm, "flaky-1")
            assert failed["reason"] == "error"
            states = watch.on(f"{swarm}/tasks/state/flaky-1")
            assert states[-1]["state"] == "failed"
    assert work.runs == Counter({"flaky-1": 1, "flaky-1.retry-1": 1, "flaky-1.retry-2": 1})


@pytest.mark.parametrize("mode", MODES)
async def test_a_malformed_cancel_gets_a_published_error_and_the_agent_keeps_working(
    broker: MosquittoBroker, mode: str
) -> None:
    work = Work()
    with trio.fail_after(60):
        async with swarm_of(broker, mode, work, "testing") as (swarm, client, watch):
            for bad in (
                b"not json",
                encode(None, None, {"task_id": "x", "request_id": 5}),
                encode(None, None, {"task_id": "../etc", "request_id": "r"}),
            ):
                await client.publish(f"{swarm}/tasks/cancel", bad, qos=1)
            errors = await watch.until(lambda: len(e := watch.on(f"{swarm}/errors")) >= 3 and e)
            assert {e["topic"] for e in errors} == {f"{swarm}/tasks/cancel"}
            assert any("request_id" in e["error"] for e in errors)
            await submit(client, swarm, "still-1", "testing.run", payload={})
            await watch.until(lambda: watch.outcomes(swarm, "still-1"))
    assert work.runs == Counter({"still-1": 1})
