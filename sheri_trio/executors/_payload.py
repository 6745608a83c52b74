"""Shared checks of task payloads, which come from the network and are untrusted.

A payload never carries a command (every command comes from the agent's ``sheri.toml``):
keys that look like one are refused, and so are keys the executor does not know. Names
(services, databases, suites) and versions cannot start with a symbol, so they never
read as an option of the commands they are passed to.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .._checks import NAME_RE, shown
from ._base import TaskPayloadError

if TYPE_CHECKING:
    from collections.abc import Set

    from ._base import TaskContext

__all__ = ["COMMAND_KEYS", "VERSION_RE", "check_keys", "check_name", "refuse_commands"]

#: payload keys that smell of a command: refused everywhere (commands come from config)
COMMAND_KEYS = frozenset(
    {
        "command",
        "commands",
        "cmd",
        "args",
        "argv",
        "exec",
        "executable",
        "program",
        "run",
        "script",
        "shell",
        "runner",
        "env",
        "environment_variables",
    }
)

#: a version to deploy, roll back or migrate to
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def refuse_commands(ctx: TaskContext, payload: dict[str, Any]) -> None:
    """A payload never carries commands: refuse keys that look like one."""
    found = sorted(k for k in payload if isinstance(k, str) and k.lower() in COMMAND_KEYS)
    if found:
        raise TaskPayloadError(
            f"{ctx.type} payloads cannot carry commands or environment ({', '.join(found)}): "
            "every command comes from the agent's sheri.toml"
        )


def check_keys(ctx: TaskContext, payload: dict[str, Any], known: Set[str]) -> None:
    """Refuse commands (:func:`refuse_commands`), then any key not in ``known``."""
    refuse_commands(ctx, payload)
    unknown = sorted(str(k) for k in payload if k not in known)
    if unknown:
        raise TaskPayloadError(
            f"{ctx.type}: unknown payload key(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(known)) or 'none'})"
        )


def check_name(value: Any, what: str) -> str:
    """A service, database or suite name: letters, digits, '.', '_', '-' (no options)."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise TaskPayloadError(
            f"payload '{what}' must be 1-128 of letters, digits, '.', '_', '-' "
            f"(not starting with one of '._-'), got {shown(value)}"
        )
    return value
