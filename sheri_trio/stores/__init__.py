"""Claim stores: the decisions that must be unique in a swarm (who holds each task
attempt, takeover, the one final outcome, the one leader), behind one interface.

* ``broker`` (:class:`BrokerStore`): the first claim in the broker's order wins (the
  default for a single broker; needs no other service).
* ``redis://`` / ``rediss://`` (:class:`RedisStore`): Redis 6 or newer, ``SET NX PX``
  and compare-and-act Lua scripts.
* ``postgresql://`` (:class:`PostgresStore`): one table, conditional ``INSERT ... ON
  CONFLICT`` / ``UPDATE ... WHERE``, leases judged by the database's clock.

Configuration: :func:`resolve_store` / :func:`parse_store_url`; opening:
:func:`open_store`. docs/stores.md states the guarantee. Nothing here knows about MQTT
or agents.
"""

from typing import TYPE_CHECKING

from ._api import ClaimRequest as ClaimRequest
from ._api import ClaimStore as ClaimStore
from ._api import Hold as Hold
from ._api import Leadership as Leadership
from ._api import StoreAuthError as StoreAuthError
from ._api import StoreConfigError as StoreConfigError
from ._api import StoredOutcome as StoredOutcome
from ._api import StoreError as StoreError
from ._api import StoreKind as StoreKind
from ._api import StoreSchemaError as StoreSchemaError
from ._api import StoreUnavailable as StoreUnavailable
from ._api import StoreUnreachable as StoreUnreachable
from ._api import Verdict as Verdict
from ._broker import BrokerStore as BrokerStore
from ._config import ENV_PASSWORD as ENV_PASSWORD
from ._config import ENV_URL as ENV_URL
from ._config import StoreConfig as StoreConfig
from ._config import StoreSource as StoreSource
from ._config import StoreTLS as StoreTLS
from ._config import parse_store_url as parse_store_url
from ._config import redact_url as redact_url
from ._config import resolve_store as resolve_store
from ._open import connect_store as connect_store
from ._open import open_store as open_store

if TYPE_CHECKING:
    from ._postgres import PostgresStore as PostgresStore
    from ._redis import RedisStore as RedisStore


def __getattr__(name: str) -> object:
    """The backends load their client (redis, psycopg) on first use, not at import."""
    if name == "RedisStore":
        from ._redis import RedisStore

        return RedisStore
    if name == "PostgresStore":
        from ._postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
