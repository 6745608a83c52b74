"""``sheri agent`` and ``sheri swarm``'s logic in-process: roles, the workspace warning,
one failing agent among several (the commands themselves: tests/test_cli.py)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import sheri_trio.cli._agents as agents_module
from sheri_trio.cli import DEFAULT_SWARM_ROLES, UsageError
from sheri_trio.cli._agents import parse_roles, run_agents, warn_implicit_workspace
from sheri_trio.swarm import ROLES, AgentConfig


def test_agents_without_a_workspace_root_are_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def agent(role: str, **executor_config: Any) -> tuple[AgentConfig, None]:
        return AgentConfig(role=role, broker="mqtt://x", executor_config=executor_config), None

    with caplog.at_level("WARNING", logger="sheri_trio.cli"):
        warn_implicit_workspace([agent("testing"), agent("general"), agent("deployment")])
        warn_implicit_workspace([agent("testing", workspace={"root": "/srv/app"})])
        warn_implicit_workspace([agent("deployment"), agent("monitoring")])
        warn_implicit_workspace([agent("review", executors={"simulate": True})])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "role(s) general, testing run on the current directory" in warnings[0]
    assert "testing.run" in warnings[0]
    assert "deployment" not in warnings[0]


async def test_when_one_agent_of_a_swarm_fails_the_others_leave_gracefully(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``run_agents``: a failure is not a cancellation of the others (which would skip
    their leaving: no release, no offline status); they get the shutdown, then it raises."""
    left: list[str] = []

    async def fake_run_agent(config: AgentConfig, *, shutdown: trio.Event) -> None:
        if config.agent_id == "bad":
            await trio.sleep(0.1)
            raise RuntimeError("bad agent")
        await shutdown.wait()
        await trio.sleep(0.1)  # leaving: release, agents/shutdown, offline status
        left.append(config.agent_id)  # not reached if it is cancelled

    monkeypatch.setattr(agents_module, "run_agent", fake_run_agent)
    configs = [AgentConfig(agent_id=i, role="review", broker="mqtt://x") for i in ("a", "bad", "b")]
    with trio.fail_after(5), pytest.raises(RuntimeError, match=r"^bad agent$"):
        await run_agents([(c, c.agent_id) for c in configs])
    assert sorted(left) == ["a", "b"]


def test_swarm_roles() -> None:
    assert parse_roles(None) == [*ROLES, "general"] == list(DEFAULT_SWARM_ROLES)
    assert parse_roles(" testing, review ,") == ["testing", "review"]
    with pytest.raises(UsageError, match=r"^--roles: give at least one role"):
        parse_roles(" , ")
    with pytest.raises(UsageError, match=r"^--roles: unknown role 'boss': choose from general, "):
        parse_roles("testing,boss")
