"""The outgoing side of the protocol: the envelope (:func:`encode`) and builders of every
payload an agent publishes.

No network I/O; of the agent layer's sans-IO modules, this is the one that reads the wall
clock (the envelope's and payloads' ISO-8601 timestamps, :func:`now_iso`) and draws random
message ids; the others take the time as an argument.
docs/protocol.md lists the fields; tests/test_protocol.py keeps the two in step.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from ._protocol import CAPABILITIES, JSON_OPTIONS, PROTOCOL_VERSION, task_types_for

if TYPE_CHECKING:
    from ._divergence import ReportDivergence
    from ._lifecycle import StateChange, TaskRecord
    from ._protocol import TaskSpec

__all__ = ["Messages", "encode", "new_message_id", "now_iso"]


class _Clock:
    """ISO-8601 UTC timestamps to the millisecond, formatted once per millisecond, the
    date and time once per second (an agent stamps several messages per task, in most
    milliseconds of a burst; a datetime formatted per millisecond was ~2 % of its CPU)."""

    __slots__ = ("ms", "second", "stem", "text")

    def __init__(self) -> None:
        self.ms = -1
        self.second = -1
        self.stem = ""  # "YYYY-MM-DDTHH:MM:SS." of ``second``
        self.text = ""

    def now(self) -> str:
        ms = time.time_ns() // 1_000_000
        if ms != self.ms:
            second, milli = divmod(ms, 1000)
            if second != self.second:
                stamp = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")
                self.second, self.stem = second, stamp[:-6] + "."  # without "+00:00"
            self.ms, self.text = ms, f"{self.stem}{milli:03d}Z"
        return self.text


now_iso = _Clock().now


class _MessageIds:
    """UUID-shaped message ids: a random version-4 prefix per process and a counter in
    the last group (``uuid4()`` per message was ~3 % of an agent's CPU). A forked
    child draws a new prefix."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = str(uuid.uuid4())[:24]  # "xxxxxxxx-xxxx-4xxx-yxxx-"
        self.counter = itertools.count(int.from_bytes(os.urandom(4)))

    def new(self) -> str:
        return f"{self.prefix}{next(self.counter) & 0xFFFF_FFFF_FFFF:012x}"


new_message_id = _MessageIds().new


def encode(agent_id: str | None, role: str | None, payload: dict[str, Any]) -> bytes:
    """Wrap a payload in our envelope (UUID-shaped id, ISO-8601 timestamp, protocol version)."""
    envelope: dict[str, Any] = {
        "id": new_message_id(),
        "timestamp": now_iso(),
        "v": PROTOCOL_VERSION,
    }
    if agent_id is not None:
        envelope["agent_id"] = agent_id
        envelope["role"] = role
    envelope["payload"] = payload
    # orjson: ~7x faster than json here (envelopes are ~10 % of an agent's CPU).
    return orjson.dumps(envelope, default=str, option=JSON_OPTIONS)


def version() -> str:
    from .. import __version__

    return __version__


class Messages:
    """The payloads of one agent (its id and role are in every one)."""

    def __init__(self, agent_id: str, role: str) -> None:
        self.agent_id = agent_id
        self.role = role

    # ------------------------------------------------------------ presence
    def register(self, max_tasks: int) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "role": self.role,
            "status": "online",
            "capabilities": list(CAPABILITIES[self.role]),
            "task_types": task_types_for(self.role) + (["*"] if self.role == "general" else []),
            "timestamp": now_iso(),
            "version": version(),
            "protocol": PROTOCOL_VERSION,
            "max_tasks": max_tasks,
        }

    def status(self, status: str, reason: str | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "agent_id": self.agent_id,
            "role": self.role,
            "status": status,
            "timestamp": now_iso(),
            "version": version(),
        }
        if reason:
            payload["reason"] = reason
        return payload

    def will(self) -> dict[str, Any]:
        """The retained status the broker publishes if the connection is lost."""
        return {
            "agent_id": self.agent_id,
            "role": self.role,
            "status": "offline",
            "reason": "connection lost",
        }

    def heartbeat(
        self, *, uptime: float, rss: int, running: list[str], capacity: int, queued: int
    ) -> dict[str, Any]:
        return {
            "status": "alive",
            "agent_id": self.agent_id,
            "role": self.role,
            "uptime": round(uptime, 3),
            "memory": {"rss": rss},
            "running": running,
            "running_tasks": len(running),
            "capacity": capacity,
            "queued": queued,
        }

    def shutdown(self, uptime: float) -> dict[str, Any]:
        return {"reason": "graceful", "agent_id": self.agent_id, "uptime": round(uptime, 3)}

    # --------------------------------------------------------------- tasks
    def claim(self, task_id: str, attempt: int) -> dict[str, Any]:
        return {
            "task_id": task_id,
            "agent_id": self.agent_id,
            "role": self.role,
            "claimed_at": now_iso(),
            "attempt": attempt,
        }

    def released(self, task_id: str, attempt: int) -> dict[str, Any]:
        return {
            "task_id": task_id,
            "agent_id": self.agent_id,
            "role": self.role,
            "attempt": attempt,
            "released_at": now_iso(),
        }

    def state_change(
        self, record: TaskRecord, change: StateChange, task_type: str | None
    ) -> dict[str, Any]:
        """A lifecycle step, on ``tasks/progress`` (and, for ``claimed`` and the final
        states, as the retained ``tasks/state/{id}``)."""
        return {
            "task_id": record.task_id,
            "agent_id": self.agent_id,
            "role": self.role,
            "type": task_type,
            "attempt": record.attempt,
            "try": record.tries,
            "state": change.dest,
            "previous": change.source,
            "event": change.trigger,
            "at": now_iso(),
            **{k: v for k, v in change.detail.items() if isinstance(v, str | int | float | bool)},
        }

    def progress(self, record: TaskRecord, message: str, fields: dict[str, Any]) -> dict[str, Any]:
        """An executor's own progress report."""
        return {
            "task_id": record.task_id,
            "agent_id": self.agent_id,
            "role": self.role,
            "attempt": record.attempt,
            "try": record.tries,
            "state": record.state,
            "message": message[:4096],
            **fields,
        }

    def complete(
        self, spec: TaskSpec, attempt: int, result: Any, duration_ms: int
    ) -> dict[str, Any]:
        return {
            "task_id": spec.task_id,
            "agent_id": self.agent_id,
            "role": self.role,
            "status": "success",
            "type": spec.type,
            "result": result,
            "duration": duration_ms,
            "completed_at": now_iso(),
            "attempt": attempt,
        }

    def failed(self, spec: TaskSpec, attempt: int, error: str, reason: str) -> dict[str, Any]:
        return {
            "task_id": spec.task_id,
            "agent_id": self.agent_id,
            "role": self.role,
            "status": "failed",
            "type": spec.type,
            "error": error[:4096],
            "reason": reason,
            "failed_at": now_iso(),
            "attempt": attempt,
        }

    def cancel_reply(
        self,
        request_id: str,
        task_id: str,
        result: str,
        scope: str,
        *,
        state: str | None = None,
        holder: str | None = None,
        attempt: int | None = None,
    ) -> dict[str, Any]:
        """The answer to a cancel request on ``tasks/cancel/reply`` (docs/protocol.md):
        ``scope`` ``swarm`` (the dispatcher: it knows every task) or ``agent`` (what this
        agent knows)."""
        payload: dict[str, Any] = {
            "request_id": request_id,
            "task_id": task_id,
            "result": result,
            "scope": scope,
            "agent_id": self.agent_id,
        }
        if state is not None:
            payload["state"] = state
        if holder is not None:
            payload["holder"] = holder
        if attempt is not None:
            payload["attempt"] = attempt
        payload["at"] = now_iso()
        return payload

    def never_started(
        self, spec: TaskSpec, attempt: int, error: str, task: dict[str, Any]
    ) -> dict[str, Any]:
        """The retained final ``tasks/state/{id}`` of a task cancelled before anyone ran
        it (with its submission, so ``sheri retry`` works from the broker alone)."""
        return {
            "task_id": spec.task_id,
            "agent_id": self.agent_id,
            "role": self.role,
            "type": spec.type,
            "attempt": attempt,
            "try": 0,
            "state": "cancelled",
            "previous": "queued",
            "event": "cancel",
            "at": now_iso(),
            "error": error[:4096],
            "task": task,
        }

    # ------------------------------------------------------------ dispatch
    def task_record(
        self,
        task_id: str,
        state: str,
        attempt: int,
        holder: str | None,
        task: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """The dispatcher's retained ``tasks/state/{id}`` custody record (docs/dispatch.md):
        ``agent_id`` is the holder (assigned, claimed), ``task`` the submission (final
        records too, so ``sheri retry`` works from the broker alone), ``dispatcher`` the
        writer."""
        payload: dict[str, Any] = {"task_id": task_id, "state": state, "attempt": attempt}
        if holder is not None:
            payload["agent_id"] = holder
        if task is not None:
            payload["task"] = task
        payload["dispatcher"] = self.agent_id
        payload["at"] = now_iso()
        return payload

    def assignment(self, task: dict[str, Any], attempt: int, epoch: int) -> dict[str, Any]:
        """An assignment on an agent's inbox: run ``attempt`` of the submission ``task``
        (``epoch``: the sender's term; an agent refuses an older term's message)."""
        return {
            "kind": "assignment",
            "task_id": task["task_id"],
            "task": task,
            "attempt": attempt,
            "epoch": epoch,
        }

    def revocation(self, task_id: str, attempt: int, reason: str, epoch: int) -> dict[str, Any]:
        """A revocation on an agent's inbox: do not start, or stop, ``attempt``."""
        return {
            "kind": "revocation",
            "task_id": task_id,
            "attempt": attempt,
            "reason": reason,
            "epoch": epoch,
        }

    def inbox_cancel(self, task_id: str, attempt: int, epoch: int) -> dict[str, Any]:
        """A cancel request forwarded to the holder's inbox."""
        return {"kind": "cancel", "task_id": task_id, "attempt": attempt, "epoch": epoch}

    def sync(self, nonce: str) -> dict[str, Any]:
        """Our own marker on our inbox: the backlog before it has been read."""
        return {"kind": "sync", "nonce": nonce}

    def dispatch_status(self, epoch: int, status: str) -> dict[str, Any]:
        """The retained ``dispatch/status`` (and, offline, the dispatcher's will)."""
        return {"agent_id": self.agent_id, "epoch": epoch, "status": status}

    def divergence_report(self, report: ReportDivergence) -> dict[str, Any]:
        """``{swarm}/errors``: the broker keeps no single order (docs/protocol.md)."""
        payload: dict[str, Any] = {
            "error": report.message,
            "kind": "divergence",
            "incident": report.incident.value,
            "topic": report.topic,
            "attempt": report.attempt,
            "agents": list(report.agents),
            "reported_by": self.agent_id,
        }
        if report.task_id is not None:
            payload["task_id"] = report.task_id
        return payload

    def error_report(
        self, topic: str, reason: str, size: int, task_id: str | None
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "error": reason,
            "topic": topic,
            "size": size,
            "reported_by": self.agent_id,
        }
        if task_id:
            payload["task_id"] = task_id
        return payload
