"""testing.run and testing.coverage on a tiny generated project, with real pytest/coverage."""

from __future__ import annotations

import shutil
import sys
import textwrap
from typing import TYPE_CHECKING

import pytest
import trio
from executor_helpers import make_ctx

from sheri_trio.executors import TaskConfigError, TaskPayloadError
from sheri_trio.executors._testing import run_coverage, run_tests

if TYPE_CHECKING:
    from pathlib import Path


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """calc.py, unit tests (2 pass, 1 fails, 1 skipped) and an integration suite (1 pass)."""
    root = tmp_path / "project"
    _write(
        root,
        {
            "pyproject.toml": "[project]\nname = 'calc'\nversion = '0'\n",
            "calc.py": """
                def add(a, b):
                    return a + b

                def sub(a, b):
                    if a < 0:
                        return -(abs(a) + b)
                    return a - b

                def unused():
                    return 42
            """,
            "tests/__init__.py": "",
            "tests/test_calc.py": """
                import pytest
                from calc import add, sub

                def test_add():
                    assert add(1, 2) == 3

                def test_sub():
                    assert sub(3, 1) == 2

                def test_wrong():
                    assert add(2, 2) == 5

                @pytest.mark.skip(reason="not yet")
                def test_later():
                    pass
            """,
            "tests/integration/__init__.py": "",
            "tests/integration/test_flow.py": """
                from calc import add, sub

                def test_flow():
                    assert sub(add(1, 1), 1) == 1
            """,
        },
    )
    return root


async def test_run_counts_passed_failed_skipped_and_streams_output(
    project: Path, tmp_path: Path
) -> None:
    ctx, rec = make_ctx("testing.run", {}, workspace=project, state=tmp_path / "state")
    result = await run_tests(ctx)
    assert (result["passed"], result["failed"], result["skipped"]) == (3, 1, 1)
    assert result["exit_code"] == 1
    assert result["runner"] == "pytest"
    assert isinstance(result["duration"], int)
    assert "test_wrong" in result["output_tail"]
    lines = rec.messages(kind="output")
    assert any("1 failed, 3 passed, 1 skipped" in line for line in lines), lines[-5:]
    log = trio.Path(result["log"])
    assert await log.is_file()
    assert "test_wrong" in await log.read_text()


async def test_seed_suite_selects_the_integration_folder(project: Path, tmp_path: Path) -> None:
    ctx, _ = make_ctx(
        "testing.run", {"test_suite": "integration"}, workspace=project, state=tmp_path / "s"
    )
    result = await run_tests(ctx)
    assert (result["passed"], result["failed"], result["skipped"]) == (1, 0, 0)
    assert result["exit_code"] == 0
    assert result["suite"] == "integration"


async def test_configured_suite_and_missing_suite(project: Path, tmp_path: Path) -> None:
    config = {"testing": {"suites": {"quick": ["tests/test_calc.py", "-k", "add or wrong"]}}}
    ctx, _ = make_ctx(
        "testing.run", {"test_suite": "quick"}, config=config, workspace=project, state=tmp_path
    )
    result = await run_tests(ctx)
    assert (result["passed"], result["failed"]) == (1, 1)  # test_add and test_wrong
    ctx, _ = make_ctx(
        "testing.run", {"test_suite": "e2e"}, config=config, workspace=project, state=tmp_path
    )
    with pytest.raises(TaskPayloadError, match=r"test suite 'e2e'.*configured: quick.*tests/e2e"):
        await run_tests(ctx)


async def test_configured_command_with_summary_line(tmp_path: Path) -> None:
    script = "print('running'); print('Tests: 2 failed, 5 passed, 7 total'); raise SystemExit(1)"
    config = {"testing": {"command": [sys.executable, "-c", script]}}
    ctx, rec = make_ctx("testing.run", {}, config=config, workspace=tmp_path, state=tmp_path / "s")
    result = await run_tests(ctx)
    assert (result["passed"], result["failed"], result["exit_code"]) == (5, 2, 1)
    assert rec.messages(kind="output")[:1] == ["running"]


