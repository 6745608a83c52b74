"""``database.migrate`` and ``database.backup``: named databases of the local config.

``[database.<name>]`` gives ``path`` (an SQLite file) or ``url`` (``sqlite:///...`` or
``postgresql://...``), ``migrate = [...]`` (the migration command), ``backup_dir``
(default ``<state_dir>/backups``), ``keep`` (backups kept per database, default 10),
``version_query`` (SQLite: the SQL that reads the schema version after a migration;
default ``PRAGMA user_version``), ``pg_dump`` and ``pg_restore`` (defaults ``["pg_dump"]``,
``["pg_restore"]``: the dump is read back with ``pg_restore --list``).
"""

from __future__ import annotations

import re
import sqlite3
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import trio

from ._base import TaskConfigError, TaskContext, TaskPayloadError
from ._payload import VERSION_RE, check_keys, check_name
from ._process import ToolMissing, run_for_task
from ._workspace import config_path, section, state_dir, workspace_root

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["backup", "migrate"]

OUTPUT_VERSION_RE = re.compile(r"^\s*(?:schema\s+)?version\s*[:=]\s*(\S+)\s*$", re.I | re.M)
DEFAULT_KEEP = 10


class _Database:
    def __init__(self, name: str, table: dict[str, Any], ctx: TaskContext) -> None:
        self.name = name
        self.table = table
        self.url: str | None = None
        self.path: Path | None = None
        if table.get("path"):
            self.kind = "sqlite"
            self.path = config_path(ctx, str(table["path"]))
        elif table.get("url"):
            url = str(table["url"])
            scheme = urlsplit(url).scheme.lower()
            if scheme == "sqlite":
                self.kind = "sqlite"
                if ":///" not in url:
                    raise TaskConfigError(
                        f"database.{name}.url: write sqlite:///relative/path or "
                        "sqlite:////absolute/path"
                    )
                # SQLAlchemy's spelling: three slashes, then the path (absolute: a fourth)
                self.path = config_path(ctx, unquote(url.split(":///", 1)[1]))
            elif scheme in ("postgres", "postgresql"):
                self.kind = "postgresql"
                self.url = url
            else:
                raise TaskConfigError(
                    f"database.{name}.url: scheme {scheme!r} is not supported "
                    "(sqlite:///path or postgresql://...)"
                )
        else:
            raise TaskConfigError(f"database.{name}: needs path = '...' (SQLite) or url = '...'")

    def env(self) -> dict[str, str]:
        env = {"SHERI_DATABASE": self.name}
        if self.path is not None:
            env["SHERI_DATABASE_PATH"] = str(self.path)
            env["SHERI_DATABASE_URL"] = f"sqlite:///{self.path}"
        elif self.url is not None:
            env["SHERI_DATABASE_URL"] = self.url
        return env

    def secrets(self) -> list[str]:
        if self.url:
            password = urlsplit(self.url).password
            if password:
                return [password, unquote(password)]
        return []


def _database(ctx: TaskContext, payload: dict[str, Any]) -> _Database:
    tables = {k: v for k, v in section(ctx, "database").items() if isinstance(v, dict)}
    names = ", ".join(sorted(tables)) or "none"
    if "database" in payload:
        name = check_name(payload["database"], "database")
        if name not in tables:
            raise TaskConfigError(
                f"database {name!r} is not configured: sheri.toml has no [database.{name}] "
                f"table (configured databases: {names})"
            )
    elif len(tables) == 1:
        name = next(iter(tables))
    elif not tables:
        raise TaskConfigError(
            "no database is configured: add [database.<name>] with path = '...' (SQLite) or "
            "url = '...' to sheri.toml"
        )
    else:
        raise TaskPayloadError(f"payload needs 'database' (configured databases: {names})")
    return _Database(name, tables[name], ctx)


# ------------------------------------------------------------------ migrate
def _sqlite_version(path: Path, query: str | None) -> str | None:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute(query or "PRAGMA user_version").fetchone()
        return None if row is None else str(row[0])
    except sqlite3.Error:
        return None
    finally:
        conn.close()


async def migrate(ctx: TaskContext) -> dict[str, Any]:
    """database.migrate {database?, version?} -> {status: "migrated", version, ...}.

    Runs ``[database.<name>] migrate``; the environment names the database
    (``SHERI_DATABASE``, ``SHERI_DATABASE_URL``, ``SHERI_DATABASE_PATH``) and the
    target (``SHERI_TARGET_VERSION``, empty for the latest).
    """
    payload = ctx.payload_dict()
    check_keys(ctx, payload, {"database", "version"})
    db = _database(ctx, payload)
    target = payload.get("version")
    if target is not None:
        if (
            not isinstance(target, str | int)
            or isinstance(target, bool)
            or not VERSION_RE.fullmatch(str(target))
        ):
            raise TaskPayloadError(
                "payload 'version' must be a version: letters, digits, '.', '_', '+', '-'"
            )
        target = str(target)
    command = db.table.get("migrate")
    if not command:
        raise TaskConfigError(
            f"database.{db.name}.migrate: missing (the migration command, a list of strings)"
        )
    before = (
        await trio.to_thread.run_sync(_sqlite_version, db.path, db.table.get("version_query"))
        if db.path is not None
        else None
    )
    await ctx.progress(f"migrating {db.name} to {target or 'the latest version'}", kind="start")
    cwd = config_path(ctx, str(db.table["cwd"])) if db.table.get("cwd") else workspace_root(ctx)

    async def on_line(line: str) -> None:
        await ctx.progress(line, kind="output")

    result = await run_for_task(
        ctx,
        [str(a) for a in command],
        table=db.table,
        cwd=cwd,
        extra_env={**db.env(), "SHERI_TARGET_VERSION": target or "", "SHERI_TASK_ID": ctx.task_id},
        on_line=on_line,
        origin=f"database.{db.name}.migrate",
        secrets=db.secrets(),
    )
    if result.exit_code != 0:
        raise RuntimeError(
            f"database.{db.name}.migrate exited with {result.exit_code}: {result.tail_text(1500)}"
        )
    version: str | None = None
    if db.path is not None:
        version = await trio.to_thread.run_sync(
            _sqlite_version, db.path, db.table.get("version_query")
        )
    if version is None:
        found = OUTPUT_VERSION_RE.findall(result.output)
        version = found[-1] if found else target
    return {
        "status": "migrated",
        "version": version or "latest",
        "previous_version": before,
        "database": db.name,
        "duration": round(result.duration * 1000),
        "output_tail": result.tail_text(2000),
        "log": result.log_path,
    }


