"""The executor interface: TaskContext, the error types, ExecutorRegistry."""

from __future__ import annotations

from typing import Any

import pytest
from executor_helpers import make_ctx

from sheri_trio.executors import (
    ExecutorRegistry,
    TaskConfigError,
    TaskContext,
    TaskPayloadError,
)


def test_config_errors_are_payload_errors() -> None:
    # agents that only know TaskPayloadError fail a TaskConfigError once, too
    assert issubclass(TaskConfigError, TaskPayloadError)
    assert issubclass(TaskPayloadError, ValueError)


@pytest.mark.parametrize(("payload", "expected"), [(None, {}), ({"a": 1}, {"a": 1})])
def test_payload_dict(payload: Any, expected: dict[str, Any]) -> None:
    ctx, _ = make_ctx("testing.run", payload)
    assert ctx.payload_dict() == expected


@pytest.mark.parametrize(("payload", "kind"), [([1], "list"), ("x", "str"), (3, "int")])
def test_payload_dict_refuses_other_json(payload: Any, kind: str) -> None:
    ctx, _ = make_ctx("testing.run", payload)
    with pytest.raises(
        TaskPayloadError, match=rf"^testing\.run needs a JSON object as payload, not {kind}$"
    ):
        ctx.payload_dict()


async def test_progress_goes_to_the_agent_when_there_is_one() -> None:
    ctx, rec = make_ctx("testing.run", {})
    await ctx.progress("half", percent=50)
    assert rec.events == [("half", {"percent": 50})]
    alone = TaskContext("t", "testing.run", {}, "a", "testing", attempt=1, try_number=1)
    assert await alone.progress("nobody listens") is None


async def _done(ctx: TaskContext) -> dict[str, Any]:
    return {"done": ctx.type}


def test_registry_lookup_and_fallback() -> None:
    registry = ExecutorRegistry({"b.x": _done})
    registry.register("a.y", _done)
    assert registry.types() == ["a.y", "b.x"]
    assert registry.get("a.y") is _done
    assert registry.get("c.z") is None
    registry.fallback = _done
    assert registry.get("c.z") is _done
    assert registry.types() == ["a.y", "b.x"]  # the fallback is not a type
