"""The dashboard's history: what it saw, in SQLite, so a restart keeps it.

One connection, used from one worker thread at a time (:func:`trio.to_thread.run_sync`
under a :class:`trio.Lock`), in ``locking_mode=EXCLUSIVE``: a second dashboard on the
same file is told it is locked instead of both writing. Writes come in batches (one
transaction per batch). Rows older than the retention are deleted at open and then
every :data:`PRUNE_EVERY` seconds.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson
import trio

from ._errors import HistoryError
from ._model import AgentRow, Alert, TaskRow

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["History", "default_db_path"]

PRUNE_EVERY: Final = 3600.0

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS tasks
    (task_id TEXT PRIMARY KEY, updated REAL NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_updated ON tasks (updated);
CREATE TABLE IF NOT EXISTS agents
    (agent_id TEXT PRIMARY KEY, updated REAL NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY, at REAL NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS alerts_at ON alerts (at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def default_db_path(swarm: str) -> Path:
    """``$XDG_DATA_HOME/sheri/dashboard-{swarm}.sqlite3`` (``~/.local/share`` by default)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "sheri" / f"dashboard-{swarm.replace('/', '_')}.sqlite3"


def _explain(path: Path, exc: sqlite3.Error) -> HistoryError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return HistoryError(
            f"history file {path} is locked by another process (another sheri dashboard?): "
            "stop it, or pass another --db"
        )
    if isinstance(exc, sqlite3.DatabaseError) and (
        "not a database" in text or "malformed" in text or "corrupt" in text
    ):
        return HistoryError(
            f"history file {path} is not a usable SQLite database ({text}): move it away "
            "(a new one is made) or pass another --db"
        )
    return HistoryError(f"history file {path}: {text}")


class History:
    """The SQLite file of one dashboard."""

    def __init__(self, path: Path, retention: float) -> None:
        self.path = path
        self.retention = retention
        self._db: sqlite3.Connection | None = None
        self._lock = trio.Lock()
        self.writes = 0  # batches written
        self.last_prune = 0.0

    # ------------------------------------------------------------ threads
    def _open_sync(self, now: float) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HistoryError(
                f"history file {self.path}: cannot create its folder: {exc}"
            ) from None
        try:
            db = sqlite3.connect(self.path, timeout=0.5, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _explain(self.path, exc) from None
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            with db:  # takes the exclusive lock now, not at the first batch
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('opened', ?)", (str(now),)
                )
            self._prune_sync(db, now)
        except sqlite3.Error as exc:
            db.close()
            raise _explain(self.path, exc) from None
        self._db = db

    def _prune_sync(self, db: sqlite3.Connection, now: float) -> None:
        cutoff = now - self.retention
        with db:
            db.execute("DELETE FROM tasks WHERE updated < ?", (cutoff,))
            db.execute("DELETE FROM agents WHERE updated < ?", (cutoff,))
            db.execute("DELETE FROM alerts WHERE at < ?", (cutoff,))
        self.last_prune = now

    def _load_sync(self, limit: int) -> tuple[list[TaskRow], list[AgentRow], list[Alert]]:
        db = self._require()
        tasks: list[TaskRow] = []
        rows = db.execute(
            "SELECT data FROM (SELECT data, updated FROM tasks ORDER BY updated DESC LIMIT ?)"
            " ORDER BY updated",
            (limit,),
        )
        for (data,) in rows:
            try:
                tasks.append(TaskRow.from_json(orjson.loads(data)))
            except (orjson.JSONDecodeError, TypeError):
                continue
        agents: list[AgentRow] = []
        for (data,) in db.execute("SELECT data FROM agents"):
            try:
                fields = orjson.loads(data)
                agents.append(
                    AgentRow(
                        **{k: v for k, v in fields.items() if k in AgentRow.__dataclass_fields__}
                    )
                )
            except (orjson.JSONDecodeError, TypeError):
                continue
        alerts: list[Alert] = []
        for (data,) in db.execute(
            "SELECT data FROM (SELECT data, at FROM alerts ORDER BY at DESC LIMIT 500) ORDER BY at"
        ):
            try:
                alerts.append(Alert(**orjson.loads(data)))
            except (orjson.JSONDecodeError, TypeError):
                continue
        return tasks, agents, alerts

    def _write_sync(
        self,
        tasks: list[tuple[str, float, bytes]],
        agents: list[tuple[str, float, bytes]],
        alerts: list[tuple[float, bytes]],
        now: float,
    ) -> None:
        db = self._require()
        with db:
            db.executemany(
                "INSERT OR REPLACE INTO tasks (task_id, updated, data) VALUES (?, ?, ?)", tasks
            )
            db.executemany(
                "INSERT OR REPLACE INTO agents (agent_id, updated, data) VALUES (?, ?, ?)", agents
            )
            db.executemany("INSERT INTO alerts (at, data) VALUES (?, ?)", alerts)
        if now - self.last_prune >= PRUNE_EVERY:
            self._prune_sync(db, now)

    def _require(self) -> sqlite3.Connection:
        if self._db is None:
            raise HistoryError(f"history file {self.path} is not open")
        return self._db

    # --------------------------------------------------------------- trio
    async def open(self, now: float) -> None:
        async with self._lock:
            await trio.to_thread.run_sync(self._open_sync, now)

    async def load(self, limit: int = 10_000) -> tuple[list[TaskRow], list[AgentRow], list[Alert]]:
        async with self._lock:
            try:
                return await trio.to_thread.run_sync(self._load_sync, limit)
            except sqlite3.Error as exc:
                raise _explain(self.path, exc) from None

    async def write(
        self,
        tasks: Iterable[TaskRow],
        agents: Iterable[AgentRow],
        alerts: Iterable[Alert],
        now: float,
    ) -> None:
        """One batch, one transaction (rows encoded here, written in the thread)."""
        t = [(r.task_id, r.updated, orjson.dumps(r.to_json(), default=str)) for r in tasks]
        a = [(r.agent_id, now, orjson.dumps(r.to_json(), default=str)) for r in agents]
        e = [(x.at, orjson.dumps(x.to_json())) for x in alerts]
        if not (t or a or e):
            return
        async with self._lock:
            try:
                await trio.to_thread.run_sync(self._write_sync, t, a, e, now)
            except sqlite3.Error as exc:
                raise _explain(self.path, exc) from None
        self.writes += 1

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            async with self._lock:
                db, self._db = self._db, None
                if db is not None:
                    await trio.to_thread.run_sync(db.close)

    def statistics(self) -> dict[str, Any]:
        return {"path": str(self.path), "writes": self.writes}
