"""The README's demo: a private broker, nine agents, one task of every type."""

from __future__ import annotations

import trio

from sheri_trio.demo import DEMO_TASKS, run_demo


async def test_demo_runs_every_task_type() -> None:
    lines: list[str] = []
    with trio.fail_after(60):
        failures = await run_demo(swarm="t-demo", out=lines.append)
    assert failures == 0
    ok = [line for line in lines if line.strip().startswith("ok")]
    assert len(ok) == len(DEMO_TASKS) == 14
