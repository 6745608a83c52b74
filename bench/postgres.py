"""A throw-away PostgreSQL database on the machine's server (127.0.0.1:5432, trust auth,
user ``postgres``) for the bench's stores section: created by :meth:`start`, dropped by
:meth:`stop` (with the other servers the bench started)."""

from __future__ import annotations

import os
import secrets

import psycopg

HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PORT = int(os.environ.get("BENCH_PG_PORT", "5432"))
USER = os.environ.get("BENCH_PG_USER", "postgres")


class ThrowawayDatabase:
    def __init__(self) -> None:
        self.name = f"sheri_bench_{secrets.token_hex(6)}"
        self.created = False

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(host=HOST, port=PORT, user=USER, dbname="postgres", autocommit=True)

    def start(self) -> str:
        """Create it; its ``postgresql://`` URL (no password: trust auth)."""
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.created = True
        return f"postgresql://{USER}@{HOST}:{PORT}/{self.name}"

    def stop(self) -> None:
        if self.created:
            with self._admin() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            self.created = False


def throwaway_database() -> ThrowawayDatabase:
    return ThrowawayDatabase()
