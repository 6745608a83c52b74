"""The task lifecycle table: every allowed transition works, every other one is refused."""

from __future__ import annotations

import logging
from collections import deque

import pytest
from transitions import MachineError

from sheri_trio.swarm._lifecycle import (
    _MACHINE,
    FINAL_STATES,
    STATES,
    TRANSITIONS,
    InvalidTransition,
    Lifecycle,
    StateChange,
    TaskRecord,
    mermaid,
)


def _sources(transition: dict[str, object]) -> list[str]:
    source = transition["source"]
    return list(source) if isinstance(source, list) else [str(source)]


TRIGGERS = sorted({str(t["trigger"]) for t in TRANSITIONS})
EDGES = [(source, str(t["trigger"]), str(t["dest"])) for t in TRANSITIONS for source in _sources(t)]
ALLOWED = {(source, trigger) for source, trigger, _ in EDGES}
DISALLOWED = [(s, t) for s in STATES for t in TRIGGERS if (s, t) not in ALLOWED]


def _paths() -> dict[str, list[str]]:
    """The shortest trigger sequence from ``received`` to every reachable state."""
    paths: dict[str, list[str]] = {"received": []}
    queue = deque(["received"])
    while queue:
        state = queue.popleft()
        for source, trigger, dest in EDGES:
            if source == state and dest not in paths:
                paths[dest] = [*paths[state], trigger]
                queue.append(dest)
    return paths


PATHS = _paths()


def _record_in(state: str, task_id: str = "t") -> TaskRecord:
    record = Lifecycle.new_record(task_id)
    for trigger in PATHS[state]:
        Lifecycle.fire(record, trigger)
    assert record.state == state
    return record


def _allowed(state: str) -> list[str]:
    """The triggers the table allows from ``state``."""
    return [str(t["trigger"]) for t in TRANSITIONS if state in _sources(t)]


def test_the_table_is_consistent() -> None:
    assert set(STATES) >= FINAL_STATES
    for source, _, dest in EDGES:
        assert source in STATES
        assert dest in STATES
        assert source not in FINAL_STATES  # nothing leaves a final state
    assert len(ALLOWED) == len(EDGES)  # one destination per (state, trigger)
    assert set(PATHS) == set(STATES)  # every state is reachable from "received"
    for state in STATES:
        assert sorted(_allowed(state)) == sorted(t for s, t in ALLOWED if s == state)
        assert (_allowed(state) == []) == (state in FINAL_STATES)


@pytest.mark.parametrize(("source", "trigger", "dest"), EDGES)
def test_every_allowed_transition(source: str, trigger: str, dest: str) -> None:
    record = _record_in(source)
    change = Lifecycle.fire(record, trigger, error="why", delay=1.5)
    assert record.state == dest
    assert change == StateChange("t", source, dest, trigger, {"error": "why", "delay": 1.5})
    assert record.last is change
    assert record.final == (dest in FINAL_STATES)


@pytest.mark.parametrize(("state", "trigger"), DISALLOWED)
def test_every_disallowed_transition_raises(state: str, trigger: str) -> None:
    record = _record_in(state)
    before = record.last
    with pytest.raises(InvalidTransition, match=f"cannot {trigger!r} from state {state!r}"):
        Lifecycle.fire(record, trigger)
    assert record.state == state
    assert record.last is before


def test_disallowed_pairs_cover_the_rest_of_the_grid() -> None:
    assert len(DISALLOWED) + len(ALLOWED) == len(STATES) * len(TRIGGERS)
    for state in FINAL_STATES:
        assert all((state, t) in DISALLOWED for t in TRIGGERS)


@pytest.mark.parametrize("trigger", ["explode", "to_done", "to_received", "succeeded"])
def test_unknown_triggers_raise(trigger: str) -> None:
    record = Lifecycle.new_record("t")
    with pytest.raises(InvalidTransition):
        Lifecycle.fire(record, trigger)
    assert record.state == "received"


@pytest.mark.parametrize("trigger", ["trigger", "_record", "last", "final", "is_done"])
def test_model_attributes_are_not_triggers(trigger: str) -> None:
    record = Lifecycle.new_record("t")
    with pytest.raises(InvalidTransition):
        Lifecycle.fire(record, trigger)


def test_adding_a_task_logs_no_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # transitions warns at every add_model if the model defines one of its method names
    # (TaskRecord once had a `trigger` stub). As the library is used without the CLI,
    # whose logging setup filters that warning out.
    monkeypatch.setattr(logging.getLogger("transitions.core"), "filters", [])
    monkeypatch.setattr(logging.getLogger("transitions"), "level", logging.NOTSET)
    with caplog.at_level(logging.WARNING):
        Lifecycle.new_record("t1")
        Lifecycle.new_record("t2")
    assert caplog.records == []


def test_a_typical_life_with_retries() -> None:
    record = Lifecycle.new_record("t", attempt=2)
    path = ["claim", "start", "time_out", "retry", "start", "retry", "start", "succeed"]
    changes = [Lifecycle.fire(record, trigger) for trigger in path]
    assert [c.dest for c in changes] == [
        "claimed",
        "running",
        "timed_out",
        "retrying",
        "running",
        "retrying",
        "running",
        "done",
    ]
    assert record.final
    assert record.attempt == 2
    assert record.last is changes[-1]


def test_one_machine_serves_many_models() -> None:
    records = [Lifecycle.new_record(f"t{i}", attempt=i + 1) for i in range(50)]
    twin = Lifecycle.new_record("t1")  # the same id (another agent's record): independent
    for i, record in enumerate(records):
        for trigger in ["claim", "start", "succeed"][: i % 4]:
            Lifecycle.fire(record, trigger)
    assert [r.state for r in records[:4]] == ["received", "claimed", "running", "done"]
    assert [r.state for r in records[4:8]] == ["received", "claimed", "running", "done"]
    assert twin.state == "received"
    # records are not bound to the Machine: no per-record trigger methods
    assert not hasattr(records[0], "claim")
    assert _MACHINE.models == []
    Lifecycle.fire(records[28], "claim")  # moves that model only
    assert [r.state for r in records[28:32]] == ["claimed", "claimed", "running", "done"]
    with pytest.raises(InvalidTransition):
        Lifecycle.fire(records[31], "claim")
    assert records[30].state == "running"


def test_mermaid_mentions_every_transition() -> None:
    diagram = mermaid()
    lines = diagram.splitlines()
    assert lines[0] == "stateDiagram-v2"
    assert "    [*] --> received" in lines
    for source, trigger, dest in EDGES:
        assert f"    {source} --> {dest}: {trigger}" in lines
    for state in FINAL_STATES:
        assert f"    {state} --> [*]" in lines
    assert len(lines) == 2 + len(EDGES) + len(FINAL_STATES)


@pytest.mark.parametrize(("state", "trigger"), [(s, t) for s in STATES for t in TRIGGERS])
def test_the_compiled_steps_agree_with_the_machine(state: str, trigger: str) -> None:
    """Lifecycle.fire looks the Machine's events up (compiled at import): the Machine run
    on the same record moves it alike, or refuses alike."""
    through_machine = _record_in(state)
    try:
        _MACHINE.events[trigger].trigger(through_machine, why="x")
    except MachineError:
        moved: str | None = None
    else:
        moved = through_machine.state
    record = _record_in(state)
    if moved is None:
        with pytest.raises(InvalidTransition):
            Lifecycle.fire(record, trigger, why="x")
        assert record.state == state
    else:
        change = Lifecycle.fire(record, trigger, why="x")
        assert record.state == moved
        assert change == through_machine.last
