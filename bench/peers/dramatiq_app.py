"""The Dramatiq actors the bench's workers run: ``dramatiq bench.peers.dramatiq_app``.

Redis broker and the Results middleware on a Redis backend (``$BENCH_REDIS_URL``),
Dramatiq's defaults otherwise (acks after the actor returns).
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

from . import count_execution, mark_ready

URL = os.environ["BENCH_REDIS_URL"]


class _Ready(Middleware):
    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        mark_ready()


broker = RedisBroker(url=URL)
broker.add_middleware(Results(backend=RedisBackend(url=URL)))
broker.add_middleware(_Ready())
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True)
def noop(task_id: str) -> str:
    count_execution(task_id)
    return task_id
