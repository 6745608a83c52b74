"""The ``sheri`` command line: run agents, submit tasks, look at a swarm.

Commands (``sheri COMMAND --help`` for the details)::

    sheri agent   --role R --agent-id ID --broker URL --swarm S   one agent, until Ctrl+C
    sheri swarm   [--agents N] [--roles a,b,...]                   N agents in one process
    sheri submit  TYPE [--payload JSON] [--wait]                   publish a task
    sheri tasks   [--state failed]                                 recent tasks, final states
    sheri monitor                                                  live table of agents, tasks
    sheri demo    [--keep] [--llm] [--broker URL]                  a local swarm at work

The TypeScript prototype's spelling keeps working unchanged::

    sheri --mqtt --role deployment --agent-id deploy-agent-01 \\
          --broker mqtt://localhost:1883 --swarm opencto-dev

:func:`main` rewrites it before parsing: when ``--mqtt`` is among the arguments it is
dropped and ``agent`` is put first, so the line above is ``sheri agent --role ...``.

Settings come from the flags, then the environment (``SHERI_BROKER``, ``SHERI_SWARM``,
``SHERI_ROLE``, ``SHERI_AGENT_ID``, ``SHERI_MAX_TASKS``, ``SHERI_USERNAME``,
``SHERI_PASSWORD``), then ``sheri.toml`` (see :mod:`sheri_trio.config`).

Errors are one line on stderr, ``sheri: error: ...``. Exit codes: 0 success, 1 a
runtime failure (broker unreachable or refusing us, duplicate agent id, a task that
failed), 2 a usage or configuration error (or, for ``submit --wait``, no agent claimed
the task in time), 130 stopped by a second Ctrl+C.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import secrets
import signal
import ssl
import sys
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, NoReturn

import trio
from cyclopts import App, Parameter

from . import __version__
from .config import (
    ConfigError,
    Connection,
    FileConfig,
    build_agent_config,
    connection_settings,
    load_config,
)
from .mqtt import (
    ClientClosed,
    ClientOptions,
    ConnectError,
    ConnectionLost,
    LocalProtocolError,
    Message,
    MQTTError,
    open_client,
)
from .swarm import DuplicateAgent, StartupError, read_retained, run_agent
from .swarm._claims import ClaimBook, ClaimVerdict
from .swarm._protocol import (
    AGENT_ID_RE,
    ROLES,
    TASK_ID_RE,
    TYPE_RE,
    BadMessage,
    Envelope,
    Topics,
    decode_envelope,
    encode,
    parse_claim,
    parse_outcome,
    roles_for,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from cyclopts.exceptions import CycloptsError
    from rich.console import RenderableType

    from .mqtt import Client, Subscription
    from .swarm._agent import AgentConfig

__all__ = ["app", "main", "rewrite_prototype_argv"]

log = logging.getLogger("sheri_trio.cli")

LogLevel = Literal["debug", "info", "warning", "error"]
Priority = Literal["low", "medium", "high"]

#: ``sheri swarm`` without --roles: one agent per role, and a second general one.
DEFAULT_SWARM_ROLES = (*ROLES, "general")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(ValueError):
    """A bad argument that the parser could not catch (exit code 2)."""


def _format_error(error: CycloptsError) -> Any:
    from rich.text import Text

    return Text(f"sheri: error: {str(error).strip()} (see --help)")


app = App(
    name="sheri",
    help="Role-based agents cooperating over MQTT: run them, give them tasks, watch them.",
    version=__version__,
    backend="trio",
    error_formatter=_format_error,
)

# Common options, shared by the commands.
BrokerOpt = Annotated[
    str | None,
    Parameter(help="Broker URL: mqtt://, mqtts://, ws://, wss:// (env SHERI_BROKER)."),
]
SwarmOpt = Annotated[str | None, Parameter(help="Swarm name, the topic prefix (env SHERI_SWARM).")]
UserOpt = Annotated[str | None, Parameter(help="Broker user name (env SHERI_USERNAME).")]
PasswordOpt = Annotated[str | None, Parameter(help="Broker password (env SHERI_PASSWORD).")]
ConfigOpt = Annotated[
    Path | None, Parameter(help="Configuration file (default: ./sheri.toml if present).")
]
LogLevelOpt = Annotated[LogLevel, Parameter(help="Log level of the lines on stderr.")]


# ------------------------------------------------------------------------ output
_secrets: set[str] = set()


def _remember_secrets(conn: Connection) -> None:
    """Passwords never appear in what we print, even inside an error message."""
    from .mqtt import BrokerURL

    for secret in (BrokerURL.parse(conn.broker).password, conn.client_options.get("password")):
        if isinstance(secret, str) and len(secret) >= 3:
            _secrets.add(secret)


def _scrub(text: str) -> str:
    for secret in _secrets:
        text = text.replace(secret, "***")
    return text


def _say(text: str = "") -> None:
    print(_scrub(text), flush=True)


#: the label of the agent a trio task works for (set per agent by ``sheri swarm``)
_agent_label: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "sheri_agent_label", default=None
)


class _LineFormatter(logging.Formatter):
    """``2026-02-22T20:00:00.123 [agent-id] info: event key=value`` (or ``[label] time ...``)."""

    def __init__(self, default_label: str, *, label_first: bool) -> None:
        super().__init__()
        self.default_label = default_label
        self.label_first = label_first

    def format(self, record: logging.LogRecord) -> str:
        label = _agent_label.get() or getattr(record, "agent_id", None) or self.default_label
        when = datetime.fromtimestamp(record.created).isoformat(timespec="milliseconds")
        level = record.levelname.lower()
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if self.label_first:
            line = f"[{label}] {when} {level}: {message}"
        else:
            line = f"{when} [{label}] {level}: {message}"
        return _scrub(line)


def _setup_logging(level: str, default_label: str, *, label_first: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter(default_label, label_first=label_first))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("transitions", "trio-websocket", "trio_websocket"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ------------------------------------------------------------------ running agents
def _exit_now(code: int) -> NoReturn:
    """Leave without any clean-up: the broker publishes our last will (offline)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


