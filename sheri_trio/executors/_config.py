"""Checks of the executors' part of ``sheri.toml``, at start-up rather than at the first task.

:func:`validate_executor_config` raises ``ValueError("<source>: <key>: <reason>")``, e.g.
``sheri.toml: deploy.web.command: must be a list of strings, got 'make deploy'``. Tables
that are not the executors' (``[agent]``, ``[broker]``, or others' tables) are left alone.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from .._checks import (
    ENV_NAME_RE,
    Check,
    Invalid,
    TableOf,
    boolean,
    check_table,
    checked,
    choice,
    directory,
    integer,
    nonempty_string,
    number,
    shown,
    strings,
)

__all__ = ["EXECUTOR_TABLES", "validate_executor_config"]


def _env_table(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise Invalid(f'must be a table of NAME = "value", got {shown(value)}')
    for k, x in value.items():
        if not ENV_NAME_RE.fullmatch(k):
            raise Invalid(f"{k!r} is not an environment variable name")
        if not isinstance(x, str):
            raise Invalid(f"{k}: must be a string, got {shown(x)}")
    return value


def _env_names(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise Invalid(f"must be a list of environment variable names, got {shown(value)}")
    bad = [x for x in value if not ENV_NAME_RE.fullmatch(x)]
    if bad:
        raise Invalid(f"{bad[0]!r} is not an environment variable name")
    return value


def _env_name(value: Any) -> str:
    if not isinstance(value, str) or not ENV_NAME_RE.fullmatch(value):
        raise Invalid(f"must be an environment variable name, got {shown(value)}")
    return value


def _targets(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise Invalid(f"must be a list of URLs, got {shown(value)}")
    for url in value:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "tcp") or not parts.hostname:
            raise Invalid(f"{url!r}: must be http://..., https://... or tcp://host:port")
        try:
            port = parts.port
        except ValueError:
            raise Invalid(f"{url!r}: bad port") from None
        if parts.scheme == "tcp" and port is None:
            raise Invalid(f"{url!r}: tcp targets need a port")
    return value


def _http_url(value: Any) -> str:
    if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https"):
        raise Invalid(f"must be an http:// or https:// URL, got {shown(value)}")
    return value


PROCESS: dict[str, Check] = {
    "timeout": number(0, exclusive=True),
    "max_output_bytes": integer(1024),
    "pass_env": _env_names,
    "env": _env_table,
}

TABLES: dict[str, dict[str, Any]] = {
    "workspace": {"root": directory},
    "process": PROCESS,
    "executors": {"simulate": boolean},
    "testing": {
        **PROCESS,
        "command": strings(nonempty=True),
        "max_progress_lines": integer(0),
        "suites": TableOf(
            strings(),
            expected="a table of name = [args...]",
            bad_name="suite names are letters, digits, '.', '_', '-'",
        ),
        "coverage": {"source": strings(), "omit": strings(), "python": nonempty_string},
    },
    "security": {
        **PROCESS,
        "exclude": strings(),
        "bandit_args": strings(),
        "audit": {
            **PROCESS,
            "tool": choice("pip-audit", "npm"),
            "requirements": strings(),
            "args": strings(),
        },
    },
    "monitoring": {
        "targets": _targets,
        "timeout": number(0, 60, exclusive=True),
        "allowed_hosts": strings(),
        "verify_tls": boolean,
        "alerts": {
            "offline": boolean,
            "heartbeat_max_age": number(0),
            "failure_rate": number(0, 1),
            "min_tasks": integer(1),
            "unhealthy_targets": boolean,
            "latency_ms": number(0, exclusive=True),
            "health_max_age": number(0, exclusive=True),
        },
    },
    "llm": {
        "model": nonempty_string,
        "base_url": _http_url,
        "max_tokens": integer(1, 1_000_000),
        "max_input_bytes": integer(1, 100_000_000),
        "max_retries": integer(0, 20),
        "timeout": number(0, exclusive=True),
        "stream": boolean,
        "api_key_env": _env_name,
    },
}

DEPLOY: dict[str, Check] = {
    **PROCESS,
    "command": strings(nonempty=True),
    "rollback": strings(nonempty=True),
    "cwd": nonempty_string,
    "url": nonempty_string,
}

DATABASE: dict[str, Check] = {
    **PROCESS,
    "path": nonempty_string,
    "url": nonempty_string,
    "migrate": strings(nonempty=True),
    "cwd": nonempty_string,
    "backup_dir": nonempty_string,
    "keep": integer(0),
    "version_query": nonempty_string,
    "pg_dump": strings(nonempty=True),
    "pg_restore": strings(nonempty=True),
}

#: the top-level tables (and keys) that belong to the executors
EXECUTOR_TABLES = (*TABLES, "deploy", "database", "state_dir")
#: [llm] keys refused with a hint: the API key belongs in the environment
SECRET_HINTS = dict.fromkeys(
    ("api_key", "key", "auth_token"),
    "keep the API key out of the file: set ANTHROPIC_API_KEY in the agent's environment",
)


def _named(spec: dict[str, Check]) -> TableOf:
    """``[key.<name>]`` tables, each checked by ``spec``."""
    return TableOf(
        spec,
        expected="tables [{key}.<name>]",
        bad_name="names are 1-128 of letters, digits, '.', '_', '-' (not starting with a symbol)",
    )


def _check(key: str, value: Any) -> None:
    if key == "state_dir":
        if not isinstance(value, str) or not value:
            raise Invalid(f"state_dir: must be a path (a string), got {shown(value)}")
    elif key in TABLES:
        check_table(value, key, TABLES[key], hints=SECRET_HINTS if key == "llm" else {})
    elif key == "deploy":
        for name, table in checked(key, _named(DEPLOY), value).items():
            if "command" not in table:
                raise Invalid(f"deploy.{name}.command: missing (a list of strings)")
    elif key == "database":
        for name, table in checked(key, _named(DATABASE), value).items():
            if ("path" in table) == ("url" in table):
                raise Invalid(f"database.{name}: needs exactly one of path or url")
            url = table.get("url")
            if url is not None and urlsplit(url).scheme not in (
                "sqlite", "postgres", "postgresql",
            ):  # fmt: skip
                raise Invalid(f"database.{name}.url: must be sqlite:///path or postgresql://...")


def validate_executor_config(config: dict[str, Any], *, source: str) -> None:
    """Check the executors' tables of a parsed ``sheri.toml``; raise :class:`ValueError`
    naming ``source``, the key and the reason for the first problem found."""
    for key, value in config.items():
        try:
            _check(key, value)
        except Invalid as exc:
            raise ValueError(f"{source}: {exc}") from None
