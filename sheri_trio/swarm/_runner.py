"""One won task, run to its end: its tries, timeout and backoff, through its lifecycle.

The runner is trio code (it awaits the executor, sleeps the backoff), but it decides
nothing about the swarm: it reports every lifecycle step and the outcome to an
:class:`Outbox` (the agent), which publishes them and tells the scheduler.
"""

from __future__ import annotations

import logging
import random
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..executors import TaskConfigError, TaskContext, TaskPayloadError
from ._lifecycle import Lifecycle
from ._scheduler import FailReason, StopReason

if TYPE_CHECKING:
    from ..executors import ExecutorRegistry
    from ._config import AgentConfig
    from ._lifecycle import StateChange, TaskRecord
    from ._scheduler import Entry

__all__ = ["Outbox", "TaskRunner"]

log = logging.getLogger("sheri_trio.agent")


class Outbox(Protocol):
    """What a runner reports to (the agent publishes and books it)."""

    async def changed(self, entry: Entry, record: TaskRecord, change: StateChange) -> None: ...

    async def progress(self, record: TaskRecord, message: str, fields: dict[str, Any]) -> None: ...

    async def completed(
        self, entry: Entry, attempt: int, result: Any, duration_ms: int
    ) -> None: ...

    async def failed(self, entry: Entry, attempt: int, error: str, reason: FailReason) -> None: ...

    async def released(self, entry: Entry, attempt: int) -> None: ...

    async def swarm_view(self) -> dict[str, Any] | None: ...


class TaskRunner:
    """Runs ``entry``'s ``attempt`` until it ends or its cancel scope is cancelled."""

    def __init__(
        self,
        entry: Entry,
        attempt: int,
        *,
        config: AgentConfig,
        executors: ExecutorRegistry,
        outbox: Outbox,
    ) -> None:
        self.entry = entry
        self.spec = entry.spec
        self.config = config
        self.executors = executors
        self.outbox = outbox
        self.record = Lifecycle.new_record(entry.task_id, attempt)

    async def run(self, scope: trio.CancelScope) -> None:
        record = self.record
        ended = False
        try:
            with scope:
                ended = await self._attempts()
            if scope.cancelled_caught:
                ended = await self._stopped()
        finally:
            if not ended and not record.final and self.entry.stop is None:
                # cancelled from outside (agent killed): give it back if we still can
                with trio.move_on_after(2) as guard:
                    guard.shield = True
                    await self._release()

    async def _fire(self, trigger: str, **detail: Any) -> None:
        record = self.record
        change = Lifecycle.fire(record, trigger, **detail)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s -> %s agent=%s task_id=%s",
                change.source,
                change.dest,
                self.config.agent_id,
                record.task_id,
            )
        await self.outbox.changed(self.entry, record, change)

    async def _fail(self, error: str, reason: FailReason, *, shown: str | None = None) -> bool:
        await self._fire("fail", error=error)
        await self.outbox.failed(self.entry, self.record.attempt, shown or error, reason)
        return True

    async def _attempts(self) -> bool:
        """Every try of this attempt; True once the final outcome is published."""
        spec, record, entry = self.spec, self.record, self.entry
        await self._fire("claim")
        if entry.invalid is not None:
            return await self._fail(
                entry.invalid, FailReason.INVALID_TASK, shown=f"invalid task: {entry.invalid}"
            )
        if spec.expires_at is not None and spec.expires_at <= datetime.now(UTC):
            await self._fire("expire")
            await self.outbox.failed(
                entry, record.attempt, "task expired before it started", FailReason.EXPIRED
            )
            return True
        executor = self.executors.get(spec.type)
        if executor is None:
            return await self._fail(
                "no executor",
                FailReason.UNKNOWN_TYPE,
                shown=f"no executor for task type {spec.type!r}",
            )
        timeout = spec.timeout_s if spec.timeout_s is not None else self.config.default_timeout
        while True:
            record.tries += 1
            await self._fire("start", try_number=record.tries)
            ctx = TaskContext(
                task_id=spec.task_id,
                type=spec.type,
                payload=spec.payload,
                agent_id=self.config.agent_id,
                role=self.config.role,
                attempt=record.attempt,
                try_number=record.tries,
                _progress=self._progress,
                config=self.config.executor_config,
                swarm=await self.outbox.swarm_view() if spec.type == "monitoring.alerts" else None,
            )
            started = trio.current_time()
            error: str
            try:
                if timeout:
                    with trio.fail_after(timeout):
                        result = await executor(ctx)
                else:  # no timeout: no scope to enter (a deadline at inf was one a try)
                    result = await executor(ctx)
            except TaskConfigError as exc:  # retrying cannot help: fail once, as it is
                return await self._fail(str(exc), FailReason.NOT_CONFIGURED)
            except TaskPayloadError as exc:
                return await self._fail(
                    str(exc), FailReason.INVALID_PAYLOAD, shown=f"invalid payload: {exc}"
                )
            except trio.TooSlowError:
                error = f"timed out after {timeout:g} s"
                await self._fire("time_out", error=error)
            except Exception as exc:  # an executor failure is data, not a crash
                error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "attempt failed agent=%s task_id=%s error=%s",
                    self.config.agent_id,
                    spec.task_id,
                    error,
                    extra={"agent_id": self.config.agent_id, "task_id": spec.task_id},
                )
            else:
                duration_ms = round((trio.current_time() - started) * 1000)
                await self._fire("succeed", duration=duration_ms)
                await self.outbox.completed(entry, record.attempt, result, duration_ms)
                return True
            if record.tries > spec.max_retries:
                reason = FailReason.TIMEOUT if record.state == "timed_out" else FailReason.ERROR
                return await self._fail(
                    error, reason, shown=f"{error} (after {record.tries} tries)"
                )
            delay = min(
                self.config.retry_max_delay,
                self.config.retry_initial_delay * 2 ** (record.tries - 1),
            ) * random.uniform(0.5, 1.0)
            delay = round(delay, 3)  # the delay we publish is the delay we sleep
            await self._fire("retry", error=error, delay=delay)
            await trio.sleep(delay)

    async def _progress(self, message: str = "", **fields: Any) -> None:
        await self.outbox.progress(self.record, message, fields)

    async def _stopped(self) -> bool:
        """The task's scope was cancelled: say why, outside the cancelled scope."""
        record, reason = self.record, self.entry.stop
        with trio.move_on_after(5) as guard:
            guard.shield = True
            if reason is StopReason.CANCEL:
                await self._fire("cancel")
                await self.outbox.failed(
                    self.entry, record.attempt, "cancelled by request", FailReason.CANCELLED
                )
                return True
            if reason is StopReason.RELEASE:
                await self._release()
                return True
            if reason is StopReason.FENCED:
                log.warning(
                    "fenced: a newer attempt exists, stopped agent=%s task_id=%s",
                    self.config.agent_id,
                    record.task_id,
                    extra={"agent_id": self.config.agent_id, "task_id": record.task_id},
                )
                if not record.final:
                    await self._fire("release", reason="fenced")
                return True
        return False

    async def _release(self) -> None:
        record = self.record
        if record.final:
            return
        await self._fire("release")
        await self.outbox.released(self.entry, record.attempt)
