"""Open a claim store from its configuration: the only module that knows every backend."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import trio

from ._broker import BrokerStore
from ._threaded import DEFAULT_THREADS

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ._api import ClaimStore
    from ._config import StoreConfig
    from ._postgres import PostgresStore
    from ._redis import RedisStore

__all__ = ["connect_store", "open_store"]

_CLOSE_TIMEOUT = 5.0


async def connect_store(
    config: StoreConfig, swarm: str, *, threads: int = DEFAULT_THREADS
) -> ClaimStore:
    """Open the store *config* names, for *swarm*; the caller closes it (``aclose``).

    Raises :class:`~sheri_trio.stores.StoreUnreachable` when nothing answers,
    :class:`~sheri_trio.stores.StoreAuthError` for refused credentials,
    :class:`~sheri_trio.stores.StoreConfigError` for a database that does not exist or
    a Redis older than 6, :class:`~sheri_trio.stores.StoreSchemaError` for a schema this
    version does not know.
    """
    store: RedisStore | PostgresStore
    match config.kind:
        case "broker":
            return BrokerStore(swarm)
        case "redis":  # each backend loads its client on first use
            from ._redis import RedisStore

            store = RedisStore(config, swarm, threads=threads)
        case "postgresql":
            from ._postgres import PostgresStore

            store = PostgresStore(config, swarm, threads=threads)
    try:
        await store.open()
    except BaseException:
        with trio.CancelScope(shield=True):
            await store.aclose()
        raise
    return store


@contextlib.asynccontextmanager
async def open_store(
    config: StoreConfig, swarm: str, *, threads: int = DEFAULT_THREADS
) -> AsyncIterator[ClaimStore]:
    """``async with open_store(config, swarm) as store:`` (see :func:`connect_store`)."""
    store = await connect_store(config, swarm, threads=threads)
    try:
        yield store
    finally:
        with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            await store.aclose()
