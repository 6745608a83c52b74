"""``sheri demo``: a private mosquitto, a 9-agent swarm and a mix of tasks, shown live.

Without ``--broker`` the demo starts mosquitto (from PATH) on free ports of 127.0.0.1 with a
password generated for the run (mosquitto 2.0.11 binds WebSocket listeners to every
interface, so nothing it starts is left open). It starts nine agents, one per role plus a
second general, submits one task of every type that needs no API key and no network, and
one of an unknown type, shows them as a live table of tasks by state and by agent, and
prints a summary once every outcome has arrived. The agents' logs go to a file it names,
never to the terminal. ``--keep`` leaves the swarm and the broker up until Ctrl+C.

The agents run the real executors on a workspace made for the run (a tiny Python project
with its tests, an SQLite database, a deploy command that writes a file; see
:func:`make_demo_workspace`), so every task succeeds but two kinds, whose failures are
expected: the unknown type fails with ``unknown_type``; the LLM types (submitted only with
``--llm``, or after a yes at a terminal when ``ANTHROPIC_API_KEY`` is set) fail at once,
clearly, without a key.

Exit codes: 0 every outcome arrived and was the expected one (and, with ``--keep``, a
Ctrl+C or SIGTERM afterwards); 1 an unexpected or missing outcome, or no mosquitto;
2 a usage error; 130 interrupted before every outcome had arrived, or a second Ctrl+C.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

import trio
from cyclopts import Parameter

from ._mosquitto import MosquittoBroker
from .cli import (
    DEFAULT_SWARM_ROLES,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    LogLevel,
    SwarmView,
    UsageError,
    agent_label,
    exit_now,
    remember_secrets,
    scrub,
    setup_logging,
)
from .cli import main as sheri_main
from .config import Connection, FileConfig, connection_settings
from .dashboard import DashboardError, DashboardOptions, run_dashboard
from .mqtt import BrokerURL, open_client
from .swarm import (
    TASK_ROLES,
    AgentConfig,
    BadMessage,
    Topics,
    decode_envelope,
    encode,
    run_agent,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from rich.console import Console, RenderableType
    from rich.text import Text

    from .mqtt import Client, Message

__all__ = [
    "DEMO_TASKS",
    "INSTALL_HINT",
    "LLM_TASKS",
    "DemoProgress",
    "DemoTask",
    "demo_cmd",
    "find_mosquitto",
    "main",
    "make_demo_workspace",
    "plan_tasks",
]

log = logging.getLogger("sheri_trio.demo")

DEFAULT_SWARM: Final = "sheri-demo"
_INSTALL: Final = "Debian/Ubuntu: sudo apt-get install mosquitto mosquitto-clients"
INSTALL_HINT: Final = f"mosquitto not found on PATH: install it ({_INSTALL}), or give --broker URL"

#: payloads beyond the empty one, where a type needs an input
_INPUTS: dict[str, dict[str, Any]] = {
    "deployment.deploy": {"service": "test-service", "version": "1.0.0"},
    "deployment.rollback": {"service": "test-service", "version": "0.9.0"},
    "testing.run": {"test_suite": "integration"},
    "code.review": {"code": "def add(a, b):\n    return a + b\n", "language": "python"},
    "code.generate": {"prompt": "a function that adds two numbers", "language": "python"},
}

LLM_TYPES: Final = ("code.review", "code.generate", "documentation.generate")
UNKNOWN_TYPE: Final = "demo.unknown-type"

#: the seed's own examples first, then one task of every other type that needs neither an
#: API key nor the network, then one that no agent has an executor for
DEMO_TASKS: Final[list[tuple[str, dict[str, Any]]]] = [
    *[(t, _INPUTS[t]) for t in ("deployment.deploy", "testing.run")],
    *[
        (t, _INPUTS.get(t, {}))
        for t in TASK_ROLES
        if t not in (*LLM_TYPES, "deployment.deploy", "testing.run")
    ],
    (UNKNOWN_TYPE, {}),
]
#: submitted only with --llm (or a yes at a terminal when a key is set)
LLM_TASKS: Final[list[tuple[str, dict[str, Any]]]] = [(t, _INPUTS.get(t, {})) for t in LLM_TYPES]


@dataclass(frozen=True, slots=True)
class DemoTask:
    task_id: str
    type: str
    payload: dict[str, Any]
    #: None: success is expected; else a part of the error it is expected to fail with
    expect_error: str | None = None


def _has_llm_key(environ: Any) -> bool:
    return bool(environ.get("ANTHROPIC_API_KEY") or environ.get("ANTHROPIC_AUTH_TOKEN"))


def plan_tasks(run_id: str, *, llm: bool, environ: Any = None) -> list[DemoTask]:
    """The tasks to submit, with the outcome each is expected to have here."""
    environ = os.environ if environ is None else environ
    chosen = [*DEMO_TASKS[:-1], *(LLM_TASKS if llm else []), DEMO_TASKS[-1]]
    no_key = not _has_llm_key(environ)
    tasks = []
    for n, (task_type, payload) in enumerate(chosen, 1):
        expect = None
        if task_type == UNKNOWN_TYPE:
            expect = "no executor for task type"
        elif task_type in LLM_TYPES and no_key:
            expect = "no Anthropic API key"
        tasks.append(DemoTask(f"demo-{run_id}-{n:02d}", task_type, payload, expect))
    return tasks


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


def find_mosquitto(path: str | None = None) -> str | None:
    """The mosquitto binary on ``path`` (default $PATH), or None.

    The ``sbin`` directory beside each ``bin`` directory of the path is searched too:
    Debian installs the broker as /usr/sbin/mosquitto and leaves sbin off users' PATH.
    """
    path = os.environ.get("PATH", os.defpath) if path is None else path
    dirs = [d for d in path.split(os.pathsep) if d]
    dirs += [str(Path(d).with_name("sbin")) for d in dirs if Path(d).name == "bin"]
    return shutil.which("mosquitto", path=os.pathsep.join(dirs))


def _start_broker(broker: MosquittoBroker) -> None:
    """Start mosquitto with SIGINT blocked, a mask it inherits and keeps: a Ctrl+C at
    the terminal goes to its whole process group, and must not take the broker away
    before the agents have left. It stops on SIGTERM (:meth:`MosquittoBroker.stop`)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        broker.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ------------------------------------------------------------------ progress
