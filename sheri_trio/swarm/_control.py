"""Cancel and retry, as an operator asks for them (``sheri cancel``, ``sheri retry``, the
dashboard): the decisions sans-IO (:class:`CancelTracker`, :func:`retry_submission`),
and the two requests over a connected client (:func:`request_cancel`,
:func:`request_retry`).

A cancel (docs/protocol.md, "Cancel and retry") is a ``tasks/cancel`` with a
``request_id``; the agents (broadcast mode: each says what it knows) or the dispatcher
(for the whole swarm) answer on ``tasks/cancel/reply``. Before asking, the retained
``tasks/state/{id}`` tells whether the task already finished. "Unknown" is said only when
the dispatcher does not know the task, or when every online agent said so and the broker
keeps no state of it.

A retry submits the submission kept in a failed task's final retained state again, as
the new task ``{task_id}.retry-{n}`` with ``retry_of`` set; the old task keeps its one
final outcome.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ._messages import encode
from ._protocol import (
    MAX_MESSAGE_BYTES,
    TASK_ID_RE,
    BadMessage,
    Envelope,
    Topics,
    check_task_id,
    decode_envelope,
)
from ._startup import read_retained

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable

    from ..mqtt import Client, Message

__all__ = [
    "RETRYABLE_STATES",
    "CancelOutcome",
    "CancelReport",
    "CancelTracker",
    "RetryOutcome",
    "RetryRefused",
    "RetryReport",
    "request_cancel",
    "request_retry",
    "retry_confirmation",
    "retry_submission",
]

#: the final states a retry starts again (a cancelled or expired task failed too)
RETRYABLE_STATES: Final = frozenset({"failed", "cancelled", "expired"})
#: the final states of the retained ``tasks/state/{id}`` (``released`` is not: it is
#: taken over)
_FINAL: Final = frozenset({"done", "failed", "cancelled", "expired"})
#: a live state, as a retry's refusal says it
_LIVE_WORDS: Final = {
    "queued": "queued",
    "assigned": "assigned",
    "claimed": "running",
    "released": "released (it is taken over)",
}
#: how many ``{id}.retry-{n}`` names are looked up in one read of the retained states
_RETRY_BATCH: Final = 16
#: the PUBACK reason code of a publish no subscription matched
_NO_MATCHING_SUBSCRIBERS: Final = 0x10


class CancelOutcome(enum.StrEnum):
    CANCELLED = "cancelled"  # it had not started: it never will (failed, reason cancelled)
    STOPPED = "stopped"  # it ran: its run was stopped (failed, reason cancelled)
    FINISHED = "finished"  # it already had its final outcome (or reached it first)
    UNKNOWN = "unknown"  # nobody knows it
    NO_ANSWER = "no_answer"  # not confirmed in time (``detail`` says what is known)


@dataclass(slots=True)
class CancelReport:
    """What became of a cancel request."""

    task_id: str
    outcome: CancelOutcome
    detail: str
    state: str | None = None  # the final state, when it finished
    agent_id: str | None = None  # who stopped, cancelled or finished it
    replies: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task_id": self.task_id,
            "outcome": self.outcome.value,
            "detail": self.detail,
        }
        if self.state is not None:
            out["state"] = self.state
        if self.agent_id is not None:
            out["agent_id"] = self.agent_id
        return out


class CancelTracker:
    """The requester's side of one cancel, sans-IO: the retained messages, then the
    replies, outcomes and statuses in; a :class:`CancelReport` out once it is decided."""

    def __init__(self, topics: Topics, task_id: str, request_id: str | None = None) -> None:
        self.topics = topics
        self.task_id = check_task_id(task_id)
        self.request_id = request_id or secrets.token_hex(8)
        #: what :func:`request_cancel` waits for from the broker (None: for the swarm)
        self.waiting: str | None = None
        #: the report once decided
        self.result: CancelReport | None = None
        self._state_topic = topics.task_state(task_id)
        self._pending_topic = topics.task_pending(task_id)
        #: what the broker keeps of the task: a live state or a pending marker
        self.record: dict[str, Any] | None = None
        self.pending = False
        #: agents whose retained status says online; the dispatcher, if one is online
        self.online: set[str] = set()
        self.dispatcher: str | None = None
        self.dispatch_mode = False  # a dispatch/status exists (online or not)
        self.replies: list[dict[str, Any]] = []
        self._unknown_to: set[str] = set()
        self._holder: str | None = None
        self._stopping: dict[str, Any] | None = None
        self._cancelled: dict[str, Any] | None = None  # its failed outcome, reason cancelled

    # ------------------------------------------------------------------ input
    def on_retained(self, messages: Iterable[Message]) -> CancelReport | None:
        """The retained state and marker of the task, the agents' statuses and the
        dispatcher's: a finished task is decided here (nothing to ask)."""
        for message in messages:
            env = _envelope(message.payload)
            if env is None:
                continue
            if message.topic == self._state_topic:
                state = env.payload.get("state")
                if state in _FINAL:
                    agent = env.payload.get("agent_id")
                    return self._finished(str(state), agent if isinstance(agent, str) else None)
                self.record = env.payload
            elif message.topic == self._pending_topic:
                self.pending = True
            else:
                self.on_message(message.topic, env)
        return None

    def on_message(self, topic: str, env: Envelope) -> CancelReport | None:
        """A reply, an outcome or a status seen after subscribing."""
        t, p = self.topics, env.payload
        if topic == t.dispatch_status:
            self.dispatch_mode = True
            agent = p.get("agent_id")
            online = p.get("status") == "online" and isinstance(agent, str)
            self.dispatcher = agent if online and isinstance(agent, str) else None
            return None
        status_of = t.status_agent_id(topic)
        if status_of is not None:
            if p.get("status") == "online":
                self.online.add(status_of)
            else:
                self.online.discard(status_of)
            return self._all_unknown()
        if p.get("task_id") != self.task_id:
            return None
        if topic == t.tasks_cancel_reply:
            if p.get("request_id") != self.request_id:
                return None
            return self._on_reply(p)
        if topic in (t.tasks_complete, t.tasks_failed):
            agent = p.get("agent_id")
            agent = agent if isinstance(agent, str) else None
            if topic == t.tasks_failed and p.get("reason") == "cancelled":
                self._cancelled = p
                if self._stopping is not None:
                    return self._stopped(agent)
                return None  # the reply says whether it had started
            return self._finished("done" if topic == t.tasks_complete else "failed", agent)
        return None

    def decide(self, report: CancelReport) -> CancelReport:
        self.result = report
        return report

    def outcome(self, seconds: float) -> CancelReport:
        """The report: as decided, or (the caller's deadline after ``seconds`` ran out)
        what is known."""
        if self.result is not None:
            return self.result
        if self.waiting is not None:
            return self.report(
                CancelOutcome.NO_ANSWER,
                f"no answer from the broker within {seconds:g} s while {self.waiting}",
                None,
            )
        return self.on_timeout(seconds)

    def on_timeout(self, timeout: float) -> CancelReport:
        """Nothing decided within ``timeout`` seconds: what is known."""
        if self._cancelled is not None:
            agent = self._cancelled.get("agent_id")
            return self.report(
                CancelOutcome.CANCELLED,
                f"task {self.task_id} was cancelled (failed with reason cancelled)",
                agent if isinstance(agent, str) else None,
            )
        why = f"no confirmation of the cancel of task {self.task_id} within {timeout:g} s"
        if self._stopping is not None:
            why += f": {self._holder or 'its holder'} is stopping it, its outcome did not come"
        elif self._holder is not None:
            why += f": it is held by {self._holder}, which did not answer"
        elif self.dispatcher is not None:
            why += f": the dispatcher {self.dispatcher} did not answer"
        elif self.dispatch_mode and not self.replies:
            why += (
                ": no dispatcher is online (the cancel waits in the dispatch session for "
                "the next one)"
            )
        elif not self.online:
            why += (
                ": no agent is online (a cancel published while agents are away waits in "
                "their sessions)"
            )
        else:
            silent = sorted(self.online - self._unknown_to - {r["agent_id"] for r in self.replies})
            if silent:
                why += f": no answer from {', '.join(silent)}"
            if self.record is not None:
                why += f"; the broker keeps its state {self.record.get('state')!r}"
        return self.report(CancelOutcome.NO_ANSWER, why, None)

    # --------------------------------------------------------------- helpers
    def _on_reply(self, p: dict[str, Any]) -> CancelReport | None:
        agent = p.get("agent_id")
        if not isinstance(agent, str):
            return None
        self.replies.append(p)
        result, scope = p.get("result"), p.get("scope")
        holder = p.get("holder")
        if isinstance(holder, str):
            self._holder = holder
        if result == "cancelled":
            return self.report(
                CancelOutcome.CANCELLED,
                f"cancelled task {self.task_id}: it had not started and never will "
                "(failed with reason cancelled)",
                agent,
            )
        if result == "stopping":
            self._stopping = p
            if self._cancelled is not None:
                return self._stopped(agent)
            return None
        if result == "finished":
            state = p.get("state")
            return self._finished(state if isinstance(state, str) else None, None)
        if result == "unknown":
            if scope == "swarm":
                return self.report(
                    CancelOutcome.UNKNOWN,
                    f"unknown task {self.task_id}: the dispatcher {agent} has no record of it",
                    None,
                )
            self._unknown_to.add(agent)
            return self._all_unknown()
        return None  # "known": another agent acts

    def _all_unknown(self) -> CancelReport | None:
        """Broadcast mode: unknown once every online agent said so and the broker keeps
        no state of it."""
        if (
            self.dispatcher is not None  # (agents that answer are in broadcast mode)
            or self.record is not None
            or self.pending
            or not self._unknown_to
            or not self.online <= self._unknown_to
        ):
            return None
        return self.report(
            CancelOutcome.UNKNOWN,
            f"unknown task {self.task_id}: none of the {len(self._unknown_to)} online agents "
            "knows it and the broker keeps no state of it",
            None,
        )

    def _stopped(self, agent: str | None) -> CancelReport:
        assert self._stopping is not None
        attempt = self._stopping.get("attempt")
        holder = self._holder or agent or "its holder"
        on = f" (attempt {attempt})" if isinstance(attempt, int) else ""
        return self.report(
            CancelOutcome.STOPPED,
            f"cancelled task {self.task_id}: its run on {holder}{on} was stopped "
            "(failed with reason cancelled)",
            agent or self._holder,
        )

    def _finished(self, state: str | None, agent: str | None) -> CancelReport:
        by = f" (by {agent})" if agent else ""
        report = self.report(
            CancelOutcome.FINISHED,
            f"task {self.task_id} had already finished: {state or 'final outcome'}{by}",
            agent,
        )
        report.state = state
        return report

    def report(self, outcome: CancelOutcome, detail: str, agent: str | None) -> CancelReport:
        return CancelReport(self.task_id, outcome, detail, None, agent, list(self.replies))


