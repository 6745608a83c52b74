"""The ``sheri`` command line as subprocesses against a real mosquitto (and its entry
point); the command modules' logic is tested in ``tests/test_cli_<module>.py``."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
import trio
from childproc import Output, freezing_sheri, output_of

from sheri_trio.cli import rewrite_prototype_argv
from sheri_trio.mqtt import Message, open_client
from sheri_trio.swarm import AgentConfig, encode, run_agent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Sequence
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path

    from sheri_trio.mqtt import Client
    from sheri_trio.testing import MosquittoBroker

SHERI = [sys.executable, "-m", "sheri_trio"]

# The two tasks of the prototype's test-mqtt-agents.sh, as it publishes them.
SEED_DEPLOY = """{
  "id": "msg_test_deploy",
  "timestamp": "2026-02-22T20:00:00Z",
  "payload": {
    "task_id": "task_deploy_test",
    "type": "deployment.deploy",
    "priority": "high",
    "payload": {
      "service": "test-service",
      "version": "1.0.0"
    }
  }
}"""
SEED_TESTING = """{
  "id": "msg_test_testing",
  "timestamp": "2026-02-22T20:01:00Z",
  "payload": {
    "task_id": "task_test_test",
    "type": "testing.run",
    "priority": "medium",
    "payload": {
      "test_suite": "integration"
    }
  }
}"""


#: The CLI's tests are about the swarm's mechanics: every agent runs the executors'
#: placeholders (which honour ``simulate_seconds`` and ``simulate_failure``).
SIMULATE = {"executors": {"simulate": True}}
SHERI_TOML = "[executors]\nsimulate = true\n\n[agent]\nheartbeat_interval = 0.5\n"


def _swarm(name: str) -> str:
    return f"cli-{name}-{secrets.token_hex(3)}"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHERI_")}
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


# ------------------------------------------------------------------ subprocesses
def sheri(
    *args: str, cwd: Path, command: Sequence[str] = SHERI, env: dict[str, str] | None = None
) -> AbstractAsyncContextManager[Output]:
    """``sheri args...`` running (with *env* added to its environment), its stdout and
    stderr lines merged."""
    return output_of([*command, *args], cwd=cwd, env=_env(**(env or {})))


async def sheri_run(
    *args: str, cwd: Path, command: Sequence[str] = SHERI, **env: str
) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [*command, *args],
        capture_stdout=True,
        capture_stderr=True,
        stdin=subprocess.DEVNULL,
        check=False,
        cwd=cwd,
        env=_env(**env),
    )


async def stop(out: Output, sig: signal.Signals = signal.SIGINT) -> int:
    out.proc.send_signal(sig)
    return await out.proc.wait()


# ---------------------------------------------------------------------- MQTT side
class Seen:
    """Messages seen by a watcher: (topic, decoded JSON or None, retain flag)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any, bool]] = []
        self._changed = trio.Event()

    async def pump(self, messages: AsyncIterator[Message]) -> None:
        async for m in messages:
            try:
                body = json.loads(m.payload) if m.payload else None
            except ValueError:
                body = None
            self.items.append((m.topic, body, m.retain))
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[list[tuple[str, Any, bool]]], Any]) -> Any:
        while True:
            result = predicate(self.items)
            if result:
                return result
            await self._changed.wait()

    def payloads(self, topic: str) -> list[dict[str, Any]]:
        return [b["payload"] for t, b, _ in self.items if t == topic and b]


@asynccontextmanager
async def watching(
    broker: MosquittoBroker, topic_filter: str
) -> AsyncIterator[tuple[Client, Seen]]:
    """A client subscribed to *topic_filter*, and what it has seen; it stops seeing with
    the block."""
    seen = Seen()
    async with (
        open_client(broker.tcp_url) as watcher,
        watcher.subscribe(topic_filter) as messages,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(seen.pump, messages)
        yield watcher, seen
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def agent(
    broker: MosquittoBroker, swarm: str, role: str, agent_id: str
) -> AsyncIterator[None]:
    """An in-process agent for the CLI to talk to."""
    config = AgentConfig(
        role=role,
        agent_id=agent_id,
        swarm=swarm,
        broker=broker.tcp_url,
        heartbeat_interval=0.5,
        lease_time=2.0,
        retry_initial_delay=0.01,
        executor_config=SIMULATE,
    )
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_agent, config, shutdown=shutdown))
        try:
            yield
        finally:
            shutdown.set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# ------------------------------------------------------- the prototype's scenario
