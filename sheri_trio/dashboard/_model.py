"""The dashboard's model of a swarm: MQTT messages and wall-clock times in, state out.

No I/O, no trio, no clock: :meth:`SwarmModel.feed` takes ``(topic, payload, retain,
now)`` (``now`` in seconds since the epoch, so what the history keeps means the same
after a restart) and updates the agents, the tasks, the outcome rates and the errors
and alerts. What changed since the last look is kept apart twice, for the page
(:meth:`SwarmModel.take_changes`) and for the history (:meth:`SwarmModel.take_dirty`),
so each side batches at its own pace. ``sheri monitor`` shares :class:`AgentRow` and
:class:`TaskRow`.
"""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final

from ..swarm import (
    FINAL_STATES,
    ROLES,
    BadMessage,
    RetryRefused,
    Topics,
    check_task_id,
    decode_envelope,
    parse_task,
    roles_for,
)
from ..swarm import retry_submission as swarm_retry_submission

__all__ = [
    "SETTLED",
    "AgentRow",
    "Alert",
    "RetryNotAllowed",
    "SubmitError",
    "SwarmModel",
    "TaskRow",
    "retry_submission",
    "submission_from_form",
]

#: final states a later attempt's claim or state still replaces (released: taken again)
SETTLED: Final = FINAL_STATES - {"released"}
#: states of a task nobody holds yet
WAITING: Final = frozenset({"new", "queued", "pending"})
#: outcome buckets kept for the rates chart: one per second
RATE_SECONDS: Final = 600
#: progress events kept per task
MAX_EVENTS: Final = 50
#: an agent silent this long (no heartbeat) is raised as an alert
SILENT_AFTER: Final = 30.0
#: at most one no-agent alert per set of roles this often (a burst would flood them)
NO_AGENT_EVERY: Final = 60.0


@dataclass(slots=True)
class AgentRow:
    """One agent as seen from its presence messages."""

    agent_id: str
    role: str | None = None
    status: str = "?"
    last_seen: float | None = None  # when its last register/heartbeat came (the viewer's clock)
    running: int | None = None
    capacity: int | None = None  # max_tasks (register, heartbeat; 0 while leaving)
    queued: int | None = None  # tasks in its own claim queue (heartbeat)
    running_ids: list[str] = field(default_factory=list)
    reason: str | None = None  # why it is offline, when it said

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _AGENT_FIELDS}


@dataclass(slots=True)
class TaskRow:
    """One task as seen from the messages about it."""

    task_id: str
    type: str | None = None
    state: str = "new"
    agent: str | None = None
    attempt: int = 0
    started: float | None = None  # when the winning claim came
    duration_ms: float | None = None
    error: str | None = None
    # the dashboard's
    role: str | None = None  # the holder's role
    reason: str | None = None  # a failure's reason (error, timeout, cancelled, ...)
    submitted: float | None = None  # when it was first seen
    running_since: float | None = None  # when the holder started it (claim-to-start)
    finished: float | None = None
    updated: float = 0.0
    tries: int = 0
    retries: int = 0  # retrying events seen
    result: Any = None
    submission: dict[str, Any] | None = None
    retry_of: str | None = None
    retried_as: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    closed: bool = False  # its outcome (tasks/complete or tasks/failed) was seen

    def summary(self) -> dict[str, Any]:
        """What the task list shows (no events, result or submission)."""
        return {
            "task_id": self.task_id,
            "type": self.type,
            "state": self.state,
            "agent": self.agent,
            "role": self.role,
            "attempt": self.attempt,
            "reason": self.reason,
            "error": self.error,
            "submitted": self.submitted,
            "started": self.started,
            "finished": self.finished,
            "duration_ms": self.duration_ms,
            "updated": self.updated,
            "retry_of": self.retry_of,
        }

    def to_json(self) -> dict[str, Any]:
        """Every field (shallow: ``asdict`` deep-copies, ~50x slower for a history row)."""
        return {name: getattr(self, name) for name in _TASK_FIELDS}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskRow:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


_AGENT_FIELDS: Final = tuple(f.name for f in fields(AgentRow))
_TASK_FIELDS: Final = tuple(f.name for f in fields(TaskRow))


@dataclass(frozen=True, slots=True)
class Alert:
    """An error report from the swarm, or something the dashboard noticed."""

    at: float
    kind: str  # "error" ({swarm}/errors), "agent-offline", "agent-silent", "no-agent"
    message: str
    agent_id: str | None = None
    task_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class SubmitError(ValueError):
    """A task from the page that the swarm would refuse: nothing is published."""


