"""The broker store is today's rule: fed in the broker's order, it gives the verdicts of
:class:`~sheri_trio.swarm.ClaimBook` (property test; no server needed)."""

from __future__ import annotations

import trio
from hypothesis import given
from hypothesis import strategies as st

from sheri_trio.stores import BrokerStore
from sheri_trio.swarm import Claim, ClaimBook, Outcome

_EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["claim", "finish"]),
        st.sampled_from(["t1", "t2"]),
        st.integers(1, 3),
        st.sampled_from(["a", "b", "c"]),
    ),
    max_size=30,
)


@given(events=_EVENTS)
def test_the_broker_store_gives_the_claim_book_s_verdicts(
    events: list[tuple[str, str, int, str]],
) -> None:
    """Fed the claims and outcomes in the broker's order (attempt 1: a claim; later
    attempts: a takeover, whose sender judged the holder dead), the broker store agrees
    with :class:`~sheri_trio.swarm.ClaimBook`, but for a repeated claim or finish of the
    same holder, which the store answers as the same success again."""
    book = ClaimBook()
    store = BrokerStore("s")
    finisher: dict[str, tuple[int, str]] = {}

    async def check() -> None:
        for kind, task, attempt, holder in events:
            current = book.holder(task)
            if kind == "claim":
                repeat = current is not None and (current.attempt, current.agent_id) == (
                    attempt,
                    holder,
                )
                expected = book.observe_claim(Claim(task, holder, attempt, None), 0.0)
                if attempt == 1:
                    verdict = await store.claim(task, attempt, holder, 1.0)
                else:
                    verdict = await store.takeover(task, attempt, holder, 1.0, holder_dead=True)
                assert verdict.value == ("won" if repeat else expected.value)
            else:
                repeat = finisher.get(task) == (attempt, holder)
                if current is not None and current.attempt == attempt:
                    holder = current.agent_id  # outcomes come from the attempt's holder
                accepted = book.observe_outcome(Outcome(task, holder, attempt, True, {}))
                if accepted:
                    finisher[task] = (attempt, holder)
                assert await store.finish(task, attempt, holder, {}) is (accepted or repeat)

    trio.run(check)
