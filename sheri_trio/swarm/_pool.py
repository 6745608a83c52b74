"""The dispatcher's free agents, by role and load (sans-IO, no clock of its own).

:class:`FreeAgents` answers "which agent of this role gets the next task" in amortised
O(log n): one heap per role of ``(load, turn, agent_id)``, the least loaded first
(``load`` is held / max_tasks) and, among equals, the agent longest at that load, so
lone tasks go round the agents of a role. Each agent has at most one live entry: a
changed agent gets a new entry and a new turn, and its old one goes stale, dropped when
it comes to the top or when stale entries outnumber the live ones (a rebuild, O(n) once
per n changes). An assignment thus costs the same with 9 agents or 900; before, every
round looked at every free agent (at 90 idle agents that was ~65 us of a lone task).

What counts as free is the caller's: it tells the pool each agent's load after every
change (``update``) and checks the agent it is given (a lease that lapsed by time alone
is found there, and the agent dropped until its next sign of life).
"""

from __future__ import annotations

import heapq

_Entry = tuple[float, int, str]  # (load, turn, agent id)


class FreeAgents:
    """The agents with a free slot, one heap per role."""

    def __init__(self) -> None:
        self._heaps: dict[str | None, list[_Entry]] = {}
        #: agent id -> (role, load, turn) of its live entry
        self._live: dict[str, tuple[str | None, float, int]] = {}
        self._turn = 0
        self._entries = 0  # in all heaps, stale ones included

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._live

    def update(self, agent_id: str, role: str | None, load: float | None) -> None:
        """``agent_id`` of ``role`` now has ``load`` (held / max_tasks), or no free slot
        (``None``). An unchanged agent keeps its turn."""
        live = self._live.get(agent_id)
        if load is None:
            if live is not None:
                del self._live[agent_id]
            return
        if live is not None and live[0] == role and live[1] == load:
            return
        self._turn += 1
        self._live[agent_id] = (role, load, self._turn)
        heapq.heappush(self._heaps.setdefault(role, []), (load, self._turn, agent_id))
        self._entries += 1
        if self._entries > 2 * len(self._live) + 64:
            self._rebuild()

    def discard(self, agent_id: str) -> None:
        self._live.pop(agent_id, None)

    def top(self, role: str | None) -> _Entry | None:
        """The least loaded agent of ``role`` longest at its load, or None."""
        heap = self._heaps.get(role)
        while heap:
            entry = heap[0]
            live = self._live.get(entry[2])
            if live is not None and live[2] == entry[1]:
                return entry
            heapq.heappop(heap)
            self._entries -= 1
        return None

    def _rebuild(self) -> None:
        heaps: dict[str | None, list[_Entry]] = {}
        for agent_id, (role, load, turn) in self._live.items():
            heaps.setdefault(role, []).append((load, turn, agent_id))
        for heap in heaps.values():
            heapq.heapify(heap)
        self._heaps = heaps
        self._entries = len(self._live)