def _envelope(payload: bytes) -> Envelope | None:
    try:
        return decode_envelope(payload)
    except BadMessage:
        return None


async def request_cancel(client: Client, tracker: CancelTracker) -> CancelReport:
    """Cancel ``tracker.task_id`` and wait for the confirmation: its retained state
    (already finished?), then a ``tasks/cancel`` with the tracker's request id, and the
    replies, outcomes and statuses that decide. The caller bounds the wait with a cancel
    scope; when it runs out, ``tracker.outcome(seconds)`` says what is known::

        tracker = CancelTracker(topics, task_id)
        with trio.move_on_after(10):
            await request_cancel(client, tracker)
        report = tracker.outcome(10)
    """
    topics, task_id = tracker.topics, tracker.task_id
    tracker.waiting = "subscribing to the replies"
    async with client.subscribe(
        topics.tasks_cancel_reply,
        topics.tasks_complete,
        topics.tasks_failed,
        topics.agents_status_all,
        topics.dispatch_status,
        qos=1,
    ) as messages:
        tracker.waiting = "reading its retained state"
        retained = await read_retained(
            client,
            topics.sync_marker("cli", secrets.token_hex(6)),
            topics.task_state(task_id),
            topics.task_pending(task_id),
            topics.agents_status_all,
            topics.dispatch_status,
        )
        if (decided := tracker.on_retained(retained)) is not None:
            return tracker.decide(decided)
        tracker.waiting = "publishing the cancel"
        request = encode(None, None, {"task_id": task_id, "request_id": tracker.request_id})
        code = await client.publish(
            topics.tasks_cancel, request, qos=1, content_type="application/json"
        )
        if code == _NO_MATCHING_SUBSCRIBERS:
            return tracker.decide(
                tracker.report(
                    CancelOutcome.NO_ANSWER,
                    f"nothing subscribes to {topics.tasks_cancel}: no agent of swarm "
                    f"{topics.swarm!r} is online and no dispatcher session exists",
                    None,
                )
            )
        tracker.waiting = None
        async for message in messages:
            env = _envelope(message.payload)
            if env is not None and (decided := tracker.on_message(message.topic, env)):
                return tracker.decide(decided)
    raise AssertionError("the subscription ended")  # pragma: no cover


