"""The swarm's wire protocol: topics, the message envelope, and validation.

Everything that arrives from the network is untrusted. ``decode_envelope`` and the
``parse_*`` functions accept exactly what the prototype sent (and what a human types
into ``mosquitto_pub``) and refuse everything else with a :class:`BadMessage` that says
why. Nothing here does I/O or reads a clock: the outgoing side (envelopes, timestamps,
message ids) is :mod:`._messages`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson

PROTOCOL_VERSION: Final = 1
DEFAULT_SWARM: Final = "opencto-dev"
MAX_MESSAGE_BYTES: Final = 256 * 1024
TASK_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
AGENT_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
SWARM_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}(/[A-Za-z0-9._-]{1,64}){0,3}")
TYPE_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")

ROLES: Final = (
    "general",
    "deployment",
    "testing",
    "review",
    "security",
    "monitoring",
    "documentation",
    "database",
)

#: task type -> the roles that may take it (the prototype's table); others -> general.
TASK_ROLES: Final[dict[str, tuple[str, ...]]] = {
    "code.review": ("review", "general"),
    "code.generate": ("general",),
    "deployment.deploy": ("deployment",),
    "deployment.rollback": ("deployment",),
    "testing.run": ("testing",),
    "testing.coverage": ("testing",),
    "security.scan": ("security", "review"),
    "security.audit": ("security",),
    "monitoring.health": ("monitoring",),
    "monitoring.alerts": ("monitoring",),
    "documentation.generate": ("documentation", "general"),
    "database.migrate": ("database",),
    "database.backup": ("database",),
}

#: advertised at register, as in the prototype.
CAPABILITIES: Final[dict[str, tuple[str, ...]]] = {
    "general": ("code-generation", "chat"),
    "deployment": ("deploy", "cloudflare-workers", "docker"),
    "testing": ("test-runner", "coverage", "integration-tests"),
    "review": ("code-review", "linting", "security-scan"),
    "security": ("vulnerability-scan", "dependency-check", "compliance"),
    "monitoring": ("health-check", "metrics", "alerts"),
    "documentation": ("docs-generation", "api-docs", "readme"),
    "database": ("migrations", "backups", "optimization"),
}

PRIORITIES: Final = {"high": 0, "medium": 1, "low": 2}


def roles_for(task_type: str) -> tuple[str, ...]:
    return TASK_ROLES.get(task_type, ("general",))


def task_types_for(role: str) -> list[str]:
    return [t for t, roles in TASK_ROLES.items() if role in roles]


class BadMessage(ValueError):
    """An incoming message we refuse; ``task_id`` is set when one could be read."""

    def __init__(self, reason: str, *, task_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.task_id = task_id


class Topics:
    """Every topic of one swarm. Topic names are built here and nowhere else."""

    def __init__(self, swarm: str = DEFAULT_SWARM) -> None:
        if not SWARM_RE.fullmatch(swarm):
            raise ValueError(
                f"invalid swarm name {swarm!r}: use 1-4 levels of letters, digits, '.', '_', '-'"
            )
        self.swarm = swarm
        p = swarm + "/"
        self.tasks_new = p + "tasks/new"
        self.tasks_assigned = p + "tasks/assigned"
        self.tasks_complete = p + "tasks/complete"
        self.tasks_failed = p + "tasks/failed"
        self.tasks_progress = p + "tasks/progress"
        self.tasks_cancel = p + "tasks/cancel"
        self.tasks_cancel_reply = p + "tasks/cancel/reply"
        self.tasks_released = p + "tasks/released"
        self.tasks_state_all = p + "tasks/state/+"
        self.tasks_pending_all = p + "tasks/pending/+"
        self.agents_register = p + "agents/register"
        self.agents_heartbeat = p + "agents/heartbeat"
        self.agents_shutdown = p + "agents/shutdown"
        self.agents_status_all = p + "agents/+/status"
        self.dispatch_status = p + "dispatch/status"
        self.dispatch_view = p + "dispatch/view"
        #: what the election's candidates follow: dispatch/status, in a filter of its own
        #: (docs/dispatch.md, "The election")
        self.statuses_one_level = p + "+/status"
        self.broadcast = p + "broadcast"
        self.errors = p + "errors"
        self.all = p + "#"

    def task_state(self, task_id: str) -> str:
        return f"{self.swarm}/tasks/state/{task_id}"

    def task_pending(self, task_id: str) -> str:
        return f"{self.swarm}/tasks/pending/{task_id}"

    def agent_status(self, agent_id: str) -> str:
        return f"{self.swarm}/agents/{agent_id}/status"

    def agent_inbox(self, agent_id: str) -> str:
        """An agent's inbox: the dispatcher's assignments, revocations and cancels."""
        return f"{self.swarm}/agents/{agent_id}/inbox"

    def status_agent_id(self, topic: str) -> str | None:
        """The agent id in ``{swarm}/agents/{id}/status``, if the topic is one."""
        prefix = self.swarm + "/agents/"
        if topic.startswith(prefix) and topic.endswith("/status"):
            agent_id = topic[len(prefix) : -len("/status")]
            if AGENT_ID_RE.fullmatch(agent_id):
                return agent_id
        return None

    def sync_marker(self, owner: str, nonce: str) -> str:
        """A private topic whose marker, published after subscribing, comes back once
        the broker has sent a subscription's retained messages (``owner``: an agent id,
        or ``cli``)."""
        return f"{self.swarm}/agents/{owner}/sync/{nonce}"


#: orjson options of every envelope: int keys become strings, as with json
JSON_OPTIONS: Final = orjson.OPT_NON_STR_KEYS


def parse_iso(value: str) -> datetime:
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt


@dataclass(frozen=True, slots=True)
class Envelope:
    """``{id, timestamp, agent_id, role, payload, v}`` around every message."""

    id: str
    timestamp: str
    payload: dict[str, Any]
    agent_id: str | None = None
    role: str | None = None
    version: int = 0  # 0: the prototype's messages carry no version


def decode_envelope(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Envelope:
    """Parse an envelope from untrusted bytes, or raise BadMessage saying why."""
    if len(data) > max_bytes:
        raise BadMessage(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadMessage("message is not UTF-8") from None
        raise BadMessage(f"message is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadMessage(f"message must be a JSON object, not {type(obj).__name__}")
    payload = obj.get("payload")
    if not isinstance(payload, dict):
        task_id = _maybe_task_id(obj)
        raise BadMessage("message has no 'payload' object", task_id=task_id)
    msg_id = obj.get("id", "")
    if not isinstance(msg_id, str | int) or isinstance(msg_id, bool):
        raise BadMessage("'id' must be a string", task_id=_maybe_task_id(payload))
    timestamp = obj.get("timestamp", "")
    if not isinstance(timestamp, str):
        raise BadMessage("'timestamp' must be an ISO-8601 string", task_id=_maybe_task_id(payload))
    agent_id = obj.get("agent_id")
    if agent_id is not None and (
        not isinstance(agent_id, str) or not AGENT_ID_RE.fullmatch(agent_id)
    ):
        raise BadMessage("'agent_id' is not a valid agent id", task_id=_maybe_task_id(payload))
    role = obj.get("role")
    if role is not None and not isinstance(role, str):
        raise BadMessage("'role' must be a string", task_id=_maybe_task_id(payload))
    version = obj.get("v", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise BadMessage("'v' must be a non-negative integer", task_id=_maybe_task_id(payload))
    return Envelope(str(msg_id), timestamp, payload, agent_id, role, version)


def _maybe_task_id(obj: Any) -> str | None:
    if isinstance(obj, dict):
        value = obj.get("task_id")
        if isinstance(value, str) and TASK_ID_RE.fullmatch(value):
            return value
        inner = obj.get("payload")
        if isinstance(inner, dict):
            value = inner.get("task_id")
            if isinstance(value, str) and TASK_ID_RE.fullmatch(value):
                return value
    return None


def check_task_id(value: Any) -> str:
    if not isinstance(value, str):
        raise BadMessage("'task_id' must be a string")
    if not TASK_ID_RE.fullmatch(value):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise BadMessage(
            f"'task_id' {shown!r} is not allowed: use 1-128 of letters, digits, '.', '_', '-'"
        )
    return value


@dataclass(slots=True)
class TaskSpec:
    """A task as submitted on ``tasks/new``."""

    task_id: str
    type: str
    payload: Any
    priority: str = "medium"
    assigned_to: str | None = None
    max_retries: int = 3
    timeout_s: float | None = None
    expires_at: datetime | None = None
    submitted_by: str | None = None
    #: the task this one retries (``sheri retry``: ``{retry_of}.retry-{n}``)
    retry_of: str | None = None
    received_at: float = 0.0  # trio time, set by the agent
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return PRIORITIES[self.priority]

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task_id": self.task_id,
            "type": self.type,
            "payload": self.payload,
            "priority": self.priority,
        }
        if self.assigned_to is not None:
            out["assigned_to"] = self.assigned_to
        out["max_retries"] = self.max_retries
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        if self.expires_at is not None:
            out["expires_at"] = self.expires_at.isoformat()
        if self.retry_of is not None:
            out["retry_of"] = self.retry_of
        return out


def parse_task(payload: dict[str, Any], *, default_max_retries: int = 3) -> TaskSpec:
    """Validate a ``tasks/new`` payload (the envelope's ``payload``)."""
    task_id = check_task_id(payload.get("task_id"))
    task_type = payload.get("type")
    if not isinstance(task_type, str) or not TYPE_RE.fullmatch(task_type):
        raise BadMessage("'type' must be a task type such as 'testing.run'", task_id=task_id)
    priority = payload.get("priority", "medium")
    if priority is None:
        priority = "medium"
    if not isinstance(priority, str) or priority not in PRIORITIES:
        raise BadMessage("'priority' must be 'low', 'medium' or 'high'", task_id=task_id)
    assigned_to = payload.get("assigned_to")
    if assigned_to is not None and (
        not isinstance(assigned_to, str) or not AGENT_ID_RE.fullmatch(assigned_to)
    ):
        raise BadMessage("'assigned_to' must be an agent id", task_id=task_id)
    max_retries = payload.get("max_retries", default_max_retries)
    if (
        not isinstance(max_retries, int)
        or isinstance(max_retries, bool)
        or not 0 <= max_retries <= 100
    ):
        raise BadMessage("'max_retries' must be an integer within 0..100", task_id=task_id)
    timeout_s = payload.get("timeout_s")
    if timeout_s is not None and (
        not isinstance(timeout_s, int | float)
        or isinstance(timeout_s, bool)
        or not 0 < timeout_s <= 86400
    ):
        raise BadMessage(
            "'timeout_s' must be a number of seconds within (0, 86400]", task_id=task_id
        )
    expires_at = payload.get("expires_at")
    expires: datetime | None = None
    if expires_at is not None:
        if not isinstance(expires_at, str):
            raise BadMessage("'expires_at' must be an ISO-8601 string", task_id=task_id)
        try:
            expires = parse_iso(expires_at)
        except ValueError:
            raise BadMessage("'expires_at' is not an ISO-8601 time", task_id=task_id) from None
    retry_of = payload.get("retry_of")
    if retry_of is not None and (
        not isinstance(retry_of, str) or not TASK_ID_RE.fullmatch(retry_of)
    ):
        raise BadMessage("'retry_of' must be a task id", task_id=task_id)
    return TaskSpec(
        task_id=task_id,
        type=task_type,
        payload=payload.get("payload", {}),
        priority=priority,
        assigned_to=assigned_to,
        max_retries=max_retries,
        timeout_s=float(timeout_s) if timeout_s is not None else None,
        expires_at=expires,
        retry_of=retry_of,
    )


@dataclass(frozen=True, slots=True)
class Claim:
    task_id: str
    agent_id: str
    attempt: int
    role: str | None


def parse_claim(env: Envelope) -> Claim:
    p = env.payload
    task_id = check_task_id(p.get("task_id"))
    agent_id = p.get("agent_id", env.agent_id)
    if not isinstance(agent_id, str) or not AGENT_ID_RE.fullmatch(agent_id):
        raise BadMessage("claim without a valid 'agent_id'", task_id=task_id)
    attempt = p.get("attempt", 1)
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise BadMessage("'attempt' must be a positive integer", task_id=task_id)
    role = p.get("role", env.role)
    return Claim(task_id, agent_id, attempt, role if isinstance(role, str) else None)


@dataclass(frozen=True, slots=True)
class Outcome:
    """A final outcome seen on ``tasks/complete`` or ``tasks/failed``."""

    task_id: str
    agent_id: str | None
    attempt: int
    success: bool
    payload: dict[str, Any]


def parse_outcome(env: Envelope, *, success: bool) -> Outcome:
    p = env.payload
    task_id = check_task_id(p.get("task_id"))
    attempt = p.get("attempt", 1)
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise BadMessage("'attempt' must be a positive integer", task_id=task_id)
    agent_id = p.get("agent_id", env.agent_id)
    return Outcome(task_id, agent_id if isinstance(agent_id, str) else None, attempt, success, p)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """A ``tasks/cancel``: the task, and the requester's id for the replies (None: the
    prototype's ``{task_id}``, which nobody answers)."""

    task_id: str
    request_id: str | None = None


def parse_cancel(env: Envelope) -> CancelRequest:
    p = env.payload
    task_id = check_task_id(p.get("task_id"))
    request_id = p.get("request_id")
    if request_id is not None and (
        not isinstance(request_id, str) or not REQUEST_ID_RE.fullmatch(request_id)
    ):
        raise BadMessage(
            "'request_id' must be 1-64 of letters, digits, '.', '_', '-'", task_id=task_id
        )
    return CancelRequest(task_id, request_id)
