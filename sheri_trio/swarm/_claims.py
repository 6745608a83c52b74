"""Exactly-once claiming, fencing and leases: pure bookkeeping, no I/O, no clock.

The rule (see docs/protocol.md): every agent subscribes to ``tasks/assigned`` and sees
the claims in the broker's order. For each ``(task_id, attempt)`` the *first* claim in
that order wins; later claims for the same attempt lose. A takeover (the holder died,
stopped heartbeating, or released the task) is a claim for ``attempt + 1``. Outcomes
carry their attempt; an outcome whose attempt is not the current holder's is stale and
ignored (fencing).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._protocol import Claim, Outcome

__all__ = ["ClaimBook", "ClaimVerdict", "Holder"]


class ClaimVerdict(enum.Enum):
    WON = "won"  # first claim for a new attempt: its agent holds the task now
    LOST = "lost"  # a later claim for an attempt already held
    STALE = "stale"  # a claim for an attempt older than the current one
    FINISHED = "finished"  # the task already has its final outcome


@dataclass(slots=True)
class Holder:
    agent_id: str
    attempt: int
    since: float  # when we saw the winning claim (caller's clock)


class ClaimBook:
    """What one agent knows about who holds which task, and which tasks are finished."""

    def __init__(self, *, finished_limit: int = 100_000) -> None:
        self.holders: dict[str, Holder] = {}
        self._finished: OrderedDict[str, bool] = OrderedDict()
        self._finished_limit = finished_limit

    def observe_claim(self, claim: Claim, now: float) -> ClaimVerdict:
        if claim.task_id in self._finished:
            return ClaimVerdict.FINISHED
        current = self.holders.get(claim.task_id)
        if current is None or claim.attempt > current.attempt:
            self.holders[claim.task_id] = Holder(claim.agent_id, claim.attempt, now)
            return ClaimVerdict.WON
        if claim.attempt == current.attempt:
            return ClaimVerdict.LOST
        return ClaimVerdict.STALE

    def observe_outcome(self, outcome: Outcome) -> bool:
        """Record a final outcome; False when it is a duplicate or stale (fenced off)."""
        if outcome.task_id in self._finished:
            return False
        current = self.holders.get(outcome.task_id)
        if current is not None and outcome.attempt != current.attempt:
            return False
        self.mark_finished(outcome.task_id, outcome.success)
        return True

    def mark_finished(self, task_id: str, success: bool) -> None:
        self.holders.pop(task_id, None)
        self._finished[task_id] = success
        self._finished.move_to_end(task_id)
        while len(self._finished) > self._finished_limit:
            self._finished.popitem(last=False)

    def reopen(self, task_id: str) -> None:
        """``task_id`` is not finished after all (dispatch mode: our outcome was fenced
        off and the dispatcher assigned us a newer attempt)."""
        self._finished.pop(task_id, None)

    def is_finished(self, task_id: str) -> bool:
        return task_id in self._finished

    def holder(self, task_id: str) -> Holder | None:
        return self.holders.get(task_id)

    def attempt(self, task_id: str) -> int:
        """The current attempt number (0 when nobody has claimed the task yet)."""
        h = self.holders.get(task_id)
        return h.attempt if h else 0

    def release(self, task_id: str, attempt: int) -> bool:
        """The holder gave the task back; True if ``attempt`` is current (so it is free)."""
        h = self.holders.get(task_id)
        return h is not None and h.attempt == attempt and task_id not in self._finished
