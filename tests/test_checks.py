"""sheri_trio._checks: the value checks that config.py and the executors' config share."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import pytest

from sheri_trio._checks import (
    NAME_RE,
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
    string,
    strings,
)

if TYPE_CHECKING:
    from pathlib import Path


@pytest.mark.parametrize(
    ("check", "value", "expected"),
    [
        (integer(1), 3, 3),
        (integer(0, 10), 10, 10),
        (integer(1, parse_text=True), " 7 ", 7),
        (number(0), 2, 2.0),
        (number(0, 1), 1, 1.0),
        (number(0, exclusive=True), 0.5, 0.5),
        (string, "", ""),
        (nonempty_string, "x", "x"),
        (boolean, False, False),
        (choice("a", "b"), "b", "b"),
        (strings(), [], []),
        (strings(nonempty=True), ["make", "deploy"], ["make", "deploy"]),
    ],
)
def test_a_check_returns_the_value(check: Check, value: Any, expected: Any) -> None:
    result = check(value)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("check", "value", "reason"),
    [
        (integer(1), 0, "must be an integer >= 1, got 0"),
        (integer(1), True, "must be an integer >= 1, got True"),
        (integer(1), "3", "must be an integer >= 1, got '3'"),  # text only when asked
        (integer(1, parse_text=True), "x", "must be an integer >= 1, got 'x'"),
        (integer(0, 20), 21, "must be an integer within 0..20, got 21"),
        (number(0), -1, "must be a number >= 0, got -1"),
        (number(0), math.nan, "must be a number >= 0, got nan"),
        (number(0, exclusive=True), 0, "must be a number > 0, got 0"),
        (number(0, 1), 2, "must be a number within 0..1, got 2"),
        (number(0, 60, exclusive=True), 0, "must be a number within 0..60, got 0"),
        (string, 1, "must be a string, got 1"),
        (nonempty_string, "", "must be a non-empty string, got ''"),
        (boolean, 1, "must be true or false, got 1"),
        (choice("a", "b"), "c", "must be one of a, b, got 'c'"),
        (choice("a", "b"), ["a"], "must be one of a, b, got ['a']"),
        (strings(), "make", "must be a list of strings, got 'make'"),
        (strings(nonempty=True), [], "must be a non-empty list of strings (the program first)"),
        (strings(nonempty=True), [""], "must be a non-empty list of strings (the program first)"),
    ],
)
def test_a_check_raises_the_reason(check: Check, value: Any, reason: str) -> None:
    with pytest.raises(Invalid, match="^" + re.escape(reason) + "$"):
        check(value)


def test_shown_cuts_long_values() -> None:
    assert shown("x") == "'x'"
    assert shown("x" * 100) == repr("x" * 100)[:57] + "..."
    assert len(shown("x" * 100)) == 60


def test_directory(tmp_path: Path) -> None:
    assert directory(str(tmp_path)) == str(tmp_path)
    with pytest.raises(Invalid, match=r"^no such directory: "):
        directory(str(tmp_path / "missing"))
    with pytest.raises(Invalid, match=r"^must be a path \(a string\), got 3$"):
        directory(3)


SPEC = {
    "n": integer(1),
    "nested": {"flag": boolean},
    "suites": TableOf(strings(), expected="a table of name = [args...]", bad_name="bad name"),
    "named": TableOf({"x": integer(0)}, expected="tables [{key}.<name>]", bad_name="bad"),
}


def test_check_table_returns_the_checked_table() -> None:
    table = {"n": 2, "nested": {"flag": True}, "suites": {"unit": ["-q"]}, "named": {"a": {}}}
    assert check_table(table, "t", SPEC) == table


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ([], "t: must be a table ([t]), got []"),
        ({"m": 1}, "t.m: unknown key (known: n, nested, suites, named)"),
        ({"n": 0}, "t.n: must be an integer >= 1, got 0"),
        ({"nested": 1}, "t.nested: must be a table ([t.nested]), got 1"),
        ({"nested": {"flag": "yes"}}, "t.nested.flag: must be true or false, got 'yes'"),
        ({"nested": {"other": 1}}, "t.nested.other: unknown key (known: flag)"),
        ({"suites": ["x"]}, "t.suites: must be a table of name = [args...], got ['x']"),
        ({"suites": {"-x": []}}, "t.suites.-x: bad name"),
        ({"suites": {"unit": "x"}}, "t.suites.unit: must be a list of strings, got 'x'"),
        ({"named": 1}, "t.named: must be tables [t.named.<name>], got 1"),
        ({"named": {"a": 1}}, "t.named.a: must be a table ([t.named.a]), got 1"),
        ({"named": {"a": {"x": -1}}}, "t.named.a.x: must be an integer >= 0, got -1"),
    ],
)
def test_check_table_names_the_key_path(table: Any, message: str) -> None:
    with pytest.raises(Invalid, match="^" + re.escape(message) + "$"):
        check_table(table, "t", SPEC)


def test_check_table_hints_and_empty_specs() -> None:
    with pytest.raises(Invalid, match=r"^t\.api_key: not here$"):
        check_table({"api_key": "x"}, "t", SPEC, hints={"api_key": "not here"})
    with pytest.raises(Invalid, match=r"^t\.x: unknown key \(known: none\)$"):
        check_table({"x": 1}, "t", {})


def test_checked_puts_the_key_in_front() -> None:
    assert checked("a.b", integer(0), 1) == 1
    with pytest.raises(Invalid, match=r"^a\.b: must be an integer >= 0, got -1$"):
        checked("a.b", integer(0), -1)


@pytest.mark.parametrize(
    ("name", "ok"),
    [("web", True), ("a.b_c-1", True), ("9", True), ("-x", False), (".x", False),
     ("a/b", False), ("", False), ("x" * 128, True), ("x" * 129, False)],
)  # fmt: skip
def test_name_re(name: str, ok: bool) -> None:
    assert bool(NAME_RE.fullmatch(name)) is ok
