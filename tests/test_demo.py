"""The README's demo: a private broker, nine agents, one task of every type, real executors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from sheri_trio.demo import DEMO_TASKS, LLM_TYPES, run_demo

if TYPE_CHECKING:
    import pytest


async def test_demo_runs_every_task_type(monkeypatch: pytest.MonkeyPatch) -> None:
    # no key: the LLM types must fail at once and clearly (and nothing goes to the network)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    lines: list[str] = []
    with trio.fail_after(60):
        failures = await run_demo(swarm="t-demo", out=lines.append)
    assert failures == 0, "\n".join(lines)
    outcomes = {
        line.split()[1]: line for line in lines if line.strip().startswith(("ok", "error", "FAIL"))
    }
    assert len(outcomes) == len(DEMO_TASKS) == 14
    assert {t for t, line in outcomes.items() if line.strip().startswith("ok")} == {
        t for t, _ in DEMO_TASKS if t not in (*LLM_TYPES, "demo.unknown-type")
    }
    for task_type in LLM_TYPES:
        assert "no Anthropic API key: set ANTHROPIC_API_KEY" in outcomes[task_type]
    assert "no executor for task type 'demo.unknown-type'" in outcomes["demo.unknown-type"]
    assert '"status": "deployed"' in outcomes["deployment.deploy"]
    assert '"passed": 1, "failed": 0' in outcomes["testing.run"]  # tests/integration only
    assert lines[-1].startswith("14 tasks, 10 successful, 4 expected errors, 0 unexpected")