# ------------------------------------------------------------------- retry
class RetryRefused(ValueError):
    """A task that cannot be retried (it did not fail, or its submission is not kept)."""


def retry_submission(record: dict[str, Any], taken: Collection[str] = ()) -> dict[str, Any]:
    """The ``tasks/new`` payload that retries the task of the final state ``record`` (a
    retained ``tasks/state/{id}`` payload): its submission, as ``{task_id}.retry-{n}``
    (``n`` the first number not in ``taken``) with ``retry_of``. Raises
    :class:`RetryRefused` saying why not."""
    task_id = check_task_id(record.get("task_id"))
    state = record.get("state")
    if state == "done":
        raise RetryRefused(f"task {task_id} completed: only a failed task is retried")
    if state not in RETRYABLE_STATES:
        holder = record.get("agent_id")
        now = _LIVE_WORDS.get(str(state), str(state))
        if state in ("assigned", "claimed") and isinstance(holder, str):
            now += f" (held by {holder})"
        raise RetryRefused(
            f"task {task_id} is {now}, it has not failed: only a failed task is retried"
        )
    task = record.get("task")
    if not isinstance(task, dict) or task.get("task_id") != task_id:
        omitted = record.get("task_omitted")
        raise RetryRefused(
            f"the final state of task {task_id} does not hold its submission"
            + (f" ({omitted})" if isinstance(omitted, str) else " (written by an older agent)")
        )
    n = 1
    while f"{task_id}.retry-{n}" in taken:
        n += 1
    new_id = f"{task_id}.retry-{n}"
    if not TASK_ID_RE.fullmatch(new_id):
        raise RetryRefused(f"task {task_id}: its retry's id {new_id} would exceed 128 characters")
    submission = dict(task)
    submission["task_id"] = new_id
    submission["retry_of"] = task_id
    return submission


