"""``sheri demo``: a private mosquitto, a 9-agent swarm, one task of every type.

The broker listens on free ports of 127.0.0.1 with a password generated for this run
(mosquitto 2.0.11 binds WebSocket listeners to every interface, so nothing it starts
is left open). Everything stops on exit.

The agents run the real executors on a workspace made for the run (a tiny Python
project with its tests, an SQLite database, a deploy command that writes a file; see
:func:`make_demo_workspace`), so every type succeeds that can without the network: the
LLM types need ``ANTHROPIC_API_KEY`` and fail at once, clearly, without it; the unknown
type fails with ``unknown_type``. Those expected failures do not count as failures.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import trio

from ._mosquitto import MosquittoBroker
from .mqtt import open_client
from .swarm._agent import AgentConfig, run_agent
from .swarm._protocol import TASK_ROLES, encode

NINE_ROLES = (
    "general",
    "deployment",
    "testing",
    "review",
    "security",
    "monitoring",
    "documentation",
    "database",
    "general",
)

#: payloads beyond the empty one, where a type needs an input
_INPUTS: dict[str, dict[str, Any]] = {
    "deployment.rollback": {"service": "test-service", "version": "0.9.0"},
    "code.review": {"code": "def add(a, b):\n    return a + b\n", "language": "python"},
    "code.generate": {"prompt": "a function that adds two numbers", "language": "python"},
}

#: the seed's own examples first, then one task of every other type
DEMO_TASKS: list[tuple[str, dict[str, Any]]] = [
    ("deployment.deploy", {"service": "test-service", "version": "1.0.0"}),
    ("testing.run", {"test_suite": "integration"}),
    *[(t, _INPUTS.get(t, {})) for t in TASK_ROLES if t not in ("deployment.deploy", "testing.run")],
    ("demo.unknown-type", {}),
]

LLM_TYPES = ("code.review", "code.generate", "documentation.generate")


def expected_failures(environ: Any = None) -> dict[str, str]:
    """task type -> the error it is expected to fail with in this environment."""
    environ = os.environ if environ is None else environ
    expected = {"demo.unknown-type": "no executor for task type"}
    if not (environ.get("ANTHROPIC_API_KEY") or environ.get("ANTHROPIC_AUTH_TOKEN")):
        expected.update({t: "no Anthropic API key" for t in LLM_TYPES})
    return expected


_DEMO_FILES = {
    "pyproject.toml": """\
        [project]
        name = "calc"
        version = "0.1.0"
        """,
    "requirements.txt": "# calc has no third-party dependencies\n",
    "README.md": "# calc\n\nAdds and subtracts.\n",
    "calc.py": """\
        def add(a, b):
            return a + b


        def sub(a, b):
            return a - b
        """,
    "tests/__init__.py": "",
    "tests/test_calc.py": """\
        from calc import add, sub


        def test_add():
            assert add(2, 3) == 5


        def test_sub():
            assert sub(5, 3) == 2
        """,
    "tests/integration/__init__.py": "",
    "tests/integration/test_flow.py": """\
        from calc import add, sub


        def test_round_trip():
            assert sub(add(1, 2), 2) == 1
        """,
}

_DEPLOY = (
    "import os, pathlib; p = pathlib.Path('deployed'); p.mkdir(exist_ok=True); "
    "(p / 'version.txt').write_text(os.environ['SHERI_VERSION'] + '\\n'); "
    "print('deployed', os.environ['SHERI_SERVICE'], os.environ['SHERI_VERSION'])"
)
_MIGRATE = (
    "import os, sqlite3; db = sqlite3.connect(os.environ['SHERI_DATABASE_PATH']); "
    "db.execute('CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT)'); "
    "db.execute('PRAGMA user_version = 1'); db.commit(); print('schema version 1')"
)


def make_demo_workspace(root: Path, *, health_targets: list[str]) -> dict[str, Any]:
    """Write the demo's workspace under ``root``; return the executors' configuration
    (what ``sheri.toml`` would hold, see docs/configuration.md)."""
    import sqlite3

    workspace = root / "workspace"
    for name, text in _DEMO_FILES.items():
        path = workspace / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    db = sqlite3.connect(workspace / "app.db")
    db.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT)")
    db.executemany("INSERT INTO notes (body) VALUES (?)", [("hello",), ("world",)])
    db.commit()
    db.close()
    return {
        "workspace": {"root": str(workspace)},
        "deploy": {
            "test-service": {
                "command": [sys.executable, "-c", _DEPLOY],
                "url": "file://" + str(workspace / "deployed"),
                "timeout": 30,
            }
        },
        "database": {"app": {"path": "app.db", "migrate": [sys.executable, "-c", _MIGRATE]}},
        "security": {"audit": {"args": ["--no-deps", "--disable-pip"]}},
        "monitoring": {"targets": health_targets, "timeout": 2},
    }


async def run_demo(
    *, swarm: str = "sheri-demo", keep_running: bool = False, out: Any = print
) -> int:
    """Run the demo; returns the number of tasks whose outcome was not the expected one."""
    workdir = Path(tempfile.mkdtemp(prefix="sheri-demo-"))
    with MosquittoBroker(workdir, tls=False) as broker:
        out(f"mosquitto {broker.url('mqtt', credentials=False)} (password per run, in {workdir})")
        executor_config = make_demo_workspace(
            workdir, health_targets=[f"tcp://127.0.0.1:{broker.tcp_port}"]
        )
        out(f"workspace {executor_config['workspace']['root']}")
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            for i, role in enumerate(NINE_ROLES):
                cfg = AgentConfig(
                    role=role,
                    agent_id=f"demo-{role}-{i}",
                    swarm=swarm,
                    broker=broker.tcp_url,
                    heartbeat_interval=2.0,
                    lease_time=6.0,
                    executor_config={
                        **executor_config,
                        "state_dir": str(workdir / "state" / f"demo-{role}-{i}"),
                    },
                )
                await nursery.start(
                    lambda task_status, cfg=cfg: run_agent(
                        cfg, shutdown=stop, task_status=task_status
                    )
                )
            out(f"9 agents online in swarm {swarm!r}: {', '.join(NINE_ROLES)}")
            failures = await _submit_and_watch(broker.tcp_url, swarm, out)
            if keep_running:
                out(
                    "swarm running; submit more with: "
                    f"sheri submit TYPE --broker <url> --swarm {swarm}"
                )
                await trio.sleep_forever()
            stop.set()
    return failures


async def _submit_and_watch(url: str, swarm: str, out: Any) -> int:
    """Submit DEMO_TASKS, print each outcome; return the number of unexpected ones."""
    t0 = time.perf_counter()
    pending: dict[str, str] = {}
    failures = expected = 0
    expect = expected_failures()
    async with open_client(url, client_id="demo-submitter") as client:
        async with client.subscribe(f"{swarm}/tasks/complete", f"{swarm}/tasks/failed") as msgs:
            for n, (task_type, payload) in enumerate(DEMO_TASKS, 1):
                task_id = f"demo-{n:02d}"
                pending[task_id] = task_type
                body = {
                    "task_id": task_id,
                    "type": task_type,
                    "payload": payload,
                    "priority": "medium",
                }
                await client.publish(f"{swarm}/tasks/new", encode(None, None, body), qos=1)
            with trio.move_on_after(60):
                while pending:
                    m = await msgs.receive()
                    p = json.loads(m.payload)["payload"]
                    if p["task_id"] not in pending:
                        continue
                    task_type = pending.pop(p["task_id"])
                    if p["status"] == "success" and task_type not in expect:
                        result = json.dumps(p["result"])[:100]
                        agent, ms = p["agent_id"], p["duration"]
                        out(f"  ok    {task_type:24} by {agent:22} {ms:>5} ms  {result}")
                    elif p["status"] != "success" and expect.get(task_type, "\0") in p["error"]:
                        expected += 1
                        out(f"  error {task_type:24} by {p['agent_id']:22} (expected) {p['error']}")
                    else:
                        failures += 1
                        what = p.get("error") or f"succeeded, expected: {expect.get(task_type)}"
                        out(f"  FAIL  {task_type:24} by {p['agent_id']:22} {what}")
    for task_id, task_type in pending.items():
        failures += 1
        out(f"  LOST  {task_type:24} {task_id}: no outcome within 60 s")
    out(
        f"{len(DEMO_TASKS)} tasks, {len(DEMO_TASKS) - failures - expected} successful, "
        f"{expected} expected errors, {failures} unexpected, {time.perf_counter() - t0:.2f} s"
    )
    return failures


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    raise SystemExit(1 if trio.run(run_demo) else 0)


if __name__ == "__main__":
    main()
