"""The sans-IO scheduler: messages and times in, commands out. No bus, no clock, no trio.

Each test feeds :class:`Scheduler.receive` the bytes an agent's subscription would
deliver (in the broker's order) with an explicit ``now``, and asserts the commands.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sheri_trio.stores import parse_store_url
from sheri_trio.swarm._config import AgentConfig
from sheri_trio.swarm._messages import encode
from sheri_trio.swarm._presence import rendezvous_score
from sheri_trio.swarm._protocol import Topics
from sheri_trio.swarm._scheduler import (
    CancelResult,
    ClearPending,
    Command,
    FailReason,
    Phase,
    Reannounce,
    ReportError,
    Scheduler,
    SendCancelReply,
    SendClaim,
    SendFailed,
    SendPending,
    SendRelease,
    StartTask,
    StopReason,
    StopTask,
)

SWARM = "s"
T = Topics(SWARM)


def make(agent_id: str = "me", role: str = "testing", **kw: Any) -> Scheduler:
    options: dict[str, Any] = {"swarm": SWARM, "max_tasks": 2, "lease_time": 30.0}
    options.update(kw)
    s = Scheduler(AgentConfig(role=role, agent_id=agent_id, **options))
    alive(s, agent_id, role, 0.0)
    return s


def env(payload: dict[str, Any], agent_id: str | None = None, role: str | None = None) -> bytes:
    return encode(agent_id, role, payload)


def task(
    s: Scheduler, task_id: str, now: float = 0.0, task_type: str = "testing.run", **fields: Any
) -> list[Command]:
    body = {"task_id": task_id, "type": task_type, "payload": {}, **fields}
    return s.receive(T.tasks_new, env(body), now)


def claim(s: Scheduler, task_id: str, agent_id: str, attempt: int = 1, now: float = 0.0) -> Any:
    body = {"task_id": task_id, "agent_id": agent_id, "attempt": attempt}
    return s.receive(T.tasks_assigned, env(body, agent_id), now)


def outcome(s: Scheduler, task_id: str, agent_id: str, attempt: int = 1, ok: bool = True) -> Any:
    body = {"task_id": task_id, "agent_id": agent_id, "attempt": attempt}
    return s.receive(T.tasks_complete if ok else T.tasks_failed, env(body, agent_id), 0.0)


def alive(s: Scheduler, agent_id: str, role: str, now: float) -> list[Command]:
    return s.receive(T.agents_heartbeat, env({"agent_id": agent_id, "role": role}), now)


def offline(s: Scheduler, agent_id: str, now: float) -> list[Command]:
    status = env({"agent_id": agent_id, "status": "offline"})
    return s.receive(T.agent_status(agent_id), status, now)


def win(s: Scheduler, task_id: str, attempt: int = 1) -> StartTask:
    (start,) = claim(s, task_id, s.me, attempt)
    assert isinstance(start, StartTask)
    return start


def run_one_by_one(s: Scheduler) -> list[str]:
    """Claim, win and finish one task at a time until none is left; the order."""
    order = []
    while claims := s.claims():
        (c,) = claims
        order.append(c.task_id)
        start = win(s, c.task_id)
        s.finish(start.entry, success=True)
        s.on_ended(start.entry)
    return order


# ------------------------------------------------------------------ claiming
def test_a_submission_is_claimed_for_attempt_one_up_to_the_free_slots() -> None:
    s = make()
    for i in range(3):
        assert task(s, f"t{i}") == []
    assert s.claims() == [SendClaim("t0", 1), SendClaim("t1", 1)]
    assert s.free_slots() == 0
    assert s.claims() == []  # both slots are busy while the claims are out
    assert s.entries["t0"].phase is Phase.CLAIMING


def test_a_won_claim_starts_the_task_and_holds_its_slot_until_it_ends() -> None:
    s = make(max_tasks=1)
    task(s, "a")
    task(s, "b")
    assert s.claims() == [SendClaim("a", 1)]
    start = win(s, "a")
    assert (start.entry.task_id, start.attempt) == ("a", 1)
    assert s.entries["a"].phase is Phase.RUNNING
    assert s.free_slots() == 0
    assert s.claims() == []
    assert s.finish(start.entry, success=True) == []
    s.on_ended(start.entry)
    assert "a" not in s.entries
    assert s.book.is_finished("a")
    assert s.claims() == [SendClaim("b", 1)]


def test_a_claim_lost_to_an_earlier_one_frees_the_slot_and_watches_the_holder() -> None:
    s = make(max_tasks=1)
    alive(s, "other", "testing", 0.0)
    task(s, "a")
    assert s.claims() == [SendClaim("a", 1)]
    assert claim(s, "a", "other") == []  # first in the broker's order: other wins
    assert claim(s, "a", "me") == []  # ours comes second: lost
    assert s.entries["a"].phase is Phase.HELD
    assert s.counters["lost"] == 1
    assert s.free_slots() == 1
    assert s.claims() == []


def test_a_silent_holder_is_taken_over_with_the_next_attempt_after_its_lease() -> None:
    s = make(lease_time=30.0)
    alive(s, "other", "testing", 0.0)
    task(s, "a")
    claim(s, "a", "other", now=1.0)
    s.check_leases(30.9)  # holder seen at 1.0: the lease runs to 31.0
    assert s.claims() == []
    s.check_leases(31.0)
    assert s.claims() == [SendClaim("a", 2)]


def register(s: Scheduler, agent_id: str, role: str, now: float) -> list[Command]:
    return s.receive(T.agents_register, env({"agent_id": agent_id, "role": role}), now)


def test_a_holder_offline_by_its_will_keeps_its_task_until_its_lease_runs_out() -> None:
    """mosquitto publishes every client's will as it stops: a will is no takeover (a
    broker's restart would re-run every running task); the lease decides, and a holder
    heard again keeps its task."""
    s = make(lease_time=30.0)
    alive(s, "other", "testing", 0.0)
    task(s, "a")
    claim(s, "a", "other", now=1.0)
    assert offline(s, "other", 2.0) == []
    s.check_leases(30.9)
    assert s.claims() == []
    alive(s, "other", "testing", 5.0)  # back (a reconnect): its lease runs from then
    s.check_leases(34.9)
    assert s.claims() == []
    s.check_leases(35.0)  # and then silent for the lease: a crash
    assert s.claims() == [SendClaim("a", 2)]


def test_a_new_process_of_a_holder_registering_takes_its_tasks_over_at_once() -> None:
    s = make(lease_time=30.0)
    alive(s, "other", "testing", 0.0)
    task(s, "a")
    claim(s, "a", "other", now=1.0)
    offline(s, "other", 2.0)  # killed: its will
    register(s, "other", "testing", 3.0)  # started again: a register is once per process
    assert s.claims() == [SendClaim("a", 2)]


def test_a_silence_while_we_are_cut_off_counts_for_nobody() -> None:
    """Our own connection down (a broker's restart silences everyone at once): no lease
    runs out meanwhile, and leases count from our reconnect."""
    s = make(lease_time=30.0)
    alive(s, "other", "testing", 0.0)
    task(s, "a")
    claim(s, "a", "other", now=1.0)
    s.connection(False, 10.0)
    s.check_leases(40.0)
    assert s.claims() == []
    s.connection(True, 50.0)
    s.check_leases(79.9)
    assert s.claims() == []
    s.check_leases(80.0)
    assert s.claims() == [SendClaim("a", 2)]


def test_a_release_is_taken_over_with_the_next_attempt() -> None:
    s = make()
    task(s, "a")
    claim(s, "a", "other")
    body = {"task_id": "a", "agent_id": "other", "attempt": 1}
    assert s.receive(T.tasks_released, env(body, "other"), 5.0) == []
    assert s.claims() == [SendClaim("a", 2)]


def test_claims_go_by_priority_then_arrival() -> None:
    s = make(max_tasks=3, preference_window=0)
    task(s, "low", priority="low")
    task(s, "medium")
    task(s, "high", priority="high")
    assert [c.task_id for c in s.claims()] == ["high", "medium", "low"]


def test_an_agent_claims_the_tasks_it_is_preferred_for_first() -> None:
    s = make(max_tasks=1, preference_window=4)
    alive(s, "peer", "testing", 0.0)
    ids = [f"t{i}" for i in range(12)]
    for task_id in ids:
        task(s, task_id)
    mine = [t for t in ids if rendezvous_score(f"{t}/me") > rendezvous_score(f"{t}/peer")]
    assert mine
    assert len(mine) < len(ids)
    (first,) = s.claims()
    assert first.task_id == mine[0]


def test_queue_overflow_keeps_the_burst_and_drops_only_beyond_its_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = make(max_tasks=1, queue_limit=2, overflow_limit=1, preference_window=0)
    for task_id in ("a", "b", "c", "d"):
        task(s, task_id)
    assert "d" not in s.entries  # beyond queue + overflow: left to other agents
    assert "queue and overflow full" in caplog.text
    assert run_one_by_one(s) == ["a", "b", "c"]
    assert s.entries == {}


def test_a_more_urgent_task_takes_a_full_queue_place_and_the_least_urgent_waits() -> None:
    s = make(max_tasks=1, queue_limit=2, preference_window=0)
    task(s, "low-1", priority="low")
    task(s, "low-2", priority="low")
    task(s, "high", priority="high")  # low-2 moves to the overflow
    assert run_one_by_one(s) == ["high", "low-1", "low-2"]


def test_an_assigned_task_is_taken_only_by_its_agent() -> None:
    s = make()
    task(s, "x", assigned_to="someone-else")
    task(s, "y", assigned_to="me")
    assert s.claims() == [SendClaim("y", 1)]


# ----------------------------------------------------------------- endings
def test_a_newer_claim_while_running_fences_our_run() -> None:
    s = make()
    task(s, "a")
    s.claims()
    start = win(s, "a")
    # we were presumed dead and somebody took over with attempt 2
    (stop,) = claim(s, "a", "other", attempt=2)
    assert stop == StopTask(start.entry, StopReason.FENCED)
    assert start.entry.phase is Phase.STOPPING
    assert claim(s, "a", "third", attempt=2) == []  # a later claim for it: lost, nothing to do


def test_a_forged_outcome_in_our_name_stops_our_run_too() -> None:
    """We book our own outcome before it goes out, so one the book accepts while we
    still run was not ours: the task is final for every observer, so ours stops."""
    s = make()
    task(s, "a")
    s.claims()
    start = win(s, "a")
    assert outcome(s, "a", "me") == [StopTask(start.entry, StopReason.FENCED)]


def test_a_newer_outcome_while_running_stops_the_run_silently() -> None:
    s = make()
    alive(s, "other", "testing", 0.0)
    task(s, "a")
    claim(s, "a", "other")
    s.check_leases(100.0)
    s.claims()
    start = win(s, "a", attempt=2)
    # the old holder was not dead after all, and its outcome arrives: stale, ignored
    assert outcome(s, "a", "other", attempt=1) == []
    assert start.entry.phase is Phase.RUNNING
    # a final outcome of the current attempt by somebody else: stop ours (and report
    # the second holder: tests/test_divergence.py)
    *_, stop = outcome(s, "a", "intruder", attempt=2)
    assert stop == StopTask(start.entry, StopReason.FENCED)
    s.on_ended(start.entry)
    assert "a" not in s.entries
    assert s.free_slots() == 2


def test_a_cancel_stops_a_running_task() -> None:
    s = make()
    task(s, "a")
    s.claims()
    start = win(s, "a")
    (stop,) = s.receive(T.tasks_cancel, env({"task_id": "a"}), 1.0)
    assert stop == StopTask(start.entry, StopReason.CANCEL)


def test_a_cancel_of_an_unclaimed_task_fails_it_once_by_the_reporter() -> None:
    a, b = make("a-agent"), make("b-agent")
    for s in (a, b):
        alive(s, "a-agent", "testing", 0.0)
        alive(s, "b-agent", "testing", 0.0)
        task(s, "q")
    (failed,) = a.receive(T.tasks_cancel, env({"task_id": "q"}), 1.0)
    assert isinstance(failed, SendFailed)
    assert (failed.reason, failed.attempt) == (FailReason.CANCELLED, 1)
    assert b.receive(T.tasks_cancel, env({"task_id": "q"}), 1.0) == []
    assert a.claims() == []
    assert b.claims() == []


def cancel(s: Scheduler, task_id: str, request_id: str | None = "r1") -> list[Command]:
    body: dict[str, Any] = {"task_id": task_id}
    if request_id is not None:
        body["request_id"] = request_id
    return s.receive(T.tasks_cancel, env(body), 1.0)


def reply(task_id: str, result: CancelResult, **kw: Any) -> SendCancelReply:
    return SendCancelReply("r1", task_id, result, **kw)


def test_every_agent_answers_a_cancel_request_with_what_it_knows() -> None:
    holder, other = make("a-agent"), make("b-agent")
    for s in (holder, other):
        alive(s, "a-agent", "testing", 0.0)
        alive(s, "b-agent", "testing", 0.0)
        task(s, "run")
    holder.claims()
    start = win(holder, "run")
    claim(other, "run", "a-agent")
    # the holder stops it and says so; the other knows who holds it
    assert cancel(holder, "run") == [
        StopTask(start.entry, StopReason.CANCEL),
        reply("run", CancelResult.STOPPING, holder="a-agent", attempt=1),
    ]
    assert cancel(other, "run") == [reply("run", CancelResult.KNOWN, holder="a-agent")]
    assert cancel(holder, "run") == [  # asked again while it ends
        reply("run", CancelResult.STOPPING, holder="a-agent", attempt=1)
    ]
    holder.finish(start.entry, success=False)
    holder.on_ended(start.entry)
    outcome(other, "run", "a-agent", ok=False)
    for s in (holder, other):
        assert cancel(s, "run") == [reply("run", CancelResult.FINISHED)]
        assert cancel(s, "never-seen") == [reply("never-seen", CancelResult.UNKNOWN)]
        assert cancel(s, "never-seen", None) == []  # the prototype's form: no answer


def test_an_unclaimed_task_is_cancelled_by_the_reporter_with_its_final_state() -> None:
    a, b = make("a-agent"), make("b-agent")
    for s in (a, b):
        alive(s, "a-agent", "testing", 0.0)
        alive(s, "b-agent", "testing", 0.0)
        task(s, "q")
    (failed, answer) = cancel(a, "q")
    assert isinstance(failed, SendFailed)
    assert (failed.reason, failed.attempt) == (FailReason.CANCELLED, 1)
    assert failed.task == {  # its final state keeps the submission
        "task_id": "q",
        "type": "testing.run",
        "payload": {},
        "priority": "medium",
        "max_retries": 3,
    }
    assert answer == reply("q", CancelResult.CANCELLED)
    assert cancel(b, "q") == [reply("q", CancelResult.KNOWN)]
    assert a.claims() == b.claims() == []


def test_a_task_nobody_online_may_take_is_cancelled_by_the_reporter() -> None:
    """No database agent is online: the testing agents keep it as unserved (and one a
    pending marker); a cancel fails it once, clears the marker, and a late claim loses."""
    a, b = make("a-agent"), make("b-agent")
    for s in (a, b):
        alive(s, "a-agent", "testing", 0.0)
        alive(s, "b-agent", "testing", 0.0)
    (pending,) = task(a, "db", task_type="database.backup")
    assert isinstance(pending, SendPending)
    assert task(b, "db", task_type="database.backup") == []
    (failed, answer) = cancel(a, "db")
    assert isinstance(failed, SendFailed)
    assert failed.clear_marker
    assert failed.task is not None
    assert failed.task["type"] == "database.backup"
    assert answer == reply("db", CancelResult.CANCELLED)
    assert cancel(b, "db") == [reply("db", CancelResult.KNOWN)]
    assert cancel(a, "db") == [reply("db", CancelResult.FINISHED)]


def test_a_cancelled_task_whose_holder_is_gone_is_failed_by_the_takeover() -> None:
    s = make("b-agent")
    alive(s, "a-agent", "testing", 0.0)
    task(s, "t")
    claim(s, "t", "a-agent")  # a-agent holds it, and dies before it sees the cancel
    assert cancel(s, "t") == [reply("t", CancelResult.KNOWN, holder="a-agent")]
    offline(s, "a-agent", 2.0)
    s.check_leases(2.0 + s.config.lease_time)
    assert s.claims() == [SendClaim("t", 2)]
    (failed,) = claim(s, "t", "b-agent", attempt=2)
    assert isinstance(failed, SendFailed)  # never run
    assert (failed.reason, failed.attempt) == (FailReason.CANCELLED, 2)
    assert failed.task is not None
    assert s.running == {}
    assert s.book.is_finished("t")


def test_an_unserved_task_is_forgotten_once_someone_claims_it() -> None:
    s = make()
    task(s, "db", task_type="database.backup")
    assert "db" in s.unserved
    claim(s, "db", "db-agent")
    assert "db" not in s.unserved
    assert cancel(s, "db") == [reply("db", CancelResult.KNOWN, holder="db-agent")]


@pytest.mark.parametrize(
    "body",
    [
        {"task_id": "t", "request_id": 7},
        {"task_id": "t", "request_id": "has space"},
        {"task_id": "../t"},
        {"request_id": "r"},
    ],
)
def test_a_malformed_cancel_is_reported_and_changes_nothing(body: dict[str, Any]) -> None:
    s = make()
    task(s, "t")
    (report,) = s.receive(T.tasks_cancel, env(body), 1.0)
    assert isinstance(report, ReportError)
    assert report.topic == T.tasks_cancel
    assert s.claims() == [SendClaim("t", 1)]


def test_a_finished_task_is_not_run_again_when_resubmitted() -> None:
    s = make()
    task(s, "a")
    s.claims()
    start = win(s, "a")
    s.finish(start.entry, success=True)
    s.on_ended(start.entry)
    assert task(s, "a") == []
    assert s.claims() == []


def test_a_duplicate_submission_is_ignored() -> None:
    s = make()
    task(s, "a")
    task(s, "a")
    assert s.claims() == [SendClaim("a", 1)]
    assert s.claims() == []


# ----------------------------------------------------------- pending markers
def test_a_task_for_a_role_nobody_has_is_kept_as_a_pending_marker() -> None:
    s = make()
    (pending,) = task(s, "d", task_type="deployment.deploy")
    assert pending == SendPending("d", {"task_id": "d", "type": "deployment.deploy", "payload": {}})
    alive(s, "deployer", "deployment", 1.0)
    assert task(s, "e", task_type="deployment.deploy") == []  # someone can take it now


def test_a_marker_is_cleared_when_its_task_finishes_here() -> None:
    s = make()
    marker = env({"task_id": "m", "type": "testing.run", "payload": {}})
    assert s.receive(T.task_pending("m"), marker, 0.0) == []
    assert s.receive(T.task_pending("m"), b"", 0.0) == []  # a cleared marker: nothing
    s.claims()
    start = win(s, "m")
    assert s.finish(start.entry, success=False) == [ClearPending("m")]


# --------------------------------------------------------------- bad input
def test_a_bad_message_is_reported_by_the_reporter_only() -> None:
    a, b = make("a-agent"), make("b-agent")
    for s in (a, b):
        alive(s, "a-agent", "testing", 0.0)
        alive(s, "b-agent", "testing", 0.0)
    (report,) = a.receive(T.tasks_new, b"{not json", 0.0)
    assert isinstance(report, ReportError)
    assert (report.topic, report.size) == (T.tasks_new, 9)
    assert b.receive(T.tasks_new, b"{not json", 0.0) == []
    assert a.counters["bad_messages"] == b.counters["bad_messages"] == 1
    assert a.receive(T.errors, b"[]", 0.0) == []  # never a report about a report


def test_an_invalid_task_with_an_id_is_claimed_by_any_role_to_fail_once() -> None:
    s = make(role="monitoring")
    assert task(s, "bad", priority="urgent") == []
    entry = s.entries["bad"]
    assert entry.invalid is not None
    assert "priority" in entry.invalid
    assert s.claims() == [SendClaim("bad", 1)]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"null",
        b"[1, 2]",
        json.dumps({"payload": {"task_id": 5}}).encode(),
        json.dumps({"payload": {"task_id": "a", "agent_id": "x", "attempt": "one"}}).encode(),
    ],
)
def test_malformed_claims_are_refused_not_raised(payload: bytes) -> None:
    s = make()
    s.receive(T.tasks_assigned, payload, 0.0)
    assert s.counters["bad_messages"] == 1


# ---------------------------------------------------------------- shutdown
def test_shutdown_claims_nothing_more_and_releases_a_claim_it_still_wins() -> None:
    s = make()
    task(s, "a")
    task(s, "b")
    assert s.claims() == [SendClaim("a", 1), SendClaim("b", 1)]
    start = win(s, "a")
    s.stop_accepting()
    assert s.claims() == []
    assert claim(s, "b", "me") == [SendRelease("b", 1)]
    assert s.release_running() == [StopTask(start.entry, StopReason.RELEASE)]
    s.on_ended(start.entry)
    assert s.running == {}
    assert s.free_slots() == 2


# -------------------------------------------------------------- task states
def test_retained_states_mark_finished_tasks_and_resume_our_own() -> None:
    s = make()
    s.on_state({"task_id": "done-1", "state": "done"}, 0.0)
    spec = {"task_id": "mine", "type": "testing.run", "payload": {}}
    s.on_state({"task_id": "mine", "state": "claimed", "agent_id": "me", "task": spec}, 0.0)
    theirs = {"task_id": "theirs", "type": "testing.run", "payload": {}}
    s.on_state(
        {"task_id": "theirs", "state": "claimed", "agent_id": "x", "attempt": 3, "task": theirs},
        0.0,
    )
    assert s.book.is_finished("done-1")
    assert s.claims() == [SendClaim("mine", 2)]  # our earlier life's task: run it again
    s.check_leases(30.0)  # x was never heard of: silent since we read its claim
    assert s.claims() == [SendClaim("theirs", 4)]


# ---------------------------------------------------------------- properties
_IDS = st.sampled_from(["a", "b", "c", "d"])
_AGENTS = st.sampled_from(["me", "p1", "p2"])


@st.composite
def _messages(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["new", "claim", "done", "failed", "released", "cancel", "junk"]))
    task_id, agent = draw(_IDS), draw(_AGENTS)
    attempt = draw(st.integers(1, 3))
    if kind == "new":
        body = {"task_id": task_id, "type": "testing.run", "payload": {}}
        return T.tasks_new, env(body)
    if kind == "cancel":
        return T.tasks_cancel, env({"task_id": task_id})
    if kind == "junk":
        topic = draw(st.sampled_from([T.tasks_new, T.tasks_assigned, T.agents_heartbeat]))
        return topic, draw(st.binary(max_size=40))
    topic = {
        "claim": T.tasks_assigned,
        "done": T.tasks_complete,
        "failed": T.tasks_failed,
        "released": T.tasks_released,
    }[kind]
    return topic, env({"task_id": task_id, "agent_id": agent, "attempt": attempt}, agent)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_messages(), st.booleans(), st.booleans()), max_size=60))
def test_any_message_sequence_keeps_slots_and_starts_consistent(
    steps: list[tuple[tuple[str, bytes], bool, bool]],
) -> None:
    """Whatever arrives, in whatever order: no exception, never more than max_tasks
    busy slots, each (task, attempt) claimed and started at most once by us."""
    s = make(max_tasks=2)
    claimed: set[tuple[str, int]] = set()
    started: set[tuple[str, int]] = set()
    now = 0.0
    for (topic, payload), tick, end_one in steps:
        now += 1.0
        for command in s.receive(topic, payload, now):
            if isinstance(command, StartTask):
                key = (command.entry.task_id, command.attempt)
                assert key in claimed
                assert key not in started
                started.add(key)
        if tick:
            s.check_leases(now + 100.0)
        for c in s.claims():
            assert (c.task_id, c.attempt) not in claimed
            claimed.add((c.task_id, c.attempt))
        if end_one and s.running:
            entry = next(iter(s.running.values()))
            s.finish(entry, success=True)
            s.on_ended(entry)
        assert 0 <= s.claiming
        assert s.claiming + len(s.running) <= 2
        assert s.free_slots() >= 0
        for entry in s.running.values():
            assert entry.phase in (Phase.RUNNING, Phase.STOPPING)


# ------------------------------------------------------------ dispatch mode
def inbox(s: Scheduler, kind: str, task_id: str, attempt: int = 1, **fields: Any) -> Any:
    body: dict[str, Any] = {"kind": kind, "task_id": task_id, "attempt": attempt, **fields}
    if kind == "assignment" and "task" not in fields:
        body["task"] = {"task_id": task_id, "type": "testing.run", "payload": {}}
    return s.receive(T.agent_inbox(s.me), env(body, "disp", "general"), 0.0)


def test_dispatch_mode_starts_an_assignment_at_once_and_holds_its_slot() -> None:
    s = make(max_tasks=1, dispatch="dispatcher")
    (start,) = inbox(s, "assignment", "a")
    assert isinstance(start, StartTask)
    assert (start.entry.task_id, start.attempt) == ("a", 1)
    assert s.free_slots() == 0
    assert s.claims() == []  # nothing is claimed in the broker's order
    assert inbox(s, "assignment", "a") == []  # the same (task, attempt) again: a duplicate
    # beyond max_tasks (the dispatcher should not): handed back, not run
    assert inbox(s, "assignment", "b") == [SendRelease("b", 1)]


def test_dispatch_mode_a_slot_is_free_once_its_outcome_is_out() -> None:
    """The dispatcher frees a slot when it sees the outcome, and its next assignment may
    come before the shell's run of the finished task has returned (it awaits the
    outcome's PUBACK): it runs, it is not handed back as beyond max_tasks."""
    s = make(max_tasks=1, dispatch="dispatcher")
    (first,) = inbox(s, "assignment", "a")
    s.finish(first.entry, success=True)  # the outcome goes out; on_ended() comes later
    assert s.free_slots() == 1
    (second,) = inbox(s, "assignment", "b")
    assert isinstance(second, StartTask)
    assert s.free_slots() == 0
    s.on_ended(first.entry)
    assert s.free_slots() == 0  # b holds it
    assert inbox(s, "assignment", "c") == [SendRelease("c", 1)]
    s.finish(second.entry, success=True)
    s.on_ended(second.entry)
    assert s.free_slots() == 1


def test_dispatch_mode_a_newer_attempt_of_a_task_we_finished_runs_once() -> None:
    """We looked gone (silent for lease_time, e.g. cut off that long): the
    dispatcher takes our finished task over (revocation, attempt 2; our outcome of
    attempt 1 is fenced off) and may assign attempt 2 to us. Ignored as a duplicate, the
    dispatcher would hold it assigned to us for ever, one slot fewer each time: the
    swarm stalls. It runs once; a redelivery of an attempt we ran is a duplicate."""
    s = make(max_tasks=1, dispatch="dispatcher")
    (first,) = inbox(s, "assignment", "a")
    s.finish(first.entry, success=True)
    s.on_ended(first.entry)
    assert inbox(s, "revocation", "a", reason="holder_gone") == []  # over already
    assert inbox(s, "assignment", "a") == []  # attempt 1 redelivered: a duplicate
    (second,) = inbox(s, "assignment", "a", attempt=2)
    assert isinstance(second, StartTask)
    assert (second.entry.task_id, second.attempt) == ("a", 2)
    assert s.free_slots() == 0
    assert inbox(s, "assignment", "a", attempt=2) == []
    s.finish(second.entry, success=True)
    s.on_ended(second.entry)
    assert s.free_slots() == 1
    assert inbox(s, "assignment", "a", attempt=2) == []
    assert inbox(s, "assignment", "a", attempt=1) == []


def test_dispatch_mode_a_revocation_fences_the_run_and_a_cancel_stops_it() -> None:
    s = make(dispatch="dispatcher")
    (a,) = inbox(s, "assignment", "a")
    (b,) = inbox(s, "assignment", "b")
    assert inbox(s, "revocation", "a", reason="holder lost") == [
        StopTask(a.entry, StopReason.FENCED)
    ]
    assert inbox(s, "cancel", "b") == [StopTask(b.entry, StopReason.CANCEL)]
    assert inbox(s, "revocation", "unknown") == []


def test_dispatch_mode_the_backlog_is_read_before_anything_starts() -> None:
    """The backlog at start is our previous run's: an assignment revoked later in it
    never starts; the rest are handed back at the sync marker (the dispatcher takes
    over what that run held); a cancelled one fails once without running."""
    s = make(max_tasks=4, dispatch="dispatcher")
    s.begin_drain("n1")
    for task_id in ("a", "b", "c"):
        assert inbox(s, "assignment", task_id) == []
    assert inbox(s, "revocation", "a") == []
    (failed,) = inbox(s, "cancel", "c")
    assert isinstance(failed, SendFailed)
    assert failed.reason is FailReason.CANCELLED
    assert failed.task is not None
    assert failed.task["task_id"] == "c"
    marker = env({"kind": "sync", "nonce": "other"})
    assert s.receive(T.agent_inbox("me"), marker, 0.0) == []  # not ours
    marker = env({"kind": "sync", "nonce": "n1"})
    assert s.receive(T.agent_inbox("me"), marker, 0.0) == [SendRelease("b", 1)]
    assert s.draining is None
    assert s.free_slots() == 4
    (start,) = inbox(s, "assignment", "b", attempt=2)  # the dispatcher's next attempt
    assert isinstance(start, StartTask)
    assert start.attempt == 2


def test_dispatch_mode_a_revocation_before_its_assignment_still_wins() -> None:
    """A resumed session may get the revocation before the redelivered assignment it
    revokes: that attempt never starts, in the backlog or after; the next one does."""
    s = make(max_tasks=4, dispatch="dispatcher")
    s.begin_drain("n1")
    assert inbox(s, "revocation", "a", reason="holder_gone") == []
    assert inbox(s, "assignment", "a") == []  # attempt 1, revoked already
    starts = s.receive(T.agent_inbox("me"), env({"kind": "sync", "nonce": "n1"}), 0.0)
    assert not [c for c in starts if isinstance(c, StartTask)]
    assert inbox(s, "assignment", "a") == []  # redelivered again: still never
    (second,) = inbox(s, "assignment", "a", attempt=2)
    assert isinstance(second, StartTask)
    assert (second.entry.task_id, second.attempt) == ("a", 2)


def test_dispatch_mode_refuses_bad_inbox_messages_and_hands_back_while_leaving() -> None:
    s = make(dispatch="dispatcher")
    (report,) = s.receive(
        T.agent_inbox("me"), env({"kind": "launch", "task_id": "x", "attempt": 1}), 0.0
    )
    assert isinstance(report, ReportError)
    assert "unknown inbox message kind" in report.reason
    (report,) = s.receive(
        T.agent_inbox("me"), env({"kind": "assignment", "task_id": "x", "attempt": 1}), 0.0
    )
    assert isinstance(report, ReportError)
    s.stop_accepting()
    assert inbox(s, "assignment", "late") == [SendRelease("late", 1)]


def test_dispatch_mode_follows_the_dispatcher_status() -> None:
    s = make(dispatch="dispatcher")
    online = env({"agent_id": "d1", "epoch": 3, "status": "online"})
    assert s.receive(T.dispatch_status, online, 0.0) == [Reannounce()]  # our slots, now
    assert s.dispatcher == ("d1", 3)
    assert s.receive(T.dispatch_status, online, 0.5) == []  # the same term again
    s.receive(T.dispatch_status, env({"agent_id": "d1", "epoch": 3, "status": "offline"}), 1.0)
    assert s.dispatcher is None


# --------------------------------------------- dispatch mode: fencing by epoch
def status(s: Scheduler, agent_id: str, epoch: int, state: str = "online") -> list[Command]:
    body = {"agent_id": agent_id, "epoch": epoch, "status": state}
    return s.receive(T.dispatch_status, env(body, agent_id), 0.0)


def refused(commands: list[Command], task_id: str) -> ReportError:
    """The one report of a refused inbox message (nothing acted on)."""
    (report,) = commands
    assert isinstance(report, ReportError)
    assert (report.topic, report.task_id) == (T.agent_inbox("me"), task_id)
    assert "deposed dispatcher" in report.reason
    return report


def deposed_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and "deposed dispatcher" in r.getMessage()
    ]


