"""Checks of the executors' part of ``sheri.toml``, at start-up rather than at the first task.

:func:`validate_executor_config` raises ``ValueError("<source>: <key>: <reason>")``, e.g.
``sheri.toml: deploy.web.command: must be a list of strings, got 'make deploy'``. Tables
that are not the executors' (``[agent]``, ``[broker]``, or others' tables) are left alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["EXECUTOR_TABLES", "validate_executor_config"]

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Check = Callable[[Any], str | None]  # None: fine; else the reason


class _Bad(ValueError):
    pass


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _strings(*, nonempty: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            return f"must be a list of strings, got {_shown(v)}"
        if nonempty and (not v or not v[0]):
            return "must be a non-empty list of strings (the program first)"
        return None

    return check


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) and v else f"must be a non-empty string, got {_shown(v)}"


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {_shown(v)}"


def _number(low: float, high: float = math.inf, *, open_low: bool = False) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        if ok and (v < low or v > high or (open_low and v == low)):
            ok = False
        if ok:
            return None
        if high == math.inf:
            return f"must be a number {'>' if open_low else '>='} {low:g}, got {_shown(v)}"
        return f"must be a number within {low:g}..{high:g}, got {_shown(v)}"

    return check


def _integer(low: int, high: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        if (
            isinstance(v, int)
            and not isinstance(v, bool)
            and v >= low
            and (high is None or v <= high)
        ):
            return None
        if high is None:
            return f"must be an integer >= {low}, got {_shown(v)}"
        return f"must be an integer within {low}..{high}, got {_shown(v)}"

    return check


def _choice(*options: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of {', '.join(options)}, got {_shown(v)}"

    return check


def _env_table(v: Any) -> str | None:
    if not isinstance(v, dict):
        return f'must be a table of NAME = "value", got {_shown(v)}'
    for k, x in v.items():
        if not ENV_NAME_RE.fullmatch(k):
            return f"{k!r} is not an environment variable name"
        if not isinstance(x, str):
            return f"{k}: must be a string, got {_shown(x)}"
    return None


def _env_names(v: Any) -> str | None:
    if _strings()(v) is not None:
        return f"must be a list of environment variable names, got {_shown(v)}"
    bad = [x for x in v if not ENV_NAME_RE.fullmatch(x)]
    return f"{bad[0]!r} is not an environment variable name" if bad else None


def _directory(v: Any) -> str | None:
    if not isinstance(v, str) or not v:
        return f"must be a path (a string), got {_shown(v)}"
    if not Path(v).expanduser().is_dir():
        return f"no such directory: {v}"
    return None


def _target(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        return f"must be a list of URLs, got {_shown(v)}"
    for url in v:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "tcp") or not parts.hostname:
            return f"{url!r}: must be http://..., https://... or tcp://host:port"
        try:
            port = parts.port
        except ValueError:
            return f"{url!r}: bad port"
        if parts.scheme == "tcp" and port is None:
            return f"{url!r}: tcp targets need a port"
    return None


def _http_url(v: Any) -> str | None:
    if not isinstance(v, str) or urlsplit(v).scheme not in ("http", "https"):
        return f"must be an http:// or https:// URL, got {_shown(v)}"
    return None


PROCESS: dict[str, Check] = {
    "timeout": _number(0, open_low=True),
    "max_output_bytes": _integer(1024),
    "pass_env": _env_names,
    "env": _env_table,
}

TABLES: dict[str, dict[str, Any]] = {
    "workspace": {"root": _directory},
    "process": PROCESS,
    "executors": {"simulate": _boolean},
    "testing": {
        **PROCESS,
        "command": _strings(nonempty=True),
        "max_progress_lines": _integer(0),
        "suites": "suites",
        "coverage": {"source": _strings(), "omit": _strings(), "python": _string},
    },
    "security": {
        **PROCESS,
        "exclude": _strings(),
        "bandit_args": _strings(),
        "audit": {
            **PROCESS,
            "tool": _choice("pip-audit", "npm"),
            "requirements": _strings(),
            "args": _strings(),
        },
    },
    "monitoring": {
        "targets": _target,
        "timeout": _number(0, 60, open_low=True),
        "allowed_hosts": _strings(),
        "verify_tls": _boolean,
        "alerts": {
            "offline": _boolean,
            "heartbeat_max_age": _number(0),
            "failure_rate": _number(0, 1),
            "min_tasks": _integer(1),
            "unhealthy_targets": _boolean,
            "latency_ms": _number(0, open_low=True),
            "health_max_age": _number(0, open_low=True),
        },
    },
    "llm": {
        "model": _string,
        "base_url": _http_url,
        "max_tokens": _integer(1, 1_000_000),
        "max_input_bytes": _integer(1, 100_000_000),
        "max_retries": _integer(0, 20),
        "timeout": _number(0, open_low=True),
        "stream": _boolean,
        "api_key_env": lambda v: (
            None
            if isinstance(v, str) and ENV_NAME_RE.fullmatch(v)
            else f"must be an environment variable name, got {_shown(v)}"
        ),
    },
}

DEPLOY: dict[str, Check] = {
    **PROCESS,
    "command": _strings(nonempty=True),
    "rollback": _strings(nonempty=True),
    "cwd": _string,
    "url": _string,
}

DATABASE: dict[str, Check] = {
    **PROCESS,
    "path": _string,
    "url": _string,
    "migrate": _strings(nonempty=True),
    "cwd": _string,
    "backup_dir": _string,
    "keep": _integer(0),
    "version_query": _string,
    "pg_dump": _strings(nonempty=True),
    "pg_restore": _strings(nonempty=True),
}

#: the top-level tables (and keys) that belong to the executors
EXECUTOR_TABLES = (*TABLES, "deploy", "database", "state_dir")


def _table(value: Any, key: str, spec: dict[str, Any]) -> None:
    if not isinstance(value, dict):
        raise _Bad(f"{key}: must be a table ([{key}]), got {_shown(value)}")
    for sub, raw in value.items():
        check = spec.get(sub)
        where = f"{key}.{sub}"
        if check is None:
            if key == "llm" and sub in ("api_key", "key", "auth_token"):
                raise _Bad(
                    f"{where}: keep the API key out of the file: set ANTHROPIC_API_KEY in the "
                    "agent's environment"
                )
            known = ", ".join(k for k in spec) or "none"
            raise _Bad(f"{where}: unknown key (known: {known})")
        if check == "suites":
            if not isinstance(raw, dict):
                raise _Bad(f"{where}: must be a table of name = [args...], got {_shown(raw)}")
            for name, args in raw.items():
                if not NAME_RE.fullmatch(name):
                    raise _Bad(f"{where}.{name}: suite names are letters, digits, '.', '_', '-'")
                reason = _strings()(args)
                if reason:
                    raise _Bad(f"{where}.{name}: {reason}")
        elif isinstance(check, dict):
            _table(raw, where, check)
        else:
            reason = check(raw)
            if reason:
                raise _Bad(f"{where}: {reason}")


def _named(value: Any, key: str, spec: dict[str, Check]) -> None:
    if not isinstance(value, dict):
        raise _Bad(f"{key}: must be tables [{key}.<name>], got {_shown(value)}")
    for name, table in value.items():
        if not NAME_RE.fullmatch(name):
            raise _Bad(
                f"{key}.{name}: names are 1-128 of letters, digits, '.', '_', '-' "
                "(not starting with a symbol)"
            )
        if not isinstance(table, dict):
            raise _Bad(f"{key}.{name}: must be a table ([{key}.{name}]), got {_shown(table)}")
        _table(table, f"{key}.{name}", spec)


def validate_executor_config(config: dict[str, Any], *, source: str) -> None:
    """Check the executors' tables of a parsed ``sheri.toml``; raise :class:`ValueError`
    naming ``source``, the key and the reason for the first problem found."""
    try:
        for key, value in config.items():
            if key == "state_dir":
                if not isinstance(value, str) or not value:
                    raise _Bad(f"state_dir: must be a path (a string), got {_shown(value)}")
            elif key in TABLES:
                _table(value, key, TABLES[key])
            elif key == "deploy":
                _named(value, key, DEPLOY)
                for name, table in value.items():
                    if "command" not in table:
                        raise _Bad(f"deploy.{name}.command: missing (a list of strings)")
            elif key == "database":
                _named(value, key, DATABASE)
                for name, table in value.items():
                    if ("path" in table) == ("url" in table):
                        raise _Bad(f"database.{name}: needs exactly one of path or url")
                    url = table.get("url")
                    if url is not None and urlsplit(url).scheme not in (
                        "sqlite", "postgres", "postgresql",
                    ):  # fmt: skip
                        raise _Bad(
                            f"database.{name}.url: must be sqlite:///path or postgresql://..."
                        )
    except _Bad as exc:
        raise ValueError(f"{source}: {exc}") from None