async def _watch_signals(signals: AsyncIterator[int], shutdown: trio.Event) -> None:
    """First SIGINT/SIGTERM: graceful shutdown. Second: exit at once.

    At once means without clean-up: a cancelled agent would still spend seconds in its
    shielded clean-up (releasing tasks, flushing the client), which is what a second
    Ctrl+C is meant to skip. The broker sees the connection drop and publishes the
    agent's will (a retained offline status), so other agents take its tasks over.
    """
    async for signum in signals:
        name = signal.Signals(signum).name
        if not shutdown.is_set():
            log.info("%s: shutting down gracefully (Ctrl+C again to exit at once)", name)
            shutdown.set()
        else:
            log.warning("%s again: exiting at once", name)
            _exit_now(EXIT_INTERRUPTED)


#: Task types whose executors work on the files of the workspace.
_WORKSPACE_TYPES: Final = (
    "testing.run",
    "testing.coverage",
    "security.scan",
    "security.audit",
    "code.review",
    "code.generate",
    "documentation.generate",
)


def _warn_implicit_workspace(agents: Sequence[tuple[AgentConfig, str | None]]) -> None:
    """Say once when agents will work on the current directory for want of a root."""
    roles = sorted(
        {
            config.role
            for config, _ in agents
            if not (config.executor_config.get("workspace") or {}).get("root")
            and (config.executor_config.get("executors") or {}).get("simulate") is not True
            and any(config.role in roles_for(t) for t in _WORKSPACE_TYPES)
        }
    )
    if roles:
        log.warning(
            "no [workspace] root configured: %s tasks of role(s) %s run on the current "
            "directory %s (set [workspace] root in sheri.toml to choose)",
            "/".join(t for t in _WORKSPACE_TYPES if any(r in roles_for(t) for r in roles)),
            ", ".join(roles),
            Path.cwd(),
        )


async def _run_agents(agents: Sequence[tuple[AgentConfig, str | None]]) -> int:
    """Run agents in one nursery until a signal asks them to leave.

    When one fails (at start-up, or later), the others leave gracefully, as on a signal;
    then its error is raised (several: a group).
    """
    _warn_implicit_workspace(agents)
    shutdown = trio.Event()
    errors: list[Exception] = []

    async def one(config: AgentConfig, label: str | None) -> None:
        if label is not None:
            _agent_label.set(label)
        try:
            await run_agent(config, shutdown=shutdown)
        except Exception as exc:  # not Cancelled: the nursery would cancel the others
            errors.append(exc)
            if len(agents) > 1:  # say which one (the command's error line tells one)
                log.error("stopped: %s", exc)
            shutdown.set()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as outer:
            outer.start_soon(_watch_signals, signals, shutdown)
            async with trio.open_nursery() as nursery:
                for config, label in agents:
                    nursery.start_soon(one, config, label)
            outer.cancel_scope.cancel()  # every agent has left: stop watching signals
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ExceptionGroup("agents failed", errors)
    return EXIT_OK


def _agent_config(file_config: FileConfig, **overrides: Any) -> AgentConfig:
    config = build_agent_config(file_config, **overrides)
    _remember_secrets(Connection(config.broker, config.swarm, config.client_options))
    return config


