"""``monitoring.health`` (HTTP(S) and TCP checks) and ``monitoring.alerts`` (thresholds).

Health results are kept in ``<state_dir>/monitoring.sqlite3``; alerts read them, and the
swarm view the agent hands over (``TaskContext.swarm``), and remember which alerts were
active so that the next evaluation can tell which were resolved.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlsplit

import trio

from ._base import TaskConfigError, TaskContext, TaskPayloadError
from ._payload import check_keys
from ._workspace import open_db, section, state_dir

__all__ = ["alerts", "health"]

MAX_TARGETS = 50
DEFAULT_TIMEOUT = 5.0
DEFAULT_RULES: dict[str, Any] = {
    "offline": True,
    "heartbeat_max_age": 30.0,
    "failure_rate": 0.5,
    "min_tasks": 5,
    "unhealthy_targets": True,
    "latency_ms": None,
    "health_max_age": 3600.0,
}


def _parse_target(raw: Any, allowed_hosts: list[str] | None) -> tuple[str, str, int]:
    """(scheme, host, port) of a target URL, or TaskPayloadError."""
    if not isinstance(raw, str) or not raw or len(raw) > 2048:
        raise TaskPayloadError(
            "each target must be a URL string: http://, https:// or tcp://host:port"
        )
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "tcp"):
        raise TaskPayloadError(f"target {raw!r}: scheme must be http, https or tcp")
    try:
        port = parts.port
    except ValueError:
        raise TaskPayloadError(f"target {raw!r}: bad port") from None
    host = parts.hostname
    if not host:
        raise TaskPayloadError(f"target {raw!r}: no host")
    if scheme == "tcp" and port is None:
        raise TaskPayloadError(f"target {raw!r}: tcp targets need a port (tcp://host:port)")
    if parts.username or parts.password:
        raise TaskPayloadError(f"target {parts.hostname}: credentials in target URLs are refused")
    if allowed_hosts is not None and host not in allowed_hosts and "*" not in allowed_hosts:
        if not allowed_hosts:
            raise TaskPayloadError(
                f"target {raw!r}: targets from a task payload are refused unless "
                "[monitoring] allowed_hosts lists the hosts agents may probe on request "
                '("*": any host)'
            )
        raise TaskPayloadError(
            f"target {raw!r}: host {host!r} is not in [monitoring] allowed_hosts"
        )
    return scheme, host, port or (443 if scheme == "https" else 80)


async def _check_http(client: Any, target: str, started: float) -> dict[str, Any]:
    """One HTTP check; the caller bounds it in time (see :func:`_check_within`)."""
    import httpx2

    try:
        response = await client.get(target)
    except httpx2.HTTPError as exc:
        return _check(target, False, started, f"{type(exc).__name__}: {exc}"[:300])
    ok = response.status_code < 400
    return _check(target, ok, started, f"HTTP {response.status_code}", status=response.status_code)


async def _check_tcp(target: str, host: str, port: int, started: float) -> dict[str, Any]:
    """One TCP connect; the caller bounds it in time (see :func:`_check_within`)."""
    try:
        stream = await trio.open_tcp_stream(host, port)
        with trio.CancelScope(shield=True):  # connected is connected, even at the deadline
            await stream.aclose()
    except OSError as exc:
        return _check(target, False, started, f"connect failed: {exc.strerror or exc}")
    return _check(target, True, started, "connected")


async def _check_within(
    seconds: float, target: str, scheme: str, host: str, port: int, client: Any
) -> dict[str, Any]:
    """The check of one target, or a failed check when it takes longer than ``seconds``."""
    started = time.perf_counter()
    with trio.move_on_after(seconds):
        if scheme == "tcp":
            return await _check_tcp(target, host, port, started)
        return await _check_http(client, target, started)
    waited_for = "connection" if scheme == "tcp" else "response"
    return _check(target, False, started, f"no {waited_for} within {seconds:g} s")


def _check(target: str, ok: bool, started: float, detail: str, **extra: Any) -> dict[str, Any]:
    return {
        "target": target,
        "ok": ok,
        "latency_ms": round((time.perf_counter() - started) * 1000, 1),
        "detail": detail,
        **extra,
    }


def _number(value: Any, key: str, *, maximum: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= maximum:
        raise TaskPayloadError(f"payload '{key}' must be a number within 0..{maximum:g}")
    return float(value)


async def health(ctx: TaskContext) -> dict[str, Any]:
    """monitoring.health -> {status, uptime, errors, checks[{target, ok, latency_ms, detail}]}.

    ``uptime`` is the share of targets that answered, in percent (the prototype's 99.9).
    An unhealthy target makes an unhealthy *result*, not a failed task.
    """
    payload = ctx.payload_dict()
    check_keys(ctx, payload, {"targets", "timeout"})
    cfg = section(ctx, "monitoring")
    # Targets from the payload are untrusted (a probe from inside the network on anyone's
    # request): only hosts in allowed_hosts, none when it is unset. Configured targets
    # are trusted.
    allowed = cfg.get("allowed_hosts", [])
    raw_targets = payload.get("targets", cfg.get("targets"))
    if raw_targets is None or raw_targets == []:
        raise TaskConfigError(
            "monitoring.health: no targets: give 'targets' in the payload "
            "(http://, https://, tcp://host:port) or set [monitoring] targets in sheri.toml"
        )
    if not isinstance(raw_targets, list) or len(raw_targets) > MAX_TARGETS:
        raise TaskPayloadError(f"payload 'targets' must be a list of at most {MAX_TARGETS} URLs")
    from_payload = "targets" in payload
    parsed = [(t, *_parse_target(t, allowed if from_payload else None)) for t in raw_targets]
    timeout = float(cfg.get("timeout", DEFAULT_TIMEOUT))
    if "timeout" in payload:
        timeout = min(timeout, _number(payload["timeout"], "timeout", maximum=60))
    checks: list[dict[str, Any]] = [{} for _ in parsed]
    await ctx.progress(f"checking {len(parsed)} targets", kind="start")
    client = None
    if any(scheme != "tcp" for _, scheme, _, _ in parsed):
        import httpx2

        client = httpx2.AsyncClient(
            follow_redirects=False, timeout=timeout, trust_env=False,
            verify=cfg.get("verify_tls", True),
        )  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            for i, (target, scheme, host, port) in enumerate(parsed):

                async def one(i: int = i, target: str = target, scheme: str = scheme,
                              host: str = host, port: int = port) -> None:  # fmt: skip
                    checks[i] = await _check_within(timeout, target, scheme, host, port, client)
                    await ctx.progress(
                        f"{target}: {'ok' if checks[i]['ok'] else 'FAIL'} {checks[i]['detail']}",
                        kind="check",
                    )

                nursery.start_soon(one)
    finally:
        if client is not None:
            with trio.CancelScope(shield=True):
                await client.aclose()
    errors = sum(1 for c in checks if not c["ok"])
    status = "healthy" if errors == 0 else ("unhealthy" if errors == len(checks) else "degraded")
    result = {
        "status": status,
        "uptime": round(100.0 * (len(checks) - errors) / len(checks), 1),
        "errors": errors,
        "checks": checks,
    }
    await trio.to_thread.run_sync(_record_health, state_dir(ctx), ctx.task_id, checks)
    return result


# ------------------------------------------------------------------ storage
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS health (at REAL, task_id TEXT, target TEXT, ok INTEGER,"
    " latency_ms REAL, detail TEXT)",
    "CREATE TABLE IF NOT EXISTS alerts (key TEXT PRIMARY KEY, kind TEXT, severity TEXT,"
    " message TEXT, since REAL, data TEXT)",
)


def _db(path: Any) -> Any:
    return open_db(path / "monitoring.sqlite3", SCHEMA)


def _record_health(path: Any, task_id: str, checks: list[dict[str, Any]]) -> None:
    conn = _db(path)
    try:
        now = time.time()
        conn.executemany(
            "INSERT INTO health VALUES (?, ?, ?, ?, ?, ?)",
            [
                (now, task_id, c["target"], int(c["ok"]), c["latency_ms"], c["detail"])
                for c in checks
            ],
        )
        conn.execute("DELETE FROM health WHERE at < ?", (now - 7 * 86400,))
    finally:
        conn.close()


def _latest_health(path: Any, max_age: float) -> list[dict[str, Any]]:
    conn = _db(path)
    try:
        rows = conn.execute(
            "SELECT target, ok, latency_ms, detail, MAX(at) AS at FROM health WHERE at >= ?"
            " GROUP BY target",
            (time.time() - max_age,),
        ).fetchall()
        return [dict(r) for r in rows]
    finally:
        conn.close()


def _update_alerts(
    path: Any, active: dict[str, dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Store the active set; return (active with 'since', resolved since last time)."""
    conn = _db(path)
    try:
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        before = {r["key"]: dict(r) for r in conn.execute("SELECT * FROM alerts")}
        resolved = [
            {"key": k, "kind": r["kind"], "message": r["message"], "since": r["since"]}
            for k, r in before.items()
            if k not in active
        ]
        conn.execute("DELETE FROM alerts")
        out = []
        for key, alert in active.items():
            since = before[key]["since"] if key in before else now
            conn.execute(
                "INSERT INTO alerts VALUES (?, ?, ?, ?, ?, ?)",
                (key, alert["kind"], alert["severity"], alert["message"], since, json.dumps(alert)),
            )
            out.append({**alert, "key": key, "since": round(since, 3)})
        conn.execute("COMMIT")
        return out, resolved
    finally:
        conn.close()


# ------------------------------------------------------------------- alerts
def _rules(ctx: TaskContext) -> dict[str, Any]:
    rules = dict(DEFAULT_RULES)
    rules.update(section(ctx, "monitoring", "alerts"))
    return rules


def evaluate(
    rules: dict[str, Any], swarm: dict[str, Any] | None, health_rows: list[dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], list[str], list[str]]:
    """(active alerts by key, rules evaluated, rules skipped with the reason)."""
    active: dict[str, dict[str, Any]] = {}
    evaluated: list[str] = []
    skipped: list[str] = []
    if swarm is None:
        if rules.get("offline") or rules.get("heartbeat_max_age") or rules.get("failure_rate"):
            skipped.append("offline, heartbeat_max_age, failure_rate: the agent gave no swarm view")
    else:
        agents = swarm.get("agents") or []
        if rules.get("offline"):
            evaluated.append("offline")
            for a in agents:
                if not a.get("online", True):
                    active[f"offline:{a.get('agent_id')}"] = {
                        "kind": "agent_offline",
                        "severity": "critical",
                        "message": f"agent {a.get('agent_id')} ({a.get('role')}) is offline",
                        "agent_id": a.get("agent_id"),
                    }
        max_age = rules.get("heartbeat_max_age")
        if max_age:
            evaluated.append("heartbeat_max_age")
            for a in agents:
                age = a.get("last_seen_age")
                if a.get("online", True) and isinstance(age, int | float) and age > max_age:
                    active[f"heartbeat:{a.get('agent_id')}"] = {
                        "kind": "heartbeat_age",
                        "severity": "warning",
                        "message": f"no heartbeat from {a.get('agent_id')} for {age:.0f} s",
                        "agent_id": a.get("agent_id"),
                        "value": round(age, 1),
                        "threshold": max_age,
                    }
        rate_limit = rules.get("failure_rate")
        outcomes = swarm.get("outcomes") or {}
        if rate_limit:
            evaluated.append("failure_rate")
            done = int(outcomes.get("completed", 0)) + int(outcomes.get("failed", 0))
            if done >= int(rules.get("min_tasks", 1)) and done:
                rate = int(outcomes.get("failed", 0)) / done
                if rate > rate_limit:
                    active["failure_rate"] = {
                        "kind": "failure_rate",
                        "severity": "warning",
                        "message": f"{rate:.0%} of {done} tasks failed "
                        f"(threshold {rate_limit:.0%})",
                        "value": round(rate, 3),
                        "threshold": rate_limit,
                    }
    if rules.get("unhealthy_targets") or rules.get("latency_ms"):
        if not health_rows:
            skipped.append("unhealthy_targets, latency_ms: no recent monitoring.health results")
        else:
            evaluated.append("unhealthy_targets")
            for row in health_rows:
                if rules.get("unhealthy_targets") and not row["ok"]:
                    active[f"unhealthy:{row['target']}"] = {
                        "kind": "unhealthy_target",
                        "severity": "critical",
                        "message": f"{row['target']} is unhealthy: {row['detail']}",
                        "target": row["target"],
                    }
                limit = rules.get("latency_ms")
                if limit and row["ok"] and row["latency_ms"] > limit:
                    active[f"latency:{row['target']}"] = {
                        "kind": "latency",
                        "severity": "warning",
                        "message": f"{row['target']} answered in {row['latency_ms']:.0f} ms",
                        "target": row["target"],
                        "value": row["latency_ms"],
                        "threshold": limit,
                    }
    return active, evaluated, skipped


async def alerts(ctx: TaskContext) -> dict[str, Any]:
    """monitoring.alerts -> {active_alerts, resolved, alerts[]}: thresholds of
    ``[monitoring.alerts]`` against the swarm view and the latest health results."""
    payload = ctx.payload_dict()
    check_keys(ctx, payload, set())
    rules = _rules(ctx)
    path = state_dir(ctx)
    rows = await trio.to_thread.run_sync(_latest_health, path, float(rules["health_max_age"]))
    active, evaluated, skipped = evaluate(rules, ctx.swarm, rows)
    current, resolved = await trio.to_thread.run_sync(_update_alerts, path, active)
    severity_rank = {"critical": 0, "warning": 1}
    current.sort(key=lambda a: (severity_rank.get(a["severity"], 2), a["key"]))
    return {
        "active_alerts": len(current),
        "resolved": len(resolved),
        "alerts": current,
        "resolved_alerts": resolved,
        "evaluated": evaluated,
        "skipped": skipped,
    }
