"""Seeing that the broker keeps no single order (issue 11), sans-IO: what agents and
dispatchers saw in, incidents out.

In ``broker`` mode exactly-once rests on every agent seeing one order of claims
(docs/protocol.md, rule 3). Brokers that do not give it (a cluster, bridged brokers)
make it visible in three ways, none of which happens on a single broker:

* **a second holder**: another agent publishes the final outcome of the very attempt
  this agent holds (its own claim came back first here, the other's came first there);
* **a second final outcome**: two agents publish final outcomes for one attempt;
* **a second leader**: a dispatcher in its term sees another one online, and its own
  dispatch session still works after that (on one broker the other took it over).

:class:`DivergenceWatch` tells them apart from the ordinary (an echo, a redelivery, a
fenced older attempt, a successor) and says who publishes each incident, so that one
agent reports it once on ``{swarm}/errors``: the holder that saw its task finished by
another (only it can see that); for a second outcome, the smaller id of the two agents
involved (both see it); for a second leader, the older term. Every agent that sees an
incident logs it once.
Nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

__all__ = ["DIVERGENCE_FIX", "DivergenceWatch", "Incident", "ReportDivergence"]

#: the cause and the fix, in every log line and report of an incident
DIVERGENCE_FIX: Final = (
    "the broker does not deliver one order to all agents, e.g. a cluster or a bridge: "
    "configure a claim store"
)


class Incident(enum.StrEnum):
    """What became visible (the ``incident`` of the report)."""

    SECOND_HOLDER = "second_holder"
    SECOND_OUTCOME = "second_outcome"
    SECOND_LEADER = "second_leader"


@dataclass(frozen=True, slots=True)
class ReportDivergence:
    """One incident: log it (every agent that sees it), publish it on ``{swarm}/errors``
    when ``publish`` (one agent per incident)."""

    incident: Incident
    #: the task (None for a second leader)
    task_id: str | None
    #: the attempt both ran (for a second leader: the epoch of the other's term)
    attempt: int
    #: the agents involved, sorted
    agents: tuple[str, ...]
    #: the topic on which it became visible
    topic: str
    publish: bool

    @property
    def message(self) -> str:
        """The error: what happened, then the cause and the fix."""
        who = " and ".join(self.agents)
        if self.incident is Incident.SECOND_HOLDER:
            what = f"task {self.task_id} attempt {self.attempt} was held by two agents ({who})"
        elif self.incident is Incident.SECOND_OUTCOME:
            what = (
                f"task {self.task_id} attempt {self.attempt} has two final outcomes "
                f"(from {who}): it ran twice"
            )
        else:
            what = f"two dispatchers are in office at once ({who}; epoch {self.attempt})"
        return f"{what}; {DIVERGENCE_FIX}"


class DivergenceWatch:
    """The outcomes (and leaders) one agent has seen, and the incidents among them.

    Bounded: the first outcomes of the ``limit`` most recent tasks, and as many reported
    incidents.
    """

    def __init__(self, me: str, *, limit: int = 100_000) -> None:
        self.me = me
        self._limit = limit
        #: task -> attempt -> the agent whose outcome came first
        self._outcomes: OrderedDict[str, dict[int, str]] = OrderedDict()
        #: the incidents already reported (logged, and published if ours to publish): one
        #: per (task, attempt), whichever way it showed; one per (leaders, epoch)
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.incidents = 0

    def finished(self, task_id: str, attempt: int) -> None:
        """We are about to publish ``attempt``'s final outcome."""
        self._first(task_id, attempt, self.me)

    def on_outcome(
        self, task_id: str, attempt: int, agent_id: str | None, *, holding: int | None, topic: str
    ) -> list[ReportDivergence]:
        """A final outcome off the broker; ``holding``: the attempt of the task we hold
        (running or stopping), None if we hold none."""
        if agent_id is None:
            return []  # not an agent's (by hand): nothing to compare
        first = self._first(task_id, attempt, agent_id)
        if first == agent_id:
            if holding == attempt and agent_id != self.me:
                # our own claim won here, theirs there: only we can see it
                return self._incident(
                    Incident.SECOND_HOLDER, task_id, attempt, (self.me, agent_id), topic, True
                )
            return []  # the first outcome of this attempt (or our own echo)
        agents = tuple(sorted((first, agent_id)))
        mine = self.me in agents
        return self._incident(
            Incident.SECOND_OUTCOME, task_id, attempt, agents, topic, mine and self.me == agents[0]
        )

    def on_leader(
        self, agent_id: str, epoch: int, *, my_epoch: int | None, topic: str
    ) -> list[ReportDivergence]:
        """Another dispatcher's online status, seen while we are in the term ``my_epoch``
        (None: we are not the dispatcher).

        On a single broker that happens only in a takeover (the newcomer took our
        session: our term is over), so the caller reports the incident only once our
        dispatch session proved alive after it (a round trip). It is published by the
        older term (the newer may never see the older's status, published before it
        stood), between equal epochs by the smaller id.
        """
        if my_epoch is None or agent_id == self.me:
            return []
        agents = tuple(sorted((self.me, agent_id)))
        publish = epoch > my_epoch or (epoch == my_epoch and self.me == agents[0])
        return self._incident(Incident.SECOND_LEADER, None, epoch, agents, topic, publish)

    # --------------------------------------------------------------- helpers
    def _first(self, task_id: str, attempt: int, agent_id: str) -> str:
        """The agent whose outcome of ``attempt`` came first (recording ``agent_id`` if
        none did)."""
        attempts = self._outcomes.get(task_id)
        if attempts is None:
            attempts = self._outcomes[task_id] = {}
            while len(self._outcomes) > self._limit:
                self._outcomes.popitem(last=False)
        else:
            self._outcomes.move_to_end(task_id)
        return attempts.setdefault(attempt, agent_id)

    def _incident(
        self,
        incident: Incident,
        task_id: str | None,
        attempt: int,
        agents: tuple[str, ...],
        topic: str,
        publish: bool,
    ) -> list[ReportDivergence]:
        key = (task_id if task_id is not None else "leaders " + ",".join(agents), attempt)
        if key in self._seen:
            return []
        self._seen[key] = None
        while len(self._seen) > self._limit:
            self._seen.popitem(last=False)
        self.incidents += 1
        agents = tuple(sorted(agents))
        return [ReportDivergence(incident, task_id, attempt, agents, topic, publish)]
