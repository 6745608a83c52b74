"""The executor interface: the task context, the errors, and the registry type."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Executor",
    "ExecutorRegistry",
    "TaskConfigError",
    "TaskContext",
    "TaskPayloadError",
]


class TaskPayloadError(ValueError):
    """The task's payload is invalid: the task fails at once, without retries."""


class TaskConfigError(TaskPayloadError):
    """The agent cannot run this task as configured (a missing ``[deploy.x]`` table, no
    API key, a tool that is not installed): retrying would fail the same way, so the task
    fails at once, without retries. A subclass of :class:`TaskPayloadError` so that agents
    that only know that one already fail it once."""


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
    #: what the agent knows of the swarm, for ``monitoring.alerts`` (None: not provided).
    #: ``{"agents": [{"agent_id", "role", "online", "last_seen_age"}], "outcomes":
    #: {"completed": n, "failed": n}}``; see docs/configuration.md.
    swarm: dict[str, Any] | None = None

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