#: the columns of the live table: where each of our tasks is
COLUMNS: Final = ("waiting", "running", "done", "expected", "failed")
_STYLES: Final = {"running": "cyan", "done": "green", "expected": "yellow", "failed": "red"}


@dataclass(slots=True)
class Outcome:
    task: DemoTask
    success: bool
    agent_id: str | None
    attempt: int
    payload: dict[str, Any]

    @property
    def column(self) -> str:
        """done, expected (the error it was meant to fail with) or failed (unexpected)."""
        if self.success:
            return "done" if self.task.expect_error is None else "failed"
        expected = self.task.expect_error
        error = str(self.payload.get("error", ""))
        return "expected" if expected is not None and expected in error else "failed"


def _gist(result: Any, limit: int = 90) -> str:
    """``key=value ...`` of a result's scalar fields, cut at ``limit`` characters."""
    if not isinstance(result, dict):
        text = json.dumps(result, default=str)
    else:
        text = " ".join(
            f"{k}={v}"
            for k, v in result.items()
            if (
                "\n" not in v and len(v) <= 60
                if isinstance(v, str)
                else not isinstance(v, dict | list)
            )
        )
    text = scrub(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(slots=True)
class DemoProgress:
    """What the demo knows of its tasks, from the swarm's messages (no I/O)."""

    topics: Topics
    tasks: list[DemoTask]
    #: our agents: id -> the name shown (other agents appear when they hold a task of ours)
    agents: dict[str, str]
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    view: SwarmView = field(init=False)
    _by_id: dict[str, DemoTask] = field(init=False)

    def __post_init__(self) -> None:
        self.view = SwarmView(self.topics, max_tasks=max(1000, 2 * len(self.tasks)))
        self._by_id = {t.task_id: t for t in self.tasks}

    def feed(self, message: Message, now: float) -> None:
        self.view.feed(message, now)
        t = self.topics
        if message.topic not in (t.tasks_complete, t.tasks_failed):
            return
        try:
            p = decode_envelope(message.payload).payload
        except BadMessage:
            return
        task_id, attempt, agent_id = p.get("task_id"), p.get("attempt", 1), p.get("agent_id")
        task = self._by_id.get(task_id) if isinstance(task_id, str) else None
        if task is None or not isinstance(attempt, int):
            return
        seen = self.outcomes.get(task.task_id)
        if seen is not None and attempt < seen.attempt:
            return  # an older attempt's outcome: fenced off
        self.outcomes[task.task_id] = Outcome(
            task,
            message.topic == t.tasks_complete,
            agent_id if isinstance(agent_id, str) else None,
            attempt,
            p,
        )

    @property
    def finished(self) -> bool:
        """Every task has its outcome."""
        return len(self.outcomes) == len(self.tasks)

    def count(self, column: str) -> int:
        return sum(1 for o in self.outcomes.values() if o.column == column)

    @property
    def unexpected(self) -> int:
        """Outcomes not the expected one, and outcomes missing."""
        return self.count("failed") + len(self.tasks) - len(self.outcomes)

    def place(self, task: DemoTask) -> tuple[str | None, str]:
        """(agent id or None, column): where a task sits in the live table."""
        outcome = self.outcomes.get(task.task_id)
        row = self.view.tasks.get(task.task_id)
        if outcome is not None:
            return outcome.agent_id or (row.agent if row else None), outcome.column
        if row is None or row.state in ("new", "released") or row.agent is None:
            return None, "waiting"
        return row.agent, "running"

    def render(self, elapsed: float) -> RenderableType:
        """The live table: one row per agent, one column per state, totals at the foot."""
        from rich.table import Table
        from rich.text import Text

        cells: dict[str | None, dict[str, int]] = {}
        for task in self.tasks:
            agent, column = self.place(task)
            cells.setdefault(agent, dict.fromkeys(COLUMNS, 0))[column] += 1
        totals = {c: sum(row[c] for row in cells.values()) for c in COLUMNS}
        table = Table(
            title=f"{len(self.tasks)} tasks in {self.topics.swarm}, {elapsed:.1f} s",
            caption="expected: failed as it should (unknown type, or no API key)",
            show_footer=True,
        )
        table.add_column("agent", footer="all", no_wrap=True)
        for c in COLUMNS:
            footer = Text(str(totals[c]), style=_STYLES.get(c, "") if totals[c] else "dim")
            table.add_column(c, footer=footer, justify="right", no_wrap=True)
        others = sorted(a for a in cells if a is not None and a not in self.agents)
        for agent_id in [None, *self.agents, *others]:
            row = cells.get(agent_id, dict.fromkeys(COLUMNS, 0))
            if agent_id is None:
                label = Text("(no agent yet)", style="dim")
            else:
                known = self.view.agents.get(agent_id)
                online = known is not None and known.status == "online"
                label = Text(self.agents.get(agent_id, agent_id), style="" if online else "dim")
            table.add_row(
                label,
                *[
                    Text(str(row[c]), style=_STYLES.get(c, "")) if row[c] else Text("-", "dim")
                    for c in COLUMNS
                ],
            )
        return table

    def summary(self, elapsed: float, missing: str) -> list[Text]:
        """One line per task, in the order submitted, then the counts."""
        from rich.text import Text

        lines = []
        for task in self.tasks:
            outcome = self.outcomes.get(task.task_id)
            if outcome is None:
                what = f"{task.type:24} {task.task_id}: {missing}"
                lines.append(Text.assemble(("  LOST      ", "red"), what))
                continue
            p = outcome.payload
            by = f"{task.type:24} {self.agents.get(outcome.agent_id or '', outcome.agent_id)!s:15}"
            if outcome.column == "done":
                what = f"{by} {p.get('duration', '?'):>6} ms  {_gist(p.get('result'))}"
                lines.append(Text.assemble(("  ok        ", "green"), what))
            elif outcome.column == "expected":
                what = f"{by} {scrub(str(p.get('error')))}"
                lines.append(Text.assemble(("  expected  ", "yellow"), what))
            else:
                error = p.get("error") if not outcome.success else None
                error = error or f"succeeded, expected an error: {task.expect_error}"
                what = f"{by} {scrub(str(error))}"
                lines.append(Text.assemble(("  FAIL      ", "red"), what))
        lines.append(
            Text(
                f"{len(self.tasks)} tasks, {self.count('done')} successful, "
                f"{self.count('expected')} failed as expected, {self.unexpected} unexpected, "
                f"{elapsed:.2f} s"
            )
        )
        return lines


# -------------------------------------------------------------------- signals
class _Stopper:
    """First SIGINT/SIGTERM: cancel the current phase and leave gracefully. Second: at once."""

    def __init__(self) -> None:
        self.requested = trio.Event()
        self.on_exit: Callable[[], None] | None = None
        self._scopes: list[trio.CancelScope] = []

    @contextlib.contextmanager
    def phase(self) -> Iterator[trio.CancelScope]:
        with trio.CancelScope() as scope:
            if self.requested.is_set():
                scope.cancel()
            self._scopes.append(scope)
            try:
                yield scope
            finally:
                self._scopes.remove(scope)

    async def watch(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if not self.requested.is_set():
                log.info("%s: stopping the demo", signal.Signals(signum).name)
                self.requested.set()
                for scope in self._scopes:
                    scope.cancel()
            else:
                log.warning("%s again: exiting at once", signal.Signals(signum).name)
                if self.on_exit is not None:
                    self.on_exit()
                exit_now(EXIT_INTERRUPTED)


# ------------------------------------------------------------------- the run
@dataclass(slots=True)
class DemoOptions:
    swarm: str = DEFAULT_SWARM
    #: None: start a private mosquitto
    connection: Connection | None = None
    keep: bool = False
    llm: bool = False
    timeout: float = 60.0
    log_file: Path | None = None
    log_level: str = "info"


@dataclass(frozen=True, slots=True)
class Dashboard:
    """Where ``--keep`` shows the dashboard: its URL and token."""

    url: str
    token: str


def _log_to_file(path: Path, level: str) -> logging.Handler:
    """Every log record to ``path``, none to the terminal (the live table owns it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    setup_logging(level, "demo", label_first=True, handler=handler)
    logging.captureWarnings(True)
    return handler


def _say(console: Console, text: str | Text = "") -> None:
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def _write_client_config(workdir: Path, broker: MosquittoBroker, swarm: str) -> Path:
    """A sheri.toml for ``sheri submit/tasks/monitor --config`` against the private broker."""
    path = workdir / "sheri.toml"
    text = (
        f"# sheri demo's private broker (password per run); for --config\n"
        f"[broker]\nurl = {json.dumps(broker.url('mqtt', credentials=False))}\n"
        f"username = {json.dumps(broker.username)}\npassword = {json.dumps(broker.password)}\n\n"
        f"[agent]\nswarm = {json.dumps(swarm)}\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _keep_lines(
    conn: Connection, swarm: str, config: Path | None, dashboard: Dashboard | None
) -> list[str]:
    """What ``--keep`` prints once the tasks are done: how to reach the swarm."""
    if config is not None:  # our private broker: its URL and password are in the file
        where, what, note = f"--config {config}", "swarm and broker stay", f" (login in {config})"
    else:
        where, what, note = f"--broker URL --swarm {swarm}", "swarm stays", ""
    lines = [
        f"the {what} up until Ctrl+C (or SIGTERM)",
        f"  broker     {conn.display()}{note}",
        f"  swarm      {swarm}",
        f"  submit     sheri submit database.backup {where} --wait",
        f"  watch      sheri monitor {where}",
    ]
    if dashboard is not None:
        lines.append(f"  dashboard  {dashboard.url}?token={dashboard.token}")
    return lines


async def _start_dashboard(
    nursery: trio.Nursery, conn: Connection, workdir: Path, stop: trio.Event
) -> Dashboard:
    """``sheri dashboard`` of the demo's swarm, until ``stop``: on port 8080, or any free
    one if 8080 is taken; its history in the work directory."""
    for port in (8080, 0):
        options = DashboardOptions(
            conn=conn, db=workdir / "dashboard.sqlite3", retention=7 * 86400.0, port=port
        )
        try:
            running = await nursery.start(
                lambda task_status, o=options: run_dashboard(
                    o, shutdown=stop, task_status=task_status
                )
            )
        except DashboardError as exc:
            log.info("dashboard: %s", exc)
            continue
        return Dashboard(running.url, running.token)
    raise DashboardError("no port to listen on")  # port 0 failed too


async def run_demo(options: DemoOptions, console: Console) -> int:
    """Run the demo; return the exit code."""
    workdir = Path(tempfile.mkdtemp(prefix="sheri-demo-"))
    log_path = (options.log_file or workdir / "agents.log").resolve()
    handler = _log_to_file(log_path, options.log_level)
    stopper = _Stopper()
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stopper.watch, signals)
                code = await _run(options, console, workdir, log_path, stopper)
                nursery.cancel_scope.cancel()
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    return code


async def _run(
    options: DemoOptions, console: Console, workdir: Path, log_path: Path, stopper: _Stopper
) -> int:
    broker: MosquittoBroker | None = None
    client_config: Path | None = None
    conn = options.connection
    if conn is None:
        broker = MosquittoBroker(workdir / "mosquitto", tls=False)
        try:
            await trio.to_thread.run_sync(_start_broker, broker)
        except RuntimeError as exc:  # no mosquitto_passwd, or mosquitto would not start
            first = str(exc).splitlines()[0]
            if "not found" in first:
                why = f"{first}; install it ({_INSTALL}), or give --broker URL"
            else:
                why = f"{first} (its log: {broker.log_path}); or give --broker URL"
            print(f"sheri: error: {why}", file=sys.stderr, flush=True)
            return EXIT_FAILURE
        if stopper.requested.is_set():  # interrupted while it started
            await trio.to_thread.run_sync(broker.stop)
            return EXIT_INTERRUPTED
        stopper.on_exit = broker.kill
        conn = Connection(broker.tcp_url, options.swarm, {})
        client_config = _write_client_config(workdir, broker, options.swarm)
    remember_secrets(conn)
    try:
        origin = "private mosquitto, password per run" if broker else "given with --broker"
        _say(console, f"broker {conn.display()} ({origin}); work directory {workdir}")
        _say(console, f"agent logs: {log_path}")
        return await _run_swarm(options, console, conn, workdir, client_config, stopper)
    finally:
        if broker is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(broker.stop)


async def _run_swarm(
    options: DemoOptions,
    console: Console,
    conn: Connection,
    workdir: Path,
    client_config: Path | None,
    stopper: _Stopper,
) -> int:
    url = BrokerURL.parse(conn.broker)
    executor_config = make_demo_workspace(workdir, health_targets=[f"tcp://{url.host}:{url.port}"])
    swarm = options.swarm
    prefix = swarm.replace("/", "-")
    numbers: dict[str, int] = {}
    agents: list[tuple[AgentConfig, str]] = []
    for role in DEFAULT_SWARM_ROLES:
        numbers[role] = numbers.get(role, 0) + 1
        label = f"{role}-{numbers[role]}"
        agent_id = f"{prefix}-{label}"
        config = AgentConfig(
            role=role,
            agent_id=agent_id,
            swarm=swarm,
            broker=conn.broker,
            heartbeat_interval=2.0,
            lease_time=6.0,
            client_options=dict(conn.client_options),
            executor_config={**executor_config, "state_dir": str(workdir / "state" / agent_id)},
        )
        agents.append((config, label))
    log.info("starting %d agents in swarm %s at %s", len(agents), swarm, conn.display())
    stop = trio.Event()

    async def agent(
        config: AgentConfig,
        label: str,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        agent_label.set(label)
        await run_agent(config, shutdown=stop, task_status=task_status)

    code = EXIT_INTERRUPTED
    async with trio.open_nursery() as swarm_nursery:
        with stopper.phase():
            async with trio.open_nursery() as starting:
                for config, label in agents:
                    starting.start_soon(swarm_nursery.start, agent, config, label)
        if not stopper.requested.is_set():
            labels = ", ".join(label for _, label in agents)
            _say(console, f"{len(agents)} agents online in swarm {swarm}: {labels}")
            code = await _submit_and_watch(options, console, conn, agents, stopper)
        if options.keep and not stopper.requested.is_set():
            dashboard = await _start_dashboard(swarm_nursery, conn, workdir, stop)
            for line in _keep_lines(conn, swarm, client_config, dashboard=dashboard):
                _say(console, line)
            await stopper.requested.wait()
        if stopper.requested.is_set():
            then = ", then the broker" if client_config is not None else ""
            _say(console, f"stopping: the agents leave{then}")
        stop.set()
    return code


async def _submit_and_watch(
    options: DemoOptions,
    console: Console,
    conn: Connection,
    agents: list[tuple[AgentConfig, str]],
    stopper: _Stopper,
) -> int:
    """Submit the tasks, show them live until every outcome is in; return the exit code."""
    from rich.live import Live

    topics = Topics(options.swarm)
    tasks = plan_tasks(secrets.token_hex(3), llm=options.llm)
    progress = DemoProgress(topics, tasks, {c.agent_id: label for c, label in agents})
    if not options.llm:
        _say(
            console,
            f"LLM tasks ({', '.join(LLM_TYPES)}) left out: --llm adds them "
            "(they need ANTHROPIC_API_KEY and call the Anthropic API)",
        )
    start = trio.current_time()
    interrupted = True
    async with (
        open_client(
            conn.broker,
            client_id=f"sheri-demo-{secrets.token_hex(4)}",
            clean_start=True,
            **conn.client_options,
        ) as client,
        client.subscribe(topics.all, qos=1) as messages,
    ):
        with Live(
            progress.render(0.0), console=console, auto_refresh=False, transient=False
        ) as live:
            with trio.move_on_after(options.timeout) as deadline, stopper.phase():
                async with trio.open_nursery() as nursery:

                    async def refresh() -> None:
                        while True:
                            live.update(progress.render(trio.current_time() - start), refresh=True)
                            await trio.sleep(0.25)

                    nursery.start_soon(refresh)
                    await _publish(client, topics, tasks)
                    async for message in messages:
                        progress.feed(message, trio.current_time())
                        if progress.finished:
                            break
                    nursery.cancel_scope.cancel()
            interrupted = stopper.requested.is_set() and not progress.finished
            live.update(progress.render(trio.current_time() - start), refresh=True)
    _say(console)
    elapsed = trio.current_time() - start
    if interrupted:
        missing = "no outcome (interrupted)"
    elif deadline.cancelled_caught:
        missing = f"no outcome within {options.timeout:g} s (--timeout)"
    else:
        missing = "no outcome"
    for line in progress.summary(elapsed, missing):
        _say(console, line)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILURE if progress.unexpected else EXIT_OK


async def _publish(client: Client, topics: Topics, tasks: list[DemoTask]) -> None:
    for task in tasks:
        body = {
            "task_id": task.task_id,
            "type": task.type,
            "payload": task.payload,
            "priority": "medium",
        }
        await client.publish(
            topics.tasks_new, encode(None, None, body), qos=1, content_type="application/json"
        )


# ------------------------------------------------------------------- command
async def _ask_llm(console: Console) -> bool:
    from rich.prompt import Confirm

    question = (
        f"ANTHROPIC_API_KEY is set: also submit the LLM tasks ({', '.join(LLM_TYPES)}), "
        "which call the Anthropic API?"
    )
    return await trio.to_thread.run_sync(
        lambda: Confirm.ask(question, console=console, default=False)
    )


async def demo_cmd(
    *,
    broker: Annotated[
        str | None,
        Parameter(
            help="Use this broker (mqtt://, mqtts://, ws://, wss://), not a private mosquitto."
        ),
    ] = None,
    swarm: Annotated[str, Parameter(help="Swarm name, the topic prefix.")] = DEFAULT_SWARM,
    keep: Annotated[
        bool,
        Parameter(
            alias="--keep-running",
            negative="",
            help="Keep the swarm and the broker up after the summary, until Ctrl+C.",
        ),
    ] = False,
    llm: Annotated[
        bool | None,
        Parameter(
            help="Also submit the LLM tasks (code.review, code.generate, "
            "documentation.generate). Default: ask at a terminal when ANTHROPIC_API_KEY is set."
        ),
    ] = None,
    outcome_timeout: Annotated[
        float,
        Parameter(name="--timeout", help="Seconds to wait for every outcome before giving up."),
    ] = 60.0,
    log_file: Annotated[
        Path | None, Parameter(help="Where the agents' logs go (default: in the work directory).")
    ] = None,
    log_level: Annotated[LogLevel, Parameter(help="Log level of the log file.")] = "info",
    username: Annotated[
        str | None, Parameter(help="With --broker: user name (env SHERI_USERNAME).")
    ] = None,
    password: Annotated[
        str | None, Parameter(help="With --broker: password (env SHERI_PASSWORD).")
    ] = None,
) -> int:
    """Start mosquitto and 9 agents, submit a mix of tasks, show them live, print a summary.

    Needs no API key and no network. Exits 0 once every task has had its expected
    outcome (1 otherwise); with --keep, stays up until Ctrl+C.
    """
    from rich.console import Console

    if not (outcome_timeout > 0 and math.isfinite(outcome_timeout)):
        raise UsageError(
            f"--timeout: must be a positive number of seconds, got {outcome_timeout:g}"
        )
    try:
        Topics(swarm)
    except ValueError as exc:
        raise UsageError(f"--swarm: {exc}") from None
    connection = None
    if broker is not None:
        connection = connection_settings(
            FileConfig(), broker=broker, swarm=swarm, username=username, password=password
        )
    elif find_mosquitto() is None:
        print(f"sheri: error: {INSTALL_HINT}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    console = Console(highlight=False)
    if llm is None:
        interactive = sys.stdin.isatty() and console.is_terminal
        llm = interactive and _has_llm_key(os.environ) and await _ask_llm(console)
    options = DemoOptions(
        swarm=swarm,
        connection=connection,
        keep=keep,
        llm=llm,
        timeout=outcome_timeout,
        log_file=log_file,
        log_level=log_level,
    )
    return await run_demo(options, console)


def main() -> None:
    """``python -m sheri_trio.demo [FLAGS]``: the same as ``sheri demo [FLAGS]``."""
    sheri_main(["demo", *sys.argv[1:]])


if __name__ == "__main__":
    main()
