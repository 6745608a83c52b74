"""``sheri dashboard``: the live web page of a swarm (:mod:`sheri_trio.dashboard`)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import trio
from cyclopts import Parameter

from ..config import DASHBOARD_KEYS, load_config
from ..dashboard import DashboardOptions, default_db_path, run_dashboard
from ._broker import BROKER_DEFAULTS, BrokerArgs
from ._errors import UsageError
from ._output import EXIT_OK, LogLevel, remember_secrets, say, setup_logging

#: the defaults of what neither a flag nor ``[dashboard]`` sets
DEFAULTS: dict[str, Any] = {"host": "127.0.0.1", "port": 8080, "retention": "7d"}


def _pick(key: str, flag: Any, table: dict[str, Any]) -> Any:
    """flag > ``[dashboard]`` > default, checked as the file's value is."""
    if flag is None:
        return table.get(key, DASHBOARD_KEYS[key](DEFAULTS[key]) if key in DEFAULTS else None)
    try:
        return DASHBOARD_KEYS[key](flag)
    except ValueError as exc:
        raise UsageError(f"--{key}: {exc}") from None


def _days(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _options(
    where: BrokerArgs, host: str | None, port: int | None, db: Path | None, retention: str | None
) -> DashboardOptions:
    """Flags > ``[dashboard]`` > defaults; the connection as every command has it."""
    file_config = load_config(where.config)
    conn = where.connection(file_config)
    remember_secrets(conn)
    table = file_config.dashboard
    path = db if db is not None else table.get("db")
    return DashboardOptions(
        conn=conn,
        host=_pick("host", host, table),
        port=_pick("port", port, table),
        db=Path(path).expanduser() if path is not None else default_db_path(conn.swarm),
        retention=_pick("retention", retention, table),
    )


async def dashboard_cmd(
    *,
    host: Annotated[str | None, Parameter(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, Parameter(help="Port to listen on (default 8080; 0: any).")] = None,
    db: Annotated[
        Path | None,
        Parameter(
            help="History file (SQLite; default ~/.local/share/sheri/dashboard-SWARM.sqlite3)."
        ),
    ] = None,
    retention: Annotated[
        str | None, Parameter(help="How long the history keeps a task: 12h, 7d, ... (default 7d).")
    ] = None,
    log_level: Annotated[LogLevel, Parameter(help="Log level of the lines on stderr.")] = "warning",
    where: BrokerArgs = BROKER_DEFAULTS,
) -> int:
    """A live web page of the swarm: agents, tasks, rates, errors; submit, cancel, retry.

    Prints the URL with its token (SHERI_DASHBOARD_TOKEN, else a new one): open it to
    act; without the token the page is read-only. Also serves /metrics (Prometheus).
    Runs until Ctrl+C.
    """
    options = _options(where, host, port, db, retention)
    setup_logging(log_level, "dashboard")
    where.warn_visible_password()
    conn = options.conn
    shutdown = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                lambda task_status: run_dashboard(
                    options, shutdown=shutdown, task_status=task_status
                )
            )
            say(f"sheri dashboard of swarm {conn.swarm} at {conn.display()}")
            say(f"  open     {running.login_url}")
            say(f"  metrics  {running.url}metrics")
            say(f"  history  {options.db} (kept {_days(options.retention)})")
            async for _ in signals:
                shutdown.set()
                break
    return EXIT_OK
