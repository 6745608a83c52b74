"""Tables and the chart of a bench run: ``python -m bench.report [results.json]``.

``python -m bench.report`` reads ``bench/results/latest.json``, prints the tables and, with
``--docs``, redraws ``docs/bench-throughput.png`` and replaces the generated part of
``docs/bench.md`` (between its ``bench:results`` markers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "bench.md"
CHART = REPO / "docs" / "bench-throughput.png"
START, END = "<!-- bench:results:start -->", "<!-- bench:results:end -->"


def _n(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def _x(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}x"


# ------------------------------------------------------------------- table content
def throughput_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for e in results.get("throughput", {}).get("summary", []):
        note = e.get("note", "")
        if e.get("errors"):
            note = (note + " " if note else "") + f"errors: {e['errors'][0][:120]}"
        label = e["label"] + (" *" if e.get("partial") else "")
        rows.append(
            [
                label,
                e["transport"].upper(),
                str(e["qos"]),
                _n(e["median"]),
                f"{_n(e['min'])} - {_n(e['max'])}",
                f"{_n(e['received_min'])} / {_n(e['sent'])}",
                _x(e.get("x_best_peer")) if e["role"] == "ours" else "",
                _x(e.get("x_c_tools")) if e["role"] == "ours" else "",
                _n(e.get("client_cpu"), 2),
                _n(e.get("broker_cpu"), 2),
                _n(e.get("background_cores"), 2),
                note if not e.get("partial") else "",
            ]
        )
    return rows


THROUGHPUT_HEAD = [
    "client",
    "transport",
    "QoS",
    "msgs/s (median)",
    "min - max",
    "received / sent (worst)",
    "x fastest Python peer",
    "x C tools",
    "client CPU",
    "broker CPU",
    "other load",
    "note",
]


def fanout_line(results: dict[str, Any]) -> str | None:
    fan = results.get("throughput", {}).get("fanout")
    if not fan or not fan.get("deliveries_per_s", {}).get("median"):
        return None
    d = fan["deliveries_per_s"]
    cpu = f", broker CPU {fan['broker_cpu']:.2f}" if fan.get("broker_cpu") is not None else ""
    if fan.get("broker_us_per_delivery"):
        cpu += f" ({fan['broker_us_per_delivery']:.1f} us of broker CPU per delivery)"
    return (
        f"Broker fan-out (C tools, QoS 1, 1 publisher -> {fan['subscribers']} subscribers, "
        f"{fan['messages']:,} messages): {_n(d['median'])} deliveries/s "
        f"(min {_n(d['min'])}, max {_n(d['max'])}), all delivered: {fan['complete']}{cpu}"
    )


def latency_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in results.get("latency", {}).get("results", []):
        if "error" in r:
            rows.append(
                [r["transport"].upper(), str(r["qos"]), r["broker"], "error", r["error"][:80]]
                + [""] * 3
            )
            continue
        rows.append(
            [
                r["transport"].upper(),
                str(r["qos"]),
                r["broker"],
                _n(r["p50_ms"], 3),
                _n(r["p90_ms"], 3),
                _n(r["p99_ms"], 3),
                _n(r["max_ms"], 1),
                _n(r["round_trips"]),
            ]
        )
    return rows


LATENCY_HEAD = ["transport", "QoS", "broker", "p50 ms", "p90 ms", "p99 ms", "max ms", "round trips"]


def task_rows(results: dict[str, Any]) -> list[list[str]]:
    t = results.get("tasks")
    if not t or "tasks_per_s" not in t:
        errs = [r.get("error") for r in (t or {}).get("runs", []) if "error" in r]
        pad = [""] * (len(TASK_HEAD) - 2)
        return [["error", errs[0][:100] if errs else "not run", *pad]] if t else []
    rate = t["tasks_per_s"]
    return [
        [
            f"{t['agents']} agents, {t['tasks']:,} tasks",
            _n(rate["median"]),
            f"{_n(rate['min'])} - {_n(rate['max'])}",
            _n(t["latency_p50_ms"], 1),
            _n(t["latency_p99_ms"], 1),
            f"{t['duplicates']} / {t['losses']}",
            _n(t["deliveries_per_task"], 2),
            _n(t.get("broker_deliveries_per_s")),
            _n(t.get("bound_tasks_per_s")),
            _n(t.get("fraction_of_bound"), 2),
            _n(t.get("bound_broker_core_tasks_per_s")),
            _lone(t),
        ]
    ]


def _lone(t: dict[str, Any]) -> str:
    if not t.get("lone_tasks") and t.get("lone_latency_p50_ms") is None:
        return "-"
    return f"{_n(t['lone_latency_p50_ms'], 2)} / {_n(t['lone_latency_p99_ms'], 2)}"


TASK_HEAD = [
    "run",
    "tasks/s (median)",
    "min - max",
    "p50 ms",
    "p99 ms",
    "dup / lost",
    "deliveries/task",
    "broker deliveries/s",
    "bound tasks/s",
    "fraction of bound",
    "bound if the broker had a core",
    "lone task p50 / p99 ms",
]


def _err_row(entry: dict[str, Any], width: int, label: str) -> list[str]:
    err = entry["errors"][0][:100] if entry.get("errors") else "no run"
    return [label, "error", err, *[""] * (width - 3)]


def size_rows(results: dict[str, Any], key: str) -> list[list[str]]:
    """The scale (no-op) or capacity (1 s tasks) rows: one per dispatch and swarm size."""
    section = results.get(key)
    if not section:
        return []
    rows = []
    for e in section.get("summary", []):
        label = f"{e['agents']} agents, {_n(e['tasks'])} tasks"
        if "tasks_per_s" not in e:
            rows.append(_err_row(e, len(SIZE_HEAD), label))
            continue
        rate = e["tasks_per_s"]
        rows.append(
            [
                label,
                e["dispatch"],
                _n(rate["median"], 1),
                f"{_n(rate['min'], 1)} - {_n(rate['max'], 1)}",
                _n(e.get("slots_per_task_second"), 0) if key == "capacity" else "",
                f"{e['duplicates']} / {e['losses']}",
                _n(e.get("broker_deliveries_per_task"), 1),
                _n(e.get("deliveries_per_task"), 1),
                _n(e.get("broker_idle_deliveries_per_s"), 0),
                _n(e.get("agents_cpu_per_task_us"), 0),
                _n(e.get("broker_cpu_per_task_us"), 0),
                _n(e.get("latency_p50_ms"), 1),
                _lone(e) if key == "scale" else "-",
            ]
        )
    return rows


SIZE_HEAD = [
    "swarm",
    "dispatch",
    "tasks/s (median)",
    "min - max",
    "slots / task s",
    "dup / lost",
    "deliveries/task (broker)",
    "deliveries/task (clients)",
    "idle deliveries/s",
    "agents' CPU us/task",
    "broker CPU us/task",
    "p50 ms",
    "lone task p50 / p99 ms",
]


def ratio_line(results: dict[str, Any], key: str) -> str | None:
    section = results.get(key, {})
    ratios = section.get("ratios") or ({"": section["ratio"]} if section.get("ratio") else {})
    what = "no-op tasks" if key == "scale" else f"{section.get('task_seconds', 1):g} s tasks"

    def samples(r: dict[str, Any]) -> str:
        return ", ".join(f"{x:.2f}" for x in r["samples"])

    lines = [
        f"{r['num']} agents / {r['den']} agents{f' ({rule})' if rule else ''}, tasks/s with "
        f"{what}: {r['median']:.2f}x (median of the repetitions: {samples(r)})"
        for rule, r in ratios.items()
        if r.get("median") is not None
    ]
    for rule, r in section.get("lone_ratios", {}).items():
        if r.get("median") is not None:
            lines.append(
                f"lone task p50, {ratios[rule]['num'] if rule in ratios else ''} agents / "
                f"{ratios[rule]['den'] if rule in ratios else ''} agents ({rule}): "
                f"{r['median']:.2f}x ({samples(r)})"
            )
    for agents, r in section.get("rule_ratios", {}).items():
        if r.get("median") is not None:
            lines.append(
                f"dispatcher / broadcast at {agents} agents, tasks/s: {r['median']:.2f}x "
                f"({samples(r)})"
            )
    for agents, r in section.get("lone_rule_ratios", {}).items():
        if r.get("median") is not None:
            lines.append(
                f"dispatcher / broadcast at {agents} agents, lone task p50: {r['median']:.2f}x "
                f"({samples(r)})"
            )
    return "; ".join(lines) if lines else None


def peer_rows(results: dict[str, Any]) -> list[list[str]]:
    section = results.get("peers")
    if not section:
        return []
    rows = []
    for e in section.get("summary", []):
        if "tasks_per_s" not in e:
            rows.append(_err_row(e, len(PEER_HEAD), e["label"]))
            continue
        rate = e["tasks_per_s"]
        ours = e.get("ours_over_peer", {}).get("median")
        lone = e.get("lone_peer_over_ours", {}).get("median")
        others = e.get("others_over_peer", {})
        more = "; ".join(
            f"{row.removeprefix('sheri-trio-').removesuffix('p')} processes: {_x(r.get('median'))}"
            for row, r in others.items()
        )
        rows.append(
            [
                e["label"],
                _n(rate["median"], 0),
                f"{_n(rate['min'], 0)} - {_n(rate['max'], 0)}",
                ""
                if e["row"].startswith("sheri-trio")
                else _x(ours) + (f" ({more})" if more else ""),
                f"{e['duplicates']} / {e['losses']}",
                _lone(e),
                "" if e["row"].startswith("sheri-trio") else _x(lone),
                _n(e.get("workers_cpu_per_task_us"), 0),
                _n(e.get("broker_cpu_per_task_us"), 0),
            ]
        )
    return rows


PEER_HEAD = [
    "system",
    "tasks/s (median)",
    "min - max",
    "ours / peer (tasks/s)",
    "dup / lost",
    "lone task p50 / p99 ms",
    "peer / ours (lone p50)",
    "workers' CPU us/task",
    "broker CPU us/task",
]


def guarantee_rows(results: dict[str, Any]) -> list[list[str]]:
    return [
        [e["label"], e["layout"], e["guarantee"]]
        for e in results.get("peers", {}).get("summary", [])
    ]


GUARANTEE_HEAD = ["system", "9 workers as", "delivery guarantee (as configured)"]


def memory_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    mem = results.get("memory", {})
    for key, layout in (("swarms_of_9", "swarms of 9"), ("one_swarm", "one swarm")):
        m = mem.get(key)
        if not m:
            continue
        if "error" in m:
            rows.append([layout, "error", m["error"][:100], "", "", ""])
            continue
        for p in m["points"]:
            rows.append(
                [
                    layout,
                    _n(p["agents"]),
                    _n(p["rss_mb"], 1),
                    _n(p["per_agent_kb"], 1),
                    _n(p.get("marginal_kb"), 1),
                    _n(p["seconds_to_start"], 2),
                ]
            )
        rows.append(
            [
                layout,
                "(baseline)",
                _n(m["baseline_rss_mb"], 1),
                "",
                "",
                "; ".join(m.get("notes", []))[:100],
            ]
        )
    return rows


MEMORY_HEAD = [
    "layout",
    "agents",
    "RSS MB",
    "KB per agent (vs baseline)",
    "KB per agent (marginal)",
    "s to start all",
]


def startup_rows(results: dict[str, Any]) -> list[list[str]]:
    st = results.get("startup")
    if not st:
        return []
    if "error" in st:
        return [["error", st["error"][:100], "", ""]]
    rows = []
    names = {
        "cli": "python -m sheri_trio agent (CLI)",
        "run_agent": "python -m bench.clients agent (run_agent, no CLI)",
    }
    for key, v in st["variants"].items():
        rows.append(
            [
                names.get(key, key),
                _n(v.get("median_s"), 3),
                f"{_n(v.get('min_s'), 3)} - {_n(v.get('max_s'), 3)}",
                "; ".join(v.get("errors", []))[:100] or f"{v['runs']} runs",
            ]
        )
    rows.append(["python -c pass", _n(st.get("python_bare_s"), 3), "", "interpreter alone"])
    rows.append(
        [
            "python -c 'import sheri_trio.cli'",
            _n(st.get("import_cli_s"), 3),
            "",
            "imports of the CLI",
        ]
    )
    return rows


STARTUP_HEAD = ["process", "spawn -> online s (median)", "min - max", "note"]


def presence_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per swarm size: medians over the repetitions (issue 10: 1,000 agents
    online in <= 10 s, <= 3n presence deliveries per heartbeat interval)."""
    section = results.get("presence")
    if not section:
        return []
    rows = []
    for agents in section["agents"]:
        runs = [r for r in section["runs"] if r.get("agents") == agents and "start_s" in r]
        if not runs:
            continue
        start = statistics.median(r["start_s"] for r in runs)
        per = [r["deliveries_per_interval_per_agent"] for r in runs if "deliveries" in r]
        rows.append(
            [
                f"{agents:,} agents",
                section["dispatch"],
                _n(start, 2),
                f"{min(r['start_s'] for r in runs):.2f} - {max(r['start_s'] for r in runs):.2f}",
                _n(statistics.median(per), 2) if per else "-",
                _n(runs[0]["heartbeat_interval"], 1),
                f"{len(runs)} runs; " + ", ".join(f"{r['online']} online" for r in runs),
            ]
        )
    return rows


