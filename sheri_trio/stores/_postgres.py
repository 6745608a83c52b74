"""The PostgreSQL claim store (``postgresql://``), on psycopg 3.

Data model (schema version 1, created at first open under an advisory lock)::

    sheri_store_schema (singleton, version)
    sheri_claims  (swarm, task_id) PRIMARY KEY, attempt, holder, released,
                  lease_until timestamptz, outcome jsonb, claimed_at, finished_at
    sheri_leaders (swarm, name) PRIMARY KEY, holder, epoch bigint, lease_until

Every decision is one conditional statement: ``INSERT ... ON CONFLICT (swarm, task_id)
DO UPDATE ... WHERE <the rule>`` for claims, takeovers, assertions and outcomes, and
``UPDATE ... WHERE holder = ... AND attempt = ...`` for renewals and releases. Leases
are judged by the database's clock (``now()``), never by the agents'. A lost claim is
classified (finished, stale, lost, held) by reading the row that the statement locked,
in the same transaction.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Final, TypeVar

import psycopg
import psycopg.errors as pge
from psycopg.pq import TransactionStatus

from ._api import (
    Hold,
    Leadership,
    StoreAuthError,
    StoreConfigError,
    StoredOutcome,
    StoreError,
    StoreKind,
    StoreSchemaError,
    Verdict,
    check_attempt,
    check_lease,
    encode_outcome,
)
from ._threaded import DEFAULT_THREADS, ThreadedStore

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ._api import ClaimRequest
    from ._config import StoreConfig

__all__ = ["PostgresStore"]

T = TypeVar("T")
Conn = psycopg.Connection[tuple[Any, ...]]
Cursor = psycopg.Cursor[tuple[Any, ...]]

SCHEMA_VERSION: Final = 1
_LOCK_ID: Final = 0x5E1A_C1A1  # pg_advisory_xact_lock key of the schema creation
_TIMEOUT: Final = 5

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS sheri_store_schema (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version integer NOT NULL
);
CREATE TABLE IF NOT EXISTS sheri_claims (
    swarm text NOT NULL,
    task_id text NOT NULL,
    attempt integer NOT NULL CHECK (attempt >= 1),
    holder text NOT NULL,
    released boolean NOT NULL DEFAULT false,
    lease_until timestamptz,
    outcome jsonb,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    PRIMARY KEY (swarm, task_id)
);
CREATE TABLE IF NOT EXISTS sheri_leaders (
    swarm text NOT NULL,
    name text NOT NULL,
    holder text NOT NULL,
    epoch bigint NOT NULL,
    lease_until timestamptz,
    PRIMARY KEY (swarm, name)
);
"""

_LEASE: Final = "now() + make_interval(secs => %(lease)s)"
_KEY: Final = "swarm = %(swarm)s AND task_id = %(task)s"

_CLAIM: Final = f"""
INSERT INTO sheri_claims AS c (swarm, task_id, attempt, holder, lease_until)
VALUES (%(swarm)s, %(task)s, %(attempt)s, %(holder)s, {_LEASE})
ON CONFLICT (swarm, task_id) DO UPDATE
SET attempt = EXCLUDED.attempt, holder = EXCLUDED.holder, released = false,
    lease_until = EXCLUDED.lease_until,
    claimed_at = CASE WHEN c.attempt = EXCLUDED.attempt THEN c.claimed_at ELSE now() END
WHERE c.outcome IS NULL AND (
       (c.attempt = EXCLUDED.attempt AND c.holder = EXCLUDED.holder AND NOT c.released)
    OR (c.attempt < EXCLUDED.attempt AND (c.released OR (%(takeover)s AND
                                          (c.lease_until IS NULL OR c.lease_until <= now())))))
RETURNING 1
"""
_CLASSIFY: Final = f"SELECT attempt, outcome IS NOT NULL FROM sheri_claims WHERE {_KEY}"

_RENEW: Final = f"""
UPDATE sheri_claims SET lease_until = {_LEASE}
WHERE {_KEY} AND attempt = %(attempt)s AND holder = %(holder)s
  AND NOT released AND outcome IS NULL AND lease_until > now()
"""

_ASSERT: Final = f"""
INSERT INTO sheri_claims AS c (swarm, task_id, attempt, holder, lease_until)
VALUES (%(swarm)s, %(task)s, %(attempt)s, %(holder)s, {_LEASE})
ON CONFLICT (swarm, task_id) DO UPDATE SET lease_until = EXCLUDED.lease_until
WHERE c.outcome IS NULL AND c.attempt = EXCLUDED.attempt AND c.holder = EXCLUDED.holder
  AND NOT c.released
RETURNING 1
"""

