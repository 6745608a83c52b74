"""Where executors may look: the workspace root, and paths from payloads inside it.

A task payload comes from the network, so a path in it is untrusted: it is resolved
(symlinks followed) and must stay inside the configured workspace root. ``..``, a
symlink that leads out, an absolute path elsewhere: all are refused with a
:class:`~sheri_trio.executors.TaskPayloadError`.

Paths in the configuration (``sheri.toml``) are trusted; relative ones are relative to
the workspace root.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._base import TaskConfigError, TaskPayloadError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._base import TaskContext

__all__ = [
    "agent_state_dir",
    "config_path",
    "open_db",
    "payload_path",
    "relative_names",
    "section",
    "state_dir",
    "workspace_root",
]

MAX_PATH_CHARS = 4096


def section(ctx: TaskContext, *keys: str) -> dict[str, Any]:
    """The config table at ``keys`` (e.g. ``section(ctx, "deploy", "web")``), or {}."""
    table: Any = ctx.config
    for key in keys:
        table = table.get(key) if isinstance(table, dict) else None
        if table is None:
            return {}
    return table if isinstance(table, dict) else {}


def workspace_root(ctx: TaskContext) -> Path:
    """``[workspace] root``, or the agent's working directory; resolved, must exist."""
    raw = section(ctx, "workspace").get("root")
    root = Path(raw).expanduser() if isinstance(raw, str) and raw else Path.cwd()
    try:
        resolved = root.resolve(strict=True)
    except OSError:
        raise TaskConfigError(f"workspace.root: no such directory: {root}") from None
    if not resolved.is_dir():
        raise TaskConfigError(f"workspace.root: not a directory: {root}")
    return resolved


def config_path(ctx: TaskContext, raw: str, *, root: Path | None = None) -> Path:
    """A path from the configuration: ``~`` expanded, relative to the workspace root."""
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = (root or workspace_root(ctx)) / path
    return path


def payload_path(
    root: Path, raw: Any, *, key: str = "path", must_exist: bool = True, kind: str | None = None
) -> Path:
    """Resolve ``raw`` (from a payload) inside ``root``, or raise :class:`TaskPayloadError`.

    ``kind``: "file" or "dir" to require one. Symlinks are followed before the check,
    so a link inside the workspace that points outside it is refused.
    """
    if not isinstance(raw, str) or not raw:
        raise TaskPayloadError(f"payload '{key}' must be a non-empty string (a path)")
    if len(raw) > MAX_PATH_CHARS or "\x00" in raw:
        raise TaskPayloadError(f"payload '{key}' is not a usable path")
    candidate = Path(raw)
    if not candidate.is_absolute():
        candidate = root / candidate
    # strict=False: a missing path still resolves (its existing prefix's symlinks too)
    resolved = Path(os.path.realpath(candidate))
    if not resolved.is_relative_to(root):
        how = "is outside" if Path(raw).is_absolute() else "escapes"
        if ".." in Path(raw).parts:
            reason = "through '..'"
        elif os.path.islink(candidate) or resolved != Path(os.path.abspath(candidate)):
            reason = "through a symlink"
        else:
            reason = ""
        raise TaskPayloadError(
            f"payload '{key}' {raw!r} {how} the workspace {root}"
            + (f" ({reason})" if reason else "")
        )
    if must_exist and not resolved.exists():
        raise TaskPayloadError(f"payload '{key}' {raw!r}: no such file or directory in {root}")
    if kind == "file" and resolved.exists() and not resolved.is_file():
        raise TaskPayloadError(f"payload '{key}' {raw!r}: not a file")
    if kind == "dir" and resolved.exists() and not resolved.is_dir():
        raise TaskPayloadError(f"payload '{key}' {raw!r}: not a directory")
    return resolved


def relative_names(names: Iterable[str], root: Path) -> list[str]:
    """Each file name resolved and shown relative to ``root``, or as given when it is
    outside ``root``. Blocking (it resolves paths): run it in a thread."""
    shown = []
    for name in names:
        try:
            shown.append(str(Path(name).resolve().relative_to(root)))
        except ValueError:
            shown.append(name)
    return shown


def state_dir(ctx: TaskContext) -> Path:
    """The agent's state directory (created): ``state_dir`` in the config, else
    ``~/.local/state/sheri/<agent_id>``."""
    return agent_state_dir(ctx.config, ctx.agent_id)


def agent_state_dir(config: dict[str, Any], agent_id: str) -> Path:
    """:func:`state_dir` from an agent's executor configuration and id."""
    raw = config.get("state_dir")
    if isinstance(raw, str) and raw:
        path = Path(raw).expanduser()
    else:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        path = Path(base) / "sheri" / agent_id
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise TaskConfigError(f"state_dir: cannot create {path}: {exc.strerror or exc}") from None
    return path


def open_db(path: Path, schema: Iterable[str] = ()) -> Any:
    """A connection to one of the agent's own SQLite files (history, alert state), with
    the ``CREATE TABLE IF NOT EXISTS`` statements of ``schema`` run."""
    conn = sqlite3.connect(path, timeout=10, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.row_factory = sqlite3.Row
    for statement in schema:
        conn.execute(statement)
    return conn