async def test_prototype_scenario_two_agents_two_seed_tasks(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    swarm = "opencto-dev"  # the prototype's flags, exactly
    (tmp_path / "sheri.toml").write_text(SHERI_TOML)
    ids = {"testing": "test-agent-01", "deployment": "deploy-agent-01"}
    with trio.fail_after(30):
        async with watching(broker, f"{swarm}/#") as (_, seen):
            flags = ["--broker", broker.tcp_url, "--swarm", swarm]
            testing = ["--mqtt", "--role", "testing", "--agent-id", ids["testing"], *flags]
            deployment = ["--mqtt", "--role", "deployment", "--agent-id", ids["deployment"], *flags]
            async with (
                sheri(*testing, cwd=tmp_path) as tester,
                sheri(*deployment, cwd=tmp_path) as deployer,
            ):
                await seen.wait_for(
                    lambda _: (
                        {p.get("agent_id") for p in seen.payloads(f"{swarm}/agents/register")}
                        >= set(ids.values())
                    )
                )
                mosquitto_pub = [
                    "mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.tcp_port),
                    "-u", broker.username, "-P", broker.password, "-q", "1",
                    "-t", f"{swarm}/tasks/new",
                ]  # fmt: skip
                for seed in (SEED_DEPLOY, SEED_TESTING):  # as test-mqtt-agents.sh does
                    await trio.run_process([*mosquitto_pub, "-m", seed])
                complete = await seen.wait_for(
                    lambda _: (
                        len(seen.payloads(f"{swarm}/tasks/complete")) >= 2
                        and seen.payloads(f"{swarm}/tasks/complete")
                    )
                )
                await seen.wait_for(
                    lambda _: (
                        {p.get("agent_id") for p in seen.payloads(f"{swarm}/agents/heartbeat")}
                        >= set(ids.values())
                    )
                )
                for line in (
                    (await tester.expect(r"\bonline\b")).string,
                    (await deployer.expect(r"\bonline\b")).string,
                ):
                    # one line per event: time, then the agent id
                    assert re.match(
                        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} \[(test|deploy)-agent-01\] info: ",
                        line,
                    )
                assert await stop(tester) == 0
                assert await stop(deployer) == 0
                # then each publishes agents/shutdown and, last, a retained offline status
                await seen.wait_for(
                    lambda items: all(
                        any(
                            t == f"{swarm}/agents/{agent_id}/status"
                            and retain
                            and b["payload"].get("status") == "offline"
                            for t, b, retain in items
                        )
                        for agent_id in ids.values()
                    )
                )
    by_task = {c["task_id"]: c for c in complete}
    assert set(by_task) == {"task_deploy_test", "task_test_test"}
    deploy, tests = by_task["task_deploy_test"], by_task["task_test_test"]
    assert deploy["agent_id"] == ids["deployment"]
    assert deploy["status"] == "success"
    assert deploy["result"]["status"] == "deployed"
    assert tests["agent_id"] == ids["testing"]
    assert tests["status"] == "success"
    assert {"passed", "failed", "skipped", "duration"} <= set(tests["result"])
    assert len(complete) == 2
    shutdowns = {p.get("agent_id") for p in seen.payloads(f"{swarm}/agents/shutdown")}
    assert shutdowns == set(ids.values())
    assert not any("Traceback" in line for line in tester.lines + deployer.lines)


def test_prototype_argv_is_rewritten() -> None:
    argv = [
        "--mqtt",
        "--role",
        "testing",
        "--agent-id",
        "a",
        "--broker",
        "mqtt://h",
        "--swarm",
        "s",
    ]
    assert rewrite_prototype_argv(argv) == ["agent", *argv[1:]]
    assert rewrite_prototype_argv(["agent", "--mqtt"]) == ["agent"]
    assert rewrite_prototype_argv(["submit", "x"]) == ["submit", "x"]
    assert rewrite_prototype_argv(["submit", "x", "--", "--mqtt"]) == [
        "submit",
        "x",
        "--",
        "--mqtt",
    ]