@app.command(name="agent")
async def agent_cmd(
    *,
    role: Annotated[
        str | None, Parameter(help=f"One of: {', '.join(ROLES)} (env SHERI_ROLE).")
    ] = None,
    agent_id: Annotated[
        str | None,
        Parameter(help="Unique id in the swarm; default sheri-ml-<8 hex> (env SHERI_AGENT_ID)."),
    ] = None,
    broker: BrokerOpt = None,
    swarm: SwarmOpt = None,
    max_tasks: Annotated[
        int | None, Parameter(help="Tasks run at once (env SHERI_MAX_TASKS).")
    ] = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    config: ConfigOpt = None,
    log_level: LogLevelOpt = "info",
) -> int:
    """Run one agent until SIGINT/SIGTERM (a second Ctrl+C exits at once).

    ``sheri --mqtt --role R ...`` (the prototype's spelling) is the same command.
    """
    file_config = load_config(config)
    cfg = _agent_config(
        file_config,
        role=role,
        agent_id=agent_id,
        broker=broker,
        swarm=swarm,
        max_tasks=max_tasks,
        username=username,
        password=password,
    )
    _setup_logging(log_level, cfg.agent_id)
    log.info(
        "starting agent %s: role=%s swarm=%s broker=%s max_tasks=%d%s",
        cfg.agent_id,
        cfg.role,
        cfg.swarm,
        Connection(cfg.broker, cfg.swarm, {}).display(),
        cfg.max_tasks,
        f" config={file_config.name}" if file_config.path else "",
    )
    return await _run_agents([(cfg, None)])


def _parse_roles(text: str | None) -> list[str]:
    if text is None:
        return list(DEFAULT_SWARM_ROLES)
    roles = [r.strip() for r in text.split(",") if r.strip()]
    if not roles:
        raise UsageError("--roles: give at least one role, e.g. --roles general,testing")
    for r in roles:
        if r not in ROLES:
            raise UsageError(f"--roles: unknown role {r!r}: choose from {', '.join(ROLES)}")
    return roles


@app.command(name="swarm")
async def swarm_cmd(
    *,
    agents: Annotated[
        int | None,
        Parameter(help="Number of agents; cycles through the roles (default: one per role)."),
    ] = None,
    roles: Annotated[
        str | None,
        Parameter(help="Comma-separated roles (default: every role once, plus a second general)."),
    ] = None,
    broker: BrokerOpt = None,
    swarm: SwarmOpt = None,
    max_tasks: Annotated[int | None, Parameter(help="Tasks run at once, per agent.")] = None,
    prefix: Annotated[
        str | None,
        Parameter(help="Agent id prefix: ids are <prefix>-<role>-<n> (default: the swarm)."),
    ] = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    config: ConfigOpt = None,
    log_level: LogLevelOpt = "info",
) -> int:
    """Run several agents in one process (default 9: one per role, plus a second general).

    Output lines are prefixed with the agent, e.g. ``[testing-1]``. Stops like ``agent``.
    """
    role_list = _parse_roles(roles)
    count = len(role_list) if agents is None else agents
    if not 1 <= count <= 1000:
        raise UsageError(f"--agents: must be within 1..1000, got {count}")
    file_config = load_config(config)
    conn = connection_settings(
        file_config, broker=broker, swarm=swarm, username=username, password=password
    )
    id_prefix = prefix if prefix is not None else conn.swarm.replace("/", "-")
    if not AGENT_ID_RE.fullmatch(f"{id_prefix}-x"):
        raise UsageError(f"--prefix: {id_prefix!r} must be letters, digits, '.', '_', '-'")
    numbers: dict[str, int] = {}
    configs: list[tuple[AgentConfig, str | None]] = []
    for i in range(count):
        role = role_list[i % len(role_list)]
        numbers[role] = numbers.get(role, 0) + 1
        label = f"{role}-{numbers[role]}"
        cfg = _agent_config(
            file_config,
            role=role,
            agent_id=f"{id_prefix}-{label}",
            broker=broker,
            swarm=swarm,
            max_tasks=max_tasks,
            username=username,
            password=password,
        )
        configs.append((cfg, label))
    _setup_logging(log_level, "swarm", label_first=True)
    log.info(
        "starting %d agents in swarm %s at %s: %s",
        count,
        conn.swarm,
        conn.display(),
        ", ".join(c.agent_id for c, _ in configs),
    )
    return await _run_agents(configs)


# ----------------------------------------------------------------------- clients
def _connection(
    config: Path | None,
    broker: str | None,
    swarm: str | None,
    username: str | None,
    password: str | None,
) -> Connection:
    conn = connection_settings(
        load_config(config), broker=broker, swarm=swarm, username=username, password=password
    )
    _remember_secrets(conn)
    _setup_logging("warning", "sheri")
    return conn


@asynccontextmanager
async def _open(conn: Connection, kind: str) -> AsyncIterator[Client]:
    """A short-lived client of the CLI's own (it is not an agent: no will, no session)."""
    async with open_client(
        conn.broker,
        client_id=f"sheri-{kind}-{secrets.token_hex(4)}",
        clean_start=True,
        **conn.client_options,
    ) as client:
        yield client


class NoAnswer(RuntimeError):
    """The broker accepted our connection but did not answer in time (exit code 1)."""

    def __init__(self, seconds: float, what: str) -> None:
        super().__init__(
            f"no answer from the broker within {seconds:g} s while {what}: it accepted the "
            "connection but does not answer (stalled or overloaded?); the bound is "
            "[broker] connect_timeout"
        )


