"""Task queues of other projects, next to our swarm: ``python -m bench.clients peer``.

Each peer runs 9 workers on a private Redis (``$BENCH_REDIS_URL``, started by the
harness) and is driven the way its documentation shows: M no-op tasks submitted at once,
every result awaited at the submitter, then lone tasks one at a time. The no-op counts
its executions in Redis (``HINCRBY bench:exec <task id> 1``: one more Redis round trip
per task than a bare no-op), so losses and duplicates are counted in the workers too.

This module stays light: the worker processes import it (``count_execution``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

EXEC_KEY = "bench:exec"
READY_KEY = "bench:ready"
REPO = Path(__file__).resolve().parent.parent.parent

_client: Any = None


def _redis() -> Any:
    global _client
    if _client is None:  # one per process (prefork children make their own)
        import redis

        _client = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    return _client


def count_execution(task_id: str) -> None:
    _redis().hincrby(EXEC_KEY, task_id, 1)


def mark_ready() -> None:
    _redis().incr(READY_KEY)


@dataclass(frozen=True)
class Peer:
    id: str
    label: str
    layout: str  # what "9 workers" is for this peer
    guarantee: str  # as configured here


PEERS = {
    p.id: p
    for p in (
        Peer(
            "celery-prefork",
            "Celery, prefork pool",
            "celery worker --pool prefork --concurrency 9 (9 child processes)",
            "at most once: acks early (Celery's default, task_acks_late=False), a task "
            "whose worker dies while running it is lost; prefetched tasks not started yet "
            "go back to the queue after Redis's visibility_timeout (1 h)",
        ),
        Peer(
            "celery-threads",
            "Celery, threads pool",
            "celery worker --pool threads --concurrency 9 (1 process, 9 threads)",
            "at most once: acks early, as the prefork row",
        ),
        Peer(
            "dramatiq",
            "Dramatiq",
            "dramatiq --processes 9 --threads 1 (9 worker processes)",
            "at least once: acks late (after the actor returns); a dead worker's "
            "unacknowledged messages are requeued once its heartbeat times out (60 s)",
        ),
        Peer(
            "arq",
            "arq",
            "9 x arq WorkerSettings, max_jobs 1, poll_delay 5 ms (9 worker processes)",
            "at least once: a job stays queued until it succeeds or fails (arq's "
            "'pessimistic execution'); a dead worker's job runs again when its "
            "in-progress key expires",
        ),
    )
}


def worker_commands(peer: str, workers: int) -> tuple[list[list[str]], int]:
    """The worker processes to start, and how many ``mark_ready`` calls mean ready."""
    py = sys.executable
    if peer in ("celery-prefork", "celery-threads"):
        pool = peer.removeprefix("celery-")
        cmd = [py, "-m", "celery", "-A", "bench.peers.celery_app", "worker"]
        cmd += ["--pool", pool, "--concurrency", str(workers), "--loglevel", "WARNING"]
        return [cmd], 1
    if peer == "dramatiq":
        cmd = [py, "-m", "dramatiq", "bench.peers.dramatiq_app"]
        return [[*cmd, "--processes", str(workers), "--threads", "1"]], workers
    if peer == "arq":
        return [[py, "-m", "arq", "bench.peers.arq_app.WorkerSettings"]] * workers, workers
    raise SystemExit(f"bench.peers: unknown peer {peer!r}: one of {', '.join(PEERS)}")


# ------------------------------------------------------------------- submitters
class Submitter:
    """Submits tasks the way the peer's documentation shows, returns their results."""

    def burst(self, ids: list[str], timeout: float) -> list[Any]:
        raise NotImplementedError

    def one(self, task_id: str, timeout: float) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


class CelerySubmitter(Submitter):
    def __init__(self) -> None:
        from celery import group

        from .celery_app import noop

        self._group, self._noop = group, noop

    def burst(self, ids: list[str], timeout: float) -> list[Any]:
        result = self._group(self._noop.s(t) for t in ids).apply_async()
        return list(result.get(timeout=timeout))

    def one(self, task_id: str, timeout: float) -> Any:
        return self._noop.delay(task_id).get(timeout=timeout)


class DramatiqSubmitter(Submitter):
    def __init__(self) -> None:
        import dramatiq

        from .dramatiq_app import noop

        self._group, self._noop = dramatiq.group, noop

    def burst(self, ids: list[str], timeout: float) -> list[Any]:
        g = self._group(self._noop.message(t) for t in ids).run()
        return list(g.get_results(block=True, timeout=int(timeout * 1000)))

    def one(self, task_id: str, timeout: float) -> Any:
        message = self._noop.send(task_id)
        return message.get_result(block=True, timeout=int(timeout * 1000))


class ArqSubmitter(Submitter):
    def __init__(self) -> None:
        import asyncio

        from arq import create_pool
        from arq.connections import RedisSettings

        from .arq_app import POLL_DELAY

        self._poll = POLL_DELAY
        self._loop = asyncio.new_event_loop()
        settings = RedisSettings.from_dsn(os.environ["BENCH_REDIS_URL"])
        self._pool = self._loop.run_until_complete(create_pool(settings))

    def burst(self, ids: list[str], timeout: float) -> list[Any]:
        async def go() -> list[Any]:
            jobs = [await self._pool.enqueue_job("noop", t) for t in ids]
            return [await j.result(timeout=timeout, poll_delay=self._poll) for j in jobs]

        return self._loop.run_until_complete(go())

    def one(self, task_id: str, timeout: float) -> Any:
        return self.burst([task_id], timeout)[0]

    def close(self) -> None:
        self._loop.run_until_complete(self._pool.aclose())
        self._loop.close()


