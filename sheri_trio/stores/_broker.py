"""The ``broker`` claim store: the rules applied in one process, in the order of the calls.

This is today's rule (docs/protocol.md, rule 3, :class:`~sheri_trio.swarm.ClaimBook`):
fed with the claims and outcomes in the broker's order, every agent's BrokerStore gives
the same verdicts, because no verdict depends on a clock. So, unlike the other
backends, the lease of a *task* is not judged here: the caller's presence judgement
(``holder_dead``: a last will, a shutdown, or ``lease_time`` without a heartbeat) is the
lease, and a takeover of a newer attempt wins as soon as the caller says so. Leadership
terms are judged by *clock* (``trio.current_time`` by default): in broker mode the
dispatcher is elected through the client-id rule (docs/dispatch.md), so they matter to
one process only.

Fed in the broker's order, a claim for attempt 1 is :meth:`BrokerStore.claim` and one
for a later attempt is :meth:`BrokerStore.takeover` with ``holder_dead=True`` (its sender
sent it only once it judged the holder dead, or saw the task released): the verdicts are
ClaimBook's (tests/test_stores_broker.py), except that a repeated claim or finish of the
same holder is the same success again.

It is also the executable reference of the rules that the Redis scripts and the SQL of
the other backends follow, and an in-memory store for tests (it needs no service).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from ._api import (
    Hold,
    Leadership,
    StoredOutcome,
    StoreKind,
    Verdict,
    check_attempt,
    check_lease,
    check_requests,
    check_takeover,
    encode_outcome,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ._api import ClaimRequest

__all__ = ["BrokerStore"]

_FINISHED_LIMIT: Final = 100_000


@dataclass(slots=True)
class _Record:
    attempt: int
    holder: str
    released: bool = False
    outcome: bytes | None = None


@dataclass(slots=True)
class _Term:
    holder: str
    epoch: int
    until: float


class BrokerStore:
    """The claim rules in memory, for one swarm (see the module's docstring)."""

    def __init__(
        self,
        swarm: str,
        *,
        clock: Callable[[], float] = trio.current_time,
        finished_limit: int = _FINISHED_LIMIT,
    ) -> None:
        self._swarm = swarm
        self._clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._finished_limit = finished_limit
        self._finished = 0
        self._terms: dict[str, _Term] = {}
        self._epochs: dict[str, int] = {}

    @property
    def kind(self) -> StoreKind:
        return "broker"

    @property
    def swarm(self) -> str:
        return self._swarm

    # -- tasks -------------------------------------------------------------

    async def claim(self, task_id: str, attempt: int, holder: str, lease: float) -> Verdict:
        await trio.lowlevel.checkpoint()
        check_attempt(attempt)
        check_lease(lease)
        return self._claim(task_id, attempt, holder, takeover=False)

    async def takeover(
        self, task_id: str, attempt: int, holder: str, lease: float, *, holder_dead: bool
    ) -> Verdict:
        await trio.lowlevel.checkpoint()
        check_attempt(attempt)
        check_lease(lease)
        check_takeover(holder_dead)
        return self._claim(task_id, attempt, holder, takeover=True)

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[Verdict]:
        await trio.lowlevel.checkpoint()
        check_requests(requests)
        return [self._claim(r.task_id, r.attempt, r.holder, takeover=r.takeover) for r in requests]

    def _claim(self, task_id: str, attempt: int, holder: str, *, takeover: bool) -> Verdict:
        record = self._records.get(task_id)
        if record is None:
            self._records[task_id] = _Record(attempt, holder)
            return Verdict.WON
        if record.outcome is not None:
            return Verdict.FINISHED
        if attempt < record.attempt:
            return Verdict.STALE
        if attempt == record.attempt:
            if record.holder == holder and not record.released:
                return Verdict.WON  # the same claim again (a retry)
            return Verdict.LOST
        if not (record.released or takeover):
            return Verdict.HELD
        record.attempt, record.holder, record.released = attempt, holder, False
        return Verdict.WON

    async def renew(self, task_id: str, attempt: int, holder: str, lease: float) -> bool:
        await trio.lowlevel.checkpoint()
        check_attempt(attempt)
        check_lease(lease)
        return self._holds(task_id, attempt, holder)

    async def assert_hold(self, task_id: str, attempt: int, holder: str, lease: float) -> bool:
        await trio.lowlevel.checkpoint()
        check_attempt(attempt)
        check_lease(lease)
        if task_id not in self._records:
            self._records[task_id] = _Record(attempt, holder)
            return True
        return self._holds(task_id, attempt, holder)

    def _holds(self, task_id: str, attempt: int, holder: str) -> bool:
        r = self._records.get(task_id)
        return (
            r is not None
            and r.outcome is None
            and not r.released
            and r.attempt == attempt
            and r.holder == holder
        )

    async def release(self, task_id: str, attempt: int, holder: str) -> bool:
        await trio.lowlevel.checkpoint()
        check_attempt(attempt)
        r = self._records.get(task_id)
        if r is None or r.outcome is not None or r.attempt != attempt or r.holder != holder:
            return False
        r.released = True
        return True

    async def finish(
        self, task_id: str, attempt: int, holder: str, outcome: Mapping[str, object]
    ) -> bool:
        await trio.lowlevel.checkpoint()
        check_attempt(attempt)
        data = encode_outcome(outcome)
        r = self._records.get(task_id)
        if r is None:
            r = self._records[task_id] = _Record(attempt, holder)
        elif r.outcome is not None:
            return r.attempt == attempt and r.holder == holder  # the same finish again
        elif r.released or r.attempt != attempt or r.holder != holder:
            return False
        r.outcome = data
        self._finished += 1
        self._records.move_to_end(task_id)
        self._forget()
        return True

    def _forget(self) -> None:
        """Keep at most *finished_limit* finished records (the oldest finished go first)."""
        while self._finished > self._finished_limit:
            for task_id, r in self._records.items():
                if r.outcome is not None:
                    del self._records[task_id]
                    self._finished -= 1
                    break

    async def outcome(self, task_id: str) -> StoredOutcome | None:
        await trio.lowlevel.checkpoint()
        r = self._records.get(task_id)
        if r is None or r.outcome is None:
            return None
        return StoredOutcome.decode(task_id, r.attempt, r.holder, r.outcome)

    async def hold(self, task_id: str) -> Hold | None:
        await trio.lowlevel.checkpoint()
        r = self._records.get(task_id)
        if r is None:
            return None
        held = not r.released and r.outcome is None
        return Hold(task_id, r.attempt, r.holder, r.released, held, r.outcome is not None)

    # -- leadership ----------------------------------------------------------

    def _live(self, name: str) -> _Term | None:
        term = self._terms.get(name)
        return term if term is not None and term.until > self._clock() else None

    async def acquire_leader(
        self, name: str, holder: str, lease: float, *, known_epoch: int = 0
    ) -> Leadership | None:
        await trio.lowlevel.checkpoint()
        check_lease(lease)
        term = self._live(name)
        if term is not None:
            if term.holder != holder:
                return None
            term.until = self._clock() + lease
            return Leadership(name, holder, term.epoch)
        epoch = max(self._epochs.get(name, 0), known_epoch) + 1
        self._epochs[name] = epoch
        self._terms[name] = _Term(holder, epoch, self._clock() + lease)
        return Leadership(name, holder, epoch)

    async def renew_leader(self, term: Leadership, lease: float) -> bool:
        await trio.lowlevel.checkpoint()
        check_lease(lease)
        live = self._live(term.name)
        if live is None or (live.holder, live.epoch) != (term.holder, term.epoch):
            return False
        live.until = self._clock() + lease
        return True

    async def release_leader(self, term: Leadership) -> bool:
        await trio.lowlevel.checkpoint()
        live = self._live(term.name)
        if live is None or (live.holder, live.epoch) != (term.holder, term.epoch):
            return False
        del self._terms[term.name]
        return True

    async def leader(self, name: str) -> Leadership | None:
        await trio.lowlevel.checkpoint()
        live = self._live(name)
        return None if live is None else Leadership(name, live.holder, live.epoch)

    # -- availability --------------------------------------------------------

    async def ping(self) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_available(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
