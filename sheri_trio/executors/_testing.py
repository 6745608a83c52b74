"""``testing.run`` and ``testing.coverage``: the workspace's tests, for real.

The runner is ``[testing] command`` or detected: pytest (``sys.executable -m pytest``)
when the workspace has a pyproject.toml, setup.cfg, pytest.ini or tox.ini, or a
tests/ (test/) folder and no package.json; else ``npm test`` for a package.json.
``test_suite`` selects ``[testing.suites] <name> = [args...]``, else the folder
``tests/<name>``.
"""

from __future__ import annotations

import json
import re
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ._base import TaskConfigError, TaskPayloadError
from ._payload import check_keys, check_name
from ._process import CommandFailed, ProcessResult, python_tool, run_for_task
from ._workspace import payload_path, relative_names, section, workspace_root

if TYPE_CHECKING:
    from ._base import TaskContext

__all__ = ["run_coverage", "run_tests"]

#: files that make a Python project; a bare tests/ or test/ folder counts only without a
#: package.json (JavaScript projects keep their tests in test/ too)
PYTHON_MARKERS = ("pyproject.toml", "setup.cfg", "pytest.ini", "tox.ini")
TEST_FOLDERS = ("tests", "test")
RUN_KEYS = {"test_suite", "path"}
DEFAULT_PROGRESS_LINES = 500
#: npm without its background calls to the registry (update check, funding, audit).
NPM_ENV = {
    "NPM_CONFIG_UPDATE_NOTIFIER": "false",
    "NPM_CONFIG_FUND": "false",
    "NPM_CONFIG_AUDIT": "false",
}

SUMMARY_RE = re.compile(
    r"(\d+)\s+(passed|passing|failed|failing|skipped|pending|errors?|xfailed|xpassed)\b",
    re.IGNORECASE,
)


class _Runner:
    def __init__(self, argv: list[str], kind: str, origin: str) -> None:
        self.argv = argv
        self.kind = kind  # "pytest", "npm" or "custom"
        self.origin = origin


def _workspace(ctx: TaskContext, payload: dict[str, Any]) -> Path:
    root = workspace_root(ctx)
    if "path" in payload:
        return payload_path(root, payload["path"], kind="dir")
    return root


def _runner(ctx: TaskContext, ws: Path) -> _Runner:
    cfg = section(ctx, "testing")
    command = cfg.get("command")
    if command:
        kind = "pytest" if any(str(a).endswith("pytest") for a in command[:3]) else "custom"
        return _Runner([str(a) for a in command], kind, "testing.command")
    npm = (ws / "package.json").is_file()
    if any((ws / marker).exists() for marker in PYTHON_MARKERS) or (
        not npm and any((ws / folder).is_dir() for folder in TEST_FOLDERS)
    ):
        return _Runner(python_tool("pytest", "pytest", extra="test"), "pytest", "pytest")
    if npm:
        return _Runner(["npm", "test"], "npm", "npm test")
    raise TaskConfigError(
        f"no test runner for {ws}: set [testing] command in sheri.toml, or give the "
        "workspace a pyproject.toml, setup.cfg or tests/ folder (pytest) or a package.json "
        "(npm test)"
    )


def _suite_args(
    ctx: TaskContext, ws: Path, payload: dict[str, Any]
) -> tuple[str | None, list[str]]:
    raw = payload.get("test_suite")
    if raw is None:
        return None, []
    suite = check_name(raw, "test_suite")
    suites = section(ctx, "testing", "suites")
    if suite in suites:
        return suite, [str(a) for a in suites[suite]]
    folder = ws / "tests" / suite
    if folder.is_dir():
        payload_path(ws, f"tests/{suite}", key="test_suite", kind="dir")  # no symlink escape
        return suite, [str(folder)]
    configured = ", ".join(sorted(suites)) or "none"
    raise TaskPayloadError(
        f"test suite {suite!r}: not configured in [testing.suites] (configured: {configured}) "
        f"and no folder tests/{suite} in {ws}"
    )


def _line_streamer(ctx: TaskContext) -> Any:
    limit = int(section(ctx, "testing").get("max_progress_lines", DEFAULT_PROGRESS_LINES))
    sent = 0

    async def on_line(line: str) -> None:
        nonlocal sent
        sent += 1
        if sent <= limit:
            await ctx.progress(line, kind="output", line=sent)
        elif sent == limit + 1:
            await ctx.progress(
                f"more output than {limit} lines: the rest is in the agent's log", kind="output"
            )

    return on_line


