"""The bench's client subprocesses still run, and still measure what they claim to: each
one's counts (messages sent, received, lost; deliveries; round trips; tasks completed,
duplicates, losses) are asserted exactly. No timing is asserted beyond "measured"
(see docs/bench.md)."""

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


def _bench(url: str, *args: str, timeout: float = 60) -> dict[str, Any]:
    """Run ``python -m bench.clients ARGS`` against ``url``; its JSON result."""
    env = {**os.environ, "BENCH_URL": url}  # the password stays off the command line
    proc = subprocess.run(
        [sys.executable, "-m", "bench.clients", *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


def _is_rate(rate: float, count: int, seconds: float, digits: int = 4) -> bool:
    """``rate`` (rounded to 0.1) is ``count`` over ``seconds`` (rounded to ``digits``)."""
    half = 0.5 * 10.0**-digits
    return count / (seconds + half) - 0.05 <= rate <= count / (seconds - half) + 0.05


def _assert_throughput(result: dict[str, Any], kind: str, transport: str, qos: int) -> None:
    assert (result["kind"], result["transport"], result["qos"]) == (kind, transport, qos)
    assert (result["sent"], result["received"], result["lost"]) == (200, 200, 0)
    assert result["size"] == 256
    # the rate is what was counted over the time measured
    assert result["seconds"] > 0
    assert result["publish_seconds"] > 0
    assert _is_rate(result["msgs_per_s"], 200, result["seconds"])
    assert result["client_cpu_s"] >= 0


@pytest.mark.parametrize("qos", [0, 1])
def test_native_client_subprocess_reports_the_count(broker: MosquittoBroker, qos: int) -> None:
    result = _bench(broker.tcp_url, "native", "-n", "200", "--qos", str(qos))
    _assert_throughput(result, "native", "tcp", qos)


def test_native_client_over_websocket(broker: MosquittoBroker) -> None:
    result = _bench(broker.ws_url, "native", "-n", "200", "--qos", "1")
    _assert_throughput(result, "native", "ws", 1)


@pytest.mark.parametrize("kind", ["native-gmqtt", "gmqtt", "paho", "mosquitto-c"])
def test_other_clients_report_the_count(broker: MosquittoBroker, kind: str) -> None:
    result = _bench(broker.tcp_url, kind, "-n", "200", "--qos", "1")
    _assert_throughput(result, kind, "tcp", 1)
    if kind == "mosquitto-c":
        assert result["pub_exit"] == 0
        assert "partial" not in result


def test_fanout_counts_every_delivery(broker: MosquittoBroker) -> None:
    result = _bench(broker.tcp_url, "fanout-c", "-n", "200", "--subscribers", "3", "--qos", "1")
    assert result["kind"] == "fanout-c"
    assert (result["messages"], result["subscribers"]) == (200, 3)
    assert result["deliveries"] == result["expected"] == 600
    assert result["pub_exit"] == 0
    assert _is_rate(result["deliveries_per_s"], 600, result["seconds"])


def test_latency_counts_its_round_trips(broker: MosquittoBroker) -> None:
    result = _bench(broker.tcp_url, "latency", "-n", "20", "--warmup", "5", "--qos", "1")
    assert (result["kind"], result["qos"], result["round_trips"]) == ("latency", 1, 20)
    ordered = [result[k] for k in ("min_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms")]
    assert ordered == sorted(ordered)
    assert 0 < result["min_ms"] <= result["mean_ms"] <= result["max_ms"]


def test_task_rate_subprocess_counts_every_task_once(broker: MosquittoBroker) -> None:
    result = _bench(
        broker.tcp_url,
        *("tasks", "--agents", "3", "--tasks", "30", "--lone", "3", "--timeout", "30"),
        timeout=90,
    )
    assert result["kind"] == "tasks"
    assert (result["agents"], result["tasks"]) == (3, 30)
    assert (result["completed"], result["duplicates"], result["losses"]) == (30, 0, 0)
    assert result["lone_tasks"] == 3
    assert 0 < result["lone_latency_p50_ms"] <= result["lone_latency_p99_ms"]
    assert 0 < result["latency_p50_ms"] <= result["latency_p99_ms"]
    assert _is_rate(result["tasks_per_s"], 30, result["seconds"], digits=3)
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


@pytest.mark.parametrize("dispatch", ["dispatcher", "broadcast"])
def test_a_swarm_over_two_processes_counts_every_task_once(
    broker: MosquittoBroker, dispatch: str
) -> None:
    env = {"BENCH_URL": broker.tcp_url, "BENCH_BROKER_PID": str(broker.pid)}
    result = _bench_clients(
        env, "tasks", "--agents", "9", "--tasks", "39", "--workload", "all-types",
        "--processes", "2", "--dispatch", dispatch, "--lone", "2", "--timeout", "30",
    )  # fmt: skip
    assert (result["processes"], result["agents"]) == (2, 9)
    # the executions counted in the child process are in the totals: each task ran once
    assert (result["completed"], result["duplicates"], result["losses"]) == (39, 0, 0)
    assert result["lone_tasks"] == 2
    assert result["agents_cpu_per_task_us"] > 0


@pytest.mark.parametrize("dispatch", ["dispatcher", "broadcast"])
def test_presence_counts_a_swarm_started_at_once(broker: MosquittoBroker, dispatch: str) -> None:
    result = _bench_clients(
        {"BENCH_URL": broker.tcp_url}, "presence", "--agents", "9", "--dispatch", dispatch,
        "--heartbeat", "0.5", "--intervals", "4", "--timeout", "30",
    )  # fmt: skip
    assert (result["kind"], result["agents"], result["online"]) == ("presence", 9, 9)
    assert 0 < result["half_online_s"] <= result["start_s"]
    assert result["window_s"] >= 4 * 0.5
    per_agent = result["deliveries_per_interval_per_agent"]
    if dispatch == "dispatcher":
        # each heartbeat reaches the dispatcher only, and nothing else is periodic for the
        # agents (dispatch/view reached every agent every interval once: 1.66)
        assert 0.5 < per_agent <= 1.3
    else:
        # each heartbeat reaches the 8 other agents: O(n^2) (a loaded machine delays beats,
        # so fewer than 8 per interval may be counted; still far above the dispatcher's 1)
        assert per_agent >= 4


@pytest.mark.parametrize("dispatch", ["dispatcher", "broadcast"])
def test_retained_start_times_an_agent_next_to_finished_tasks(
    broker: MosquittoBroker, dispatch: str
) -> None:
    result = _bench_clients(
        {"BENCH_URL": broker.tcp_url}, "retained", "--records", "200", "--dispatch", dispatch,
        "--reps", "2",
    )  # fmt: skip
    assert (result["kind"], result["records"], result["dispatch"]) == ("retained", 200, dispatch)
    assert len(result["online_s"]) == 2
    assert 0 < result["online_s_median"] == max(result["online_s"])


def test_a_workload_without_its_roles_is_refused() -> None:
    import trio

    from bench.tasks import task_rate

    with pytest.raises(ValueError, match="no agent of role"):
        trio.run(lambda: task_rate("mqtt://127.0.0.1:1", agents=3, workload="all-types"))
    with pytest.raises(ValueError, match="dispatch: must be one of broadcast, dispatcher"):
        trio.run(lambda: task_rate("mqtt://127.0.0.1:1", dispatch="nonsense"))


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from sheri_trio.testing import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis"), password=True) as server:
        yield {"BENCH_REDIS_URL": server.url(credentials=True), "BENCH_REDIS_PID": str(server.pid)}


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


def test_the_stores_section_runs_the_swarm_through_a_claim_store(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """bench.clients tasks with ``BENCH_CLAIM_STORE``: the agents decide through it (a
    private redis-server), and every task still runs once."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from sheri_trio.testing import RedisServer

    with RedisServer(tmp_path / "redis") as server:
        env = {"BENCH_URL": broker.tcp_url, "BENCH_CLAIM_STORE": server.url()}
        result = _bench_clients(
            env, "tasks", "--agents", "9", "--tasks", "26", "--workload", "all-types",
            "--dispatch", "dispatcher", "--lone", "2", "--timeout", "60",
        )  # fmt: skip
        import redis

        with redis.Redis.from_url(server.url()) as r:
            held = int(r.dbsize())
    assert (result["completed"], result["duplicates"], result["losses"]) == (26, 0, 0)
    assert held > 0  # the holds and outcomes are in the store


def test_store_summary_gives_ratios_to_the_broker_per_repetition() -> None:
    from bench.summary import summarize_stores

    def run(rep: int, store: str, rate: float) -> dict[str, Any]:
        return {"rep": rep, "agents": 9, "store": store, "tasks_per_s": rate,
                "duplicates": 0, "losses": 0}  # fmt: skip

    out = summarize_stores(
        {
            "agents": [9],
            "stores": {"broker": "broker", "redis": "redis://x/0"},
            "runs": [
                run(1, "broker", 100.0),
                run(1, "redis", 50.0),
                run(2, "redis", 90.0),
                run(2, "broker", 100.0),
            ],
        }
    )
    redis = next(e for e in out["summary"] if e["store"] == "redis")
    assert redis["vs_broker"] == {"median": 0.7, "samples": [0.5, 0.9]}
    assert redis["tasks_per_s"]["median"] == 70.0
