"""The agent's decisions, sans-IO: messages and the time in, commands out.

:class:`Scheduler` holds one :class:`Entry` per task the agent knows and may take (its
spec, a :class:`Phase`, the attempt, whether a retained pending marker exists), the
claim book, the peer table and the claim queue. Every input is a method call with
``now`` passed in (``receive(topic, payload, now)`` for a message off the broker, or the
``on_*`` methods for one already parsed); it returns the :data:`Command` objects the trio
shell (:mod:`._agent`) carries out. ``claims()`` hands out the claims for the free slots.

Nothing here imports trio, reads a clock or touches the network; it only logs.

The phases of one entry::

    QUEUED ──claims()──▶ CLAIMING ──first in broker order──▶ RUNNING ──stop──▶ STOPPING
      ▲  │                  │ lost                             │ on_ended()     │
      │  └──claimed by──▶ HELD ◀───────────────────────────────┴────────────────┘
      └──holder gone─────┘      (watching another holder; taken over when it dies)

A slot is busy from ``claims()`` until ``finish()`` (its outcome is about to go out) or
``on_ended()``: CLAIMING, RUNNING and STOPPING entries count against ``max_tasks``, so a
won task holds its slot before the shell has started anything, and one whose outcome is
out does not (the dispatcher frees the slot when it sees the outcome, and may assign it
again before the shell's run of the finished task has returned).
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._claims import ClaimBook, ClaimVerdict
from ._divergence import DivergenceWatch, ReportDivergence
from ._lifecycle import FINAL_STATES
from ._presence import PeerTable, PresenceKind
from ._protocol import (
    TYPE_RE,
    BadMessage,
    CancelRequest,
    Claim,
    Envelope,
    Outcome,
    TaskSpec,
    Topics,
    check_task_id,
    decode_envelope,
    parse_cancel,
    parse_claim,
    parse_outcome,
    parse_task,
    roles_for,
)
from ._queue import ClaimQueue, Placed

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..stores import Verdict
    from ._claims import Holder
    from ._config import AgentConfig

__all__ = [
    "AnnounceClaim",
    "ClearPending",
    "Command",
    "Entry",
    "FailReason",
    "Phase",
    "Reannounce",
    "ReportError",
    "RepublishOutcome",
    "Scheduler",
    "SendCancelReply",
    "SendClaim",
    "SendFailed",
    "SendPending",
    "SendRelease",
    "StartTask",
    "StopReason",
    "StopTask",
    "StoreClaim",
]

log = logging.getLogger("sheri_trio.agent")


class Phase(enum.Enum):
    QUEUED = "queued"  # a candidate (claim queue or overflow) for ``attempt``
    CLAIMING = "claiming"  # our claim for ``attempt`` is out; the broker's order decides
    RUNNING = "running"  # we hold ``attempt``; the shell runs it
    STOPPING = "stopping"  # asked to stop (``Entry.stop`` says why); still ending
    HELD = "held"  # another agent holds it (or nobody wants it now): watched for takeover


_HOLDING = frozenset({Phase.RUNNING, Phase.STOPPING})  # ours: the shell has it


class StopReason(enum.Enum):
    CANCEL = "cancel"  # a cancel request: the task ends as cancelled
    RELEASE = "release"  # shutdown: given back for another agent to take
    FENCED = "fenced"  # a newer attempt or a final outcome exists elsewhere: stop silently


class FailReason(enum.StrEnum):
    """The ``reason`` of a ``tasks/failed`` message (docs/protocol.md)."""

    ERROR = "error"
    TIMEOUT = "timeout"
    INVALID_PAYLOAD = "invalid_payload"
    INVALID_TASK = "invalid_task"
    NOT_CONFIGURED = "not_configured"
    UNKNOWN_TYPE = "unknown_type"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class Entry:
    """One task the agent knows and may take."""

    spec: TaskSpec
    #: why the submission is invalid (it is claimed by any role and fails once), or None
    invalid: str | None = None
    phase: Phase = Phase.HELD
    attempt: int = 0  # the attempt queued, claimed or held by us
    marker: bool = False  # a retained pending marker exists for it
    stop: StopReason | None = None
    #: a cancel came while another agent held it: a takeover fails it, never runs it
    cancelled: bool = False

    @property
    def task_id(self) -> str:
        return self.spec.task_id

    def roles(self) -> tuple[str, ...] | None:
        """The roles that may take it (None: any, for an invalid submission)."""
        return None if self.invalid is not None else roles_for(self.spec.type)

    def submission(self) -> dict[str, Any]:
        """The submission as kept in retained states (an invalid one: as received)."""
        if self.invalid is not None and isinstance(self.spec.payload, dict):
            return self.spec.payload
        return self.spec.to_wire()


# ------------------------------------------------------------------ commands
@dataclass(frozen=True, slots=True)
class SendClaim:
    """Publish our claim for ``attempt`` on ``tasks/assigned``."""

    task_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class StoreClaim:
    """With a claim store: ask the store for ``attempt`` (``takeover``: the holder is dead
    in presence), and give its verdict to :meth:`Scheduler.on_store_verdict`."""

    task_id: str
    attempt: int
    takeover: bool


@dataclass(frozen=True, slots=True)
class AnnounceClaim:
    """With a claim store: the store gave us ``attempt``; say so on ``tasks/assigned``
    (for observers: the broker's order no longer decides)."""

    task_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class RepublishOutcome:
    """With a claim store: the store has the task's outcome and we never saw it on the
    broker (its holder may have died between the store and its publish): publish the
    stored one."""

    task_id: str


@dataclass(frozen=True, slots=True)
class StartTask:
    """We won ``attempt``: run it (its slot is already counted)."""

    entry: Entry
    attempt: int


@dataclass(frozen=True, slots=True)
class StopTask:
    """Stop the running task (``entry.stop`` says why)."""

    entry: Entry
    reason: StopReason


@dataclass(frozen=True, slots=True)
class SendRelease:
    """Give ``attempt`` back on ``tasks/released`` without running it."""

    task_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class SendFailed:
    """Publish a final ``tasks/failed`` for a task that never ran here; with ``task``
    (the submission), first its retained final state (``cancelled``), which keeps it."""

    spec: TaskSpec
    attempt: int
    error: str
    reason: FailReason
    clear_marker: bool
    task: dict[str, Any] | None = None


class CancelResult(enum.StrEnum):
    """The ``result`` of a reply on ``tasks/cancel/reply`` (docs/protocol.md)."""

    CANCELLED = "cancelled"  # it had not started: failed now (reason cancelled) by the replier
    STOPPING = "stopping"  # it runs; its run is being stopped, its tasks/failed follows
    FINISHED = "finished"  # it already has its final outcome
    KNOWN = "known"  # the replier knows it; another agent (``holder``, or the reporter) acts
    UNKNOWN = "unknown"  # the replier does not know it (scope swarm: nobody does)


@dataclass(frozen=True, slots=True)
class SendCancelReply:
    """Answer a cancel request on ``tasks/cancel/reply`` (``scope``: ``agent`` from an
    agent, ``swarm`` from the dispatcher)."""

    request_id: str
    task_id: str
    result: CancelResult
    scope: str = "agent"
    state: str | None = None
    holder: str | None = None
    attempt: int | None = None


@dataclass(frozen=True, slots=True)
class SendPending:
    """Keep a submission nobody online can take as a retained pending marker."""

    task_id: str
    submission: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ClearPending:
    """Clear the retained pending marker of a finished task."""

    task_id: str


@dataclass(frozen=True, slots=True)
class Reannounce:
    """Publish a heartbeat now (a new dispatcher learns our capacity from it)."""


@dataclass(frozen=True, slots=True)
class ReportError:
    """Report a refused message on ``{swarm}/errors``."""

    topic: str
    reason: str
    size: int
    task_id: str | None


Command = (
    (SendClaim | StartTask | StopTask | SendRelease | SendFailed | SendPending | ClearPending)
    | ReportError
    | ReportDivergence
    | Reannounce
    | StoreClaim
    | AnnounceClaim
    | RepublishOutcome
    | SendCancelReply
)

#: the most tasks nobody online may take that an agent remembers (for their cancel)
UNSERVED_LIMIT = 10_000
#: dispatch mode: the kinds of message the dispatcher sends to an agent's inbox
_INBOX_KINDS = frozenset({"assignment", "revocation", "cancel"})
#: dispatch mode: how many refused sender epochs are remembered (each logged once)
_REFUSED_EPOCHS = 64
#: dispatch mode: how many finished tasks' attempts an agent remembers (as the ClaimBook
#: its finished tasks)
FINISHED_ATTEMPTS = 100_000


class Scheduler:
    """One agent's view of the swarm and its tasks, and what it decides to do."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.me = config.agent_id
        self.role = config.role
        self.topics = Topics(config.swarm)
        self._pending_prefix = self.topics.task_pending("")
        self.book = ClaimBook()
        self.peers = PeerTable(self.me)
        self.queue = ClaimQueue(config.queue_limit, config.overflow_limit, config.preference_window)
        #: dispatch mode: tasks come as assignments on our inbox (docs/dispatch.md), not
        #: as submissions we claim in the broker's order
        self.dispatched = config.dispatch == "dispatcher"
        self._inbox = self.topics.agent_inbox(self.me)
        #: while the inbox backlog is read at start (the nonce of our sync marker), the
        #: assignments wait here, so one revoked later in the backlog never starts
        self.draining: str | None = None
        self._held: dict[str, Entry] = {}
        #: dispatch mode: the attempt each task we finished ran as (oldest forgotten
        #: first), so a newer attempt's assignment is told from a duplicate
        self._finished_attempts: OrderedDict[str, int] = OrderedDict()
        #: dispatch mode: the highest attempt of each task revoked before we held it
        #: (oldest forgotten first): the broker may hand a resumed session a revocation
        #: before the redelivered assignment it revokes, which must then never start
        self._revoked: OrderedDict[str, int] = OrderedDict()
        #: the dispatcher we follow (``dispatch/status``): agent id and epoch
        self.dispatcher: tuple[str, int] | None = None
        #: dispatch mode: the highest dispatcher epoch seen (an online ``dispatch/status``,
        #: an inbox message's ``epoch``): an inbox message of an older term is a deposed
        #: dispatcher's, refused (acknowledged, not acted on, reported)
        self.dispatch_epoch = 0
        #: the sender epochs whose refusal was logged as a warning (once each)
        self._refused_epochs: set[int] = set()
        self.entries: dict[str, Entry] = {}
        #: tasks nobody online may take, not ours (kept as pending markers): remembered so
        #: that a cancel of one is answered and carried out (by the reporter), oldest first
        self.unserved: OrderedDict[str, Entry] = OrderedDict()
        #: entries whose slot is busy running (RUNNING or STOPPING), in start order
        self.running: dict[str, Entry] = {}
        #: the running entries whose final outcome is out (``finish``): their slot is free
        self._finishing: set[str] = set()
        self._claiming = 0
        self.accepting = True
        self.counters: dict[str, int] = {
            "received": 0,
            "claimed": 0,
            "won": 0,
            "lost": 0,
            "completed": 0,
            "failed": 0,
            "bad_messages": 0,
            "released": 0,
            "stale_epoch": 0,
        }
        #: final outcomes seen in the swarm (ours included), for monitoring.alerts
        self.swarm_outcomes: dict[str, int] = {"completed": 0, "failed": 0}
        #: a second holder or outcome of one attempt: the broker keeps no single order
        self.divergence = DivergenceWatch(self.me)
        #: a claim store decides the holder of each attempt (docs/stores.md), not the
        #: broker's order: claims are StoreClaim commands, their verdicts come back
        self.store_mode = config.store.kind != "broker"
        #: tasks queued for a takeover (their holder is dead in presence)
        self._takeovers: set[str] = set()
        #: our own connection is down: we hear nobody, so nobody's silence counts
        self._deaf = False
        #: when our connection came back: leases count from then at the earliest
        self._heard_since = 0.0

    # ---------------------------------------------------------------- queries
    def free_slots(self) -> int:
        return self.config.max_tasks - self._claiming - len(self.running) + len(self._finishing)

    @property
    def claiming(self) -> int:
        """Our claims still waiting for the broker's order."""
        return self._claiming

    def can_claim(self) -> bool:
        return self.accepting and self.free_slots() > 0 and len(self.queue) > 0

    def swarm_view(self, now: float) -> dict[str, Any]:
        """What this agent knows of the swarm (for monitoring.alerts)."""
        return {"agents": self.peers.view(now), "outcomes": dict(self.swarm_outcomes)}

    # ---------------------------------------------------------------- intake
    def receive(self, topic: str, payload: bytes, now: float) -> list[Command]:
        """One message off the agent's subscription."""
        t = self.topics
        if not payload and topic.startswith(self._pending_prefix):
            return []  # a cleared marker
        try:
            env = decode_envelope(payload, max_bytes=self.config.max_message_bytes)
            if topic == self._inbox:
                return self.on_inbox(env, len(payload))
            if topic == t.dispatch_status:
                return self.on_dispatch_status(env)
            if topic == t.tasks_new:
                return self.on_task(env, now)
            if topic == t.tasks_assigned:
                return self.on_claim(parse_claim(env), now)
            if topic == t.tasks_complete:
                return self.on_outcome(parse_outcome(env, success=True))
            if topic == t.tasks_failed:
                return self.on_outcome(parse_outcome(env, success=False))
            if topic == t.tasks_released:
                return self.on_released(parse_claim(env))  # same fields as a claim
            if topic == t.tasks_cancel:
                return self.on_cancel(parse_cancel(env))
            if topic.startswith(self._pending_prefix):
                return self.on_task(env, now, marker=True)
            if topic == t.broadcast:
                log_event(logging.INFO, "broadcast", self.me, message=str(env.payload)[:200])
                return []
            return self.on_presence(topic, env, now)
        except BadMessage as exc:
            return self.on_bad_message(topic, exc, len(payload))

    def on_bad_message(self, topic: str, exc: BadMessage, size: int) -> list[Command]:
        self.counters["bad_messages"] += 1
        log_event(
            logging.WARNING,
            "refused message",
            self.me,
            topic=topic,
            reason=exc.reason,
            task_id=exc.task_id,
        )
        if topic != self.topics.errors and self.peers.is_reporter():
            return [ReportError(topic, exc.reason, size, exc.task_id)]
        return []

    def on_task(self, env: Envelope, now: float, *, marker: bool = False) -> list[Command]:
        """A submission (``tasks/new``) or a retained pending marker."""
        self.counters["received"] += 1
        spec, invalid = self._parse_submission(env.payload)
        spec.submitted_by = env.agent_id
        spec.received_at = now
        task_id = spec.task_id
        if self.book.is_finished(task_id):
            log_event(logging.INFO, "already finished: not run again", self.me, task_id=task_id)
            return []
        known = self.entries.get(task_id)
        if known is not None or self.book.holder(task_id) is not None:
            if known is not None and marker:
                known.marker = True
            log_event(logging.DEBUG, "duplicate submission ignored", self.me, task_id=task_id)
            return []
        entry = Entry(spec, invalid, marker=marker)
        if not self._eligible(entry):
            log_event(
                logging.DEBUG, "skipped: not our role", self.me, task_id=task_id, type=spec.type
            )
            return self._pending_if_nobody(entry, env.payload, marker)
        self.entries[task_id] = entry
        self._enqueue(entry, 1)
        return []

    def on_state(self, payload: dict[str, Any], now: float) -> None:
        """A retained ``tasks/state/{id}`` read at start: finished ids are never run
        again; tasks held by a holder that may be gone are taken over when its lease
        runs out (at once when the holder was an earlier life of this agent id)."""
        task_id = check_task_id(payload.get("task_id"))
        state = payload.get("state")
        if state in FINAL_STATES and state != "released":
            self.book.mark_finished(task_id, state == "done")
            return
        task, holder, attempt = (
            payload.get("task"),
            payload.get("agent_id"),
            payload.get("attempt", 1),
        )
        if (
            not isinstance(task, dict)
            or not isinstance(holder, str)
            or not isinstance(attempt, int)
            or isinstance(attempt, bool)
        ):
            return
        spec = parse_task(task)
        spec.received_at = now
        self.book.observe_claim(Claim(task_id, holder, attempt, None), now)
        entry = Entry(spec)
        if not self._eligible(entry):
            return
        self.entries[task_id] = entry
        if holder == self.me:
            # held by an earlier life of this agent id, which is gone: run it again
            log_event(
                logging.WARNING, "resuming a task of our previous run", self.me, task_id=task_id
            )
            self._enqueue(entry, attempt + 1)
            self._takeovers.add(task_id)  # our earlier life is gone

    # -------------------------------------------------------- dispatch mode
    def on_inbox(self, env: Envelope, size: int = 0) -> list[Command]:
        """An assignment, revocation or cancel from the dispatcher, or our sync marker.
        One of an older dispatcher epoch than the highest seen is refused (``size``: the
        message's, for its report)."""
        p = env.payload
        kind = p.get("kind")
        if kind == "sync":
            if self.draining is not None and p.get("nonce") == self.draining:
                return self.end_drain()
            return []
        task_id = check_task_id(p.get("task_id"))
        attempt = p.get("attempt")
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
            raise BadMessage("'attempt' must be a positive integer", task_id=task_id)
        if not isinstance(kind, str) or kind not in _INBOX_KINDS:
            raise BadMessage(f"unknown inbox message kind {str(kind)[:40]!r}", task_id=task_id)
        epoch = p.get("epoch")  # absent: an older dispatcher's message, taken as it is
        if epoch is not None:
            if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
                raise BadMessage("'epoch' must be a non-negative integer", task_id=task_id)
            if epoch < self.dispatch_epoch:
                return self._stale_epoch(env, str(kind), task_id, attempt, epoch, size)
            self.dispatch_epoch = epoch
        if kind == "assignment":
            task = p.get("task")
            if not isinstance(task, dict) or task.get("task_id") != task_id:
                raise BadMessage("an assignment needs its 'task'", task_id=task_id)
            return self._on_assignment(env, task, attempt)
        if kind == "revocation":
            held = self._held.get(task_id)
            if held is not None and held.attempt <= attempt:
                del self._held[task_id]
                self._set_phase(held, Phase.HELD)
                log_event(logging.INFO, "revoked before it started", self.me, task_id=task_id)
                return []
            entry = self.entries.get(task_id)
            if entry is not None and entry.phase is Phase.RUNNING and entry.attempt <= attempt:
                return [self._stop(entry, StopReason.FENCED)]
            if entry is None or entry.attempt < attempt:
                revoked = self._revoked
                revoked[task_id] = max(attempt, revoked.get(task_id, 0))
                revoked.move_to_end(task_id)
                while len(revoked) > FINISHED_ATTEMPTS:
                    revoked.popitem(last=False)
            return []
        # a cancel
        held = self._held.pop(task_id, None)
        if held is not None:  # assigned in the backlog: it never starts
            self._set_phase(held, Phase.HELD)
            self.book.mark_finished(task_id, False)
            self.counters["failed"] += 1
            error = "cancelled before it started"
            return [
                SendFailed(
                    held.spec,
                    attempt,
                    error,
                    FailReason.CANCELLED,
                    held.marker,
                    held.submission(),
                )
            ]
        entry = self.entries.get(task_id)
        if entry is not None and entry.phase is Phase.RUNNING:
            return [self._stop(entry, StopReason.CANCEL)]
        return []

    def _stale_epoch(
        self, env: Envelope, kind: str, task_id: str, attempt: int, epoch: int, size: int
    ) -> list[Command]:
        """An inbox message of an older dispatcher epoch than one we have seen: a deposed
        dispatcher's that had not noticed yet (with a claim store: at most one renewal
        period), or an older term's delivered late. Not acted on; the shell acknowledges
        it (the broker must not deliver it again); logged once per sender epoch, and
        reported. Nothing is left stranded: whatever the current term believes we hold,
        it has sent us itself (docs/dispatch.md, "Fencing by epoch")."""
        self.counters["stale_epoch"] += 1
        current = self.dispatch_epoch
        level = logging.DEBUG
        if epoch not in self._refused_epochs:
            level = logging.WARNING
            if len(self._refused_epochs) >= _REFUSED_EPOCHS:
                self._refused_epochs.clear()
            self._refused_epochs.add(epoch)
        log_event(
            level,
            "refused inbox message of a deposed dispatcher",
            self.me,
            kind=kind,
            task_id=task_id,
            attempt=attempt,
            sender=env.agent_id,
            epoch=epoch,
            current_epoch=current,
        )
        reason = f"{kind} from a deposed dispatcher (epoch {epoch}; current epoch {current})"
        return [ReportError(self._inbox, reason, size, task_id)]

    def _on_assignment(self, env: Envelope, task: dict[str, Any], attempt: int) -> list[Command]:
        task_id = task["task_id"]
        if attempt <= self._revoked.get(task_id, 0):
            log_event(logging.INFO, "revoked before it came", self.me, task_id=task_id)
            return []  # its revocation came first: it never starts
        if self.book.is_finished(task_id):
            if attempt <= self._finished_attempts.get(task_id, attempt):
                return []  # a duplicate of one we finished
            # A newer attempt of a task we finished: the dispatcher took it from us (we
            # looked gone: silent for lease_time, e.g. cut off that long) and fenced our
            # outcome off. Ignored, it would stay assigned to us for ever, holding a slot.
            log_event(logging.INFO, "assigned again after our outcome", self.me, task_id=task_id)
            self.book.reopen(task_id)
        known = self.entries.get(task_id)
        if known is not None and known.attempt >= attempt:
            return []  # a duplicate (the dispatcher sends again after a hand-over)
        if (known is not None and known.phase in _HOLDING) or not self.accepting:
            # still ending an older attempt, or leaving: hand the new one back
            self.counters["released"] += 1
            return [SendRelease(task_id, attempt)]
        spec, invalid = self._parse_submission(task)
        spec.submitted_by = env.agent_id
        entry = known or Entry(spec, invalid)
        entry.spec, entry.invalid, entry.attempt, entry.stop = spec, invalid, attempt, None
        self.entries[task_id] = entry
        self.book.observe_claim(Claim(task_id, self.me, attempt, self.role), 0.0)
        self.counters["won"] += 1
        if self.free_slots() <= 0:
            self.counters["released"] += 1
            log_event(
                logging.WARNING, "assigned beyond max_tasks: released", self.me, task_id=task_id
            )
            return [SendRelease(task_id, attempt)]
        self._set_phase(entry, Phase.RUNNING)
        if self.draining is not None:
            self._held[task_id] = entry
            return []
        return [StartTask(entry, attempt)]

    def begin_drain(self, nonce: str) -> None:
        """Our inbox's backlog is being read up to the sync marker ``nonce``."""
        self.draining = nonce

    def end_drain(self) -> list[Command]:
        """The backlog is read: what it assigned and nobody revoked was our previous
        run's (this process is new, the dispatcher did not know it yet), so it is handed
        back (``tasks/released``: the dispatcher queues the next attempt) instead of
        started. The dispatcher also takes over at our register what that run held: its
        will was no takeover (docs/protocol.md, "Sessions, presence and absence"), and a
        backlog assignment started now would run beside the attempt that replaces it."""
        self.draining = None
        held, self._held = self._held, {}
        out: list[Command] = []
        for entry in held.values():
            self._set_phase(entry, Phase.HELD)
            self.counters["released"] += 1
            log_event(
                logging.INFO, "assigned to our previous run: released", self.me,
                task_id=entry.task_id, attempt=entry.attempt,
            )  # fmt: skip
            out.append(SendRelease(entry.task_id, entry.attempt))
        return out

    def on_dispatch_status(self, env: Envelope) -> list[Command]:
        p = env.payload
        agent_id, epoch = p.get("agent_id"), p.get("epoch")
        if p.get("status") == "online" and isinstance(agent_id, str) and isinstance(epoch, int):
            self._follow_epoch(epoch)
            if self.dispatcher == (agent_id, epoch):
                return []
            log_event(logging.INFO, "dispatcher", self.me, dispatcher=agent_id, epoch=epoch)
            self.dispatcher = (agent_id, epoch)
            # a new dispatcher knows our slots from our next heartbeat: give it one now
            return [Reannounce()]
        self.dispatcher = None
        return []

    def _follow_epoch(self, epoch: int) -> None:
        """An online ``dispatch/status`` of ``epoch``: the fence rises to it. Lower than
        the fence: with a claim store (whose epochs only grow) a stale copy, e.g. a
        retained status a partitioned broker kept, and the fence stays; on the broker's
        order a dispatcher session taken over cannot publish any more and statuses come
        in the broker's order, so a lower one is a new term whose epoch went back (the
        broker lost the retained status, and a candidate that never saw the old one
        stood): followed, else every message of that term would be refused."""
        if isinstance(epoch, bool) or epoch < 0 or epoch == self.dispatch_epoch:
            return
        if epoch < self.dispatch_epoch:
            log_event(
                logging.WARNING,
                "dispatcher epoch went back",
                self.me,
                epoch=epoch,
                highest=self.dispatch_epoch,
                fence="kept: the claim store's epochs only grow" if self.store_mode else None,
            )
            if self.store_mode:
                return
        self.dispatch_epoch = epoch

    # ------------------------------------------------------------ claiming
    def claims(self) -> list[SendClaim | StoreClaim]:
        """The claims to make now: the most urgent candidates, one per free slot (with a
        claim store: to ask the store, :class:`StoreClaim`)."""
        out: list[SendClaim | StoreClaim] = []
        while self.accepting and self.free_slots() > 0:
            got = self.queue.pop(self._still_wanted)
            if got is None:
                break
            task_id, attempt = got
            entry = self.entries[task_id]
            entry.attempt = attempt
            self._set_phase(entry, Phase.CLAIMING)
            self.counters["claimed"] += 1
            if self.store_mode:
                out.append(StoreClaim(task_id, attempt, task_id in self._takeovers))
                self._takeovers.discard(task_id)
            else:
                out.append(SendClaim(task_id, attempt))
        return out

    def on_claim(self, claim: Claim, now: float) -> list[Command]:
        """A claim on ``tasks/assigned``, in the broker's order (ours included)."""
        task_id = claim.task_id
        verdict = self.book.observe_claim(claim, now)
        if self.unserved:
            self.unserved.pop(task_id, None)
        entry = self.entries.get(task_id)
        if entry is None:
            return []
        mine = claim.agent_id == self.me
        ours = entry.attempt if entry.phase is Phase.CLAIMING else None
        if self.store_mode and ours is not None:
            return []  # our claim is with the store: its verdict decides, not this order
        if verdict is ClaimVerdict.WON:
            self.queue.discard(task_id)
            if mine and ours == claim.attempt:
                self.counters["won"] += 1
                if not self.accepting:
                    # won while shutting down: given straight back, never started
                    self._set_phase(entry, Phase.HELD)
                    log_event(
                        logging.INFO, "won while shutting down: released", self.me, task_id=task_id
                    )
                    self.counters["released"] += 1
                    return [SendRelease(task_id, claim.attempt)]
                if entry.cancelled:
                    # taken over after a cancel its gone holder never carried out
                    self._forget(entry)
                    self.book.mark_finished(task_id, False)
                    self.counters["failed"] += 1
                    log_event(logging.INFO, "cancelled on takeover", self.me, task_id=task_id)
                    return [
                        SendFailed(
                            entry.spec,
                            claim.attempt,
                            "cancelled by request (its holder was gone)",
                            FailReason.CANCELLED,
                            entry.marker,
                            entry.submission(),
                        )
                    ]
                self._set_phase(entry, Phase.RUNNING)
                return [StartTask(entry, claim.attempt)]
            if ours is not None and ours <= claim.attempt:
                self.counters["lost"] += 1
                self._set_phase(entry, Phase.HELD)
                log_event(
                    logging.DEBUG,
                    "skipped: lost the claim",
                    self.me,
                    task_id=task_id,
                    winner=claim.agent_id,
                )
                return []
            if entry.phase is Phase.RUNNING and entry.attempt < claim.attempt:
                # We were presumed dead and the task was taken over: stop, say nothing.
                return [self._stop(entry, StopReason.FENCED)]
            if entry.phase is Phase.QUEUED:
                self._set_phase(entry, Phase.HELD)
        elif mine and ours == claim.attempt:
            self.counters["lost"] += 1
            if verdict is ClaimVerdict.FINISHED:
                self._forget(entry)
            else:
                self._set_phase(entry, Phase.HELD)
        return []

    def on_store_verdict(
        self, task_id: str, attempt: int, verdict: Verdict, now: float
    ) -> list[Command]:
        """The claim store's answer to our :class:`StoreClaim` of ``attempt``."""
        entry = self.entries.get(task_id)
        wanted = entry is not None and entry.phase is Phase.CLAIMING and entry.attempt == attempt
        if verdict.value == "won":
            self.book.observe_claim(Claim(task_id, self.me, attempt, self.role), now)
            if entry is None or not wanted or not self.accepting:
                # no longer wanted (finished, cancelled meanwhile) or leaving: given back
                if entry is not None and wanted:
                    self._set_phase(entry, Phase.HELD)
                log_event(logging.INFO, "won in the store, not wanted: released", self.me,
                          task_id=task_id)  # fmt: skip
                self.counters["released"] += 1
                return [SendRelease(task_id, attempt)]
            self.counters["won"] += 1
            self.queue.discard(task_id)
            self._set_phase(entry, Phase.RUNNING)
            return [AnnounceClaim(task_id, attempt), StartTask(entry, attempt)]
        if entry is None or not wanted:
            return []
        self.counters["lost"] += 1
        if verdict.value == "finished":
            seen = self.book.is_finished(task_id)
            self.book.mark_finished(task_id, True)  # its outcome is in the store
            self._forget(entry)
            return [] if seen else [RepublishOutcome(task_id)]
        else:  # lost, stale, held (a takeover too early: tried again at the next lease check)
            self._set_phase(entry, Phase.HELD)
        log_event(logging.DEBUG, "the store gave it to another", self.me, task_id=task_id,
                  verdict=verdict.value)  # fmt: skip
        return []

    def on_store_unavailable(self, claim: StoreClaim) -> None:
        """Our :class:`StoreClaim` got no answer: the task waits in the queue again (the
        shell claims nothing more until the store is back)."""
        entry = self.entries.get(claim.task_id)
        if entry is not None and entry.phase is Phase.CLAIMING and entry.attempt == claim.attempt:
            self._set_phase(entry, Phase.HELD)
            self._enqueue(entry, claim.attempt)
            if claim.takeover:
                self._takeovers.add(claim.task_id)

    def holds(self) -> list[tuple[str, int]]:
        """With a store: the attempts we hold and run, whose leases the shell renews."""
        return [(e.task_id, e.attempt) for e in self.running.values() if e.phase is Phase.RUNNING]

    def on_hold_lost(self, task_id: str, attempt: int) -> list[Command]:
        """The store neither renewed nor re-created our hold (another holder has it): the
        run stops, fenced (its outcome would be refused)."""
        entry = self.entries.get(task_id)
        if entry is None or entry.phase is not Phase.RUNNING or entry.attempt != attempt:
            return []
        log_event(logging.WARNING, "hold lost in the claim store: stopped", self.me,
                  task_id=task_id, attempt=attempt)  # fmt: skip
        return [self._stop(entry, StopReason.FENCED)]

    def on_released(self, claim: Claim) -> list[Command]:
        """A holder gave ``claim.attempt`` back: take it over with the next attempt."""
        if self.book.release(claim.task_id, claim.attempt):
            entry = self.entries.get(claim.task_id)
            if entry is not None and claim.agent_id != self.me and self.accepting:
                log_event(
                    logging.INFO, "task released: taking over", self.me, task_id=claim.task_id
                )
                self._enqueue(entry, claim.attempt + 1)
        return []

    def on_outcome(self, outcome: Outcome) -> list[Command]:
        """A final outcome on ``tasks/complete`` or ``tasks/failed``."""
        kind = "completed" if outcome.success else "failed"
        reports = self._divergence(outcome)
        if self.unserved:
            self.unserved.pop(outcome.task_id, None)
        if not self.book.observe_outcome(outcome):
            if outcome.agent_id == self.me:
                self.swarm_outcomes[kind] += 1  # our own, marked finished before it went out
            return reports
        self.swarm_outcomes[kind] += 1
        entry = self.entries.get(outcome.task_id)
        if entry is None:
            return reports
        if entry.phase is Phase.RUNNING:
            return [*reports, self._stop(entry, StopReason.FENCED)]
        if entry.phase is not Phase.STOPPING:
            self._forget(entry)
        return reports

    def _divergence(self, outcome: Outcome) -> list[Command]:
        """A second holder or final outcome of one attempt (:class:`DivergenceWatch`):
        logged here; the report to publish, if it is ours to publish."""
        entry = self.entries.get(outcome.task_id)
        holding = entry.attempt if entry is not None and entry.phase in _HOLDING else None
        topic = self.topics.tasks_complete if outcome.success else self.topics.tasks_failed
        out: list[Command] = []
        for report in self.divergence.on_outcome(
            outcome.task_id, outcome.attempt, outcome.agent_id, holding=holding, topic=topic
        ):
            log_event(
                logging.ERROR,
                report.message,
                self.me,
                task_id=report.task_id,
                incident=report.incident.value,
                reporting="yes" if report.publish else None,
            )
            if report.publish:
                out.append(report)
        return out

    def on_cancel(self, request: CancelRequest) -> list[Command]:
        """A cancel request: a running task stops; one nobody claimed never starts (one
        agent fails it). With a ``request_id`` every agent answers what it knows."""
        task_id = request.task_id
        entry = self.entries.get(task_id)
        out: list[Command] = []
        result, holder = CancelResult.UNKNOWN, self.book.holder(task_id)
        if self.book.is_finished(task_id):
            result = CancelResult.FINISHED
        elif entry is not None and entry.phase is Phase.RUNNING:
            out.append(self._stop(entry, StopReason.CANCEL))
            result = CancelResult.STOPPING
        elif entry is not None and entry.phase is Phase.STOPPING:
            stopping = entry.stop is StopReason.CANCEL
            result = CancelResult.STOPPING if stopping else CancelResult.KNOWN
        elif holder is not None:
            result = CancelResult.KNOWN  # its holder answers
            if entry is not None:
                entry.cancelled = True  # should the holder be gone, a takeover fails it
        elif entry is not None or task_id in self.unserved:
            # Not claimed by anyone yet: it will never start. One agent says so.
            unserved = self.unserved.pop(task_id, None)
            if entry is not None:
                reporter = self.peers.is_reporter(entry.roles(), entry.spec.assigned_to)
                self._forget(entry)
            else:
                # nobody online may take it (else that agent, who has it, acts)
                assert unserved is not None
                roles, assigned_to = unserved.roles() or (), unserved.spec.assigned_to
                entry = unserved
                reporter = self.peers.is_reporter() and not self.peers.anyone_eligible(
                    roles, assigned_to
                )
            self.book.mark_finished(task_id, False)
            result = CancelResult.KNOWN
            if reporter:
                self.counters["failed"] += 1
                log_event(logging.INFO, "cancelled before it started", self.me, task_id=task_id)
                out.append(
                    SendFailed(
                        entry.spec,
                        1,
                        "cancelled before it started",
                        FailReason.CANCELLED,
                        entry.marker or unserved is not None,
                        entry.submission(),
                    )
                )
                result = CancelResult.CANCELLED
        if request.request_id is not None:
            mine = holder is not None and holder.agent_id == self.me
            out.append(
                SendCancelReply(
                    request.request_id,
                    task_id,
                    result,
                    holder=holder.agent_id if holder is not None else None,
                    attempt=holder.attempt if holder is not None and mine else None,
                )
            )
        return out

    # ------------------------------------------------------------ presence
    def on_presence(self, topic: str, env: Envelope, now: float) -> list[Command]:
        t = self.topics
        p = env.payload
        agent_id = env.agent_id or (
            p.get("agent_id") if isinstance(p.get("agent_id"), str) else None
        )
        role = p.get("role", env.role)
        role = role if isinstance(role, str) else None
        if topic == t.agents_heartbeat or topic == t.agents_register:
            if agent_id:
                if topic == t.agents_register and agent_id != self.me:
                    # once per process: what a holder held is its predecessor's, gone
                    self._take_over(lambda holder: holder.agent_id == agent_id)
                self.peers.observe(agent_id, PresenceKind.ALIVE, now, role=role)
            return []
        if topic == t.agents_shutdown:
            if agent_id and self.peers.observe(agent_id, PresenceKind.LEFT, now):
                self.check_leases(now)
            return []
        status_of = t.status_agent_id(topic)
        if status_of is None:
            return []
        online = p.get("status") == "online"
        if self.peers.observe(status_of, PresenceKind.STATUS, now, role=role, online=online):
            self.check_leases(now)
        return []

    def connection(self, connected: bool, now: float) -> None:
        """Our connection is down (``connected`` False), or up again: a silence while we
        could not hear counts for nobody, so leases count from our reconnect at the
        earliest (a broker's restart silences every agent at once)."""
        if not connected:
            self._deaf = True
        elif self._deaf:
            self._deaf = False
            self._heard_since = now

    def check_leases(self, now: float) -> None:
        """Take over tasks whose holder shut down or was silent for the lease time."""
        if self._deaf:
            return
        heard_since = self._heard_since
        lease = self.config.lease_time
        self._take_over(
            lambda holder: self.peers.lease_expired(
                holder.agent_id, max(holder.since, heard_since), now, lease
            )
        )

    def _take_over(self, gone: Callable[[Holder], bool]) -> None:
        """Queue the next attempt of every task whose holder is ``gone``."""
        if not self.accepting:
            return
        for task_id, holder in list(self.book.holders.items()):
            if holder.agent_id == self.me:
                continue
            entry = self.entries.get(task_id)
            if entry is None or entry.phase not in (Phase.QUEUED, Phase.HELD):
                continue
            if self.queue.attempt(task_id) > holder.attempt:
                continue  # already queued for the takeover
            if gone(holder):
                log_event(
                    logging.WARNING,
                    "holder lost: taking over",
                    self.me,
                    task_id=task_id,
                    holder=holder.agent_id,
                    attempt=holder.attempt + 1,
                )
                self._enqueue(entry, holder.attempt + 1)
                self._takeovers.add(task_id)

    # --------------------------------------------------------------- endings
    def finish(self, entry: Entry, success: bool) -> list[Command]:
        """We are about to publish ``entry``'s final outcome: it is finished here first,
        so its echo from the broker is recognised as ours."""
        self.counters["completed" if success else "failed"] += 1
        self.divergence.finished(entry.task_id, entry.attempt)
        self.book.mark_finished(entry.task_id, success)
        if self.dispatched:
            done = self._finished_attempts
            done[entry.task_id] = entry.attempt
            done.move_to_end(entry.task_id)
            while len(done) > FINISHED_ATTEMPTS:
                done.popitem(last=False)
        self.queue.discard(entry.task_id)
        if self.running.get(entry.task_id) is entry:
            self._finishing.add(entry.task_id)  # its slot is free from now on
        return [ClearPending(entry.task_id)] if entry.marker else []

    def released(self, entry: Entry) -> None:
        """We gave ``entry``'s attempt back (``tasks/released``)."""
        self.counters["released"] += 1

    def on_ended(self, entry: Entry) -> None:
        """The shell's run of ``entry`` is over: its slot is free."""
        if self.running.get(entry.task_id) is not entry:
            return
        if self.book.is_finished(entry.task_id):
            self._forget(entry)
        else:
            entry.stop = None
            self._set_phase(entry, Phase.HELD)

    def stop_accepting(self) -> None:
        """Shutdown begins: claim nothing more; queued tasks are left to other agents."""
        self.accepting = False
        self.queue.clear()
        for entry in self.entries.values():
            if entry.phase is Phase.QUEUED:
                entry.phase = Phase.HELD

    def release_running(self) -> list[Command]:
        """Shutdown's grace period is over: stop what still runs, to give it back."""
        return [
            self._stop(entry, StopReason.RELEASE)
            for entry in list(self.running.values())
            if entry.phase is Phase.RUNNING
        ]

    # --------------------------------------------------------------- helpers
    def _parse_submission(self, payload: dict[str, Any]) -> tuple[TaskSpec, str | None]:
        """The task, and why it is invalid (None: valid). A usable task id with invalid
        fields is still a task: claimed (or assigned) like any, by any role, it fails
        once, so exactly one tasks/failed reports it. No usable id: BadMessage."""
        try:
            return parse_task(payload, default_max_retries=self.config.max_retries), None
        except BadMessage as exc:
            if exc.task_id is None:
                raise
            raw = payload.get("type")
            task_type = raw if isinstance(raw, str) and TYPE_RE.fullmatch(raw) else "invalid"
            log_event(
                logging.WARNING, "invalid task", self.me, task_id=exc.task_id, reason=exc.reason
            )
            return TaskSpec(exc.task_id, task_type, payload, max_retries=0), exc.reason

    def _eligible(self, entry: Entry) -> bool:
        spec = entry.spec
        if spec.assigned_to is not None and spec.assigned_to != self.me:
            return False
        roles = entry.roles()
        return roles is None or self.role in roles

    def _pending_if_nobody(
        self, entry: Entry, submission: dict[str, Any], marker: bool
    ) -> list[Command]:
        """Nobody online can take this task (not ours): remembered, for its cancel (a
        bounded number), and kept as a retained pending marker (by one agent)."""
        roles = entry.roles()
        if roles is None or self.peers.anyone_eligible(roles, entry.spec.assigned_to):
            return []
        self.unserved[entry.task_id] = entry
        self.unserved.move_to_end(entry.task_id)
        while len(self.unserved) > UNSERVED_LIMIT:
            self.unserved.popitem(last=False)
        if marker or not self.peers.is_reporter():
            return []
        log_event(
            logging.WARNING,
            "no eligible agent online: task kept as pending",
            self.me,
            task_id=entry.task_id,
            roles=",".join(roles),
        )
        return [SendPending(entry.task_id, submission)]

    def _enqueue(self, entry: Entry, attempt: int) -> None:
        if entry.phase not in (Phase.QUEUED, Phase.HELD):
            return  # ours already: claiming, running or stopping
        spec = entry.spec
        preferred = (
            not self.config.preference_window
            or spec.assigned_to is not None
            or self.peers.preferred(spec.task_id, entry.roles())
        )
        placed = self.queue.push(
            spec.task_id, attempt, spec.rank, spec.received_at, preferred=preferred
        )
        if placed is Placed.QUEUED or placed is Placed.OVERFLOW:
            entry.attempt = attempt
            entry.phase = Phase.QUEUED
        if placed is Placed.OVERFLOW and len(self.queue.overflow) == 1:
            log_event(
                logging.WARNING,
                "busy: claim queue full, further tasks wait in overflow",
                self.me,
                queue_limit=self.config.queue_limit,
            )
        elif placed is Placed.QUEUED and self.free_slots() <= 0 and log.isEnabledFor(logging.DEBUG):
            log_event(
                logging.DEBUG,
                "busy: task queued",
                self.me,
                task_id=spec.task_id,
                queued=len(self.queue),
            )
        if self.queue.dropped:
            for task_id in self.queue.dropped:
                dropped = self.entries.pop(task_id, None)
                if dropped is not None:
                    dropped.phase = Phase.HELD
                log_event(
                    logging.ERROR,
                    "queue and overflow full: leaving task to other agents",
                    self.me,
                    task_id=task_id,
                    limit=self.config.overflow_limit,
                )
            self.queue.dropped.clear()

    def _still_wanted(self, task_id: str, attempt: int) -> bool:
        entry = self.entries.get(task_id)
        if entry is None or entry.phase is not Phase.QUEUED:
            return False
        if self.book.is_finished(task_id) or self.book.attempt(task_id) >= attempt:
            entry.phase = Phase.HELD  # someone else got there first
            return False
        return True

    def _stop(self, entry: Entry, reason: StopReason) -> StopTask:
        entry.stop = reason
        self._set_phase(entry, Phase.STOPPING)
        return StopTask(entry, reason)

    def _forget(self, entry: Entry) -> None:
        """Drop an entry that is not running (its task is finished or left to others)."""
        self.queue.discard(entry.task_id)
        self._set_phase(entry, Phase.HELD)
        self.entries.pop(entry.task_id, None)

    def _set_phase(self, entry: Entry, phase: Phase) -> None:
        old = entry.phase
        if old is phase:
            return
        if old is Phase.CLAIMING:
            self._claiming -= 1
        elif old in _HOLDING and phase not in _HOLDING:
            self.running.pop(entry.task_id, None)
            self._finishing.discard(entry.task_id)
        if phase is Phase.CLAIMING:
            self._claiming += 1
        elif phase in _HOLDING and old not in _HOLDING:
            self.running[entry.task_id] = entry
        entry.phase = phase


def log_event(level: int, event: str, agent_id: str, **fields: Any) -> None:
    """``event key=value ...`` on the agent logger, with the agent id first."""
    if not log.isEnabledFor(level):
        return
    parts = [f"agent={agent_id}"]
    parts.extend(f"{k}={v}" for k, v in fields.items() if v is not None)
    extra: dict[str, Any] = {"agent_id": agent_id}
    if "task_id" in fields:
        extra["task_id"] = fields["task_id"]
    log.log(level, "%s %s", event, " ".join(parts), extra=extra)
