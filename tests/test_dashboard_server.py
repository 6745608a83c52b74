"""``run_dashboard`` and ``sheri dashboard`` on a real mosquitto, over real HTTP
(hypercorn's trio worker): the event stream (a snapshot, then batched updates, at most
PAGE_HZ a second), the broker's loss and return on the stream, and the command's clear
errors (a port in use, a locked history); in dispatcher mode, the custody records and
the pending count per role."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import aclosing, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx2
import orjson
import pytest
import trio

from sheri_trio.config import Connection
from sheri_trio.dashboard import PAGE_HZ, DashboardError, DashboardOptions, run_dashboard
from sheri_trio.mqtt import open_client
from sheri_trio.swarm import AgentConfig, encode, run_agent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    from sheri_trio.dashboard import Running, SwarmModel
    from sheri_trio.testing import MosquittoBroker

SWARM = "t-dash-server"


def options(broker: MosquittoBroker, tmp_path: Path, **kw: Any) -> DashboardOptions:
    values: dict[str, Any] = {
        "conn": Connection(broker.tcp_url, SWARM, {}),
        "db": tmp_path / "history.sqlite3",
        "retention": 3600.0,
        "port": 0,
        "token": "tok",
    }
    values.update(kw)
    return DashboardOptions(**values)


@asynccontextmanager
async def event_stream(
    http: httpx2.AsyncClient, url: str
) -> AsyncIterator[Callable[[], Awaitable[tuple[str, Any]]]]:
    """The next (event, data) pair of the server-sent event stream at ``url``; read to
    its end on the way out (the caller stops the server)."""
    async with http.stream("GET", url) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.aiter_lines()
        async with aclosing(lines):

            async def next_event() -> tuple[str, Any]:
                name, data = "", b""
                async for line in lines:
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        data = line[6:].encode()
                    elif line == "" and name:
                        return name, orjson.loads(data)
                raise AssertionError("the event stream ended")

            yield next_event
            async for _ in lines:  # to its end (the server's), so nothing is left half-read
                pass


async def test_the_event_stream_batches_updates_and_tells_of_the_broker(
    fresh_broker: MosquittoBroker, tmp_path: Path
) -> None:
    broker = fresh_broker
    shutdown = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(
                partial(run_dashboard, options(broker, tmp_path), shutdown=shutdown)
            )
            async with (
                httpx2.AsyncClient(timeout=30) as http,
                event_stream(http, running.url + "events") as next_event,
            ):
                name, snapshot = await next_event()
                assert (name, snapshot["swarm"], snapshot["broker"]) == ("snapshot", SWARM, True)
                assert snapshot["writable"] is False  # no token sent
                async with open_client(broker.tcp_url) as client:
                    started = trio.current_time()
                    for i in range(400):
                        body = {"task_id": f"s-{i}", "type": "testing.run"}
                        await client.publish(f"{SWARM}/tasks/new", encode(None, None, body), qos=1)
                seen: set[str] = set()
                updates = 0
                while len(seen) < 400:
                    name, data = await next_event()
                    assert name == "update"
                    updates += 1
                    seen.update(t["task_id"] for t in data["tasks"])
                elapsed = trio.current_time() - started
                # batched: never more than PAGE_HZ updates a second (one at the start)
                assert updates <= PAGE_HZ * elapsed + 1, (updates, elapsed)
                await trio.to_thread.run_sync(broker.stop)
                name, data = await next_event()
                while name != "broker":
                    name, data = await next_event()
                assert data == {"connected": False}
                await trio.to_thread.run_sync(broker.start)
                name, data = await next_event()
                while name != "broker":
                    name, data = await next_event()
                assert data == {"connected": True}
                metrics = await http.get(running.url + "metrics")
                assert f'sheri_dashboard_broker_connected{{swarm="{SWARM}"}} 1.0' in metrics.text
                shutdown.set()  # ends the event stream


async def test_a_port_in_use_and_a_locked_history_are_clear_errors(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        with pytest.raises(DashboardError, match=rf"cannot listen on 127.0.0.1:{port}"):
            with trio.fail_after(20):
                await run_dashboard(options(broker, tmp_path, port=port))
    finally:
        taken.close()
    shutdown = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(run_dashboard, options(broker, tmp_path), shutdown=shutdown)
            )
            env = {**os.environ, "SHERI_BROKER": broker.tcp_url, "SHERI_SWARM": SWARM}
            db = str(tmp_path / "history.sqlite3")
            result = await trio.run_process(
                [sys.executable, "-m", "sheri_trio", "dashboard", "--port", "0", "--db", db],
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            shutdown.set()
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (
        f"sheri: error: history file {db} is locked by another process (another sheri "
        "dashboard?): stop it, or pass another --db"
    )


def test_bad_flags_are_usage_errors(tmp_path: Path) -> None:
    for args, says in (
        (["--retention", "soon"], "--retention: must be a duration such as 30s"),
        (["--port", "70000"], "--port: must be an integer"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "sheri_trio", "dashboard", *args],
            capture_output=True,
            text=True,
            check=False,
            cwd=tmp_path,
        )
        assert result.returncode == 2, result.stderr
        assert says in result.stderr
    (tmp_path / "sheri.toml").write_text('[dashboard]\nretention = "-1d"\n')
    result = subprocess.run(
        [sys.executable, "-m", "sheri_trio", "dashboard"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "sheri.toml: dashboard.retention: must be a positive duration" in result.stderr


async def until(running: Running, condition: Callable[[], object]) -> None:
    """Wait for the page's batches (the hub's) until ``condition()`` holds."""
    with running.board.hub.open() as batches:
        while not condition():
            await batches.receive()


def state_of(model: SwarmModel, task_id: str) -> str | None:
    task = model.tasks.get(task_id)
    return None if task is None else task.state


async def test_in_dispatcher_mode_custody_records_and_pending_per_role(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    swarm = "t-dash-dispatch"
    config = AgentConfig(
        role="testing",
        agent_id="dd-tester",
        swarm=swarm,
        broker=broker.tcp_url,
        heartbeat_interval=0.5,
        lease_time=2.0,
        grace_period=1.0,
        dispatch="dispatcher",
        executor_config={"executors": {"simulate": True}},
    )
    leave, shutdown = trio.Event(), trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_agent, config, shutdown=leave))
            running: Running = await nursery.start(
                partial(
                    run_dashboard,
                    options(broker, tmp_path, conn=Connection(broker.tcp_url, swarm, {})),
                    shutdown=shutdown,
                )
            )
            model = running.board.model
            async with open_client(broker.tcp_url) as client:
                with trio.fail_after(20):  # the agent's dispatcher term is up
                    await until(
                        running, lambda: "dd-tester" in model.agents and model.dispatch_view
                    )
                for body in (
                    {"task_id": "dd-1", "type": "testing.run"},
                    {"task_id": "dd-2", "type": "deployment.deploy"},  # nobody may take it
                ):
                    await client.publish(f"{swarm}/tasks/new", encode(None, None, body), qos=1)
            with trio.fail_after(20):
                await until(running, lambda: state_of(model, "dd-1") == "done")
                await until(running, lambda: state_of(model, "dd-2") in ("queued", "pending"))
            assert model.tasks["dd-1"].agent == "dd-tester"
            assert model.pending_by_role()["deployment"] == 1
            async with httpx2.AsyncClient() as http:
                text = (await http.get(running.url + "metrics")).text
            assert f'sheri_tasks_pending{{role="deployment",swarm="{swarm}"}} 1.0' in text
            assert (
                f'sheri_tasks_finished_total{{outcome="completed",swarm="{swarm}",'
                'type="testing.run"} 1.0'
            ) in text
            shutdown.set()
            leave.set()