PRESENCE_HEAD = [
    "swarm (started at once)",
    "dispatch",
    "all online s (median)",
    "min - max",
    "presence deliveries / interval / agent",
    "heartbeat s",
    "note",
]


def retained_rows(results: dict[str, Any]) -> list[list[str]]:
    r = results.get("retained")
    if not r or "online_s" not in r:
        return []
    times = r["online_s"]
    return [
        [
            f"{r['records']:,} final task states",
            r["dispatch"],
            _n(r["online_s_median"], 3),
            f"{min(times):.3f} - {max(times):.3f}",
        ]
    ]


RETAINED_HEAD = ["retained next to it", "dispatch", "start -> online s (median)", "min - max"]


def dashboard_rows(results: dict[str, Any]) -> list[list[str]]:
    section = results.get("dashboard")
    if not section:
        return []
    return [
        [
            f"{r['agents']} agents, {r['tasks']:,} tasks (rep {r['rep']})",
            _n(r.get("swarm_tasks_per_s"), 0),
            f"{_n(r.get('dashboard_counted'), 0)} of {_n(r.get('completed'), 0)}",
            _n(r.get("dashboard_lag_s"), 2),
            _n(r.get("dashboard_cpu_per_task_us"), 0),
        ]
        for r in section["runs"]
    ]


