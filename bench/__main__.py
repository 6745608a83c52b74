"""``python -m bench``: throughput, latency, task rate, memory and start-up, with peers.

Issue 10's sections: ``scale`` (no-op tasks of every type, swarms of 9 and 90 agents),
``capacity`` (1 s tasks: the rate of 90 agents over that of 9) and ``peers`` (Celery,
Dramatiq and arq with 9 workers each on a private ``redis-server``, interleaved with our
9-agent swarm); deliveries per task are counted by the broker (``$SYS``). Issue 11's:
``stores`` (the scale workload in dispatcher mode deciding through each claim store: the
broker's order, a private ``redis-server``, a throw-away database on the machine's
PostgreSQL).

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
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from . import machine
from .summary import DESIGN_CARD_MIN, ROWS, derive

if TYPE_CHECKING:
    from collections.abc import Callable

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "latest.json"


@dataclass
class Settings:
    quick: bool
    messages: int
    reps: int
    tasks: int
    lone_tasks: int
    agents: int
    fanout_messages: int
    latency_round_trips: int
    nagle_round_trips: int
    memory_counts: str
    startup_reps: int
    aiomqtt_window: int
    gmqtt_yield_every: int
    scale_agents: list[int]
    scale_tasks: int
    scale_lone: int
    capacity_tasks_per_agent: int
    capacity_max_tasks: int
    task_seconds: float
    peers: list[str]
    peer_tasks: int
    peer_workers: int
    dispatch: str  # the first of dispatches: the rule of the single-rule sections
    dispatches: list[str]  # scale, capacity: each size with each rule, interleaved
    presence_agents: list[int]
    retained_records: int
    our_processes: list[int]


def settings(args: argparse.Namespace) -> Settings:
    quick = args.quick
    return Settings(
        quick=quick,
        messages=args.messages or (20_000 if quick else 100_000),
        reps=args.reps or (1 if quick else 3),
        tasks=args.tasks or (1_000 if quick else 5_000),
        lone_tasks=50 if quick else 200,
        agents=args.agents,
        fanout_messages=5_000 if quick else 20_000,
        latency_round_trips=500 if quick else 2_000,
        nagle_round_trips=100 if quick else 300,
        memory_counts="1,100,1000",
        startup_reps=3 if quick else 5,
        aiomqtt_window=args.aiomqtt_window,
        gmqtt_yield_every=args.gmqtt_yield_every,
        scale_agents=[int(x) for x in args.scale_agents.split(",") if x.strip()],
        scale_tasks=args.scale_tasks or (300 if quick else 2_000),
        scale_lone=20 if quick else 50,
        capacity_tasks_per_agent=args.capacity_tasks_per_agent or (4 if quick else 12),
        capacity_max_tasks=4,
        task_seconds=args.task_seconds,
        peers=[x.strip() for x in args.peers.split(",") if x.strip()],
        peer_tasks=args.peer_tasks or (300 if quick else 2_000),
        peer_workers=9,
        dispatch=args.dispatch.split(",")[0].strip(),
        dispatches=[x.strip() for x in args.dispatch.split(",") if x.strip()],
        presence_agents=[
            int(x) for x in (args.presence_agents or ("100" if quick else "100,1000")).split(",")
        ],
        retained_records=args.retained_records or (10_000 if quick else 100_000),
        our_processes=[
            int(x) for x in (args.our_processes or ("1" if quick else "1,2")).split(",")
        ],
    )


# ------------------------------------------------------------------ subprocess calls
class Runner:
    """Runs ``python -m bench.clients`` with the broker URL in the environment."""

    def __init__(self, log: list[dict[str, Any]]) -> None:
        self.log = log
        self.broker_pid: int | None = None  # our own broker: its CPU time is recorded
        self.env: dict[str, str] = {}  # more for every call: the Redis URL of the peers
        #: the stores section's claim stores: name -> URL (no password)
        self.stores: dict[str, str] = {"broker": "broker"}

    def broker_cpu(self) -> float | None:
        """CPU seconds (user + system) the broker process has used so far."""
        return machine.process_cpu_s(self.broker_pid)

    def __call__(
        self,
        kind: str,
        url: str,
        *argv: str,
        timeout: float,
        mqtt: bool = True,
        env_extra: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        env = dict(os.environ)
        env.update(self.env)
        env.update(env_extra or {})
        env["BENCH_URL"] = url
        if self.broker_pid is not None:
            env["BENCH_BROKER_PID"] = str(self.broker_pid)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "bench.clients", kind, *argv]
        t0 = time.monotonic()
        cpu0 = self.broker_cpu() if mqtt else None
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
        cpu1 = self.broker_cpu() if mqtt else None
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
    if "scale" in sections:
        steps += s.reps * len(s.scale_agents) * len(s.dispatches)
    if "capacity" in sections:
        steps += s.reps * len(s.scale_agents) * len(s.dispatches)
    if "peers" in sections:
        steps += s.reps * (1 + len(s.peers))
    if "memory" in sections:
        steps += 2
    if "startup" in sections:
        steps += 1
    if "presence" in sections:
        steps += s.reps * len(s.presence_agents)
    if "retained" in sections:
        steps += 1
    if "dashboard" in sections:
        steps += s.reps
    if "stores" in sections:
        steps += s.reps * len(s.scale_agents) * 3
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
    return {"messages": n, "size": 256, "reps": s.reps, "runs": runs, "fanout": {"runs": fanout}}


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
                "--lone",
                str(s.lone_tasks),
                "--timeout",
                str(60 + s.tasks / 50),
                timeout=180 + s.tasks / 20,
            )
        )
    return {"agents": s.agents, "tasks": s.tasks, "runs": results}


def swarm_run(
    run: Runner,
    url: str,
    *,
    agents: int,
    tasks: int,
    lone: int,
    workload: str,
    dispatch: str,
    task_seconds: float = 0.0,
    max_tasks: int = 16,
    processes: int = 1,
    swarm: str | None = None,
    claim_store: str | None = None,
) -> dict[str, Any]:
    """One ``tasks`` measurement (bench/tasks.py) with the given swarm and workload
    (``claim_store``: the agents' store URL, without a password; default the broker's)."""
    wait = 60 + tasks * agents / 200 + tasks * task_seconds / max(agents, 1)
    argv = ["--agents", str(agents), "--tasks", str(tasks), "--lone", str(lone)]
    argv += ["--workload", workload, "--dispatch", dispatch, "--max-tasks", str(max_tasks)]
    argv += ["--task-seconds", str(task_seconds), "--timeout", f"{wait:.0f}"]
    argv += ["--processes", str(processes)]
    if swarm is not None:
        argv += ["--swarm-name", swarm]
    env = None if claim_store is None else {"BENCH_CLAIM_STORE": claim_store}
    return run(
        "tasks", url, *argv, timeout=180 + 2 * wait + lone * (1 + task_seconds), env_extra=env
    )


def _interleaved(s: Settings, rep: int) -> list[tuple[int, str]]:
    """Each swarm size with each rule, the rules' order turned at every repetition."""
    shift = rep % len(s.dispatches)
    rules = s.dispatches[shift:] + s.dispatches[:shift]
    return [(agents, rule) for agents in s.scale_agents for rule in rules]