async def test_no_runner_is_a_clear_config_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    ctx, _ = make_ctx("testing.run", {}, workspace=tmp_path / "empty", state=tmp_path / "s")
    with pytest.raises(TaskConfigError, match=r"no test runner for .*\[testing\] command"):
        await run_tests(ctx)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"command": "rm -rf /"}, "cannot carry commands"),
        ({"test_suite": "x", "args": ["--pdb"]}, "cannot carry commands"),
        ({"test_suite": "--collect-only"}, "payload 'test_suite' must be"),
        ({"test_suite": "../../etc"}, "payload 'test_suite' must be"),
        ({"path": "../.."}, "escapes the workspace"),
        ({"path": "/etc"}, "is outside the workspace"),
        ({"verbose": True}, "unknown payload key"),
        ([1], "needs a JSON object"),
    ],
)
async def test_bad_payloads_are_refused(
    project: Path, tmp_path: Path, payload: object, message: str
) -> None:
    ctx, _ = make_ctx("testing.run", payload, workspace=project, state=tmp_path / "s")
    with pytest.raises(TaskPayloadError, match=message):
        await run_tests(ctx)


async def test_symlink_out_of_the_workspace_is_refused(project: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (project / "link").symlink_to(outside)
    ctx, _ = make_ctx("testing.run", {"path": "link"}, workspace=project, state=tmp_path / "s")
    with pytest.raises(TaskPayloadError, match=r"escapes the workspace .*symlink"):
        await run_tests(ctx)


async def test_coverage_of_the_project(project: Path, tmp_path: Path) -> None:
    config = {"testing": {"coverage": {"source": ["calc"]}}}
    ctx, _ = make_ctx(
        "testing.coverage", {}, config=config, workspace=project, state=tmp_path / "s"
    )
    result = await run_coverage(ctx)
    # calc.py: 8 statements; the negative branch of sub and unused() are never run
    assert result["lines"] == 8
    assert result["uncovered"] == 2
    assert result["coverage"] == pytest.approx(75.0)
    assert result["files"][0]["file"] == "calc.py"
    assert result["files"][0]["missing_lines"] == [7, 11]
    assert result["tests"]["failed"] == 1


async def test_coverage_defaults_to_the_workspace(project: Path, tmp_path: Path) -> None:
    ctx, _ = make_ctx(
        "testing.coverage", {"test_suite": "integration"}, workspace=project, state=tmp_path / "s"
    )
    result = await run_coverage(ctx)
    assert result["tests"]["passed"] == 1
    assert "calc.py" in {f["file"] for f in result["files"]}
    assert 0 < result["coverage"] < 100


@pytest.mark.skipif(
    shutil.which("npm") is None or shutil.which("node") is None, reason="needs npm and node"
)
async def test_npm_test_with_node_test_runner(tmp_path: Path) -> None:
    ws = tmp_path / "js"
    (ws / "test").mkdir(parents=True)
    (ws / "package.json").write_text(
        '{"name": "t", "version": "1.0.0", "private": true, "scripts": {"test": "node --test"}}'
    )
    (ws / "test" / "a.test.js").write_text(
        "const test = require('node:test'); const assert = require('node:assert');\n"
        "test('adds', () => assert.strictEqual(1 + 1, 2));\n"
        "test('fails', () => assert.strictEqual(1 + 1, 3));\n"
        "test('later', { skip: true }, () => {});\n"
    )
    ctx, rec = make_ctx("testing.run", {}, workspace=ws, state=tmp_path / "s")
    result = await run_tests(ctx)
    assert result["runner"] == "npm"
    assert (result["passed"], result["failed"], result["skipped"]) == (1, 1, 1)
    assert result["exit_code"] == 1
    assert any("not ok" in line for line in rec.messages(kind="output"))