DASHBOARD_HEAD = [
    "swarm",
    "swarm tasks/s",
    "outcomes the dashboard counted",
    "behind at the end s",
    "dashboard CPU us/task",
]


def store_rows(results: dict[str, Any]) -> list[list[str]]:
    section = results.get("stores")
    if not section:
        return []
    rows = []
    for e in section.get("summary", []):
        t = e.get("tasks_per_s") or {}
        rows.append(
            [
                f"{e['agents']} agents",
                e["store"],
                _n(t.get("median"), 0) if t else "error: " + "; ".join(e["errors"])[:80],
                _x(e["vs_broker"]["median"]) if e["store"] != "broker" else "1.00x",
                _n(e.get("latency_p50_ms"), 1),
                _n(e.get("lone_latency_p50_ms"), 2),
                _n(e.get("agents_cpu_per_task_us"), 0),
                f"{e.get('duplicates', 0)}/{e.get('losses', 0)}",
            ]
        )
    return rows


STORES_HEAD = [
    "swarm",
    "claim store",
    "tasks/s (median)",
    "vs broker (per-rep ratio)",
    "burst p50 ms",
    "lone p50 ms",
    "agents CPU us/task",
    "dup/lost",
]


def target_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for t in results.get("targets", []):
        met = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        value = t["value"]
        shown = f"{value:.2f}" if isinstance(value, float) else _n(value)
        rows.append([t["target"], t["goal"], shown, met, t.get("note", "")])
    return rows


