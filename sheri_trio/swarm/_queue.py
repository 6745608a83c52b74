"""The claim queue: which task an agent claims next. No I/O, no clock.

The queue holds ``limit`` candidates, most urgent first (priority, then arrival, with the
tasks this agent is not preferred for pushed back by ``preference_window`` arrivals).
Beyond ``limit``, tasks wait in an overflow list (bounded by ``overflow_limit``) and move
up as the queue drains, so a burst is never silently dropped: every eligible agent keeps
it until someone claims it. A more urgent task that finds the queue full takes the place
of the least urgent, newest candidate, which waits in the overflow instead.
"""

from __future__ import annotations

import enum
import heapq
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["ClaimQueue", "Placed"]


class Placed(enum.Enum):
    """Where :meth:`ClaimQueue.push` put a task."""

    QUEUED = "queued"  # a candidate for the next free slot
    ALREADY = "already"  # already a candidate for this attempt or a later one
    OVERFLOW = "overflow"  # waits beyond the queue, in arrival order
    DROPPED = "dropped"  # the overflow is full too: left to other agents


@dataclass(slots=True)
class _Candidate:
    attempt: int
    rank: int
    received_at: float
    preferred: bool


class ClaimQueue:
    def __init__(self, limit: int, overflow_limit: int, preference_window: int) -> None:
        self.limit = limit
        self.overflow_limit = overflow_limit
        self.preference_window = preference_window
        self._candidates: dict[str, _Candidate] = {}
        self._rank_counts = [0, 0, 0]  # candidates per priority rank (high, medium, low)
        self._heap: list[tuple[int, int, int, str]] = []  # rank, order, seq, task id
        self._seq = 0
        #: beyond the queue, in arrival order: id, attempt, rank, arrival, preferred
        self.overflow: deque[tuple[str, int, int, float, bool]] = deque()
        #: tasks pushed out of a full overflow (the caller forgets them)
        self.dropped: list[str] = []

    def __len__(self) -> int:
        return len(self._candidates)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._candidates

    def attempt(self, task_id: str) -> int:
        """The attempt we would claim for ``task_id`` (0: not a candidate)."""
        c = self._candidates.get(task_id)
        return c.attempt if c is not None else 0

    def push(
        self, task_id: str, attempt: int, rank: int, received_at: float, *, preferred: bool
    ) -> Placed:
        current = self._candidates.get(task_id)
        if current is not None and current.attempt >= attempt:
            return Placed.ALREADY
        if current is None and len(self._candidates) >= self.limit:
            if rank >= self._worst_rank():
                return self._overflow_push(task_id, attempt, rank, received_at, preferred)
            # more urgent than something queued: the least urgent, newest one waits instead
            worst = max(
                self._candidates,
                key=lambda t: (self._candidates[t].rank, self._candidates[t].received_at),
            )
            w = self._candidates[worst]
            self.discard(worst)
            self._overflow_push(worst, w.attempt, w.rank, w.received_at, w.preferred)
        if current is None:
            self._rank_counts[rank] += 1
            self._candidates[task_id] = _Candidate(attempt, rank, received_at, preferred)
        else:
            current.attempt = attempt
        self._seq += 1
        order = self._seq
        if self.preference_window and not preferred:
            order += self.preference_window
        heapq.heappush(self._heap, (rank, order, self._seq, task_id))
        return Placed.QUEUED

    def discard(self, task_id: str) -> int | None:
        """Take ``task_id`` out of the queue; the attempt it had, or None."""
        c = self._candidates.pop(task_id, None)
        if c is None:
            return None
        self._rank_counts[c.rank] -= 1
        return c.attempt

    def pop(self, wanted: Callable[[str, int], bool]) -> tuple[str, int] | None:
        """The most urgent candidate that is still ``wanted(task_id, attempt)``, taken out
        of the queue (overflow tasks move up as room appears); None when none is left."""
        while True:
            if self.overflow:
                self._refill(wanted)
            if not self._heap:
                return None
            task_id = heapq.heappop(self._heap)[3]
            attempt = self.discard(task_id)
            if attempt is not None and wanted(task_id, attempt):
                return task_id, attempt

    def clear(self) -> None:
        self._candidates.clear()
        self._rank_counts = [0, 0, 0]
        self._heap.clear()
        self.overflow.clear()

    def _worst_rank(self) -> int:
        counts = self._rank_counts
        return 2 if counts[2] else 1 if counts[1] else 0

    def _overflow_push(
        self, task_id: str, attempt: int, rank: int, at: float, preferred: bool
    ) -> Placed:
        if len(self.overflow) >= self.overflow_limit:
            self.dropped.append(task_id)
            return Placed.DROPPED
        self.overflow.append((task_id, attempt, rank, at, preferred))
        return Placed.OVERFLOW

    def _refill(self, wanted: Callable[[str, int], bool]) -> None:
        """Move overflow tasks that are still wanted into the queue, while it has room."""
        while self.overflow and len(self._candidates) < self.limit:
            task_id, attempt, rank, at, preferred = self.overflow.popleft()
            if wanted(task_id, attempt):
                self.push(task_id, attempt, rank, at, preferred=preferred)
