"""The executor interface and the registry that maps task types to executors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Executor", "ExecutorRegistry", "TaskContext", "TaskPayloadError", "default_registry"]


class TaskPayloadError(ValueError):
    """The task's payload is invalid: the task fails at once, without retries."""


ProgressFn = Callable[..., Awaitable[None]]


@dataclass(slots=True)
class TaskContext:
    task_id: str
    type: str
    payload: Any
    agent_id: str
    role: str
    attempt: int
    try_number: int
    _progress: ProgressFn | None = None
    config: dict[str, Any] = field(default_factory=dict)

    async def progress(self, message: str = "", **fields: Any) -> None:
        """Report progress (published on ``tasks/progress``)."""
        if self._progress is not None:
            await self._progress(message, **fields)

    def payload_dict(self) -> dict[str, Any]:
        if self.payload is None:
            return {}
        if not isinstance(self.payload, dict):
            raise TaskPayloadError(
                f"{self.type} needs a JSON object as payload, not {type(self.payload).__name__}"
            )
        return self.payload


Executor = Callable[[TaskContext], Awaitable[dict[str, Any]]]


class ExecutorRegistry:
    """task type -> executor; ``fallback`` runs types nobody registered."""

    def __init__(self, executors: dict[str, Executor] | None = None) -> None:
        self._executors: dict[str, Executor] = dict(executors or {})
        self.fallback: Executor | None = None

    def register(self, task_type: str, executor: Executor) -> None:
        self._executors[task_type] = executor

    def get(self, task_type: str) -> Executor | None:
        return self._executors.get(task_type, self.fallback)

    def types(self) -> list[str]:
        return sorted(self._executors)


def default_registry() -> ExecutorRegistry:
    from ._builtin import BUILTIN, unknown_type

    registry = ExecutorRegistry(BUILTIN)
    registry.fallback = unknown_type
    return registry