TARGET_HEAD = ["target (issue 5)", "goal", "measured", "", "note"]


# -------------------------------------------------------------------- rich tables
def rich_tables(results: dict[str, Any]) -> list[Any]:
    from rich.table import Table
    from rich.text import Text

    out: list[Any] = []

    def table(
        title: str, head: list[str], rows: list[list[str]], caption: str | None = None
    ) -> None:
        if not rows:
            return
        t = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
        for i, h in enumerate(head):
            left = (
                "note",
                "broker",
                "dispatch",
                "9 workers as",
                "delivery guarantee (as configured)",
                "claim store",
            )
            t.add_column(h, justify="right" if i and h not in left else "left")
        for r in rows:
            t.add_row(
                *[
                    Text(c, style="bold red")
                    if c == "MISSED"
                    else Text(c, style="green")
                    if c == "met"
                    else c
                    for c in r
                ]
            )
        out.append(t)

    tp = results.get("throughput", {})
    partial = any(e.get("partial") for e in tp.get("summary", []))
    caption = fanout_line(results)
    if partial:
        note = next(e["note"] for e in tp["summary"] if e.get("partial"))
        caption = (caption + "\n" if caption else "") + f"* {note}"
    table(
        f"Throughput: {tp.get('messages', 0):,} messages of {tp.get('size', 256)} bytes, "
        f"1 publisher + 1 subscriber, {tp.get('reps', 0)} interleaved repetitions",
        THROUGHPUT_HEAD,
        throughput_rows(results),
        caption,
    )
    table(
        "Round-trip latency (request/response through the broker)",
        LATENCY_HEAD,
        latency_rows(results),
    )
    table("End-to-end task rate (no-op tasks, one process)", TASK_HEAD, task_rows(results))
    sc = results.get("scale", {})
    table(
        "Scale: no-op tasks cycling over the 13 task types, every role, agents in one process",
        SIZE_HEAD,
        size_rows(results, "scale"),
        ratio_line(results, "scale") if sc else None,
    )
    cap = results.get("capacity", {})
    table(
        f"Capacity: tasks of {cap.get('task_seconds', 1):g} s, max_tasks "
        f"{cap.get('max_tasks', 4)} per agent",
        SIZE_HEAD,
        size_rows(results, "capacity"),
        ratio_line(results, "capacity") if cap else None,
    )
    st = results.get("stores", {})
    table(
        f"Claim stores: dispatcher mode, {_n(st.get('tasks'))} no-op tasks of every type, "
        f"{st.get('reps', 0)} interleaved repetitions",
        STORES_HEAD,
        store_rows(results),
    )
    pe = results.get("peers", {})
    table(
        f"Task queues: {_n(pe.get('tasks'))} no-op tasks at once, {pe.get('workers', 9)} workers, "
        f"{pe.get('reps', 0)} interleaved repetitions (ratios: medians of per-repetition ratios)",
        PEER_HEAD,
        peer_rows(results),
    )
    table("Task queues: workers and delivery guarantees", GUARANTEE_HEAD, guarantee_rows(results))
    table("Memory: RSS with n agents in one process", MEMORY_HEAD, memory_rows(results))
    table("Start-up: process spawn to retained online status", STARTUP_HEAD, startup_rows(results))
    table("Presence: one swarm started at once, then idle", PRESENCE_HEAD, presence_rows(results))
    table("An agent started next to finished tasks", RETAINED_HEAD, retained_rows(results))
    table("sheri dashboard following the burst", DASHBOARD_HEAD, dashboard_rows(results))
    table("Targets", TARGET_HEAD, target_rows(results))
    return out


