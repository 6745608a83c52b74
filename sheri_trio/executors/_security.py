"""``security.scan`` (bandit) and ``security.audit`` (pip-audit, npm audit)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import trio

from ._base import TaskConfigError, TaskContext, TaskPayloadError
from ._payload import check_keys
from ._process import CommandFailed, python_tool, run_for_task
from ._workspace import payload_path, relative_names, section, workspace_root

__all__ = ["audit", "parse_npm_audit", "parse_pip_audit", "scan"]

SEVERITIES = ("low", "medium", "high")
DEFAULT_EXCLUDE = (".venv", "venv", ".tox", "node_modules", ".git", "build", "dist", "__pycache__")
MAX_FINDINGS = 200
NETWORK_ERROR_RE = re.compile(
    r"ConnectionError|Max retries exceeded|Failed to establish a new connection|"
    r"NameResolutionError|Temporary failure in name resolution|Network is unreachable|"
    r"timed out|ENOTFOUND|EAI_AGAIN|ECONNREFUSED|getaddrinfo",
    re.IGNORECASE,
)


def _level(payload: dict[str, Any], key: str) -> str | None:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in SEVERITIES:
        raise TaskPayloadError(f"payload '{key}' must be one of {', '.join(SEVERITIES)}")
    return value.lower()


# ------------------------------------------------------------------- bandit
async def scan(ctx: TaskContext) -> dict[str, Any]:
    """security.scan -> {vulnerabilities, warnings, info, findings[]}.

    bandit's HIGH severity findings count as vulnerabilities, MEDIUM as warnings, LOW as
    info. Payload: ``path`` (inside the workspace), ``severity``, ``confidence``
    (minimum levels to report).
    """
    payload = ctx.payload_dict()
    check_keys(ctx, payload, {"path", "severity", "confidence"})
    root = workspace_root(ctx)
    target = payload_path(root, payload["path"]) if "path" in payload else root
    severity, confidence = _level(payload, "severity"), _level(payload, "confidence")
    cfg = section(ctx, "security")
    exclude = [str(x) for x in cfg.get("exclude", DEFAULT_EXCLUDE)]
    bandit = python_tool("bandit", "bandit", extra="tools")
    await ctx.progress(f"bandit scanning {target}", kind="start")
    with tempfile.TemporaryDirectory(prefix="sheri-bandit-") as tmp:
        report = Path(tmp) / "bandit.json"
        argv = [*bandit, "-f", "json", "-o", str(report), "-q"]
        if target.is_dir():
            argv += ["-r"]
        if exclude:
            argv += [
                "-x",
                ",".join(f"*/{x}/*" if "/" not in x and "*" not in x else x for x in exclude),
            ]
        if severity:
            argv.append(f"--severity-level={severity}")
        if confidence:
            argv.append(f"--confidence-level={confidence}")
        for extra in cfg.get("bandit_args", ()):
            argv.append(str(extra))
        argv.append(str(target))
        result = await run_for_task(ctx, argv, table=cfg, cwd=root, origin="bandit")
        if result.exit_code not in (0, 1) or not report.is_file():
            raise CommandFailed(
                f"bandit failed (exit {result.exit_code}): {result.tail_text(1500)}", result
            )
        data = json.loads(report.read_text())
    counts = {"HIGH": 0, "MEDIUM": 0, "LOW": 0}
    findings = []
    results = data.get("results", [])
    filenames = await trio.to_thread.run_sync(
        relative_names, [str(item.get("filename", "")) for item in results], root
    )
    for item, filename in zip(results, filenames, strict=True):
        sev = str(item.get("issue_severity", "LOW")).upper()
        counts[sev] = counts.get(sev, 0) + 1
        cwe = item.get("issue_cwe") or {}
        findings.append(
            {
                "file": filename,
                "line": item.get("line_number"),
                "test_id": item.get("test_id"),
                "test_name": item.get("test_name"),
                "severity": sev.lower(),
                "confidence": str(item.get("issue_confidence", "")).lower(),
                "message": item.get("issue_text"),
                "cwe": cwe.get("id"),
                "more_info": item.get("more_info"),
            }
        )
    rank = {"high": 0, "medium": 1, "low": 2}
    findings.sort(key=lambda f: (rank.get(f["severity"], 3), f["file"], f["line"] or 0))
    totals = data.get("metrics", {}).get("_totals", {})
    errors = [
        {"file": str(e.get("filename", "")), "reason": str(e.get("reason", ""))[:300]}
        for e in data.get("errors", [])
    ]
    return {
        "vulnerabilities": counts.get("HIGH", 0),
        "warnings": counts.get("MEDIUM", 0),
        "info": counts.get("LOW", 0),
        "findings": findings[:MAX_FINDINGS],
        "findings_total": len(findings),
        "lines_scanned": totals.get("loc", 0),
        "files_scanned": sum(1 for k in data.get("metrics", {}) if k != "_totals"),
        "errors": errors[:50],
        "tool": "bandit",
        "target": str(target),
        "duration": round(result.duration * 1000),
    }


# ------------------------------------------------------------------- audit
def parse_pip_audit(data: dict[str, Any]) -> dict[str, Any]:
    """pip-audit's ``-f json`` report -> the audit result (raises if nothing was audited)."""
    deps = data.get("dependencies", [])
    vulns: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    recommendations: list[str] = []
    for dep in deps:
        name, version = str(dep.get("name", "?")), str(dep.get("version", "?"))
        if dep.get("skip_reason"):
            skipped.append({"package": name, "reason": str(dep["skip_reason"])[:300]})
            continue
        fixes: set[str] = set()
        for v in dep.get("vulns", []):
            fix_versions = [str(f) for f in v.get("fix_versions", [])]
            fixes.update(fix_versions)
            vulns.append(
                {
                    "package": name,
                    "version": version,
                    "id": v.get("id"),
                    "aliases": v.get("aliases", []),
                    "fix_versions": fix_versions,
                    "description": str(v.get("description", ""))[:500],
                }
            )
        if dep.get("vulns"):
            ids = ", ".join(str(v.get("id")) for v in dep["vulns"])
            if fixes:
                recommendations.append(
                    f"upgrade {name} from {version} to {_highest(fixes)} or later (fixes {ids})"
                )
            else:
                recommendations.append(f"{name} {version}: no fixed release yet for {ids}")
    if deps and len(skipped) == len(deps):
        reasons = "; ".join(s["reason"] for s in skipped[:3])
        raise RuntimeError(
            "pip-audit could not audit any dependency (is the vulnerability database, PyPI's "
            f"JSON API, reachable?): {reasons}"
        )
    if skipped:
        recommendations.append(
            f"{len(skipped)} dependencies were not audited: "
            + ", ".join(s["package"] for s in skipped[:10])
        )
    return {
        "status": "vulnerable" if vulns else "passed",
        "issues": vulns,
        "issue_count": len(vulns),
        "recommendations": recommendations,
        "dependencies": len(deps),
        "skipped": skipped,
        "tool": "pip-audit",
    }