class RetryNotAllowed(SubmitError):
    """The task is known but may not be retried (it did not fail, or its submission
    was not kept): the swarm's rule, :class:`sheri_trio.swarm.RetryRefused`."""


class SwarmModel:
    """What the dashboard knows about one swarm."""

    def __init__(
        self,
        topics: Topics,
        *,
        max_tasks: int = 10_000,
        max_alerts: int = 500,
        max_agents: int = 10_000,
    ) -> None:
        self.topics = topics
        #: every agent heard of, first heard of first; beyond ``max_agents`` the agents
        #: not online are forgotten, the earliest first (the history keeps them): a
        #: swarm whose agents come and go under new ids does not grow the dashboard
        self.agents: dict[str, AgentRow] = {}
        self.max_agents = max_agents
        self.tasks: OrderedDict[str, TaskRow] = OrderedDict()
        self.max_tasks = max_tasks
        self.alerts: deque[Alert] = deque(maxlen=max_alerts)
        self.messages = 0
        self.refused = 0  # messages that were not envelopes
        #: per second (int(now)): [submitted, completed, failed]
        self.rates: OrderedDict[int, list[int]] = OrderedDict()
        #: for /metrics: outcome counters by (outcome, type), and more
        self.outcomes: dict[tuple[str, str], int] = {}
        self.takeovers = 0
        self.errors = 0
        self.claim_to_start: list[float] = []  # seconds, drained by the metrics
        #: the dispatcher's retained dispatch/view, when there is one
        self.dispatch_view: dict[str, Any] | None = None
        self._page_tasks: set[str] = set()
        self._page_agents: set[str] = set()
        self._page_alerts: list[Alert] = []
        self._dirty_tasks: set[str] = set()
        self._dirty_agents: set[str] = set()
        self._forgotten_dirty: list[AgentRow] = []  # forgotten before the history wrote them
        self._dirty_alerts: list[Alert] = []
        self._silent: set[str] = set()
        self._online: dict[str, int] | None = None
        self._no_agent: dict[tuple[str, ...], float] = {}  # roles -> its latest alert

    # ---------------------------------------------------------------- changes
    def take_changes(self) -> dict[str, Any] | None:
        """What changed for the page since the last call (None: nothing)."""
        if not (self._page_tasks or self._page_agents or self._page_alerts):
            return None
        out = {
            "tasks": [self.tasks[t].summary() for t in self._page_tasks if t in self.tasks],
            "agents": [self.agents[a].to_json() for a in self._page_agents if a in self.agents],
            "alerts": [a.to_json() for a in self._page_alerts],
        }
        self._page_tasks.clear()
        self._page_agents.clear()
        self._page_alerts = []
        return out

    def take_dirty(self) -> tuple[list[TaskRow], list[AgentRow], list[Alert]]:
        """What the history has not written yet."""
        tasks = [self.tasks[t] for t in self._dirty_tasks if t in self.tasks]
        agents = self._forgotten_dirty + [
            self.agents[a] for a in self._dirty_agents if a in self.agents
        ]
        self._forgotten_dirty = []
        alerts = self._dirty_alerts
        self._dirty_tasks.clear()
        self._dirty_agents.clear()
        self._dirty_alerts = []
        return tasks, agents, alerts

    def _touch_task(self, row: TaskRow, now: float) -> None:
        row.updated = now
        self._page_tasks.add(row.task_id)
        self._dirty_tasks.add(row.task_id)

    def _touch_agent(self, row: AgentRow, was: tuple[str, str | None]) -> None:
        if (row.status, row.role) != was:
            self._online = None  # counted again when asked
        self._page_agents.add(row.agent_id)
        self._dirty_agents.add(row.agent_id)

    def _alert(self, alert: Alert) -> None:
        self.alerts.append(alert)
        self._page_alerts.append(alert)
        self._dirty_alerts.append(alert)

    # ------------------------------------------------------------- history in
    def restore(self, tasks: list[TaskRow], agents: list[AgentRow], alerts: list[Alert]) -> None:
        """What the history kept (tasks oldest first); nothing is marked changed. An
        agent last seen online is ``unknown`` until a message says more."""
        for row in tasks:
            self.tasks[row.task_id] = row
            self.tasks.move_to_end(row.task_id)
        self._trim()
        for agent in agents:
            if agent.status == "online":  # until its retained status or a heartbeat says
                agent.status, agent.reason = "unknown", "from the history"
            self.agents[agent.agent_id] = agent
        for _ in range(len(self.agents) - self.max_agents):
            if not self._forget_an_agent():
                break
        self._online = None
        self.alerts.extend(alerts)

    # ----------------------------------------------------------------- rows
    def _agent(self, agent_id: str) -> AgentRow:
        row = self.agents.get(agent_id)
        if row is None:
            row = self.agents[agent_id] = AgentRow(agent_id)
            if len(self.agents) > self.max_agents:
                self._forget_an_agent(but=agent_id)
        return row

    def _forget_an_agent(self, but: str | None = None) -> bool:
        """The earliest agent heard of that is not online, ``but`` that one (the one just
        heard of); none such: all are kept."""
        for agent_id, row in self.agents.items():
            if row.status != "online" and agent_id != but:
                del self.agents[agent_id]
                if agent_id in self._dirty_agents:  # the history still gets its last state
                    self._dirty_agents.discard(agent_id)
                    self._forgotten_dirty.append(row)
                self._silent.discard(agent_id)
                self._page_agents.discard(agent_id)
                self._online = None
                return True
        return False

    def _task(self, task_id: str, now: float) -> TaskRow:
        row = self.tasks.get(task_id)
        if row is None:
            row = self.tasks[task_id] = TaskRow(task_id, submitted=now)
            self._trim()
        return row

    def _trim(self) -> None:
        while len(self.tasks) > self.max_tasks:
            self.tasks.popitem(last=False)

    def _count(self, now: float, index: int) -> None:
        second = int(now)
        bucket = self.rates.get(second)
        if bucket is None:
            bucket = self.rates[second] = [0, 0, 0]
            while self.rates and next(iter(self.rates)) < second - RATE_SECONDS:
                self.rates.popitem(last=False)
        bucket[index] += 1

    # ---------------------------------------------------------------- feed
    def feed(self, topic: str, payload: bytes, retain: bool, now: float) -> None:
        """One message off ``{swarm}/#``. Anything unusable is counted and skipped."""
        try:
            env = decode_envelope(payload)
        except BadMessage:
            if payload:  # an empty retained message clears a topic: not a refusal
                self.refused += 1
            return
        self.messages += 1
        t, p = self.topics, env.payload
        agent_id = p.get("agent_id", env.agent_id)
        agent_id = agent_id if isinstance(agent_id, str) else None
        role = p.get("role", env.role)
        role = role if isinstance(role, str) else None
        status_of = t.status_agent_id(topic)
        if status_of is not None:
            self._on_status(status_of, p, role, now)
        elif topic in (t.agents_register, t.agents_heartbeat, t.agents_shutdown):
            if agent_id is not None:
                self._on_presence(topic, agent_id, role, p, now)
        elif topic == t.errors:
            self._on_error(p, now)
        elif topic == t.dispatch_view:
            self.dispatch_view = p
        else:
            task_id = p.get("task_id")
            if isinstance(task_id, str):
                try:
                    check_task_id(task_id)
                except BadMessage:
                    return
                self._on_task(topic, task_id, agent_id, role, p, retain, now)

    def _on_status(self, agent_id: str, p: dict[str, Any], role: str | None, now: float) -> None:
        row = self._agent(agent_id)
        before = (row.status, row.role)
        status = p.get("status")
        status = status if isinstance(status, str) else "?"
        was = row.status
        row.status = status
        row.role = role or row.role
        reason = p.get("reason")
        row.reason = str(reason) if reason and status != "online" else None
        if status == "offline":
            row.running, row.running_ids = 0, []
            if was == "online":
                why = f": {row.reason}" if row.reason else ""
                self._alert(
                    Alert(now, "agent-offline", f"agent {agent_id} went offline{why}", agent_id)
                )
        self._silent.discard(agent_id)
        self._touch_agent(row, before)

    def _on_presence(
        self, topic: str, agent_id: str, role: str | None, p: dict[str, Any], now: float
    ) -> None:
        t = self.topics
        row = self._agent(agent_id)
        before = (row.status, row.role)
        row.role = role or row.role
        if topic == t.agents_shutdown:
            row.status, row.running, row.running_ids = "offline", 0, []
            row.reason = "graceful shutdown"
        else:
            row.status, row.last_seen, row.reason = "online", now, None
            self._silent.discard(agent_id)
            for key, attr in (("max_tasks", "capacity"), ("capacity", "capacity")):
                value = p.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    setattr(row, attr, value)
            queued = p.get("queued")
            if isinstance(queued, int) and not isinstance(queued, bool):
                row.queued = queued
            running = p.get("running")
            if isinstance(running, list):
                row.running_ids = [r for r in running if isinstance(r, str)][:100]
            count = p.get("running_tasks")
            if isinstance(count, int) and not isinstance(count, bool):
                row.running = count
        self._touch_agent(row, before)

    def _on_error(self, p: dict[str, Any], now: float) -> None:
        self.errors += 1
        error = str(p.get("error", "?"))[:500]
        where = p.get("topic")
        by = p.get("reported_by")
        task_id = p.get("task_id")
        text = error + (f" (on {where})" if isinstance(where, str) else "")
        self._alert(
            Alert(
                now,
                "error",
                text,
                by if isinstance(by, str) else None,
                task_id if isinstance(task_id, str) else None,
            )
        )

    def _on_task(
        self,
        topic: str,
        task_id: str,
        agent_id: str | None,
        role: str | None,
        p: dict[str, Any],
        retain: bool,
        now: float,
    ) -> None:
        t = self.topics
        attempt = p.get("attempt", 1)
        attempt = attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 1
        if topic == t.tasks_new:
            self._on_new(task_id, p, now)
        elif topic == t.tasks_assigned:
            task = self._task(task_id, now)
            if attempt > task.attempt and task.state not in SETTLED:
                if attempt > 1:
                    self.takeovers += 1
                task.attempt, task.agent, task.role = attempt, agent_id, role
                task.state, task.started, task.running_since = "claimed", now, None
                self._touch_task(task, now)
        elif topic == t.task_state(task_id):
            self._on_state(task_id, agent_id, role, p, attempt, retain, now)
        elif topic == t.task_pending(task_id):
            task = self._task(task_id, now)
            if task.state in WAITING:
                task.state = "pending"
                self._keep_submission(task, p)
                self._touch_task(task, now)
        elif topic == t.tasks_progress:
            if task_id not in self.tasks:
                return  # progress of a task we never saw start
            self._on_progress(self.tasks[task_id], agent_id, role, p, attempt, now)
        elif topic in (t.tasks_complete, t.tasks_failed):
            self._on_outcome(task_id, agent_id, role, p, attempt, topic == t.tasks_complete, now)
        elif topic == t.tasks_released:
            task = self._task(task_id, now)
            if attempt == task.attempt and task.state not in SETTLED:
                task.state = "released"
                self._touch_task(task, now)

    def _keep_submission(self, task: TaskRow, submission: Any) -> None:
        if isinstance(submission, dict) and task.submission is None:
            task.submission = submission
            kind = submission.get("type")
            if isinstance(kind, str) and task.type is None:
                task.type = kind
            retry_of = submission.get("retry_of")
            if isinstance(retry_of, str):
                task.retry_of = retry_of
                original = self.tasks.get(retry_of)
                if original is not None and task.task_id not in original.retried_as:
                    original.retried_as.append(task.task_id)

    def _on_new(self, task_id: str, p: dict[str, Any], now: float) -> None:
        fresh = task_id not in self.tasks
        task = self._task(task_id, now)
        if fresh:
            self._count(now, 0)
        self._keep_submission(task, p)
        if task.state == "new" and task.submission is p:
            roles = roles_for(task.type or "")
            online = self.online_by_role()
            last = self._no_agent.get(roles)
            if (
                self.agents
                and not any(online.get(r) for r in roles)
                and (last is None or now - last >= NO_AGENT_EVERY)
            ):
                self._no_agent[roles] = now
                self._alert(
                    Alert(
                        now,
                        "no-agent",
                        f"task {task_id} ({task.type}): no online agent with role "
                        f"{' or '.join(roles)}",
                        task_id=task_id,
                    )
                )
        self._touch_task(task, now)

    def _on_state(
        self,
        task_id: str,
        agent_id: str | None,
        role: str | None,
        p: dict[str, Any],
        attempt: int,
        retain: bool,
        now: float,
    ) -> None:
        """A retained ``tasks/state/{id}``: the holder's (claimed, final) or the
        dispatcher's custody record (queued, assigned)."""
        task = self._task(task_id, now)
        self._keep_submission(task, p.get("task"))
        kind = p.get("type")
        if isinstance(kind, str):
            task.type = kind
        state = p.get("state")
        if not isinstance(state, str) or task.state in SETTLED or attempt < task.attempt:
            self._touch_task(task, now)
            return
        dispatcher = "dispatcher" in p
        if dispatcher and state in ("queued", "assigned"):
            if attempt >= task.attempt and task.state in WAITING | {"released", "assigned"}:
                task.state, task.attempt = state, max(attempt, task.attempt)
                if state == "assigned":
                    task.agent = agent_id
        else:
            task.attempt = attempt
            task.state = state
            if not dispatcher:
                task.agent = agent_id or task.agent
                task.role = role or task.role
            self._take_fields(task, p)
            if state in FINAL_STATES and state != "released":
                task.finished = task.finished or now
        self._touch_task(task, now)

    def _take_fields(self, task: TaskRow, p: dict[str, Any]) -> None:
        duration = p.get("duration")
        if isinstance(duration, int | float) and not isinstance(duration, bool):
            task.duration_ms = duration
        if p.get("error"):
            task.error = str(p["error"])[:4096]
        reason = p.get("reason")
        if isinstance(reason, str):
            task.reason = reason
        tries = p.get("try")
        if isinstance(tries, int) and not isinstance(tries, bool):
            task.tries = max(task.tries, tries)

    def _on_progress(
        self,
        task: TaskRow,
        agent_id: str | None,
        role: str | None,
        p: dict[str, Any],
        attempt: int,
        now: float,
    ) -> None:
        if attempt < task.attempt:
            return  # fenced off
        event = {
            k: v
            for k, v in p.items()
            if k in ("state", "previous", "event", "try", "message", "error", "delay", "reason")
        }
        event["at"] = now
        event["attempt"] = attempt
        event["agent_id"] = agent_id
        task.events.append(event)
        del task.events[:-MAX_EVENTS]
        kind = p.get("type")
        if isinstance(kind, str):
            task.type = kind
        state = p.get("state")
        if isinstance(state, str) and task.state not in SETTLED:
            if state == "running" and task.running_since is None:
                task.running_since = now
                if task.started is not None:
                    self.claim_to_start.append(max(now - task.started, 0.0))
                    del self.claim_to_start[:-10_000]
            if state == "retrying":
                task.retries += 1
            task.attempt = attempt
            task.state = state
            task.agent = agent_id or task.agent
            task.role = role or task.role
            self._take_fields(task, p)
        self._touch_task(task, now)

    def _on_outcome(
        self,
        task_id: str,
        agent_id: str | None,
        role: str | None,
        p: dict[str, Any],
        attempt: int,
        success: bool,
        now: float,
    ) -> None:
        task = self._task(task_id, now)
        if attempt < task.attempt or task.closed:
            return  # fenced off, or a duplicate
        task.closed = True
        task.attempt = attempt
        reason = p.get("reason")
        if success:
            task.state = "done"
        elif reason in ("cancelled", "expired"):
            task.state = str(reason)
        else:
            task.state = "failed"
        task.agent = agent_id or task.agent
        task.role = role or task.role
        kind = p.get("type")
        if isinstance(kind, str):
            task.type = kind
        self._take_fields(task, p)
        if task.duration_ms is None and task.started is not None:
            task.duration_ms = round((now - task.started) * 1000)
        if "result" in p:
            task.result = p["result"]
        task.finished = now
        outcome = "completed" if success else task.state
        key = (outcome, task.type or "?")
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        self._count(now, 1 if success else 2)
        self._touch_task(task, now)

    # ----------------------------------------------------------------- time
    def check(self, now: float) -> None:
        """Alerts that come from time passing: an online agent silent too long."""
        for row in self.agents.values():
            if (
                row.status == "online"
                and row.last_seen is not None
                and now - row.last_seen > SILENT_AFTER
                and row.agent_id not in self._silent
            ):
                self._silent.add(row.agent_id)
                self._alert(
                    Alert(
                        now,
                        "agent-silent",
                        f"agent {row.agent_id} has sent no heartbeat for "
                        f"{now - row.last_seen:.0f} s",
                        row.agent_id,
                    )
                )

    # -------------------------------------------------------------- queries
    def rate_series(self, now: float, seconds: int = 300) -> list[list[int]]:
        """``[second, submitted, completed, failed]`` for each of the last ``seconds``."""
        end = int(now)
        empty = [0, 0, 0]
        return [[s, *self.rates.get(s, empty)] for s in range(end - seconds + 1, end + 1)]

    def pending_by_role(self) -> dict[str, int]:
        """Tasks nobody holds yet, per role that may take them, from what we saw (the
        submissions, and in dispatcher mode the custody records, which change as the
        queue does). Not the dispatcher's ``dispatch/view``: it is published once per
        heartbeat interval, so its ``queued_by_role`` lags behind."""
        out = dict.fromkeys(ROLES, 0)
        for task in self.tasks.values():
            if task.state in WAITING or task.state == "released":
                for r in roles_for(task.type or ""):
                    out[r] += 1
        return out

    def online_by_role(self) -> dict[str, int]:
        """Agents online per role (counted again only after a presence message)."""
        if self._online is None:
            out = dict.fromkeys(ROLES, 0)
            for row in self.agents.values():
                if row.status == "online" and row.role in out:
                    out[row.role] += 1
            self._online = out
        return self._online

    def snapshot(self, now: float, *, max_tasks: int = 1000) -> dict[str, Any]:
        """Everything the page shows at once (the latest ``max_tasks`` tasks)."""
        recent = list(self.tasks.values())[-max_tasks:]
        return {
            "swarm": self.topics.swarm,
            "now": now,
            "agents": [a.to_json() for a in self.agents.values()],
            "tasks": [t.summary() for t in reversed(recent)],
            "alerts": [a.to_json() for a in list(self.alerts)[-100:]],
            "rates": self.rate_series(now),
            "pending": self.pending_by_role(),
            "known_tasks": len(self.tasks),
        }

    def detail(self, task_id: str) -> dict[str, Any] | None:
        task = self.tasks.get(task_id)
        if task is None:
            return None
        out = task.to_json()
        out["retry_chain"] = self._chain(task)
        return out

    def _chain(self, task: TaskRow) -> list[dict[str, Any]]:
        """The task's retries (and what it retried), with their states."""
        seen: list[dict[str, Any]] = []
        for other_id in ([task.retry_of] if task.retry_of else []) + task.retried_as:
            other = self.tasks.get(other_id)
            seen.append({"task_id": other_id, "state": other.state if other is not None else "?"})
        return seen


