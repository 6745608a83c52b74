"""The whole lifecycle of a task, as one ``transitions`` table (h11's "Rule 1").

One synchronous :class:`transitions.Machine` is built from the table and serves every
task of an agent: a task is tracked from when the agent wins its claim until it ends.
Records are not bound to the Machine with ``add_model`` (that attaches a method per
trigger and state to every record: ~9 % of the agent's CPU at 1,000 tasks/s). A trigger
is applied through :data:`_STEPS`, the Machine's events compiled at import into
``trigger -> source -> dest`` (the table has no conditions and one callback, which only
records the change): running each trigger through ``machine.events[trigger].trigger()``
cost ~20 us, three per no-op task, ~5 % of an agent's CPU. What happened is kept as a
:class:`StateChange`; nothing here does I/O. The agent reads the changes and publishes
them. An invalid trigger raises :class:`InvalidTransition`.

``docs/lifecycle.md`` holds a diagram generated from :data:`TRANSITIONS`
(``python -m sheri_trio.swarm._lifecycle``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from transitions import Machine

__all__ = [
    "FINAL_STATES",
    "STATES",
    "TRANSITIONS",
    "InvalidTransition",
    "Lifecycle",
    "StateChange",
    "TaskRecord",
]

STATES: Final = (
    "received",  # we won the claim; nothing has run yet
    "claimed",  # our claim is the first in the broker's order
    "running",  # an attempt is executing
    "retrying",  # an attempt failed; waiting for the backoff to pass
    "done",  # final: success
    "failed",  # final: out of retries, invalid payload, or not runnable
    "cancelled",  # final: a cancel request stopped it
    "timed_out",  # an attempt exceeded its timeout (then retrying or failed)
    "expired",  # final: its expires_at passed before it started
    "released",  # given back (graceful shutdown or lost lease); another agent may take it
)

FINAL_STATES: Final = frozenset({"done", "failed", "cancelled", "expired", "released"})

#: trigger, source(s), dest. The single source of truth for the task lifecycle.
TRANSITIONS: Final[list[dict[str, Any]]] = [
    {"trigger": "claim", "source": "received", "dest": "claimed"},
    {"trigger": "expire", "source": ["claimed", "retrying"], "dest": "expired"},
    {"trigger": "start", "source": ["claimed", "retrying"], "dest": "running"},
    {"trigger": "succeed", "source": "running", "dest": "done"},
    {"trigger": "fail", "source": ["claimed", "running", "timed_out"], "dest": "failed"},
    {"trigger": "time_out", "source": "running", "dest": "timed_out"},
    {"trigger": "retry", "source": ["running", "timed_out"], "dest": "retrying"},
    {"trigger": "cancel", "source": ["claimed", "running", "retrying"], "dest": "cancelled"},
    {"trigger": "release", "source": ["claimed", "running", "retrying"], "dest": "released"},
]


class InvalidTransition(RuntimeError):
    """A trigger that the lifecycle table does not allow from the current state."""


@dataclass(slots=True)
class StateChange:
    task_id: str
    source: str
    dest: str
    trigger: str
    detail: dict[str, Any]


class TaskRecord:
    """The model: one task's state and its last change (for the agent to publish)."""

    state: str

    def __init__(self, task_id: str, attempt: int = 1) -> None:
        self.task_id = task_id
        self.attempt = attempt  # claim generation: the fencing token
        self.tries = 0  # executions within this attempt
        self.last: StateChange | None = None

    def _record(self, event: Any) -> None:
        self.last = StateChange(
            self.task_id,
            event.transition.source,
            event.transition.dest,
            event.event.name,
            dict(event.kwargs),
        )

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def __repr__(self) -> str:
        return f"TaskRecord({self.task_id!r}, state={self.state!r}, attempt={self.attempt})"


#: The Machine behind every task. It holds no models (records are passed to each event),
#: so one instance serves all agents of a process.
_MACHINE: Final = Machine(
    model=None,
    states=list(STATES),
    transitions=TRANSITIONS,
    initial="received",
    auto_transitions=False,
    send_event=True,
    after_state_change="_record",
    model_attribute="state",
)


def _compile(machine: Machine) -> dict[str, dict[str, str]]:
    """``trigger -> source -> dest`` of ``machine``'s events. Refuses a transition with a
    condition or a callback of its own: a lookup would skip it."""
    steps: dict[str, dict[str, str]] = {}
    for name, event in machine.events.items():
        for source, transitions in event.transitions.items():
            for transition in transitions:
                callbacks = transition.before or transition.after or transition.prepare
                if transition.conditions or callbacks or transition.dest is None:
                    raise ValueError(f"{name}: a transition with conditions, callbacks or no dest")
                steps.setdefault(name, {})[source] = transition.dest
    return steps


#: the Machine's events as ``trigger -> source -> dest`` (one dest per pair)
_STEPS: Final = _compile(_MACHINE)
_INITIAL: Final = STATES[0]


class Lifecycle:
    """The table's two operations: a new record, and a trigger applied to one."""

    @staticmethod
    def new_record(task_id: str, attempt: int = 1) -> TaskRecord:
        """A record in the initial state (``received``)."""
        record = TaskRecord(task_id, attempt)
        record.state = _INITIAL
        return record

    @staticmethod
    def fire(record: TaskRecord, trigger: str, **detail: Any) -> StateChange:
        """Apply a trigger; returns the change it made. Raises InvalidTransition."""
        steps = _STEPS.get(trigger)
        if steps is None:
            raise InvalidTransition(f"unknown trigger {trigger!r}")
        source = record.state
        dest = steps.get(source)
        if dest is None:
            raise InvalidTransition(
                f"task {record.task_id}: cannot {trigger!r} from state {source!r}"
            )
        record.state = dest
        change = record.last = StateChange(record.task_id, source, dest, trigger, detail)
        return change


def mermaid() -> str:
    """A Mermaid state diagram drawn from :data:`TRANSITIONS`."""
    lines = ["stateDiagram-v2", "    [*] --> received"]
    for t in TRANSITIONS:
        sources = t["source"] if isinstance(t["source"], list) else [t["source"]]
        for source in sources:
            lines.append(f"    {source} --> {t['dest']}: {t['trigger']}")
    for state in sorted(FINAL_STATES):
        lines.append(f"    {state} --> [*]")
    return "\n".join(lines)


def markdown() -> str:
    """docs/lifecycle.md, generated from the table (a test checks it is current)."""
    rows = []
    for t in TRANSITIONS:
        sources = t["source"] if isinstance(t["source"], list) else [t["source"]]
        rows.append(
            f"| `{t['trigger']}` | {', '.join(f'`{x}`' for x in sources)} | `{t['dest']}` |"
        )
    return "\n".join(
        [
            "# Task lifecycle",
            "",
            "Generated from `sheri_trio/swarm/_lifecycle.py` by",
            "`python -m sheri_trio.swarm._lifecycle > docs/lifecycle.md`; do not edit by hand.",
            "",
            "Only the agent that wins a task's claim tracks it. Every change is published on",
            "`{swarm}/tasks/progress`; `claimed` and the final states are also kept as the",
            "retained `{swarm}/tasks/state/{task_id}`. Final states: "
            + ", ".join(f"`{s}`" for s in sorted(FINAL_STATES))
            + ".",
            "",
            "```mermaid",
            mermaid(),
            "```",
            "",
            "| trigger | from | to |",
            "|---|---|---|",
            *rows,
            "",
        ]
    )


if __name__ == "__main__":
    print(markdown(), end="")