class RetryOutcome(enum.StrEnum):
    SUBMITTED = "submitted"  # the retry is out, and an agent or the dispatcher took it
    REFUSED = "refused"  # the task did not fail (or its submission is not kept)
    UNKNOWN = "unknown"  # the broker keeps no state of the task
    NO_ANSWER = "no_answer"  # submitted (or not), not confirmed in time


@dataclass(slots=True)
class RetryReport:
    """What became of a retry."""

    task_id: str  # the task retried
    outcome: RetryOutcome = RetryOutcome.NO_ANSWER
    detail: str = ""
    retry_id: str | None = None  # the new task
    state: str | None = None  # the old task's final state
    agent_id: str | None = None  # who took the retry

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task_id": self.task_id,
            "outcome": self.outcome.value,
            "detail": self.detail,
        }
        for key in ("retry_id", "state", "agent_id"):
            if (value := getattr(self, key)) is not None:
                out[key] = value
        return out


def retry_confirmation(
    topics: Topics, retry_id: str, topic: str, env: Envelope
) -> tuple[str, str | None] | None:
    """Whether a message after the retry's publish confirms it: (what happened, who)."""
    p = env.payload
    if p.get("task_id") != retry_id and topic != topics.task_pending(retry_id):
        return None
    agent = p.get("agent_id")
    agent = agent if isinstance(agent, str) else None
    if topic == topics.tasks_assigned and agent is not None:
        return f"claimed by {agent}", agent
    if topic == topics.task_state(retry_id):
        state = p.get("state")
        if state == "queued":
            return "queued by the dispatcher", None
        return f"{state} at {agent or '?'}", agent
    if topic == topics.task_pending(retry_id):
        return "kept pending: no agent online may take it yet", None
    if topic in (topics.tasks_complete, topics.tasks_failed):
        return ("completed" if topic == topics.tasks_complete else "failed already"), agent
    return None