def _answer_bound(conn: Connection) -> float:
    """How long the CLI waits for each answer of the broker: the ``connect_timeout``."""
    return float(conn.client_options.get("connect_timeout", ClientOptions().connect_timeout))


async def _read_retained(
    client: Client, topics: Topics, *filters: str, bound: float, what: str
) -> list[Message]:
    """The retained messages on ``filters``: they all arrive before our own sync marker.

    Each message (the first one included) must come within ``bound`` of the one before,
    else :class:`NoAnswer` says we were reading ``what``.
    """
    sync = f"{topics.swarm}/cli/sync/{secrets.token_hex(6)}"
    found: list[Message] = []
    with trio.move_on_after(bound) as scope:

        def renew() -> None:
            scope.deadline = trio.current_time() + bound

        await read_retained(client, sync, *filters, into=found, progress=renew)
    if scope.cancelled_caught:
        raise NoAnswer(bound, f"reading {what}")
    return found


def _decode(message: Message) -> Envelope | None:
    try:
        return decode_envelope(message.payload)
    except BadMessage:
        return None


def _short(value: Any, limit: int = 400) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------ submit
def _task_body(
    task_type: str,
    payload: str,
    priority: str,
    task_id: str | None,
    assigned_to: str | None,
    max_retries: int | None,
    timeout: float | None,
) -> dict[str, Any]:
    if not TYPE_RE.fullmatch(task_type):
        raise UsageError(f"TYPE: {task_type!r} is not a task type such as testing.run")
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"--payload: not valid JSON ({exc.msg} at column {exc.colno}): {_short(payload, 80)}"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(
            f'--payload: must be a JSON object such as \'{{"service": "api"}}\', '
            f"got {_short(payload, 80)}"
        )
    if task_id is None:
        task_id = f"task-{uuid.uuid4().hex[:12]}"
    elif not TASK_ID_RE.fullmatch(task_id):
        raise UsageError(
            f"--task-id: {task_id!r} is not allowed: use 1-128 of letters, digits, '.', '_', '-'"
        )
    if assigned_to is not None and not AGENT_ID_RE.fullmatch(assigned_to):
        raise UsageError(f"--assigned-to: {assigned_to!r} is not an agent id")
    if max_retries is not None and not 0 <= max_retries <= 100:
        raise UsageError(f"--max-retries: must be within 0..100, got {max_retries}")
    if timeout is not None and not 0 < timeout <= 86400:
        raise UsageError(
            f"--timeout: must be a number of seconds within (0, 86400], got {timeout:g}"
        )
    body: dict[str, Any] = {
        "task_id": task_id,
        "type": task_type,
        "payload": data,
        "priority": priority,
    }
    if assigned_to is not None:
        body["assigned_to"] = assigned_to
    if max_retries is not None:
        body["max_retries"] = max_retries
    if timeout is not None:
        body["timeout_s"] = timeout
    return body


@app.command(name="submit")
async def submit_cmd(
    task_type: Annotated[str, Parameter(help="Task type, e.g. testing.run, deployment.deploy.")],
    /,
    *,
    payload: Annotated[str, Parameter(help="The task's payload, a JSON object.")] = "{}",
    priority: Priority = "medium",
    task_id: Annotated[str | None, Parameter(help="Default: task-<12 hex>.")] = None,
    assigned_to: Annotated[str | None, Parameter(help="Only this agent may take it.")] = None,
    max_retries: Annotated[int | None, Parameter(help="Retries after a failed try.")] = None,
    task_timeout: Annotated[
        float | None, Parameter(name="--timeout", help="Seconds allowed per try.")
    ] = None,
    wait: Annotated[bool, Parameter(help="Follow the task to its outcome.")] = False,
    wait_timeout: Annotated[float, Parameter(help="Seconds to wait for an agent's claim.")] = 10.0,
    broker: BrokerOpt = None,
    swarm: SwarmOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    config: ConfigOpt = None,
) -> int:
    """Publish a task on {swarm}/tasks/new; print its id (or, with --wait, its course).

    With --wait: exit 0 when it succeeds, 1 when it fails, 2 when no agent claims it
    within --wait-timeout.
    """
    body = _task_body(task_type, payload, priority, task_id, assigned_to, max_retries, task_timeout)
    if not (wait_timeout > 0 and math.isfinite(wait_timeout)):
        raise UsageError(
            f"--wait-timeout: must be a positive number of seconds, got {wait_timeout:g}"
        )
    conn = _connection(config, broker, swarm, username, password)
    topics = Topics(conn.swarm)
    data = encode(None, None, body)
    bound = _answer_bound(conn)
    async with _open(conn, "submit") as client:
        if not wait:
            with trio.move_on_after(bound) as scope:
                await client.publish(topics.tasks_new, data, qos=1, content_type="application/json")
            if scope.cancelled_caught:
                raise NoAnswer(bound, f"publishing task {body['task_id']} (waiting for its PUBACK)")
            _say(body["task_id"])
            return EXIT_OK
        return await _submit_and_follow(client, topics, body, data, wait_timeout, bound)


