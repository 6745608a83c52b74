"""One agent: presence, intake, claiming, a nursery of tasks, graceful shutdown.

The agent talks to the broker only through a :class:`~sheri_trio.mqtt.Client`, so the
same code runs on the real client and, in unit tests, on the in-memory bus of
:mod:`sheri_trio.testing`. Every background loop lives in the agent's nursery; every
task runs in the agent's task nursery under a :class:`trio.CapacityLimiter`.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import os
import random
import secrets
from collections import deque
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import trio

from ..executors import (
    ExecutorRegistry,
    TaskConfigError,
    TaskContext,
    TaskPayloadError,
    default_registry,
)
from ..executors._workspace import agent_state_dir
from ..mqtt import (
    Client,
    ClientClosed,
    Message,
    MQTTError,
    Subscription,
)
from ._claims import ClaimBook, ClaimVerdict
from ._lifecycle import Lifecycle, StateChange, TaskRecord
from ._protocol import (
    CAPABILITIES,
    DEFAULT_SWARM,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    ROLES,
    BadMessage,
    Envelope,
    TaskSpec,
    Topics,
    decode_envelope,
    encode,
    now_iso,
    parse_claim,
    parse_outcome,
    parse_task,
    roles_for,
    task_types_for,
)
from ._startup import (
    Startup,
    StartupStep,
    agent_connection,
    check_duplicate,
    read_retained,
    startup_timeout,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

__all__ = ["Agent", "AgentConfig", "new_agent_id", "run_agent"]

log = logging.getLogger("sheri_trio.agent")

INVALID_TASK_TYPE = "__invalid__"


def new_agent_id() -> str:
    return f"sheri-ml-{secrets.token_hex(4)}"


@dataclass(slots=True)
class AgentConfig:
    role: str = "general"
    agent_id: str = field(default_factory=new_agent_id)
    swarm: str = DEFAULT_SWARM
    broker: str = "mqtt://localhost:1883"
    max_tasks: int = 4
    queue_limit: int = 1000
    overflow_limit: int = 100_000
    #: how many later submissions may go before a task this agent does not rank first for
    #: (rendezvous hashing; 0: plain arrival order)
    preference_window: int = 256
    heartbeat_interval: float = 10.0
    lease_time: float = 30.0
    grace_period: float = 10.0
    max_retries: int = 3
    retry_initial_delay: float = 1.0
    retry_max_delay: float = 60.0
    default_timeout: float | None = 600.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_result_bytes: int = 64 * 1024
    state_retention: int = 86_400
    session_expiry: int = 3600
    keep_alive: int = 30
    #: the bound of each start-up step (None: the client's connect_timeout)
    startup_timeout: float | None = None
    check_duplicate: bool = True
    client_options: dict[str, Any] = field(default_factory=dict)
    executor_config: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}: choose one of {', '.join(ROLES)}")
        Topics(self.swarm)  # validates the name
        from ._protocol import AGENT_ID_RE

        if not AGENT_ID_RE.fullmatch(self.agent_id):
            raise ValueError(
                f"invalid agent id {self.agent_id!r}: 1-128 of letters, digits, '.', '_', '-'"
            )
        if self.max_tasks < 1:
            raise ValueError("max_tasks must be at least 1")
        if self.heartbeat_interval <= 0 or self.lease_time <= self.heartbeat_interval:
            raise ValueError("lease_time must be longer than heartbeat_interval (> 0)")


@dataclass(slots=True)
class Peer:
    role: str | None
    online: bool
    last_seen: float


@dataclass(slots=True)
class _Running:
    spec: TaskSpec
    record: TaskRecord
    scope: trio.CancelScope
    stop_reason: str | None = None  # "cancel", "release" or "fenced"


class Agent:
    """An agent of one role in one swarm, over an already connected client."""

    def __init__(
        self,
        config: AgentConfig,
        client: Client,
        *,
        executors: ExecutorRegistry | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.client = client
        self.agent_id = config.agent_id
        self.role = config.role
        self.topics = Topics(config.swarm)
        self.executors = executors or default_registry()
        self.book = ClaimBook()
        self.lifecycle = Lifecycle()
        self.limiter = trio.CapacityLimiter(config.max_tasks)
        self.peers: dict[str, Peer] = {}
        self.started_at = 0.0
        self.counters: dict[str, int] = {
            "received": 0,
            "claimed": 0,
            "won": 0,
            "lost": 0,
            "completed": 0,
            "failed": 0,
            "bad_messages": 0,
            "released": 0,
        }
        #: final outcomes seen in the swarm (ours included), for monitoring.alerts
        self.swarm_outcomes: dict[str, int] = {"completed": 0, "failed": 0}
        self._specs: dict[str, TaskSpec] = {}  # eligible tasks we know, until final
        self._candidates: dict[str, int] = {}  # task_id -> attempt we would claim
        self._overflow: deque[tuple[str, int]] = deque()  # beyond queue_limit, in order
        self._cand_ranks: dict[str, int] = {}
        self._rank_counts = [0, 0, 0]  # candidates per priority rank (high, medium, low)
        self._heap: list[tuple[int, int, int, str]] = []  # rank, order, seq, id
        self._seq = 0
        self._outstanding: dict[str, int] = {}  # our claims awaiting the broker's order
        self._running: dict[str, _Running] = {}
        self._starting: set[str] = set()  # won, not yet running: counts as busy
        self._unstarted: list[tuple[TaskSpec, int]] = []  # won during shutdown: to release
        self._markers: set[str] = set()  # tasks with a retained pending marker
        self._accepting = True
        self._claim_wakeup = trio.Event()
        self._shutdown = trio.Event()
        self._tasks_nursery: trio.Nursery | None = None
        self._idle = trio.Event()

    # ------------------------------------------------------------ public API
    def request_shutdown(self) -> None:
        """Begin a graceful shutdown (what SIGINT/SIGTERM do)."""
        self._shutdown.set()

    @property
    def running_tasks(self) -> list[str]:
        return list(self._running)

    def statistics(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "role": self.role,
            "running": len(self._running),
            "outstanding_claims": len(self._outstanding),
            "queued": len(self._candidates),
            "peers": sum(1 for p in self.peers.values() if p.online),
            **self.counters,
        }

    async def run(
        self,
        *,
        startup: Startup | None = None,
        task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe, load task states, announce (start-up steps, bounded by ``startup``'s
        scope if it has one), work until shutdown is requested, then leave cleanly."""
        startup = startup if startup is not None else Startup(self.agent_id)
        t = self.topics
        self.started_at = trio.current_time()
        filters = (
            t.tasks_new,
            t.tasks_assigned,
            t.tasks_complete,
            t.tasks_failed,
            t.tasks_released,
            t.tasks_cancel,
            t.tasks_pending_all,
            t.agents_status_all,
            t.agents_register,
            t.agents_heartbeat,
            t.agents_shutdown,
            t.broadcast,
        )
        async with trio.open_nursery() as root, AsyncExitStack() as stack:
            with startup.step(StartupStep.SUBSCRIBE):
                # One subscription for every topic: the broker's order is kept across them.
                messages = await stack.enter_async_context(self.client.subscribe(*filters, qos=1))
            with startup.step(StartupStep.LOAD_TASK_STATES):
                await self._load_task_states(progress=startup.renew)
            with startup.step(StartupStep.ANNOUNCE):
                await self._announce()
            root.start_soon(self._intake, messages)
            root.start_soon(self._heartbeat_loop)
            root.start_soon(self._lease_loop)
            root.start_soon(self._claimer)
            self._log(logging.INFO, "online", max_tasks=self.config.max_tasks)
            task_status.started(self)
            async with trio.open_nursery() as tasks:
                self._tasks_nursery = tasks
                await self._shutdown.wait()
                await self._drain(tasks)
            self._tasks_nursery = None
            await self._leave()
            root.cancel_scope.cancel()

    async def _load_task_states(self, progress: Callable[[], object] | None = None) -> None:
        """Read the retained task states once: finished ids (no re-runs) and held tasks
        whose holder may be gone (taken over when its lease runs out). ``progress`` is
        called on every message that arrives (see :func:`read_retained`)."""
        sync = f"{self.topics.swarm}/agents/{self.agent_id}/sync/{secrets.token_hex(4)}"
        now = trio.current_time()
        loaded = 0
        retained = await read_retained(
            self.client, sync, self.topics.tasks_state_all, progress=progress
        )
        for message in retained:
            try:
                self._adopt_state(decode_envelope(message.payload).payload, now)
                loaded += 1
            except BadMessage as exc:
                self._log(logging.DEBUG, "ignored task state", reason=exc.reason)
        if loaded:
            self._log(logging.INFO, "task states loaded", count=loaded, held=len(self._specs))

    def _adopt_state(self, p: dict[str, Any], now: float) -> None:
        from ._lifecycle import FINAL_STATES
        from ._protocol import Claim, check_task_id

        task_id = check_task_id(p.get("task_id"))
        state = p.get("state")
        if state in FINAL_STATES and state != "released":
            self.book.mark_finished(task_id, state == "done")
            return
        task = p.get("task")
        holder = p.get("agent_id")
        attempt = p.get("attempt", 1)
        if (
            not isinstance(task, dict)
            or not isinstance(holder, str)
            or not isinstance(attempt, int)
        ):
            return
        spec = parse_task(task)
        spec.received_at = now
        self.book.observe_claim(Claim(task_id, holder, attempt, None), now)
        if not self._eligible(spec):
            return
        self._specs[task_id] = spec
        if holder == self.agent_id:
            # held by an earlier life of this agent id, which is gone: run it again
            self._log(logging.WARNING, "resuming a task of our previous run", task_id=task_id)
            self._enqueue(spec, attempt + 1)

    # ------------------------------------------------------------ presence
    async def _announce(self) -> None:
        status = self._status_payload("online")
        await self._publish(self.topics.agent_status(self.agent_id), status, retain=True)
        await self._publish(
            self.topics.agents_register,
            {
                "agent_id": self.agent_id,
                "role": self.role,
                "status": "online",
                "capabilities": list(CAPABILITIES[self.role]),
                "task_types": task_types_for(self.role) + (["*"] if self.role == "general" else []),
                "timestamp": now_iso(),
                "version": _version(),
                "protocol": PROTOCOL_VERSION,
                "max_tasks": self.config.max_tasks,
            },
        )
        self.peers[self.agent_id] = Peer(self.role, True, trio.current_time())

    def _status_payload(self, status: str, reason: str | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "agent_id": self.agent_id,
            "role": self.role,
            "status": status,
            "timestamp": now_iso(),
            "version": _version(),
        }
        if reason:
            payload["reason"] = reason
        return payload

    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval
        next_beat = trio.current_time() + interval
        while True:
            await trio.sleep_until(next_beat)
            next_beat += interval
            await self._publish(
                self.topics.agents_heartbeat,
                {
                    "status": "alive",
                    "agent_id": self.agent_id,
                    "role": self.role,
                    "uptime": round(trio.current_time() - self.started_at, 3),
                    "memory": {"rss": _rss_bytes()},
                    "running": list(self._running),
                    "running_tasks": len(self._running),
                    "capacity": self.config.max_tasks,
                    "queued": len(self._candidates),
                },
                wait_ack=False,
            )

    def _on_presence(self, topic: str, env: Envelope) -> None:
        now = trio.current_time()
        t = self.topics
        p = env.payload
        agent_id = env.agent_id or (
            p.get("agent_id") if isinstance(p.get("agent_id"), str) else None
        )
        if topic == t.agents_heartbeat or topic == t.agents_register:
            if agent_id:
                role = p.get("role", env.role)
                self.peers[agent_id] = Peer(role if isinstance(role, str) else None, True, now)
        elif topic == t.agents_shutdown:
            if agent_id and agent_id in self.peers:
                self.peers[agent_id].online = False
                self._check_leases()
        else:
            status_of = t.status_agent_id(topic)
            if status_of is None:
                return
            status = p.get("status")
            role = p.get("role", env.role)
            peer = self.peers.get(status_of)
            online = status == "online"
            if peer is None:
                self.peers[status_of] = Peer(role if isinstance(role, str) else None, online, now)
            else:
                peer.online = online
                if online:
                    peer.last_seen = now
            if not online:
                self._check_leases()

    def _swarm_view(self) -> dict[str, Any]:
        """What this agent knows of the swarm (for monitoring.alerts)."""
        now = trio.current_time()
        return {
            "agents": [
                {
                    "agent_id": agent_id,
                    "role": peer.role,
                    "online": peer.online,
                    "last_seen_age": round(now - peer.last_seen, 3),
                }
                for agent_id, peer in self.peers.items()
                if agent_id != self.agent_id
            ],
            "outcomes": dict(self.swarm_outcomes),
        }

    def _online_ids(self) -> list[str]:
        return [a for a, p in self.peers.items() if p.online]

    def _is_reporter(self, spec: TaskSpec | None = None) -> bool:
        """One agent (the smallest online id we know) reports what belongs to nobody.

        With a task: the smallest online id among the agents that may take it (they
        are the ones that know it).
        """
        ids = self._online_ids()
        if spec is not None:
            roles = roles_for(spec.type)
            ids = [
                a
                for a in ids
                if (self.peers[a].role in roles or spec.type == INVALID_TASK_TYPE)
                and (spec.assigned_to is None or spec.assigned_to == a)
            ]
        return min(ids, default=self.agent_id) >= self.agent_id

    # -------------------------------------------------------------- intake
    async def _intake(self, messages: Subscription) -> None:
        # Take every message already delivered in one go: one scheduling round per
        # batch instead of one per message.
        while True:
            try:
                batch = [await messages.receive()]
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return  # the subscription ended: we are leaving
            try:
                while len(batch) < 512:
                    batch.append(messages.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                pass
            for message in batch:
                await self._handle(message)

    async def _handle(self, message: Message) -> None:
        t = self.topics
        topic = message.topic
        if not message.payload and topic.startswith(self.topics.swarm + "/tasks/pending/"):
            return  # a cleared marker
        try:
            env = decode_envelope(message.payload, max_bytes=self.config.max_message_bytes)
            if topic == t.tasks_new:
                await self._on_new(env, topic)
            elif topic == t.tasks_assigned:
                self._on_claim(env)
            elif topic == t.tasks_complete:
                self._on_outcome(env, success=True)
            elif topic == t.tasks_failed:
                self._on_outcome(env, success=False)
            elif topic == t.tasks_released:
                self._on_released(env)
            elif topic == t.tasks_cancel:
                await self._on_cancel(env)
            elif topic.startswith(t.swarm + "/tasks/pending/"):
                await self._on_new(env, topic, marker=True)
            elif topic == t.broadcast:
                self._log(logging.INFO, "broadcast", message=str(env.payload)[:200])
            else:
                self._on_presence(topic, env)
        except BadMessage as exc:
            await self._bad_message(topic, exc, message.payload)

    async def _bad_message(self, topic: str, exc: BadMessage, raw: bytes) -> None:
        self.counters["bad_messages"] += 1
        self._log(
            logging.WARNING, "refused message", topic=topic, reason=exc.reason, task_id=exc.task_id
        )
        if self._is_reporter() and topic != self.topics.errors:
            payload: dict[str, Any] = {
                "error": exc.reason,
                "topic": topic,
                "size": len(raw),
                "reported_by": self.agent_id,
            }
            if exc.task_id:
                payload["task_id"] = exc.task_id
            await self._publish(self.topics.errors, payload, wait_ack=False)

    async def _on_new(self, env: Envelope, topic: str, *, marker: bool = False) -> None:
        self.counters["received"] += 1
        try:
            spec = parse_task(env.payload, default_max_retries=self.config.max_retries)
        except BadMessage as exc:
            if exc.task_id is None:
                raise
            # A usable task id but invalid task fields: it is claimed like any task
            # (by any role) and fails once, so exactly one tasks/failed reports it.
            spec = TaskSpec(exc.task_id, INVALID_TASK_TYPE, env.payload, max_retries=0)
            spec.extra["invalid"] = exc.reason
            self._log(logging.WARNING, "invalid task", task_id=exc.task_id, reason=exc.reason)
        spec.submitted_by = env.agent_id
        spec.received_at = trio.current_time()
        task_id = spec.task_id
        if marker:
            self._markers.add(task_id)
        if self.book.is_finished(task_id):
            self._log(logging.INFO, "already finished: not run again", task_id=task_id)
            return
        if self.book.holder(task_id) is not None or task_id in self._specs:
            self._log(logging.DEBUG, "duplicate submission ignored", task_id=task_id)
            return
        if not self._eligible(spec):
            if not marker:
                await self._maybe_mark_pending(spec, env)
            self._log(logging.DEBUG, "skipped: not our role", task_id=task_id, type=spec.type)
            return
        self._specs[task_id] = spec
        self._enqueue(spec, attempt=1)

    def _eligible(self, spec: TaskSpec) -> bool:
        if spec.assigned_to is not None and spec.assigned_to != self.agent_id:
            return False
        if spec.type == INVALID_TASK_TYPE:
            return True
        return self.role in roles_for(spec.type)

    async def _maybe_mark_pending(self, spec: TaskSpec, env: Envelope) -> None:
        """Nobody online can take this task: keep it as a retained pending marker."""
        roles = roles_for(spec.type)
        for agent_id, peer in self.peers.items():
            if not peer.online:
                continue
            if spec.assigned_to is not None and agent_id != spec.assigned_to:
                continue
            if peer.role in roles:
                return  # someone eligible is online
        if not self._is_reporter():
            return
        self._log(
            logging.WARNING,
            "no eligible agent online: task kept as pending",
            task_id=spec.task_id,
            roles=",".join(roles),
        )
        await self._publish(
            self.topics.task_pending(spec.task_id),
            env.payload,
            retain=True,
            expiry=self.config.state_retention,
        )

    # ------------------------------------------------------------ claiming
    def _enqueue(self, spec: TaskSpec, attempt: int) -> None:
        """Make a task a candidate for our next free slot.

        The claim queue holds ``queue_limit`` tasks, most urgent first. Beyond that,
        tasks wait in an overflow list (bounded by ``overflow_limit``) and move up
        as the queue drains, so a burst is never silently dropped: every eligible
        agent keeps it until someone claims it.
        """
        task_id = spec.task_id
        if self._candidates.get(task_id, 0) >= attempt:
            return
        if len(self._candidates) >= self.config.queue_limit:
            if spec.rank >= self._worst_rank():
                self._overflow_push(task_id, attempt)
                return
            # more urgent than something queued: the least urgent, newest one waits instead
            worst = max(
                self._candidates, key=lambda t: (self._specs[t].rank, self._specs[t].received_at)
            )
            self._overflow_push(worst, self._cand_pop(worst) or attempt)
        if task_id not in self._candidates:
            self._rank_counts[spec.rank] += 1
            self._cand_ranks[task_id] = spec.rank
        self._candidates[task_id] = attempt
        self._seq += 1
        order = self._seq
        if self.config.preference_window and not self._preferred(spec):
            order += self.config.preference_window
        heapq.heappush(self._heap, (spec.rank, order, self._seq, task_id))
        if self._slots_free() <= 0 and log.isEnabledFor(logging.DEBUG):
            self._log(
                logging.DEBUG, "busy: task queued", task_id=task_id, queued=len(self._candidates)
            )
        self._wake_claimer()

    def _preferred(self, spec: TaskSpec) -> bool:
        """Whether we rank first for this task among the online agents that may take it
        (rendezvous hashing on task id and agent id: every agent computes the same answer).

        Within a priority, an agent claims its preferred tasks up to ``preference_window``
        submissions ahead of the others, so agents of one role draining the same burst
        take disjoint tasks instead of racing for the oldest one (claim conflicts stay
        correct, first claim wins, but become rare), while a task whose preferred agent
        is busy or gone waits at most that many newer submissions.
        """
        if spec.assigned_to is not None:
            return True
        roles = None if spec.type == INVALID_TASK_TYPE else roles_for(spec.type)
        task = spec.task_id + "/"
        mine = rendezvous_score(task + self.agent_id)
        for agent_id, peer in self.peers.items():
            if (
                peer.online
                and (roles is None or peer.role in roles)
                and agent_id != self.agent_id
                and rendezvous_score(task + agent_id) > mine
            ):
                return False
        return True

    def _worst_rank(self) -> int:
        counts = self._rank_counts
        return 2 if counts[2] else 1 if counts[1] else 0

    def _cand_pop(self, task_id: str) -> int | None:
        attempt = self._candidates.pop(task_id, None)
        if attempt is not None:
            self._rank_counts[self._cand_ranks.pop(task_id)] -= 1
        return attempt

    def _overflow_push(self, task_id: str, attempt: int) -> None:
        if len(self._overflow) >= self.config.overflow_limit:
            self._specs.pop(task_id, None)
            self._log(
                logging.ERROR,
                "queue and overflow full: leaving task to other agents",
                task_id=task_id,
                limit=self.config.overflow_limit,
            )
            return
        if not self._overflow:
            self._log(
                logging.WARNING,
                "busy: claim queue full, further tasks wait in overflow",
                queue_limit=self.config.queue_limit,
            )
        self._overflow.append((task_id, attempt))

    def _refill(self) -> None:
        """Move overflow tasks that nobody claimed meanwhile into the claim queue."""
        while self._overflow and len(self._candidates) < self.config.queue_limit:
            task_id, attempt = self._overflow.popleft()
            spec = self._specs.get(task_id)
            if (
                spec is None
                or self.book.is_finished(task_id)
                or self.book.attempt(task_id) >= attempt
            ):
                continue
            self._enqueue(spec, attempt)

    def _slots_free(self) -> int:
        busy = len(self._outstanding) + len(self._running) + len(self._starting)
        return self.config.max_tasks - busy

    def _wake_claimer(self) -> None:
        self._claim_wakeup.set()

    async def _claimer(self) -> None:
        while True:
            await self._claim_wakeup.wait()
            self._claim_wakeup = trio.Event()
            while self._accepting and self._heap and self._slots_free() > 0:
                task_id = heapq.heappop(self._heap)[3]
                if self._overflow:
                    self._refill()
                attempt = self._cand_pop(task_id)
                if attempt is None or task_id in self._outstanding or task_id in self._running:
                    continue
                if self.book.is_finished(task_id) or self.book.attempt(task_id) >= attempt:
                    continue  # someone else got there first
                self._outstanding[task_id] = attempt
                self.counters["claimed"] += 1
                await self._publish(
                    self.topics.tasks_assigned,
                    {
                        "task_id": task_id,
                        "agent_id": self.agent_id,
                        "role": self.role,
                        "claimed_at": now_iso(),
                        "attempt": attempt,
                    },
                    wait_ack=False,
                )

    def _on_claim(self, env: Envelope) -> None:
        claim = parse_claim(env)
        task_id = claim.task_id
        verdict = self.book.observe_claim(claim, trio.current_time())
        mine = claim.agent_id == self.agent_id
        ours = self._outstanding.get(task_id)
        if verdict is ClaimVerdict.WON:
            self._cand_pop(task_id)
            if mine and ours == claim.attempt:
                del self._outstanding[task_id]
                self.counters["won"] += 1
                spec = self._specs.get(task_id)
                if spec is None:
                    return
                if not self._accepting or self._tasks_nursery is None:
                    # won while shutting down: given straight back when we leave
                    self._unstarted.append((spec, claim.attempt))
                    return
                self._starting.add(task_id)  # holds its slot until _run_task registers it
                self._tasks_nursery.start_soon(self._run_task, spec, claim.attempt)
                return
            if ours is not None and ours <= claim.attempt:
                del self._outstanding[task_id]
                self.counters["lost"] += 1
                self._log(
                    logging.DEBUG, "skipped: lost the claim", task_id=task_id, winner=claim.agent_id
                )
                self._wake_claimer()
            running = self._running.get(task_id)
            if running is not None and running.record.attempt < claim.attempt:
                # We were presumed dead and the task was taken over: stop, say nothing.
                running.stop_reason = "fenced"
                running.scope.cancel()
        elif mine and ours == claim.attempt:
            del self._outstanding[task_id]
            self.counters["lost"] += 1
            self._wake_claimer()

    def _on_outcome(self, env: Envelope, *, success: bool) -> None:
        outcome = parse_outcome(env, success=success)
        if not self.book.observe_outcome(outcome):
            if outcome.agent_id == self.agent_id:
                self.swarm_outcomes["completed" if success else "failed"] += 1  # our own
            return
        self.swarm_outcomes["completed" if success else "failed"] += 1
        task_id = outcome.task_id
        self._forget(task_id)
        running = self._running.get(task_id)
        if running is not None and outcome.agent_id != self.agent_id:
            running.stop_reason = "fenced"
            running.scope.cancel()

    def _forget(self, task_id: str) -> None:
        self._specs.pop(task_id, None)
        self._cand_pop(task_id)
        if self._outstanding.pop(task_id, None) is not None:
            self._wake_claimer()

    def _on_released(self, env: Envelope) -> None:
        claim = parse_claim(env)  # same fields: task_id, agent_id, attempt
        if self.book.release(claim.task_id, claim.attempt):
            spec = self._specs.get(claim.task_id)
            if spec is not None and claim.agent_id != self.agent_id and self._accepting:
                self._log(logging.INFO, "task released: taking over", task_id=claim.task_id)
                self._enqueue(spec, claim.attempt + 1)

    async def _lease_loop(self) -> None:
        period = max(self.config.lease_time / 4, 0.01)
        while True:
            await trio.sleep(period)
            self._check_leases()

    def _check_leases(self) -> None:
        """Take over tasks whose holder is offline or silent for the lease time."""
        if not self._accepting:
            return
        now = trio.current_time()
        lease = self.config.lease_time
        for task_id, holder in list(self.book.holders.items()):
            if holder.agent_id == self.agent_id or task_id not in self._specs:
                continue
            peer = self.peers.get(holder.agent_id)
            last = max(holder.since, peer.last_seen if peer else 0.0)
            dead = (peer is not None and not peer.online) or now - last >= lease
            if dead and self._candidates.get(task_id, 0) <= holder.attempt:
                self._log(
                    logging.WARNING,
                    "holder lost: taking over",
                    task_id=task_id,
                    holder=holder.agent_id,
                    attempt=holder.attempt + 1,
                )
                self._enqueue(self._specs[task_id], holder.attempt + 1)

    async def _on_cancel(self, env: Envelope) -> None:
        from ._protocol import check_task_id

        task_id = check_task_id(env.payload.get("task_id"))
        running = self._running.get(task_id)
        if running is not None:
            running.stop_reason = "cancel"
            running.scope.cancel()
            return
        if task_id in self._specs and self.book.holder(task_id) is None:
            # Not claimed by anyone yet: it will never start. One agent says so.
            spec = self._specs[task_id]
            self._forget(task_id)
            self.book.mark_finished(task_id, False)
            if self._is_reporter(spec):
                await self._publish_failed(spec, 1, "cancelled before it started", "cancelled")

    # ------------------------------------------------------------- running
    async def _run_task(self, spec: TaskSpec, attempt: int) -> None:
        if not self._accepting:
            self._starting.discard(spec.task_id)
            await self._release_unstarted(spec, attempt)  # shutdown began before it started
            return
        record = self.lifecycle.add(spec.task_id, attempt)
        scope = trio.CancelScope()
        running = _Running(spec, record, scope)
        self._running[spec.task_id] = running
        self._starting.discard(spec.task_id)
        final_published = False
        try:
            with scope:
                final_published = await self._attempts(spec, record)
            if scope.cancelled_caught:
                final_published = await self._stopped(running)
        finally:
            if not final_published and not record.final and running.stop_reason is None:
                # cancelled from outside (agent killed): give it back if we still can
                with trio.move_on_after(2) as guard:
                    guard.shield = True
                    await self._release(running)
            self._running.pop(spec.task_id, None)
            self.lifecycle.remove(record)
            if not self._running and not self._starting:
                self._idle.set()
            self._wake_claimer()

    async def _attempts(self, spec: TaskSpec, record: TaskRecord) -> bool:
        await self._fire(record, "claim")
        if spec.type == INVALID_TASK_TYPE:
            reason = str(spec.extra.get("invalid", "invalid task"))
            await self._fire(record, "fail", error=reason)
            await self._publish_failed(
                spec, record.attempt, f"invalid task: {reason}", "invalid_task"
            )
            return True
        if spec.expires_at is not None and spec.expires_at <= datetime.now(UTC):
            await self._fire(record, "expire")
            await self._publish_failed(
                spec, record.attempt, "task expired before it started", "expired"
            )
            return True
        executor = self.executors.get(spec.type)
        if executor is None:
            await self._fire(record, "fail", error="no executor")
            await self._publish_failed(
                spec, record.attempt, f"no executor for task type {spec.type!r}", "unknown_type"
            )
            return True
        timeout = spec.timeout_s if spec.timeout_s is not None else self.config.default_timeout
        while True:
            record.tries += 1
            await self._fire(record, "start", try_number=record.tries)
            ctx = TaskContext(
                task_id=spec.task_id,
                type=spec.type,
                payload=spec.payload,
                agent_id=self.agent_id,
                role=self.role,
                attempt=record.attempt,
                try_number=record.tries,
                _progress=self._progress_fn(spec, record),
                config=self.config.executor_config,
                swarm=self._swarm_view() if spec.type == "monitoring.alerts" else None,
            )
            started = trio.current_time()
            error: str
            async with self.limiter:
                try:
                    with trio.fail_after(timeout if timeout else math.inf):
                        result = await executor(ctx)
                except TaskConfigError as exc:  # retrying cannot help: fail once, as it is
                    await self._fire(record, "fail", error=str(exc))
                    await self._publish_failed(spec, record.attempt, str(exc), "not_configured")
                    return True
                except TaskPayloadError as exc:
                    await self._fire(record, "fail", error=str(exc))
                    await self._publish_failed(
                        spec, record.attempt, f"invalid payload: {exc}", "invalid_payload"
                    )
                    return True
                except trio.TooSlowError:
                    error = f"timed out after {timeout:g} s"
                    await self._fire(record, "time_out", error=error)
                except Exception as exc:  # an executor failure is data, not a crash
                    error = f"{type(exc).__name__}: {exc}"
                    self._log(logging.WARNING, "attempt failed", task_id=spec.task_id, error=error)
                else:
                    duration_ms = round((trio.current_time() - started) * 1000)
                    await self._fire(record, "succeed", duration=duration_ms)
                    await self._publish_complete(spec, record.attempt, result, duration_ms)
                    return True
            if record.tries > spec.max_retries:
                reason = "timeout" if record.state == "timed_out" else "error"
                await self._fire(record, "fail", error=error)
                await self._publish_failed(
                    spec,
                    record.attempt,
                    f"{error} (after {record.tries} tries)",
                    reason,
                )
                return True
            delay = min(
                self.config.retry_max_delay,
                self.config.retry_initial_delay * 2 ** (record.tries - 1),
            ) * random.uniform(0.5, 1.0)
            delay = round(delay, 3)  # the delay we publish is the delay we sleep
            await self._fire(record, "retry", error=error, delay=delay)
            await trio.sleep(delay)

    async def _stopped(self, running: _Running) -> bool:
        """The task's scope was cancelled: say why, outside the cancelled scope."""
        record, spec = running.record, running.spec
        reason = running.stop_reason
        with trio.move_on_after(5) as guard:
            guard.shield = True
            if reason == "cancel":
                await self._fire(record, "cancel")
                await self._publish_failed(
                    spec, record.attempt, "cancelled by request", "cancelled"
                )
                return True
            if reason == "release":
                await self._release(running)
                return True
            if reason == "fenced":
                self._log(
                    logging.WARNING, "fenced: a newer attempt exists, stopped", task_id=spec.task_id
                )
                if not record.final:
                    await self._fire(record, "release", reason="fenced")
                return True
        return False

    async def _release_unstarted(self, spec: TaskSpec, attempt: int) -> None:
        """A claim we won after shutdown began: release it without running it."""
        self._log(logging.INFO, "won while shutting down: released", task_id=spec.task_id)
        await self._publish_released(spec.task_id, attempt)

    async def _release(self, running: _Running) -> None:
        record = running.record
        if record.final:
            return
        await self._fire(record, "release")
        await self._publish_released(record.task_id, record.attempt)

    async def _publish_released(self, task_id: str, attempt: int) -> None:
        """Give an attempt back: other eligible agents claim ``attempt + 1``."""
        self.counters["released"] += 1
        await self._publish(
            self.topics.tasks_released,
            {
                "task_id": task_id,
                "agent_id": self.agent_id,
                "role": self.role,
                "attempt": attempt,
                "released_at": now_iso(),
            },
            wait_ack=False,  # the client's close flushes it; a cancelled reader acks nothing
        )

    def _progress_fn(self, spec: TaskSpec, record: TaskRecord) -> Any:
        async def progress(message: str = "", **fields: Any) -> None:
            payload = {
                "task_id": spec.task_id,
                "agent_id": self.agent_id,
                "role": self.role,
                "attempt": record.attempt,
                "try": record.tries,
                "state": record.state,
                "message": message[:4096],
                **fields,
            }
            await self._publish(self.topics.tasks_progress, payload, wait_ack=False)

        return progress

    async def _fire(self, record: TaskRecord, trigger: str, **detail: Any) -> StateChange:
        change = Lifecycle.fire(record, trigger, **detail)
        record.changes.clear()
        self._log(logging.DEBUG, f"{change.source} -> {change.dest}", task_id=record.task_id)
        running = self._running.get(record.task_id)
        payload: dict[str, Any] = {
            "task_id": record.task_id,
            "agent_id": self.agent_id,
            "role": self.role,
            "type": running.spec.type if running is not None else None,
            "attempt": record.attempt,
            "try": record.tries,
            "state": change.dest,
            "previous": change.source,
            "event": change.trigger,
            "at": now_iso(),
            **{k: v for k, v in detail.items() if isinstance(v, str | int | float | bool)},
        }
        await self._publish(self.topics.tasks_progress, payload, wait_ack=False)
        if change.dest == "claimed" or record.final:
            if change.dest == "claimed" and running is not None:
                # newcomers read this retained state to take over from a dead holder
                payload["task"] = running.spec.to_wire()
            await self._publish(
                self.topics.task_state(record.task_id),
                payload,
                retain=True,
                expiry=self.config.state_retention,
                wait_ack=False,
            )
        return change

    async def _publish_complete(
        self, spec: TaskSpec, attempt: int, result: Any, duration_ms: int
    ) -> None:
        result = await self._bounded_result(spec.task_id, attempt, result)
        self.counters["completed"] += 1
        self.book.mark_finished(spec.task_id, True)
        self._forget(spec.task_id)
        await self._publish(
            self.topics.tasks_complete,
            {
                "task_id": spec.task_id,
                "agent_id": self.agent_id,
                "role": self.role,
                "status": "success",
                "type": spec.type,
                "result": result,
                "duration": duration_ms,
                "completed_at": now_iso(),
                "attempt": attempt,
            },
        )
        await self._clear_marker(spec.task_id)
        self._log(logging.INFO, "completed", task_id=spec.task_id, duration_ms=duration_ms)

    async def _publish_failed(self, spec: TaskSpec, attempt: int, error: str, reason: str) -> None:
        self.counters["failed"] += 1
        self.book.mark_finished(spec.task_id, False)
        self._forget(spec.task_id)
        await self._publish(
            self.topics.tasks_failed,
            {
                "task_id": spec.task_id,
                "agent_id": self.agent_id,
                "role": self.role,
                "status": "failed",
                "type": spec.type,
                "error": error[:4096],
                "reason": reason,
                "failed_at": now_iso(),
                "attempt": attempt,
            },
        )
        await self._clear_marker(spec.task_id)
        self._log(logging.WARNING, "failed", task_id=spec.task_id, reason=reason, error=error[:200])

    async def _clear_marker(self, task_id: str) -> None:
        if task_id in self._markers:
            self._markers.discard(task_id)
            await self.client.publish(self.topics.task_pending(task_id), b"", qos=1, retain=True)

    async def _bounded_result(self, task_id: str, attempt: int, result: Any) -> Any:
        """The result as published: whole up to ``max_result_bytes`` of JSON; beyond, a
        marker with its head, and the whole of it in ``<state_dir>/results/``."""
        try:
            data = orjson.dumps(result, default=str, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:
            return {"error": "result is not JSON-serialisable", "repr": repr(result)[:1000]}
        limit = self.config.max_result_bytes
        if len(data) <= limit:
            return result
        marker: dict[str, Any] = {
            "truncated": True,
            "size": len(data),
            "head": data[: max(limit - 400, 0)].decode("utf-8", errors="ignore"),
        }
        path = (
            agent_state_dir(self.config.executor_config, self.agent_id)
            / "results"
            / f"{task_id}.{attempt}.json"
        )
        try:
            await trio.to_thread.run_sync(_write_private, path, data)
            marker["stored"] = str(path)
        except OSError as exc:
            self._log(logging.ERROR, "cannot store the full result", task_id=task_id, error=exc)
        self._log(logging.WARNING, "result truncated", task_id=task_id, size=len(data), stored=path)
        return marker

    # ------------------------------------------------------------- shutdown
    async def _drain(self, tasks: trio.Nursery) -> None:
        """Stop taking tasks; let running ones finish within the grace period; release the rest."""
        self._accepting = False
        self._candidates.clear()
        self._cand_ranks.clear()
        self._rank_counts = [0, 0, 0]
        self._overflow.clear()
        self._heap.clear()
        self._log(logging.INFO, "shutting down", running=len(self._running))
        if self._running or self._starting:
            self._idle = trio.Event()
            with trio.move_on_after(self.config.grace_period):
                await self._idle.wait()
        for running in list(self._running.values()):
            running.stop_reason = "release"
            running.scope.cancel()

    async def _leave(self) -> None:
        with trio.move_on_after(5) as guard:
            guard.shield = True
            for spec, attempt in self._unstarted:
                await self._release_unstarted(spec, attempt)
            self._unstarted.clear()
            await self._publish(
                self.topics.agents_shutdown,
                {
                    "reason": "graceful",
                    "agent_id": self.agent_id,
                    "uptime": round(trio.current_time() - self.started_at, 3),
                },
                wait_ack=False,
            )
            await self._publish(
                self.topics.agent_status(self.agent_id),
                self._status_payload("offline", "shutdown"),
                retain=True,
                wait_ack=False,  # flushed by the client's close before DISCONNECT
            )
        self._log(logging.INFO, "offline")

    # --------------------------------------------------------------- helpers
    async def _publish(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        retain: bool = False,
        expiry: int | None = None,
        wait_ack: bool = True,
    ) -> None:
        data = encode(self.agent_id, self.role, payload)
        try:
            await self.client.publish(
                topic,
                data,
                qos=1,
                retain=retain,
                wait_ack=wait_ack,
                message_expiry_interval=expiry,
                content_type="application/json",
            )
        except ClientClosed:
            raise
        except MQTTError as exc:
            self._log(logging.ERROR, "publish failed", topic=topic, error=str(exc))

    def _log(self, level: int, event: str, **fields: Any) -> None:
        if not log.isEnabledFor(level):
            return
        parts = [f"agent={self.agent_id}"]
        for key, value in fields.items():
            if value is None:
                continue
            parts.append(f"{key}={value}")
        log.log(
            level,
            "%s %s",
            event,
            " ".join(parts),
            extra={
                "agent_id": self.agent_id,
                **{k: v for k, v in fields.items() if k == "task_id"},
            },
        )


def _version() -> str:
    from .. import __version__

    return __version__


def rendezvous_score(key: str) -> int:
    """The weight of ``"{task_id}/{agent_id}"`` in the claim preference (a real hash:
    crc32 is linear, so ids that differ in one character would all rank alike)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read (results may hold anything)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as f:
        f.write(data)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------ running one
async def run_agent(
    config: AgentConfig,
    *,
    executors: ExecutorRegistry | None = None,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Probe, connect, run one agent until ``shutdown`` is set (or it is cancelled), leave.

    Each start-up step is bounded by :func:`startup_timeout` (a :class:`StartupError`
    names the step). A ``shutdown`` set during start-up stops it there: this returns
    without calling ``task_status.started()``. Once online the agent leaves gracefully.
    """
    config.validate()
    startup = Startup(config.agent_id, startup_timeout(config))
    agent: Agent | None = None

    def leave() -> None:
        if agent is not None:
            agent.request_shutdown()

    async with startup.guard(shutdown, leave):
        if config.check_duplicate:
            with startup.step(StartupStep.PROBE):
                await check_duplicate(config)
        async with AsyncExitStack() as stack:
            with startup.step(StartupStep.CONNECT):
                client = await stack.enter_async_context(agent_connection(config, startup))
            agent = Agent(config, client, executors=executors)
            await agent.run(startup=startup, task_status=task_status)  # after a graceful exit