def test_dispatch_mode_refuses_inbox_messages_of_an_older_epoch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A deposed dispatcher that has not noticed yet (docs/stores.md: at most one
    renewal period) still sends: its assignment never starts, its revocation and its
    cancel stop nothing; each is reported (acknowledged by the shell, as every inbox
    message), and logged as a warning once per sender epoch. Messages without an epoch
    (an older dispatcher's) are taken as before."""
    s = make(max_tasks=3, dispatch="dispatcher")
    assert status(s, "d2", 5) == [Reannounce()]
    assert s.dispatch_epoch == 5
    caplog.set_level("DEBUG", logger="sheri_trio.agent")
    report = refused(inbox(s, "assignment", "a", epoch=4), "a")
    assert report.reason == "assignment from a deposed dispatcher (epoch 4; current epoch 5)"
    assert report.size > 0
    assert "a" not in s.entries
    assert s.free_slots() == 3
    (b,) = inbox(s, "assignment", "b", epoch=5)
    assert isinstance(b, StartTask)
    refused(inbox(s, "revocation", "b", epoch=4, reason="holder_gone"), "b")
    refused(inbox(s, "cancel", "b", epoch=4), "b")
    assert s.entries["b"].phase is Phase.RUNNING
    warned = deposed_warnings(caplog)
    assert len(warned) == 1  # once for epoch 4
    refused(inbox(s, "assignment", "c", epoch=3), "c")
    warned = deposed_warnings(caplog)
    assert len(warned) == 2  # and once for epoch 3
    assert s.counters["stale_epoch"] == 4
    (c,) = inbox(s, "assignment", "c")  # no epoch: an older dispatcher's, taken
    assert isinstance(c, StartTask)
    # the new term follows what the deposed one assigned (the store's holder): it runs
    (a,) = inbox(s, "assignment", "a", epoch=5)
    assert isinstance(a, StartTask)
    assert inbox(s, "revocation", "b", epoch=5) == [StopTask(b.entry, StopReason.FENCED)]
    assert s.dispatch_epoch == 5


def test_dispatch_mode_a_new_terms_message_before_its_status_raises_the_fence() -> None:
    """On a bridge or cluster the new term's assignment may come before its status: it
    is taken, and from then on the old term's messages are refused."""
    s = make(dispatch="dispatcher")
    status(s, "d1", 4)
    (a,) = inbox(s, "assignment", "a", epoch=5)
    assert isinstance(a, StartTask)
    assert s.dispatch_epoch == 5
    refused(inbox(s, "revocation", "a", epoch=4, reason="holder_gone"), "a")
    assert s.entries["a"].phase is Phase.RUNNING
    assert status(s, "d2", 5) == [Reannounce()]  # its status, late: the same fence
    assert status(s, "d1", 4, "offline") == []  # the old term's will lowers nothing
    refused(inbox(s, "assignment", "b", epoch=4), "b")
    assert s.dispatch_epoch == 5


def test_dispatch_mode_the_backlog_refuses_an_older_terms_assignment() -> None:
    """A new process reads its backlog up to its sync marker (which carries no epoch):
    an assignment of a term older than a status seen before it in the backlog is
    refused, neither held nor handed back at the marker (the current term took over at
    our register what it believes we held); one of the current term is handed back."""
    s = make(max_tasks=4, dispatch="dispatcher")
    s.begin_drain("n1")
    assert inbox(s, "assignment", "a", epoch=4) == []  # held until the marker
    status(s, "d2", 5)
    refused(inbox(s, "assignment", "b", epoch=4), "b")
    assert inbox(s, "assignment", "c", epoch=5) == []
    marker = env({"kind": "sync", "nonce": "n1"}, "me")
    assert s.receive(T.agent_inbox("me"), marker, 0.0) == [SendRelease("a", 1), SendRelease("c", 1)]
    assert s.draining is None


def test_dispatch_mode_a_resumed_session_replays_an_old_assignment_after_the_new_term() -> None:
    """A resumed session may replay an old term's assignment after the new term's
    messages (an unacknowledged one redelivered): refused, whether or not the new term
    had revoked it; the new term's own attempt runs."""
    s = make(max_tasks=4, dispatch="dispatcher")
    status(s, "d2", 5)
    assert inbox(s, "revocation", "a", epoch=5, reason="holder_gone") == []
    (a2,) = inbox(s, "assignment", "a", attempt=2, epoch=5)
    assert isinstance(a2, StartTask)
    refused(inbox(s, "assignment", "a", epoch=4), "a")  # attempt 1, revoked
    # an attempt the new term never heard of (assigned by the old one after it lost)
    refused(inbox(s, "assignment", "x", attempt=3, epoch=4), "x")
    assert set(s.running) == {"a"}


def test_dispatch_mode_an_epoch_that_goes_back() -> None:
    """On the broker's order a session taken over cannot publish again and statuses come
    in order, so a lower online epoch is a new term whose epoch went back (the broker
    lost the retained status): followed. With a claim store, whose epochs only grow, it
    is a stale copy (a partitioned broker's retained status): the fence stays."""
    s = make(dispatch="dispatcher")
    status(s, "d1", 7)
    status(s, "d2", 1)
    assert s.dispatch_epoch == 1
    (a,) = inbox(s, "assignment", "a", epoch=1)
    assert isinstance(a, StartTask)
    store = parse_store_url("redis://127.0.0.1:6379/0", source="flag")
    s = make(dispatch="dispatcher", store=store)
    status(s, "d1", 7)
    status(s, "d2", 1)
    assert s.dispatch_epoch == 7
    refused(inbox(s, "assignment", "a", epoch=1), "a")


def test_dispatch_mode_refuses_an_inbox_message_with_a_bad_epoch() -> None:
    s = make(dispatch="dispatcher")
    for bad in ("5", -1, True, 1.5, [5]):
        (report,) = inbox(s, "assignment", "a", epoch=bad)
        assert isinstance(report, ReportError)
        assert report.reason == "'epoch' must be a non-negative integer"
    (report,) = s.receive(
        T.agent_inbox("me"), env({"kind": ["x"], "task_id": "a", "attempt": 1}), 0.0
    )
    assert isinstance(report, ReportError)
    assert "a" not in s.entries