@dataclass(slots=True)
class _Peer:
    role: str | None
    online: bool


async def _submit_and_follow(
    client: Client,
    topics: Topics,
    body: dict[str, Any],
    data: bytes,
    wait_timeout: float,
    bound: float,
) -> int:
    """Subscribe, publish (each answer of the broker within ``bound``), then follow."""
    waiting_for = "subscribing to the task's topics (waiting for the SUBACK)"
    with trio.move_on_after(bound) as answer:  # lifted once the task is out
        async with client.subscribe(
            topics.tasks_assigned,
            topics.tasks_progress,
            topics.tasks_complete,
            topics.tasks_failed,
            topics.tasks_released,
            topics.agents_status_all,
            qos=1,
        ) as messages:
            waiting_for = f"publishing task {body['task_id']} (waiting for its PUBACK)"
            await client.publish(topics.tasks_new, data, qos=1, content_type="application/json")
            answer.deadline = math.inf
            return await _follow(messages, topics, body, wait_timeout)
    raise NoAnswer(bound, waiting_for)


async def _follow(
    messages: Subscription, topics: Topics, body: dict[str, Any], wait_timeout: float
) -> int:
    task_id: str = body["task_id"]
    roles = roles_for(body["type"])
    peers: dict[str, _Peer] = {}
    book = ClaimBook()
    holder: tuple[str, int] | None = None  # (agent id, attempt) of the latest winning claim
    waiting_since = ""  # why we wait for a claim: "" (first claim) or what happened
    _say(f"submitted {task_id} ({body['type']}, priority {body['priority']}) to {topics.swarm}")
    deadline = trio.current_time() + wait_timeout
    while True:
        message: Message | None = None
        with trio.move_on_at(deadline if holder is None else math.inf):
            message = await messages.receive()
        if message is None:
            _say(
                _no_claim(
                    task_id, wait_timeout, roles, body.get("assigned_to"), peers, waiting_since
                )
            )
            return EXIT_USAGE
        env = _decode(message)
        if env is None:
            continue
        p = env.payload
        topic = message.topic
        status_of = topics.status_agent_id(topic)
        if status_of is not None:
            role = p.get("role", env.role)
            peers[status_of] = _Peer(
                role if isinstance(role, str) else None, p.get("status") == "online"
            )
            if holder is not None and holder[0] == status_of and p.get("status") != "online":
                _say(f"holder {status_of} went offline; waiting for another agent to take over")
                waiting_since = f"{status_of} went offline"
                holder = None
                deadline = trio.current_time() + wait_timeout
            continue
        if p.get("task_id") != task_id:
            continue
        try:
            if topic == topics.tasks_assigned:
                claim = parse_claim(env)
                if book.observe_claim(claim, trio.current_time()) is ClaimVerdict.WON:
                    holder = (claim.agent_id, claim.attempt)
                    _say(
                        f"claimed by {claim.agent_id} ({claim.role or '?'}), "
                        f"attempt {claim.attempt}"
                    )
            elif topic == topics.tasks_released:
                claim = parse_claim(env)
                if book.release(task_id, claim.attempt):
                    _say(f"released by {claim.agent_id} (attempt {claim.attempt})")
                    waiting_since = f"{claim.agent_id} released it"
                    holder = None
                    deadline = trio.current_time() + wait_timeout
            elif topic == topics.tasks_progress:
                attempt = p.get("attempt", 1)
                if holder is not None and attempt == holder[1]:
                    _say(_progress_line(p))
            else:
                outcome = parse_outcome(env, success=topic == topics.tasks_complete)
                if not book.observe_outcome(outcome):
                    continue  # a stale attempt's outcome: fenced off
                if outcome.success:
                    _say(
                        f"complete: success by {outcome.agent_id}, attempt {outcome.attempt}, "
                        f"{p.get('duration', '?')} ms"
                    )
                    _say(f"result: {_short(p.get('result'), 4000)}")
                    return EXIT_OK
                _say(
                    f"failed: {p.get('error', '?')} (reason {p.get('reason', '?')}) "
                    f"by {outcome.agent_id or '?'}, attempt {outcome.attempt}"
                )
                return EXIT_FAILURE
        except BadMessage:
            continue


def _progress_line(p: dict[str, Any]) -> str:
    state = p.get("state", "?")
    parts = [f"progress: {state}"]
    if "try" in p:
        parts.append(f"try {p['try']}")
    if p.get("message"):
        parts.append(str(p["message"]))
    for key in ("error", "delay"):
        if key in p:
            parts.append(f"{key}={p[key]}")
    return ", ".join(parts)


def _no_claim(
    task_id: str,
    wait_timeout: float,
    roles: Sequence[str],
    assigned_to: str | None,
    peers: dict[str, _Peer],
    why: str,
) -> str:
    after = f" after {why}" if why else ""
    online = sorted(a for a, peer in peers.items() if peer.online and peer.role in roles)
    text = (
        f"no agent claimed task {task_id}{after} within {wait_timeout:g} s; "
        f"online agents with role {' or '.join(roles)}: {', '.join(online) or 'none'}"
    )
    if assigned_to is not None:
        peer = peers.get(assigned_to)
        state = "online" if peer is not None and peer.online else "not online"
        text += f"; the task is assigned to {assigned_to}, which is {state}"
    return text