# -------------------------------------------------------------------------- markdown
def _md_table(head: list[str], rows: list[list[str]]) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    m, v = results["machine"], results["versions"]
    load = results.get("load_average_start"), results.get("load_average_end")
    tp = results.get("throughput", {})
    parts = [
        f"Run: `{'python -m bench --quick' if results['mode'] == 'quick' else 'python -m bench'}`"
        f" from {results['started']} to {results['finished']} ({results['duration_s']:.0f} s); "
        f"load average (1, 5, 15 min) {load[0]} at the start, {load[1]} at the end"
        + (
            f"; other work on the machine during the throughput runs: median "
            f"{bg['median']:.2f} cores, at most {bg['max']:.2f}."
            if (bg := results.get("background_cores_during_throughput"))
            else "."
        ),
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux "
        f"{m['kernel']}, open-file limit {m['fd_limit']}.",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
        "",
        f"### Throughput ({tp.get('messages', 0):,} messages of 256 bytes, "
        f"{tp.get('reps', 0)} interleaved repetitions)",
        "",
        "![msgs/s per client and QoS](bench-throughput.png)",
        "",
        _md_table(THROUGHPUT_HEAD, throughput_rows(results)),
    ]
    partial = [e for e in tp.get("summary", []) if e.get("partial")]
    if partial:
        parts += ["", f"\\* {partial[0]['note']}."]
    fan = fanout_line(results)
    if fan:
        parts += ["", fan + "."]
    parts += ["", "### Round-trip latency", "", _md_table(LATENCY_HEAD, latency_rows(results))]
    parts += ["", "### End-to-end task rate", "", _md_table(TASK_HEAD, task_rows(results))]
    for key, title in (
        ("scale", "Scale: no-op tasks of every type"),
        ("capacity", "Capacity: 1 s tasks"),
    ):
        if size_rows(results, key):
            parts += ["", f"### {title}", "", _md_table(SIZE_HEAD, size_rows(results, key))]
            line = ratio_line(results, key)
            if line:
                parts += ["", line + "."]
    if peer_rows(results):
        pe = results["peers"]
        parts += [
            "",
            f"### Task queues ({pe['tasks']:,} no-op tasks at once, {pe['workers']} workers, "
            f"{pe['reps']} interleaved repetitions)",
            "",
            _md_table(PEER_HEAD, peer_rows(results)),
            "",
            _md_table(GUARANTEE_HEAD, guarantee_rows(results)),
        ]
    if memory_rows(results):
        parts += ["", "### Memory", "", _md_table(MEMORY_HEAD, memory_rows(results))]
    if startup_rows(results):
        parts += ["", "### Start-up", "", _md_table(STARTUP_HEAD, startup_rows(results))]
    if presence_rows(results):
        parts += ["", "### Presence", "", _md_table(PRESENCE_HEAD, presence_rows(results))]
    if retained_rows(results):
        parts += ["", "### Start next to finished tasks", ""]
        parts += [_md_table(RETAINED_HEAD, retained_rows(results))]
    if dashboard_rows(results):
        parts += ["", "### The dashboard following a burst", ""]
        parts += [_md_table(DASHBOARD_HEAD, dashboard_rows(results))]
    parts += ["", "### Targets", "", _md_table(TARGET_HEAD, target_rows(results))]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- chart
