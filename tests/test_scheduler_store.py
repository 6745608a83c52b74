"""The scheduler with a claim store (docs/stores.md), sans-IO: claims are StoreClaim
commands, the store's verdicts come back in; the broker's order no longer decides."""

from __future__ import annotations

from typing import Any

from test_scheduler import alive, claim, offline, outcome, task

from sheri_trio.stores import Verdict, parse_store_url
from sheri_trio.swarm._config import AgentConfig
from sheri_trio.swarm._scheduler import (
    AnnounceClaim,
    Phase,
    RepublishOutcome,
    Scheduler,
    SendRelease,
    StartTask,
    StopReason,
    StopTask,
    StoreClaim,
)

STORE = parse_store_url("redis://127.0.0.1:6379/0", source="flag")


def make(agent_id: str = "me", **kw: Any) -> Scheduler:
    options: dict[str, Any] = {"swarm": "s", "max_tasks": 2, "lease_time": 30.0, "store": STORE}
    options.update(kw)
    s = Scheduler(AgentConfig(role="testing", agent_id=agent_id, **options))
    alive(s, agent_id, "testing", 0.0)
    return s


def test_claims_go_to_the_store_and_a_won_verdict_starts_and_announces() -> None:
    s = make()
    task(s, "a")
    assert s.claims() == [StoreClaim("a", 1, takeover=False)]
    assert s.entries["a"].phase is Phase.CLAIMING
    announce, start = s.on_store_verdict("a", 1, Verdict.WON, 1.0)
    assert announce == AnnounceClaim("a", 1)
    assert isinstance(start, StartTask)
    assert start.entry.phase is Phase.RUNNING
    assert s.book.holder("a") is not None
    assert s.book.holder("a").agent_id == "me"  # type: ignore[union-attr]


def test_the_broker_s_order_does_not_decide_a_claim_that_is_with_the_store() -> None:
    s = make()
    task(s, "a")
    s.claims()
    assert claim(s, "a", "me") == []  # an old-style claim of ours echoed: not a verdict
    assert claim(s, "a", "other") == []  # another's claim first in this order: neither
    assert s.entries["a"].phase is Phase.CLAIMING
    assert s.on_store_verdict("a", 1, Verdict.LOST, 1.0) == []
    assert s.entries["a"].phase is Phase.HELD
    assert s.free_slots() == 2


def test_a_finished_verdict_forgets_the_task_and_it_never_runs_here() -> None:
    s = make()
    task(s, "a")
    s.claims()
    # its outcome never reached us: the stored one is published again
    assert s.on_store_verdict("a", 1, Verdict.FINISHED, 1.0) == [RepublishOutcome("a")]
    assert "a" not in s.entries
    assert s.book.is_finished("a")
    assert task(s, "a") == []  # re-submitted: not run again
    assert s.claims() == []


def test_a_dead_holder_s_task_is_a_takeover_claim() -> None:
    s = make()
    alive(s, "other", "testing", 0.0)
    task(s, "a")
    claim(s, "a", "other")  # other holds attempt 1 (its claim announced its store win)
    offline(s, "other", 5.0)  # its will: no takeover yet (docs/protocol.md, rule 6)
    assert s.claims() == []
    s.check_leases(s.config.lease_time)  # silent since 0.0: gone
    assert s.claims() == [StoreClaim("a", 2, takeover=True)]
    assert s.on_store_verdict("a", 2, Verdict.HELD, 6.0) == []  # its lease still live
    assert s.entries["a"].phase is Phase.HELD
    s.check_leases(40.0)  # tried again at a later lease check
    assert s.claims() == [StoreClaim("a", 2, takeover=True)]


def test_a_store_that_does_not_answer_puts_the_claim_back_in_the_queue() -> None:
    s = make()
    alive(s, "other", "testing", 0.0)
    task(s, "a")
    claim(s, "a", "other")
    s.check_leases(s.config.lease_time)  # other silent since 0.0: gone
    (c,) = s.claims()
    s.on_store_unavailable(c)
    assert s.entries["a"].phase is Phase.QUEUED
    assert s.claims() == [StoreClaim("a", 2, takeover=True)]  # still a takeover


def test_a_win_no_longer_wanted_is_released() -> None:
    s = make()
    task(s, "a")
    s.claims()
    s.stop_accepting()  # shutdown began while the store answered
    assert s.on_store_verdict("a", 1, Verdict.WON, 1.0) == [SendRelease("a", 1)]
    assert s.on_store_verdict("zz", 1, Verdict.WON, 1.0) == [SendRelease("zz", 1)]
    assert s.on_store_verdict("zz", 1, Verdict.LOST, 1.0) == []


def test_holds_to_renew_and_a_hold_lost_stops_the_run() -> None:
    s = make()
    task(s, "a")
    task(s, "b")
    s.claims()
    (_, start) = s.on_store_verdict("a", 1, Verdict.WON, 1.0)
    assert s.holds() == [("a", 1)]  # b is still with the store
    (stop,) = s.on_hold_lost("a", 1)
    assert stop == StopTask(start.entry, StopReason.FENCED)  # type: ignore[union-attr]
    assert s.holds() == []
    assert s.on_hold_lost("a", 1) == []  # stopping already
    assert s.on_hold_lost("b", 1) == []  # not ours yet


def test_a_finished_verdict_for_an_outcome_seen_republishes_nothing() -> None:
    s = make()
    alive(s, "other", "testing", 0.0)
    task(s, "a")
    claim(s, "a", "other")
    s.check_leases(s.config.lease_time)  # other silent since 0.0: gone
    assert s.claims() == [StoreClaim("a", 2, takeover=True)]  # a takeover ...
    outcome(s, "a", "other")  # ... while the outcome arrives
    assert s.on_store_verdict("a", 2, Verdict.FINISHED, 6.0) == []