def _junit_counts(path: Path) -> dict[str, int] | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = failures = errors = skipped = 0
    for suite in suites:
        total += int(suite.get("tests", 0))
        failures += int(suite.get("failures", 0))
        errors += int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return {
        "passed": total - failures - errors - skipped,
        "failed": failures,
        "errors": errors,
        "skipped": skipped,
        "total": total,
    }


#: TAP summary lines, as ``node --test`` and tap print them: "# pass 3", "# fail 1".
TAP_SUMMARY_RE = re.compile(r"^# (pass|fail|skipped|todo|cancelled) (\d+)\s*$", re.MULTILINE)
_TAP_KEYS = {
    "pass": "passed", "fail": "failed", "skipped": "skipped", "todo": "skipped",
    "cancelled": "errors",
}  # fmt: skip


def _summary_counts(text: str) -> dict[str, int] | None:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    tail = text[-4000:]
    tap = TAP_SUMMARY_RE.findall(tail)
    if tap:
        for word, number in tap:
            counts[_TAP_KEYS[word]] += int(number)
        counts["total"] = sum(counts.values())
        return counts
    found = False
    for number, word in SUMMARY_RE.findall(tail):
        word = word.lower()
        key = {
            "passing": "passed",
            "failing": "failed",
            "pending": "skipped",
            "error": "errors",
            "xfailed": "skipped",
            "xpassed": "passed",
        }.get(word, word)
        counts[key] = int(number)  # the last summary wins
        found = True
    if not found:
        return None
    counts["total"] = sum(counts.values())
    return counts


def _judge(runner: _Runner, result: ProcessResult, counts: dict[str, int] | None) -> dict[str, int]:
    """Counts of a run, or an exception when the runner could not run the tests."""
    code = result.exit_code
    if runner.kind == "pytest":
        if code in (0, 1, 5) or (code == 2 and counts and (counts["total"] or counts["errors"])):
            return counts or _summary_counts(result.output) or _zero()
        if code == 4:
            raise TaskConfigError(
                f"pytest refused its arguments (exit 4, usage error): {result.tail_text(1500)}"
            )
        raise CommandFailed(f"pytest failed to run (exit {code}): {result.tail_text(1500)}", result)
    if counts is None:
        if code == 0:
            return _zero()
        raise CommandFailed(
            f"{runner.origin} exited with {code} and reported no test counts: "
            f"{result.tail_text(1500)}",
            result,
        )
    return counts


def _zero() -> dict[str, int]:
    return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "total": 0}


async def run_tests(ctx: TaskContext) -> dict[str, Any]:
    """testing.run -> {passed, failed, skipped, duration, exit_code, output_tail, ...}."""
    payload = ctx.payload_dict()
    check_keys(ctx, payload, RUN_KEYS)
    ws = _workspace(ctx, payload)
    runner = _runner(ctx, ws)
    suite, args = _suite_args(ctx, ws, payload)
    cfg = section(ctx, "testing")
    await ctx.progress(f"running {runner.origin} in {ws}", kind="start", suite=suite or "")
    with tempfile.TemporaryDirectory(prefix="sheri-tests-") as tmp:
        junit = Path(tmp) / "junit.xml"
        argv = list(runner.argv)
        if runner.kind == "pytest":
            argv += ["-p", "no:cacheprovider", "--color=no", f"--junitxml={junit}", *args]
        elif runner.kind == "npm" and args:
            argv += ["--", *args]
        else:
            argv += args
        result = await run_for_task(
            ctx,
            argv,
            table=cfg,
            cwd=ws,
            on_line=_line_streamer(ctx),
            origin=runner.origin,
            extra_env={"SHERI_TASK_ID": ctx.task_id, **(NPM_ENV if runner.kind == "npm" else {})},
        )
        counts = _junit_counts(junit) if runner.kind == "pytest" else None
    if counts is None:
        counts = _summary_counts(result.output)
    counts = _judge(runner, result, counts)
    out: dict[str, Any] = {
        **counts,
        "duration": round(result.duration * 1000),
        "exit_code": result.exit_code,
        "output_tail": result.tail_text(4000),
        "runner": runner.kind,
        "workspace": str(ws),
        "suite": suite,
        "log": result.log_path,
    }
    if runner.kind == "pytest" and result.exit_code == 5:
        out["note"] = "no tests were collected"
    return out


