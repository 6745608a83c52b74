"""The claim queue on its own: order, preference window, overflow, drops."""

from __future__ import annotations

from sheri_trio.swarm._queue import ClaimQueue, Placed


def take_all(q: ClaimQueue) -> list[tuple[str, int]]:
    out = []
    while (got := q.pop(lambda task_id, attempt: True)) is not None:
        out.append(got)
    return out


def test_most_urgent_first_then_arrival() -> None:
    q = ClaimQueue(limit=10, overflow_limit=10, preference_window=0)
    for i, rank in enumerate([2, 1, 0, 1, 2]):
        assert q.push(f"t{i}", 1, rank, float(i), preferred=True) is Placed.QUEUED
    assert [t for t, _ in take_all(q)] == ["t2", "t1", "t3", "t0", "t4"]
    assert len(q) == 0


def test_a_task_not_preferred_waits_the_window_then_goes() -> None:
    q = ClaimQueue(limit=10, overflow_limit=10, preference_window=2)
    q.push("other", 1, 1, 0.0, preferred=False)  # ordered as if 2 arrivals later
    for i in range(3):
        q.push(f"mine{i}", 1, 1, float(i + 1), preferred=True)
    assert [t for t, _ in take_all(q)] == ["mine0", "other", "mine1", "mine2"]


def test_a_later_attempt_replaces_the_queued_one_and_an_older_is_ignored() -> None:
    q = ClaimQueue(limit=10, overflow_limit=10, preference_window=0)
    q.push("t", 1, 1, 0.0, preferred=True)
    assert q.push("t", 1, 1, 0.0, preferred=True) is Placed.ALREADY
    assert q.push("t", 2, 1, 0.0, preferred=True) is Placed.QUEUED
    assert q.attempt("t") == 2
    assert take_all(q) == [("t", 2)]  # one candidate, however many heap entries


def test_overflow_moves_up_in_order_and_drops_only_beyond_its_limit() -> None:
    q = ClaimQueue(limit=1, overflow_limit=2, preference_window=0)
    placed = [q.push(f"t{i}", 1, 1, float(i), preferred=True) for i in range(4)]
    assert placed == [Placed.QUEUED, Placed.OVERFLOW, Placed.OVERFLOW, Placed.DROPPED]
    assert q.dropped == ["t3"]
    assert [t for t, _ in take_all(q)] == ["t0", "t1", "t2"]


def test_pop_skips_what_is_no_longer_wanted() -> None:
    q = ClaimQueue(limit=1, overflow_limit=5, preference_window=0)
    for i in range(3):
        q.push(f"t{i}", 1, 1, float(i), preferred=True)
    wanted = {"t2"}
    assert q.pop(lambda task_id, attempt: task_id in wanted) == ("t2", 1)
    assert q.pop(lambda task_id, attempt: True) is None
    assert len(q) == 0
