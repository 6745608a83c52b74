"""The sans-IO dispatcher: messages and times in, commands out. No bus, no clock, no trio.

Each test feeds :meth:`Dispatcher.receive` the bytes the dispatch session would deliver
(in the broker's order) with an explicit ``now``, and asserts the commands; every list
``receive`` returns ends with its one :class:`Ack`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sheri_trio.stores import Hold, StoredOutcome, Verdict, parse_store_url
from sheri_trio.swarm._config import AgentConfig
from sheri_trio.swarm._dispatcher import (
    Ack,
    DispatchCommand,
    Dispatcher,
    ForwardCancel,
    PublishStoredOutcome,
    RecordState,
    RevokeReason,
    SendAssignment,
    SendRevocation,
    StoreAssign,
    WriteRecord,
    latest_records,
)
from sheri_trio.swarm._messages import encode
from sheri_trio.swarm._protocol import BadMessage, Topics
from sheri_trio.swarm._scheduler import (
    CancelResult,
    ClearPending,
    FailReason,
    ReportError,
    SendCancelReply,
    SendFailed,
    SendPending,
)

SWARM = "s"
T = Topics(SWARM)
ACK = Ack()
Q, A, C = RecordState.QUEUED, RecordState.ASSIGNED, RecordState.CLAIMED


def make(**kw: Any) -> Dispatcher:
    options: dict[str, Any] = {"swarm": SWARM, "lease_time": 30.0, "agent_id": "disp"}
    options.update(kw)
    return Dispatcher(AgentConfig(**options))


def env(payload: Any, agent_id: str | None = None, role: str | None = None) -> bytes:
    return encode(agent_id, role, payload)


def body(commands: list[DispatchCommand]) -> list[DispatchCommand]:
    """The commands before the one Ack that ends every receive()."""
    assert commands[-1] == ACK
    assert ACK not in commands[:-1]
    return commands[:-1]


def sub(task_id: str, task_type: str = "testing.run", **fields: Any) -> dict[str, Any]:
    return {"task_id": task_id, "type": task_type, "payload": {}, **fields}


def submit(
    d: Dispatcher, task_id: str, now: float = 0.0, task_type: str = "testing.run", **fields: Any
) -> list[DispatchCommand]:
    return body(d.receive(T.tasks_new, env(sub(task_id, task_type, **fields)), now))


def register(
    d: Dispatcher, agent_id: str, role: str = "testing", max_tasks: int = 2, now: float = 0.0
) -> list[DispatchCommand]:
    payload = {"agent_id": agent_id, "role": role, "status": "online", "max_tasks": max_tasks}
    return body(d.receive(T.agents_register, env(payload, agent_id, role), now))


def heartbeat(
    d: Dispatcher, agent_id: str, role: str = "testing", capacity: int = 2, now: float = 0.0
) -> list[DispatchCommand]:
    payload = {"status": "alive", "agent_id": agent_id, "role": role, "capacity": capacity}
    return body(d.receive(T.agents_heartbeat, env(payload, agent_id, role), now))


def status(d: Dispatcher, agent_id: str, online: bool, now: float = 0.0) -> list[DispatchCommand]:
    payload = {"agent_id": agent_id, "status": "online" if online else "offline"}
    return body(d.receive(T.agent_status(agent_id), env(payload), now))


def shutdown(d: Dispatcher, agent_id: str, now: float = 0.0) -> list[DispatchCommand]:
    payload = {"reason": "graceful", "agent_id": agent_id, "uptime": 1.0}
    return body(d.receive(T.agents_shutdown, env(payload, agent_id), now))


def claim(
    d: Dispatcher, task_id: str, agent_id: str, attempt: int = 1, now: float = 0.0
) -> list[DispatchCommand]:
    payload = {"task_id": task_id, "agent_id": agent_id, "attempt": attempt}
    return body(d.receive(T.tasks_assigned, env(payload, agent_id), now))


def outcome(
    d: Dispatcher,
    task_id: str,
    agent_id: str,
    attempt: int = 1,
    ok: bool = True,
    reason: str = "error",
) -> list[DispatchCommand]:
    payload: dict[str, Any] = {"task_id": task_id, "agent_id": agent_id, "attempt": attempt}
    if not ok:
        payload["reason"] = reason
    return body(d.receive(T.tasks_complete if ok else T.tasks_failed, env(payload, agent_id), 0.0))


def released(d: Dispatcher, task_id: str, agent_id: str, attempt: int = 1) -> list[DispatchCommand]:
    payload = {"task_id": task_id, "agent_id": agent_id, "attempt": attempt}
    return body(d.receive(T.tasks_released, env(payload, agent_id), 0.0))


def cancel(d: Dispatcher, task_id: str, request_id: str | None = None) -> list[DispatchCommand]:
    payload: dict[str, Any] = {"task_id": task_id}
    if request_id is not None:
        payload["request_id"] = request_id
    return body(d.receive(T.tasks_cancel, env(payload), 0.0))


def given_to(commands: list[DispatchCommand]) -> list[tuple[str, str, int]]:
    """(task id, agent id, attempt) of each assignment, checking that its record comes
    first."""
    out = []
    for i, c in enumerate(commands):
        if isinstance(c, SendAssignment):
            record = commands[i - 1]
            assert record == WriteRecord(c.task_id, A, c.attempt, c.agent_id, c.task)
            out.append((c.task_id, c.agent_id, c.attempt))
    markers = [c for c in commands if isinstance(c, (SendPending, ClearPending))]
    assert len(commands) == 2 * len(out) + len(markers)
    return out


# ------------------------------------------------------------------ submissions
def test_a_submission_is_recorded_as_queued_then_acknowledged() -> None:
    d = make()
    commands = d.receive(T.tasks_new, env(sub("t1", priority="high")), 0.0)
    assert commands == [WriteRecord("t1", Q, 1, None, sub("t1", priority="high")), ACK]
    assert d.jobs["t1"].state is Q
    assert d.statistics(0.0).queued_by_role["testing"] == 1


def _to_state(d: Dispatcher, state: str) -> None:
    register(d, "a1")
    submit(d, "t")
    if state == "queued":
        register(d, "a1", role="security")
        return
    d.assignments(0.0)
    if state == "claimed":
        claim(d, "t", "a1")
    elif state == "finished":
        outcome(d, "t", "a1")


@pytest.mark.parametrize("state", ["queued", "assigned", "claimed", "finished"])
def test_a_duplicate_task_id_is_only_acknowledged(state: str) -> None:
    d = make()
    _to_state(d, state)
    assert submit(d, "t") == []
    assert submit(d, "t", task_type="security.scan", priority="urgent") == []  # even invalid
    assert d.counters["duplicates"] == 2
    assert d.assignments(0.0) == []


def test_an_invalid_submission_with_an_id_is_failed_once_by_the_dispatcher() -> None:
    d = make()
    register(d, "a1")
    (failed, record) = submit(d, "bad", priority="urgent")
    assert isinstance(failed, SendFailed)
    assert (failed.spec.task_id, failed.attempt, failed.reason) == (
        "bad",
        1,
        FailReason.INVALID_TASK,
    )
    assert "priority" in failed.error
    # the final record keeps the submission as received (sheri retry reads it)
    assert record == WriteRecord("bad", RecordState.FAILED, 1, None, sub("bad", priority="urgent"))
    assert record.final
    assert submit(d, "bad", priority="urgent") == []  # its redelivery: nothing more
    assert d.assignments(0.0) == []
    # its own tasks/failed comes back from the broker: after the final one, ignored
    assert outcome(d, "bad", "disp", ok=False, reason="invalid_task") == []
    assert d.counters["outcomes_after_final"] == 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1]", "JSON object"),
        (b'{"payload": 3}', "no 'payload'"),
        (json.dumps({"payload": {"task_id": "a/b", "type": "x"}}).encode(), "not allowed"),
        (json.dumps({"payload": {"type": "testing.run"}}).encode(), "'task_id'"),
        (b"x" * 300_000, "exceeds the limit"),
    ],
)
def test_a_malformed_submission_without_a_task_id_is_reported(payload: bytes, reason: str) -> None:
    d = make()
    (report,) = body(d.receive(T.tasks_new, payload, 0.0))
    assert isinstance(report, ReportError)
    assert (report.topic, report.size, report.task_id) == (T.tasks_new, len(payload), None)
    assert reason in report.reason
    assert d.jobs == {}
    assert d.counters["bad_messages"] == 1


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        (T.tasks_assigned, {"task_id": "t", "attempt": 1}),  # no agent id
        (T.tasks_assigned, {"task_id": "t", "agent_id": "a1", "attempt": 0}),
        (T.tasks_complete, {"task_id": "t", "attempt": "one"}),
        (T.tasks_failed, {"task_id": 5}),
        (T.tasks_released, {"task_id": "t", "agent_id": "a/#", "attempt": 1}),
        (T.tasks_cancel, {"task_id": ["t"]}),
        (T.agents_heartbeat, {"agent_id": "x/+", "role": "testing"}),
        (T.agents_register, {"role": "testing"}),
        (T.agent_status("a1"), []),
    ],
)
def test_malformed_messages_on_other_topics_are_reported_and_acknowledged(
    topic: str, payload: Any
) -> None:
    d = make()
    (report,) = body(d.receive(topic, env(payload), 0.0))
    assert isinstance(report, ReportError)
    assert report.topic == topic


def test_no_report_about_a_report_and_nothing_for_other_topics() -> None:
    d = make()
    assert d.receive(T.errors, b"{not json", 0.0) == [ACK]
    assert d.receive(T.tasks_progress, env({"task_id": "t"}), 0.0) == [ACK]
    assert d.receive(T.broadcast, env({"hello": 1}), 0.0) == [ACK]
    assert d.receive(T.agent_status("a1"), b"", 0.0) == [ACK]  # a cleared retained status
    assert d.counters["bad_messages"] == 0


# ------------------------------------------------------------------ assignment
def test_a_queued_task_goes_to_an_eligible_agent_record_first() -> None:
    d = make()
    register(d, "tester")
    register(d, "deployer", role="deployment")
    submit(d, "t1")
    commands = d.assignments(1.0)
    assert commands == [
        WriteRecord("t1", A, 1, "tester", sub("t1")),
        SendAssignment("tester", "t1", sub("t1"), 1),
    ]
    assert d.in_flight("tester") == 1
    assert d.jobs["t1"].state is A
    assert d.assignments(1.0) == []  # handed out once


def test_assignments_go_by_priority_then_arrival() -> None:
    d = make()
    register(d, "a1", max_tasks=1)
    submit(d, "low", priority="low")
    submit(d, "medium-1")
    submit(d, "high", priority="high")
    submit(d, "medium-2")
    order = []
    while got := given_to(d.assignments(0.0)):
        ((task_id, agent_id, attempt),) = got
        order.append(task_id)
        outcome(d, task_id, agent_id, attempt)
    assert order == ["high", "medium-1", "medium-2", "low"]


def test_priorities_hold_across_roles_and_a_task_nobody_may_take_does_not_block() -> None:
    d = make()
    register(d, "rev", role="review", max_tasks=2)
    submit(d, "deploy", task_type="deployment.deploy", priority="high")  # nobody online
    submit(d, "scan", task_type="security.scan")  # security or review
    submit(d, "review", task_type="code.review", priority="high")  # review or general
    assert [t for t, _, _ in given_to(d.assignments(0.0))] == ["review", "scan"]


def test_an_assigned_to_task_goes_only_to_its_agent_with_an_eligible_role() -> None:
    d = make()
    register(d, "a1")
    register(d, "a2")
    register(d, "g1", role="general")
    submit(d, "x", assigned_to="a2")
    submit(d, "y", assigned_to="g1")  # g1 may not take testing.run
    assert given_to(d.assignments(0.0)) == [("x", "a2", 1)]
    assert d.jobs["y"].state is Q


def test_the_least_loaded_agent_gets_the_task_relative_to_its_slots() -> None:
    d = make()
    register(d, "big", max_tasks=4)
    register(d, "small", max_tasks=1)
    submit(d, "t0")
    submit(d, "t1")
    submit(d, "t2")
    got = given_to(d.assignments(0.0))
    # each pick goes to the lowest held/max_tasks (ties: the one longest at that load)
    assert sorted(a for _, a, _ in got) == ["big", "big", "small"]
    assert d.in_flight("big") == 2
    assert d.in_flight("small") == 1


def test_ties_go_to_the_agent_longest_at_that_load_so_lone_tasks_go_round() -> None:
    d = make()
    for agent_id in ("a1", "a2", "a3"):
        register(d, agent_id, max_tasks=2)
    order = []
    for i in range(7):  # one task at a time: each finished before the next comes
        submit(d, f"t{i}")
        ((task_id, chosen, _),) = given_to(d.assignments(0.0))
        order.append(chosen)
        outcome(d, task_id, chosen)
    assert order == ["a1", "a2", "a3", "a1", "a2", "a3", "a1"]


def test_a_busier_agent_waits_until_the_others_are_as_busy() -> None:
    d = make()
    for agent_id in ("a1", "a2", "a3"):
        register(d, agent_id, max_tasks=2)
    submit(d, "t0")
    ((_, first, _),) = given_to(d.assignments(0.0))
    submit(d, "t1")
    submit(d, "t2")
    got = {a for _, a, _ in given_to(d.assignments(0.0))}
    assert got == {"a1", "a2", "a3"} - {first}  # every agent has one before any has two
    submit(d, "t3")
    ((_, fourth, _),) = given_to(d.assignments(0.0))
    assert fourth == first  # equal loads again: the one longest at it


def test_an_agent_whose_lease_lapsed_gets_nothing_until_it_is_heard_again() -> None:
    d = make()
    register(d, "a1", now=0.0)
    register(d, "a2", now=20.0)
    submit(d, "t0", now=31.0)  # a1 silent for a lease: a2 only
    assert [a for _, a, _ in given_to(d.assignments(31.0))] == ["a2"]
    heartbeat(d, "a1", now=32.0)
    submit(d, "t1", now=32.0)
    assert [a for _, a, _ in given_to(d.assignments(32.0))] == ["a1"]


def test_an_assignment_round_does_not_look_at_every_free_agent() -> None:
    """With many idle agents, a lone task costs a few free-slot checks, not one per
    agent (the pool of free agents: sheri_trio.swarm._pool)."""
    d = make()
    for i in range(300):
        register(d, f"a{i:03}", max_tasks=2)
    d.assignments(0.0)  # the first round takes every agent in
    checks = 0
    free_slots = d.free_slots

    def counting(agent_id: str, now: float) -> int:
        nonlocal checks
        checks += 1
        return free_slots(agent_id, now)

    d.free_slots = counting  # type: ignore[method-assign]
    for i in range(20):
        submit(d, f"t{i}")
        ((task_id, chosen, _),) = given_to(d.assignments(0.0))
        outcome(d, task_id, chosen)
    assert checks <= 20 * 4


def test_no_agent_gets_more_than_its_free_slots() -> None:
    d = make()
    register(d, "a1", max_tasks=2)
    for i in range(5):
        submit(d, f"t{i}")
    assert given_to(d.assignments(0.0)) == [("t0", "a1", 1), ("t1", "a1", 1)]
    assert d.assignments(0.0) == []
    assert not d.can_assign(0.0)
    heartbeat(d, "a1", capacity=2, now=1.0)  # its heartbeat changes nothing
    assert d.assignments(1.0) == []
    outcome(d, "t0", "a1")
    assert d.can_assign(1.0)
    assert given_to(d.assignments(1.0)) == [("t2", "a1", 1)]
    assert d.statistics(1.0).free_slots_by_role["testing"] == 0


def test_an_agent_known_only_from_its_status_is_given_nothing_until_its_capacity_is() -> None:
    d = make()
    status(d, "a1", online=True)  # the retained status read at election: no slots known
    submit(d, "t")
    assert d.assignments(0.0) == []
    heartbeat(d, "a1", capacity=1, now=1.0)
    assert given_to(d.assignments(1.0)) == [("t", "a1", 1)]


def test_an_agent_announcing_no_capacity_is_given_nothing_more() -> None:
    d = make()
    register(d, "a1", max_tasks=2)
    submit(d, "t")
    submit(d, "u")
    heartbeat(d, "a1", capacity=0, now=1.0)  # draining: its shutdown's grace period
    assert d.assignments(1.0) == []
    heartbeat(d, "a1", capacity=-1, now=2.0)  # not a capacity: the last one stays
    assert d.assignments(2.0) == []
    heartbeat(d, "a1", capacity=1, now=3.0)
    assert given_to(d.assignments(3.0)) == [("t", "a1", 1)]


def test_a_silent_agent_is_given_nothing() -> None:
    d = make()
    register(d, "a1", now=0.0)
    submit(d, "t")
    assert d.assignments(30.0) == []  # silent for lease_time: not a candidate
    heartbeat(d, "a1", now=31.0)
    assert given_to(d.assignments(31.0)) == [("t", "a1", 1)]


def test_a_role_with_nobody_online_stays_queued_with_one_warning_until_someone_registers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = make()
    register(d, "a1")
    caplog.set_level(logging.WARNING, logger="sheri_trio.agent")
    for i in range(3):
        submit(d, f"d{i}", task_type="deployment.deploy")
    # the first heartbeat interval of a term: the agents are still announcing themselves
    assert d.assignments(0.0) == []
    assert d.assignments(9.9) == []
    assert not [r for r in caplog.records if "no eligible agent online" in r.getMessage()]
    # then each task nobody may take is kept as a retained pending marker, as broadcast does
    tasks = {f"d{i}": sub(f"d{i}", "deployment.deploy") for i in range(3)}
    assert d.assignments(10.0) == [SendPending(t, task) for t, task in tasks.items()]
    assert d.assignments(10.0) == []
    register(d, "a2", now=10.5)  # presence that changes nothing for them: no new markers
    assert d.assignments(10.5) == []
    submit(d, "d3", task_type="deployment.deploy", now=11.0)
    assert d.assignments(11.0) == [SendPending("d3", sub("d3", "deployment.deploy"))]
    warnings = [r for r in caplog.records if "no eligible agent online" in r.getMessage()]
    assert len(warnings) == 1
    assert "roles=deployment" in warnings[0].getMessage()
    stats = d.statistics(11.0)
    assert (stats.queued, stats.queued_by_role["deployment"]) == (4, 4)
    assert stats.agents_online_by_role["deployment"] == 0
    register(d, "deployer", role="deployment", max_tasks=8, now=12.0)
    commands = d.assignments(12.0)
    assert [t for t, _, _ in given_to(commands)] == ["d0", "d1", "d2", "d3"]
    cleared = [c.task_id for c in commands if isinstance(c, ClearPending)]
    assert cleared == ["d0", "d1", "d2", "d3"]  # each before its assignment's record
    for task_id in cleared:
        i = commands.index(ClearPending(task_id))
        record = commands[i + 1]
        assert isinstance(record, WriteRecord)
        assert record.task_id == task_id


def test_a_pending_task_cancelled_while_queued_clears_its_marker() -> None:
    d = make()
    submit(d, "t", task_type="deployment.deploy")
    d.assignments(0.0)
    assert d.assignments(10.0) == [SendPending("t", sub("t", "deployment.deploy"))]
    failed = [c for c in cancel(d, "t") if isinstance(c, SendFailed)]
    assert [(f.reason, f.clear_marker) for f in failed] == [(FailReason.CANCELLED, True)]


# ------------------------------------------------------------------ claims and outcomes
def test_the_holders_claim_confirms_custody_and_its_outcome_frees_the_slot() -> None:
    d = make()
    register(d, "a1", max_tasks=1)
    submit(d, "t")
    submit(d, "u")
    d.assignments(0.0)
    assert claim(d, "t", "a1") == []
    assert d.jobs["t"].state is C
    assert claim(d, "t", "a1") == []  # a duplicate of it: nothing
    stats = d.statistics(0.0)
    assert (stats.queued, stats.assigned, stats.claimed) == (1, 0, 1)
    assert outcome(d, "t", "a1") == []
    assert "t" not in d.jobs
    assert d.finished["t"] == (RecordState.DONE, 1)
    assert given_to(d.assignments(0.0)) == [("u", "a1", 1)]
    assert (d.counters["claims"], d.counters["completed"]) == (1, 1)


def test_an_outcome_before_the_claim_is_seen_is_accepted_from_the_holder() -> None:
    d = make()
    register(d, "a1")
    submit(d, "t")
    d.assignments(0.0)
    assert outcome(d, "t", "a1", ok=False, reason="cancelled") == []
    assert d.finished["t"] == (RecordState.CANCELLED, 1)
    assert d.counters["failed"] == 1


@pytest.mark.parametrize(
    ("claimant", "attempt"), [("a2", 1), ("a1", 2)], ids=["wrong agent", "wrong attempt"]
)
def test_a_claim_that_does_not_match_the_record_is_revoked_and_the_record_reasserted(
    claimant: str, attempt: int
) -> None:
    d = make()
    register(d, "a1")
    register(d, "a2")
    submit(d, "t", assigned_to="a1")
    d.assignments(0.0)
    assert claim(d, "t", claimant, attempt) == [
        SendRevocation(claimant, "t", attempt, RevokeReason.NOT_HOLDER),
        WriteRecord("t", A, 1, "a1", sub("t", assigned_to="a1")),
    ]
    assert d.jobs["t"].state is A
    assert d.counters["claims_stale"] == 1


def test_a_claim_of_an_unknown_task_is_counted_and_one_of_a_finished_task_revoked() -> None:
    d = make()
    register(d, "a1")
    assert claim(d, "nobody-knows", "a1") == []
    assert d.counters["claims_unknown"] == 1
    submit(d, "t")
    d.assignments(0.0)
    outcome(d, "t", "a1")
    assert claim(d, "t", "a2") == [
        SendRevocation("a2", "t", 1, RevokeReason.FINISHED),
        WriteRecord("t", RecordState.DONE, 1),
    ]


def taken_over_at_its_lease() -> tuple[Dispatcher, str, str]:
    """Task ``t`` given to one of two agents, which then stays silent for the lease: the
    dispatcher, the first holder and the second (attempt 2 assigned to it)."""
    d = make()
    register(d, "a1")
    register(d, "a2")
    submit(d, "t")
    ((_, first, _),) = given_to(d.assignments(0.0))
    second = "a2" if first == "a1" else "a1"
    heartbeat(d, second, now=29.0)
    d.check_leases(30.0)  # the first one silent for the lease: taken over
    assert given_to(d.assignments(30.0)) == [("t", second, 2)]
    return d, first, second


def test_a_stale_outcome_is_fenced_off_and_the_current_one_accepted() -> None:
    d, first, second = taken_over_at_its_lease()
    # the first holder was not dead after all: its outcome is stale
    assert outcome(d, "t", first, attempt=1) == [
        WriteRecord("t", A, 2, second, sub("t"))  # its final state may be over the record
    ]
    assert outcome(d, "t", second, attempt=1) == [WriteRecord("t", A, 2, second, sub("t"))]
    assert outcome(d, "t", "intruder", attempt=2) == [WriteRecord("t", A, 2, second, sub("t"))]
    assert d.counters["outcomes_stale"] == 3
    # accepted; our records written since may be over the holder's final one: ours too
    assert outcome(d, "t", second, attempt=2, ok=False) == [
        WriteRecord("t", RecordState.FAILED, 2, None, sub("t"))
    ]
    assert d.finished["t"] == (RecordState.FAILED, 2)
    assert outcome(d, "t", second, attempt=2) == []  # at most one accepted per task
    assert d.counters["outcomes_after_final"] == 1
    assert (d.counters["completed"], d.counters["failed"]) == (0, 1)
    assert outcome(d, "never-seen", "a1") == []
    assert d.counters["outcomes_unknown"] == 1


def test_a_record_we_wrote_over_the_holders_is_made_final_when_its_outcome_comes() -> None:
    """After a broker's restart: a stale claim (the old holder's, redelivered) makes us
    write our record again, while the new holder runs: ours, "assigned", lands over its
    "claimed" or even its final record. When its outcome is accepted, our final record
    goes out, else the retained record says assigned for good and the next dispatcher
    hands the task to an agent that ran it already."""
    d, first, second = taken_over_at_its_lease()
    # the old holder's claim of attempt 1 comes late: revoked, our record written again
    assert claim(d, "t", first, attempt=1) == [
        SendRevocation(first, "t", 1, RevokeReason.NOT_HOLDER),
        WriteRecord("t", A, 2, second, sub("t")),
    ]
    assert claim(d, "t", second, attempt=2) == []
    assert outcome(d, "t", second, attempt=2) == [WriteRecord("t", RecordState.DONE, 2, None, None)]
    assert d.finished["t"] == (RecordState.DONE, 2)
    # without a rewrite of ours the holder's own final record stands: nothing written
    submit(d, "u")
    ((_, holder, _),) = given_to(d.assignments(2.0))
    assert claim(d, "u", holder) == []
    assert outcome(d, "u", holder) == []


def test_a_release_queues_the_next_attempt_and_frees_the_slot() -> None:
    d = make()
    register(d, "a1", max_tasks=1)
    submit(d, "t")
    d.assignments(0.0)
    claim(d, "t", "a1")
    assert released(d, "t", "a1", attempt=2) == [WriteRecord("t", C, 1, "a1", sub("t"))]
    assert d.counters["releases_stale"] == 1
    assert released(d, "t", "a1") == [WriteRecord("t", Q, 2, None, sub("t"))]
    assert d.in_flight("a1") == 0
    assert d.jobs["t"].attempt == 2
    assert given_to(d.assignments(0.0)) == [("t", "a1", 2)]


def test_a_released_or_taken_over_task_keeps_its_place_in_the_queue() -> None:
    d = make()
    register(d, "a1", max_tasks=1)
    submit(d, "old")
    submit(d, "new")
    d.assignments(0.0)
    released(d, "old", "a1")
    assert given_to(d.assignments(0.0)) == [("old", "a1", 2)]


# ------------------------------------------------------------------ takeover
def test_a_holder_killed_is_revoked_then_its_task_goes_to_another_agent_once() -> None:
    d = make()
    register(d, "a1", max_tasks=1)
    submit(d, "t")
    assert given_to(d.assignments(0.0)) == [("t", "a1", 1)]
    register(d, "a2", max_tasks=1, now=1.0)
    claim(d, "t", "a1")
    # the broker publishes a1's will: offline, but no takeover (mosquitto publishes
    # every will as it stops: a broker's restart looks the same); its lease decides
    assert status(d, "a1", online=False, now=2.0) == []
    assert d.in_flight("a1") == 1
    assert d.check_leases(29.9) == []
    assert d.check_leases(30.0) == [
        SendRevocation("a1", "t", 1, RevokeReason.HOLDER_GONE),
        WriteRecord("t", Q, 2, None, sub("t")),
    ]
    assert d.in_flight("a1") == 0
    assert given_to(d.assignments(30.0)) == [("t", "a2", 2)]
    # the same takeover is never issued twice
    assert status(d, "a1", online=False, now=31.0) == []
    assert shutdown(d, "a1", now=31.0) == []
    assert register(d, "a1", now=31.0) == []
    assert d.check_leases(100.0) != []  # a2 is silent by now: its own takeover, not a1's
    assert d.counters["takeovers"] == 2
    assert [j.attempt for j in d.jobs.values()] == [3]


def test_a_holder_back_after_its_will_keeps_its_task() -> None:
    """A broker's restart: every agent's will, then each agent online again on its
    session, its runs going on. Nothing is taken over, nothing runs twice."""
    d = make()
    register(d, "a1", max_tasks=1)
    submit(d, "t")
    d.assignments(0.0)
    claim(d, "t", "a1")
    assert status(d, "a1", online=False, now=1.0) == []
    assert d.free_slots("a1", 1.0) == 0  # offline: given nothing
    assert status(d, "a1", online=True, now=2.0) == []
    heartbeat(d, "a1", capacity=1, now=20.0)
    assert d.check_leases(45.0) == []
    assert outcome(d, "t", "a1") == []
    assert d.finished["t"] == (RecordState.DONE, 1)
    assert d.counters["takeovers"] == 0


def test_a_register_of_a_holder_is_a_new_process_its_tasks_are_taken_over() -> None:
    """A register comes once per process: the holder was killed and started again
    (within its lease), and what it held is gone with the process that ran it."""
    d = make()
    register(d, "a1", max_tasks=2)
    submit(d, "t")
    d.assignments(0.0)
    claim(d, "t", "a1")
    status(d, "a1", online=False, now=1.0)  # killed: its will
    status(d, "a1", online=True, now=2.0)  # started again
    assert register(d, "a1", max_tasks=2, now=2.0) == [
        SendRevocation("a1", "t", 1, RevokeReason.HOLDER_GONE),
        WriteRecord("t", Q, 2, None, sub("t")),
    ]
    assert given_to(d.assignments(2.0)) == [("t", "a1", 2)]
    assert register(d, "a2", now=3.0) == []  # holding nothing: nothing


def test_a_graceful_shutdown_takes_over_what_the_agent_still_holds() -> None:
    d = make()
    register(d, "a1")
    submit(d, "t")
    submit(d, "u")
    d.assignments(0.0)
    assert shutdown(d, "a1", 1.0) == [
        SendRevocation("a1", "t", 1, RevokeReason.HOLDER_GONE),
        WriteRecord("t", Q, 2, None, sub("t")),
        SendRevocation("a1", "u", 1, RevokeReason.HOLDER_GONE),
        WriteRecord("u", Q, 2, None, sub("u")),
    ]
    assert d.assignments(1.0) == []  # a1 is offline
    assert d.statistics(1.0).agents_online_by_role["testing"] == 0


def test_a_silent_holder_is_taken_over_at_exactly_its_lease_time() -> None:
    d = make(lease_time=30.0)
    register(d, "a1", now=0.0)
    submit(d, "t")
    d.assignments(2.0)  # assigned at 2.0: its lease counts from then
    heartbeat(d, "a1", now=4.0)
    claim(d, "t", "a1", now=5.0)  # its claim at 5.0 too
    assert d.check_leases(34.999) == []
    assert d.check_leases(35.0) == [
        SendRevocation("a1", "t", 1, RevokeReason.HOLDER_GONE),
        WriteRecord("t", Q, 2, None, sub("t")),
    ]
    assert d.check_leases(35.0) == []
    assert d.check_leases(100.0) == []


def test_a_holder_that_keeps_heartbeating_keeps_its_task() -> None:
    d = make(lease_time=30.0)
    register(d, "a1")
    submit(d, "t")
    d.assignments(0.0)
    for now in range(10, 200, 10):
        heartbeat(d, "a1", now=float(now))
        assert d.check_leases(float(now)) == []


# ------------------------------------------------------------------ cancel
def test_a_cancel_of_a_queued_task_fails_it_as_cancelled() -> None:
    d = make()
    submit(d, "t")
    (failed, record) = cancel(d, "t")
    assert isinstance(failed, SendFailed)
    assert (failed.spec.task_id, failed.reason, failed.attempt) == ("t", FailReason.CANCELLED, 1)
    assert record == WriteRecord("t", RecordState.CANCELLED, 1, None, sub("t"))
    assert "t" not in d.jobs
    register(d, "a1")
    assert d.assignments(0.0) == []
    assert d.statistics(0.0).queued == 0
    assert submit(d, "t") == []  # finished: a resubmission is a duplicate
    assert cancel(d, "t") == []
    assert cancel(d, "unknown") == []


def test_a_cancel_of_a_held_task_is_forwarded_to_its_holder_once() -> None:
    d = make()
    register(d, "a1")
    submit(d, "t")
    d.assignments(0.0)
    claim(d, "t", "a1")
    assert cancel(d, "t") == [ForwardCancel("a1", "t", 1)]
    assert cancel(d, "t") == []
    assert outcome(d, "t", "a1", ok=False, reason="cancelled") == []
    assert d.finished["t"] == (RecordState.CANCELLED, 1)


def test_a_cancelled_task_whose_holder_dies_is_failed_not_run_again() -> None:
    d = make()
    register(d, "a1")
    register(d, "a2")
    submit(d, "t", assigned_to="a1")
    d.assignments(0.0)
    cancel(d, "t")
    assert status(d, "a1", online=False) == []
    heartbeat(d, "a2", now=29.0)
    (revoke, failed, record) = d.check_leases(30.0)
    assert revoke == SendRevocation("a1", "t", 1, RevokeReason.HOLDER_GONE)
    assert isinstance(failed, SendFailed)
    assert failed.reason is FailReason.CANCELLED
    assert record == WriteRecord("t", RecordState.CANCELLED, 1, None, sub("t", assigned_to="a1"))
    assert d.assignments(0.0) == []


def test_a_cancel_with_a_request_id_is_answered_for_the_whole_swarm() -> None:
    d = make()
    register(d, "a1")
    submit(d, "held")
    d.assignments(0.0)
    claim(d, "held", "a1")
    submit(d, "queued", task_type="database.backup")  # nobody can take it: stays queued
    # queued: failed as cancelled, its record written, then the answer
    (failed, record, reply) = cancel(d, "queued", "r1")
    assert isinstance(failed, SendFailed)
    assert record.final
    assert reply == SendCancelReply(
        "r1", "queued", CancelResult.CANCELLED, "swarm", "queued", None, 1
    )
    # held: forwarded once, answered "stopping" every time, naming the holder
    stopping = SendCancelReply("r2", "held", CancelResult.STOPPING, "swarm", "claimed", "a1", 1)
    assert cancel(d, "held", "r2") == [ForwardCancel("a1", "held", 1), stopping]
    assert cancel(d, "held", "r2") == [stopping]
    # finished (its final state), and unknown: nobody has it
    outcome(d, "held", "a1", ok=False, reason="cancelled")
    assert cancel(d, "held", "r3") == [
        SendCancelReply("r3", "held", CancelResult.FINISHED, "swarm", "cancelled", None, 1)
    ]
    assert cancel(d, "nope", "r4") == [SendCancelReply("r4", "nope", CancelResult.UNKNOWN, "swarm")]


def test_a_failed_task_s_record_written_again_keeps_its_submission() -> None:
    d = make()
    register(d, "a1")
    submit(d, "t")
    d.assignments(0.0)
    claim(d, "t", "a1")
    outcome(d, "t", "a1", ok=False)
    # a stale claimant of the finished task: revoked, the final record re-asserted whole
    (revoke, record) = claim(d, "t", "a2")
    assert revoke == SendRevocation("a2", "t", 1, RevokeReason.FINISHED)
    assert record == WriteRecord("t", RecordState.FAILED, 1, None, sub("t"))
    # read at election too
    e = make()
    e.on_state({"task_id": "f", "state": "failed", "attempt": 2, "task": sub("f")}, 0.0)
    (_, record) = claim(e, "f", "a2")
    assert record == WriteRecord("f", RecordState.FAILED, 2, None, sub("f"))


@pytest.mark.parametrize(
    "payload",
    [
        {"task_id": "t", "request_id": 7},
        {"task_id": "t", "request_id": "a/b"},
        {"task_id": "t", "request_id": "x" * 65},
        {"request_id": "r"},
    ],
)
def test_a_malformed_cancel_is_reported(payload: dict[str, Any]) -> None:
    d = make()
    submit(d, "t")
    (report,) = body(d.receive(T.tasks_cancel, env(payload), 0.0))
    assert isinstance(report, ReportError)
    assert report.topic == T.tasks_cancel
    assert "t" in d.jobs  # nothing cancelled


# ------------------------------------------------------------------ election hand-over
def test_retained_records_rebuild_the_queue_and_the_holders() -> None:
    d = make()
    assert (
        d.on_state({"task_id": "q", "state": "queued", "attempt": 2, "task": sub("q")}, 0.0) == []
    )
    assert d.on_state(
        {"task_id": "as", "state": "assigned", "attempt": 1, "agent_id": "a1", "task": sub("as")},
        0.0,
    ) == [SendAssignment("a1", "as", sub("as"), 1)]  # sent again: it may never have gone out
    held = {"task_id": "cl", "state": "claimed", "attempt": 3, "agent_id": "a2", "task": sub("cl")}
    assert d.on_state(held, 0.0) == []
    assert d.on_state({"task_id": "fin", "state": "done", "attempt": 1}, 0.0) == []
    released_record = {"task_id": "rel", "state": "released", "attempt": 1, "task": sub("rel")}
    assert d.on_state(released_record, 0.0) == [WriteRecord("rel", Q, 2, None, sub("rel"))]
    assert (d.jobs["q"].state, d.jobs["q"].attempt) == (Q, 2)
    assert (d.jobs["as"].state, d.jobs["as"].agent_id) == (A, "a1")
    assert (d.jobs["cl"].state, d.jobs["cl"].attempt) == (C, 3)
    assert d.finished["fin"] == (RecordState.DONE, 1)
    # redelivered submissions after the hand-over are duplicates
    for task_id in ("q", "as", "cl", "fin", "rel"):
        assert submit(d, task_id) == []
    assert d.on_state(held, 0.0) == []  # a record read twice: nothing more
    # presence arrives: a1's retained status says offline (no takeover: a will is also
    # what a broker's restart looks like), a2 is never heard of
    assert status(d, "a1", online=False, now=1.0) == []
    assert d.check_leases(29.9) == []
    assert d.check_leases(30.0) == [
        SendRevocation("a2", "cl", 3, RevokeReason.HOLDER_GONE),
        WriteRecord("cl", Q, 4, None, sub("cl")),
    ]
    assert d.check_leases(31.0) == [  # a1's lease: from its status (the first news of it)
        SendRevocation("a1", "as", 1, RevokeReason.HOLDER_GONE),
        WriteRecord("as", Q, 2, None, sub("as")),
    ]
    register(d, "a3", max_tasks=8, now=31.0)
    got = given_to(d.assignments(31.0))
    assert sorted(got) == [("as", "a3", 2), ("cl", "a3", 4), ("q", "a3", 2), ("rel", "a3", 2)]


def test_a_holder_online_after_the_hand_over_keeps_its_task() -> None:
    d = make()
    record = {"task_id": "t", "state": "claimed", "attempt": 1, "agent_id": "a1", "task": sub("t")}
    d.on_state(record, 0.0)
    status(d, "a1", online=True, now=0.5)
    heartbeat(d, "a1", capacity=1, now=10.0)
    assert d.check_leases(35.0) == []
    assert d.free_slots("a1", 35.0) == 0  # the held task uses its one slot
    assert claim(d, "t", "a1") == []
    assert outcome(d, "t", "a1") == []
    assert d.finished["t"] == (RecordState.DONE, 1)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"state": "queued"}, "'task_id'"),
        ({"task_id": "t", "state": "queued", "attempt": 0, "task": sub("t")}, "'attempt'"),
        ({"task_id": "t", "state": "queued"}, "submission"),
        ({"task_id": "t", "state": "queued", "task": sub("u")}, "another task id"),
        ({"task_id": "t", "state": "queued", "task": {"task_id": "t"}}, "'type'"),
        ({"task_id": "t", "state": "claimed", "task": sub("t")}, "'agent_id'"),
        ({"task_id": "t", "state": "claimed", "agent_id": "a/+", "task": sub("t")}, "'agent_id'"),
    ],
)
def test_an_unusable_record_is_refused(record: dict[str, Any], reason: str) -> None:
    d = make()
    with pytest.raises(BadMessage, match=reason):
        d.on_state(record, 0.0)
    assert d.jobs == {}
    assert d.in_flight("a/+") == 0


# ------------------------------------------------------------------ statistics
def test_statistics_count_queue_agents_and_slots() -> None:
    d = make()
    register(d, "t1", max_tasks=3)
    register(d, "r1", role="review", max_tasks=1)
    submit(d, "scan", task_type="security.scan")  # security, review
    submit(d, "run")
    submit(d, "run2")
    d.assignments(0.0)
    submit(d, "deploy", task_type="deployment.deploy")
    stats = d.statistics(0.0)
    assert stats.queued == 1
    assert stats.queued_by_role["deployment"] == 1
    assert (stats.assigned, stats.claimed, stats.finished) == (3, 0, 0)
    assert stats.agents_online_by_role["testing"] == 1
    assert stats.agents_online_by_role["review"] == 1
    assert stats.free_slots_by_role == {**stats.free_slots_by_role, "testing": 1, "review": 0}
    assert stats.counters["accepted"] == 4
    assert stats.counters["assigned"] == 3


# ------------------------------------------------------------------ properties
_IDS = st.sampled_from(["a", "b", "c", "d", "e"])
_AGENTS = st.sampled_from(["p1", "p2", "p3"])
_ROLES = st.sampled_from(["testing", "review", "general"])
_TYPES = st.sampled_from(["testing.run", "code.review", "code.generate", "deployment.deploy"])


#: what a step does (repeated: drawn more often); "holder-*" send the message of the
#: job's current holder, "assign" and "leases" call the dispatcher at a later time
_KINDS = [
    *["new"] * 4,
    *["register", "heartbeat"] * 2,
    *["assign"] * 4,
    *["holder-claims", "holder-finishes", "leases"] * 2,
    "holder-releases",
    "invalid",
    "claim",
    "done",
    "failed",
    "released",
    "cancel",
    "offline",
    "online",
    "shutdown",
    "junk",
]


@st.composite
def _step(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(_KINDS))
    task_id, agent = draw(_IDS), draw(_AGENTS)
    attempt = draw(st.integers(1, 3))
    if kind == "new":
        fields: dict[str, Any] = {"priority": draw(st.sampled_from(["low", "medium", "high"]))}
        if draw(st.booleans()) and draw(st.booleans()):
            fields["assigned_to"] = agent
        return kind, (T.tasks_new, env(sub(task_id, draw(_TYPES), **fields)))
    if kind == "invalid":
        return kind, (T.tasks_new, env(sub(task_id, priority="urgent")))
    if kind == "cancel":
        return kind, (T.tasks_cancel, env({"task_id": task_id}))
    if kind in ("register", "heartbeat"):
        role, slots = draw(_ROLES), draw(st.integers(1, 3))
        topic = T.agents_register if kind == "register" else T.agents_heartbeat
        field_name = "max_tasks" if kind == "register" else "capacity"
        payload = {"agent_id": agent, "role": role, field_name: slots}
        return kind, (topic, env(payload, agent, role))
    if kind in ("offline", "online"):
        payload = {"agent_id": agent, "status": kind}
        return kind, (T.agent_status(agent), env(payload))
    if kind == "shutdown":
        return kind, (T.agents_shutdown, env({"agent_id": agent, "reason": "graceful"}, agent))
    if kind == "junk":
        topic = draw(st.sampled_from([T.tasks_new, T.tasks_assigned, T.agents_heartbeat]))
        return kind, (topic, draw(st.binary(max_size=40)))
    if kind in ("holder-claims", "holder-finishes", "holder-releases"):
        return kind, (task_id, draw(st.booleans()))
    if kind == "assign":
        return kind, draw(st.sampled_from([0.0, 0.5, 5.0]))
    if kind == "leases":
        return kind, draw(st.sampled_from([0.0, 5.0, 29.0, 35.0]))
    topic = {
        "claim": T.tasks_assigned,
        "done": T.tasks_complete,
        "failed": T.tasks_failed,
        "released": T.tasks_released,
    }[kind]
    return kind, (topic, env({"task_id": task_id, "agent_id": agent, "attempt": attempt}, agent))


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(_ROLES, st.integers(1, 3)), min_size=3, max_size=3),
    st.lists(_step(), min_size=30, max_size=80),
)
def test_any_message_sequence_keeps_the_invariants(
    agents: list[tuple[str, int]], steps: list[tuple[str, Any]]
) -> None:
    """Whatever arrives, in whatever order: no exception; every message acknowledged
    exactly once, last; no agent ever given more than its slots; each (task, attempt)
    assigned at most once and taken over at most once; at most one final outcome per
    task (accepted from its holder, or published by the dispatcher); the dispatcher's
    books agree with themselves."""
    d = make()
    for agent_id, (role, slots) in zip(("p1", "p2", "p3"), agents, strict=True):
        register(d, agent_id, role, slots)
    now = 0.0
    assigned: dict[tuple[str, int], str] = {}
    taken_over: set[tuple[str, int]] = set()
    failed_by_us: set[str] = set()
    finished: set[str] = set()

    def check(commands: list[DispatchCommand]) -> None:
        for c in commands:
            if isinstance(c, SendRevocation) and c.reason is RevokeReason.HOLDER_GONE:
                key = (c.task_id, c.attempt)
                assert assigned.get(key) == c.agent_id
                assert key not in taken_over
                taken_over.add(key)
            elif isinstance(c, SendFailed):
                assert c.spec.task_id not in failed_by_us
                failed_by_us.add(c.spec.task_id)

    def deliver(topic: str, payload: bytes) -> None:
        commands = d.receive(topic, payload, now)
        assert commands.count(ACK) == 1
        assert commands[-1] == ACK
        check(commands[:-1])

    for kind, arg in steps:
        now += 0.25
        if kind == "assign":
            given = given_to(d.assignments(now + arg))
            for task_id, agent_id, attempt in given:
                assert (task_id, attempt) not in assigned
                assigned[(task_id, attempt)] = agent_id
            for agent_id in {a for _, a, _ in given}:
                slots = d.peers[agent_id].max_tasks
                assert slots is not None
                assert d.in_flight(agent_id) <= slots
            # no hoarding, whatever the round's bookkeeping: no queued task is left while
            # an eligible agent has a free slot (judged from scratch over every peer)
            free = [a for a in d.peers.peers if d.free_slots(a, now + arg) > 0]
            for job in d.jobs.values():
                if job.state is Q:
                    roles, to = job.key
                    assert not [a for a in free if d.peers[a].role in roles and to in (None, a)], (
                        job.task_id
                    )
        elif kind == "leases":
            check(d.check_leases(now + arg))
        elif kind.startswith("holder-"):
            task_id, ok = arg
            job = d.jobs.get(task_id)
            if job is None or job.agent_id is None:
                continue
            payload = {"task_id": task_id, "agent_id": job.agent_id, "attempt": job.attempt}
            topic = {
                "holder-claims": T.tasks_assigned,
                "holder-finishes": T.tasks_complete if ok else T.tasks_failed,
                "holder-releases": T.tasks_released,
            }[kind]
            deliver(topic, env(payload, job.agent_id))
        else:
            deliver(*arg)
        # a task finishes once and never comes back; one final outcome per finished task
        assert finished <= set(d.finished)
        finished |= set(d.finished)
        assert not finished & set(d.jobs)
        c = d.counters
        assert c["completed"] + c["failed"] + c["cancelled"] + c["invalid"] == len(finished)
        # the books agree: each agent's slots in use are the jobs it holds
        holders = [j.agent_id for j in d.jobs.values() if j.agent_id is not None]
        for agent_id in ("p1", "p2", "p3"):
            assert d.in_flight(agent_id) == holders.count(agent_id)
        for job in d.jobs.values():
            assert (job.agent_id is None) == (job.state is Q)
        assert d.statistics(now).queued == sum(j.state is Q for j in d.jobs.values())


def test_the_swarm_view_lists_agents_and_counts_outcomes() -> None:
    d = make()
    register(d, "w1", now=0.0)
    register(d, "w2", now=0.0)
    status(d, "w2", online=False, now=5.0)
    submit(d, "t1")
    ((task_id, agent_id, attempt),) = given_to(d.assignments(1.0))
    outcome(d, task_id, agent_id, attempt, ok=False)
    view = d.swarm_view(10.0, epoch=4)
    agents = {a["agent_id"]: a for a in view["agents"]}
    assert (agents["w1"]["online"], agents["w2"]["online"]) == (True, False)
    assert agents["w1"]["last_seen_age"] == 10.0
    assert view["outcomes"] == {"completed": 0, "failed": 1}
    assert view["epoch"] == 4
    submit(d, "q", task_type="deployment.deploy")  # nobody may take it: it stays queued
    view = d.swarm_view(11.0, epoch=4)
    assert (view["queued"], view["queued_by_role"]["deployment"]) == (1, 1)
    assert view["queued_by_role"]["testing"] == 0
    assert (view["assigned"], view["claimed"]) == (0, 0)
    assert view["free_slots_by_role"]["testing"] == 2


def test_a_batch_writes_only_the_last_record_of_each_task() -> None:
    """A submission assigned in its own batch goes out as one record (assigned), not
    queued then assigned: the batch is acknowledged after all of it anyway."""
    d = make()
    register(d, "a1", max_tasks=1)
    commands = d.receive(T.tasks_new, env(sub("t")), 0.0)
    commands += d.receive(T.tasks_new, env(sub("u")), 0.0)
    commands += d.assignments(0.0)
    assert [c for c in commands if isinstance(c, WriteRecord)] == [
        WriteRecord("t", Q, 1, None, sub("t")),
        WriteRecord("u", Q, 1, None, sub("u")),
        WriteRecord("t", A, 1, "a1", sub("t")),
    ]
    kept = latest_records(commands)
    # t's queued record is superseded within the batch; u stays queued (no free slot)
    assert [c for c in kept if isinstance(c, WriteRecord)] == [
        WriteRecord("u", Q, 1, None, sub("u")),
        WriteRecord("t", A, 1, "a1", sub("t")),
    ]
    # everything else is kept, in order: both acks, then the assignment after its record
    others = [c for c in commands if not isinstance(c, WriteRecord)]
    assert [c for c in kept if not isinstance(c, WriteRecord)] == others
    assert kept.index(WriteRecord("t", A, 1, "a1", sub("t"))) < kept.index(
        SendAssignment("a1", "t", sub("t"), 1)
    )
    assert latest_records(others) == others


# ------------------------------------------------------------------ a claim store
def stored(**kw: Any) -> Dispatcher:
    """A dispatcher whose assignments go through a claim store (docs/stores.md)."""
    return make(store=parse_store_url("redis://h/0", source="flag"), **kw)


def test_with_a_store_an_assignment_is_claimed_for_its_agent_first() -> None:
    d = stored()
    register(d, "a", max_tasks=1)
    submit(d, "t1")
    (ask,) = d.assignments(0.0)
    assert ask == StoreAssign("t1", 1, "a", takeover=False)
    assert d.free_slots("a", 0.0) == 0  # the slot is taken while the store decides
    assert d.on_store_verdict(ask, Verdict.WON, 1.0) == [
        WriteRecord("t1", A, 1, "a", sub("t1")),
        SendAssignment("a", "t1", sub("t1"), 1),
    ]
    assert d.on_store_verdict(ask, Verdict.WON, 1.0) == []  # answered once


def test_with_a_store_another_dispatcher_s_assignment_is_followed() -> None:
    """LOST: the store gave the attempt to b (a second dispatcher's assignment, or the
    last one's, cut off before its record): b's custody is recorded and sent to b."""
    d = stored()
    register(d, "a")
    register(d, "b")
    submit(d, "t1")
    (ask,) = d.assignments(0.0)
    other = "b" if ask.agent_id == "a" else "a"
    hold = Hold("t1", 1, other, released=False, live=True, finished=False)
    assert d.on_store_verdict(ask, Verdict.LOST, 1.0, hold=hold) == [
        WriteRecord("t1", A, 1, other, sub("t1")),
        SendAssignment(other, "t1", sub("t1"), 1),
    ]
    assert (d.in_flight(ask.agent_id), d.in_flight(other)) == (0, 1)


def test_with_a_store_a_takeover_waits_for_the_holder_s_lease() -> None:
    d = stored()
    register(d, "a", max_tasks=1)
    register(d, "b", max_tasks=1)
    submit(d, "t1")
    (ask,) = d.assignments(0.0)
    d.on_store_verdict(ask, Verdict.WON, 0.0)
    holder = ask.agent_id
    other = "b" if holder == "a" else "a"
    shutdown(d, holder, now=1.0)  # gone: revoked, attempt 2 queued
    (again,) = d.assignments(1.0)
    assert again == StoreAssign("t1", 2, other, takeover=True)
    held = Hold("t1", 1, holder, released=False, live=True, finished=False)
    assert d.on_store_verdict(again, Verdict.HELD, 1.0, hold=held) == []
    assert d.assignments(1.5) == []  # not asked again before the next lease check
    d.check_leases(2.0)
    (third,) = d.assignments(2.0)
    assert third == StoreAssign("t1", 2, other, takeover=True)
    assert d.on_store_verdict(third, Verdict.WON, 2.0)[-1] == SendAssignment(
        other, "t1", sub("t1"), 2
    )


def test_with_a_store_a_finished_task_s_outcome_is_published_again() -> None:
    d = stored()
    register(d, "a")
    submit(d, "t1")
    (ask,) = d.assignments(0.0)
    result = {"task_id": "t1", "agent_id": "x", "attempt": 1, "status": "success"}
    done = StoredOutcome("t1", 1, "x", result)
    hold = Hold("t1", 1, "x", released=False, live=False, finished=True)
    assert d.on_store_verdict(ask, Verdict.FINISHED, 0.0, hold=hold, outcome=done) == [
        PublishStoredOutcome("t1", result, success=True),
        WriteRecord("t1", RecordState.DONE, 1, "x", sub("t1")),
    ]
    assert "t1" in d.finished
    assert d.in_flight("a") == 0


def test_with_a_store_a_released_attempt_queues_the_next_one() -> None:
    d = stored()
    register(d, "a", max_tasks=1)
    submit(d, "t1")
    (ask,) = d.assignments(0.0)
    hold = Hold("t1", 1, "z", released=True, live=False, finished=False)
    assert d.on_store_verdict(ask, Verdict.LOST, 0.0, hold=hold) == [
        WriteRecord("t1", Q, 2, None, sub("t1"))
    ]
    assert d.assignments(0.0) == [StoreAssign("t1", 2, "a", takeover=False)]


def test_with_a_store_that_does_not_answer_the_task_waits_queued() -> None:
    d = stored()
    register(d, "a", max_tasks=1)
    submit(d, "t1")
    (ask,) = d.assignments(0.0)
    d.on_store_unavailable(ask)
    assert d.free_slots("a", 0.0) == 1
    assert d.queued() == 1
    assert d.assignments(0.0) == [ask]  # the same question, once the shell asks again