async def run_coverage(ctx: TaskContext) -> dict[str, Any]:
    """testing.coverage -> {coverage, lines, uncovered, ...}: coverage.py over pytest."""
    payload = ctx.payload_dict()
    check_keys(ctx, payload, RUN_KEYS)
    ws = _workspace(ctx, payload)
    runner = _runner(ctx, ws)
    if runner.kind != "pytest":
        raise TaskConfigError(
            f"testing.coverage measures Python tests run by pytest; {ws} uses {runner.origin}"
        )
    suite, args = _suite_args(ctx, ws, payload)
    cfg = section(ctx, "testing")
    cov_cfg = section(ctx, "testing", "coverage")
    python = cov_cfg.get("python")
    coverage = (
        [str(python), "-m", "coverage"]
        if python
        else python_tool("coverage", "coverage", extra="test")
    )
    sources = [str(s) for s in cov_cfg.get("source", [])]
    if not sources and not _has_coverage_config(ws):
        sources = [str(ws)]
    omit = [str(s) for s in cov_cfg.get("omit", [])]
    await ctx.progress(f"measuring coverage of pytest in {ws}", kind="start", suite=suite or "")
    with tempfile.TemporaryDirectory(prefix="sheri-coverage-") as tmp:
        data = Path(tmp) / "coverage.data"
        report = Path(tmp) / "coverage.json"
        junit = Path(tmp) / "junit.xml"
        argv = [*coverage, "run", f"--data-file={data}"]
        if sources:
            argv.append(f"--source={','.join(sources)}")
        if omit:
            argv.append(f"--omit={','.join(omit)}")
        argv += ["-m", "pytest", "-p", "no:cacheprovider", "--color=no", f"--junitxml={junit}"]
        run = await run_for_task(
            ctx,
            [*argv, *args],
            table=cfg,
            cwd=ws,
            on_line=_line_streamer(ctx),
            origin="coverage run -m pytest",
            extra_env={"SHERI_TASK_ID": ctx.task_id},
        )
        counts = _judge(runner, run, _junit_counts(junit))
        rep = await run_for_task(
            ctx,
            [*coverage, "json", f"--data-file={data}", "-o", str(report)],
            table=cfg,
            cwd=ws,
            origin="coverage json",
        )
        if rep.exit_code != 0 or not report.is_file():
            if "No data" in rep.output:
                raise TaskConfigError(
                    f"coverage measured nothing in {', '.join(sources) or ws}: no Python file "
                    "there was imported by the tests (set [testing.coverage] source)"
                )
            raise CommandFailed(
                f"coverage json failed (exit {rep.exit_code}): {rep.tail_text(1000)}", rep
            )
        data_json = json.loads(report.read_text())
    totals = data_json.get("totals", {})
    measured = data_json.get("files", {})
    names = await trio.to_thread.run_sync(relative_names, list(measured), ws)
    files = []
    for shown, info in zip(names, measured.values(), strict=True):
        summary = info.get("summary", {})
        files.append(
            {
                "file": shown,
                "coverage": round(float(summary.get("percent_covered", 0.0)), 2),
                "statements": summary.get("num_statements", 0),
                "missing": summary.get("missing_lines", 0),
                "missing_lines": info.get("missing_lines", [])[:50],
            }
        )
    files.sort(key=lambda f: (f["coverage"], f["file"]))
    return {
        "coverage": round(float(totals.get("percent_covered", 0.0)), 2),
        "lines": totals.get("num_statements", 0),
        "uncovered": totals.get("missing_lines", 0),
        "covered": totals.get("covered_lines", 0),
        "files": files[:100],
        "tests": {**counts, "exit_code": run.exit_code},
        "duration": round((run.duration + rep.duration) * 1000),
        "workspace": str(ws),
        "suite": suite,
        "log": run.log_path,
    }


def _has_coverage_config(ws: Path) -> bool:
    if (ws / ".coveragerc").is_file():
        return True
    for name, marker in (("pyproject.toml", "[tool.coverage"), ("setup.cfg", "[coverage:")):
        try:
            if marker in (ws / name).read_text(errors="replace"):
                return True
        except OSError:
            continue
    return False
