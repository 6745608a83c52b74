"""The dashboard's trio shell: one nursery owns the follower of ``{swarm}/#`` (the
project's MQTT client), the page's pump (at most :data:`PAGE_HZ` batches a second),
the history writer (a batch every :data:`HISTORY_EVERY` seconds) and hypercorn's trio
worker serving the Starlette app."""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

import orjson
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from .._exceptions import leaves
from ..mqtt import open_client
from ..swarm import Topics
from ._app import Board, Hub, create_app, sse
from ._errors import DashboardError
from ._history import History
from ._metrics import Metrics
from ._model import SwarmModel

if TYPE_CHECKING:
    from pathlib import Path

    from ..config import Connection
    from ..mqtt import Subscription

__all__ = [
    "HISTORY_EVERY",
    "PAGE_HZ",
    "TOKEN_ENV",
    "DashboardOptions",
    "Running",
    "run_dashboard",
]

log = logging.getLogger("sheri_trio.dashboard")

#: page updates per second, at most
PAGE_HZ: Final = 4
#: seconds between history batches
HISTORY_EVERY: Final = 1.0
#: seconds between keep-alive comments on idle event streams
KEEPALIVE: Final = 15.0
TOKEN_ENV: Final = "SHERI_DASHBOARD_TOKEN"


@dataclass(frozen=True, slots=True)
class DashboardOptions:
    conn: Connection
    db: Path
    retention: float
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None  # None: SHERI_DASHBOARD_TOKEN, else a new one
    bound: float = 10.0  # each wait for the broker's answer


@dataclass(frozen=True, slots=True)
class Running:
    """What :func:`run_dashboard` reports once it serves."""

    url: str  # http://host:port/
    token: str
    board: Board
    history: History

    @property
    def login_url(self) -> str:
        return f"{self.url}?token={quote(self.token, safe='')}"


def new_token() -> str:
    return os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)


async def _follow(messages: Subscription, model: SwarmModel) -> None:
    async for message in messages:
        model.feed(message.topic, message.payload, message.retain, time.time())


async def _pump(board: Board) -> None:
    """At most PAGE_HZ batches a second to the open pages: what changed, the latest
    rates, whether the broker is reachable."""
    model, hub = board.model, board.hub
    connected = board.connected()
    quiet_since = trio.current_time()
    while True:
        await trio.sleep(1 / PAGE_HZ)
        now = time.time()
        model.check(now)
        changes = model.take_changes()
        link = board.connected()
        if link != connected:
            connected = link
            log.warning(
                "dashboard: %s the broker", "reconnected to" if link else "lost the connection to"
            )
            hub.broadcast(sse("broker", orjson.dumps({"connected": link})))
        if changes is not None:
            changes["rates"] = model.rate_series(now, 3)
            changes["pending"] = model.pending_by_role()
            changes["now"] = now
            hub.broadcast(sse("update", orjson.dumps(changes, default=str)))
            quiet_since = trio.current_time()
        elif trio.current_time() - quiet_since > KEEPALIVE:
            hub.broadcast(b": keep-alive\n\n")
            quiet_since = trio.current_time()


async def _write_history(model: SwarmModel, history: History) -> None:
    while True:
        await trio.sleep(HISTORY_EVERY)
        await history.write(*model.take_dirty(), time.time())


async def run_dashboard(
    options: DashboardOptions,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the dashboard until ``shutdown`` is set (or the caller cancels)."""
    conn = options.conn
    topics = Topics(conn.swarm)
    model = SwarmModel(topics)
    history = History(options.db, options.retention)
    await history.open(time.time())
    try:
        model.restore(*await history.load(model.max_tasks))
        log.info("dashboard: %d tasks from the history %s", len(model.tasks), options.db)
        async with open_client(
            conn.broker,
            client_id=f"sheri-dashboard-{secrets.token_hex(4)}",
            clean_start=True,
            **conn.client_options,
        ) as client:
            token = options.token or new_token()
            board = Board(model, client, token, Metrics(model, lambda: client.connected))
            board.bound = options.bound
            await _serve(
                options, board, history, trio.Event() if shutdown is None else shutdown, task_status
            )
    finally:
        with trio.CancelScope(shield=True):
            try:
                await history.write(*model.take_dirty(), time.time())
            finally:
                await history.aclose()


async def _serve(
    options: DashboardOptions,
    board: Board,
    history: History,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[Running],
) -> None:
    config = HypercornConfig()
    config.bind = [f"{options.host}:{options.port}"]
    config.graceful_timeout = 1.0
    config.accesslog = None
    config.errorlog = logging.getLogger("sheri_trio.dashboard.http")
    stopped = trio.Event()
    app = create_app(board)
    hub: Hub = board.hub
    with trio.move_on_after(options.bound) as answer:  # lifted once subscribed
        async with (
            board.client.subscribe(board.topics.all, qos=1) as messages,
            trio.open_nursery() as loops,
        ):
            answer.deadline = math.inf
            loops.start_soon(_follow, messages, board.model)
            loops.start_soon(_write_history, board.model, history)
            loops.start_soon(_pump, board)
            async with trio.open_nursery() as web:
                binds = await _start_server(web, app, config, stopped, options)
                url = binds[0].rstrip("/") + "/"
                task_status.started(Running(url, board.token, board, history))
                await shutdown.wait()
                hub.close()  # the event streams end, so the server stops at once
                stopped.set()
            loops.cancel_scope.cancel()
    if answer.cancelled_caught:
        raise DashboardError(
            f"no answer from the broker within {options.bound:g} s while subscribing to "
            f"{board.topics.all}"
        )


def _probe_port(host: str, port: int) -> None:
    """Bind (host, port) once and let go, as hypercorn will (SO_REUSEADDR): a port in use
    is said here, before hypercorn (which leaks its socket when the bind fails) tries."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise DashboardError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


async def _start_server(
    nursery: trio.Nursery,
    app: Any,
    config: HypercornConfig,
    stopped: trio.Event,
    options: DashboardOptions,
) -> list[str]:
    """hypercorn's trio worker in ``nursery``; its bound URLs (a port in use is ours to
    explain)."""
    _probe_port(options.host, options.port)
    try:
        binds: list[str] = await nursery.start(
            lambda task_status: serve(
                app, config, shutdown_trigger=stopped.wait, task_status=task_status
            )
        )
    except (OSError, BaseExceptionGroup) as exc:
        errors = [e for e in leaves(exc) if isinstance(e, OSError)]
        if not errors:
            raise
        raise DashboardError(
            f"cannot listen on {options.host}:{options.port}: {errors[0].strerror or errors[0]}"
        ) from None
    return binds
