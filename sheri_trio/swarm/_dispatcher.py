"""The dispatcher's decisions, sans-IO: messages and the time in, commands out.

:class:`Dispatcher` is the decision core of the one elected dispatcher of a swarm
(docs/dispatch.md). It holds one :class:`Job` per live task (queued, assigned to an agent,
or claimed by it), a bounded set of finished tasks, and the peer table with every agent's
role and slots. Every input is a method call with ``now`` passed in:
``receive(topic, payload, now)`` for a message off the dispatch session,
``on_state(payload, now)`` for a retained custody record read at election,
``check_leases(now)`` for silent holders; ``assignments(now)`` hands out the tasks the
free slots can take. Each returns the commands (:data:`DispatchCommand`) the trio shell
carries out, in order.

Every list ``receive`` returns ends with exactly one :class:`Ack` of the message it was
given, and nothing else acknowledges anything: the shell acknowledges the message once
every publish before the ``Ack`` has its PUBACK, so a submission is acknowledged only
after its ``queued`` record is stored by the broker. A :class:`WriteRecord` is a barrier
in the same way: the shell publishes it once the publishes before it have their PUBACK,
and what follows it once it has its own (the record is written before the assignment it
announces goes out).

Nothing here imports trio, reads a clock or touches the network; it only logs.

The custody of one job::

    submission ──▶ QUEUED ──assignments()──▶ ASSIGNED ──its claim──▶ CLAIMED ──outcome──▶ finished
                     ▲                          │                       │
                     └──── released / holder gone: revoked, attempt + 1 ┘

A slot of an agent is used from ``assignments()`` until the job's outcome, release or
takeover: ASSIGNED and CLAIMED jobs count against its ``max_tasks``.
"""

from __future__ import annotations

