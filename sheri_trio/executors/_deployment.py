"""``deployment.deploy`` and ``deployment.rollback``: named services of the local config.

``[deploy.<service>]`` gives ``command = [...]``, optional ``rollback = [...]`` (default:
the deploy command again, with the older version), ``cwd``, ``url``, ``timeout``, ``env``,
``pass_env``. The command gets ``SHERI_SERVICE``, ``SHERI_VERSION``, ``SHERI_TASK_ID``
(and for a rollback ``SHERI_ROLLBACK=1``, ``SHERI_PREVIOUS_VERSION``) in its environment;
``{service}``, ``{version}`` and ``{task_id}`` in its arguments or ``url`` are replaced.

Every deploy and rollback is recorded in ``<state_dir>/deployments.sqlite3``. A rollback
without a version returns to the version deployed before the current one.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from ._base import TaskConfigError, TaskContext, TaskPayloadError
from ._payload import VERSION_RE, check_keys, check_name
from ._process import run_for_task
from ._workspace import config_path, open_db, section, state_dir, workspace_root

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["deploy", "history", "rollback"]

_locks: dict[tuple[str, str], trio.Lock] = {}


def _version(value: Any, key: str) -> str:
    if not isinstance(value, str) or not VERSION_RE.fullmatch(value):
        raise TaskPayloadError(
            f"payload '{key}' must be a version: 1-128 of letters, digits, '.', '_', '+', '-' "
            f"(not starting with a symbol), got {value!r}"[:200]
        )
    return value


def _service(ctx: TaskContext, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    services = section(ctx, "deploy")
    names = ", ".join(sorted(k for k, v in services.items() if isinstance(v, dict))) or "none"
    if "service" not in payload:
        raise TaskPayloadError(f"payload needs 'service' (configured services: {names})")
    service = check_name(payload["service"], "service")
    table = services.get(service)
    if not isinstance(table, dict):
        raise TaskConfigError(
            f"service {service!r} is not configured: sheri.toml has no [deploy.{service}] "
            f"table (deploy.{service}.command is required; configured services: {names})"
        )
    if not table.get("command"):
        raise TaskConfigError(f"deploy.{service}.command: missing (a list of strings)")
    return service, table


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


# ------------------------------------------------------------------ history
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS deployments (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " service TEXT NOT NULL, version TEXT NOT NULL, action TEXT NOT NULL,"
    " status TEXT NOT NULL, task_id TEXT, started_at REAL, finished_at REAL,"
    " exit_code INTEGER, rolled_back INTEGER NOT NULL DEFAULT 0, detail TEXT)",
)


def _db(path: Path) -> Any:
    return open_db(path / "deployments.sqlite3", SCHEMA)


def _current(conn: Any, service: str) -> Any:
    """The live deploy record: the latest successful deploy not rolled back."""
    return conn.execute(
        "SELECT * FROM deployments WHERE service = ? AND action = 'deploy'"
        " AND status = 'deployed' AND rolled_back = 0 ORDER BY id DESC LIMIT 1",
        (service,),
    ).fetchone()


def _begin(path: Path, service: str, version: str, action: str, task_id: str) -> tuple[int, Any]:
    conn = _db(path)
    try:
        current = _current(conn, service)
        cur = conn.execute(
            "INSERT INTO deployments (service, version, action, status, task_id, started_at)"
            " VALUES (?, ?, ?, 'running', ?, ?)",
            (service, version, action, task_id, time.time()),
        )
        return int(cur.lastrowid), dict(current) if current else None
    finally:
        conn.close()


def _finish(path: Path, row_id: int, status: str, exit_code: int | None, detail: str) -> None:
    conn = _db(path)
    try:
        conn.execute(
            "UPDATE deployments SET status = ?, finished_at = ?, exit_code = ?, detail = ?"
            " WHERE id = ?",
            (status, time.time(), exit_code, detail[:2000], row_id),
        )
    finally:
        conn.close()


def _already_done(path: Path, service: str, task_id: str, action: str) -> Any:
    conn = _db(path)
    try:
        row = conn.execute(
            "SELECT * FROM deployments WHERE service = ? AND task_id = ? AND action = ?"
            " AND status IN ('deployed', 'rolled_back') ORDER BY id DESC LIMIT 1",
            (service, task_id, action),
        ).fetchone()
        return dict(row) if row else None
    finally:
        conn.close()


def _rollback_target(path: Path, service: str, version: str | None) -> tuple[Any, Any]:
    """(current record, target record or None) for a rollback."""
    conn = _db(path)
    try:
        current = _current(conn, service)
        if version is None:
            if current is None:
                return None, None
            target = conn.execute(
                "SELECT * FROM deployments WHERE service = ? AND action = 'deploy'"
                " AND status = 'deployed' AND rolled_back = 0 AND id < ? AND version != ?"
                " ORDER BY id DESC LIMIT 1",
                (service, current["id"], current["version"]),
            ).fetchone()
        else:
            target = conn.execute(
                "SELECT * FROM deployments WHERE service = ? AND action = 'deploy'"
                " AND status = 'deployed' AND version = ? ORDER BY id DESC LIMIT 1",
                (service, version),
            ).fetchone()
        return (dict(current) if current else None), (dict(target) if target else None)
    finally:
        conn.close()


def _mark_rolled_back(path: Path, service: str, target_id: int | None) -> None:
    """Every live deploy newer than the target is rolled back (all, without a target)."""
    conn = _db(path)
    try:
        conn.execute(
            "UPDATE deployments SET rolled_back = 1 WHERE service = ? AND action = 'deploy'"
            " AND status = 'deployed' AND rolled_back = 0 AND id > ?",
            (service, target_id or 0),
        )
        if target_id is not None:  # the target is live again, even if rolled back before
            conn.execute("UPDATE deployments SET rolled_back = 0 WHERE id = ?", (target_id,))
    finally:
        conn.close()


def history(path: Path, service: str, limit: int = 20) -> list[dict[str, Any]]:
    """The service's latest deploys and rollbacks, newest first."""
    conn = _db(path)
    try:
        rows = conn.execute(
            "SELECT id, service, version, action, status, task_id, started_at, finished_at,"
            " exit_code, rolled_back FROM deployments WHERE service = ? ORDER BY id DESC LIMIT ?",
            (service, limit),
        ).fetchall()
        return [dict(r) for r in rows]
    finally:
        conn.close()


