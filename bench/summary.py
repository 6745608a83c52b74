"""Figures derived from a run's raw measurements: medians, ratios, bounds, targets.

:func:`derive` computes every derived field of a results dict from its raw runs, so a
results file can be summarised again (``python -m bench.report --recompute``) with exactly
the code the harness uses.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

DESIGN_CARD_MIN = 1000.0  # native TCP QoS 1 msgs/s, or python -m bench exits 1


@dataclass(frozen=True)
class Row:
    """One client on one transport in the throughput table."""

    id: str
    label: str
    kind: str  # bench.clients kind
    transport: str  # tcp | ws
    role: str  # ours | peer | ceiling


ROWS = (
    Row("native-tcp", "sheri-trio native", "native", "tcp", "ours"),
    Row("native-ws", "sheri-trio native", "native", "ws", "ours"),
    Row("native-gmqtt-tcp", "sheri-trio gmqtt backend", "native-gmqtt", "tcp", "ours"),
    Row("paho-tcp", "paho-mqtt", "paho", "tcp", "peer"),
    Row("paho-ws", "paho-mqtt", "paho", "ws", "peer"),
    Row("gmqtt-tcp", "gmqtt (asyncio)", "gmqtt", "tcp", "peer"),
    Row("aiomqtt-tcp", "aiomqtt", "aiomqtt", "tcp", "peer"),
    Row("c-tcp", "mosquitto C tools", "mosquitto-c", "tcp", "ceiling"),
)


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
    }


def _util(runs: list[dict[str, Any]], key: str) -> float | None:
    """Median CPU use (1.0 = one core busy) of a process during the measured window."""
    values = [r[key] / r["seconds"] for r in runs if r.get(key) is not None and r.get("seconds")]
    return round(statistics.median(values), 2) if values else None


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def _per(runs: list[dict[str, Any]], cpu_key: str, count_key: str) -> float | None:
    """Median CPU microseconds per message (or delivery) of a process."""
    values = [
        r[cpu_key] * 1e6 / r[count_key]
        for r in runs
        if r.get(cpu_key) is not None and r.get(count_key)
    ]
    return round(statistics.median(values), 2) if values else None


def summarize(rows: list[Row], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for row in rows:
        for qos in (0, 1):
            mine = [r for r in runs if r["row"] == row.id and r["qos"] == qos]
            ok = [r for r in mine if "error" not in r]
            entry: dict[str, Any] = {
                "row": row.id,
                "label": row.label,
                "kind": row.kind,
                "transport": row.transport,
                "role": row.role,
                "qos": qos,
                **_stats([r["msgs_per_s"] for r in ok]),
                "samples": [r["msgs_per_s"] for r in ok],
                "received_min": min((r["received"] for r in ok), default=None),
                "client_cpu": _util(ok, "client_cpu_s"),
                "broker_cpu": _util(ok, "broker_cpu_s"),
                "broker_us_per_msg": _per(ok, "broker_cpu_s", "received"),
                "background_cores": _median(ok, "background_cores"),
                "sent": ok[0]["sent"] if ok else None,
                "errors": [r["error"] for r in mine if "error" in r],
            }
            if any(r.get("partial") for r in ok):
                entry["partial"] = True
                entry["note"] = next(r["note"] for r in ok if r.get("partial"))
            elif any(r.get("lost") for r in ok):
                entry["note"] = f"lost up to {max(r['lost'] for r in ok)} messages"
            out.append(entry)
    # ratios of our rows to the fastest Python peer (same transport) and to the C tools
    for entry in out:
        if entry["role"] != "ours" or entry["median"] is None:
            continue
        peers = [
            e
            for e in out
            if e["role"] == "peer"
            and e["qos"] == entry["qos"]
            and e["transport"] == entry["transport"]
            and e["median"]
        ]
        if peers:
            best = max(peers, key=lambda e: e["median"])
            entry["best_peer"] = best["row"]
            entry["x_best_peer"] = round(entry["median"] / best["median"], 2)
        c = next(
            (e for e in out if e["role"] == "ceiling" and e["qos"] == entry["qos"] and e["median"]),
            None,
        )
        if c is not None:
            entry["x_c_tools"] = round(entry["median"] / c["median"], 2)
    return out


def summarize_fanout(results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r]
    return {
        "subscribers": ok[0]["subscribers"] if ok else None,
        "messages": ok[0]["messages"] if ok else None,
        "qos": 1,
        "deliveries_per_s": _stats([r["deliveries_per_s"] for r in ok]),
        "broker_cpu": _util(ok, "broker_cpu_s"),
        "broker_us_per_delivery": _per(ok, "broker_cpu_s", "deliveries"),
        "complete": all(r["deliveries"] == r["expected"] for r in ok) if ok else None,
        "runs": results,
    }


# ------------------------------------------------------------------------- targets
def _limit_note(entry: dict[str, Any] | None) -> str:
    """What held a throughput figure back, from the CPU each side used (1.00 = a core)."""
    if not entry:
        return ""
    broker, client = entry.get("broker_cpu"), entry.get("client_cpu")
    if broker is not None and broker >= 0.9:
        return f"broker-bound: mosquitto at {broker:.2f} CPU"
    if client is not None and client >= 0.9:
        return f"client-bound: our process at {client:.2f} CPU (broker {broker or 0:.2f})"
    return ""


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 5's targets, each met (True), missed (False) or not measured (None)."""
    out: list[dict[str, Any]] = []

    def add(name: str, goal: str, value: Any, met: bool | None, note: str = "") -> None:
        out.append({"target": name, "goal": goal, "value": value, "met": met, "note": note})

    summary = {(e["row"], e["qos"]): e for e in results.get("throughput", {}).get("summary", [])}

    def ratio(row: str, qos: int, key: str) -> float | None:
        return summary.get((row, qos), {}).get(key)

    for name, row, qos, key, goal in (
        ("native TCP QoS 0 vs C tools", "native-tcp", 0, "x_c_tools", 0.9),
        ("native TCP QoS 0 vs fastest Python peer", "native-tcp", 0, "x_best_peer", 2.5),
        ("native TCP QoS 1 vs fastest Python peer", "native-tcp", 1, "x_best_peer", 2.0),
        ("native WS QoS 0 vs paho-mqtt WS", "native-ws", 0, "x_best_peer", 3.0),
        ("native WS QoS 1 vs paho-mqtt WS", "native-ws", 1, "x_best_peer", 3.0),
    ):
        value = ratio(row, qos, key)
        met = None if value is None else value >= goal
        note = _limit_note(summary.get((row, qos))) if met is False else ""
        add(name, f">= {goal}x", value, met, note)
    rtt = next(
        (
            r
            for r in results.get("latency", {}).get("results", [])
            if r["transport"] == "tcp"
            and r["qos"] == 1
            and r["broker"].startswith("set_tcp")
            and "p50_ms" in r
        ),
        None,
    )
    add(
        "QoS 1 round trip p50 (TCP)",
        "<= 1 ms",
        rtt and rtt["p50_ms"],
        None if rtt is None else rtt["p50_ms"] <= 1.0,
    )
    t = results.get("tasks", {})
    rate = (t.get("tasks_per_s") or {}).get("median")
    clean = t.get("duplicates") == 0 and t.get("losses") == 0 if rate is not None else None
    add(
        "task rate, 9 agents",
        ">= 1000 tasks/s, 0 duplicates, 0 losses",
        rate,
        None if rate is None else rate >= 1000 and bool(clean),
        "" if rate is None else f"duplicates {t.get('duplicates')}, losses {t.get('losses')}",
    )
    bound = t.get("bound_tasks_per_s")
    add(
        "task rate vs delivery bound",
        ">= 0.5 of the bound",
        t.get("fraction_of_bound"),
        None if bound is None or rate is None else rate >= bound / 2,
        "" if bound is None else f"bound {bound} tasks/s",
    )
    ratio = results.get("capacity", {}).get("ratio")
    if ratio:
        add(
            f"capacity: {ratio['num']} agents vs {ratio['den']} (issue 10)",
            ">= 8x the tasks/s (1 s tasks)",
            ratio["median"],
            None if ratio["median"] is None else ratio["median"] >= 8,
            "a target for the dispatch; reported, not asserted",
        )
    mem = results.get("memory", {}).get("swarms_of_9", {})
    per = [p["per_agent_kb"] for p in mem.get("points", [])]
    add(
        "RSS per extra in-process agent",
        "<= 5 MB (5120 KB)",
        max(per) if per else None,
        None if not per else max(per) <= 5120,
        "KB, worst of 1/100/1,000 agents",
    )
    st = results.get("startup", {}).get("variants", {})
    cli = st.get("cli", {}).get("median_s") or st.get("run_agent", {}).get("median_s")
    add("process start to online", "<= 0.5 s", cli, None if cli is None else cli <= 0.5)
    return out


