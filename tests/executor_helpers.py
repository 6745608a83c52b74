"""Helpers for the executor tests: a TaskContext that records its progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sheri_trio.executors import TaskContext

if TYPE_CHECKING:
    from pathlib import Path


@dataclass
class Recorder:
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def __call__(self, message: str = "", **fields: Any) -> None:
        self.events.append((message, fields))

    def messages(self, **match: Any) -> list[str]:
        return [m for m, f in self.events if all(f.get(k) == v for k, v in match.items())]


def make_ctx(
    task_type: str,
    payload: Any,
    *,
    config: dict[str, Any] | None = None,
    state: Path | None = None,
    workspace: Path | None = None,
    task_id: str = "t-1",
    agent_id: str = "agent-1",
) -> tuple[TaskContext, Recorder]:
    """A context as the agent builds it; ``state``/``workspace`` fill those settings in."""
    config = dict(config or {})
    if state is not None:
        config.setdefault("state_dir", str(state))
    if workspace is not None:
        config.setdefault("workspace", {"root": str(workspace)})
    recorder = Recorder()
    ctx = TaskContext(
        task_id=task_id,
        type=task_type,
        payload=payload,
        agent_id=agent_id,
        role="test",
        attempt=1,
        try_number=1,
        _progress=recorder,
        config=config,
    )
    return ctx, recorder