# --------------------------------------------------------------- executors
async def _run(
    ctx: TaskContext,
    path: Path,
    row_id: int,
    status: str,
    service: str,
    table: dict[str, Any],
    command: list[Any],
    version: str,
    extra_env: dict[str, str],
    origin: str,
) -> Any:
    """Run ``command`` for ``service`` and record the outcome in the history's row
    ``row_id``: ``status`` when it exits with 0, else (an error, a cancellation
    included) ``failed``."""
    values = {"service": service, "version": version, "task_id": ctx.task_id}
    argv = [_fill(str(a), values) for a in command]
    env = {
        "SHERI_SERVICE": service,
        "SHERI_VERSION": version,
        "SHERI_TASK_ID": ctx.task_id,
        **extra_env,
    }

    async def on_line(line: str) -> None:
        await ctx.progress(line, kind="output")

    try:
        cwd = config_path(ctx, str(table["cwd"])) if table.get("cwd") else workspace_root(ctx)
        if not cwd.is_dir():
            raise TaskConfigError(f"deploy.{service}.cwd: no such directory: {cwd}")
        result = await run_for_task(
            ctx, argv, table=table, cwd=cwd, extra_env=env, on_line=on_line, origin=origin
        )
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_finish, path, row_id, "failed", None, str(exc))
        raise
    if result.exit_code != 0:
        await trio.to_thread.run_sync(
            _finish, path, row_id, "failed", result.exit_code, result.tail_text(2000)
        )
        raise RuntimeError(f"{origin} exited with {result.exit_code}: {result.tail_text(1500)}")
    await trio.to_thread.run_sync(_finish, path, row_id, status, 0, "")
    return result


