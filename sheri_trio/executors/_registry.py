"""The two registries: the real executors (with the ``[executors] simulate = true``
switch) and the simulated placeholders."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

from ._base import ExecutorRegistry
from ._simulated import SIMULATED, unknown_type

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._base import Executor, TaskContext

__all__ = [
    "REAL",
    "WORKSPACE_TYPES",
    "default_registry",
    "simulated",
    "simulated_registry",
    "uses_implicit_workspace",
]

#: task type -> "module:function" of its real executor (imported on first use, so that
#: agents that never run an LLM task do not import anthropic)
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


#: the task types whose real executors work on the files of the workspace
WORKSPACE_TYPES: Final = (
    "testing.run",
    "testing.coverage",
    "security.scan",
    "security.audit",
    "code.review",
    "code.generate",
    "documentation.generate",
)


def _simulates(config: Mapping[str, Any]) -> bool:
    table = config.get("executors")
    return isinstance(table, dict) and table.get("simulate") is True


def simulated(ctx: TaskContext) -> bool:
    """Whether the agent's configuration says ``[executors] simulate = true``."""
    return _simulates(ctx.config)


def uses_implicit_workspace(config: Mapping[str, Any]) -> bool:
    """Whether the executors of :data:`WORKSPACE_TYPES`, with this configuration (an
    agent's ``executor_config``), work on the current directory for want of a
    ``[workspace] root`` (simulated ones touch no files)."""
    workspace = config.get("workspace")
    root = workspace.get("root") if isinstance(workspace, dict) else None
    return not root and not _simulates(config)


def _switch(task_type: str, target: str | None) -> Executor:
    placeholder = SIMULATED[task_type]

    async def run(ctx: TaskContext) -> dict[str, Any]:
        if target is None or simulated(ctx):
            return await placeholder(ctx)
        module_name, _, function = target.partition(":")
        module = importlib.import_module(f"{__package__}.{module_name}")
        executor: Executor = getattr(module, function)
        return await executor(ctx)

    run.__name__ = run.__qualname__ = f"{task_type.replace('.', '_')}"
    return run


def default_registry() -> ExecutorRegistry:
    """The real executors of the 13 task types; other types have none (the agent fails
    them with reason ``unknown_type``).

    With ``[executors] simulate = true`` in the agent's configuration every task runs
    its placeholder instead (see :func:`simulated_registry`).
    """
    return ExecutorRegistry({t: _switch(t, REAL.get(t)) for t in SIMULATED})


def simulated_registry() -> ExecutorRegistry:
    """The placeholders: validate the payload, return the prototype's fields marked
    ``"simulated": true`` (``simulate_seconds``, ``simulate_failure`` in the payload).
    For tests of the swarm's mechanics; any other type is simulated as well."""
    registry = ExecutorRegistry(SIMULATED)
    registry.fallback = unknown_type
    return registry