def chart(results: dict[str, Any], path: Path = CHART) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results.get("throughput", {}).get("summary", [])
    groups: list[str] = []
    for e in summary:
        if e["role"] == "ceiling":
            continue
        name = f"{e['label']}\n{e['transport'].upper()}"
        if name not in groups:
            groups.append(name)
    data = {(f"{e['label']}\n{e['transport'].upper()}", e["qos"]): e for e in summary}
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    width = 0.38
    colors = {0: "#4C72B0", 1: "#DD8452"}
    for qos in (0, 1):
        xs, ys, lo, hi = [], [], [], []
        for i, g in enumerate(groups):
            e = data.get((g, qos))
            if not e or e["median"] is None:
                continue
            xs.append(i + (qos - 0.5) * width)
            ys.append(e["median"])
            lo.append(e["median"] - e["min"])
            hi.append(e["max"] - e["median"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=colors[qos], label=f"QoS {qos}")
        for x, y, top in zip(xs, ys, hi, strict=True):
            ax.text(x, y + top, f"{y / 1000:.1f}k", ha="center", va="bottom", fontsize=7)
    for e in summary:
        if e["role"] != "ceiling" or e["median"] is None:
            continue
        style = "--" if e["qos"] == 0 else ":"
        label = f"mosquitto C tools QoS {e['qos']}: {e['median'] / 1000:.1f}k"
        if e.get("partial"):
            label += f" (only {e['received_min']:,} of {e['sent']:,} arrived)"
        ax.axhline(e["median"], color=colors[e["qos"]], linestyle=style, linewidth=1.2, label=label)
    tops = [e["max"] for e in summary if e.get("max")]
    if tops:
        ax.set_ylim(0, max(tops) * 1.3)  # room for the legend above the bars
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel("messages/s (median, bars: min-max)")
    tp = results.get("throughput", {})
    ax.set_title(
        f"1 publisher + 1 subscriber, {tp.get('messages', 0):,} x 256 B through mosquitto "
        f"({results['started'][:10]}, {results['mode']} run)",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def update_docs(results: dict[str, Any], doc: Path = DOC, png: Path = CHART) -> None:
    chart(results, png)
    text = doc.read_text() if doc.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{START}\n{markdown(results)}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report")
    p.add_argument("json", nargs="?", type=Path, default=REPO / "bench/results/latest.json")
    p.add_argument("--docs", action="store_true", help="update docs/bench.md and the chart")
    p.add_argument("--markdown", action="store_true", help="print the markdown tables")
    p.add_argument(
        "--recompute",
        action="store_true",
        help="recompute the derived figures from the raw runs and rewrite the file",
    )
    args = p.parse_args(argv)
    results = json.loads(args.json.read_text())
    if args.recompute:
        from .summary import derive

        derive(results)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        sys.stdout.write(markdown(results))
    else:
        from rich.console import Console

        console = Console()
        for t in rich_tables(results):
            console.print(t)
    if args.docs:
        update_docs(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