def _scale_run(
    run: Runner, s: Settings, url: str, agents: int, dispatch: str, claim_store: str | None = None
) -> dict[str, Any]:
    """One run of the scale workload: ``--scale-tasks`` no-op tasks of every type."""
    return swarm_run(
        run,
        url,
        agents=agents,
        tasks=s.scale_tasks,
        lone=s.scale_lone,
        workload="all-types",
        dispatch=dispatch,
        claim_store=claim_store,
    )


def scale(run: Runner, s: Settings, url: str, step: Any) -> dict[str, Any]:
    """The all-types no-op workload at each swarm size (9 and 90 agents)."""
    runs = []
    for rep in range(s.reps):
        for agents, dispatch in _interleaved(s, rep):
            step(
                f"scale {rep + 1}/{s.reps}: {agents} agents ({dispatch}), {s.scale_tasks} no-op "
                "tasks, all types"
            )
            r = _scale_run(run, s, url, agents, dispatch)
            runs.append({"rep": rep + 1, "agents": agents, "dispatch": dispatch, **r})
    return {"tasks": s.scale_tasks, "agents": s.scale_agents, "reps": s.reps, "runs": runs}


def stores(run: Runner, s: Settings, url: str, step: Any) -> dict[str, Any]:
    """The scale workload (no-op tasks of every type) in dispatcher mode with each claim
    store (docs/stores.md): the broker's order, a private redis-server, a throw-away
    PostgreSQL database; each size with each store, the stores' order turned at every
    repetition. What deciding through a store costs."""
    from sheri_trio.stores import redact_url

    runs = []
    names = list(run.stores)
    for rep in range(s.reps):
        shift = rep % len(names)
        for agents in s.scale_agents:
            for name in names[shift:] + names[:shift]:
                step(f"stores {rep + 1}/{s.reps}: {agents} agents, claim store {name}")
                r = _scale_run(run, s, url, agents, "dispatcher", claim_store=run.stores[name])
                runs.append({"rep": rep + 1, "agents": agents, "store": name, **r})
    return {
        "tasks": s.scale_tasks,
        "agents": s.scale_agents,
        "reps": s.reps,
        "stores": {k: redact_url(v) for k, v in run.stores.items()},
        "runs": runs,
    }


