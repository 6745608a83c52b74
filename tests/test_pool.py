"""The dispatcher's pool of free agents (sheri_trio.swarm._pool): by role, least loaded
first, ties by turn; stale entries stay bounded."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sheri_trio.swarm._pool import FreeAgents


def test_least_loaded_first_then_the_one_longest_at_that_load() -> None:
    pool = FreeAgents()
    pool.update("a", "testing", 0.5)
    pool.update("b", "testing", 0.0)
    pool.update("c", "testing", 0.0)
    pool.update("d", "review", 0.0)
    assert pool.top("testing") == (0.0, 2, "b")
    pool.update("b", "testing", 0.25)  # given a task: c is next
    assert pool.top("testing") == (0.0, 3, "c")
    pool.update("c", "testing", 0.0)  # unchanged: keeps its turn
    assert pool.top("testing") == (0.0, 3, "c")
    pool.discard("c")
    assert pool.top("testing") == (0.25, 5, "b")
    assert pool.top("review") == (0.0, 4, "d")
    assert pool.top("database") is None
    assert len(pool) == 3
    assert "c" not in pool
    assert "a" in pool


def test_an_agent_that_changes_role_is_found_under_its_new_one_only() -> None:
    pool = FreeAgents()
    pool.update("a", "testing", 0.0)
    pool.update("a", "review", 0.0)
    assert pool.top("testing") is None
    assert pool.top("review") == (0.0, 2, "a")


def test_stale_entries_stay_bounded_without_any_top() -> None:
    """An idle swarm's agents change load and never come to the top: the heaps are
    rebuilt once stale entries outnumber the live ones."""
    pool = FreeAgents()
    for i in range(10):
        pool.update(f"a{i}", "testing", 0.0)
    for n in range(10_000):
        pool.update(f"a{n % 10}", "testing", (n % 3) / 4)
    assert sum(len(h) for h in pool._heaps.values()) <= 2 * 10 + 64 + 1
    assert len(pool) == 10


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d", "e"]),
            st.sampled_from(["testing", "review", None]),
            st.one_of(st.none(), st.sampled_from([0.0, 0.25, 0.5, 1.0])),
            st.booleans(),
        ),
        max_size=200,
    )
)
def test_the_top_is_what_a_walk_over_every_agent_would_choose(
    ops: list[tuple[str, str | None, float | None, bool]],
) -> None:
    pool = FreeAgents()
    model: dict[str, tuple[str | None, float, int]] = {}
    turn = 0
    for agent_id, role, load, look in ops:
        pool.update(agent_id, role, load)
        if load is None:
            model.pop(agent_id, None)
        elif model.get(agent_id, (None, None, 0))[:2] != (role, load):
            turn += 1
            model[agent_id] = (role, load, turn)
        if look:
            for r in ("testing", "review", None):
                live = [(ld, t, a) for a, (rr, ld, t) in model.items() if rr == r]
                assert pool.top(r) == (min(live) if live else None)
    assert len(pool) == len(model)
