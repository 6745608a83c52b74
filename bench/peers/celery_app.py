"""The Celery app the bench's workers run: ``celery -A bench.peers.celery_app worker``.

Redis is the broker and the result backend (``$BENCH_REDIS_URL``), everything else is
Celery's default (acks early, prefetch multiplier 4, JSON).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_ready

from . import count_execution, mark_ready

URL = os.environ["BENCH_REDIS_URL"]
app = Celery("bench", broker=URL, backend=URL)
app.conf.worker_hijack_root_logger = False


@app.task(name="bench.noop")
def noop(task_id: str) -> str:
    count_execution(task_id)
    return task_id


@worker_ready.connect
def _ready(**_: Any) -> None:
    mark_ready()