# ------------------------------------------------------------------- actions
def submission_from_form(form: Any) -> dict[str, Any]:
    """A ``tasks/new`` payload from the page's form (a JSON object), checked by the
    agents' own rules; :class:`SubmitError` says what is wrong."""
    if not isinstance(form, dict):
        raise SubmitError("the request must be a JSON object")
    task_type = form.get("type")
    if not isinstance(task_type, str) or not task_type.strip():
        raise SubmitError("type: a task type is needed, e.g. testing.run")
    payload: Any = form.get("payload", {})
    if isinstance(payload, str):
        text = payload.strip() or "{}"
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SubmitError(
                f"payload: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
    if not isinstance(payload, dict):
        raise SubmitError('payload: must be a JSON object such as {"service": "api"}')
    body: dict[str, Any] = {"type": task_type.strip(), "payload": payload}
    task_id = form.get("task_id")
    if isinstance(task_id, str) and task_id.strip():
        body["task_id"] = task_id.strip()
    else:
        body["task_id"] = f"task-{secrets.token_hex(6)}"
    priority = form.get("priority")
    body["priority"] = priority if priority not in (None, "") else "medium"
    for key in ("assigned_to", "max_retries", "timeout_s"):
        value = form.get(key)
        if value not in (None, ""):
            body[key] = value
    try:
        parse_task(body)
    except BadMessage as exc:
        raise SubmitError(exc.reason) from None
    return body


def retry_submission(model: SwarmModel, task_id: str) -> dict[str, Any]:
    """The submission that retries ``task_id``: the swarm's rule
    (:func:`sheri_trio.swarm.retry_submission`, as ``sheri retry`` applies it: only a
    failed task, as ``{task_id}.retry-{n}`` with ``retry_of``; the old outcome stays),
    applied to what the dashboard saw of the task.

    The original submission comes from ``tasks/new``, the retained states (which carry
    it) or a pending marker.
    """
    task = model.tasks.get(task_id)
    if task is None:
        raise SubmitError(f"unknown task {task_id}")
    record = {
        "task_id": task_id,
        "state": task.state,
        "agent_id": task.agent,
        "task": task.submission,
    }
    try:
        body = swarm_retry_submission(record, taken=model.tasks)
    except RetryRefused as exc:
        raise RetryNotAllowed(str(exc)) from None
    try:
        parse_task(body)
    except BadMessage as exc:
        raise SubmitError(f"the retry of {task_id}: {exc.reason}") from None
    return body
