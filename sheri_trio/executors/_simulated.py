"""The simulated placeholders of the 13 task types, for exercising the swarm without tools.

They run when the agent's configuration says ``[executors] simulate = true`` (or with
:func:`~sheri_trio.executors.simulated_registry`). Each validates its payload and returns
the prototype's result fields, marked ``"simulated": true`` so no consumer mistakes them
for real work. The real executors are in the domain modules (``_testing``, ...).
"""

from __future__ import annotations

from typing import Any

import trio

from ._base import Executor, TaskContext, TaskPayloadError


def _str(p: dict[str, Any], key: str, default: str | None = None) -> str:
    value = p.get(key, default)
    if value is None:
        raise TaskPayloadError(f"payload needs '{key}'")
    if not isinstance(value, str):
        raise TaskPayloadError(f"payload '{key}' must be a string")
    return value


async def _sim(ctx: TaskContext, **result: Any) -> dict[str, Any]:
    p = ctx.payload_dict()
    delay = p.get("simulate_seconds", 0)
    if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= 3600:
        raise TaskPayloadError("'simulate_seconds' must be a number within 0..3600")
    if p.get("simulate_failure"):
        raise RuntimeError("simulated failure requested by the payload")
    if delay:
        await ctx.progress("working", seconds=delay)
        await trio.sleep(delay)
    return {**result, "simulated": True}


async def code_review(ctx: TaskContext) -> dict[str, Any]:
    return await _sim(ctx, approved=True, comments=[], suggestions=[])


async def code_generate(ctx: TaskContext) -> dict[str, Any]:
    p = ctx.payload_dict()
    return await _sim(ctx, code="", language=_str(p, "language", "python"))


async def deploy(ctx: TaskContext) -> dict[str, Any]:
    p = ctx.payload_dict()
    return await _sim(ctx, status="deployed", url=None, version=_str(p, "version", "latest"))


async def rollback(ctx: TaskContext) -> dict[str, Any]:
    p = ctx.payload_dict()
    version = p.get("version", p.get("previous_version", "previous"))
    return await _sim(ctx, status="rolled_back", version=str(version))


async def tests_run(ctx: TaskContext) -> dict[str, Any]:
    return await _sim(ctx, passed=0, failed=0, skipped=0, duration=0)


async def coverage(ctx: TaskContext) -> dict[str, Any]:
    return await _sim(ctx, coverage=0.0, lines=0, uncovered=0)


async def scan(ctx: TaskContext) -> dict[str, Any]:
    return await _sim(ctx, vulnerabilities=0, warnings=0, info=0, findings=[])


async def audit(ctx: TaskContext) -> dict[str, Any]:
    return await _sim(ctx, status="passed", issues=0, recommendations=[])


async def health(ctx: TaskContext) -> dict[str, Any]:
    return await _sim(ctx, status="healthy", uptime=0, errors=0, checks=[])


async def alerts(ctx: TaskContext) -> dict[str, Any]:
    return await _sim(ctx, active_alerts=0, resolved=0, alerts=[])


async def docs(ctx: TaskContext) -> dict[str, Any]:
    return await _sim(ctx, status="generated", pages=0, format="markdown", content="")


async def migrate(ctx: TaskContext) -> dict[str, Any]:
    p = ctx.payload_dict()
    return await _sim(ctx, status="migrated", version=_str(p, "version", "latest"))


async def backup(ctx: TaskContext) -> dict[str, Any]:
    return await _sim(ctx, status="backed_up", size=0, location=None)


async def unknown_type(ctx: TaskContext) -> dict[str, Any]:
    return await _sim(ctx, status="done", type=ctx.type)


#: task type -> its placeholder
SIMULATED: dict[str, Executor] = {
    "code.review": code_review,
    "code.generate": code_generate,
    "deployment.deploy": deploy,
    "deployment.rollback": rollback,
    "testing.run": tests_run,
    "testing.coverage": coverage,
    "security.scan": scan,
    "security.audit": audit,
    "monitoring.health": health,
    "monitoring.alerts": alerts,
    "documentation.generate": docs,
    "database.migrate": migrate,
    "database.backup": backup,
}
