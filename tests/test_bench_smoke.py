"""The bench's client subprocess still runs (no timing is asserted: see docs/bench.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
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
