"""What the Redis and PostgreSQL stores share: blocking clients driven from trio through
worker threads (one :class:`trio.CapacityLimiter` per store), errors mapped at the
boundary, the availability probe with backoff.

Cancellation: an operation's thread is abandoned when its caller is cancelled (so the
caller's cancel scope is obeyed even when the store hangs); the operation may still take
effect. Every operation is idempotent for the same (task, attempt, holder): retry it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, TypeVar

import trio

from ._api import (
    StoreError,
    StoreUnavailable,
    StoreUnreachable,
    Verdict,
    check_attempt,
    check_requests,
    check_takeover,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ._api import ClaimRequest
    from ._config import StoreConfig

__all__: list[str] = []

T = TypeVar("T")

_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MAX: Final = 2.0
DEFAULT_THREADS: Final = 4


class ThreadedStore:
    """Base of the stores whose client blocks. Subclasses define :meth:`_map_error`,
    :meth:`_claim_or_takeover` (:meth:`claim` and :meth:`takeover` check and call it) and
    :meth:`_claim_batch` (:meth:`claim_many`'s one round trip, in one worker thread)."""

    def __init__(self, config: StoreConfig, swarm: str, *, threads: int = DEFAULT_THREADS) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, not {threads}")
        self._config = config
        self._swarm = swarm
        self._limiter = trio.CapacityLimiter(threads)
        self._closed = False

    @property
    def swarm(self) -> str:
        return self._swarm

    @property
    def url(self) -> str:
        """The store's location, without the password."""
        return self._config.url

    def _map_error(self, exc: Exception, *, opening: bool) -> StoreError | None:
        """Our exception for the client's *exc* (None: not the client's; let it through)."""
        raise NotImplementedError

    def _run_blocking(self, fn: Callable[[], T], *, opening: bool = False) -> T:
        """Run *fn* in this thread; map the client's exceptions (the boundary)."""
        try:
            return fn()
        except StoreError:
            raise
        except Exception as exc:
            mapped = self._map_error(exc, opening=opening)
            if mapped is None:
                raise
            raise mapped from None

    async def _call(self, fn: Callable[[], T], *, opening: bool = False) -> T:
        if self._closed:
            raise StoreError(f"claim store {self.url} is closed")

        def run() -> T:
            return self._run_blocking(fn, opening=opening)

        return await trio.to_thread.run_sync(run, limiter=self._limiter, abandon_on_cancel=True)

    def _unavailable(self, what: str, exc: BaseException, *, opening: bool) -> StoreError:
        detail = self._config.redact(str(exc) or type(exc).__name__)
        if opening:
            return StoreUnreachable(f"claim store {self.url} is unreachable ({what}): {detail}")
        return StoreUnavailable(f"claim store {self.url} is unavailable ({what}): {detail}")

    async def _claim_or_takeover(
        self, task_id: str, attempt: int, holder: str, lease: float, takeover: bool
    ) -> Verdict:
        """A claim (*takeover* False) or a takeover, in one atomic step of the store."""
        raise NotImplementedError

    async def claim(self, task_id: str, attempt: int, holder: str, lease: float) -> Verdict:
        check_attempt(attempt)
        return await self._claim_or_takeover(task_id, attempt, holder, lease, False)

    async def takeover(
        self, task_id: str, attempt: int, holder: str, lease: float, *, holder_dead: bool
    ) -> Verdict:
        check_takeover(holder_dead)
        check_attempt(attempt)
        return await self._claim_or_takeover(task_id, attempt, holder, lease, True)

    def _claim_batch(self, requests: Sequence[ClaimRequest]) -> list[Verdict]:
        """The verdicts of *requests* (checked), in order, in one round trip; blocks."""
        raise NotImplementedError

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[Verdict]:
        """:meth:`claim` / :meth:`takeover` for each request, in order: one worker thread,
        one round trip."""
        check_requests(requests)
        if not requests:
            return []
        batch = list(requests)
        return await self._call(lambda: self._claim_batch(batch))

    async def ping(self) -> None:
        raise NotImplementedError

    async def wait_available(self) -> None:
        """Return once :meth:`ping` succeeds; probe with backoff 50 ms, doubling to 2 s."""
        delay = _BACKOFF_FIRST
        while True:
            try:
                await self.ping()
            except StoreUnavailable:
                await trio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
            else:
                return
