"""default_registry(): the real executors, lazily imported; the simulate switch."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from executor_helpers import make_ctx

from sheri_trio.executors import TaskConfigError, default_registry, simulated_registry
from sheri_trio.swarm._protocol import TASK_ROLES

if TYPE_CHECKING:
    from pathlib import Path


def test_thirteen_types_and_no_fallback() -> None:
    registry = default_registry()
    assert registry.types() == sorted(TASK_ROLES)
    assert len(registry.types()) == 13
    assert registry.get("demo.unknown-type") is None  # the agent fails it: unknown_type
    assert simulated_registry().get("demo.unknown-type") is not None


def test_building_the_registry_does_not_import_anthropic() -> None:
    code = (
        "import sys; from sheri_trio.executors import default_registry; default_registry(); "
        "from sheri_trio.swarm._agent import Agent; "
        "print('anthropic' in sys.modules, 'httpx2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


async def test_simulate_switch_runs_the_placeholders(tmp_path: Path) -> None:
    registry = default_registry()
    deploy = registry.get("deployment.deploy")
    assert deploy is not None
    payload = {"service": "test-service", "version": "1.0.0"}
    ctx, _ = make_ctx("deployment.deploy", payload, state=tmp_path)
    with pytest.raises(TaskConfigError, match=r"\[deploy.test-service\]"):
        await deploy(ctx)
    ctx, _ = make_ctx(
        "deployment.deploy", payload, config={"executors": {"simulate": True}}, state=tmp_path
    )
    result = await deploy(ctx)
    assert result["simulated"] is True
    assert result["status"] == "deployed"
