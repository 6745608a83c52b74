"""``sheri agent`` and ``sheri swarm``: agents in this process, until a signal."""

from __future__ import annotations

import functools
import logging
import os
import pickle
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

import trio
from cyclopts import Parameter

from ..config import Connection, FileConfig, build_agent_config, load_config
from ..executors import WORKSPACE_TYPES, uses_implicit_workspace
from ..swarm import AGENT_ID_RE, ROLES, roles_for, run_agent
from ._broker import BROKER_DEFAULTS, STORE_DEFAULTS, BrokerArgs, StoreArgs
from ._errors import AgentProcessFailed, UsageError
from ._output import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    LogLevel,
    agent_label,
    exit_now,
    remember_password,
    remember_secrets,
    setup_logging,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from ..swarm import AgentConfig

__all__ = ["DEFAULT_SWARM_ROLES"]

log = logging.getLogger("sheri_trio.cli")

LogLevelOpt = Annotated[LogLevel, Parameter(help="Log level of the lines on stderr.")]
DispatchOpt = Annotated[
    str | None,
    Parameter(
        help="How tasks reach agents: dispatcher (the default: one elected dispatcher "
        "assigns them; every agent is a candidate; docs/dispatch.md) or broadcast (every "
        "agent sees every task: the fallback for brokers without retained messages on "
        "wildcard subscriptions or persistent sessions) (env SHERI_DISPATCH). Every agent "
        "of a swarm must use the same."
    ),
]

#: ``sheri swarm`` without --roles: one agent per role, and a second general one.
DEFAULT_SWARM_ROLES: Final = (*ROLES, "general")


async def _watch_signals(
    signals: AsyncIterator[int],
    shutdown: trio.Event,
    children: Sequence[trio.Process] = (),
) -> None:
    """First SIGINT/SIGTERM: graceful shutdown. Second: exit at once.

    At once means without clean-up: a cancelled agent would still spend seconds in its
    shielded clean-up (releasing tasks, flushing the client), which is what a second
    Ctrl+C is meant to skip. The broker sees the connection drop and publishes the
    agent's will (a retained offline status), so other agents take its tasks over.
    ``children`` (the other agent processes) get the second signal too, and do the same.
    """
    async for signum in signals:
        name = signal.Signals(signum).name
        if not shutdown.is_set():
            log.info("%s: shutting down gracefully (Ctrl+C again to exit at once)", name)
            shutdown.set()
        else:
            log.warning("%s again: exiting at once", name)
            for child in children:
                child.send_signal(signal.SIGTERM)
            exit_now(EXIT_INTERRUPTED)


async def _agent_process(
    index: int,
    agents: Sequence[tuple[AgentConfig, str | None]],
    log_level: str,
    shutdown: trio.Event,
    children: list[trio.Process],
) -> None:
    """One share of the swarm in a child process (:mod:`._worker`), until it ends. A
    graceful shutdown reaches it as SIGTERM; if it ends before one was asked for, that
    is raised as :class:`AgentProcessFailed` (the others then leave, as when an agent
    fails).

    Its stdin is a pipe that we hold open for as long as we live: the share of the swarm
    comes first (pickled: the configurations carry credentials, never on the command
    line), then nothing. When we die, even by SIGKILL, the kernel closes our end and the
    child reads end-of-file: it leaves gracefully (no share of the swarm outlives us).
    Not PR_SET_PDEATHSIG: its "parent" is the thread that forked the child (trio forks
    in a worker thread, which exits after 10 s idle: the child got SIGTERM 10 s after
    start), and it fires again at each reparenting while a dying parent's threads exit
    (a second SIGTERM: the child then exited at once instead of gracefully)."""
    names = ", ".join(c.agent_id for c, _ in agents)
    command = [sys.executable, "-m", "sheri_trio.cli._worker", log_level]
    read_end, write_end = os.pipe()
    lifeline = trio.lowlevel.FdStream(write_end)
    async with lifeline, trio.open_nursery() as nursery:
        try:
            proc: trio.Process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    command,
                    stdin=read_end,
                    check=False,
                    start_new_session=True,  # a Ctrl+C at the terminal reaches us only
                )
            )
        finally:
            os.close(read_end)  # the child has its copy
        children.append(proc)
        log.info("agent process %d (pid %d): %s", index, proc.pid, names)
        try:
            share = pickle.dumps(list(agents))
            await lifeline.send_all(len(share).to_bytes(8, "big") + share)
        except trio.BrokenResourceError:
            pass  # it ended already: its exit code says why

        async def forward() -> None:
            await shutdown.wait()
            proc.send_signal(signal.SIGTERM)

        nursery.start_soon(forward)
        await proc.wait()
        nursery.cancel_scope.cancel()
    children.remove(proc)
    if not shutdown.is_set():
        raise AgentProcessFailed(
            f"agent process {index} (pid {proc.pid}: {names}) ended with exit code "
            f"{proc.returncode} before a shutdown was asked for"
        )
    if proc.returncode:
        log.warning("agent process %d ended with exit code %d", index, proc.returncode)


