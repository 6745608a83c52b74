"""The simulated placeholders: the prototype's result fields, marked simulated."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from executor_helpers import make_ctx

from sheri_trio.executors import TaskPayloadError, simulated_registry
from sheri_trio.executors._simulated import SIMULATED

#: the prototype's result fields of each type
FIELDS = {
    "code.review": {"approved", "comments", "suggestions"},
    "code.generate": {"code", "language"},
    "deployment.deploy": {"status", "url", "version"},
    "deployment.rollback": {"status", "version"},
    "testing.run": {"passed", "failed", "skipped", "duration"},
    "testing.coverage": {"coverage", "lines", "uncovered"},
    "security.scan": {"vulnerabilities", "warnings", "info", "findings"},
    "security.audit": {"status", "issues", "recommendations"},
    "monitoring.health": {"status", "uptime", "errors", "checks"},
    "monitoring.alerts": {"active_alerts", "resolved", "alerts"},
    "documentation.generate": {"status", "pages", "format", "content"},
    "database.migrate": {"status", "version"},
    "database.backup": {"status", "size", "location"},
}


def test_one_placeholder_per_task_type() -> None:
    assert set(SIMULATED) == set(FIELDS)
    assert len(SIMULATED) == 13


@pytest.mark.parametrize("task_type", sorted(FIELDS))
async def test_placeholders_return_the_prototypes_fields(task_type: str) -> None:
    result = await SIMULATED[task_type](make_ctx(task_type, None)[0])
    assert set(result) == FIELDS[task_type] | {"simulated"}
    assert result["simulated"] is True


async def test_payload_values_are_echoed() -> None:
    deploy = await SIMULATED["deployment.deploy"](make_ctx("deployment.deploy", {})[0])
    assert deploy["version"] == "latest"
    ctx, _ = make_ctx("deployment.rollback", {"previous_version": 3})
    assert (await SIMULATED["deployment.rollback"](ctx))["version"] == "3"
    ctx, _ = make_ctx("code.generate", {"language": "rust"})
    assert (await SIMULATED["code.generate"](ctx))["language"] == "rust"
    with pytest.raises(TaskPayloadError, match=r"^payload 'version' must be a string$"):
        await SIMULATED["database.migrate"](make_ctx("database.migrate", {"version": 2})[0])


async def test_unknown_types_are_simulated_by_the_fallback() -> None:
    executor = simulated_registry().get("demo.other")
    assert executor is not None
    result = await executor(make_ctx("demo.other", {})[0])
    assert result == {"status": "done", "type": "demo.other", "simulated": True}


async def test_simulate_seconds_waits_and_reports(autojump_clock: trio.testing.MockClock) -> None:
    ctx, rec = make_ctx("testing.run", {"simulate_seconds": 2.5})
    start = trio.current_time()
    await SIMULATED["testing.run"](ctx)
    assert trio.current_time() - start == 2.5
    assert rec.events == [("working", {"seconds": 2.5})]


@pytest.mark.parametrize("seconds", [-1, 3601, "1", True])
async def test_simulate_seconds_is_checked(seconds: object) -> None:
    ctx, _ = make_ctx("testing.run", {"simulate_seconds": seconds})
    with pytest.raises(TaskPayloadError, match="'simulate_seconds' must be a number"):
        await SIMULATED["testing.run"](ctx)


async def test_simulate_failure_is_a_failed_attempt() -> None:
    ctx, _ = make_ctx("security.scan", {"simulate_failure": True})
    with pytest.raises(RuntimeError, match=r"^simulated failure requested by the payload$"):
        await SIMULATED["security.scan"](ctx)


async def test_a_payload_that_is_not_an_object_is_refused() -> None:
    ctx, _ = make_ctx("security.scan", [1])
    with pytest.raises(TaskPayloadError, match=r"^security\.scan needs a JSON object as payload"):
        await SIMULATED["security.scan"](ctx)