# ------------------------------------------------------------------------- tasks
@app.command(name="tasks")
async def tasks_cmd(
    *,
    state: Annotated[
        str | None, Parameter(help="Only these states (comma-separated), e.g. failed.")
    ] = None,
    limit: Annotated[int, Parameter(help="At most this many, most recent first.")] = 50,
    json_lines: Annotated[
        bool, Parameter(name="--json", help="One JSON object per line instead of a table.")
    ] = False,
    broker: BrokerOpt = None,
    swarm: SwarmOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    config: ConfigOpt = None,
) -> int:
    """Recent tasks and their last recorded state (the retained {swarm}/tasks/state/+)."""
    wanted = {s.strip() for s in state.split(",") if s.strip()} if state else None
    if limit < 1:
        raise UsageError(f"--limit: must be at least 1, got {limit}")
    conn = _connection(config, broker, swarm, username, password)
    topics = Topics(conn.swarm)
    async with _open(conn, "tasks") as client:
        retained = await _read_retained(
            client,
            topics,
            topics.tasks_state_all,
            bound=_answer_bound(conn),
            what=f"the retained task states ({topics.tasks_state_all})",
        )
    rows: list[dict[str, Any]] = []
    for message in retained:
        env = _decode(message)
        if env is None or not isinstance(env.payload.get("task_id"), str):
            continue
        if wanted is None or env.payload.get("state") in wanted:
            rows.append(env.payload)
    rows.sort(key=lambda r: str(r.get("at", "")), reverse=True)
    rows = rows[:limit]
    if json_lines:
        for row in rows:
            _say(json.dumps(row, separators=(",", ":"), default=str))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tasks in {conn.swarm}" + (f" ({state})" if state else ""))
    for column in ("task", "type", "state", "agent", "attempt", "at", "detail"):
        table.add_column(column, no_wrap=column != "detail", overflow="fold")
    for row in rows:
        detail = row.get("error") or (
            f"{row['duration']} ms" if isinstance(row.get("duration"), int | float) else ""
        )
        table.add_row(
            str(row.get("task_id")),
            _state_type(row) or "?",
            _styled_state(str(row.get("state", "?"))),
            str(row.get("agent_id", "")),
            str(row.get("attempt", "")),
            str(row.get("at", "")),
            _scrub(str(detail)),
        )
    console = Console()
    console.print(table)
    if not rows:
        console.print("no tasks" + (f" in state {state}" if state else ""))
    return EXIT_OK


def _state_type(p: dict[str, Any]) -> str | None:
    """The task type of a progress or retained state payload: its own ``type``, or that of
    the submission kept with ``claimed`` (states from before ``type`` was added)."""
    submitted = p.get("task")
    kind = p.get("type") or (submitted.get("type") if isinstance(submitted, dict) else None)
    return str(kind) if kind else None


_STATE_STYLES = {
    "done": "green",
    "failed": "red",
    "expired": "red",
    "cancelled": "yellow",
    "released": "yellow",
    "timed_out": "yellow",
    "retrying": "yellow",
    "running": "cyan",
    "claimed": "cyan",
}


def _styled_state(state: str) -> Any:
    from rich.text import Text

    return Text(state, style=_STATE_STYLES.get(state, ""))


# ----------------------------------------------------------------------- monitor
@dataclass(slots=True)
class AgentRow:
    agent_id: str
    role: str | None = None
    status: str = "?"
    last_seen: float | None = None  # trio time of the last register/heartbeat
    running: int | None = None


@dataclass(slots=True)
class TaskRow:
    task_id: str
    type: str | None = None
    state: str = "new"
    agent: str | None = None
    attempt: int = 0
    started: float | None = None  # trio time of the winning claim
    duration_ms: float | None = None
    error: str | None = None


