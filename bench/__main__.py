"""``python -m bench``: throughput, latency, task rate, memory and start-up, with peers.

Run from the repository root after the README's set-up plus the ``bench`` extra
(``.ci/setup bench``). It starts a private mosquitto on free ports (``--broker URL`` to
use another one), runs every measurement in a subprocess of its own
(``python -m bench.clients``), shows a progress bar, prints tables, writes every figure
with versions and machine facts to ``bench/results/latest.json`` and exits 1 if the
native client over TCP delivers fewer than 1,000 msgs/s at QoS 1 (the design card's
check). ``--quick`` takes about a minute; the default run about 15 minutes.
See docs/bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import machine

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "latest.json"
DESIGN_CARD_MIN = 1000.0  # native TCP QoS 1 msgs/s, or exit 1


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


@dataclass
class Settings:
    quick: bool
    messages: int
    reps: int
    tasks: int
    agents: int
    fanout_messages: int
    latency_round_trips: int
    nagle_round_trips: int
    memory_counts: str
    startup_reps: int
    aiomqtt_window: int
    gmqtt_yield_every: int


def settings(args: argparse.Namespace) -> Settings:
    quick = args.quick
    return Settings(
        quick=quick,
        messages=args.messages or (20_000 if quick else 100_000),
        reps=args.reps or (1 if quick else 3),
        tasks=args.tasks or (1_000 if quick else 5_000),
        agents=args.agents,
        fanout_messages=5_000 if quick else 20_000,
        latency_round_trips=500 if quick else 2_000,
        nagle_round_trips=100 if quick else 300,
        memory_counts="1,100,1000",
        startup_reps=3 if quick else 5,
        aiomqtt_window=args.aiomqtt_window,
        gmqtt_yield_every=args.gmqtt_yield_every,
    )


# ------------------------------------------------------------------ subprocess calls
class Runner:
    """Runs ``python -m bench.clients`` with the broker URL in the environment."""

    def __init__(self, log: list[dict[str, Any]]) -> None:
        self.log = log
        self.broker_pid: int | None = None  # our own broker: its CPU time is recorded

    def broker_cpu(self) -> float | None:
        """CPU seconds (user + system) the broker process has used so far."""
        if self.broker_pid is None:
            return None
        try:
            with open(f"/proc/{self.broker_pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __call__(self, kind: str, url: str, *argv: str, timeout: float) -> dict[str, Any]:
        env = dict(os.environ)
        env["BENCH_URL"] = url
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "bench.clients", kind, *argv]
        t0 = time.monotonic()
        cpu0 = self.broker_cpu()
        busy0, kids0 = machine.busy_cpu_s(), machine.children_cpu_s()
        try:
            proc = subprocess.run(
                cmd,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            result = {"kind": kind, "error": f"timed out after {timeout:.0f} s"}
        else:
            lines = proc.stdout.decode(errors="replace").strip().splitlines()
            try:
                result = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
            except json.JSONDecodeError:
                result = None
            if result is None:
                err = proc.stderr.decode(errors="replace").strip().splitlines()
                result = {
                    "kind": kind,
                    "error": f"exit {proc.returncode}: " + " | ".join(err[-3:])[-500:],
                }
        cpu1 = self.broker_cpu()
        wall = time.monotonic() - t0
        busy = machine.busy_cpu_s() - busy0  # every process on the machine
        kids = machine.children_cpu_s() - kids0  # the measurement process and its children
        broker = None
        if cpu0 is not None and cpu1 is not None:
            broker = result["broker_cpu_s"] = round(cpu1 - cpu0, 2)
        # What else ran meanwhile (other users' work), in cores: the noise of this figure.
        result["background_cores"] = round(max(0.0, busy - kids - (broker or 0.0)) / wall, 2)
        self.log.append({"cmd": " ".join(cmd[2:]), "wall_s": round(wall, 2)})
        return result


# ------------------------------------------------------------------------ sections
def plan(s: Settings, sections: set[str], have_ws: bool, nagle: bool) -> int:
    steps = 0
    if "throughput" in sections:
        rows = [r for r in ROWS if have_ws or r.transport == "tcp"]
        steps += s.reps * (len(rows) * 2 + 1)  # + the fan-out
    if "latency" in sections:
        steps += 4 if have_ws else 2
        steps += 2 if nagle else 0
    if "tasks" in sections:
        steps += s.reps
    if "memory" in sections:
        steps += 2
    if "startup" in sections:
        steps += 1
    return steps


def throughput(run: Runner, s: Settings, urls: dict[str, str], step: Any) -> dict[str, Any]:
    rows = [r for r in ROWS if r.transport in urls]
    runs: list[dict[str, Any]] = []
    fanout: list[dict[str, Any]] = []
    n = s.messages
    timeout = 120 + n / 300
    for rep in range(s.reps):
        shift = rep % len(rows)  # interleaved repetitions, each in a rotated order
        for row in rows[shift:] + rows[:shift]:
            for qos in (0, 1):
                step(f"throughput {rep + 1}/{s.reps}: {row.label} {row.transport} QoS {qos}")
                argv = ["-n", str(n), "--qos", str(qos), "--size", "256"]
                if row.kind == "aiomqtt":
                    argv += ["--window", str(s.aiomqtt_window)]
                if row.kind == "gmqtt":
                    argv += ["--yield-every", str(s.gmqtt_yield_every)]
                result = run(row.kind, urls[row.transport], *argv, timeout=timeout)
                runs.append({"row": row.id, "rep": rep + 1, "qos": qos, **result})
        step(f"broker fan-out {rep + 1}/{s.reps}: 1 publisher, 9 subscribers, QoS 1")
        fanout.append(
            run(
                "fanout-c",
                urls["tcp"],
                "-n",
                str(s.fanout_messages),
                "--qos",
                "1",
                "--subscribers",
                "9",
                timeout=timeout,
            )
        )
    return {
        "messages": n,
        "size": 256,
        "reps": s.reps,
        "runs": runs,
        "summary": summarize(rows, runs),
        "fanout": summarize_fanout(fanout),
    }


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
                "broker_us_per_delivery": _per(ok, "broker_cpu_s", "deliveries"),
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
        "complete": all(r["deliveries"] == r["expected"] for r in ok) if ok else None,
        "runs": results,
    }


def latency(
    run: Runner, s: Settings, urls: dict[str, str], nagle_url: str | None, step: Any
) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    for transport in ("tcp", "ws"):
        if transport not in urls:
            continue
        for qos in (0, 1):
            step(f"latency {transport} QoS {qos}")
            r = run(
                "latency",
                urls[transport],
                "-n",
                str(s.latency_round_trips),
                "--qos",
                str(qos),
                timeout=300,
            )
            out.append({"broker": "set_tcp_nodelay true", "transport": transport, "qos": qos, **r})
    if nagle_url is not None:
        for qos in (0, 1):
            step(f"latency tcp QoS {qos}, broker with Nagle (mosquitto's default)")
            r = run(
                "latency",
                nagle_url,
                "-n",
                str(s.nagle_round_trips),
                "--warmup",
                "10",
                "--qos",
                str(qos),
                timeout=300,
            )
            out.append({"broker": "mosquitto default (Nagle)", "transport": "tcp", "qos": qos, **r})
    return {"size": 256, "results": out}


def tasks(run: Runner, s: Settings, url: str, step: Any) -> dict[str, Any]:
    results = []
    for rep in range(s.reps):
        step(f"task rate {rep + 1}/{s.reps}: {s.agents} agents, {s.tasks} tasks")
        results.append(
            run(
                "tasks",
                url,
                "--agents",
                str(s.agents),
                "--tasks",
                str(s.tasks),
                "--timeout",
                str(60 + s.tasks / 50),
                timeout=180 + s.tasks / 20,
            )
        )
    ok = [r for r in results if "error" not in r]
    summary: dict[str, Any] = {"agents": s.agents, "tasks": s.tasks, "runs": results}
    if ok:
        best = sorted(ok, key=lambda r: r["tasks_per_s"])[len(ok) // 2]  # the median run
        summary.update(
            tasks_per_s=_stats([r["tasks_per_s"] for r in ok]),
            latency_p50_ms=best["latency_p50_ms"],
            latency_p99_ms=best["latency_p99_ms"],
            duplicates=sum(r["duplicates"] for r in ok),
            losses=sum(r["losses"] for r in ok),
            deliveries_per_task=round(statistics.median(r["deliveries_per_task"] for r in ok), 2),
            broker_cpu_per_task_us=_per(ok, "broker_cpu_s", "completed"),
        )
    return summary


def memory(run: Runner, s: Settings, url: str, step: Any) -> dict[str, Any]:
    step("memory: 1, 100, 1,000 agents in one process (swarms of 9)")
    grouped = run("memory", url, "--counts", s.memory_counts, "--swarm-size", "9", timeout=600)
    step("memory: 1, 100 agents in one swarm")
    one = run("memory", url, "--counts", "1,100", "--swarm-size", "0", timeout=600)
    return {"swarms_of_9": grouped, "one_swarm": one}


def startup(run: Runner, s: Settings, url: str, step: Any) -> dict[str, Any]:
    step(f"start-up to online status ({s.startup_reps} runs each)")
    return run("startup", url, "--reps", str(s.startup_reps), "--timeout", "20", timeout=600)


# ------------------------------------------------------------------------- targets
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
        add(name, f">= {goal}x", value, None if value is None else value >= goal)
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


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a run of about a minute")
    p.add_argument(
        "--broker",
        metavar="URL",
        default=os.environ.get("BENCH_BROKER"),
        help="use this broker (mqtt://user:password@host:port) instead of our own "
        "(or $BENCH_BROKER, which keeps the password out of ps)",
    )
    p.add_argument(
        "--broker-ws",
        metavar="URL",
        default=os.environ.get("BENCH_BROKER_WS"),
        help="with --broker: its WebSocket URL, ws://... (or $BENCH_BROKER_WS); "
        "without it the WebSocket rows are skipped",
    )
    p.add_argument("-n", "--messages", type=int, help="messages per throughput run")
    p.add_argument("--reps", type=int, help="repetitions (interleaved)")
    p.add_argument("--tasks", type=int, help="tasks for the end-to-end task rate")
    p.add_argument("--agents", type=int, default=9, help="agents for the task rate")
    p.add_argument(
        "--aiomqtt-window",
        type=int,
        default=1,
        help="aiomqtt publishes awaited at once (default 1: one after the other)",
    )
    p.add_argument(
        "--gmqtt-yield-every",
        type=int,
        default=64,
        help="gmqtt yields to its event loop after this many publishes (0: never)",
    )
    p.add_argument(
        "--only",
        default="throughput,latency,tasks,memory,startup",
        help="comma-separated sections to run",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    p.add_argument(
        "--docs",
        action="store_true",
        help="also redraw docs/bench-throughput.png and the tables in docs/bench.md",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from . import report

    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # tables stay readable in a log file
    s = settings(args)
    sections = {x.strip() for x in args.only.split(",") if x.strip()}
    results: dict[str, Any] = {
        "schema": 1,
        "mode": "quick" if s.quick else "full",
        "started": machine.now_iso(),
        "load_average_start": machine.loadavg(),
        "settings": vars(s),
        "machine": machine.machine(),
        "versions": machine.versions(),
    }
    calls: list[dict[str, Any]] = []
    run = Runner(calls)
    brokers: list[Any] = []
    tmp = tempfile.TemporaryDirectory(prefix="sheri-bench-")
    t_start = time.monotonic()
    try:
        if args.broker:
            urls = {"tcp": args.broker}
            if args.broker_ws:
                urls["ws"] = args.broker_ws
            nagle_url = None
            results["broker"] = {"own": False, "note": "given with --broker; Nagle run skipped"}
        else:
            from sheri_trio.testing import MosquittoBroker

            with console.status("starting mosquitto"):
                broker = MosquittoBroker(Path(tmp.name) / "broker", tls=False, persistence=False)
                brokers.append(broker)
                broker.start()
                urls = {"tcp": broker.tcp_url, "ws": broker.ws_url}
                run.broker_pid = broker.pid
                nagle_url = None
                if "latency" in sections:
                    nagle = MosquittoBroker(
                        Path(tmp.name) / "nagle", tls=False, persistence=False, nodelay=False
                    )
                    brokers.append(nagle)
                    nagle.start()
                    nagle_url = nagle.tcp_url
            results["broker"] = {
                "own": True,
                "config": "sheri_trio.testing.MosquittoBroker(tls=False, persistence=False): "
                "set_tcp_nodelay true, max_queued_messages 100000, defaults otherwise "
                "(max_inflight_messages 20)",
            }
        from sheri_trio.mqtt import redact

        results["broker"]["urls"] = {k: redact(v) for k, v in urls.items()}
        results["versions"]["broker ($SYS/broker/version)"] = run(
            "broker-version", urls["tcp"], timeout=30
        ).get("version")

        total = plan(s, sections, "ws" in urls, nagle_url is not None)
        progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=args.no_progress,
        )
        with progress:
            bar = progress.add_task("bench", total=total)
            first = [True]

            def step(text: str) -> None:
                if not first[0]:
                    progress.advance(bar)
                first[0] = False
                progress.update(bar, description=text)
                if args.no_progress:
                    console.print(f"[dim]{text}[/]")

            if "throughput" in sections:
                results["throughput"] = throughput(run, s, urls, step)
            if "latency" in sections:
                results["latency"] = latency(run, s, urls, nagle_url, step)
            if "tasks" in sections:
                results["tasks"] = tasks(run, s, urls["tcp"], step)
                fan = results.get("throughput", {}).get("fanout", {})
                per_s = (fan.get("deliveries_per_s") or {}).get("median")
                per_task = results["tasks"].get("deliveries_per_task")
                rate = (results["tasks"].get("tasks_per_s") or {}).get("median")
                if per_s and per_task and rate:
                    bound = per_s / per_task
                    results["tasks"]["broker_deliveries_per_s"] = per_s
                    results["tasks"]["bound_tasks_per_s"] = round(bound, 1)
                    results["tasks"]["fraction_of_bound"] = round(rate / bound, 2)
                    us = fan.get("broker_us_per_delivery")
                    if us:  # the bound if the broker had a whole core to itself
                        results["tasks"]["bound_broker_core_tasks_per_s"] = round(
                            1e6 / us / per_task, 1
                        )
            if "memory" in sections:
                results["memory"] = memory(run, s, urls["tcp"], step)
            if "startup" in sections:
                results["startup"] = startup(run, s, urls["tcp"], step)
            progress.advance(bar)
            progress.update(bar, description="done")
    finally:
        for b in brokers:
            b.stop()
        tmp.cleanup()

    results["finished"] = machine.now_iso()
    background = [
        r["background_cores"]
        for r in results.get("throughput", {}).get("runs", [])
        if r.get("background_cores") is not None
    ]
    if background:
        results["background_cores_during_throughput"] = {
            "median": round(statistics.median(background), 2),
            "max": max(background),
        }
    results["duration_s"] = round(time.monotonic() - t_start, 1)
    results["load_average_end"] = machine.loadavg()
    results["targets"] = targets(results)
    native_q1 = next(
        (
            e["median"]
            for e in results.get("throughput", {}).get("summary", [])
            if e["row"] == "native-tcp" and e["qos"] == 1
        ),
        None,
    )
    passed = native_q1 is not None and native_q1 >= DESIGN_CARD_MIN
    results["check"] = {
        "rule": f"native TCP QoS 1 >= {DESIGN_CARD_MIN:.0f} msgs/s",
        "value": native_q1,
        "passed": passed,
    }
    results["calls"] = calls
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    tmp_out.replace(args.out)

    for table in report.rich_tables(results):
        console.print(table)
    console.print(f"results: {args.out}")
    if args.docs:
        report.update_docs(results)
        console.print("docs/bench.md and docs/bench-throughput.png updated")
    if "throughput" not in sections:
        return 0
    if not passed:
        console.print(
            f"[bold red]FAIL[/]: native TCP QoS 1 = {native_q1} msgs/s "
            f"(< {DESIGN_CARD_MIN:.0f}, the design card's check)"
        )
        return 1
    console.print(f"[green]check passed[/]: native TCP QoS 1 = {native_q1:,.0f} msgs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
