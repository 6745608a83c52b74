"""``sheri demo``: run as a subprocess, against the private mosquitto it starts itself."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
import pytest
import trio
from childproc import Output, output_of

from sheri_trio.demo import (
    DEMO_TASKS,
    LLM_TYPES,
    UNKNOWN_TYPE,
    DemoProgress,
    find_mosquitto,
    plan_tasks,
)
from sheri_trio.mqtt import Message
from sheri_trio.swarm._messages import encode
from sheri_trio.swarm._protocol import Topics

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from sheri_trio.testing import MosquittoBroker

SHERI = [sys.executable, "-m", "sheri_trio"]
LABELS = [
    "general-1",
    "deployment-1",
    "testing-1",
    "review-1",
    "security-1",
    "monitoring-1",
    "documentation-1",
    "database-1",
    "general-2",
]
#: a log record as the agents write them (``[label] 2026-...T... level: ...``), or as
#: logging's default format would (``WARNING``)
LOG_RECORD = re.compile(
    r"\d{4}-\d\d-\d\d[T ][\d:.,]+ \S*\s*(debug|info|warning|error|critical):"
    r"|\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b"
)
NO_NETWORK_TYPES = [t for t, _ in DEMO_TASKS if t != UNKNOWN_TYPE]


def _env(**extra: str) -> dict[str, str]:
    """No SHERI_* settings and no Anthropic key: nothing may reach the network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHERI_", "ANTHROPIC_"))}
    env.update(extra)
    return env


def demo(*args: str, cwd: Path, **env: str) -> AbstractAsyncContextManager[Output]:
    """A running ``sheri demo``: its stdout lines as they come, its stderr apart."""
    command = [*SHERI, "demo", "--swarm", f"t-demo-{secrets.token_hex(3)}", *args]
    return output_of(command, cwd=cwd, env=_env(**env), merge_stderr=False)


def _outcome_lines(run: Output) -> dict[str, str]:
    """task type -> its summary line (``ok``, ``expected``, ``FAIL`` or ``LOST``)."""
    found = {}
    for line in run.lines:
        m = re.match(r"  (ok|expected|FAIL|LOST) +(\S+)", line)
        if m:
            found[m.group(2)] = line
    return found


def _check_logs(run: Output) -> str:
    """No log record on the terminal; all of them in the file the demo names."""
    for line in run.lines:
        assert not LOG_RECORD.search(line), f"a log line in stdout: {line!r}\n{run.text}"
    assert run.stderr == b"", run.text
    path = Path(
        next(m.group(1) for line in run.lines if (m := re.match(r"agent logs: (.+)", line)))
    )
    assert path.is_file(), run.text
    log = path.read_text()
    for label in LABELS:
        assert re.search(rf"^\[{label}\] .* info: .*online", log, re.M), (label, log[:2000])
    return log


async def test_demo_runs_every_task_and_exits_0_on_its_own(tmp_path: Path) -> None:
    """With --llm but no key: the LLM tasks fail at once, clearly, and count as expected."""
    with trio.fail_after(90):
        async with demo("--llm", cwd=tmp_path) as run:
            code = await run.proc.wait()
            await run.expect(r"^\d+ tasks, ")  # stdout read to its end
    assert code == 0, run.text
    summary = run.lines[-1]
    assert re.match(
        r"14 tasks, 10 successful, 4 failed as expected, 0 unexpected, [\d.]+ s$", summary
    )
    outcomes = _outcome_lines(run)
    assert sorted(outcomes) == sorted(t for t, _ in DEMO_TASKS + [(t, {}) for t in LLM_TYPES])
    for task_type in NO_NETWORK_TYPES:
        assert outcomes[task_type].startswith("  ok "), outcomes[task_type]
    for task_type in LLM_TYPES:
        assert "expected" in outcomes[task_type]
        assert "no Anthropic API key: set ANTHROPIC_API_KEY" in outcomes[task_type]
    assert "no executor for task type 'demo.unknown-type'" in outcomes[UNKNOWN_TYPE]
    assert "status=deployed" in outcomes["deployment.deploy"]
    assert "passed=1 failed=0" in outcomes["testing.run"]  # tests/integration only
    # the live table's last frame: every task in a column, by agent
    assert any(re.match(r"^\W+all\W+0\W+0\W+10\W+4\W+0\W+$", line) for line in run.lines), run.text
    log = _check_logs(run)
    assert "reason=unknown_type" in log  # the agents' warnings went to the file, not stdout
    assert "reason=not_configured" in log


