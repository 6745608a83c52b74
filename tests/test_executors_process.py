"""Running configured commands: clean environment, redaction, limits, timeout, cancel."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import pytest
import trio

from sheri_trio.executors._process import (
    CommandTimeout,
    ToolMissing,
    clean_env,
    redact,
    run_command,
    secret_values,
)

if TYPE_CHECKING:
    from pathlib import Path

# starts a grandchild that would write a file after 30 s unless its group is killed
SPAWN = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import time, pathlib; time.sleep(30); pathlib.Path(sys.argv[1]).write_text('alive')"
    .replace("sys.argv[1]", repr(sys.argv[1]))])
print("pid", child.pid, flush=True)
time.sleep(30)
"""


async def _gone(pid: int) -> bool:
    """Wait (at most 5 s) until ``pid`` is dead: a signalled process takes a moment."""
    with trio.move_on_after(5):
        # polled: nothing notifies us when a process that is not our child dies
        while _alive(pid):  # noqa: ASYNC110
            await trio.sleep(0.01)
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by its dead parent's adopter) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_clean_env_and_redaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPLOY_TOKEN", "tok-abcdef-123")
    monkeypatch.setenv("UNRELATED", "x")
    env = clean_env({"pass_env": ["DEPLOY_TOKEN"], "env": {"MODE": "ci"}})
    assert set(env) <= {"PATH", "HOME", "LANG", "DEPLOY_TOKEN", "MODE"}
    lines: list[str] = []

    async def on_line(line: str) -> None:
        lines.append(line)

    script = (
        "import os; print(os.environ['DEPLOY_TOKEN']); print(sorted(os.environ)); "
        "print('db at postgresql://app:hunter2-pw@db/app')"
    )
    result = await run_command(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, on_line=on_line,
        secrets=secret_values(), log_path=tmp_path / "log",
    )  # fmt: skip
    assert result.exit_code == 0
    assert lines[0] == "***"
    assert "UNRELATED" not in lines[1]
    assert "'MODE'" in lines[1]
    assert lines[2] == "db at postgresql://app:***@db/app"
    for text in (result.output, (tmp_path / "log").read_text()):
        assert "tok-abcdef" not in text
        assert "hunter2" not in text
    assert redact("x https://u:p4ss@h/ y") == "x https://u:***@h/ y"


async def test_output_is_bounded_with_a_marker(tmp_path: Path) -> None:
    script = "for i in range(20000): print(f'line {i:05d} ' + 'x' * 40)"
    result = await run_command(
        [sys.executable, "-c", script], cwd=tmp_path, env=clean_env(), max_output_bytes=8192,
        log_path=tmp_path / "full.log",
    )  # fmt: skip
    assert result.truncated
    assert result.lines == 20000
    assert "line 00000" in result.output
    assert "line 19999" in result.output
    assert "[... output truncated:" in result.output
    assert len(result.output) < 10_000
    assert (tmp_path / "full.log").read_text().count("\n") == 20000  # kept in full


async def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pids: list[int] = []

    async def on_line(line: str) -> None:
        pids.append(int(line.split()[1]))

    flag = tmp_path / "flag"
    with pytest.raises(CommandTimeout, match=r"timed out after 1 s"):
        await run_command(
            [sys.executable, "-c", SPAWN, str(flag)], cwd=tmp_path, env=clean_env(),
            time_limit=1, on_line=on_line,
        )  # fmt: skip
    assert pids
    assert await _gone(pids[0])


async def test_cancellation_kills_the_process_group(tmp_path: Path) -> None:
    pids: list[int] = []
    with trio.CancelScope() as scope:

        async def on_line(line: str) -> None:
            pids.append(int(line.split()[1]))
            scope.cancel()  # e.g. the task was cancelled or timed out at the agent

        await run_command(
            [sys.executable, "-c", SPAWN, str(tmp_path / "flag")], cwd=tmp_path,
            env=clean_env(), on_line=on_line,
        )  # fmt: skip
    assert scope.cancelled_caught
    assert pids
    assert await _gone(pids[0])


async def test_missing_commands_are_named(tmp_path: Path) -> None:
    with pytest.raises(ToolMissing, match=r"deploy.web.command: command not found: 'nope-xyz'"):
        await run_command(["nope-xyz"], cwd=tmp_path, env=clean_env(), origin="deploy.web.command")
    with pytest.raises(ToolMissing, match="not executable"):
        await run_command([str(tmp_path)], cwd=tmp_path, env=clean_env())
