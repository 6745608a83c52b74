"""Paths: payload paths stay inside the workspace; config paths, state dir, databases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from executor_helpers import make_ctx

from sheri_trio.executors import TaskConfigError, TaskPayloadError, agent_state_dir
from sheri_trio.executors._workspace import (
    config_path,
    open_db,
    payload_path,
    relative_names,
    section,
    state_dir,
    workspace_root,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    (ws / "src" / "a.py").write_text("")
    (tmp_path / "outside").mkdir()
    (ws / "out").symlink_to(tmp_path / "outside")
    return ws.resolve()


def test_paths_inside_the_workspace(root: Path) -> None:
    assert payload_path(root, "src/a.py", kind="file") == root / "src" / "a.py"
    assert payload_path(root, str(root / "src"), kind="dir") == root / "src"
    assert payload_path(root, "src/new.py", must_exist=False) == root / "src" / "new.py"


@pytest.mark.parametrize(
    ("raw", "kind", "message"),
    [
        ("../outside", None, r"'\.\./outside' escapes the workspace .* \(through '\.\.'\)$"),
        ("out", None, r"'out' escapes the workspace .* \(through a symlink\)$"),
        ("/etc", None, r"'/etc' is outside the workspace [^(]*$"),
        ("src/missing", None, "no such file or directory in"),
        ("src", "file", "'src': not a file$"),
        ("src/a.py", "dir", "'src/a.py': not a directory$"),
        ("", None, "must be a non-empty string"),
        (3, None, "must be a non-empty string"),
        ("a\x00b", None, "is not a usable path"),
        ("x" * 5000, None, "is not a usable path"),
    ],
)
def test_paths_refused(root: Path, raw: object, kind: str | None, message: str) -> None:
    with pytest.raises(TaskPayloadError, match=r"^payload 'path' .*" + message):
        payload_path(root, raw, kind=kind)


def test_section_and_config_paths(root: Path) -> None:
    ctx, _ = make_ctx("deployment.deploy", {}, config={"deploy": {"web": {"cwd": "src"}}},
                      workspace=root)  # fmt: skip
    assert section(ctx, "deploy", "web") == {"cwd": "src"}
    assert section(ctx, "deploy", "api") == {}
    assert section(ctx, "deploy", "web", "cwd") == {}  # not a table
    assert workspace_root(ctx) == root
    assert config_path(ctx, "src") == root / "src"
    assert config_path(ctx, "/srv") == Path("/srv")
    assert config_path(ctx, "~/x") == Path.home() / "x"


def test_a_missing_workspace_root_is_a_config_error(tmp_path: Path) -> None:
    ctx, _ = make_ctx("testing.run", {}, workspace=tmp_path / "nowhere")
    with pytest.raises(TaskConfigError, match=r"^workspace\.root: no such directory: "):
        workspace_root(ctx)


def test_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx, _ = make_ctx("testing.run", {}, state=tmp_path / "state")
    assert state_dir(ctx) == tmp_path / "state"
    assert (tmp_path / "state").is_dir()
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    path = agent_state_dir({}, "agent-7")
    assert path == tmp_path / "xdg" / "sheri" / "agent-7"
    assert path.stat().st_mode & 0o777 == 0o700
    (tmp_path / "file").write_text("")
    with pytest.raises(TaskConfigError, match=r"^state_dir: cannot create "):
        agent_state_dir({"state_dir": str(tmp_path / "file" / "sub")}, "a")


def test_relative_names(root: Path) -> None:
    names = [str(root / "src" / "a.py"), "/elsewhere/b.py"]
    assert relative_names(names, root) == [os.path.join("src", "a.py"), "/elsewhere/b.py"]


def test_open_db_creates_the_schema(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "x.sqlite3", ("CREATE TABLE IF NOT EXISTS t (a INTEGER)",))
    try:
        conn.execute("INSERT INTO t VALUES (1)")
        assert [dict(r) for r in conn.execute("SELECT a FROM t")] == [{"a": 1}]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    again = open_db(tmp_path / "x.sqlite3", ("CREATE TABLE IF NOT EXISTS t (a INTEGER)",))
    try:
        assert again.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    finally:
        again.close()
