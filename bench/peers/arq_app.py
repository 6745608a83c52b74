"""The arq worker settings: ``arq bench.peers.arq_app.WorkerSettings``.

Redis from ``$BENCH_REDIS_URL``; ``max_jobs`` from ``$BENCH_ARQ_MAX_JOBS`` (1: each of
the bench's 9 worker processes is one worker); ``poll_delay`` 5 ms instead of arq's
0.5 s (a lone job would wait 0.25 s on average otherwise).
"""

from __future__ import annotations

import os
from typing import Any

from arq.connections import RedisSettings

from . import EXEC_KEY, READY_KEY

POLL_DELAY = 0.005


async def noop(ctx: dict[str, Any], task_id: str) -> str:
    await ctx["redis"].hincrby(EXEC_KEY, task_id, 1)
    return task_id


async def _startup(ctx: dict[str, Any]) -> None:
    await ctx["redis"].incr(READY_KEY)


class WorkerSettings:
    functions = [noop]  # noqa: RUF012 (arq reads class attributes)
    redis_settings = RedisSettings.from_dsn(os.environ["BENCH_REDIS_URL"])
    on_startup = _startup
    max_jobs = int(os.environ.get("BENCH_ARQ_MAX_JOBS", "1"))
    poll_delay = POLL_DELAY
