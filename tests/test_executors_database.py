"""database.backup (SQLite online backup, verified by opening the copy) and migrate."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from executor_helpers import make_ctx

from sheri_trio.executors import TaskConfigError, TaskPayloadError
from sheri_trio.executors._database import backup, migrate

if TYPE_CHECKING:
    from collections.abc import Iterator

MIGRATE = """
import os, sqlite3, sys
target = int(os.environ["SHERI_TARGET_VERSION"] or 2)
db = sqlite3.connect(os.environ["SHERI_DATABASE_PATH"])
v = db.execute("PRAGMA user_version").fetchone()[0]
steps = {1: "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)",
         2: "ALTER TABLE users ADD COLUMN email TEXT"}
while v < target:
    v += 1
    db.execute(steps[v])
    db.execute(f"PRAGMA user_version = {v}")
    print("applied", v)
db.commit()
"""


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "ws" / "app.db"
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.executemany("INSERT INTO notes (body) VALUES (?)", [(f"note {i}",) for i in range(500)])
    conn.commit()
    conn.close()
    return path


async def test_sqlite_backup_is_a_working_copy(db: Path, tmp_path: Path) -> None:
    config = {"database": {"app": {"path": "app.db", "keep": 2}}}
    ctx, _ = make_ctx("database.backup", {}, config=config, workspace=db.parent,
                      state=tmp_path / "state")  # fmt: skip
    writer = sqlite3.connect(db)  # a live connection with an open write transaction
    writer.execute("INSERT INTO notes (body) VALUES ('uncommitted')")
    result = await backup(ctx)
    writer.rollback()
    writer.close()
    assert result["status"] == "backed_up"
    location = Path(result["location"])
    assert location.parent == tmp_path / "state" / "backups"
    assert result["size"] == (await trio.Path(location).stat()).st_size > 0
    assert result["integrity"] == "ok"
    copy = sqlite3.connect(location)
    assert copy.execute("SELECT count(*), max(body) FROM notes").fetchone() == (500, "note 99")
    copy.close()

    # keep = 2: the oldest goes
    first = location
    for _ in range(2):
        result = await backup(ctx)
    assert not first.exists()
    assert len(list((tmp_path / "state" / "backups").glob("app-*"))) == 2
    assert result["pruned"] == [first.name]


async def test_backup_errors(db: Path, tmp_path: Path) -> None:
    ctx, _ = make_ctx("database.backup", {}, state=tmp_path)
    with pytest.raises(TaskConfigError, match=r"no database is configured.*\[database.<name>\]"):
        await backup(ctx)
    two = {"database": {"a": {"path": str(db)}, "b": {"path": str(tmp_path / "none.db")}}}
    ctx, _ = make_ctx("database.backup", {}, config=two, state=tmp_path)
    with pytest.raises(TaskPayloadError, match=r"needs 'database' \(configured databases: a, b\)"):
        await backup(ctx)
    ctx, _ = make_ctx("database.backup", {"database": "b"}, config=two, state=tmp_path)
    with pytest.raises(TaskConfigError, match="SQLite database not found"):
        await backup(ctx)
    ctx, _ = make_ctx("database.backup", {"database": "c"}, config=two, state=tmp_path)
    with pytest.raises(TaskConfigError, match=r"no \[database.c\] table"):
        await backup(ctx)


async def test_migrate_runs_the_command_and_reads_the_version(db: Path, tmp_path: Path) -> None:
    config = {
        # SQLAlchemy's spelling, relative to the workspace root
        "database": {
            "app": {"url": f"sqlite:///{db.name}", "migrate": [sys.executable, "-c", MIGRATE]}
        }
    }
    ctx, rec = make_ctx("database.migrate", {"version": "1"}, config=config,
                        workspace=db.parent, state=tmp_path / "s")  # fmt: skip
    first = await migrate(ctx)
    assert (first["status"], first["version"], first["previous_version"]) == ("migrated", "1", "0")
    assert rec.messages(kind="output") == ["applied 1"]
    ctx, _ = make_ctx("database.migrate", {}, config=config, workspace=db.parent,
                      state=tmp_path / "s")  # fmt: skip
    latest = await migrate(ctx)
    assert latest["version"] == "2"
    conn = sqlite3.connect(db)
    assert [r[1] for r in conn.execute("PRAGMA table_info(users)")] == ["id", "name", "email"]
    conn.close()


async def test_migrate_errors(db: Path, tmp_path: Path) -> None:
    config = {"database": {"app": {"path": str(db)}}}
    ctx, _ = make_ctx("database.migrate", {}, config=config, state=tmp_path)
    with pytest.raises(TaskConfigError, match=r"database.app.migrate: missing"):
        await migrate(ctx)
    config["database"]["app"]["migrate"] = [sys.executable, "-c", "raise SystemExit('no way')"]
    ctx, _ = make_ctx("database.migrate", {}, config=config, state=tmp_path)
    with pytest.raises(RuntimeError, match=r"migrate exited with 1: .*no way"):
        await migrate(ctx)
    for payload, message in [
        ({"version": "--drop"}, "must be a version"),
        ({"sql": "DROP TABLE notes"}, "unknown payload key"),
        ({"script": "x.sql"}, "cannot carry commands"),
    ]:
        ctx, _ = make_ctx("database.migrate", payload, config=config, state=tmp_path)
        with pytest.raises(TaskPayloadError, match=message):
            await migrate(ctx)


async def test_postgres_backup_without_pg_dump_is_a_clear_failure(tmp_path: Path) -> None:
    config = {
        "database": {"pg": {"url": "postgresql://u:s3cret-pw@127.0.0.1/app",
                            "pg_dump": ["sheri-no-such-pg_dump"]}}
    }  # fmt: skip
    ctx, _ = make_ctx("database.backup", {}, config=config, state=tmp_path)
    with pytest.raises(TaskConfigError, match="command not found: 'sheri-no-such-pg_dump'") as info:
        await backup(ctx)
    assert "s3cret" not in str(info.value)


def _local_postgres() -> str | None:
    """The machine's PostgreSQL (127.0.0.1:5432, trust auth), if one answers."""
    import shutil
    import subprocess

    if not (shutil.which("psql") and shutil.which("pg_dump")):
        return None
    probe = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-tAc", "select 1"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return "postgresql://postgres@127.0.0.1:5432" if probe.stdout.strip() == "1" else None


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A throw-away database on the machine's PostgreSQL, with a table of 300 rows."""
    import secrets
    import subprocess

    base = _local_postgres()
    if base is None:
        pytest.skip("no PostgreSQL with trust auth on 127.0.0.1:5432 and psql/pg_dump")
    name = f"sheri_test_{secrets.token_hex(4)}"

    def psql(db: str, sql: str) -> None:
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1",
             "-qc", sql],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip

    psql("postgres", f"CREATE DATABASE {name}")
    try:
        psql(name, "CREATE TABLE notes (id serial PRIMARY KEY, body text)")
        psql(name, "INSERT INTO notes (body) SELECT 'note ' || i FROM generate_series(1, 300) i")
        yield f"{base}/{name}"
    finally:
        psql("postgres", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_postgres_backup_with_the_real_pg_dump(pg_database: str, tmp_path: Path) -> None:
    config = {"database": {"pg": {"url": pg_database, "backup_dir": str(tmp_path / "b")}}}
    ctx, _ = make_ctx("database.backup", {}, config=config, state=tmp_path)
    result = await backup(ctx)
    assert result["status"] == "backed_up"
    assert result["kind"] == "postgresql"
    assert result["integrity"] == "ok"
    assert result["tables"] == ["public.notes"]
    dump = Path(result["location"])
    assert dump.name.startswith("pg-")
    assert dump.suffix == ".dump"
    assert result["size"] == (await trio.Path(dump).stat()).st_size > 0
    assert not list(dump.parent.glob("*.partial"))
    # the dump holds the rows: pg_restore turns it back into SQL with all 300
    restored = await trio.run_process(
        ["pg_restore", "--data-only", "-f", "-", str(dump)], capture_stdout=True
    )
    assert restored.stdout.count(b"\nnote ") + restored.stdout.count(b"\tnote ") == 300