class SwarmView:
    """What ``sheri monitor`` knows about a swarm, from the messages it has seen."""

    FINAL = frozenset({"done", "failed", "cancelled", "expired", "skipped", "released"})

    def __init__(self, topics: Topics, *, max_tasks: int = 20) -> None:
        self.topics = topics
        self.agents: dict[str, AgentRow] = {}
        self.tasks: OrderedDict[str, TaskRow] = OrderedDict()
        self.max_tasks = max_tasks
        self.messages = 0

    def _agent(self, agent_id: str) -> AgentRow:
        row = self.agents.get(agent_id)
        if row is None:
            row = self.agents[agent_id] = AgentRow(agent_id)
        return row

    def _task(self, task_id: str) -> TaskRow:
        row = self.tasks.get(task_id)
        if row is None:
            row = self.tasks[task_id] = TaskRow(task_id)
        self.tasks.move_to_end(task_id)
        while len(self.tasks) > self.max_tasks:
            self.tasks.popitem(last=False)
        return row

    def feed(self, message: Message, now: float) -> None:
        env = _decode(message)
        if env is None:
            return
        self.messages += 1
        t, p, topic = self.topics, env.payload, message.topic
        agent_id = p.get("agent_id", env.agent_id)
        agent_id = agent_id if isinstance(agent_id, str) else None
        role = p.get("role", env.role)
        role = role if isinstance(role, str) else None
        status_of = t.status_agent_id(topic)
        if status_of is not None:
            row = self._agent(status_of)
            row.status = str(p.get("status", "?"))
            row.role = role or row.role
            return
        if topic in (t.agents_register, t.agents_heartbeat, t.agents_shutdown):
            if agent_id is None:
                return
            row = self._agent(agent_id)
            row.role = role or row.role
            if topic == t.agents_shutdown:
                row.status, row.running = "offline", 0
            else:
                row.status, row.last_seen = "online", now
                running = p.get("running_tasks")
                if isinstance(running, int):
                    row.running = running
            return
        task_id = p.get("task_id")
        if not isinstance(task_id, str):
            return
        attempt = p.get("attempt", 1)
        attempt = attempt if isinstance(attempt, int) else 1
        if topic == t.tasks_new:
            task = self._task(task_id)
            task.type = str(p.get("type")) if p.get("type") else task.type
        elif topic == t.tasks_assigned:
            task = self._task(task_id)
            if attempt > task.attempt and task.state not in self.FINAL - {"released"}:
                task.attempt, task.agent, task.state, task.started = (
                    attempt,
                    agent_id,
                    "claimed",
                    now,
                )
        elif topic == t.tasks_progress or topic.startswith(t.swarm + "/tasks/state/"):
            known = task_id in self.tasks
            if not known and not message.retain:
                return  # progress of a task we never saw start: ignore
            task = self._task(task_id)
            task.type = _state_type(p) or task.type
            if attempt >= task.attempt and task.state not in self.FINAL - {"released"}:
                task.attempt = attempt
                task.state = str(p.get("state", task.state))
                task.agent = agent_id or task.agent
                if isinstance(p.get("duration"), int | float):
                    task.duration_ms = p["duration"]
                if p.get("error"):
                    task.error = str(p["error"])
        elif topic in (t.tasks_complete, t.tasks_failed):
            task = self._task(task_id)
            if attempt < task.attempt:
                return  # fenced off
            task.attempt = attempt
            task.state = "done" if topic == t.tasks_complete else "failed"
            task.agent = agent_id or task.agent
            task.type = str(p.get("type")) if p.get("type") else task.type
            if isinstance(p.get("duration"), int | float):
                task.duration_ms = p["duration"]
            elif task.started is not None:
                task.duration_ms = round((now - task.started) * 1000)
            if p.get("error"):
                task.error = str(p["error"])
        elif topic == t.tasks_released:
            task = self._task(task_id)
            if attempt == task.attempt:
                task.state = "released"

    def render(self, now: float) -> RenderableType:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        agents = Table(title=f"agents in {self.topics.swarm}", expand=False)
        for column in ("agent", "role", "status", "heartbeat", "running"):
            agents.add_column(column, no_wrap=True)
        for row in sorted(self.agents.values(), key=lambda r: (r.status != "online", r.agent_id)):
            age = "-" if row.last_seen is None else f"{now - row.last_seen:.1f} s ago"
            style = "green" if row.status == "online" else "dim"
            agents.add_row(
                row.agent_id,
                row.role or "?",
                Text(row.status, style=style),
                age,
                "-" if row.running is None else str(row.running),
            )
        tasks = Table(title="recent tasks", expand=False)
        for column in ("task", "type", "state", "agent", "duration"):
            tasks.add_column(column, no_wrap=True)
        for task in reversed(self.tasks.values()):
            if task.duration_ms is not None:
                duration = f"{task.duration_ms / 1000:.2f} s"
            elif task.started is not None and task.state not in self.FINAL:
                duration = f"{now - task.started:.1f} s…"
            else:
                duration = "-"
            tasks.add_row(
                task.task_id,
                task.type or "?",
                _styled_state(task.state),
                task.agent or "-",
                duration,
            )
        online = sum(1 for r in self.agents.values() if r.status == "online")
        summary = Text(f"{online} online, {len(self.agents)} known; {self.messages} messages")
        return Group(agents, tasks, summary)


