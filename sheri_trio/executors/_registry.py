"""task type -> real executor, with the ``[executors] simulate = true`` switch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _builtin

if TYPE_CHECKING:
    from ._base import Executor, TaskContext

#: task type -> "module:function" of its real executor (imported on first use)
REAL: dict[str, str] = {
    "testing.run": "_testing:run_tests",
    "testing.coverage": "_testing:run_coverage",
    "security.scan": "_security:scan",
    "security.audit": "_security:audit",
    "monitoring.health": "_monitoring:health",
    "monitoring.alerts": "_monitoring:alerts",
    "deployment.deploy": "_deployment:deploy",
    "deployment.rollback": "_deployment:rollback",
    "database.migrate": "_database:migrate",
    "database.backup": "_database:backup",
    "code.review": "_llm:code_review",
    "code.generate": "_llm:code_generate",
    "documentation.generate": "_llm:documentation_generate",
}


def simulated(ctx: TaskContext) -> bool:
    table = ctx.config.get("executors")
    return isinstance(table, dict) and table.get("simulate") is True


def _switch(task_type: str, target: str | None) -> Executor:
    placeholder = _builtin.BUILTIN[task_type]

    async def run(ctx: TaskContext) -> dict[str, Any]:
        if target is None or simulated(ctx):
            return await placeholder(ctx)
        module_name, _, function = target.partition(":")
        import importlib

        module = importlib.import_module(f"{__package__}.{module_name}")
        executor: Executor = getattr(module, function)
        return await executor(ctx)

    run.__name__ = run.__qualname__ = f"{task_type.replace('.', '_')}"
    return run


def real_executors() -> dict[str, Executor]:
    return {t: _switch(t, REAL.get(t)) for t in _builtin.BUILTIN}
