"""The claim-store interface: what every backend promises, its results and its errors.

A claim store makes the decisions that must be unique in a swarm: who holds each
``(task, attempt)``, the takeover of a task whose holder died, the one final outcome
of a task, and the one leader of a role (the dispatcher). docs/stores.md states the
guarantee and the rules; :class:`~sheri_trio.stores.BrokerStore` is the executable
reference of the rules, the Lua scripts and the SQL of the other backends follow it.

A store is bound to one swarm: every key or row it touches carries the swarm's name.
Every operation is **idempotent for the same (task, attempt, holder)**: an operation
whose reply was lost (a dropped connection, a cancelled caller) can be repeated and
gives the same answer, so a caller that is cancelled mid-call retries it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, Self

import orjson

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "ClaimRequest",
    "ClaimStore",
    "Hold",
    "Leadership",
    "StoreAuthError",
    "StoreConfigError",
    "StoreError",
    "StoreKind",
    "StoreSchemaError",
    "StoreUnavailable",
    "StoreUnreachable",
    "StoredOutcome",
    "Verdict",
]

StoreKind = Literal["broker", "redis", "postgresql"]


class Verdict(enum.Enum):
    """The answer to :meth:`ClaimStore.claim` and :meth:`ClaimStore.takeover`."""

    WON = "won"  # the caller holds (task, attempt) now (also: it already did)
    LOST = "lost"  # another holder has this attempt
    STALE = "stale"  # a newer attempt exists
    HELD = "held"  # the previous attempt is still held: not released (claim), lease live (takeover)
    FINISHED = "finished"  # the task has its final outcome


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One claim of a batch (:meth:`ClaimStore.claim_many`): ``claim(task_id, attempt,
    holder, lease)``, or with ``takeover`` ``takeover(task_id, attempt, holder, lease,
    holder_dead=True)``: a takeover request says that its caller saw the holder dead in
    presence (the rule of :meth:`ClaimStore.takeover`)."""

    task_id: str
    attempt: int
    holder: str
    lease: float
    takeover: bool = False


@dataclass(frozen=True, slots=True)
class Hold:
    """Who holds a task, as the store says now (:meth:`ClaimStore.hold`)."""

    task_id: str
    attempt: int
    holder: str
    released: bool
    live: bool  # the lease has not run out (the broker store: always True while held)
    finished: bool


@dataclass(frozen=True, slots=True)
class StoredOutcome:
    """The accepted final outcome of a task (:meth:`ClaimStore.outcome`)."""

    task_id: str
    attempt: int
    holder: str
    outcome: dict[str, object]

    @classmethod
    def decode(cls, task_id: str, attempt: int | str, holder: str, data: str | bytes) -> Self:
        """The outcome as a backend stored it (:func:`encode_outcome`'s JSON)."""
        return cls(task_id, int(attempt), holder, orjson.loads(data))


@dataclass(frozen=True, slots=True)
class Leadership:
    """A term of leadership of *name*: its epoch is the fencing token of the term.

    Epochs of one name only grow: a new term has a larger epoch than every term the
    store remembers and than the ``known_epoch`` its candidate gave.
    """

    name: str
    holder: str
    epoch: int