# ------------------------------------------------------------------------ submit
async def test_submit_wait_succeeds(broker: MosquittoBroker, tmp_path: Path) -> None:
    swarm = _swarm("submit")
    with trio.fail_after(20):
        async with agent(broker, swarm, "testing", "submit-tester"):
            result = await sheri_run(
                "submit", "testing.run", "--payload", '{"test_suite": "unit"}',
                "--task-id", "sub-1", "--wait", "--broker", broker.tcp_url, "--swarm", swarm,
                cwd=tmp_path,
            )  # fmt: skip
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "claimed by submit-tester (testing), attempt 1" in out
    assert "progress: running" in out
    assert "complete: success by submit-tester" in out
    assert '"passed"' in out
    assert broker.password not in out + result.stderr.decode()


async def test_a_password_on_the_command_line_is_warned_about_never_shown(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    swarm = _swarm("pwwarn")
    bare = f"mqtt://127.0.0.1:{broker.tcp_port}"
    warning = "the broker password was given on the command line"
    with trio.fail_after(20):
        in_url = await sheri_run(
            "tasks", "--broker", broker.tcp_url, "--swarm", swarm, cwd=tmp_path
        )
        flag = await sheri_run(
            "tasks", "--broker", bare, "--username", broker.username,
            f"--password={broker.password}",  # a generated password may begin with '-'
            "--swarm", swarm, cwd=tmp_path,
        )  # fmt: skip
        from_env = await sheri_run(
            "tasks", "--broker", bare, "--swarm", swarm, cwd=tmp_path,
            SHERI_USERNAME=broker.username, SHERI_PASSWORD=broker.password,
        )  # fmt: skip
    for result in (in_url, flag, from_env):
        assert result.returncode == 0, result.stderr.decode()
        assert broker.password not in result.stdout.decode() + result.stderr.decode()
    assert warning in in_url.stderr.decode()
    assert warning in flag.stderr.decode()
    assert "use SHERI_PASSWORD" in flag.stderr.decode()
    assert warning not in from_env.stderr.decode()


async def test_submit_without_wait_prints_the_task_id(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    swarm = _swarm("nowait")
    with trio.fail_after(20):
        async with watching(broker, f"{swarm}/tasks/new") as (_, seen):
            result = await sheri_run(
                "submit", "deployment.deploy", "--priority", "high", "--max-retries", "2",
                "--broker", broker.tcp_url, "--swarm", swarm, cwd=tmp_path,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr.decode()
            task_id = result.stdout.decode().strip()
            assert re.fullmatch(r"task-[0-9a-f]{12}", task_id)
            body = await seen.wait_for(lambda items: items and items[0][1])
    assert "agent_id" not in body  # the CLI is not an agent
    assert body["payload"] == {
        "task_id": task_id,
        "type": "deployment.deploy",
        "payload": {},
        "priority": "high",
        "max_retries": 2,
    }


@pytest.mark.parametrize("wait", [False, True])
async def test_submit_to_a_swarm_nobody_follows_says_the_broker_dropped_it(
    broker: MosquittoBroker, tmp_path: Path, wait: bool
) -> None:
    """mosquitto answers 0x10 (no matching subscribers): the task would be lost silently."""
    swarm = _swarm("nobody")
    with trio.fail_after(20):
        result = await sheri_run(
            "submit", "testing.run", "--task-id", "dropped-1", *(["--wait"] if wait else []),
            "--broker", broker.tcp_url, "--swarm", swarm, cwd=tmp_path,
        )  # fmt: skip
    err = result.stderr.decode()
    assert result.returncode == 1, result.stdout.decode() + err
    assert f"the broker dropped task dropped-1: nothing subscribes to {swarm}/tasks/new" in err


async def test_submit_wait_without_eligible_agent_exits_2(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    swarm = _swarm("noclaim")
    with trio.fail_after(20):
        async with agent(broker, swarm, "deployment", "only-deployer"):
            result = await sheri_run(
                "submit", "testing.run", "--task-id", "lonely-1", "--wait", "--wait-timeout", "0.5",
                "--broker", broker.tcp_url, "--swarm", swarm, cwd=tmp_path,
            )  # fmt: skip
    out = result.stdout.decode()
    assert result.returncode == 2, out + result.stderr.decode()
    assert (
        "no agent claimed task lonely-1 within 0.5 s; online agents with role testing: none" in out
    )


async def test_submit_bad_payload_is_a_usage_error(tmp_path: Path) -> None:
    with trio.fail_after(20):
        result = await sheri_run("submit", "testing.run", "--payload", "{not json", cwd=tmp_path)
    err = result.stderr.decode()
    assert result.returncode == 2
    assert err.startswith("sheri: error: --payload: not valid JSON")
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


# ---------------------------------------------------------------------- agents
async def test_duplicate_agent_id_is_refused_and_the_first_keeps_working(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    (tmp_path / "sheri.toml").write_text(SHERI_TOML)
    swarm = _swarm("dup")
    flags = ["--broker", broker.tcp_url, "--swarm", swarm]
    with trio.fail_after(30):
        async with sheri(
            "agent", "--role", "testing", "--agent-id", "dup-01", *flags, cwd=tmp_path
        ) as first:
            await first.expect(r"\[dup-01\] info: online")
            second = await sheri_run(
                "agent", "--role", "testing", "--agent-id", "dup-01", *flags, cwd=tmp_path
            )
            err = second.stderr.decode()
            assert second.returncode == 1, err
            assert "sheri: error: an agent with id 'dup-01' is already online" in err
            assert "Traceback" not in err
            assert first.proc.returncode is None
            done = await sheri_run("submit", "testing.run", "--wait", *flags, cwd=tmp_path)
            assert done.returncode == 0, done.stdout.decode()
            assert "claimed by dup-01" in done.stdout.decode()
            assert await stop(first) == 0
    await first.expect(r"\boffline\b")


async def test_second_ctrl_c_exits_at_once(broker: MosquittoBroker, tmp_path: Path) -> None:
    (tmp_path / "sheri.toml").write_text(SHERI_TOML)
    swarm = _swarm("ctrlc")
    flags = ["--broker", broker.tcp_url, "--swarm", swarm]
    with trio.fail_after(20):
        async with watching(broker, f"{swarm}/tasks/progress") as (watcher, seen):
            async with sheri(
                "agent", "--role", "testing", "--agent-id", "busy-01", *flags, cwd=tmp_path
            ) as busy:
                await busy.expect(r"info: online")
                task = {
                    "task_id": "long-1",
                    "type": "testing.run",
                    "payload": {"simulate_seconds": 60},
                }
                await watcher.publish(f"{swarm}/tasks/new", encode(None, None, task), qos=1)
                await seen.wait_for(
                    lambda items: any(b["payload"].get("state") == "running" for _, b, _ in items)
                )
                busy.proc.send_signal(signal.SIGINT)  # graceful: waits for the running task
                await busy.expect(r"shutting down agent=busy-01 running=1")
                assert await stop(busy) == 130  # the second one does not wait
    await busy.expect(r"again: exiting at once")


async def test_unreachable_broker_is_one_line_without_password(tmp_path: Path) -> None:
    url = f"mqtt://sheri:s3cret-Pass@127.0.0.1:{_free_port()}"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            results: dict[str, subprocess.CompletedProcess[bytes]] = {}

            async def run(name: str, *args: str) -> None:
                results[name] = await sheri_run(*args, "--broker", url, cwd=tmp_path)

            nursery.start_soon(run, "agent", "agent", "--agent-id", "lost-01")
            nursery.start_soon(run, "submit", "submit", "testing.run")
            nursery.start_soon(run, "tasks", "tasks")
    for name, result in results.items():
        err = result.stderr.decode()
        assert result.returncode == 1, (name, err)
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("sheri: error:")]
        assert len(errors) == 1, err
        assert "cannot connect to mqtt://sheri:***@127.0.0.1" in errors[0]
        assert "connection refused" in errors[0].lower()
        assert "s3cret-Pass" not in err + result.stdout.decode()


async def test_bad_credentials_and_bad_url(broker: MosquittoBroker, tmp_path: Path) -> None:
    with trio.fail_after(20):
        wrong = await sheri_run(
            "agent", "--broker", f"mqtt://sheri:wrong-Pass@127.0.0.1:{broker.tcp_port}",
            "--swarm", _swarm("auth"), cwd=tmp_path,
        )  # fmt: skip
        bad_url = await sheri_run("submit", "testing.run", "--broker", "http://x", cwd=tmp_path)
    err = wrong.stderr.decode()
    assert wrong.returncode == 1, err
    assert "check the user name and password" in err
    assert "wrong-Pass" not in err
    assert "Traceback" not in err
    assert bad_url.returncode == 2
    assert bad_url.stderr.decode().startswith("sheri: error: --broker: 'http://x': scheme must be")


# ------------------------------------------------------------------------ config
def _write(tmp_path: Path, text: str, name: str = "sheri.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


async def test_cli_rejects_invalid_config_file(tmp_path: Path) -> None:
    _write(tmp_path, "[agent]\nmax_tasks = 'many'\n", name="custom.toml")
    with trio.fail_after(20):
        given = await sheri_run("agent", "--config", "custom.toml", cwd=tmp_path)
        missing = await sheri_run("agent", "--config", "absent.toml", cwd=tmp_path)
        from_env = await sheri_run("agent", cwd=tmp_path, SHERI_ROLE="boss")
    assert given.returncode == 2
    assert given.stderr.decode() == (
        "sheri: error: custom.toml: agent.max_tasks: must be an integer >= 1, got 'many'\n"
    )
    assert missing.returncode == 2
    assert missing.stderr.decode() == "sheri: error: absent.toml: no such file\n"
    assert from_env.returncode == 2
    assert from_env.stderr.decode().startswith("sheri: error: SHERI_ROLE: must be one of")


# ------------------------------------------------------------------ tasks, swarm
async def test_tasks_lists_a_failed_task(broker: MosquittoBroker, tmp_path: Path) -> None:
    swarm = _swarm("tasks")
    flags = ["--broker", broker.tcp_url, "--swarm", swarm]
    with trio.fail_after(20):
        async with agent(broker, swarm, "testing", "tasks-tester"):
            failed = await sheri_run(
                "submit", "testing.run", "--payload", '{"simulate_failure": true}',
                "--max-retries", "0", "--task-id", "doomed-1", "--wait", *flags, cwd=tmp_path,
            )  # fmt: skip
            ok = await sheri_run(
                "submit", "testing.run", "--task-id", "fine-1", "--wait", *flags, cwd=tmp_path
            )
        table = await sheri_run("tasks", "--state", "failed", *flags, cwd=tmp_path)
        lines = await sheri_run("tasks", "--json", *flags, cwd=tmp_path)
    assert failed.returncode == 1, failed.stdout.decode()
    assert "failed: RuntimeError: simulated failure" in failed.stdout.decode()
    assert ok.returncode == 0
    out = table.stdout.decode()
    assert table.returncode == 0, table.stderr.decode()
    assert re.search(r"doomed-1\s.*failed\s.*tasks-tester", out), out
    assert "fine-1" not in out
    states = {r["task_id"]: r["state"] for r in map(json.loads, lines.stdout.decode().splitlines())}
    assert states == {"doomed-1": "failed", "fine-1": "done"}


async def test_swarm_prefixes_lines_and_stops_on_sigterm(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    (tmp_path / "sheri.toml").write_text(SHERI_TOML)
    swarm = _swarm("swarm")
    flags = ["--broker", broker.tcp_url, "--swarm", swarm]
    labels = ["general-1", "testing-1", "deployment-1"]
    with trio.fail_after(30):
        async with sheri(
            "swarm", "--agents", "3", "--roles", "general,testing,deployment", *flags, cwd=tmp_path
        ) as out:
            for label in labels:
                await out.expect(rf"^\[{label}\] \S+ info: online agent={swarm}-{label}\b")
            snapshot = await sheri_run("monitor", "--once", *flags, cwd=tmp_path)
            assert await stop(out, signal.SIGTERM) == 0
        for label in labels:
            await out.expect(rf"^\[{label}\] .*offline agent={swarm}-{label}")
    assert all(re.match(r"\[[a-z0-9-]+\] ", line) for line in out.lines), out.text
    monitor = snapshot.stdout.decode()
    assert snapshot.returncode == 0, snapshot.stderr.decode()
    for label in labels:
        assert re.search(rf"{swarm}-{label}\s.*online", monitor), monitor


# ------------------------------------------------- start-up against a frozen broker
#: each start-up step's bound (or the CLI's wait for an answer), and a client's close
BOUND, CLOSE = 1.0, 0.3


def _frozen_toml(**agent: float) -> str:
    """sheri.toml for runs against a broker that will freeze: short bounds."""
    keys = {"heartbeat_interval": 0.5, "grace_period": 2.0, "startup_timeout": BOUND, **agent}
    lines = "".join(f"{k} = {v}\n" for k, v in keys.items())
    return (
        f"[executors]\nsimulate = true\n\n[agent]\n{lines}\n"
        f"[broker]\nconnect_timeout = {BOUND}\nclose_timeout = {CLOSE}\n"
    )


@contextmanager
def _frozen(broker: MosquittoBroker, pattern: str) -> Iterator[list[str]]:
    """The ``sheri`` command that freezes ``broker`` (SIGSTOP) once it logs a line matching
    ``pattern``; the broker runs again (SIGCONT) when the block ends."""
    pid = broker.pid
    assert pid is not None
    try:
        yield freezing_sheri(pid, pattern)
    finally:
        os.kill(pid, signal.SIGCONT)


async def _stopped_by_sigterm(out: Output) -> float:
    """SIGTERM, and the seconds until the process exited (with 0)."""
    began = trio.current_time()
    assert await stop(out, signal.SIGTERM) == 0
    return trio.current_time() - began


def _error_line(text: str) -> str:
    errors = [line for line in text.splitlines() if line.startswith("sheri: error:")]
    assert len(errors) == 1, text
    return errors[0]


async def test_agent_start_up_on_a_frozen_broker_fails_naming_the_step(
    fresh_broker: MosquittoBroker, tmp_path: Path
) -> None:
    """The issue's case: connected, then the broker answers nothing (SIGSTOP after CONNACK)."""
    (tmp_path / "sheri.toml").write_text(_frozen_toml())
    flags = ["--broker", fresh_broker.tcp_url, "--swarm", _swarm("frozen")]
    connected = r"^connected to .* as 'cold-01'"
    with _frozen(fresh_broker, connected) as command, trio.fail_after(30):
        async with sheri(
            "agent", "--role", "monitoring", "--agent-id", "cold-01", *flags,
            cwd=tmp_path, command=command,
        ) as out:  # fmt: skip
            await out.expect(r"froze broker")
            await out.expect(r"info: start-up: subscribe agent=cold-01 timeout=1$")
            began = trio.current_time()
            assert await out.proc.wait() == 1
            took = trio.current_time() - began
    error = _error_line(out.text)
    assert error.startswith(
        "sheri: error: agent cold-01: start-up step 'subscribe' did not finish within 1 s "
        "(waiting for the SUBACK of the agent's subscription to the swarm's topics): the "
        "broker accepted the connection but does not answer"
    ), error
    assert "Traceback" not in out.text
    assert not re.search(r"\binfo: online\b", out.text)
    # the bound, then the unsubscribe and the close against a broker that answers nothing
    assert BOUND - 0.2 <= took <= BOUND + 2 * CLOSE + 1.0, took


async def test_sigterm_during_start_up_stops_the_agent_within_the_grace_period(
    fresh_broker: MosquittoBroker, tmp_path: Path
) -> None:
    (tmp_path / "sheri.toml").write_text(_frozen_toml(startup_timeout=60))
    flags = ["--broker", fresh_broker.tcp_url, "--swarm", _swarm("frozen")]
    connected = r"^connected to .* as 'cold-02'"
    with _frozen(fresh_broker, connected) as command, trio.fail_after(30):
        async with sheri(
            "agent", "--agent-id", "cold-02", *flags, cwd=tmp_path, command=command
        ) as out:
            await out.expect(r"froze broker")
            await out.expect(r"info: start-up: subscribe agent=cold-02 timeout=60$")
            took = await _stopped_by_sigterm(out)
    assert took <= 2.0, took  # grace_period
    await out.expect(r"SIGTERM: shutting down gracefully")
    await out.expect(r"start-up interrupted: nothing to release agent=cold-02 step=subscribe$")
    assert "sheri: error" not in out.text
    assert "Traceback" not in out.text


async def _processes_swarm(out: Output, swarm: str, labels: list[str]) -> int:
    """Wait for every agent online; the pid of agent process 1."""
    for label in labels:
        await out.expect(rf"^\[{label}\] \S+ info: online agent={swarm}-{label}\b")
    match = await out.expect(r"^\[swarm\] \S+ info: agent process 1 \(pid (\d+)\)")
    return int(match[1])


@pytest.mark.parametrize("dispatch", ["broadcast", "dispatcher"])
async def test_swarm_spreads_its_agents_over_processes_and_stops_them_all(
    broker: MosquittoBroker, tmp_path: Path, dispatch: str
) -> None:
    (tmp_path / "sheri.toml").write_text(SHERI_TOML)
    swarm = _swarm("procs")
    flags = ["--broker", broker.tcp_url, "--swarm", swarm]
    labels = ["general-1", "testing-1", "general-2", "testing-2"]
    with trio.fail_after(40):
        async with sheri(
            "swarm", "--agents", "4", "--roles", "general,testing", "--processes", "2",
            "--dispatch", dispatch, *flags, cwd=tmp_path,
        ) as out:  # fmt: skip
            child = await _processes_swarm(out, swarm, labels)
            assert child != out.proc.pid
            # the agents in turn: general-1 and general-2 here, testing-1 and -2 there
            assert re.search(rf"agent process 1 \(pid {child}\): {swarm}-testing-1, ", out.text)
            for _ in range(2):
                done = await sheri_run(
                    "submit", "testing.run", "--wait", "--timeout", "20", *flags,
                    cwd=tmp_path,
                )  # fmt: skip
                assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
                assert b"complete: success by" in done.stdout
            assert await stop(out, signal.SIGTERM) == 0
        for label in labels:  # each left gracefully, the other process's agents too
            await out.expect(rf"^\[{label}\] .*offline agent={swarm}-{label}")
    with pytest.raises(ProcessLookupError):  # reaped before the parent exited
        os.kill(child, 0)


@asynccontextmanager
async def _two_general_processes(
    broker: MosquittoBroker, tmp_path: Path, name: str
) -> AsyncIterator[tuple[Output, str, int]]:
    """``sheri swarm --agents 2 --roles general --processes 2``, both agents online: its
    output, the swarm and the pid of agent process 1."""
    (tmp_path / "sheri.toml").write_text(SHERI_TOML)
    swarm = _swarm(name)
    flags = ["--broker", broker.tcp_url, "--swarm", swarm]
    async with sheri(
        "swarm", "--agents", "2", "--roles", "general", "--processes", "2", *flags,
        cwd=tmp_path,
    ) as out:  # fmt: skip
        child = await _processes_swarm(out, swarm, ["general-1", "general-2"])
        yield out, swarm, child


async def test_swarm_stops_when_one_of_its_processes_dies(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    with trio.fail_after(40):
        async with _two_general_processes(broker, tmp_path, "procdie") as (out, swarm, child):
            os.kill(child, signal.SIGKILL)
            assert await out.proc.wait() == 1
            await out.expect(  # the agent of this process left gracefully
                rf"^\[general-1\] .*offline agent={swarm}-general-1"
            )
    await out.expect(
        rf"^sheri: error: agent process 1 \(pid {child}: {swarm}-general-2\) ended with exit "
        r"code -9 before a shutdown was asked for$"
    )


async def test_swarm_processes_outlive_the_thread_that_started_them(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """trio starts a child process from a worker thread, which exits after 10 s idle
    (trio's thread cache). With PR_SET_PDEATHSIG the child took that thread's end for
    its parent's death: every ``--processes`` swarm stopped 10 s after its start."""
    idle = 10.0  # trio._core._thread_cache.IDLE_TIMEOUT
    with trio.fail_after(idle + 40):
        async with _two_general_processes(broker, tmp_path, "outlive") as (out, swarm, _):
            with trio.move_on_after(idle + 3):  # a window to watch, not a synchronisation
                await out.expect(r"SIGTERM|offline agent=|gone")
                raise AssertionError(f"the swarm stopped on its own:\n{out.text}")
            assert out.proc.returncode is None
            result = await sheri_run(
                "submit", "code.generate", "--payload", '{"prompt": "hello"}',
                "--task-id", "outlive-1", "--wait", "--broker", broker.tcp_url,
                "--swarm", swarm, cwd=tmp_path,
            )  # fmt: skip
            assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


async def test_swarm_processes_do_not_outlive_a_killed_parent(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    with trio.fail_after(40):
        async with _two_general_processes(broker, tmp_path, "orphan") as (out, swarm, _):
            out.proc.kill()
            # the child had the parent's stderr: the pipe ends once it is gone too, after
            # leaving gracefully on the end of its stdin (the parent's end closed)
            await out.expect(r"^\[swarm\] .*warning: the sheri swarm .* is gone")
            await out.expect(rf"^\[general-2\] .*offline agent={swarm}-general-2")
            await out.wait_closed()


async def test_swarm_processes_must_fit_the_agents(tmp_path: Path) -> None:
    for value in ("0", "4"):
        result = await sheri_run("swarm", "--agents", "3", "--processes", value, cwd=tmp_path)
        assert result.returncode == 2
        assert f"--processes: must be within 1..3 (the agents), got {value}" in (
            result.stderr.decode()
        )


async def test_swarm_start_up_on_a_frozen_broker_fails_or_stops_on_sigterm(
    fresh_broker: MosquittoBroker, tmp_path: Path
) -> None:
    """Frozen once the first probe is connected: every agent is in its probe."""
    swarm = _swarm("frozen")
    flags = ["--agents", "3", "--broker", fresh_broker.tcp_url, "--swarm", swarm]
    labels = ["general-1", "deployment-1", "testing-1"]
    probing = r"^connected to .* as '[^']*\.probe\."
    (tmp_path / "sheri.toml").write_text(_frozen_toml())
    with _frozen(fresh_broker, probing) as command, trio.fail_after(30):
        failed = await sheri_run("swarm", *flags, cwd=tmp_path, command=command)
    err = failed.stderr.decode()
    assert failed.returncode == 1, err
    assert re.match(
        rf"sheri: error: agent {swarm}-\S+: start-up step 'probe' did not finish within 1 s ",
        _error_line(err),
    ), err
    for label in labels:  # each failed, or left because another failed
        assert re.search(
            rf"^\[{label}\] .*(error: stopped: agent {swarm}-{label}: start-up step 'probe' "
            rf"did not finish|info: start-up interrupted: .* step=probe$)",
            err,
            re.MULTILINE,
        ), err
    assert "Traceback" not in err

    (tmp_path / "sheri.toml").write_text(_frozen_toml(startup_timeout=60))
    with _frozen(fresh_broker, probing) as command, trio.fail_after(30):
        async with sheri("swarm", *flags, cwd=tmp_path, command=command) as out:
            await out.expect(r"froze broker")
            for label in labels:
                await out.expect(rf"^\[{label}\] .* start-up: probe agent={swarm}-{label} ")
            took = await _stopped_by_sigterm(out)
    assert took <= 2.0, took  # grace_period
    for label in labels:
        await out.expect(rf"^\[{label}\] .*start-up interrupted: .* step=probe$")
    assert "Traceback" not in out.text


@pytest.mark.parametrize(
    ("args", "waiting_for"),
    [
        (("submit", "testing.run", "--task-id", "cold-1"),
         "publishing task cold-1 (waiting for its PUBACK)"),
        (("submit", "testing.run", "--wait"),
         "subscribing to the task's topics (waiting for the SUBACK)"),
        (("tasks",), "reading the retained task states ({swarm}/tasks/state/+)"),
        (("monitor", "--once"), "reading the swarm's retained messages ({swarm}/#)"),
        (("monitor",), "subscribing to {swarm}/# (waiting for the SUBACK)"),
    ],
    ids=["submit", "submit-wait", "tasks", "monitor-once", "monitor"],
)  # fmt: skip
async def test_cli_waits_on_a_frozen_broker_are_bounded_and_say_what_they_waited_for(
    fresh_broker: MosquittoBroker, tmp_path: Path, args: tuple[str, ...], waiting_for: str
) -> None:
    (tmp_path / "sheri.toml").write_text(_frozen_toml())
    swarm = _swarm("frozen")
    connected = r"^connected to .* as 'sheri-(submit|tasks|monitor)-"
    with _frozen(fresh_broker, connected) as command, trio.fail_after(30):
        result = await sheri_run(
            *args, "--broker", fresh_broker.tcp_url, "--swarm", swarm,
            cwd=tmp_path, command=command,
        )  # fmt: skip
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "froze broker" in err
    assert _error_line(err) == (
        f"sheri: error: no answer from the broker within 1 s while "
        f"{waiting_for.format(swarm=swarm)}: it accepted the connection but does not answer "
        "(stalled or overloaded?); the bound is [broker] connect_timeout"
    )
    assert "Traceback" not in err
