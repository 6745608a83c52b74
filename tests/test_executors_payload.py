"""Shared checks of task payloads: no commands, no unknown keys, safe names."""

from __future__ import annotations

import pytest
from executor_helpers import make_ctx

from sheri_trio.executors import TaskPayloadError
from sheri_trio.executors._payload import (
    COMMAND_KEYS,
    VERSION_RE,
    check_keys,
    check_name,
    refuse_commands,
)


@pytest.mark.parametrize("key", sorted(COMMAND_KEYS))
def test_command_keys_are_refused_in_any_case(key: str) -> None:
    ctx, _ = make_ctx("testing.run", {})
    message = rf"^testing\.run payloads cannot carry commands or environment \({key.upper()}\):"
    with pytest.raises(TaskPayloadError, match=message):
        refuse_commands(ctx, {key.upper(): "x", "path": "."})


def test_check_keys_refuses_commands_before_unknown_keys() -> None:
    ctx, _ = make_ctx("deployment.deploy", {})
    assert check_keys(ctx, {"service": "web"}, {"service", "version"}) is None
    with pytest.raises(TaskPayloadError, match="cannot carry commands or environment"):
        check_keys(ctx, {"verbose": 1, "cmd": "x"}, {"service"})
    with pytest.raises(
        TaskPayloadError,
        match=r"^deployment\.deploy: unknown payload key\(s\) 1, verbose "
        r"\(known: service, version\)$",
    ):
        check_keys(ctx, {"verbose": 1, 1: 2, "service": "web"}, {"version", "service"})


def test_check_keys_with_no_known_keys() -> None:
    ctx, _ = make_ctx("monitoring.alerts", {})
    with pytest.raises(TaskPayloadError, match=r"\(known: none\)$"):
        check_keys(ctx, {"x": 1}, set())


def test_check_name() -> None:
    assert check_name("test-service", "service") == "test-service"
    for bad in ("-rf", "a b", "", None, "x" * 129):
        with pytest.raises(TaskPayloadError, match=r"^payload 'service' must be 1-128 of"):
            check_name(bad, "service")


@pytest.mark.parametrize(
    ("version", "ok"),
    [("1.0.0", True), ("v2+build.7", True), ("2026-01_rc1", True), ("-1", False),
     ("+x", False), ("1 2", False), ("1/2", False), ("x" * 129, False)],
)  # fmt: skip
def test_version_re(version: str, ok: bool) -> None:
    assert bool(VERSION_RE.fullmatch(version)) is ok