# ------------------------------------------------------------------- backup
def _sqlite_backup(source: Path, dest: Path) -> dict[str, Any]:
    """SQLite's online backup API into ``dest``; the copy is checked before it counts."""
    if not source.is_file():
        raise TaskConfigError(f"SQLite database not found: {source}")
    partial = dest.with_name(dest.name + ".partial")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst, pages=256)
            check = dst.execute("PRAGMA integrity_check").fetchone()[0]
            tables = dst.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
            ).fetchone()[0]
        finally:
            dst.close()
    except sqlite3.DatabaseError as exc:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"SQLite backup of {source} failed: {exc}") from None
    finally:
        src.close()
    if check != "ok":
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"the backup copy of {source} failed its integrity check: {check}")
    partial.replace(dest)
    return {"integrity": check, "tables": tables}


def _prune(folder: Path, prefix: str, keep: int) -> list[str]:
    backups = sorted(p for p in folder.glob(f"{prefix}-*") if not p.name.endswith(".partial"))
    removed = backups[:-keep] if keep > 0 else []
    for old in removed:
        old.unlink(missing_ok=True)
    return [p.name for p in removed]


async def backup(ctx: TaskContext) -> dict[str, Any]:
    """database.backup {database?} -> {status: "backed_up", size, location, ...}."""
    payload = ctx.payload_dict()
    check_keys(ctx, payload, {"database"})
    db = _database(ctx, payload)
    raw_dir = db.table.get("backup_dir")
    folder = config_path(ctx, str(raw_dir)) if raw_dir else state_dir(ctx) / "backups"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    started = time.monotonic()
    await ctx.progress(f"backing up {db.name} ({db.kind}) into {folder}", kind="start")
    if db.kind == "sqlite":
        assert db.path is not None
        dest = folder / f"{db.name}-{stamp}.sqlite3"
        detail = await trio.to_thread.run_sync(_sqlite_backup, db.path, dest)
    else:
        dest = folder / f"{db.name}-{stamp}.dump"
        detail = await _pg_dump(ctx, db, dest)
    removed = await trio.to_thread.run_sync(
        _prune, folder, db.name, int(db.table.get("keep", DEFAULT_KEEP))
    )
    size = dest.stat().st_size
    return {
        "status": "backed_up",
        "size": size,
        "size_human": _human(size),
        "location": str(dest),
        "database": db.name,
        "kind": db.kind,
        "duration": round((time.monotonic() - started) * 1000),
        "pruned": removed,
        **detail,
    }


async def _pg_dump(ctx: TaskContext, db: _Database, dest: Path) -> dict[str, Any]:
    assert db.url is not None
    parts = urlsplit(db.url)
    env: dict[str, str] = {}
    netloc = parts.netloc
    if parts.password is not None:
        env["PGPASSWORD"] = unquote(parts.password)
        netloc = netloc.replace(f":{parts.password}@", "@", 1)
    url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    prefix = [str(a) for a in db.table.get("pg_dump", ["pg_dump"])]
    partial = dest.with_name(dest.name + ".partial")
    result = await run_for_task(
        ctx,
        [*prefix, "--format=custom", f"--file={partial}", f"--dbname={url}"],
        table=db.table,
        cwd=dest.parent,
        extra_env=env,
        origin=f"database.{db.name} pg_dump",
        secrets=db.secrets(),
    )
    if result.exit_code != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"pg_dump exited with {result.exit_code}: {result.tail_text(1500)}")
    detail = await _pg_check(ctx, db, partial)
    partial.replace(dest)
    return detail


async def _pg_check(ctx: TaskContext, db: _Database, dump: Path) -> dict[str, Any]:
    """Read the dump's table of contents back (``pg_restore --list``): a dump pg_restore
    cannot read is a failed backup. Returns the tables whose data it holds."""
    prefix = [str(a) for a in db.table.get("pg_restore", ["pg_restore"])]
    try:
        result = await run_for_task(
            ctx,
            [*prefix, "--list", str(dump)],
            table=db.table,
            cwd=dump.parent,
            origin=f"database.{db.name} pg_restore --list",
            secrets=db.secrets(),
        )
    except ToolMissing:  # no pg_restore here: the dump stays unchecked, and says so
        return {"integrity": "not checked (pg_restore not found)"}
    if result.exit_code != 0:
        await trio.Path(dump).unlink(missing_ok=True)
        raise RuntimeError(
            f"pg_restore cannot read the dump ({result.exit_code}): {result.tail_text(1500)}"
        )
    tables = []
    for line in result.output.splitlines():
        # "215; 0 16390 TABLE DATA public notes postgres"
        head, _, rest = line.partition(" TABLE DATA ")
        if rest and not line.startswith(";") and head:
            fields = rest.split()
            if len(fields) >= 2:
                tables.append(f"{fields[0]}.{fields[1]}")
    return {"integrity": "ok", "tables": sorted(tables)}


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{size}B"
