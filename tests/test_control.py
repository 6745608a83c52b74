"""Cancel and retry, the requester's decisions (sans-IO): :class:`CancelTracker` fed the
retained messages, replies, outcomes and statuses; :func:`retry_submission` fed final
states. End to end (real mosquitto, real agents): tests/test_cli_control.py."""

from __future__ import annotations

from typing import Any

import mqtt5
import pytest

from sheri_trio.mqtt import Message
from sheri_trio.swarm import (
    CancelOutcome,
    CancelTracker,
    RetryRefused,
    Topics,
    decode_envelope,
    encode,
    parse_task,
    retry_submission,
)

T = Topics("s")


def retained(topic: str, payload: dict[str, Any]) -> Message:
    return Message(mqtt5.PublishPacket(topic, payload=encode(None, None, payload), retain=True))


def status(agent_id: str, online: bool = True) -> Message:
    payload = {"agent_id": agent_id, "status": "online" if online else "offline"}
    return retained(T.agent_status(agent_id), payload)


def feed(tracker: CancelTracker, topic: str, **payload: Any) -> Any:
    return tracker.on_message(topic, decode_envelope(encode(None, None, payload)))


def reply(tracker: CancelTracker, agent_id: str, result: str, **fields: Any) -> Any:
    return feed(
        tracker,
        T.tasks_cancel_reply,
        request_id=tracker.request_id,
        task_id=tracker.task_id,
        agent_id=agent_id,
        result=result,
        scope=fields.pop("scope", "agent"),
        **fields,
    )


def test_a_finished_task_is_decided_by_its_retained_state() -> None:
    tracker = CancelTracker(T, "t")
    final = retained(T.task_state("t"), {"task_id": "t", "state": "done", "agent_id": "a1"})
    report = tracker.on_retained([status("a1"), final])
    assert report is not None
    assert (report.outcome, report.state, report.agent_id) == (CancelOutcome.FINISHED, "done", "a1")


def test_broadcast_unknown_only_once_every_online_agent_said_so() -> None:
    tracker = CancelTracker(T, "t")
    assert tracker.on_retained([status("a1"), status("a2"), status("gone", online=False)]) is None
    assert reply(tracker, "a1", "unknown") is None  # a2 may know it
    assert feed(tracker, T.tasks_cancel_reply, request_id="other", task_id="t") is None
    report = reply(tracker, "a2", "unknown")
    assert report.outcome is CancelOutcome.UNKNOWN


def test_broadcast_a_live_record_is_never_unknown() -> None:
    tracker = CancelTracker(T, "t")
    live = retained(T.task_state("t"), {"task_id": "t", "state": "claimed", "agent_id": "a1"})
    tracker.on_retained([status("a2"), live])
    assert reply(tracker, "a2", "unknown") is None
    report = tracker.outcome(10)
    assert report.outcome is CancelOutcome.NO_ANSWER
    assert "claimed" in report.detail


def test_the_reporter_s_cancel_of_a_queued_task() -> None:
    tracker = CancelTracker(T, "t")
    tracker.on_retained([status("a1"), status("a2")])
    assert reply(tracker, "a2", "known") is None
    failed = {"task_id": "t", "agent_id": "a1", "reason": "cancelled", "attempt": 1}
    assert feed(tracker, T.tasks_failed, **failed) is None  # the reply says which kind
    report = reply(tracker, "a1", "cancelled")
    assert (report.outcome, report.agent_id) == (CancelOutcome.CANCELLED, "a1")


def test_a_running_task_is_stopped_when_its_cancelled_outcome_comes() -> None:
    tracker = CancelTracker(T, "t")
    tracker.on_retained([status("a1")])
    assert reply(tracker, "a1", "stopping", holder="a1", attempt=2) is None
    report = feed(tracker, T.tasks_failed, task_id="t", agent_id="a1", reason="cancelled")
    assert report.outcome is CancelOutcome.STOPPED
    assert "a1 (attempt 2)" in report.detail


def test_a_run_that_ends_before_the_stop_is_finished() -> None:
    tracker = CancelTracker(T, "t")
    tracker.on_retained([status("a1")])
    reply(tracker, "a1", "stopping", holder="a1", attempt=1)
    report = feed(tracker, T.tasks_complete, task_id="t", agent_id="a1")
    assert (report.outcome, report.state) == (CancelOutcome.FINISHED, "done")


def test_dispatch_mode_the_dispatcher_s_answer_decides() -> None:
    tracker = CancelTracker(T, "t")
    disp = retained(T.dispatch_status, {"agent_id": "d", "epoch": 1, "status": "online"})
    tracker.on_retained([status("a1"), disp])
    assert reply(tracker, "a1", "unknown") is None  # not the swarm's answer
    report = reply(tracker, "d", "unknown", scope="swarm")
    assert report.outcome is CancelOutcome.UNKNOWN
    tracker = CancelTracker(T, "t")
    tracker.on_retained([disp])
    assert reply(tracker, "d", "finished", scope="swarm", state="failed").state == "failed"


def test_timeouts_say_what_is_known() -> None:
    tracker = CancelTracker(T, "t")
    tracker.waiting = "reading its retained state"
    assert "while reading its retained state" in tracker.outcome(3).detail
    tracker.waiting = None
    assert "no agent is online" in tracker.outcome(3).detail
    tracker.on_retained([status("a1"), status("a2")])
    reply(tracker, "a1", "known", holder="a2")
    detail = tracker.outcome(3).detail
    assert "held by a2, which did not answer" in detail
    assert tracker.outcome(3).outcome is CancelOutcome.NO_ANSWER
    tracker = CancelTracker(T, "t")
    gone = retained(T.dispatch_status, {"agent_id": "d", "epoch": 1, "status": "offline"})
    tracker.on_retained([status("a1"), gone])
    assert "no dispatcher is online" in tracker.outcome(3).detail


def record(state: str, **fields: Any) -> dict[str, Any]:
    task = {"task_id": "t", "type": "testing.run", "payload": {"x": 1}, "priority": "high"}
    return {"task_id": "t", "state": state, "attempt": 2, "task": task, **fields}


def test_a_retry_resubmits_the_kept_submission_under_the_next_free_name() -> None:
    submission = retry_submission(record("failed"))
    assert submission == {
        "task_id": "t.retry-1",
        "type": "testing.run",
        "payload": {"x": 1},
        "priority": "high",
        "retry_of": "t",
    }
    assert parse_task(submission).retry_of == "t"
    assert parse_task(submission).to_wire()["retry_of"] == "t"
    assert retry_submission(record("cancelled"), {"t.retry-1", "t.retry-2"})["task_id"] == (
        "t.retry-3"
    )


@pytest.mark.parametrize(
    ("rec", "says"),
    [
        (record("done"), "completed"),
        (record("claimed"), "has not failed"),
        (record("released"), "has not failed"),
        ({"task_id": "t", "state": "failed"}, "does not hold its submission"),
        (
            {"task_id": "t", "state": "failed", "task_omitted": "too large"},
            "(too large)",
        ),
        ({**record("failed"), "task_id": "x" * 124}, "128 characters"),
    ],
)
def test_a_retry_is_refused_with_the_reason(rec: dict[str, Any], says: str) -> None:
    if rec["task_id"] != "t":
        rec["task"] = {**rec["task"], "task_id": rec["task_id"]}
    with pytest.raises(RetryRefused, match=says.replace("(", r"\(").replace(")", r"\)")):
        retry_submission(rec)
