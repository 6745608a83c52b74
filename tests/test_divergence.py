"""Seeing that the broker keeps no single order (issue 11, item 4), sans-IO: the
scheduler and the election's watch are fed what agents on two bridged brokers would see,
and must report each incident exactly once (one agent publishes), and nothing on the
orders a single broker gives."""

from __future__ import annotations

import pytest
from test_scheduler import claim, make, outcome, task, win

from sheri_trio.swarm import DIVERGENCE_FIX, DivergenceWatch, Incident, Messages, ReportDivergence
from sheri_trio.swarm._scheduler import StopReason, StopTask

SENTENCE = (
    "the broker does not deliver one order to all agents, e.g. a cluster or a bridge: "
    "configure a claim store"
)


def reports(commands: list[object]) -> list[ReportDivergence]:
    return [c for c in commands if isinstance(c, ReportDivergence)]


def test_the_sentence_is_the_issue_s() -> None:
    assert DIVERGENCE_FIX == SENTENCE


def test_a_holder_that_sees_its_attempt_finished_by_another_reports_it() -> None:
    """Bridged: a's claim came first on a's broker, b's on b's; b finished first."""
    a = make("a")
    task(a, "t1")
    a.claims()
    win(a, "t1")
    claim(a, "t1", "b")  # b's claim arrives later here: an ordinary lost claim
    commands = outcome(a, "t1", "b")
    (report,) = reports(commands)
    assert report == ReportDivergence(
        Incident.SECOND_HOLDER, "t1", 1, ("a", "b"), "s/tasks/complete", publish=True
    )
    assert report.message == f"task t1 attempt 1 was held by two agents (a and b); {SENTENCE}"
    assert next(c for c in commands if isinstance(c, StopTask)).reason is StopReason.FENCED
    assert reports(outcome(a, "t1", "b")) == []  # once per incident (a redelivery)


@pytest.mark.parametrize(("me", "other", "publishes"), [("a", "b", True), ("b", "a", False)])
def test_two_outcomes_of_one_attempt_are_reported_by_the_smaller_id(
    me: str, other: str, publishes: bool
) -> None:
    """Both finished before seeing the other's outcome: both see a second outcome, the
    smaller id of the two publishes it."""
    s = make(me)
    task(s, "t1")
    s.claims()
    start = win(s, "t1")
    assert s.finish(start.entry, success=True) == []
    assert reports(outcome(s, "t1", me)) == []  # our own echo
    published = reports(outcome(s, "t1", other, ok=False))
    assert s.divergence.incidents == 1  # seen (and logged) by both ...
    if not publishes:
        assert published == []  # ... published by the smaller id only
        return
    (report,) = published
    assert report.incident is Incident.SECOND_OUTCOME
    assert (report.agents, report.topic, report.publish) == (("a", "b"), "s/tasks/failed", True)
    assert "has two final outcomes (from a and b): it ran twice; " + SENTENCE in report.message


def test_an_observer_logs_a_second_outcome_and_leaves_publishing_to_the_two(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = make("c")
    task(s, "t1")
    claim(s, "t1", "a")
    assert outcome(s, "t1", "a") == []
    assert outcome(s, "t1", "b") == []  # not published by c ...
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert line.startswith("task t1 attempt 1 has two final outcomes (from a and b)")  # ... logged
    assert SENTENCE in line
    assert s.divergence.incidents == 1


def test_the_orders_of_one_broker_raise_no_alarm() -> None:
    """Lost claims, a fenced older attempt after a takeover, echoes, redeliveries, a
    cancel before anyone claimed: none is an incident."""
    s = make("a")
    task(s, "t1")
    s.claims()
    claim(s, "t1", "b")  # b won
    claim(s, "t1", "a")  # ours lost
    assert outcome(s, "t1", "b") == []
    assert outcome(s, "t1", "b") == []  # a redelivery
    task(s, "t2")
    s.claims()
    start = win(s, "t2")
    claim(s, "t2", "b", attempt=2)  # we were presumed dead: taken over, we stop
    assert outcome(s, "t2", "b", attempt=2) == []
    assert s.finish(start.entry, success=True) == []  # our late finish of attempt 1 ...
    assert outcome(s, "t2", "a", attempt=1) == []  # ... and its echo: fenced, no alarm
    task(s, "t3")
    assert s.receive(s.topics.tasks_cancel, b'{"payload": {"task_id": "t3"}}', 0.0) is not None
    assert s.divergence.incidents == 0


def test_the_report_on_the_errors_topic() -> None:
    report = ReportDivergence(
        Incident.SECOND_OUTCOME, "t1", 2, ("a", "b"), "s/tasks/complete", publish=True
    )
    assert Messages("a", "general").divergence_report(report) == {
        "error": report.message,
        "kind": "divergence",
        "incident": "second_outcome",
        "topic": "s/tasks/complete",
        "task_id": "t1",
        "attempt": 2,
        "agents": ["a", "b"],
        "reported_by": "a",
    }


def test_two_dispatchers_are_reported_once_by_the_older_term() -> None:
    a, b = DivergenceWatch("a"), DivergenceWatch("b")
    topic = "s/dispatch/status"
    (ra,) = a.on_leader("b", 3, my_epoch=3, topic=topic)  # one epoch: the smaller id
    (rb,) = b.on_leader("a", 3, my_epoch=3, topic=topic)
    assert (ra.incident, ra.agents, ra.attempt) == (Incident.SECOND_LEADER, ("a", "b"), 3)
    assert (ra.publish, rb.publish) == (True, False)
    assert ra.message == f"two dispatchers are in office at once (a and b; epoch 3); {SENTENCE}"
    assert a.on_leader("b", 3, my_epoch=3, topic=topic) == []  # once
    (newer,) = b.on_leader("c", 5, my_epoch=4, topic=topic)  # the older term publishes
    (older,) = DivergenceWatch("c").on_leader("b", 4, my_epoch=5, topic=topic)
    assert (newer.publish, older.publish) == (True, False)
    # not incidents: not in office, our own status
    assert a.on_leader("c", 1, my_epoch=None, topic=topic) == []
    assert a.on_leader("a", 3, my_epoch=3, topic=topic) == []


def test_the_watch_is_bounded() -> None:
    w = DivergenceWatch("a", limit=2)
    for i in range(5):
        w.finished(f"t{i}", 1)
    assert w.on_outcome("t0", 1, "b", holding=None, topic="x") == []  # t0 forgotten
    assert w.on_outcome("t4", 1, "b", holding=None, topic="x")  # t4 still known