class ClaimStore(Protocol):
    """The interface of the claim stores. Leases are in seconds (> 0).

    Task rules (the same in every backend):

    - ``claim(n)`` wins when the task has no record, or when its current attempt was
      released and ``n`` is newer. A newer attempt while the current one is held (its
      lease live or not) is ``HELD``: that is :meth:`takeover`'s case.
    - ``takeover(n)`` wins when ``n`` is newer than the current attempt and the current
      holder's lease has run out (judged by the store's clock). The caller must also
      have seen the holder dead in presence (``holder_dead=True``): a lease lost with
      the store's data (a Redis restarted empty) is not a death.
    - Of two callers racing for one attempt, exactly one wins.
    - ``renew`` extends a live lease of the current holder; a lapsed one is not renewed.
    - ``assert_hold`` re-creates the caller's hold after the store lost it: it succeeds
      when the record says the caller holds the current attempt, or when there is no
      record at all, and no other holder exists.
    - ``finish`` stores the outcome once: for the current attempt's holder (lease live
      or not: no one else has the attempt), or when there is no record. A newer attempt,
      a release or an earlier outcome refuse it (fencing).
    """

    @property
    def kind(self) -> StoreKind: ...

    @property
    def swarm(self) -> str: ...

    async def claim(self, task_id: str, attempt: int, holder: str, lease: float) -> Verdict:
        """Claim *attempt* of *task_id* for *holder*, with a lease of *lease* seconds."""
        ...

    async def takeover(
        self, task_id: str, attempt: int, holder: str, lease: float, *, holder_dead: bool
    ) -> Verdict:
        """Claim *attempt* (the current one + 1) once the current lease has run out."""
        ...

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[Verdict]:
        """The verdicts of *requests*, in their order: what :meth:`claim` (or
        :meth:`takeover`, for a ``takeover`` request) one after the other in that order
        would answer, the same task more than once included, in one round trip.

        The arguments of every request are checked first (``ValueError`` before anything
        is asked). Not atomic as a whole: a batch without an answer (``StoreUnavailable``)
        may have taken effect in part; each claim is idempotent, so ask again.
        """
        ...

    async def renew(self, task_id: str, attempt: int, holder: str, lease: float) -> bool:
        """Extend the lease of a live hold (heartbeat-driven); False: the hold is gone."""
        ...

    async def assert_hold(self, task_id: str, attempt: int, holder: str, lease: float) -> bool:
        """Re-create a hold the store lost (call it when :meth:`renew` said False)."""
        ...

    async def release(self, task_id: str, attempt: int, holder: str) -> bool:
        """Give the task back: attempt + 1 may be claimed. False: not the holder."""
        ...

    async def finish(
        self, task_id: str, attempt: int, holder: str, outcome: Mapping[str, object]
    ) -> bool:
        """Store the final outcome; True when it is this (attempt, holder)'s outcome.

        Call it *before* publishing the outcome; publish what :meth:`outcome` returns.
        """
        ...

    async def outcome(self, task_id: str) -> StoredOutcome | None:
        """The task's accepted outcome, if any (to publish one lost after finish)."""
        ...

    async def hold(self, task_id: str) -> Hold | None:
        """The task's record, if the store has one."""
        ...

    async def acquire_leader(
        self, name: str, holder: str, lease: float, *, known_epoch: int = 0
    ) -> Leadership | None:
        """Become the leader of *name* unless another holder's lease is live.

        *known_epoch*: the largest epoch the caller has seen (e.g. in a retained status),
        so epochs keep growing after a store lost its data. The current leader acquiring
        again gets its own term back.
        """
        ...

    async def renew_leader(self, term: Leadership, lease: float) -> bool:
        """Extend a live term; False: it lapsed or another term began (step down)."""
        ...

    async def release_leader(self, term: Leadership) -> bool:
        """End a live term early; False: it was not live."""
        ...

    async def leader(self, name: str) -> Leadership | None:
        """The live term of *name*, if any."""
        ...

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the store answers now."""
        ...

    async def wait_available(self) -> None:
        """Return once the store answers, probing with a growing backoff (to 2 s)."""
        ...

    async def aclose(self) -> None:
        """Close the connections; idempotent."""
        ...


# -- the arguments' checks every backend makes (not exported) -------------------


def check_attempt(attempt: int) -> None:
    """Attempts count from 1."""
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, not {attempt}")


def check_lease(lease: float) -> float:
    """A lease is > 0 seconds; returned as a float."""
    if not lease > 0:
        raise ValueError(f"lease must be > 0 seconds, not {lease}")
    return float(lease)


def check_takeover(holder_dead: bool) -> None:
    """A takeover needs the caller to have seen the holder dead (not only its lease out)."""
    if not holder_dead:
        raise ValueError("takeover needs the holder's death seen in presence (holder_dead)")


def check_requests(requests: Sequence[ClaimRequest]) -> None:
    """Every request of a batch: its attempt and its lease (before any is asked)."""
    for request in requests:
        check_attempt(request.attempt)
        check_lease(request.lease)


def encode_outcome(outcome: Mapping[str, object]) -> bytes:
    """An outcome as every backend stores it (JSON; :meth:`StoredOutcome.decode`)."""
    return orjson.dumps(dict(outcome))


# -- errors ------------------------------------------------------------------


class StoreError(Exception):
    """Base class of every error of :mod:`sheri_trio.stores`. Messages carry no password."""


class StoreConfigError(StoreError, ValueError):
    """The store's configuration is wrong: a bad URL or scheme, a password on the command
    line, a missing password file, a database that does not exist."""


class StoreUnavailable(StoreError):
    """The store did not answer (stopped, restarting, the network is cut).

    Nothing falls back to the broker's order: stop taking new work, keep what is held,
    :meth:`ClaimStore.wait_available`, carry on.
    """


class StoreUnreachable(StoreUnavailable):
    """At open: nothing answers at the store's address."""


class StoreAuthError(StoreError):
    """The store refused the credentials (wrong user or password, or no permission)."""


class StoreSchemaError(StoreError):
    """The store's data has a schema this version does not know."""
