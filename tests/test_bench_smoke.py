"""The bench's client subprocess still runs (no timing is asserted: see docs/bench.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sheri_trio.testing import MosquittoBroker

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("qos", [0, 1])
def test_native_client_subprocess_reports_the_count(broker: MosquittoBroker, qos: int) -> None:
    env = {**os.environ, "BENCH_URL": broker.tcp_url}  # the password stays off the command line
    proc = subprocess.run(
        [sys.executable, "-m", "bench.clients", "native", "-n", "200", "--qos", str(qos)],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert result["kind"] == "native"
    assert result["transport"] == "tcp"
    assert result["qos"] == qos
    assert result["sent"] == 200
    assert result["received"] == 200
    assert result["lost"] == 0
    assert result["msgs_per_s"] > 0


def test_task_rate_subprocess_counts_every_task_once(broker: MosquittoBroker) -> None:
    env = {**os.environ, "BENCH_URL": broker.tcp_url}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.clients", "tasks", "--agents", "3", "--tasks", "30",
         "--lone", "3", "--timeout", "30"],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=90,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert (result["completed"], result["duplicates"], result["losses"]) == (30, 0, 0)
    assert result["lone_tasks"] == 3
    assert 0 < result["lone_latency_p50_ms"] <= result["lone_latency_p99_ms"]
    assert result["deliveries_per_task"] > 3  # every agent sees each task's messages


def _bench_clients(env: dict[str, str], *argv: str, timeout: float = 120) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.clients", *argv],
        cwd=REPO, env={**os.environ, **env}, stdin=subprocess.DEVNULL, capture_output=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


def test_all_types_workload_is_counted_at_the_broker(broker: MosquittoBroker) -> None:
    env = {"BENCH_URL": broker.tcp_url, "BENCH_BROKER_PID": str(broker.pid)}
    result = _bench_clients(
        env, "tasks", "--agents", "9", "--tasks", "26", "--workload", "all-types",
        "--lone", "2", "--timeout", "30",
    )  # fmt: skip
    assert (result["completed"], result["duplicates"], result["losses"]) == (26, 0, 0)
    assert (result["types"], result["roles"]) == (13, {"general": 2} | dict.fromkeys(
        ["deployment", "testing", "review", "security", "monitoring", "documentation",
         "database"], 1))  # fmt: skip
    assert result["dispatch"] == "broadcast"
    # every submission reaches the 9 agents: the broker's own count says at least that
    assert isinstance(result["broker_deliveries"], int)
    assert result["broker_deliveries"] >= 26 * 9
    assert result["agents_cpu_per_task_us"] > 0
    assert "broker_cpu_per_task_us" in result


def test_sleeping_tasks_with_few_slots_all_complete(broker: MosquittoBroker) -> None:
    result = _bench_clients(
        {"BENCH_URL": broker.tcp_url}, "tasks", "--agents", "9", "--tasks", "13",
        "--workload", "all-types", "--task-seconds", "0.2", "--max-tasks", "1",
        "--timeout", "30",
    )  # fmt: skip
    assert (result["completed"], result["duplicates"], result["losses"]) == (13, 0, 0)
    assert result["task_seconds"] == 0.2
    assert result["seconds"] >= 0.2


def test_a_workload_without_its_roles_is_refused() -> None:
    import trio

    from bench.tasks import task_rate

    with pytest.raises(ValueError, match="no agent of role"):
        trio.run(lambda: task_rate("mqtt://127.0.0.1:1", agents=3, workload="all-types"))
    with pytest.raises(ValueError, match="no dispatch option"):
        trio.run(lambda: task_rate("mqtt://127.0.0.1:1", dispatch="dispatcher"))


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from bench.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield {"BENCH_REDIS_URL": server.url, "BENCH_REDIS_PID": str(server.pid)}
    finally:
        server.stop()


@pytest.mark.parametrize("peer", ["celery-prefork", "celery-threads", "dramatiq", "arq"])
def test_peer_counts_every_result_and_execution(redis_url: dict[str, str], peer: str) -> None:
    pytest.importorskip({"celery-prefork": "celery", "celery-threads": "celery"}.get(peer, peer))
    result = _bench_clients(
        redis_url, "peer", "--peer", peer, "--tasks", "30", "--lone", "2", "--workers", "2",
        "--timeout", "60",
    )  # fmt: skip
    assert (result["completed"], result["executions"]) == (30, 30)
    assert (result["duplicates"], result["losses"]) == (0, 0)
    assert result["lone_tasks"] == 2
    assert 0 < result["lone_latency_p50_ms"] <= result["lone_latency_p99_ms"]


def test_summaries_give_ratios_per_repetition() -> None:
    from bench.summary import summarize_peers, summarize_sizes

    def run(rep: int, rate: float, **kw: object) -> dict[str, Any]:
        return {"rep": rep, "tasks_per_s": rate, "duplicates": 0, "losses": 0, "tasks": 10,
                "lone_latency_p50_ms": 1000 / rate, **kw}  # fmt: skip

    sizes = summarize_sizes(
        {
            "runs": [
                run(1, 10, agents=9),
                run(1, 50, agents=90),
                run(2, 20, agents=9),
                run(2, 60, agents=90),
            ]
        }
    )
    assert sizes["ratio"] == {"num": 90, "den": 9, "median": 4.0, "samples": [5.0, 3.0]}
    assert [e["agents"] for e in sizes["summary"]] == [9, 90]
    peers = summarize_peers(
        {
            "rows": ["sheri-trio", "arq"],
            "runs": [
                run(1, 100, row="sheri-trio"),
                run(1, 50, row="arq"),
                run(2, 100, row="sheri-trio"),
                run(2, 25, row="arq"),
            ],
        }
    )
    arq = peers["summary"][1]
    assert arq["ours_over_peer"] == {"median": 3.0, "samples": [2.0, 4.0]}
    assert arq["lone_peer_over_ours"]["median"] == 3.0
    assert "at least once" in arq["guarantee"]