@pytest.mark.parametrize(
    ("flag", "sig"), [("--keep", signal.SIGINT), ("--keep-running", signal.SIGTERM)]
)
async def test_demo_keep_stays_up_until_a_signal_then_exits_0(
    tmp_path: Path, flag: str, sig: signal.Signals
) -> None:
    with trio.fail_after(90):
        async with demo(flag, cwd=tmp_path) as run:
            port = int((await run.expect(r"^broker mqtt://\S+:(\d+) \(private"))[1])
            await run.expect(r"^11 tasks, 10 successful, 1 failed as expected, 0 unexpected")
            config = (await run.expect(r"^  submit +sheri submit .* --config (\S+) --wait"))[1]
            await run.expect(r"^the swarm and broker stay up until Ctrl\+C")
            dashboard = (await run.expect(r"^  dashboard +(http://\S+/)\?token=\S+$"))[1]
            async with httpx2.AsyncClient(timeout=10) as http:
                state = (await http.get(dashboard + "api/state")).json()
            assert len(state["agents"]) == 9
            # what it prints works: the swarm takes more tasks after the summary
            submitted = await trio.run_process(
                [*SHERI, "submit", "database.backup", "--config", config, "--wait"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=tmp_path,
                env=_env(),
            )
            assert submitted.returncode == 0, submitted.stdout + submitted.stderr
            assert b"complete: success by t-demo-" in submitted.stdout
            submitted_id = re.search(rb"submitted (\S+)", submitted.stdout)
            assert submitted_id is not None
            task_id = submitted_id[1].decode()
            assert run.proc.returncode is None
            run.proc.send_signal(sig)
            code = await run.proc.wait()
            await run.expect(r"^stopping: the agents leave, then the broker")
    assert code == 0, run.text
    assert "left out: --llm adds them" in run.text
    assert not any(t in _outcome_lines(run) for t in LLM_TYPES)
    log = _check_logs(run)
    assert re.search(rf"^\[database-1\] .* info: completed .*task_id={task_id} ", log, re.M)
    with pytest.raises(OSError, match="refused"):  # the private broker is gone too
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_demo_on_a_broker_of_ours_never_shows_its_password(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    url = broker.url("mqtt", credentials=False)
    with trio.fail_after(90):
        async with demo(
            "--broker",
            url,
            "--username",
            broker.username,
            cwd=tmp_path,
            SHERI_PASSWORD=broker.password,
        ) as run:
            code = await run.proc.wait()
            await run.expect(r"^\d+ tasks, ")
    assert code == 0, run.text
    assert run.lines[0].startswith(f"broker {url} (given with --broker)"), run.text
    assert re.match(r"11 tasks, 10 successful, 1 failed as expected, 0 unexpected", run.lines[-1])
    assert broker.password not in run.text
    log = _check_logs(run)
    assert broker.password not in log


async def test_demo_without_mosquitto_says_how_to_install_it(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    with trio.fail_after(30):
        done = await trio.run_process(
            [*SHERI, "demo"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=tmp_path,
            env=_env(PATH=str(empty)),
        )
    assert done.returncode == 1, done
    assert b"sudo apt-get install mosquitto mosquitto-clients" in done.stderr
    assert done.stderr.startswith(b"sheri: error: mosquitto not found on PATH")
    assert b"Traceback" not in done.stderr
    assert done.stdout == b""


async def test_demo_whose_mosquitto_will_not_start_says_so(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mosquitto"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    with trio.fail_after(30):
        done = await trio.run_process(
            [*SHERI, "demo"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=tmp_path,
            env=_env(PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"),
        )
    assert done.returncode == 1, done
    assert re.match(
        rb"sheri: error: mosquitto exited with status 3 \(its log: /\S+/mosquitto.log\)",
        done.stderr,
    ), done.stderr
    assert b"Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--timeout", "0"], b"--timeout: must be a positive number of seconds"),
        (["--swarm", "a/#"], b"--swarm: invalid swarm name"),
    ],
)
async def test_demo_usage_errors_exit_2(tmp_path: Path, args: list[str], message: bytes) -> None:
    with trio.fail_after(30):
        done = await trio.run_process(
            [*SHERI, "demo", *args], capture_stderr=True, check=False, cwd=tmp_path, env=_env()
        )
    assert done.returncode == 2
    assert message in done.stderr


def test_find_mosquitto_looks_beside_bin_in_sbin(tmp_path: Path) -> None:
    """Debian puts mosquitto in /usr/sbin, which users' PATH leaves out."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "sbin").mkdir()
    binary = tmp_path / "sbin" / "mosquitto"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    assert find_mosquitto(str(tmp_path / "bin")) == str(binary)
    assert find_mosquitto(str(tmp_path / "sbin")) == str(binary)
    assert find_mosquitto(str(tmp_path / "elsewhere")) is None


def test_plan_leaves_the_llm_tasks_out_unless_asked() -> None:
    plain = plan_tasks("r", llm=False, environ={})
    assert [t.type for t in plain] == [t for t, _ in DEMO_TASKS]
    assert [t.type for t in plain if t.expect_error] == [UNKNOWN_TYPE]
    assert len({t.task_id for t in plain}) == len(plain)
    no_key = {t.type: t.expect_error for t in plan_tasks("r", llm=True, environ={})}
    assert all(no_key[t] == "no Anthropic API key" for t in LLM_TYPES)
    keyed = {
        t.type: t.expect_error
        for t in plan_tasks("r", llm=True, environ={"ANTHROPIC_API_KEY": "k"})
    }
    assert all(keyed[t] is None for t in LLM_TYPES)  # with a key they must succeed
    assert keyed[UNKNOWN_TYPE] == "no executor for task type"


def test_progress_places_tasks_by_state_and_agent() -> None:
    import mqtt5
    from rich.console import Console

    topics = Topics("p")

    def msg(topic: str, payload: dict[str, Any]) -> Message:
        return Message(mqtt5.PublishPacket(topic, payload=encode("a1", "testing", payload)))

    tasks = plan_tasks("r", llm=False, environ={})
    ok, unknown, waiting = tasks[1], tasks[-1], tasks[2]
    progress = DemoProgress(topics, tasks, {"p-testing-1": "testing-1"})
    progress.feed(msg("p/tasks/assigned", {"task_id": ok.task_id, "agent_id": "p-testing-1"}), 1)
    assert progress.place(ok) == ("p-testing-1", "running")
    assert progress.place(waiting) == (None, "waiting")
    done = {"task_id": ok.task_id, "agent_id": "p-testing-1", "attempt": 2, "duration": 5}
    progress.feed(msg("p/tasks/complete", {**done, "result": {"passed": 1}}), 2)
    stale = {"task_id": ok.task_id, "agent_id": "x", "attempt": 1, "error": "lease lost"}
    progress.feed(msg("p/tasks/failed", stale), 2)  # an older attempt: fenced off
    assert progress.place(ok) == ("p-testing-1", "done")
    bad = {"task_id": unknown.task_id, "agent_id": "other-9", "error": "disk full"}
    progress.feed(msg("p/tasks/failed", bad), 3)  # not the error it should fail with
    assert progress.place(unknown) == ("other-9", "failed")
    assert not progress.finished
    assert progress.unexpected == 1 + len(tasks) - 2  # one wrong outcome, the rest missing
    console = Console(width=120, record=True)
    console.print(progress.render(3.0))
    table = console.export_text()
    assert re.search(r"testing-1\W+-\W+-\W+1\W+-\W+-", table), table
    assert re.search(r"other-9\W+-\W+-\W+-\W+-\W+1", table), table  # a foreign agent, shown
    assert re.search(rf"all\W+{len(tasks) - 2}\W+0\W+1\W+0\W+1", table), table
    lines = [line.plain for line in progress.summary(3.0, "no outcome")]
    assert lines[1].startswith("  ok        testing.run")
    assert "passed=1" in lines[1]
    assert lines[-2].startswith("  FAIL      demo.unknown-type")
    assert "disk full" in lines[-2]
    assert lines[0].startswith("  LOST      deployment.deploy")
    assert lines[-1].startswith(f"{len(tasks)} tasks, 1 successful, 0 failed as expected, ")