SUBMITTERS: dict[str, Callable[[], Submitter]] = {
    "celery-prefork": CelerySubmitter,
    "celery-threads": CelerySubmitter,
    "dramatiq": DramatiqSubmitter,
    "arq": ArqSubmitter,
}


# ---------------------------------------------------------------------- workers
@contextlib.contextmanager
def running_workers(commands: list[list[str]], logdir: Path) -> Iterator[list[int]]:
    """Start the worker processes (each in a process group of its own), stop them after."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, cmd in enumerate(commands):
            log = (logdir / f"worker-{i}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=REPO,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its pool processes share its group id
                )
            )
            log.close()
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # what is left of the group
            p.wait()


def _tail(logdir: Path) -> str:
    text = " | ".join(
        f.read_text(errors="replace").strip().splitlines()[-1]
        for f in sorted(logdir.glob("worker-*.log"))
        if f.read_text(errors="replace").strip()
    )
    return text[-400:]


def _ms(values: list[float]) -> dict[str, float]:
    """Nearest-rank p50 and p99 in milliseconds."""
    values = sorted(values)

    def rank(q: float) -> float:
        return values[max(1, min(len(values), round(q / 100 * len(values) + 0.5))) - 1]

    return {"p50": round(rank(50) * 1000, 2), "p99": round(rank(99) * 1000, 2)}


def run_peer(
    peer: str, *, tasks: int, lone: int, workers: int = 9, timeout: float = 300.0
) -> dict[str, Any]:
    from bench.machine import process_cpu_s, tree_cpu_s

    if peer not in PEERS:
        raise SystemExit(f"bench.peers: unknown peer {peer!r}: one of {', '.join(PEERS)}")
    commands, expected_ready = worker_commands(peer, workers)
    if peer == "arq":
        os.environ.setdefault("BENCH_ARQ_MAX_JOBS", "1")
    redis = _redis()
    redis.flushall()
    pid = os.environ.get("BENCH_REDIS_PID")
    redis_pid = int(pid) if pid else None
    out: dict[str, Any] = {"peer": peer, "workers": workers, "tasks": tasks}
    with (
        tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp,
        running_workers(commands, Path(tmp)) as pids,
    ):
        deadline = time.monotonic() + 60
        while int(redis.get(READY_KEY) or 0) < expected_ready:
            if time.monotonic() > deadline:
                raise SystemExit(f"{peer}: workers not ready after 60 s: {_tail(Path(tmp))}")
            time.sleep(0.05)
        submitter = SUBMITTERS[peer]()
        try:
            # Warm-up (not measured): every worker has taken tasks, connections are open.
            submitter.burst([f"warm-{i}" for i in range(workers * 5)], timeout=60)
            submitter.one("warm-one", timeout=60)
            redis.delete(EXEC_KEY)
            ids = [f"p-{i}" for i in range(tasks)]
            cpu0 = time.process_time()
            workers0 = sum(tree_cpu_s(p) or 0.0 for p in pids)
            redis0 = process_cpu_s(redis_pid)
            t0 = time.perf_counter()
            results = submitter.burst(ids, timeout=timeout)
            elapsed = time.perf_counter() - t0
            submitter_cpu = time.process_time() - cpu0
            workers_cpu = sum(tree_cpu_s(p) or 0.0 for p in pids) - workers0
            redis1 = process_cpu_s(redis_pid)
            executions = {k.decode(): int(v) for k, v in redis.hgetall(EXEC_KEY).items()}
            lone_latencies = []
            for i in range(lone):
                t = time.perf_counter()
                submitter.one(f"lone-{i}", timeout=30)
                lone_latencies.append(time.perf_counter() - t)
        finally:
            submitter.close()
    got = Counter(str(r) for r in results)
    wanted = set(ids)
    out.update(
        completed=len(wanted & set(got)),
        seconds=round(elapsed, 3),
        tasks_per_s=round(len(wanted & set(got)) / elapsed, 1),
        duplicates=sum(n - 1 for n in got.values() if n > 1)
        + sum(n - 1 for t, n in executions.items() if n > 1 and t in wanted),
        losses=tasks - min(len(wanted & set(got)), len(wanted & set(executions))),
        executions=sum(n for t, n in executions.items() if t in wanted),
        submitter_cpu_per_task_us=round(submitter_cpu * 1e6 / tasks, 1),
        workers_cpu_per_task_us=round(workers_cpu * 1e6 / tasks, 1),
    )
    if redis0 is not None and redis1 is not None:
        out["broker_cpu_per_task_us"] = round((redis1 - redis0) * 1e6 / tasks, 1)
    if lone_latencies:
        ms = _ms(lone_latencies)
        out.update(
            lone_tasks=len(lone_latencies),
            lone_latency_p50_ms=ms["p50"],
            lone_latency_p99_ms=ms["p99"],
        )
    return out
