"""Value checks of ``sheri.toml``, shared by ``config.py`` and the executors' config.

A check takes a value and returns it (converted where that is its job) or raises
:class:`Invalid` with the reason, ``must be ..., got ...``. :func:`check_table` runs the
checks of a table and puts the key path in front: ``agent.max_tasks: must be an integer
>= 1, got 'x'``; the caller adds the file's name. Nothing here does I/O except
:func:`directory`, which looks the directory up.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ENV_NAME_RE",
    "NAME_RE",
    "Check",
    "Invalid",
    "Spec",
    "TableOf",
    "boolean",
    "check_table",
    "checked",
    "choice",
    "directory",
    "integer",
    "nonempty_string",
    "number",
    "shown",
    "string",
    "strings",
]

#: a service, database or suite name: no leading symbol, so it never reads as an option
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Check = Callable[[Any], Any]
#: a table's checks: key -> check, the checks of a nested table, or a :class:`TableOf`
Spec = Mapping[str, "Check | Spec | TableOf"]


@dataclass(frozen=True, slots=True)
class TableOf:
    """A table whose keys are names (:data:`NAME_RE`) of the user's choosing, e.g.
    ``[deploy.<service>]``; each value is checked by ``each`` (a check, or a spec)."""

    each: Check | Spec
    #: what the table must be, e.g. ``"tables [deploy.<name>]"`` (``{key}``: its key)
    expected: str
    #: the reason a name is refused
    bad_name: str


class Invalid(ValueError):
    """A value check failed; the message is the reason, with the key path in front once
    :func:`checked` or :func:`check_table` knows it."""


def shown(value: Any) -> str:
    """``repr(value)``, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def checked(key: str, check: Check | Spec | TableOf, value: Any) -> Any:
    """``value`` checked as the entry ``key``: by a check (``key`` goes in front of its
    reason), a spec (:func:`check_table`) or a :class:`TableOf`."""
    if isinstance(check, TableOf):
        if not isinstance(value, dict):
            raise Invalid(f"{key}: must be {check.expected.format(key=key)}, got {shown(value)}")
        for name, item in value.items():
            if not NAME_RE.fullmatch(name):
                raise Invalid(f"{key}.{name}: {check.bad_name}")
            checked(f"{key}.{name}", check.each, item)
        return value
    if isinstance(check, Mapping):
        return check_table(value, key, check)
    try:
        return check(value)
    except Invalid as exc:
        raise Invalid(f"{key}: {exc}") from None


def check_table(
    value: Any, key: str, spec: Spec, *, hints: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The table at ``key`` with every entry checked (nested tables by nested specs).

    An unknown key is refused with its reason in ``hints``, or naming the known ones.
    """
    if not isinstance(value, dict):
        raise Invalid(f"{key}: must be a table ([{key}]), got {shown(value)}")
    out: dict[str, Any] = {}
    for sub, raw in value.items():
        check = spec.get(sub)
        where = f"{key}.{sub}"
        if check is None:
            if hints and sub in hints:
                raise Invalid(f"{where}: {hints[sub]}")
            raise Invalid(f"{where}: unknown key (known: {', '.join(spec) or 'none'})")
        out[sub] = checked(where, check, raw)
    return out


def integer(low: int, high: int | None = None, *, parse_text: bool = False) -> Check:
    """An integer within ``low..high``; ``parse_text``: a string of digits too (the
    environment's values are strings)."""
    expected = f"an integer >= {low}" if high is None else f"an integer within {low}..{high}"

    def check(value: Any) -> int:
        if parse_text and isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise Invalid(f"must be {expected}, got {shown(value)}") from None
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < low
            or (high is not None and value > high)
        ):
            raise Invalid(f"must be {expected}, got {shown(value)}")
        return value

    return check


def number(low: float, high: float = math.inf, *, exclusive: bool = False) -> Check:
    """A finite number within ``low..high`` (above ``low`` when ``exclusive``), as a float."""
    if high == math.inf:
        expected = f"a number {'>' if exclusive else '>='} {low:g}"
    else:
        expected = f"a number within {low:g}..{high:g}"

    def check(value: Any) -> float:
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < low
            or value > high
            or (exclusive and value == low)
        ):
            raise Invalid(f"must be {expected}, got {shown(value)}")
        return float(value)

    return check


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a string, got {shown(value)}")
    return value


def nonempty_string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"must be a non-empty string, got {shown(value)}")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, got {shown(value)}")
    return value


def choice(*options: str) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise Invalid(f"must be one of {', '.join(options)}, got {shown(value)}")
        return value

    return check


def strings(*, nonempty: bool = False) -> Check:
    """A list of strings; ``nonempty``: a command, whose first string is the program."""

    def check(value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise Invalid(f"must be a list of strings, got {shown(value)}")
        if nonempty and (not value or not value[0]):
            raise Invalid("must be a non-empty list of strings (the program first)")
        return value

    return check


def directory(value: Any) -> str:
    """The path of an existing directory (``~`` expanded when it is looked up)."""
    if not isinstance(value, str) or not value:
        raise Invalid(f"must be a path (a string), got {shown(value)}")
    if not Path(value).expanduser().is_dir():
        raise Invalid(f"no such directory: {value}")
    return value