def capacity(run: Runner, s: Settings, url: str, step: Any) -> dict[str, Any]:
    """Tasks of ``task_seconds`` (1 s): the rate grows with the slots, if dispatch scales."""
    runs = []
    for rep in range(s.reps):
        for agents, dispatch in _interleaved(s, rep):
            tasks = s.capacity_tasks_per_agent * agents
            step(
                f"capacity {rep + 1}/{s.reps}: {agents} agents ({dispatch}), {tasks} tasks of "
                f"{s.task_seconds} s"
            )
            r = swarm_run(
                run,
                url,
                agents=agents,
                tasks=tasks,
                lone=0,
                workload="all-types",
                dispatch=dispatch,
                task_seconds=s.task_seconds,
                max_tasks=s.capacity_max_tasks,
            )
            runs.append({"rep": rep + 1, "agents": agents, "dispatch": dispatch, **r})
    return {
        "task_seconds": s.task_seconds,
        "max_tasks": s.capacity_max_tasks,
        "tasks_per_agent": s.capacity_tasks_per_agent,
        "agents": s.scale_agents,
        "reps": s.reps,
        "runs": runs,
    }


def peers(run: Runner, s: Settings, url: str, step: Any) -> dict[str, Any]:
    """Our 9-agent swarm (all types, no-op) and each peer's 9 workers, interleaved."""
    ours = {("sheri-trio" if p == 1 else f"sheri-trio-{p}p"): p for p in s.our_processes}
    rows = [*ours, *s.peers]
    runs = []
    for rep in range(s.reps):
        shift = rep % len(rows)
        for row in rows[shift:] + rows[:shift]:
            step(f"peers {rep + 1}/{s.reps}: {row}, {s.peer_tasks} no-op tasks at once")
            if row in ours:
                r = swarm_run(
                    run,
                    url,
                    agents=s.peer_workers,
                    tasks=s.peer_tasks,
                    lone=s.lone_tasks,
                    workload="all-types",
                    dispatch=s.dispatch,
                    processes=ours[row],
                )
            else:
                argv = ["--peer", row, "--tasks", str(s.peer_tasks), "--lone", str(s.lone_tasks)]
                argv += ["--workers", str(s.peer_workers), "--timeout", str(60 + s.peer_tasks / 20)]
                r = run("peer", url, *argv, timeout=240 + s.peer_tasks / 10, mqtt=False)
            runs.append({"rep": rep + 1, "row": row, **r})
    return {
        "tasks": s.peer_tasks,
        "workers": s.peer_workers,
        "lone": s.lone_tasks,
        "reps": s.reps,
        "rows": rows,
        "dispatch": s.dispatch,
        "runs": runs,
    }


def memory(run: Runner, s: Settings, url: str, step: Any) -> dict[str, Any]:
    step("memory: 1, 100, 1,000 agents in one process (swarms of 9)")
    grouped = run("memory", url, "--counts", s.memory_counts, "--swarm-size", "9", timeout=600)
    step("memory: 1, 100 agents in one swarm")
    one = run("memory", url, "--counts", "1,100", "--swarm-size", "0", timeout=600)
    return {"swarms_of_9": grouped, "one_swarm": one}