def warn_implicit_workspace(agents: Sequence[tuple[AgentConfig, str | None]]) -> None:
    """Say once when agents will work on the current directory for want of a root."""
    roles = sorted(
        {
            config.role
            for config, _ in agents
            if uses_implicit_workspace(config.executor_config)
            and any(config.role in roles_for(t) for t in WORKSPACE_TYPES)
        }
    )
    if roles:
        log.warning(
            "no [workspace] root configured: %s tasks of role(s) %s run on the current "
            "directory %s (set [workspace] root in sheri.toml to choose)",
            "/".join(t for t in WORKSPACE_TYPES if any(r in roles_for(t) for r in roles)),
            ", ".join(roles),
            Path.cwd(),
        )


async def run_agents(
    agents: Sequence[tuple[AgentConfig, str | None]],
    *,
    processes: Sequence[Sequence[tuple[AgentConfig, str | None]]] = (),
    log_level: str = "info",
    lifeline: Callable[[], Awaitable[object]] | None = None,
) -> int:
    """Run agents in one nursery until a signal asks them to leave; with ``processes``,
    also those shares of the swarm, each in a child process of its own. ``lifeline``
    (an agent process of ``sheri swarm --processes``): returns when the parent is gone,
    and the agents then leave gracefully.

    When one fails (at start-up, or later), or a child process ends on its own, the
    others leave gracefully, as on a signal; then its error is raised (several: a group).
    """
    warn_implicit_workspace([*agents, *(a for share in processes for a in share)])
    shutdown = trio.Event()
    errors: list[Exception] = []
    children: list[trio.Process] = []

    async def one(config: AgentConfig, label: str | None) -> None:
        if label is not None:
            agent_label.set(label)
        try:
            await run_agent(config, shutdown=shutdown)
        except Exception as exc:  # not Cancelled: the nursery would cancel the others
            errors.append(exc)
            if len(agents) > 1:  # say which one (the command's error line tells one)
                log.error("stopped: %s", exc)
            shutdown.set()

    async def share(index: int, share_agents: Sequence[tuple[AgentConfig, str | None]]) -> None:
        try:
            await _agent_process(index, share_agents, log_level, shutdown, children)
        except Exception as exc:
            errors.append(exc)
            log.error("%s", exc)
            shutdown.set()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as outer:
            outer.start_soon(_watch_signals, signals, shutdown, children)
            if lifeline is not None:
                outer.start_soon(_orphaned, lifeline, shutdown)
            async with trio.open_nursery() as nursery:
                for index, share_agents in enumerate(processes, start=1):
                    nursery.start_soon(share, index, share_agents)
                for config, label in agents:
                    nursery.start_soon(one, config, label)
            outer.cancel_scope.cancel()  # every agent has left: stop watching signals
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ExceptionGroup("agents failed", errors)
    return EXIT_OK


async def _orphaned(lifeline: Callable[[], Awaitable[object]], shutdown: trio.Event) -> None:
    await lifeline()
    if not shutdown.is_set():
        log.warning("the sheri swarm that started this agent process is gone: leaving")
        shutdown.set()


def _agent_config(
    file_config: FileConfig, where: BrokerArgs, store: StoreArgs, **overrides: Any
) -> AgentConfig:
    config = build_agent_config(
        file_config,
        broker=where.broker,
        swarm=where.swarm,
        username=where.username,
        password=where.password,
        **store.overrides(),
        **overrides,
    )
    remember_secrets(Connection(config.broker, config.swarm, config.client_options))
    remember_password(config.store.password)
    return config