@app.command(name="monitor")
async def monitor_cmd(
    *,
    once: Annotated[bool, Parameter(help="Print one snapshot (retained state) and exit.")] = False,
    recent: Annotated[int, Parameter(help="How many recent tasks to show.")] = 20,
    broker: BrokerOpt = None,
    swarm: SwarmOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    config: ConfigOpt = None,
) -> int:
    """A live table of the swarm's agents and recent tasks, until Ctrl+C."""
    from rich.console import Console
    from rich.live import Live

    conn = _connection(config, broker, swarm, username, password)
    topics = Topics(conn.swarm)
    view = SwarmView(topics, max_tasks=max(recent, 1))
    console = Console()
    async with _open(conn, "monitor") as client:
        if once:
            retained = await _read_retained(
                client,
                topics,
                topics.all,
                bound=_answer_bound(conn),
                what=f"the swarm's retained messages ({topics.all})",
            )
            for message in retained:
                view.feed(message, trio.current_time())
            console.print(view.render(trio.current_time()))
            return EXIT_OK
        with (
            trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
            Live(view.render(0), console=console, auto_refresh=False) as live,
        ):
            with trio.move_on_after(_answer_bound(conn)) as answer:  # lifted once subscribed
                async with (
                    client.subscribe(topics.all, qos=1) as messages,
                    trio.open_nursery() as nursery,
                ):
                    answer.deadline = math.inf

                    async def stop_on_signal() -> None:
                        async for _ in signals:
                            nursery.cancel_scope.cancel()

                    async def refresh() -> None:
                        while True:
                            live.update(view.render(trio.current_time()), refresh=True)
                            await trio.sleep(0.25)

                    nursery.start_soon(stop_on_signal)
                    nursery.start_soon(refresh)
                    async for message in messages:
                        view.feed(message, trio.current_time())
            live.update(view.render(trio.current_time()), refresh=True)
        if answer.cancelled_caught:
            raise NoAnswer(
                _answer_bound(conn), f"subscribing to {topics.all} (waiting for the SUBACK)"
            )
    return EXIT_OK


# -------------------------------------------------------------------------- demo
# The command lives in sheri_trio/demo.py, imported only when it runs (it imports us).
app.command(
    "sheri_trio.demo:demo_cmd",
    name="demo",
    help="A private mosquitto, 9 agents and a mix of tasks, shown live (needs no API key).",
)


# -------------------------------------------------------------------------- main
def rewrite_prototype_argv(argv: Sequence[str]) -> list[str]:
    """``sheri --mqtt --role R ...`` (the prototype) -> ``sheri agent --role R ...``."""
    args = list(argv)
    end = args.index("--") if "--" in args else len(args)
    if "--mqtt" not in args[:end]:
        return args
    args = [a for i, a in enumerate(args) if not (a == "--mqtt" and i < end)]
    if not args or args[0] != "agent":
        args.insert(0, "agent")
    return args


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


AUTH_REFUSED = {0x86, 0x87, 0x8C}  # bad user name or password, not authorized, bad auth method


def explain(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for the errors users make; None for a bug."""
    leaves = [e for e in _leaves(exc) if not isinstance(e, trio.Cancelled)]
    if not leaves:
        return None
    known: list[tuple[int, str]] = []
    for leaf in leaves:
        if isinstance(leaf, KeyboardInterrupt):
            return EXIT_INTERRUPTED, "interrupted"
        if isinstance(leaf, ConfigError | UsageError):
            known.append((EXIT_USAGE, str(leaf)))
        elif isinstance(leaf, LocalProtocolError):
            known.append((EXIT_USAGE, f"{leaf}; check --broker, SHERI_BROKER or sheri.toml"))
        elif isinstance(leaf, DuplicateAgent | StartupError | NoAnswer):
            known.append((EXIT_FAILURE, str(leaf)))
        elif isinstance(leaf, ConnectError):
            if leaf.reason_code in AUTH_REFUSED:
                hint = (
                    "check the user name and password (in the URL mqtt://user:pass@host, "
                    "--username/--password, SHERI_USERNAME/SHERI_PASSWORD or sheri.toml [broker])"
                )
            elif leaf.reason_code is not None:
                hint = "the broker refused the connection"
            elif not leaf.retryable:  # TLS verification failed
                hint = "check [broker] ca_file, cert_file, key_file or insecure in sheri.toml"
            else:
                hint = "is the broker running, and is --broker (or SHERI_BROKER, sheri.toml) right?"
            known.append((EXIT_FAILURE, f"{leaf}; {hint}"))
        elif isinstance(leaf, ClientClosed | ConnectionLost):
            known.append((EXIT_FAILURE, f"lost the connection to the broker: {leaf}"))
        elif isinstance(leaf, MQTTError):
            known.append((EXIT_FAILURE, f"MQTT error: {leaf}"))
        elif isinstance(leaf, ssl.SSLError):
            known.append((EXIT_USAGE, f"TLS settings: {leaf}; check [broker] in sheri.toml"))
        else:
            return None
    return known[0]


def main(argv: Sequence[str] | None = None) -> None:
    """The ``sheri`` entry point (also ``python -m sheri_trio``)."""
    tokens = rewrite_prototype_argv(sys.argv[1:] if argv is None else argv)
    try:
        app(tokens)
    except SystemExit:
        raise
    except BaseException as exc:
        explained = explain(exc)
        if explained is None:
            raise
        code, message = explained
        print(f"sheri: error: {_scrub(message)}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None