async def deploy(ctx: TaskContext) -> dict[str, Any]:
    """deployment.deploy {service, version} -> {status: "deployed", url?, version, ...}."""
    payload = ctx.payload_dict()
    check_keys(ctx, payload, {"service", "version"})
    service, table = _service(ctx, payload)
    if "version" not in payload:
        raise TaskPayloadError("payload needs 'version' (the version to deploy)")
    version = _version(payload["version"], "version")
    path = state_dir(ctx)
    lock = _locks.setdefault((str(path), service), trio.Lock())
    async with lock:
        done = await trio.to_thread.run_sync(_already_done, path, service, ctx.task_id, "deploy")
        if done is not None and done["version"] == version:
            # a repeated attempt of a deploy that already went through (see docs/protocol.md)
            return _deploy_result(table, service, version, None, repeated=True)
        row_id, current = await trio.to_thread.run_sync(
            _begin, path, service, version, "deploy", ctx.task_id
        )
        previous = current["version"] if current else None
        await ctx.progress(
            f"deploying {service} {version} (live: {previous or 'none'})", kind="start"
        )
        result = await _run(
            ctx, path, row_id, "deployed", service, table, table["command"], version,
            {"SHERI_PREVIOUS_VERSION": previous or ""}, f"deploy.{service}.command",
        )  # fmt: skip
    out = _deploy_result(table, service, version, previous)
    out.update(
        duration=round(result.duration * 1000),
        exit_code=0,
        output_tail=result.tail_text(2000),
        log=result.log_path,
    )
    return out


def _deploy_result(
    table: dict[str, Any],
    service: str,
    version: str,
    previous: str | None,
    *,
    repeated: bool = False,
) -> dict[str, Any]:
    url = table.get("url")
    out: dict[str, Any] = {
        "status": "deployed",
        "service": service,
        "version": version,
        "url": _fill(str(url), {"service": service, "version": version}) if url else None,
        "previous_version": previous,
    }
    if repeated:
        out["repeated"] = True
    return out


async def rollback(ctx: TaskContext) -> dict[str, Any]:
    """deployment.rollback {service, version? | previous_version?} ->
    {status: "rolled_back", version, ...}. Without a version: the one before the live one."""
    payload = ctx.payload_dict()
    check_keys(ctx, payload, {"service", "version", "previous_version"})
    service, table = _service(ctx, payload)
    raw = payload.get("version", payload.get("previous_version"))
    wanted = _version(raw, "version") if raw is not None else None
    path = state_dir(ctx)
    lock = _locks.setdefault((str(path), service), trio.Lock())
    async with lock:
        current, target = await trio.to_thread.run_sync(_rollback_target, path, service, wanted)
        if wanted is None and target is None:
            live = f"live version {current['version']}" if current else "no live version"
            raise TaskConfigError(
                f"cannot roll {service} back: the deploy history in {path} has {live} and "
                "no earlier one; give 'version'"
            )
        version = wanted or target["version"]
        from_version = current["version"] if current else None
        row_id, _ = await trio.to_thread.run_sync(
            _begin, path, service, version, "rollback", ctx.task_id
        )
        await ctx.progress(f"rolling {service} back from {from_version} to {version}", kind="start")
        command = table.get("rollback") or table["command"]
        origin = f"deploy.{service}.{'rollback' if table.get('rollback') else 'command'}"
        result = await _run(
            ctx, path, row_id, "rolled_back", service, table, command, version,
            {"SHERI_ROLLBACK": "1", "SHERI_PREVIOUS_VERSION": from_version or ""}, origin,
        )  # fmt: skip
        await trio.to_thread.run_sync(
            _mark_rolled_back, path, service, target["id"] if target else None
        )
        if target is None:  # a version this agent never deployed: it is live now
            await trio.to_thread.run_sync(_record_live, path, service, version, ctx.task_id)
    return {
        "status": "rolled_back",
        "service": service,
        "version": version,
        "from_version": from_version,
        "in_history": target is not None,
        "duration": round(result.duration * 1000),
        "output_tail": result.tail_text(2000),
        "log": result.log_path,
    }


def _record_live(path: Path, service: str, version: str, task_id: str) -> None:
    conn = _db(path)
    try:
        now = time.time()
        conn.execute(
            "INSERT INTO deployments (service, version, action, status, task_id, started_at,"
            " finished_at, exit_code, detail) VALUES (?, ?, 'deploy', 'deployed', ?, ?, ?, 0,"
            " 'live after a rollback')",
            (service, version, task_id, now, now),
        )
    finally:
        conn.close()