import enum
import heapq
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ._pool import FreeAgents
from ._presence import PeerTable, PresenceKind
from ._protocol import (
    AGENT_ID_RE,
    ROLES,
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
from ._scheduler import (
    CancelResult,
    ClearPending,
    FailReason,
    ReportError,
    SendCancelReply,
    SendFailed,
    SendPending,
    log_event,
)

if TYPE_CHECKING:
    from ..stores import Hold, StoredOutcome, Verdict
    from ._config import AgentConfig

__all__ = [
    "Ack",
    "DispatchCommand",
    "DispatchStatistics",
    "Dispatcher",
    "ForwardCancel",
    "Job",
    "PublishStoredOutcome",
    "RecordState",
    "RevokeReason",
    "SendAssignment",
    "SendRevocation",
    "StoreAssign",
    "WriteRecord",
    "latest_records",
]

#: the most slots an agent may announce (a larger or invalid value leaves them unknown;
#: 0: it takes nothing new, e.g. during its shutdown's grace period)
MAX_SLOTS: Final = 10_000


class RecordState(enum.StrEnum):
    """The ``state`` of a custody record (``tasks/state/{id}``) the dispatcher writes,
    and the custody of a live :class:`Job` (QUEUED, ASSIGNED, CLAIMED)."""

    QUEUED = "queued"  # waiting for a free slot of an eligible agent
    ASSIGNED = "assigned"  # handed to ``agent_id`` for ``attempt``; its claim not seen yet
    CLAIMED = "claimed"  # its holder confirmed custody (the holder writes this one)
    DONE = "done"  # final states (written by the holder, or by us for tasks that never ran)
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


_LIVE: Final = frozenset({RecordState.QUEUED, RecordState.ASSIGNED, RecordState.CLAIMED})
_HELD: Final = frozenset({RecordState.ASSIGNED, RecordState.CLAIMED})
_FINAL_BY_NAME: Final = {s.value: s for s in RecordState if s not in _LIVE}


class RevokeReason(enum.StrEnum):
    """Why a revocation went to an agent's inbox."""

    HOLDER_GONE = "holder_gone"  # shut down, started again or silent for lease_time
    NOT_HOLDER = "not_holder"  # it claimed an attempt the record does not give it
    FINISHED = "finished"  # it claimed a task that already has its final outcome


#: who may take a job: its roles and its ``assigned_to``
_Key = tuple[tuple[str, ...], str | None]


@dataclass(slots=True)
class Job:
    """One live task: its submission and who has it."""

    spec: TaskSpec
    #: the submission's payload as received: recorded and assigned as is, so an agent
    #: parses it with its own defaults (``max_retries``), as with broadcast
    task: dict[str, Any]
    seq: int  # arrival order; kept when the task is queued again
    state: RecordState = RecordState.QUEUED
    attempt: int = 1  # queued: the attempt it will be assigned with
    agent_id: str | None = None  # the holder (ASSIGNED, CLAIMED)
    since: float = 0.0  # when it was assigned (or read at election): its lease's start
    cancel: bool = False  # a cancel was forwarded to the holder
    pending: bool = False  # its retained pending marker is out (nobody online could take it)
    #: we wrote its record again while it was held (a stale message): ours may have
    #: landed over the holder's own, so its accepted outcome gets our final record
    rewritten: bool = False
    #: with a claim store: its :class:`StoreAssign` is with the store (ASSIGNED to
    #: ``agent_id`` for the slot, nothing published yet)
    placing: bool = False
    #: with a claim store: the previous attempt's holder is gone (revoked as dead, or a
    #: claim found it still held): the next attempt is a ``takeover`` in the store
    takeover: bool = False

    @property
    def task_id(self) -> str:
        return self.spec.task_id

    @property
    def key(self) -> _Key:
        return (roles_for(self.spec.type), self.spec.assigned_to)


# ------------------------------------------------------------------ commands
@dataclass(frozen=True, slots=True)
class Ack:
    """Acknowledge the message just received, once every publish before this command has
    its PUBACK. Exactly one ends every list :meth:`Dispatcher.receive` returns."""


@dataclass(frozen=True, slots=True)
class WriteRecord:
    """Publish the retained custody record ``tasks/state/{task_id}`` (expiry
    ``state_retention``), after the PUBACKs of the publishes before it; the next command
    waits for its PUBACK."""

    task_id: str
    state: RecordState
    attempt: int
    agent_id: str | None = None  # the holder (assigned, claimed)
    #: the submission (final records keep it too, for ``sheri retry``)
    task: dict[str, Any] | None = None

    @property
    def final(self) -> bool:
        return self.state not in _LIVE


@dataclass(frozen=True, slots=True)
class SendAssignment:
    """Publish ``{kind: assignment, task, attempt}`` on ``agent_id``'s inbox."""

    agent_id: str
    task_id: str
    task: dict[str, Any]
    attempt: int


@dataclass(frozen=True, slots=True)
class SendRevocation:
    """Publish ``{kind: revocation, task_id, attempt, reason}`` on ``agent_id``'s inbox."""

    agent_id: str
    task_id: str
    attempt: int
    reason: RevokeReason


@dataclass(frozen=True, slots=True)
class ForwardCancel:
    """Publish ``{kind: cancel, task_id, attempt}`` on the holder's inbox."""

    agent_id: str
    task_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class StoreAssign:
    """With a claim store: claim ``attempt`` of ``task_id`` in the store for ``agent_id``
    (the hold's holder is the agent that runs it, so its renewals and its ``finish``
    match), as a ``takeover`` when the previous attempt's holder is gone; the verdict goes
    to :meth:`Dispatcher.on_store_verdict` (nothing is published before it)."""

    task_id: str
    attempt: int
    agent_id: str
    takeover: bool


@dataclass(frozen=True, slots=True)
class PublishStoredOutcome:
    """With a claim store: the store has the task's accepted outcome (its holder may have
    died between the store and its publish): publish it as stored (``success``: on
    ``tasks/complete``, else ``tasks/failed``)."""

    task_id: str
    outcome: dict[str, Any]
    success: bool


DispatchCommand = (
    Ack
    | WriteRecord
    | SendAssignment
    | StoreAssign
    | PublishStoredOutcome
    | SendRevocation
    | ForwardCancel
    | SendFailed
    | ReportError
    | SendPending
    | ClearPending
    | SendCancelReply
)

_ACK: Final = Ack()


def latest_records(commands: list[DispatchCommand]) -> list[DispatchCommand]:
    """``commands`` without each :class:`WriteRecord` that a later one of the same task
    supersedes (a submission queued, then assigned in the same batch): the retained
    record keeps only the last, and nothing of the batch is acknowledged before all of
    it has its PUBACK, so the custody rule (recorded before acknowledged) still holds.
    Every other command stays, in order."""
    last: dict[str, int] = {}
    records = 0
    for i, command in enumerate(commands):
        if isinstance(command, WriteRecord):
            last[command.task_id] = i
            records += 1
    if len(last) == records:
        return commands
    return [
        c for i, c in enumerate(commands) if not isinstance(c, WriteRecord) or last[c.task_id] == i
    ]


@dataclass(frozen=True, slots=True)
class DispatchStatistics:
    """What the dispatcher knows, for its heartbeat and the dashboard. A queued task
    counts under every role that may take it."""

    queued: int
    queued_by_role: dict[str, int]
    assigned: int  # sent to an agent, its claim not seen yet
    claimed: int
    finished: int  # remembered finished tasks (bounded)
    agents_online_by_role: dict[str, int]
    free_slots_by_role: dict[str, int]
    counters: dict[str, int] = field(default_factory=dict)


class Dispatcher:
    """The one dispatcher's view of the swarm's tasks and agents, and what it decides."""

    def __init__(self, config: AgentConfig, *, finished_limit: int = 100_000) -> None:
        self.config = config
        self.me = config.agent_id
        self.lease_time = config.lease_time
        self.topics = Topics(config.swarm)
        self.peers = PeerTable(config.agent_id)
        #: every live task: queued, assigned or claimed
        self.jobs: dict[str, Job] = {}
        #: finished tasks, oldest first: their final state and attempt
        self.finished: OrderedDict[str, tuple[RecordState, int]] = OrderedDict()
        #: the submissions of the finished tasks that did not succeed (their final record
        #: keeps it when we write it again, so ``sheri retry`` works from the broker)
        self._finished_tasks: dict[str, dict[str, Any]] = {}
        self._finished_limit = finished_limit
        #: a claim store decides who holds each attempt (docs/stores.md): an assignment
        #: is a :class:`StoreAssign` first, published once the store gave it
        self.store_mode = config.store.kind != "broker"
        #: with a store: queued jobs whose claim the store held back (the previous holder's
        #: lease is live): out of the queue until the next lease check
        self._deferred: dict[str, Job] = {}
        #: agent id -> the jobs it holds (ASSIGNED or CLAIMED), in assignment order
        self._held: dict[str, dict[str, Job]] = {}
        #: one heap of queued jobs per key: (priority rank, arrival, task id); an entry
        #: is live while its job is QUEUED with that arrival (cancelled ones stay behind)
        self._queues: dict[_Key, list[tuple[int, int, str]]] = {}
        self._queued: dict[_Key, int] = {}  # live entries per key
        self._seq = 0
        #: keys whose tasks nobody online may take: warned once until someone can
        self._unserved: set[_Key] = set()
        #: the agents with a free slot by role and load (checked again when used), told
        #: of every agent in ``_dirty`` at the start of a round and of each one given a
        #: task: an assignment costs what changed, not the swarm's size (time only takes
        #: slots away: a lapsed lease, found on use)
        self._free = FreeAgents()
        #: agents whose presence or holdings changed since the last round
        self._dirty: dict[str, None] = {}  # (in order: ties go by turn)
        #: whether the unserved-kinds check is due (presence or a new kind of task)
        self._served_check = True
        #: jobs queued under a kind already unserved since the last check: they get their
        #: pending marker then (a kind newly unserved has its whole queue walked once)
        self._unmarked: list[Job] = []
        #: the first round's time: the check waits one heartbeat interval after it, so a
        #: new term hears the agents (each announces itself to a new dispatcher) before
        #: it calls a kind of task unserved
        self._first_round: float | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "received",
                "accepted",
                "duplicates",
                "invalid",
                "bad_messages",
                "assigned",
                "claims",
                "claims_stale",
                "claims_unknown",
                "completed",
                "failed",
                "outcomes_stale",
                "outcomes_after_final",
                "outcomes_unknown",
                "released",
                "releases_stale",
                "takeovers",
                "revocations",
                "cancelled",
                "cancels_forwarded",
                "store_won",
                "store_refused",
                "store_unavailable",
            ),
            0,
        )

    # ---------------------------------------------------------------- queries
    def in_flight(self, agent_id: str) -> int:
        """The jobs ``agent_id`` holds from us (assigned, not finished/released/revoked)."""
        return len(self._held.get(agent_id, ()))

    def held_by(self, agent_id: str) -> list[Job]:
        return list(self._held.get(agent_id, {}).values())

    def free_slots(self, agent_id: str, now: float) -> int:
        """What ``agent_id`` may still be given now (0 unless it is online, heard of within
        ``lease_time`` and has announced its slots)."""
        peer = self.peers.get(agent_id)
        if (
            peer is None
            or not peer.online
            or peer.max_tasks is None
            or now - peer.last_seen >= self.lease_time
        ):
            return 0
        return max(peer.max_tasks - self.in_flight(agent_id), 0)

    def is_known(self, task_id: str) -> bool:
        """Whether ``task_id`` is live or finished here (a submission of it is a duplicate)."""
        return task_id in self.jobs or task_id in self.finished

    def queued(self) -> int:
        return sum(self._queued.values())

    def can_assign(self, now: float) -> bool:
        """Whether :meth:`assignments` may have something to hand out."""
        return self.queued() > 0 and any(self.free_slots(a, now) for a in self.peers.peers)

    def swarm_view(self, now: float, epoch: int) -> dict[str, Any]:
        """The retained ``dispatch/view``: the swarm as the dispatcher sees it, for
        ``monitoring.alerts`` (ordinary agents in dispatch mode follow no presence)."""
        stats = self.statistics(now)
        return {
            "agents": self.peers.view(now),
            "outcomes": {
                "completed": self.counters["completed"],
                "failed": self.counters["failed"],
            },
            "epoch": epoch,
            # the queue depths (a queued task counts under every role that may take it),
            # for the dashboard's pending per role
            "queued": stats.queued,
            "queued_by_role": stats.queued_by_role,
            "assigned": stats.assigned,
            "claimed": stats.claimed,
            "free_slots_by_role": stats.free_slots_by_role,
        }

    def statistics(self, now: float) -> DispatchStatistics:
        queued_by_role = dict.fromkeys(ROLES, 0)
        for (roles, _), count in self._queued.items():
            for role in roles:
                queued_by_role[role] = queued_by_role.get(role, 0) + count
        online = dict.fromkeys(ROLES, 0)
        free = dict.fromkeys(ROLES, 0)
        for agent_id, peer in self.peers.items():
            if peer.online and peer.role is not None:
                online[peer.role] = online.get(peer.role, 0) + 1
                free[peer.role] = free.get(peer.role, 0) + self.free_slots(agent_id, now)
        held = [j for jobs in self._held.values() for j in jobs.values()]
        assigned = sum(j.state is RecordState.ASSIGNED for j in held)
        return DispatchStatistics(
            queued=self.queued(),
            queued_by_role=queued_by_role,
            assigned=assigned,
            claimed=len(held) - assigned,
            finished=len(self.finished),
            agents_online_by_role=online,
            free_slots_by_role=free,
            counters=dict(self.counters),
        )

    # ---------------------------------------------------------------- intake
    def receive(self, topic: str, payload: bytes, now: float) -> list[DispatchCommand]:
        """One message off the dispatch session: the commands, ending with its :class:`Ack`."""
        try:
            out = self._receive(topic, payload, now)
        except BadMessage as exc:
            out = self._bad_message(topic, exc, len(payload))
        out.append(_ACK)
        return out

    def _receive(self, topic: str, payload: bytes, now: float) -> list[DispatchCommand]:
        t = self.topics
        if topic == t.errors:
            return []  # never a report about a report
        status_of = t.status_agent_id(topic)
        if status_of is not None and not payload:
            return []  # a cleared retained status
        env = decode_envelope(payload, max_bytes=self.config.max_message_bytes)
        if topic == t.tasks_new:
            return self.on_submission(env, now)
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
        if topic in (t.agents_register, t.agents_heartbeat, t.agents_shutdown):
            return self.on_presence(topic, env, now)
        if status_of is not None:
            online = env.payload.get("status") == "online"
            role = _role(env)
            before = self._presence(status_of, now)
            gone = self.peers.observe(status_of, PresenceKind.STATUS, now, role=role, online=online)
            self._touched(status_of, before, now)
            return self._take_over_all(status_of) if gone else []
        return []  # progress, broadcast, ...: nothing for the dispatcher

    def _bad_message(self, topic: str, exc: BadMessage, size: int) -> list[DispatchCommand]:
        self.counters["bad_messages"] += 1
        log_event(
            logging.WARNING,
            "refused message",
            self.me,
            topic=topic,
            reason=exc.reason,
            task_id=exc.task_id,
        )
        return [ReportError(topic, exc.reason, size, exc.task_id)]

    def on_submission(self, env: Envelope, now: float) -> list[DispatchCommand]:
        """A ``tasks/new``: recorded as queued (a duplicate id: nothing)."""
        self.counters["received"] += 1
        try:
            spec = parse_task(env.payload, default_max_retries=self.config.max_retries)
        except BadMessage as exc:
            if exc.task_id is None:
                raise
            return self._invalid(exc.task_id, exc.reason, env.payload)
        task_id = spec.task_id
        if self.is_known(task_id):
            self.counters["duplicates"] += 1
            log_event(logging.DEBUG, "duplicate submission ignored", self.me, task_id=task_id)
            return []
        spec.submitted_by = env.agent_id
        spec.received_at = now
        job = Job(spec, env.payload, self._next_seq())
        self.jobs[task_id] = job
        self._push(job)
        self.counters["accepted"] += 1
        return [WriteRecord(task_id, RecordState.QUEUED, 1, None, env.payload)]

    def _invalid(self, task_id: str, reason: str, payload: dict[str, Any]) -> list[DispatchCommand]:
        """A submission with a usable task id but invalid fields: failed once, by us.
        The outcome goes out before the final record: a crash between the two makes the
        next dispatcher fail it again (a duplicate final outcome, which every observer
        ignores) rather than never."""
        if self.is_known(task_id):
            self.counters["duplicates"] += 1
            return []
        raw = payload.get("type")
        task_type = raw if isinstance(raw, str) and TYPE_RE.fullmatch(raw) else "invalid"
        spec = TaskSpec(task_id, task_type, payload, max_retries=0)
        self.counters["invalid"] += 1
        self._finish(task_id, RecordState.FAILED, 1, payload)
        log_event(logging.WARNING, "invalid task", self.me, task_id=task_id, reason=reason)
        return [
            SendFailed(spec, 1, f"invalid task: {reason}", FailReason.INVALID_TASK, False),
            WriteRecord(task_id, RecordState.FAILED, 1, None, payload),
        ]

    # ------------------------------------------------------------ assignment
    def assignments(self, now: float) -> list[DispatchCommand]:
        """The assignments to send now: for each queued job, most urgent first (priority,
        then arrival), the least loaded eligible agent with a free slot (ties: the one
        longest at that load; :class:`~._pool.FreeAgents`). Each is a
        :class:`WriteRecord` (assigned) followed by its :class:`SendAssignment`."""
        out: list[DispatchCommand] = []
        if self._first_round is None:
            self._first_round = now
        if self._served_check and now - self._first_round >= self.config.heartbeat_interval:
            self._served_check = False
            out += self._warn_unserved(now)
        if self._dirty:
            for a in self._dirty:
                self._repool(a, now)
            self._dirty.clear()
        if not self._free or not any(self._queued.values()):
            return out
        while True:
            best: tuple[int, int, str] | None = None
            best_key: _Key | None = None
            agent_id: str | None = None
            for key in list(self._queues):
                head = self._head(key)
                if head is None or (best is not None and head >= best):
                    continue
                if (chosen := self._choose(key, now)) is not None:
                    best, best_key, agent_id = head, key, chosen
            if best is None or best_key is None or agent_id is None:
                break
            heapq.heappop(self._queues[best_key])
            self._queued[best_key] -= 1
            job = self.jobs[best[2]]
            if self.store_mode:  # the store first: the slot is taken meanwhile
                job.state, job.agent_id, job.since, job.placing = (
                    RecordState.ASSIGNED, agent_id, now, True
                )  # fmt: skip
                self._hold(agent_id, job)
                out.append(StoreAssign(job.task_id, job.attempt, agent_id, job.takeover))
            else:
                out.extend(self._assign(job, agent_id, now))
            self._repool(agent_id, now)
        return out

    # ------------------------------------------------------------ the claim store
    def on_store_verdict(
        self,
        command: StoreAssign,
        verdict: Verdict,
        now: float,
        *,
        hold: Hold | None = None,
        outcome: StoredOutcome | None = None,
    ) -> list[DispatchCommand]:
        """The store's answer to ``command`` (with a refusal, the store's ``hold`` of the
        task and, when it is finished, its ``outcome``, as the shell read them next).

        ``WON``: the assignment goes out (record, then inbox). ``FINISHED``: the task is
        done (its holder's outcome is published again, the final record written).
        ``LOST``/``STALE``: another assignment of this or a newer attempt is in the store
        (a second dispatcher's, or the last one's that never reached its record): the
        store's holder is followed (recorded and sent the assignment; an agent ignores a
        duplicate). ``HELD``: the previous holder's lease is live: tried again, as a
        takeover, at the next lease check. A released attempt: the next one is queued."""
        job = self.jobs.get(command.task_id)
        if (
            job is None
            or not job.placing
            or job.agent_id != command.agent_id
            or job.attempt != command.attempt
        ):
            return []
        job.placing = False
        if verdict.value == "won":
            self.counters["store_won"] += 1
            job.takeover = False
            return self._assign(job, command.agent_id, now)
        self.counters["store_refused"] += 1
        self._release_slot(job)
        job.state, job.agent_id = RecordState.QUEUED, None
        log_event(
            logging.INFO,
            "the claim store refused the assignment",
            self.me,
            task_id=job.task_id,
            attempt=job.attempt,
            agent=command.agent_id,
            verdict=verdict.value,
            holder=None if hold is None else hold.holder,
        )
        if outcome is not None:
            return self._finish_stored(job, outcome)
        if hold is not None and not hold.finished and hold.attempt >= job.attempt:
            if hold.released:  # given back: the next attempt is free
                job.attempt, job.takeover = hold.attempt + 1, False
                self._push(job)
                return [WriteRecord(job.task_id, RecordState.QUEUED, job.attempt, None, job.task)]
            if verdict.value in ("lost", "stale"):  # the store's holder has it: follow
                job.attempt = hold.attempt
                return self._assign(job, hold.holder, now)
        if verdict.value == "held":
            job.takeover = True  # we queued it because its holder is gone, or gave it back
        self._deferred[job.task_id] = job
        return []

    def on_store_unavailable(self, command: StoreAssign) -> None:
        """``command`` got no answer: the job is queued again as it was (the shell
        assigns nothing more until the store is back)."""
        job = self.jobs.get(command.task_id)
        if job is None or not job.placing or job.attempt != command.attempt:
            return
        self.counters["store_unavailable"] += 1
        job.placing = False
        self._release_slot(job)
        job.state, job.agent_id = RecordState.QUEUED, None
        self._push(job)

    def _finish_stored(self, job: Job, stored: StoredOutcome) -> list[DispatchCommand]:
        """The store has ``job``'s accepted outcome: the task is finished, its outcome
        published again (observers deduplicate) and its final record written."""
        task_id = job.task_id
        del self.jobs[task_id]
        payload = dict(stored.outcome)
        success = payload.get("status") == "success"
        if success:
            state = RecordState.DONE
        else:
            state = _FINAL_BY_NAME.get(str(payload.get("reason")), RecordState.FAILED)
            if state is RecordState.DONE:
                state = RecordState.FAILED
        self._finish(task_id, state, stored.attempt, job.task)
        self.counters["completed" if success else "failed"] += 1
        out: list[DispatchCommand] = [ClearPending(task_id)] if job.pending else []
        return [
            *out,
            PublishStoredOutcome(task_id, payload, success),
            WriteRecord(task_id, state, stored.attempt, stored.holder, job.task),
        ]

    def _assign(self, job: Job, agent_id: str, now: float) -> list[DispatchCommand]:
        job.state, job.agent_id, job.since = RecordState.ASSIGNED, agent_id, now
        job.rewritten = False
        self._hold(agent_id, job)
        cleared: list[DispatchCommand] = []
        if job.pending:  # someone could take it after all
            job.pending = False
            cleared.append(ClearPending(job.task_id))
        self.counters["assigned"] += 1
        log_event(
            logging.DEBUG,
            "assigned",
            self.me,
            task_id=job.task_id,
            holder=agent_id,
            attempt=job.attempt,
        )
        return [
            *cleared,
            WriteRecord(job.task_id, RecordState.ASSIGNED, job.attempt, agent_id, job.task),
            SendAssignment(agent_id, job.task_id, job.task, job.attempt),
        ]

    def _repool(self, agent_id: str, now: float) -> None:
        """Tell the pool of free agents what ``agent_id`` has free now."""
        peer = self.peers.get(agent_id)
        if peer is None or self.free_slots(agent_id, now) <= 0:
            self._free.discard(agent_id)
        else:
            load = self.in_flight(agent_id) / (peer.max_tasks or 1)
            self._free.update(agent_id, peer.role, load)

    def _choose(self, key: _Key, now: float) -> str | None:
        """The agent that gets ``key``'s next task, or None: the least loaded eligible
        agent with a free slot (load: held / max_tasks; ties: the one longest at that
        load, so lone tasks go round the agents)."""
        roles, assigned_to = key
        if assigned_to is not None:
            peer = self.peers.get(assigned_to)
            if peer is None or peer.role not in roles or self.free_slots(assigned_to, now) <= 0:
                return None
            return assigned_to
        best = None
        for role in roles:
            while (top := self._free.top(role)) is not None and self.free_slots(top[2], now) <= 0:
                self._free.discard(top[2])  # its lease lapsed: back at its next sign of life
            if top is not None and (best is None or top < best):
                best = top
        return None if best is None else best[2]

    def _eligible(self, agent_id: str, key: _Key) -> bool:
        roles, assigned_to = key
        return (assigned_to is None or assigned_to == agent_id) and self.peers[
            agent_id
        ].role in roles

    def _warn_unserved(self, now: float) -> list[DispatchCommand]:
        """Warn once for each kind of queued task nobody online may take (again only after
        someone could), and keep each such task as a retained pending marker, as with
        broadcast (``tasks/pending/{id}``: cleared once it is assigned or finishes)."""
        out: list[DispatchCommand] = []
        for key, count in self._queued.items():
            served = count > 0 and any(
                p.online and now - p.last_seen < self.lease_time and self._eligible(a, key)
                for a, p in self.peers.items()
            )
            if served or not count:
                self._unserved.discard(key)
                continue
            if key not in self._unserved:  # newly unserved: its whole queue, once
                for _, seq, task_id in self._queues.get(key, ()):
                    job = self.jobs.get(task_id)
                    if job is not None and job.seq == seq:
                        out += self._mark_pending(job)
                self._unserved.add(key)
                roles, assigned_to = key
                log_event(
                    logging.WARNING,
                    "no eligible agent online: tasks stay queued",
                    self.me,
                    roles=",".join(roles),
                    assigned_to=assigned_to,
                    queued=count,
                )
        for job in self._unmarked:  # queued since, under a kind still unserved
            if job.key in self._unserved:
                out += self._mark_pending(job)
        self._unmarked.clear()
        return out

    def _mark_pending(self, job: Job) -> list[DispatchCommand]:
        if job.state is not RecordState.QUEUED or job.pending:
            return []
        job.pending = True
        return [SendPending(job.task_id, job.task)]

    # ------------------------------------------------------------ holders
    def on_claim(self, claim: Claim, now: float) -> list[DispatchCommand]:
        """An agent's claim on ``tasks/assigned``: confirms custody if it matches the
        record; otherwise ignored, answered with a revocation and the record re-asserted
        (the claimant may have written its ``claimed`` state over it)."""
        task_id = claim.task_id
        job = self.jobs.get(task_id)
        if job is None and task_id not in self.finished:
            self.counters["claims_unknown"] += 1
            return []
        if (
            job is not None
            and job.state in _HELD
            and job.agent_id == claim.agent_id
            and job.attempt == claim.attempt
        ):
            if job.state is RecordState.ASSIGNED:
                job.state, job.since = RecordState.CLAIMED, now  # a sign of life too
                self.counters["claims"] += 1
            return []
        self.counters["claims_stale"] += 1
        reason = RevokeReason.FINISHED if job is None else RevokeReason.NOT_HOLDER
        log_event(
            logging.INFO,
            "claim does not match the record: revoked",
            self.me,
            task_id=task_id,
            claimant=claim.agent_id,
            attempt=claim.attempt,
        )
        self.counters["revocations"] += 1
        return [
            SendRevocation(claim.agent_id, task_id, claim.attempt, reason),
            *self._reassert(task_id),
        ]

    def on_outcome(self, outcome: Outcome) -> list[DispatchCommand]:
        """A final outcome: accepted only from the record's holder for its attempt."""
        task_id = outcome.task_id
        if task_id in self.finished:
            self.counters["outcomes_after_final"] += 1  # a duplicate, or our own echo
            return []
        job = self.jobs.get(task_id)
        if job is None:
            self.counters["outcomes_unknown"] += 1
            return []
        if not self._holds(job, outcome.agent_id, outcome.attempt):
            self.counters["outcomes_stale"] += 1
            log_event(
                logging.INFO,
                "stale outcome fenced off",
                self.me,
                task_id=task_id,
                sender=outcome.agent_id,
                attempt=outcome.attempt,
            )
            return self._reassert(task_id)  # its final state may be over the record
        self._release_slot(job)
        del self.jobs[task_id]
        if outcome.success:
            state = RecordState.DONE
        else:
            state = _FINAL_BY_NAME.get(str(outcome.payload.get("reason")), RecordState.FAILED)
            if state is RecordState.DONE:
                state = RecordState.FAILED
        self._finish(task_id, state, job.attempt, job.task)
        self.counters["completed" if outcome.success else "failed"] += 1
        if job.rewritten:  # our record may be over the holder's final one
            return self._reassert(task_id)
        return []

    def on_released(self, claim: Claim) -> list[DispatchCommand]:
        """The holder gave its attempt back (graceful shutdown): queued again, attempt + 1."""
        job = self.jobs.get(claim.task_id)
        if job is None or not self._holds(job, claim.agent_id, claim.attempt):
            self.counters["releases_stale"] += 1
            return self._reassert(claim.task_id)
        self.counters["released"] += 1
        log_event(logging.INFO, "released: queued again", self.me, task_id=claim.task_id)
        job.takeover = False  # released in the store first: a plain claim wins
        return self._requeue(job)

    def on_cancel(self, request: CancelRequest) -> list[DispatchCommand]:
        """A cancel: a queued task fails as cancelled (by us); a held one is asked to stop.
        With a ``request_id`` we answer (scope ``swarm``: we know every live task)."""
        task_id = request.task_id
        job = self.jobs.get(task_id)
        out: list[DispatchCommand] = []
        state: str | None = None
        holder: str | None = None
        attempt: int | None = None
        if job is None:
            final = self.finished.get(task_id)
            if final is not None:
                result, state, attempt = CancelResult.FINISHED, final[0].value, final[1]
            else:
                result = CancelResult.UNKNOWN
        elif job.state is RecordState.QUEUED:
            self._unqueue(job)
            del self.jobs[task_id]
            out = self._fail_cancelled(job, "cancelled before it started")
            result, state, attempt = CancelResult.CANCELLED, RecordState.QUEUED.value, job.attempt
        else:
            result, state = CancelResult.STOPPING, job.state.value
            holder, attempt = job.agent_id, job.attempt
            if not job.cancel and job.agent_id is not None:
                job.cancel = True
                self.counters["cancels_forwarded"] += 1
                out.append(ForwardCancel(job.agent_id, task_id, job.attempt))
        if request.request_id is not None:
            out.append(
                SendCancelReply(
                    request.request_id, task_id, result, "swarm", state, holder, attempt
                )
            )
        return out

    # ------------------------------------------------------------ presence
    def on_presence(self, topic: str, env: Envelope, now: float) -> list[DispatchCommand]:
        """``agents/register``, ``agents/heartbeat`` or ``agents/shutdown``."""
        t, p = self.topics, env.payload
        agent_id = env.agent_id or p.get("agent_id")
        if not isinstance(agent_id, str) or not AGENT_ID_RE.fullmatch(agent_id):
            raise BadMessage("presence without a valid 'agent_id'")
        before = self._presence(agent_id, now)
        if topic == t.agents_shutdown:
            gone = self.peers.observe(agent_id, PresenceKind.LEFT, now)
            self._touched(agent_id, before, now)
            return self._take_over_all(agent_id) if gone else []
        slots = p.get("max_tasks" if topic == t.agents_register else "capacity")
        max_tasks = (
            slots
            if isinstance(slots, int) and not isinstance(slots, bool) and 0 <= slots <= MAX_SLOTS
            else None
        )
        # a register comes once per process: one from a holder is a new process of that
        # agent id, and what it held is its predecessor's (gone; its will was no takeover)
        out = self._take_over_all(agent_id) if topic == t.agents_register else []
        self.peers.observe(agent_id, PresenceKind.ALIVE, now, role=_role(env), max_tasks=max_tasks)
        self._touched(agent_id, before, now)
        return out

    def check_leases(self, now: float) -> list[DispatchCommand]:
        """Take over the jobs of holders shut down or silent for ``lease_time`` (counted from
        the later of their last sign of life and the job's assignment). Also the rounds'
        safety net: every agent's slots, and the unserved kinds, are looked at again."""
        self._dirty.update(dict.fromkeys(self.peers.peers))
        self._served_check = True
        deferred, self._deferred = self._deferred, {}
        for job in deferred.values():  # the store held them back: asked again now
            if self.jobs.get(job.task_id) is job and job.state is RecordState.QUEUED:
                self._push(job)
        out: list[DispatchCommand] = []
        for agent_id, jobs in list(self._held.items()):
            for job in list(jobs.values()):
                if self.peers.lease_expired(agent_id, job.since, now, self.lease_time):
                    out.extend(self._take_over(job))
        return out

    def _take_over_all(self, agent_id: str) -> list[DispatchCommand]:
        out: list[DispatchCommand] = []
        for job in self.held_by(agent_id):
            out.extend(self._take_over(job))
        return out

    def _take_over(self, job: Job) -> list[DispatchCommand]:
        """The holder is gone: revoke its attempt, then queue the next one (or, when a
        cancel was asked for, fail it as cancelled)."""
        assert job.agent_id is not None
        self.counters["takeovers"] += 1
        self.counters["revocations"] += 1
        log_event(
            logging.WARNING,
            "holder lost: taking over",
            self.me,
            task_id=job.task_id,
            holder=job.agent_id,
            attempt=job.attempt + 1,
        )
        revoke = SendRevocation(job.agent_id, job.task_id, job.attempt, RevokeReason.HOLDER_GONE)
        job.takeover = True  # with a store: the next attempt is a takeover there
        return [revoke, *self._requeue(job)]

    # ------------------------------------------------------------ election
    def on_state(self, payload: dict[str, Any], now: float) -> list[DispatchCommand]:
        """A retained ``tasks/state/{id}`` read at election: queued stays queued, assigned
        and claimed are held by their agent (taken over when it shuts down or registers
        again, or after ``lease_time`` without a sign of it: an offline status is none),
        final states are finished. An ``assigned`` record's assignment is sent again (the
        last dispatcher may have died between the record and the assignment; an agent
        ignores a duplicate). Raises :class:`BadMessage` for a record it cannot use."""
        task_id = check_task_id(payload.get("task_id"))
        if self.is_known(task_id):
            return []
        state = payload.get("state")
        attempt = payload.get("attempt", 1)
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
            raise BadMessage("'attempt' must be a positive integer", task_id=task_id)
        final = _FINAL_BY_NAME.get(state) if isinstance(state, str) else None
        task = payload.get("task")
        if final is not None:
            self._finish(task_id, final, attempt, task if isinstance(task, dict) else None)
            return []
        if not isinstance(task, dict):
            raise BadMessage("task state without its submission ('task')", task_id=task_id)
        spec = parse_task(task, default_max_retries=self.config.max_retries)
        if spec.task_id != task_id:
            raise BadMessage("task state for another task id", task_id=task_id)
        spec.received_at = now
        job = Job(spec, task, self._next_seq(), attempt=attempt)
        self.jobs[task_id] = job
        if state == RecordState.QUEUED:
            self._push(job)
            return []
        if state == "released":
            # given back by its holder, and the last dispatcher did not queue it again
            job.attempt += 1
            self._push(job)
            return [WriteRecord(task_id, RecordState.QUEUED, job.attempt, None, task)]
        holder = payload.get("agent_id")
        if not isinstance(holder, str) or not AGENT_ID_RE.fullmatch(holder):
            del self.jobs[task_id]
            raise BadMessage("held task state without a valid 'agent_id'", task_id=task_id)
        job.state = RecordState.ASSIGNED if state == RecordState.ASSIGNED else RecordState.CLAIMED
        job.agent_id, job.since = holder, now
        self._hold(holder, job)
        if job.state is RecordState.ASSIGNED:
            return [SendAssignment(holder, task_id, task, attempt)]
        return []

    # --------------------------------------------------------------- helpers
    def _holds(self, job: Job, agent_id: str | None, attempt: int) -> bool:
        return job.state in _HELD and job.agent_id == agent_id and job.attempt == attempt

    def _requeue(self, job: Job) -> list[DispatchCommand]:
        """The holder's attempt is over without an outcome: the next attempt is queued,
        keeping its place (priority, original arrival)."""
        self._release_slot(job)
        if job.cancel:
            del self.jobs[job.task_id]
            return self._fail_cancelled(job, "cancelled by request")
        job.state, job.agent_id = RecordState.QUEUED, None
        job.attempt += 1
        self._push(job)
        return [WriteRecord(job.task_id, RecordState.QUEUED, job.attempt, None, job.task)]

    def _fail_cancelled(self, job: Job, error: str) -> list[DispatchCommand]:
        self.counters["cancelled"] += 1
        self._finish(job.task_id, RecordState.CANCELLED, job.attempt, job.task)
        return [
            SendFailed(job.spec, job.attempt, error, FailReason.CANCELLED, job.pending),
            WriteRecord(job.task_id, RecordState.CANCELLED, job.attempt, None, job.task),
        ]

    def _reassert(self, task_id: str) -> list[DispatchCommand]:
        """Write our record of ``task_id`` again (after a stale writer's message)."""
        job = self.jobs.get(task_id)
        if job is not None:
            if job.state is RecordState.QUEUED:
                return [WriteRecord(task_id, job.state, job.attempt, None, job.task)]
            job.rewritten = True
            return [WriteRecord(task_id, job.state, job.attempt, job.agent_id, job.task)]
        final = self.finished.get(task_id)
        if final is not None:
            task = self._finished_tasks.get(task_id)
            return [WriteRecord(task_id, final[0], final[1], None, task)]
        return []

    def _hold(self, agent_id: str, job: Job) -> None:
        self._held.setdefault(agent_id, {})[job.task_id] = job
        self._dirty[agent_id] = None

    def _presence(self, agent_id: str, now: float) -> tuple[bool, str | None]:
        """What makes ``agent_id`` serve a kind of task: alive (online, heard of within
        ``lease_time``), and its role."""
        peer = self.peers.get(agent_id)
        if peer is None:
            return False, None
        return peer.online and now - peer.last_seen < self.lease_time, peer.role

    def _touched(self, agent_id: str, before: tuple[bool, str | None], now: float) -> None:
        """A presence message of ``agent_id``: its slots are looked at in the next round,
        and the unserved kinds only if it came, went or changed role (not at every
        heartbeat: with n agents that is n checks per interval; a lapse by time alone is
        found at the lease check)."""
        self._dirty[agent_id] = None
        if self._presence(agent_id, now) != before:
            self._served_check = True

    def _release_slot(self, job: Job) -> None:
        if job.agent_id is not None:
            self._dirty[job.agent_id] = None
            held = self._held.get(job.agent_id)
            if held is not None:
                held.pop(job.task_id, None)
                if not held:
                    del self._held[job.agent_id]

    def _finish(
        self, task_id: str, state: RecordState, attempt: int, task: dict[str, Any] | None = None
    ) -> None:
        self.finished[task_id] = (state, attempt)
        self.finished.move_to_end(task_id)
        if task is not None and state is not RecordState.DONE:
            self._finished_tasks[task_id] = task
        while len(self.finished) > self._finished_limit:
            gone, _ = self.finished.popitem(last=False)
            self._finished_tasks.pop(gone, None)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _push(self, job: Job) -> None:
        key = job.key
        heapq.heappush(self._queues.setdefault(key, []), (job.spec.rank, job.seq, job.task_id))
        count = self._queued.get(key, 0)
        if key in self._unserved:
            self._unmarked.append(job)  # its pending marker goes out at the next check
            self._served_check = True
        elif not count:
            self._served_check = True  # a kind of task newly waiting: is anyone there for it?
        self._queued[key] = count + 1

    def _unqueue(self, job: Job) -> None:
        """A queued job leaves the queue (its heap entry is skipped when it comes up)."""
        key = job.key
        if self._deferred.pop(job.task_id, None) is None:  # a deferred job is not counted
            self._queued[key] -= 1
        job.state = RecordState.CANCELLED

    def _head(self, key: _Key) -> tuple[int, int, str] | None:
        """The most urgent live entry of ``key``'s queue (dropping dead ones)."""
        heap = self._queues[key]
        while heap:
            _, seq, task_id = heap[0]
            job = self.jobs.get(task_id)
            if job is not None and job.state is RecordState.QUEUED and job.seq == seq:
                return heap[0]
            heapq.heappop(heap)
        del self._queues[key]
        self._queued.pop(key, None)
        self._unserved.discard(key)
        return None


def _role(env: Envelope) -> str | None:
    role = env.payload.get("role", env.role)
    return role if isinstance(role, str) else None