_RELEASE: Final = f"""
UPDATE sheri_claims SET released = true, lease_until = NULL
WHERE {_KEY} AND attempt = %(attempt)s AND holder = %(holder)s AND outcome IS NULL
"""

_FINISH: Final = """
INSERT INTO sheri_claims AS c (swarm, task_id, attempt, holder, outcome, finished_at)
VALUES (%(swarm)s, %(task)s, %(attempt)s, %(holder)s, %(outcome)s::jsonb, now())
ON CONFLICT (swarm, task_id) DO UPDATE
SET outcome = EXCLUDED.outcome, finished_at = now(), lease_until = NULL
WHERE c.outcome IS NULL AND c.attempt = EXCLUDED.attempt AND c.holder = EXCLUDED.holder
  AND NOT c.released
RETURNING 1
"""
_FINISHED_BY: Final = f"""
SELECT 1 FROM sheri_claims
WHERE {_KEY} AND outcome IS NOT NULL AND attempt = %(attempt)s AND holder = %(holder)s
"""

_OUTCOME: Final = f"""
SELECT attempt, holder, outcome::text FROM sheri_claims WHERE {_KEY} AND outcome IS NOT NULL
"""
_HOLD: Final = f"""
SELECT attempt, holder, released, outcome IS NOT NULL, coalesce(lease_until > now(), false)
FROM sheri_claims WHERE {_KEY}
"""

_LEADER_KEY: Final = "swarm = %(swarm)s AND name = %(name)s"
_ACQUIRE: Final = f"""
INSERT INTO sheri_leaders AS l (swarm, name, holder, epoch, lease_until)
VALUES (%(swarm)s, %(name)s, %(holder)s, %(known)s + 1, {_LEASE})
ON CONFLICT (swarm, name) DO UPDATE
SET epoch = CASE WHEN l.holder = EXCLUDED.holder AND l.lease_until > now() THEN l.epoch
                 ELSE greatest(l.epoch, %(known)s) + 1 END,
    holder = EXCLUDED.holder, lease_until = EXCLUDED.lease_until
WHERE l.lease_until IS NULL OR l.lease_until <= now() OR l.holder = EXCLUDED.holder
RETURNING epoch
"""
_RENEW_LEADER: Final = f"""
UPDATE sheri_leaders SET lease_until = {_LEASE}
WHERE {_LEADER_KEY} AND holder = %(holder)s AND epoch = %(epoch)s AND lease_until > now()
"""
_RELEASE_LEADER: Final = f"""
UPDATE sheri_leaders SET lease_until = NULL
WHERE {_LEADER_KEY} AND holder = %(holder)s AND epoch = %(epoch)s AND lease_until > now()
"""
_LEADER: Final = f"""
SELECT holder, epoch FROM sheri_leaders WHERE {_LEADER_KEY} AND lease_until > now()
"""

_AUTH_MARKERS: Final = (
    "password authentication failed",
    "authentication failed",
    "no password supplied",
    "pg_hba.conf",
    "permission denied",
)


def _refused(attempt: int, row: tuple[Any, ...] | None) -> Verdict:
    """A claim of *attempt* that did not win, by the row it found (``_CLASSIFY``)."""
    if row is None:  # cannot happen: the conflict was on this row, now locked
        return Verdict.LOST
    current, finished = row
    if finished:
        return Verdict.FINISHED
    if attempt < current:
        return Verdict.STALE
    return Verdict.LOST if attempt == current else Verdict.HELD