def startup(run: Runner, s: Settings, url: str, step: Any) -> dict[str, Any]:
    step(f"start-up to online status ({s.startup_reps} runs each)")
    return run("startup", url, "--reps", str(s.startup_reps), "--timeout", "20", timeout=600)


def presence(run: Runner, s: Settings, url: str, step: Any) -> dict[str, Any]:
    """One swarm of each size started at once: time to online, idle presence traffic.
    Always with the dispatcher: broadcast's presence is n^2 by design (1,000 agents: 137 s
    to start, docs/operations.md), the scale section shows it at 90."""
    runs = []
    for rep in range(s.reps):
        for agents in s.presence_agents:
            step(f"presence {rep + 1}/{s.reps}: {agents} agents started at once")
            argv = ["--agents", str(agents), "--dispatch", "dispatcher", "--timeout", "120"]
            r = run("presence", url, *argv, timeout=600)
            runs.append({"rep": rep + 1, **r})
    return {"agents": s.presence_agents, "reps": s.reps, "dispatch": "dispatcher", "runs": runs}


def _dashboard_finished(port: int) -> float:
    """The outcomes the dashboard has counted (``sheri_tasks_finished`` on /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "sheri_tasks_finished"
        for sample in family.samples
        if sample.name == "sheri_tasks_finished_total"
    )


def dashboard(run: Runner, s: Settings, url: str, step: Any) -> dict[str, Any]:
    """``sheri dashboard`` following the biggest scale swarm's burst: whether it counted
    every outcome, how long after the last one, and its CPU per task."""
    agents = max(s.scale_agents)
    runs = []
    for rep in range(s.reps):
        step(f"dashboard {rep + 1}/{s.reps}: following {agents} agents, {s.scale_tasks} tasks")
        swarm = f"bench-dash-{time.monotonic_ns() % 10**9}"
        with tempfile.TemporaryDirectory(prefix="sheri-bench-dash-") as tmp:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            env = {**os.environ, "SHERI_BROKER": url, "SHERI_DASHBOARD_TOKEN": "bench"}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
            command = [sys.executable, "-m", "sheri_trio", "dashboard", "--swarm", swarm]
            command += ["--port", str(port), "--db", f"{tmp}/history.db"]
            proc = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                deadline = time.monotonic() + 30
                while True:  # up once /metrics answers
                    try:
                        _dashboard_finished(port)
                        break
                    except OSError:
                        if proc.poll() is not None or time.monotonic() > deadline:
                            err = proc.stderr.read().decode() if proc.stderr else ""
                            raise RuntimeError(
                                f"sheri dashboard did not start: {err[-400:]}"
                            ) from None
                        time.sleep(0.1)
                cpu0 = machine.process_cpu_s(proc.pid) or 0.0
                r = swarm_run(
                    run,
                    url,
                    agents=agents,
                    tasks=s.scale_tasks,
                    lone=0,
                    workload="all-types",
                    dispatch=s.dispatch,
                    swarm=swarm,
                )
                t_end = time.monotonic()
                seen = _dashboard_finished(port)
                while seen < r.get("completed", s.scale_tasks) and time.monotonic() < t_end + 60:
                    time.sleep(0.05)
                    seen = _dashboard_finished(port)
                lag = time.monotonic() - t_end
                cpu = (machine.process_cpu_s(proc.pid) or 0.0) - cpu0
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        runs.append(
            {
                "rep": rep + 1,
                "agents": agents,
                "tasks": s.scale_tasks,
                "swarm_tasks_per_s": r.get("tasks_per_s"),
                "completed": r.get("completed"),
                "dashboard_counted": seen,
                "dashboard_lag_s": round(lag, 3),
                "dashboard_cpu_s": round(cpu, 3),
                "dashboard_cpu_per_task_us": round(cpu * 1e6 / s.scale_tasks, 1),
            }
        )
    return {"agents": agents, "tasks": s.scale_tasks, "dispatch": s.dispatch, "runs": runs}


def retained(run: Runner, s: Settings, url: str, step: Any) -> dict[str, Any]:
    step(f"retained: an agent started next to {s.retained_records:,} finished tasks")
    argv = ["--records", str(s.retained_records), "--dispatch", s.dispatch, "--reps", "3"]
    return run("retained", url, *argv, timeout=900)


#: the sections that take the broker's TCP URL, in the order they run (after throughput
#: and latency, which take every URL)
ON_THE_BROKER: Final[dict[str, Callable[[Runner, Settings, str, Any], dict[str, Any]]]] = {
    "tasks": tasks,
    "scale": scale,
    "capacity": capacity,
    "peers": peers,
    "memory": memory,
    "startup": startup,
    "presence": presence,
    "retained": retained,
    "dashboard": dashboard,
    "stores": stores,
}


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
        "--scale-agents",
        default="9,90",
        help="scale, capacity: swarm sizes (comma-separated; default 9,90)",
    )
    p.add_argument("--scale-tasks", type=int, help="scale: no-op tasks per run")
    p.add_argument(
        "--capacity-tasks-per-agent",
        type=int,
        help="capacity: tasks per agent (each agent runs 4 at once; default 12, quick 4)",
    )
    p.add_argument(
        "--task-seconds", type=float, default=1.0, help="capacity: seconds each task sleeps"
    )
    p.add_argument(
        "--peers",
        default="celery-prefork,celery-threads,dramatiq,arq",
        help="peers: task queues to compare (bench/peers)",
    )
    p.add_argument("--peer-tasks", type=int, help="peers: tasks submitted at once")
    p.add_argument(
        "--presence-agents",
        help="presence: swarm sizes started at once (comma-separated; default 100,1000)",
    )
    p.add_argument(
        "--retained-records", type=int, help="retained: final task states left in the swarm"
    )
    p.add_argument(
        "--our-processes",
        help="peers: our swarm's rows, as processes its 9 agents are spread over "
        "(sheri swarm --processes; default 1,2: two rows)",
    )
    p.add_argument(
        "--dispatch",
        default="dispatcher,broadcast",
        help="the swarm's dispatch rule; a list (the default: dispatcher,broadcast): scale and "
        "capacity run each size with each, interleaved, the other sections the first",
    )
    p.add_argument(
        "--only",
        default="throughput,latency,tasks,scale,capacity,peers,memory,startup,presence,retained,"
        "dashboard,stores",
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
        if "peers" in sections and shutil.which("redis-server") is None:
            sections.discard("peers")
            results["skipped"] = {"peers": "redis-server not found (apt-get install redis-server)"}
            console.print("[yellow]peers skipped[/]: redis-server not found")
        if "peers" in sections and s.peers:
            from sheri_trio.testing import RedisServer

            with console.status("starting redis-server"):
                redis = RedisServer(Path(tmp.name) / "redis", password=True)
                brokers.append(redis)
                redis.start()
            # never on a command line (the server reads it from its config file)
            run.env["BENCH_REDIS_URL"] = redis.url(credentials=True)
            run.env["BENCH_REDIS_PID"] = str(redis.pid)
            results["redis"] = {
                "config": 'private redis-server on 127.0.0.1, save "", appendonly no, a password'
            }
        if "stores" in sections:
            from sheri_trio.testing import RedisServer

            from .postgres import throwaway_database

            with console.status("starting the claim stores"):
                store_redis = RedisServer(Path(tmp.name) / "store-redis")
                brokers.append(store_redis)
                store_redis.start()
                run.stores["redis"] = store_redis.url()
                database = throwaway_database()
                brokers.append(database)
                run.stores["postgresql"] = database.start()
            results["claim_stores"] = {
                "redis": 'private redis-server on 127.0.0.1, save "", appendonly no',
                "postgresql": "a throw-away database on the machine's server (127.0.0.1:5432)",
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
            for name, section in ON_THE_BROKER.items():
                if name in sections:
                    results[name] = section(run, s, urls["tcp"], step)
            progress.advance(bar)
            progress.update(bar, description="done")
    finally:
        for b in brokers:
            b.stop()
        tmp.cleanup()

    results["finished"] = machine.now_iso()
    results["duration_s"] = round(time.monotonic() - t_start, 1)
    results["load_average_end"] = machine.loadavg()
    derive(results)
    passed = results["check"]["passed"]
    native_q1 = results["check"]["value"]
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
