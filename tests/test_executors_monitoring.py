"""monitoring.health against local HTTP and TCP servers; monitoring.alerts thresholds."""

from __future__ import annotations

import socket
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
import trio
from executor_helpers import make_ctx

from sheri_trio.executors import TaskConfigError, TaskPayloadError
from sheri_trio.executors._monitoring import alerts, health

if TYPE_CHECKING:
    from pathlib import Path


async def _http_handler(stream: trio.SocketStream) -> None:
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        request += chunk
    path = request.split(b" ", 2)[1]
    status = b"200 OK" if path == b"/ok" else b"500 Internal Server Error"
    body = b"fine" if path == b"/ok" else b"broken"
    await stream.send_all(
        b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n" + body
    )  # fmt: skip
    await stream.aclose()


async def _silent_handler(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()  # accepts, never answers: the check's timeout fires


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def servers(nursery: trio.Nursery) -> dict[str, int]:
    http = await nursery.start(partial(trio.serve_tcp, _http_handler, 0, host="127.0.0.1"))
    silent = await nursery.start(partial(trio.serve_tcp, _silent_handler, 0, host="127.0.0.1"))
    return {
        "http": http[0].socket.getsockname()[1],
        "silent": silent[0].socket.getsockname()[1],
        "closed": _closed_port(),
    }


async def test_http_and_tcp_checks(servers: dict[str, int], tmp_path: Path) -> None:
    http, silent, closed = servers["http"], servers["silent"], servers["closed"]
    targets = [
        f"http://127.0.0.1:{http}/ok",
        f"http://127.0.0.1:{http}/broken",
        f"tcp://127.0.0.1:{http}",
        f"tcp://127.0.0.1:{closed}",
        f"http://127.0.0.1:{silent}/",
    ]
    config = {"monitoring": {"allowed_hosts": ["127.0.0.1"]}}
    ctx, rec = make_ctx(
        "monitoring.health", {"targets": targets, "timeout": 0.5}, config=config, state=tmp_path
    )
    result = await health(ctx)
    checks = {c["target"]: c for c in result["checks"]}
    assert [c["target"] for c in result["checks"]] == targets  # in the order given
    assert checks[targets[0]]["ok"]
    assert checks[targets[0]]["detail"] == "HTTP 200"
    assert not checks[targets[1]]["ok"]
    assert checks[targets[1]]["detail"] == "HTTP 500"
    assert checks[targets[2]]["ok"]
    assert checks[targets[2]]["detail"] == "connected"
    assert not checks[targets[3]]["ok"]
    assert "connect failed" in checks[targets[3]]["detail"]
    assert not checks[targets[4]]["ok"]
    assert "within 0.5 s" in checks[targets[4]]["detail"]
    assert all(isinstance(c["latency_ms"], float) for c in result["checks"])
    assert result["status"] == "degraded"
    assert result["errors"] == 3
    assert result["uptime"] == 40.0
    assert len(rec.messages(kind="check")) == 5


async def test_configured_targets_all_healthy(servers: dict[str, int], tmp_path: Path) -> None:
    config = {"monitoring": {"targets": [f"tcp://127.0.0.1:{servers['http']}"]}}
    ctx, _ = make_ctx("monitoring.health", {}, config=config, state=tmp_path)
    result = await health(ctx)
    assert (result["status"], result["uptime"], result["errors"]) == ("healthy", 100.0, 0)


async def test_no_targets_and_bad_targets(tmp_path: Path) -> None:
    ctx, _ = make_ctx("monitoring.health", {}, state=tmp_path)
    with pytest.raises(TaskConfigError, match=r"no targets.*\[monitoring\] targets"):
        await health(ctx)
    anyhost = {"monitoring": {"allowed_hosts": ["*"]}}
    for targets, message in [
        (["file:///etc/passwd"], "scheme must be http, https or tcp"),
        (["tcp://localhost"], "need a port"),
        (["http://user:pw@localhost/"], "credentials"),
        ("http://x", "must be a list"),
    ]:
        ctx, _ = make_ctx("monitoring.health", {"targets": targets}, config=anyhost, state=tmp_path)
        with pytest.raises(TaskPayloadError, match=message):
            await health(ctx)
    config = {"monitoring": {"allowed_hosts": ["127.0.0.1"]}}
    ctx, _ = make_ctx(
        "monitoring.health", {"targets": ["http://10.0.0.1/"]}, config=config, state=tmp_path
    )
    with pytest.raises(TaskPayloadError, match="not in \\[monitoring\\] allowed_hosts"):
        await health(ctx)


async def test_payload_targets_are_refused_unless_allowed(
    servers: dict[str, int], tmp_path: Path
) -> None:
    target = f"tcp://127.0.0.1:{servers['http']}"
    for config in ({}, {"monitoring": {"targets": [target]}}):
        ctx, _ = make_ctx("monitoring.health", {"targets": [target]}, config=config, state=tmp_path)
        with pytest.raises(TaskPayloadError, match="refused unless \\[monitoring\\] allowed_hosts"):
            await health(ctx)
    for hosts in (["127.0.0.1"], ["*"]):
        config = {"monitoring": {"allowed_hosts": hosts}}
        ctx, _ = make_ctx("monitoring.health", {"targets": [target]}, config=config, state=tmp_path)
        assert (await health(ctx))["status"] == "healthy"


def _swarm(**over: Any) -> dict[str, Any]:
    view: dict[str, Any] = {
        "agents": [
            {"agent_id": "a1", "role": "testing", "online": True, "last_seen_age": 2.0},
            {"agent_id": "a2", "role": "deployment", "online": True, "last_seen_age": 2.0},
        ],
        "outcomes": {"completed": 10, "failed": 0},
    }
    view.update(over)
    return view


async def test_alerts_raise_and_resolve(servers: dict[str, int], tmp_path: Path) -> None:
    config = {"monitoring": {"alerts": {"heartbeat_max_age": 20, "failure_rate": 0.25}}}
    state = tmp_path / "state"
    ctx, _ = make_ctx("monitoring.alerts", {}, config=config, state=state)
    ctx.swarm = _swarm()
    quiet = await alerts(ctx)
    assert (quiet["active_alerts"], quiet["resolved"], quiet["alerts"]) == (0, 0, [])
    assert "unhealthy_targets, latency_ms: no recent monitoring.health results" in quiet["skipped"]

    # a failed health check, an offline agent, a silent one, too many failures
    h, _ = make_ctx(
        "monitoring.health",
        {"targets": [f"tcp://127.0.0.1:{servers['closed']}"]},
        config={"monitoring": {"allowed_hosts": ["127.0.0.1"]}},
        state=state,
    )
    await health(h)
    ctx.swarm = _swarm(
        agents=[
            {"agent_id": "a1", "role": "testing", "online": False, "last_seen_age": 50.0},
            {"agent_id": "a2", "role": "deployment", "online": True, "last_seen_age": 45.0},
        ],
        outcomes={"completed": 6, "failed": 4},
    )
    loud = await alerts(ctx)
    kinds = sorted(a["kind"] for a in loud["alerts"])
    assert kinds == ["agent_offline", "failure_rate", "heartbeat_age", "unhealthy_target"]
    assert loud["active_alerts"] == 4
    assert loud["resolved"] == 0
    assert loud["alerts"][0]["severity"] == "critical"

    # the agents recover, the target stays down: three resolved, one still active
    ctx.swarm = _swarm()
    after = await alerts(ctx)
    assert after["active_alerts"] == 1
    assert after["alerts"][0]["kind"] == "unhealthy_target"
    assert after["resolved"] == 3
    assert after["alerts"][0]["since"] == loud["alerts"][0]["since"] or after["alerts"][0][
        "since"
    ] in {a["since"] for a in loud["alerts"]}


async def test_alerts_without_a_swarm_view_say_so(tmp_path: Path) -> None:
    ctx, _ = make_ctx("monitoring.alerts", {}, state=tmp_path)
    result = await alerts(ctx)
    assert result["active_alerts"] == 0
    assert any("no swarm view" in s for s in result["skipped"])
    ctx, _ = make_ctx("monitoring.alerts", {"command": "x"}, state=tmp_path)
    with pytest.raises(TaskPayloadError, match="cannot carry commands"):
        await alerts(ctx)