class _Pool:
    """Idle connections for the store's worker threads (at most one per thread)."""

    def __init__(self, connect: Callable[[], Conn]) -> None:
        self._connect = connect
        self._idle: list[Conn] = []
        self._lock = threading.Lock()
        self._closed = False

    def run(self, fn: Callable[[Conn], T]) -> T:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None:
            try:
                return self._use(conn, fn)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                if not conn.broken and not conn.closed:
                    raise
                # an idle connection died (the server restarted): once more on a new one
        return self._use(self._connect(), fn)

    def _use(self, conn: Conn, fn: Callable[[Conn], T]) -> T:
        try:
            result = fn(conn)
        except BaseException:
            if conn.broken or conn.closed or conn.info.transaction_status != TransactionStatus.IDLE:
                conn.close()
            else:
                self._put(conn)
            raise
        self._put(conn)
        return result

    def _put(self, conn: Conn) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class PostgresStore(ThreadedStore):
    """A claim store in PostgreSQL. Open it with :func:`~sheri_trio.stores.open_store`."""

    def __init__(self, config: StoreConfig, swarm: str, *, threads: int = DEFAULT_THREADS) -> None:
        super().__init__(config, swarm, threads=threads)
        if config.kind != "postgresql":
            raise StoreConfigError(f"not a PostgreSQL URL: {config.url}")
        self._pool = _Pool(self._connect)

    @property
    def kind(self) -> StoreKind:
        return "postgresql"

    def _connect(self) -> Conn:
        config, tls = self._config, self._config.tls
        params: dict[str, Any] = {
            "host": config.host,
            "port": config.port,
            "dbname": config.database,
            "connect_timeout": _TIMEOUT,
            "application_name": "sheri-claims",
            "options": f"-c statement_timeout={_TIMEOUT * 1000}",
        }
        if config.username is not None:
            params["user"] = config.username
        if config.password is not None:
            params["password"] = config.password
        if tls.configured:
            if tls.insecure:
                params["sslmode"] = "require"
            else:
                params["sslmode"] = "verify-full"
                params["sslrootcert"] = str(tls.ca_file) if tls.ca_file else "system"
            if tls.cert_file is not None and tls.key_file is not None:
                params["sslcert"], params["sslkey"] = str(tls.cert_file), str(tls.key_file)
        return psycopg.connect(autocommit=True, **params)

    def _map_error(self, exc: Exception, *, opening: bool) -> StoreError | None:
        if not isinstance(exc, psycopg.Error):
            return None
        message = self._config.redact(str(exc).strip())
        lowered = message.lower()
        if (
            isinstance(
                exc,
                pge.InvalidPassword
                | pge.InvalidAuthorizationSpecification
                | pge.InsufficientPrivilege,
            )
            or any(marker in lowered for marker in _AUTH_MARKERS)
            or ("role" in lowered and "does not exist" in lowered)
        ):
            return StoreAuthError(f"claim store {self.url} refused the credentials: {message}")
        if isinstance(exc, pge.InvalidCatalogName) or (
            "database" in lowered and "does not exist" in lowered
        ):
            return StoreConfigError(f"claim store {self.url}: {message}")
        if isinstance(exc, pge.UndefinedTable):
            return StoreSchemaError(f"claim store {self.url} lost its tables: {message}")
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return self._unavailable("connection", exc, opening=opening)
        return StoreError(f"claim store {self.url}: {message}")

    def _params(self, task_id: str, attempt: int, holder: str, **more: object) -> dict[str, object]:
        check_attempt(attempt)
        return {"swarm": self._swarm, "task": task_id, "attempt": attempt, "holder": holder, **more}

    # -- opening -------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create the tables if missing and check the schema version."""

        def setup(conn: Conn) -> None:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_ID])
                conn.execute(_SCHEMA)
                conn.execute(
                    "INSERT INTO sheri_store_schema (version) VALUES (%s) ON CONFLICT DO NOTHING",
                    [SCHEMA_VERSION],
                )
                row = conn.execute("SELECT version FROM sheri_store_schema").fetchone()
            if row is None or row[0] != SCHEMA_VERSION:
                found = None if row is None else row[0]
                raise StoreSchemaError(
                    f"claim store {self.url} has schema version {found}; "
                    f"this sheri knows version {SCHEMA_VERSION}"
                )

        await self._call(lambda: self._pool.run(setup), opening=True)

    async def ping(self) -> None:
        await self._call(lambda: self._pool.run(lambda conn: conn.execute("SELECT 1").fetchone()))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.close()

    async def _one(self, sql: str, params: Mapping[str, object]) -> tuple[Any, ...] | None:
        return await self._call(lambda: self._pool.run(lambda c: c.execute(sql, params).fetchone()))

    async def _count(self, sql: str, params: Mapping[str, object]) -> int:
        return await self._call(lambda: self._pool.run(lambda c: c.execute(sql, params).rowcount))

    # -- tasks -------------------------------------------------------------

    async def _claim_or_takeover(
        self, task_id: str, attempt: int, holder: str, lease: float, takeover: bool
    ) -> Verdict:
        params = self._params(task_id, attempt, holder, lease=check_lease(lease), takeover=takeover)

        def run(conn: Conn) -> Verdict:
            with conn.transaction():
                if conn.execute(_CLAIM, params).fetchone() is not None:
                    return Verdict.WON
                return _refused(attempt, conn.execute(_CLASSIFY, params).fetchone())

        return await self._call(lambda: self._pool.run(run))

    def _claim_batch(self, requests: Sequence[ClaimRequest]) -> list[Verdict]:
        """One transaction in pipeline mode: each request's claim and the read that
        classifies a refusal (the row the claim locked) are sent at once, one round trip
        (one commit). They run in the order of the task ids, a task's own requests in
        theirs (a verdict depends on nothing else): every batch locks its rows in the
        same order, so two batches never deadlock. The verdicts, in the requests' order."""
        order = sorted(range(len(requests)), key=lambda i: requests[i].task_id)
        params = [
            self._params(r.task_id, r.attempt, r.holder, lease=float(r.lease), takeover=r.takeover)
            for r in requests
        ]

        def run(conn: Conn) -> list[Verdict]:
            cursors: dict[int, tuple[Cursor, Cursor]] = {}
            with conn.pipeline(), conn.transaction():
                for i in order:
                    claimed = conn.execute(_CLAIM, params[i])
                    cursors[i] = (claimed, conn.execute(_CLASSIFY, params[i]))
            verdicts = []
            for i, request in enumerate(requests):
                claimed, row = cursors[i]
                if claimed.fetchone() is not None:
                    verdicts.append(Verdict.WON)
                else:
                    verdicts.append(_refused(request.attempt, row.fetchone()))
            return verdicts

        return self._pool.run(run)

    async def renew(self, task_id: str, attempt: int, holder: str, lease: float) -> bool:
        params = self._params(task_id, attempt, holder, lease=check_lease(lease))
        return await self._count(_RENEW, params) == 1

    async def assert_hold(self, task_id: str, attempt: int, holder: str, lease: float) -> bool:
        params = self._params(task_id, attempt, holder, lease=check_lease(lease))
        return await self._one(_ASSERT, params) is not None

    async def release(self, task_id: str, attempt: int, holder: str) -> bool:
        return await self._count(_RELEASE, self._params(task_id, attempt, holder)) == 1

    async def finish(
        self, task_id: str, attempt: int, holder: str, outcome: Mapping[str, object]
    ) -> bool:
        data = encode_outcome(outcome).decode()
        params = self._params(task_id, attempt, holder, outcome=data)

        def run(conn: Conn) -> bool:
            with conn.transaction():
                if conn.execute(_FINISH, params).fetchone() is not None:
                    return True
                return conn.execute(_FINISHED_BY, params).fetchone() is not None

        return await self._call(lambda: self._pool.run(run))

    async def outcome(self, task_id: str) -> StoredOutcome | None:
        row = await self._one(_OUTCOME, {"swarm": self._swarm, "task": task_id})
        if row is None:
            return None
        attempt, holder, data = row
        return StoredOutcome.decode(task_id, attempt, holder, data)

    async def hold(self, task_id: str) -> Hold | None:
        row = await self._one(_HOLD, {"swarm": self._swarm, "task": task_id})
        if row is None:
            return None
        attempt, holder, released, finished, live = row
        return Hold(task_id, attempt, holder, released, live, finished)

    # -- leadership ----------------------------------------------------------

    def _leader_params(self, name: str, holder: str, **more: object) -> dict[str, object]:
        return {"swarm": self._swarm, "name": name, "holder": holder, **more}

    async def acquire_leader(
        self, name: str, holder: str, lease: float, *, known_epoch: int = 0
    ) -> Leadership | None:
        known = max(0, known_epoch)
        params = self._leader_params(name, holder, lease=check_lease(lease), known=known)
        row = await self._one(_ACQUIRE, params)
        return None if row is None else Leadership(name, holder, int(row[0]))

    async def renew_leader(self, term: Leadership, lease: float) -> bool:
        params = self._leader_params(
            term.name, term.holder, epoch=term.epoch, lease=check_lease(lease)
        )
        return await self._count(_RENEW_LEADER, params) == 1

    async def release_leader(self, term: Leadership) -> bool:
        params = self._leader_params(term.name, term.holder, epoch=term.epoch)
        return await self._count(_RELEASE_LEADER, params) == 1

    async def leader(self, name: str) -> Leadership | None:
        row = await self._one(_LEADER, {"swarm": self._swarm, "name": name})
        return None if row is None else Leadership(name, row[0], int(row[1]))