def parse_npm_audit(data: dict[str, Any]) -> dict[str, Any]:
    """``npm audit --json`` (npm 7+) -> the audit result."""
    issues = []
    recommendations = []
    for name, info in (data.get("vulnerabilities") or {}).items():
        via = [v.get("title") or v.get("url") for v in info.get("via", []) if isinstance(v, dict)]
        issues.append(
            {
                "package": name,
                "severity": info.get("severity"),
                "range": info.get("range"),
                "advisories": [v for v in via if v][:10],
                "fix_available": bool(info.get("fixAvailable")),
            }
        )
        fix = info.get("fixAvailable")
        if isinstance(fix, dict):
            recommendations.append(f"upgrade {fix.get('name')} to {fix.get('version')} ({name})")
        elif fix:
            recommendations.append(f"run `npm audit fix` for {name}")
    meta = (data.get("metadata") or {}).get("vulnerabilities") or {}
    return {
        "status": "vulnerable" if issues else "passed",
        "issues": issues,
        "issue_count": len(issues),
        "recommendations": recommendations,
        "severity_counts": {k: v for k, v in meta.items() if k != "total"},
        "dependencies": (data.get("metadata") or {}).get("dependencies", {}).get("total", 0),
        "skipped": [],
        "tool": "npm audit",
    }


def _highest(versions: set[str]) -> str:
    def key(v: str) -> tuple[Any, ...]:
        return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", v))

    return max(versions, key=key)


async def audit(ctx: TaskContext) -> dict[str, Any]:
    """security.audit -> {status, issues[], recommendations[]}.

    pip-audit for ``requirements*.txt`` (or the project of a pyproject.toml), ``npm
    audit`` for a package-lock.json. Both ask a vulnerability database on the network:
    when it is unreachable the task fails and says so.
    """
    payload = ctx.payload_dict()
    check_keys(ctx, payload, {"path"})
    root = workspace_root(ctx)
    ws = payload_path(root, payload["path"], kind="dir") if "path" in payload else root
    cfg = section(ctx, "security", "audit")
    tool = cfg.get("tool")
    requirements = [ws / str(r) for r in cfg.get("requirements", ())] or sorted(
        ws.glob("requirements*.txt")
    )
    if tool is None:
        if requirements or (ws / "pyproject.toml").is_file():
            tool = "pip-audit"
        elif (ws / "package-lock.json").is_file():
            tool = "npm"
        else:
            raise TaskConfigError(
                f"nothing to audit in {ws}: no requirements*.txt, pyproject.toml or "
                "package-lock.json (or set [security.audit] tool and requirements)"
            )
    await ctx.progress(f"{tool} auditing {ws}", kind="start")
    extra = [str(a) for a in cfg.get("args", ())]
    if tool == "npm":
        result = await run_for_task(
            ctx, ["npm", "audit", "--json", *extra], table=cfg, cwd=ws, origin="npm audit"
        )
        try:
            data = json.loads(result.output)
        except ValueError:
            data = None
        if not isinstance(data, dict) or "error" in data:
            _network_or_fail("npm audit", result.output, result)
        assert isinstance(data, dict)
        out = parse_npm_audit(data)
    else:
        argv = [*python_tool("pip_audit", "pip-audit", extra="tools"), "-f", "json"]
        argv += ["--progress-spinner", "off"]
        with tempfile.TemporaryDirectory(prefix="sheri-audit-") as tmp:
            report = Path(tmp) / "audit.json"
            argv += ["-o", str(report), *extra]
            if requirements:
                for req in requirements:
                    if not req.is_file():
                        raise TaskConfigError(f"security.audit.requirements: no such file: {req}")
                    argv += ["-r", str(req)]
            else:
                argv.append(str(ws))
            result = await run_for_task(ctx, argv, table=cfg, cwd=ws, origin="pip-audit")
            if result.exit_code not in (0, 1) or not report.is_file():
                _network_or_fail("pip-audit", result.output, result)
            data = json.loads(report.read_text())
        out = parse_pip_audit(data)
    out["duration"] = round(result.duration * 1000)
    out["workspace"] = str(ws)
    return out


def _network_or_fail(tool: str, output: str, result: Any) -> None:
    tail = output[-1500:]
    if NETWORK_ERROR_RE.search(output):
        raise RuntimeError(f"{tool} could not reach its vulnerability database (network): {tail}")
    raise CommandFailed(f"{tool} failed (exit {result.exit_code}): {tail}", result)