def summarize_tasks(results: list[dict[str, Any]], agents: int, tasks: int) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r]
    summary: dict[str, Any] = {"agents": agents, "tasks": tasks, "runs": results}
    if ok:
        mid = sorted(ok, key=lambda r: r["tasks_per_s"])[len(ok) // 2]  # the median run
        summary.update(
            tasks_per_s=_stats([r["tasks_per_s"] for r in ok]),
            latency_p50_ms=mid["latency_p50_ms"],
            latency_p99_ms=mid["latency_p99_ms"],
            duplicates=sum(r["duplicates"] for r in ok),
            losses=sum(r["losses"] for r in ok),
            deliveries_per_task=round(statistics.median(r["deliveries_per_task"] for r in ok), 2),
            lone_latency_p50_ms=_median(ok, "lone_latency_p50_ms"),
            lone_latency_p99_ms=_median(ok, "lone_latency_p99_ms"),
            lone_tasks=sum(r.get("lone_tasks", 0) for r in ok),
            broker_cpu_per_task_us=_per(ok, "broker_cpu_s", "completed"),
        )
    return summary


def add_bound(results: dict[str, Any]) -> None:
    """The task rate's physical bound: broker deliveries/s / deliveries per task."""
    t = results.get("tasks")
    fan = results.get("throughput", {}).get("fanout", {})
    if not t:
        return
    per_s = (fan.get("deliveries_per_s") or {}).get("median")
    per_task = t.get("deliveries_per_task")
    rate = (t.get("tasks_per_s") or {}).get("median")
    if not (per_s and per_task and rate):
        return
    bound = per_s / per_task
    t["broker_deliveries_per_s"] = per_s
    t["bound_tasks_per_s"] = round(bound, 1)
    t["fraction_of_bound"] = round(rate / bound, 2)
    us = fan.get("broker_us_per_delivery")
    if us:  # the bound if the broker had a whole core to itself
        t["bound_broker_core_tasks_per_s"] = round(1e6 / us / per_task, 1)


# ----------------------------------------------------- scale, capacity and peers
def _swarm_entry(ok: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of one swarm row over its repetitions (medians; sums of dup/lost)."""
    return {
        "tasks_per_s": _stats([r["tasks_per_s"] for r in ok]),
        "latency_p50_ms": _median(ok, "latency_p50_ms"),
        "duplicates": sum(r["duplicates"] for r in ok),
        "losses": sum(r["losses"] for r in ok),
        "deliveries_per_task": _median(ok, "deliveries_per_task"),
        "broker_deliveries_per_task": _median(ok, "broker_deliveries_per_task"),
        "broker_idle_deliveries_per_s": _median(ok, "broker_idle_deliveries_per_s"),
        "agents_cpu_per_task_us": _median(ok, "agents_cpu_per_task_us"),
        "broker_cpu_per_task_us": _median(ok, "broker_cpu_per_task_us"),
        "lone_latency_p50_ms": _median(ok, "lone_latency_p50_ms"),
        "lone_latency_p99_ms": _median(ok, "lone_latency_p99_ms"),
    }


def _per_rep_ratio(
    runs: list[dict[str, Any]], key: str, num: Any, den: Any, field: str = "tasks_per_s"
) -> dict[str, Any]:
    """Median over repetitions of run[num][field] / run[den][field], runs keyed by ``key``."""
    ratios = []
    for rep in sorted({r["rep"] for r in runs}):
        mine = {r[key]: r for r in runs if r["rep"] == rep and "error" not in r}
        a, b = mine.get(num, {}).get(field), mine.get(den, {}).get(field)
        if a and b:
            ratios.append(a / b)
    return {
        "median": round(statistics.median(ratios), 2) if ratios else None,
        "samples": [round(x, 2) for x in ratios],
    }


def summarize_sizes(section: dict[str, Any]) -> dict[str, Any]:
    """Rows of the scale or capacity section: one per (dispatch, agents)."""
    rows = []
    runs = section["runs"]
    keys = sorted({(r.get("dispatch", "broadcast"), r["agents"]) for r in runs})
    for dispatch, agents in keys:
        mine = [r for r in runs if r["agents"] == agents and r.get("dispatch") == dispatch]
        ok = [r for r in mine if "error" not in r]
        entry: dict[str, Any] = {
            "dispatch": dispatch,
            "agents": agents,
            "tasks": ok[0]["tasks"] if ok else None,
            "runs": len(ok),
            "errors": [r["error"] for r in mine if "error" in r],
        }
        if ok:
            entry.update(_swarm_entry(ok))
            if ok[0].get("task_seconds"):
                slots = agents * ok[0]["max_tasks"]
                entry["slots"] = slots
                entry["slots_per_task_second"] = round(slots / ok[0]["task_seconds"], 1)
        rows.append(entry)
    out = dict(section)
    out["summary"] = rows
    sizes = sorted({r["agents"] for r in runs})
    rules = sorted({r.get("dispatch", "broadcast") for r in runs})
    if len(sizes) >= 2:  # the largest swarm's rate / the smallest's, per repetition and rule
        out["ratios"] = {
            rule: {
                "num": sizes[-1],
                "den": sizes[0],
                **_per_rep_ratio(
                    [r for r in runs if r.get("dispatch", "broadcast") == rule],
                    "agents",
                    sizes[-1],
                    sizes[0],
                ),
            }
            for rule in rules
        }
        out["lone_ratios"] = {
            rule: _per_rep_ratio(
                [r for r in runs if r.get("dispatch", "broadcast") == rule],
                "agents",
                sizes[-1],
                sizes[0],
                field="lone_latency_p50_ms",
            )
            for rule in rules
        }
        out["ratio"] = out["ratios"][runs[0].get("dispatch", "broadcast")]
    if {"dispatcher", "broadcast"} <= set(rules):  # the rules at each size, per repetition
        out["rule_ratios"] = {
            agents: _per_rep_ratio(
                [r for r in runs if r["agents"] == agents], "dispatch", "dispatcher", "broadcast"
            )
            for agents in sizes
        }
        out["lone_rule_ratios"] = {
            agents: _per_rep_ratio(
                [r for r in runs if r["agents"] == agents],
                "dispatch",
                "dispatcher",
                "broadcast",
                field="lone_latency_p50_ms",
            )
            for agents in sizes
        }
    return out


def summarize_stores(section: dict[str, Any]) -> dict[str, Any]:
    """Rows of the stores section: one per (agents, store), with the median over
    repetitions of each repetition's ratio to the broker's order at that size."""
    rows = []
    for agents in section["agents"]:
        sized = [r for r in section["runs"] if r["agents"] == agents]
        for name in section["stores"]:
            ok = [r for r in sized if r["store"] == name and "error" not in r]
            errors = [r["error"] for r in sized if r["store"] == name and "error" in r]
            entry = {"agents": agents, "store": name, "runs": len(ok), "errors": errors}
            if ok:
                entry.update(_swarm_entry(ok))
            entry["vs_broker"] = _per_rep_ratio(sized, "store", name, "broker")
            rows.append(entry)
    return {**section, "summary": rows}


def summarize_peers(section: dict[str, Any]) -> dict[str, Any]:
    from .peers import PEERS

    runs = section["runs"]
    rows = []
    for row in section["rows"]:
        mine = [r for r in runs if r["row"] == row]
        ok = [r for r in mine if "error" not in r]
        peer = PEERS.get(row)
        procs = (
            int(row.removeprefix("sheri-trio-").removesuffix("p"))
            if row.startswith("sheri-trio-")
            else 1
        )
        entry: dict[str, Any] = {
            "row": row,
            "label": peer.label
            if peer
            else f"sheri-trio ({section.get('dispatch', 'broadcast')}, all types"
            + (f", {procs} processes)" if procs > 1 else ")"),
            "layout": peer.layout
            if peer
            else (
                f"9 agents over {procs} processes (sheri swarm --processes {procs}), max_tasks 16"
                if procs > 1
                else "9 agents in one process, max_tasks 16"
            ),
            "guarantee": peer.guarantee if peer else GUARANTEE_OURS,
            "runs": len(ok),
            "errors": [r["error"] for r in mine if "error" in r],
        }
        if ok:
            entry.update(
                tasks_per_s=_stats([r["tasks_per_s"] for r in ok]),
                duplicates=sum(r["duplicates"] for r in ok),
                losses=sum(r["losses"] for r in ok),
                lone_latency_p50_ms=_median(ok, "lone_latency_p50_ms"),
                lone_latency_p99_ms=_median(ok, "lone_latency_p99_ms"),
                broker_cpu_per_task_us=_median(ok, "broker_cpu_per_task_us"),
                workers_cpu_per_task_us=_median(
                    ok, "agents_cpu_per_task_us" if peer is None else "workers_cpu_per_task_us"
                ),
            )
        if peer is not None:
            entry["ours_over_peer"] = _per_rep_ratio(runs, "row", "sheri-trio", row)
            for other in section["rows"]:  # sheri-trio-2p, ...: our other rows
                if other.startswith("sheri-trio-"):
                    entry.setdefault("others_over_peer", {})[other] = _per_rep_ratio(
                        runs, "row", other, row
                    )
            entry["lone_peer_over_ours"] = _per_rep_ratio(
                runs, "row", row, "sheri-trio", field="lone_latency_p50_ms"
            )
        rows.append(entry)
    out = dict(section)
    out["summary"] = rows
    return out


GUARANTEE_OURS = (
    "one holder per attempt, one accepted outcome per task (broadcast: claims in the "
    "broker's order; dispatcher: the dispatcher's custody record; fencing by attempt); "
    "a holder that dies is taken over after its lease: an executor may run again (at "
    "least once), its outcome is accepted once"
)


def check(results: dict[str, Any]) -> dict[str, Any]:
    native_q1 = next(
        (
            e["median"]
            for e in results.get("throughput", {}).get("summary", [])
            if e["row"] == "native-tcp" and e["qos"] == 1
        ),
        None,
    )
    return {
        "rule": f"native TCP QoS 1 >= {DESIGN_CARD_MIN:.0f} msgs/s",
        "value": native_q1,
        "passed": native_q1 is not None and native_q1 >= DESIGN_CARD_MIN,
    }


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """(Re)compute every derived field from the raw runs in ``results``; returns it."""
    tp = results.get("throughput")
    if tp:
        rows = [r for r in ROWS if any(run["row"] == r.id for run in tp["runs"])]
        tp["summary"] = summarize(rows, tp["runs"])
        tp["fanout"] = summarize_fanout(tp["fanout"]["runs"])
        background = [
            r["background_cores"] for r in tp["runs"] if r.get("background_cores") is not None
        ]
        if background:
            results["background_cores_during_throughput"] = {
                "median": round(statistics.median(background), 2),
                "max": max(background),
            }
    t = results.get("tasks")
    if t:
        results["tasks"] = summarize_tasks(t["runs"], t["agents"], t["tasks"])
        add_bound(results)
    for key in ("scale", "capacity"):
        if results.get(key):
            results[key] = summarize_sizes(results[key])
    if results.get("peers"):
        results["peers"] = summarize_peers(results["peers"])
    if results.get("stores"):
        results["stores"] = summarize_stores(results["stores"])
    results["targets"] = targets(results)
    results["check"] = check(results)
    return results