async def agent_cmd(
    *,
    role: Annotated[
        str | None, Parameter(help=f"One of: {', '.join(ROLES)} (env SHERI_ROLE).")
    ] = None,
    agent_id: Annotated[
        str | None,
        Parameter(help="Unique id in the swarm; default sheri-ml-<8 hex> (env SHERI_AGENT_ID)."),
    ] = None,
    max_tasks: Annotated[
        int | None, Parameter(help="Tasks run at once (env SHERI_MAX_TASKS).")
    ] = None,
    dispatch: DispatchOpt = None,
    where: BrokerArgs = BROKER_DEFAULTS,
    store: StoreArgs = STORE_DEFAULTS,
    log_level: LogLevelOpt = "info",
) -> int:
    """Run one agent until SIGINT/SIGTERM (a second Ctrl+C exits at once).

    ``sheri --mqtt --role R ...`` (the prototype's spelling) is the same command.
    """
    file_config = load_config(where.config)
    cfg = _agent_config(
        file_config,
        where,
        store,
        role=role,
        agent_id=agent_id,
        max_tasks=max_tasks,
        dispatch=dispatch,
    )
    setup_logging(log_level, cfg.agent_id)
    where.warn_visible_password()
    log.info(
        "starting agent %s: role=%s swarm=%s broker=%s max_tasks=%d dispatch=%s claim_store=%s%s",
        cfg.agent_id,
        cfg.role,
        cfg.swarm,
        Connection(cfg.broker, cfg.swarm, {}).display(),
        cfg.max_tasks,
        cfg.dispatch,
        cfg.store.url,
        f" config={file_config.name}" if file_config.path else "",
    )
    return await run_agents([(cfg, None)])


def parse_roles(text: str | None) -> list[str]:
    """``--roles a,b``: known roles, at least one (None: :data:`DEFAULT_SWARM_ROLES`)."""
    if text is None:
        return list(DEFAULT_SWARM_ROLES)
    roles = [r.strip() for r in text.split(",") if r.strip()]
    if not roles:
        raise UsageError("--roles: give at least one role, e.g. --roles general,testing")
    for r in roles:
        if r not in ROLES:
            raise UsageError(f"--roles: unknown role {r!r}: choose from {', '.join(ROLES)}")
    return roles


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
    max_tasks: Annotated[int | None, Parameter(help="Tasks run at once, per agent.")] = None,
    dispatch: DispatchOpt = None,
    prefix: Annotated[
        str | None,
        Parameter(help="Agent id prefix: ids are <prefix>-<role>-<n> (default: the swarm)."),
    ] = None,
    processes: Annotated[
        int,
        Parameter(
            help="Processes to spread the agents over (the agents in turn; default 1: all "
            "in this one). More use more cores: each process runs its agents on one."
        ),
    ] = 1,
    where: BrokerArgs = BROKER_DEFAULTS,
    store: StoreArgs = STORE_DEFAULTS,
    log_level: LogLevelOpt = "info",
) -> int:
    """Run several agents (default 9: one per role, plus a second general), in this
    process or spread over ``--processes``.

    Output lines are prefixed with the agent, e.g. ``[testing-1]``. Stops like ``agent``;
    if one of the processes ends on its own, the others stop too (exit code 1).
    """
    role_list = parse_roles(roles)
    count = len(role_list) if agents is None else agents
    if not 1 <= count <= 1000:
        raise UsageError(f"--agents: must be within 1..1000, got {count}")
    if not 1 <= processes <= count:
        raise UsageError(f"--processes: must be within 1..{count} (the agents), got {processes}")
    file_config = load_config(where.config)
    conn = where.connection(file_config)
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
            where,
            store,
            role=role,
            agent_id=f"{id_prefix}-{label}",
            max_tasks=max_tasks,
            dispatch=dispatch,
        )
        configs.append((cfg, label))
    setup_logging(log_level, "swarm", label_first=True)
    where.warn_visible_password()
    log.info(
        "starting %d agents in swarm %s at %s%s (claim store %s): %s",
        count,
        conn.swarm,
        conn.display(),
        f" in {processes} processes" if processes > 1 else "",
        configs[0][0].store.url,
        ", ".join(c.agent_id for c, _ in configs),
    )
    shares = [configs[i::processes] for i in range(processes)]
    return await run_agents(shares[0], processes=shares[1:], log_level=log_level)
