"""The claim rules of :mod:`sheri_trio.swarm._claims` (no I/O, no clock): the first claim
of an attempt wins, later and older ones lose, outcomes of older attempts are fenced
off, the finished set is bounded and forgets its oldest first, releases free a task."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sheri_trio.swarm import Claim, ClaimBook, Outcome
from sheri_trio.swarm._claims import ClaimVerdict, Holder


def claim(task: str, agent: str, attempt: int = 1) -> Claim:
    return Claim(task_id=task, agent_id=agent, attempt=attempt, role=None)


def outcome(task: str, attempt: int = 1, *, success: bool = True, agent: str = "a") -> Outcome:
    return Outcome(task_id=task, agent_id=agent, attempt=attempt, success=success, payload={})


# ------------------------------------------------------------------ first claim wins
def test_the_first_claim_of_an_attempt_wins_later_ones_lose() -> None:
    book = ClaimBook()
    assert book.attempt("t") == 0
    assert book.holder("t") is None
    assert book.observe_claim(claim("t", "a"), now=5.0) is ClaimVerdict.WON
    assert book.observe_claim(claim("t", "b"), now=5.1) is ClaimVerdict.LOST
    # the winner claiming again (a duplicate delivery) loses too: nothing changes
    assert book.observe_claim(claim("t", "a"), now=6.0) is ClaimVerdict.LOST
    assert book.holder("t") == Holder("a", 1, 5.0)
    assert book.attempt("t") == 1


def test_a_takeover_is_a_claim_for_the_next_attempt() -> None:
    book = ClaimBook()
    book.observe_claim(claim("t", "a", 1), now=1.0)
    assert book.observe_claim(claim("t", "b", 2), now=9.0) is ClaimVerdict.WON
    assert book.holder("t") == Holder("b", 2, 9.0)
    # the old attempt's late claims are stale, a rival for attempt 2 loses
    assert book.observe_claim(claim("t", "c", 1), now=9.5) is ClaimVerdict.STALE
    assert book.observe_claim(claim("t", "c", 2), now=9.5) is ClaimVerdict.LOST
    # attempts may jump (an agent that missed some): the higher one wins
    assert book.observe_claim(claim("t", "d", 5), now=10.0) is ClaimVerdict.WON
    assert book.attempt("t") == 5


def test_tasks_are_independent() -> None:
    book = ClaimBook()
    assert book.observe_claim(claim("t1", "a"), 0) is ClaimVerdict.WON
    assert book.observe_claim(claim("t2", "b"), 0) is ClaimVerdict.WON
    assert {t: h.agent_id for t, h in book.holders.items()} == {"t1": "a", "t2": "b"}


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(1, 4)), max_size=30))
def test_exactly_one_winner_per_attempt_in_any_order(claims: list[tuple[str, int]]) -> None:
    """Whatever the broker's order, each attempt has at most one winner, the first
    claim of it that is newer than every attempt won before."""
    book = ClaimBook()
    winners: dict[int, str] = {}
    highest = 0
    for agent, attempt in claims:
        verdict = book.observe_claim(claim("t", agent, attempt), now=0)
        if attempt > highest:
            assert verdict is ClaimVerdict.WON
            winners[attempt] = agent
            highest = attempt
        elif attempt == highest:
            assert verdict is ClaimVerdict.LOST
        else:
            assert verdict is ClaimVerdict.STALE
    if claims:
        assert book.holder("t") == Holder(winners[highest], highest, 0)


# ------------------------------------------------------------------------- fencing
def test_the_holder_s_outcome_finishes_the_task() -> None:
    book = ClaimBook()
    book.observe_claim(claim("t", "a", 1), 0)
    assert book.observe_outcome(outcome("t", 1, success=False))
    assert book.is_finished("t")
    assert book.holder("t") is None
    # then every claim is told the task is finished, whatever its attempt
    for attempt in (1, 2, 7):
        assert book.observe_claim(claim("t", "b", attempt), 1) is ClaimVerdict.FINISHED
    # and a second outcome (a duplicate, or another agent's) is ignored
    assert not book.observe_outcome(outcome("t", 1))
    assert not book.observe_outcome(outcome("t", 2))


def test_an_outcome_of_an_older_attempt_is_fenced_off() -> None:
    book = ClaimBook()
    book.observe_claim(claim("t", "a", 1), 0)
    book.observe_claim(claim("t", "b", 2), 1)  # b took over from a
    assert not book.observe_outcome(outcome("t", 1, agent="a"))  # a finished late
    assert not book.is_finished("t")
    assert book.holder("t") == Holder("b", 2, 1)
    # a newer attempt's outcome than the holder's is fenced off as well
    assert not book.observe_outcome(outcome("t", 3))
    assert book.observe_outcome(outcome("t", 2, agent="b"))
    assert book.is_finished("t")


def test_an_outcome_without_a_known_claim_is_taken() -> None:
    """An agent that joined late never saw the claim: the outcome still counts."""
    book = ClaimBook()
    assert book.observe_outcome(outcome("t", 3))
    assert book.is_finished("t")


# -------------------------------------------------------------------- finished set
def test_the_finished_set_is_bounded_and_forgets_the_oldest() -> None:
    book = ClaimBook(finished_limit=3)
    for task in ("t1", "t2", "t3"):
        book.mark_finished(task, True)
    book.mark_finished("t1", False)  # finished again: now the newest
    book.mark_finished("t4", True)
    assert [book.is_finished(t) for t in ("t1", "t2", "t3", "t4")] == [True, False, True, True]
    book.mark_finished("t5", True)
    assert [book.is_finished(t) for t in ("t1", "t3", "t4", "t5")] == [True, False, True, True]
    # forgotten: a claim for it wins again (what the bound costs)
    assert book.observe_claim(claim("t2", "a"), 0) is ClaimVerdict.WON


def test_mark_finished_drops_the_holder() -> None:
    book = ClaimBook()
    book.observe_claim(claim("t", "a"), 0)
    book.mark_finished("t", True)
    assert book.holder("t") is None
    assert not book.release("t", 1)


@pytest.mark.parametrize("limit", [1, 10])
def test_the_bound_holds_for_any_number_of_tasks(limit: int) -> None:
    book = ClaimBook(finished_limit=limit)
    for i in range(100):
        book.observe_claim(claim(f"t{i}", "a"), i)
        assert book.observe_outcome(outcome(f"t{i}"))
    finished = [i for i in range(100) if book.is_finished(f"t{i}")]
    assert finished == list(range(100 - limit, 100))
    assert book.holders == {}


# ------------------------------------------------------------------------- release
def test_release_of_the_current_attempt_frees_the_task() -> None:
    book = ClaimBook()
    book.observe_claim(claim("t", "a", 1), 0)
    assert book.release("t", 1)
    # a release is not a finish: the next attempt's claim wins
    assert not book.is_finished("t")
    assert book.observe_claim(claim("t", "b", 2), 1) is ClaimVerdict.WON


def test_release_of_another_attempt_is_ignored() -> None:
    book = ClaimBook()
    assert not book.release("t", 1)  # never claimed
    book.observe_claim(claim("t", "a", 1), 0)
    book.observe_claim(claim("t", "b", 2), 1)
    assert not book.release("t", 1)  # a's release after b took over
    assert book.release("t", 2)
    book.observe_outcome(outcome("t", 2))
    assert not book.release("t", 2)  # finished
