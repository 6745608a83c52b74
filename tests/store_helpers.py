"""Throw-away PostgreSQL databases on the machine's server (127.0.0.1:5432, trust auth,
user ``postgres``) for the claim-store tests, and a bounded wait on a condition."""

from __future__ import annotations

import os
import secrets
import socket
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

import psycopg
import pytest
import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

PG_HOST: Final = "127.0.0.1"
PG_PORT: Final = 5432
PG_USER: Final = "postgres"


def require_postgres() -> None:
    """Skip when no PostgreSQL listens here (fail instead under CI, which has one)."""
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=1):
            return
    except OSError:
        message = f"no PostgreSQL at {PG_HOST}:{PG_PORT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def admin() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True
    )


def create_database() -> str:
    name = f"sheri_test_{secrets.token_hex(6)}"
    with admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    with admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def throwaway_database() -> Iterator[str]:
    """A new database (skipped without PostgreSQL), dropped on the way out."""
    require_postgres()
    name = create_database()
    try:
        yield name
    finally:
        drop_database(name)


def set_accepting(name: str, accepting: bool) -> None:
    """Let no new connection in to *name* and end the open ones (as a shutdown does), or
    let them in again."""
    with admin() as conn:
        conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(accepting).lower()}')
        if not accepting:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )


def pg_url(database: str, user: str = PG_USER) -> str:
    return f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{database}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


WAIT_LIMIT: Final = 5.0


async def wait_until(condition: Callable[[], Awaitable[bool]], *, every: float = 0.02) -> None:
    """Poll *condition* until it is true; fail after :data:`WAIT_LIMIT` seconds.

    A poll, not an event: the condition (a lease running out) lives in the server's clock.
    """
    with trio.fail_after(WAIT_LIMIT):
        while not await condition():  # noqa: ASYNC110
            await trio.sleep(every)
