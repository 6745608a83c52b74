"""security.scan (real bandit) and security.audit (pip-audit's report, a missing tool)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from executor_helpers import make_ctx

from sheri_trio.executors import TaskConfigError, TaskPayloadError, _process, _security
from sheri_trio.executors._security import audit, parse_pip_audit, scan

DATA = Path(__file__).parent / "data"

BAD = """\
import subprocess


def run(x):
    return subprocess.call(x, shell=True)
"""


@pytest.fixture
def code(tmp_path: Path) -> Path:
    root = tmp_path / "code"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "bad.py").write_text(BAD)
    (root / "pkg" / "fine.py").write_text("def add(a, b):\n    return a + b\n")
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / ".venv" / "lib" / "vendored.py").write_text(BAD)  # excluded by default
    return root


async def test_bandit_finds_shell_true(code: Path, tmp_path: Path) -> None:
    ctx, _ = make_ctx("security.scan", {}, workspace=code, state=tmp_path / "s")
    result = await scan(ctx)
    assert result["vulnerabilities"] == 1  # B602, HIGH
    assert result["info"] == 1  # B404 import subprocess, LOW
    assert result["warnings"] == 0
    first = result["findings"][0]
    assert (first["file"], first["line"], first["test_id"]) == ("pkg/bad.py", 5, "B602")
    assert first["severity"] == "high"
    assert first["cwe"] == 78
    assert all(not f["file"].startswith(".venv") for f in result["findings"])
    assert result["files_scanned"] == 2


async def test_bandit_on_a_path_with_minimum_severity(code: Path, tmp_path: Path) -> None:
    ctx, _ = make_ctx(
        "security.scan", {"path": "pkg/bad.py", "severity": "high"}, workspace=code, state=tmp_path
    )
    result = await scan(ctx)
    assert (result["vulnerabilities"], result["info"]) == (1, 0)
    ctx, _ = make_ctx("security.scan", {"path": "pkg/fine.py"}, workspace=code, state=tmp_path)
    clean = await scan(ctx)
    assert (clean["vulnerabilities"], clean["warnings"], clean["info"]) == (0, 0, 0)
    assert clean["findings"] == []


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"path": "../"}, "escapes the workspace"),
        ({"path": "/etc/passwd"}, "outside the workspace"),
        ({"severity": "critical"}, "'severity' must be one of"),
        ({"shell": "bandit -r /"}, "cannot carry commands"),
    ],
)
async def test_scan_refuses(code: Path, tmp_path: Path, payload: dict, message: str) -> None:
    ctx, _ = make_ctx("security.scan", payload, workspace=code, state=tmp_path)
    with pytest.raises(TaskPayloadError, match=message):
        await scan(ctx)


def test_pip_audit_recorded_report_is_parsed() -> None:
    """A report in pip-audit 2.10's ``-f json`` format with real advisories (tests/data).
    A live pip-audit run needs the network (PyPI's vulnerability data), which tests do not
    have, so the tests parse a recorded report; here the JSON API is not reachable, so
    the report was written after pip-audit's format rather than captured from a run."""
    result = parse_pip_audit(json.loads((DATA / "pip_audit_report.json").read_text()))
    assert result["status"] == "vulnerable"
    assert result["issue_count"] == len(result["issues"]) == 3
    assert {i["id"] for i in result["issues"]} == {
        "PYSEC-2021-66",
        "GHSA-h5c8-rqwp-cp95",
        "PYSEC-2018-28",
    }
    assert "upgrade jinja2 from 2.11.2 to 3.1.3 or later" in result["recommendations"][0]
    assert "upgrade requests from 2.19.0 to 2.20.0" in result["recommendations"][1]
    assert result["skipped"][0]["package"] == "private-lib"
    assert result["dependencies"] == 4


def test_pip_audit_that_audited_nothing_is_a_failure() -> None:
    report = {"dependencies": [{"name": "x", "skip_reason": "Dependency not found on PyPI"}]}
    with pytest.raises(RuntimeError, match=r"could not audit any dependency.*reachable"):
        parse_pip_audit(report)
    assert parse_pip_audit({"dependencies": [], "fixes": []})["status"] == "passed"


async def test_audit_runs_the_report_through_the_executor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The executor's own path, with a stand-in for pip-audit that writes the recorded
    report where ``-o`` says (no network)."""
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "requirements.txt").write_text("jinja2==2.11.2\n")
    fake = (
        "import sys, shutil; a = sys.argv; "
        f"shutil.copy({str(DATA / 'pip_audit_report.json')!r}, a[a.index('-o') + 1]); "
        "sys.exit(1)"
    )
    monkeypatch.setattr(_security, "python_tool", lambda *a, **k: [sys.executable, "-c", fake])
    ctx, rec = make_ctx("security.audit", {}, workspace=tmp_path / "ws", state=tmp_path / "s")
    result = await audit(ctx)
    assert result["status"] == "vulnerable"
    assert result["issue_count"] == 3
    assert rec.messages(kind="start")


async def test_missing_tool_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "requirements.txt").write_text("idna==3.7\n")
    real = _process.importlib.util.find_spec
    monkeypatch.setattr(
        _process.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pip_audit" else real(name, *a),
    )
    ctx, _ = make_ctx("security.audit", {}, workspace=tmp_path, state=tmp_path / "s")
    with pytest.raises(TaskConfigError, match=r"pip-audit is not installed"):
        await audit(ctx)
    npm = {"security": {"audit": {"tool": "npm"}}, "process": {"env": {"PATH": str(tmp_path)}}}
    ctx, _ = make_ctx("security.audit", {}, config=npm, workspace=tmp_path, state=tmp_path / "s")
    with pytest.raises(TaskConfigError, match=r"command not found: 'npm'"):
        await audit(ctx)


async def test_nothing_to_audit(tmp_path: Path) -> None:
    ctx, _ = make_ctx("security.audit", {}, workspace=tmp_path, state=tmp_path / "s")
    with pytest.raises(TaskConfigError, match="nothing to audit"):
        await audit(ctx)