async def request_retry(client: Client, topics: Topics, report: RetryReport) -> RetryReport:
    """Retry the failed ``report.task_id`` from its retained final state, and wait for an
    agent or the dispatcher to take the new task; ``report`` says how far it got (the
    caller bounds the wait with a cancel scope, as for :func:`request_cancel`). Raises
    :class:`~sheri_trio.swarm.BadMessage` for an invalid task id."""
    task_id = check_task_id(report.task_id)
    sync = topics.sync_marker("cli", secrets.token_hex(6))
    report.outcome, report.detail = RetryOutcome.NO_ANSWER, "no answer from the broker"
    report.detail += " while reading its state"
    found = await read_retained(client, sync, topics.task_state(task_id))
    record = next((e.payload for m in found if (e := _envelope(m.payload)) is not None), None)
    if record is None:
        report.outcome = RetryOutcome.UNKNOWN
        report.detail = (
            f"unknown task {task_id}: the broker keeps no state of it (a task is retried "
            "from the final state its failure left)"
        )
        return report
    report.state = str(record.get("state"))
    taken: set[str] = set()
    batch = 0
    while True:  # the retry names in use: retained states or pending markers
        names = [f"{task_id}.retry-{n}" for n in range(batch + 1, batch + _RETRY_BATCH + 1)]
        names = [n for n in names if TASK_ID_RE.fullmatch(n)]
        if not names:
            break
        filters = [topics.task_state(n) for n in names] + [topics.task_pending(n) for n in names]
        for message in await read_retained(client, sync, *filters):
            taken.add(message.topic.rsplit("/", 1)[1])
        if len(taken) < batch + _RETRY_BATCH:
            break
        batch += _RETRY_BATCH
    try:
        submission = retry_submission(record, taken)
    except (RetryRefused, BadMessage) as exc:
        report.outcome, report.detail = RetryOutcome.REFUSED, str(exc)
        return report
    retry_id: str = submission["task_id"]
    report.retry_id = retry_id
    data = encode(None, None, submission)
    if len(data) > MAX_MESSAGE_BYTES:
        report.outcome = RetryOutcome.REFUSED
        report.detail = f"the retry of task {task_id} would exceed {MAX_MESSAGE_BYTES} bytes"
        return report
    report.detail = f"no answer from the broker while submitting {retry_id}"
    async with client.subscribe(
        topics.tasks_assigned,
        topics.task_state(retry_id),
        topics.task_pending(retry_id),
        topics.tasks_complete,
        topics.tasks_failed,
        qos=1,
    ) as messages:
        code = await client.publish(topics.tasks_new, data, qos=1, content_type="application/json")
        if code == _NO_MATCHING_SUBSCRIBERS:
            report.detail = (
                f"the broker dropped the retry {retry_id}: nothing subscribes to "
                f"{topics.tasks_new} (no agent of swarm {topics.swarm!r} is online and no "
                "dispatcher session exists)"
            )
            return report
        report.detail = (
            f"submitted {retry_id} (retry of {task_id}), but no agent or dispatcher took it"
        )
        async for message in messages:
            env = _envelope(message.payload)
            if env is None:
                continue
            confirmed = retry_confirmation(topics, retry_id, message.topic, env)
            if confirmed is not None:
                what, agent = confirmed
                report.outcome, report.agent_id = RetryOutcome.SUBMITTED, agent
                report.detail = f"retrying task {task_id} as {retry_id}: {what}"
                return report
    raise AssertionError("the subscription ended")  # pragma: no cover
