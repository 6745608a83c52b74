"""End-to-end task rate: K agents in one process, M tasks, through a real broker.

Two workloads: ``unknown`` (one task type no role knows, so only general agents take it:
the original task-rate row) and ``all-types`` (the tasks cycle over every type of
``TASK_ROLES``, each with a no-op executor, so every role takes part). ``task_seconds``
makes each execution sleep that long (the capacity row). ``dispatch`` is the swarm's
dispatch rule, passed to :class:`AgentConfig` once it has the option (issue 10); today
every swarm uses the broadcast rule.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import trio

from sheri_trio.executors import ExecutorRegistry, TaskContext
from sheri_trio.mqtt import open_client
from sheri_trio.stores import StoreConfig, parse_store_url
from sheri_trio.swarm import DISPATCH_MODES, TASK_ROLES, Agent, AgentConfig, run_agent

from .machine import process_cpu_s

NINE_ROLES = [
    "general",
    "deployment",
    "testing",
    "review",
    "security",
    "monitoring",
    "documentation",
    "database",
    "general",
]

WORKLOADS = ("unknown", "all-types")
ALL_TYPES = sorted(TASK_ROLES)  # the 13 types of the prototype's table
SYS_SENT = "$SYS/broker/publish/messages/sent"  # PUBLISH packets the broker sent to clients


def dispatch_options(dispatch: str) -> dict[str, Any]:
    """The AgentConfig keywords that select ``dispatch``."""
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"dispatch: must be one of {', '.join(DISPATCH_MODES)}, got {dispatch!r}")
    return {"dispatch": dispatch}


def task_types(workload: str) -> list[str]:
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}: choose one of {', '.join(WORKLOADS)}")
    return ["bench.noop"] if workload == "unknown" else ALL_TYPES


class SysCounter:
    """The broker's count of PUBLISH packets sent (``$SYS``, republished at every tick of
    ``sys_interval``: every 2 s with mosquitto 2.0.11's ``sys_interval 1``), followed in
    the background.

    Subscribed with ``$SYS/broker/uptime`` too, which changes at every tick: so the count
    changes (by our own copy of the uptime) and is republished at every tick even when
    the swarm is idle. :meth:`next_tick` waits for the first republication after the
    call and returns ``(count, arrival time, messages this subscription received so
    far)``: between two ticks, the broker sent ``count1 - count0`` packets, of which
    ``received1 - received0`` went to this subscription (exact to one message).
    """

    TOPICS = (SYS_SENT, "$SYS/broker/uptime")

    def __init__(self) -> None:
        self.received = 0
        self.latest: tuple[int, float, int] | None = None
        self._tick = trio.Event()

    async def run(self, messages: Any) -> None:
        async for m in messages:
            self.received += 1
            if m.topic == SYS_SENT:
                self.latest = (int(m.payload), time.perf_counter(), self.received)
                self._tick.set()
                self._tick = trio.Event()

    async def next_tick(self) -> tuple[int, float, int]:
        await self._tick.wait()
        assert self.latest is not None
        return self.latest

    async def wait_quiet(self, limit: float) -> dict[str, Any]:
        """Wait for a tick interval in which the broker sent at most ``limit`` packets per
        second to others; returns that interval's last tick and its rate."""
        t_begin = time.perf_counter()
        v0, t0, r0 = await self.next_tick()
        while True:
            v, t, r = await self.next_tick()
            rate = (v - v0 - (r - r0)) / (t - t0)
            if rate <= limit:
                return {
                    "tick": (v, t, r),
                    "rate": round(rate, 1),
                    "waited_s": round(t - t_begin, 2),
                }
            v0, t0, r0 = v, t, r


def _registry(executions: Counter[str], task_seconds: float) -> ExecutorRegistry:
    async def noop(ctx: TaskContext) -> dict[str, Any]:
        executions[ctx.task_id] += 1
        if task_seconds:
            await trio.sleep(task_seconds)
        return {}

    registry = ExecutorRegistry({t: noop for t in ALL_TYPES})
    registry.fallback = noop
    return registry


def claim_store() -> StoreConfig:
    """The agents' claim store: ``$BENCH_CLAIM_STORE`` (a URL without a password, as
    ``--claim-store`` takes it: the bench's stores section), else the broker's order."""
    url = os.environ.get("BENCH_CLAIM_STORE", "broker")
    return parse_store_url(url, source="env")


def _agent_config(
    url: str, swarm: str, i: int, agents: int, max_tasks: int, dispatch: str
) -> AgentConfig:
    role = NINE_ROLES[i % len(NINE_ROLES)]
    return AgentConfig(
        store=claim_store(),
        role=role,
        agent_id=f"{swarm}-{role}-{i}",
        swarm=swarm,
        broker=url,
        max_tasks=max_tasks,
        check_duplicate=False,
        default_timeout=None,
        state_retention=600,  # retained task states expire 10 minutes after the run
        **dispatch_options(dispatch),
    )


async def _start_agents(
    nursery: trio.Nursery,
    configs: list[AgentConfig],
    registry: ExecutorRegistry,
    stop: trio.Event,
) -> list[Agent]:
    running: list[Agent] = []
    for cfg in configs:
        running.append(
            await nursery.start(
                lambda task_status, cfg=cfg: run_agent(
                    cfg, executors=registry, shutdown=stop, task_status=task_status
                )
            )
        )
    return running


async def _read_lines(stream: trio.abc.ReceiveStream) -> Any:
    buffer = b""
    while True:
        chunk = await stream.receive_some()
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode()


async def run_share(
    url: str,
    swarm: str,
    indices: list[int],
    *,
    agents: int,
    max_tasks: int,
    task_seconds: float,
    dispatch: str,
) -> None:
    """One share of a bench swarm in a child process (``python -m bench.clients share``):
    prints ``online`` once its agents are; then each ``stat`` line on stdin is answered
    with this process's CPU time and its agents' deliveries; at stdin's end the agents
    leave and their executions per task are printed (JSON), as the last line."""
    executions: Counter[str] = Counter()
    registry = _registry(executions, task_seconds)
    configs = [_agent_config(url, swarm, i, agents, max_tasks, dispatch) for i in indices]
    stdin = trio.lowlevel.FdStream(os.dup(0))
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        running = await _start_agents(nursery, configs, registry, stop)
        print("online", flush=True)
        async for line in _read_lines(stdin):
            if line == "stat":
                received = sum(a.client.statistics()["messages_received"] for a in running)
                print(json.dumps({"cpu_s": time.process_time(), "received": received}), flush=True)
        stop.set()
    print(json.dumps({"executions": dict(executions)}), flush=True)


class _Share:
    """The parent's side of one :func:`run_share` child."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        assert proc.stdout is not None
        assert proc.stdin is not None
        self._lines = _read_lines(proc.stdout)
        self.stdin = proc.stdin

    async def line(self) -> str:
        line: str = await self._lines.__anext__()
        return line

    async def stat(self) -> dict[str, Any]:
        await self.stdin.send_all(b"stat\n")
        result: dict[str, Any] = json.loads(await self.line())
        return result

    async def finish(self) -> dict[str, int]:
        await self.stdin.aclose()
        last = ""
        async for line in self._lines:
            last = line
        await self.proc.wait()
        executions: dict[str, int] = json.loads(last)["executions"]
        return executions


async def _start_share(url: str, argv: list[str]) -> _Share:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "bench.clients", "share", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "BENCH_URL": url},
    )
    share = _Share(proc)
    if await share.line() != "online":
        raise RuntimeError("a share of the bench swarm did not come online")
    return share


async def task_rate(
    url: str,
    *,
    agents: int = 9,
    tasks: int = 2000,
    max_tasks: int = 16,
    max_wait: float | None = None,
    lone: int = 0,
    workload: str = "unknown",
    task_seconds: float = 0.0,
    dispatch: str = "broadcast",
    broker_pid: int | None = None,
    count_at_broker: bool = True,
    settle_max: float = 30.0,
    processes: int = 1,
    swarm: str | None = None,
) -> dict[str, Any]:
    """Submit ``tasks`` tasks of ``workload`` at once, wait for every outcome.

    With ``max_wait`` (seconds from the first submission), waiting for outcomes stops
    then and the tasks without one are counted as lost. Then, with ``lone``, that many
    more tasks one at a time, each submitted when the previous one completed: the
    latency of a task in an idle swarm (submission to ``tasks/complete`` at the
    submitter), which the burst's latencies (mostly queueing) do not show.

    With ``count_at_broker``, the broker's own count of deliveries (``$SYS``: the bench's
    mosquitto has ``sys_interval 1``) is read at the end of a quiet tick interval right
    before the first submission and at the end of the first quiet one after the last
    outcome: every delivery of the burst, presence included. The burst starts once the
    swarm's start-up traffic has drained (an interval with no more than twice the idle
    presence traffic; at most ``settle_max`` seconds of waiting). With ``broker_pid`` (a
    local broker), its CPU time over the same window is read from ``/proc``; the agents'
    (and the submitter's) is this process's.
    """
    swarm = swarm or f"bench-{time.monotonic_ns() % 10**9}"
    types = task_types(workload)
    # Idle traffic: every agent's heartbeat (every 10 s) reaches every agent, plus slack.
    idle_limit = 2 * agents * agents / AgentConfig().heartbeat_interval + 20
    dispatch_options(dispatch)  # refused before anything starts
    executions: Counter[str] = Counter()
    registry = _registry(executions, task_seconds)
    roles = [NINE_ROLES[i % len(NINE_ROLES)] for i in range(agents)]
    missing = {r for t in types for r in TASK_ROLES.get(t, ("general",))} - set(roles)
    if missing:  # their tasks would wait for ever
        raise ValueError(f"{workload}: no agent of role {', '.join(sorted(missing))}")
    submitted: dict[str, float] = {}
    latencies: list[float] = []
    lone_latencies: list[float] = []
    finals: Counter[str] = Counter()
    running: list[Agent] = []
    at_broker: dict[str, Any] = {}
    shares: list[_Share] = []
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        # the agents in turn over the processes: this one runs share 0
        for k in range(1, processes):
            argv = ["--swarm", swarm, "--agents", str(agents), "--max-tasks", str(max_tasks)]
            argv += ["--task-seconds", str(task_seconds), "--dispatch", dispatch]
            argv += ["--indices", ",".join(str(i) for i in range(k, agents, processes))]
            shares.append(await _start_share(url, argv))
        mine = [
            _agent_config(url, swarm, i, agents, max_tasks, dispatch)
            for i in range(0, agents, processes)
        ]
        running = await _start_agents(nursery, mine, registry, stop)
        async with (
            open_client(url, client_id=f"{swarm}-submitter") as client,
            client.subscribe(f"{swarm}/tasks/complete", f"{swarm}/tasks/failed") as msgs,
            client.subscribe(*SysCounter.TOPICS, qos=0, retain_handling=2) as sys_msgs,
        ):
            sys_counter = SysCounter()
            sys_scope = trio.CancelScope()

            async def follow_sys() -> None:
                with sys_scope:
                    await sys_counter.run(sys_msgs)

            nursery.start_soon(follow_sys)
            if count_at_broker:
                # Start once the swarm's start-up traffic has drained (presence of n agents
                # announcing themselves to n agents), at a tick of the broker's counter.
                with trio.move_on_after(settle_max):
                    at_broker["start"] = await sys_counter.wait_quiet(idle_limit)
            base = [a.client.statistics()["messages_received"] for a in running]
            share_base = [await share.stat() for share in shares]
            cpu0, broker0 = time.process_time(), process_cpu_s(broker_pid)
            t0 = time.perf_counter()

            async def submit() -> None:
                for i in range(tasks):
                    task_id = f"b-{i}"
                    submitted[task_id] = time.perf_counter()
                    body = {"payload": {"task_id": task_id, "type": types[i % len(types)]}}
                    await client.publish(
                        f"{swarm}/tasks/new", json.dumps(body).encode(), qos=1, wait_ack=False
                    )

            nursery.start_soon(submit)
            with trio.move_on_after(max_wait if max_wait is not None else math.inf):
                while len(finals) < tasks:
                    m = await msgs.receive()
                    task_id = json.loads(m.payload)["payload"]["task_id"]
                    if task_id not in finals:
                        latencies.append(time.perf_counter() - submitted[task_id])
                    finals[task_id] += 1
            elapsed = time.perf_counter() - t0
            if "start" in at_broker:
                # The end: the broker has delivered the burst's last messages to every agent
                # (it may lag behind the submitter's last outcome), the traffic is idle again.
                with trio.move_on_after(settle_max):
                    at_broker["end"] = await sys_counter.wait_quiet(idle_limit)
            cpu = time.process_time() - cpu0
            broker1 = process_cpu_s(broker_pid)
            received = sum(
                a.client.statistics()["messages_received"] - b
                for a, b in zip(running, base, strict=True)
            )
            for share, before in zip(shares, share_base, strict=True):
                after = await share.stat()
                cpu += after["cpu_s"] - before["cpu_s"]
                received += after["received"] - before["received"]
            for i in range(lone if len(finals) == tasks else 0):
                task_id = f"lone-{i}"
                body = {"payload": {"task_id": task_id, "type": types[i % len(types)]}}
                sent = time.perf_counter()
                await client.publish(f"{swarm}/tasks/new", json.dumps(body).encode(), qos=1)
                with trio.fail_after(10 + task_seconds):
                    while True:
                        m = await msgs.receive()
                        if json.loads(m.payload)["payload"]["task_id"] == task_id:
                            break
                lone_latencies.append(time.perf_counter() - sent)
            sys_scope.cancel()
        stop.set()
        for share in shares:
            executions.update(await share.finish())
    # Leave no retained agent status behind (task states expire by themselves).
    async with open_client(url, client_id=f"{swarm}-cleaner") as client:
        for i in range(agents):
            cfg = _agent_config(url, swarm, i, agents, max_tasks, dispatch)
            status = running[0].topics.agent_status(cfg.agent_id)
            await client.publish(status, b"", qos=1, retain=True)
    latencies.sort() if latencies else latencies.append(math.nan)
    deliveries = received + len(finals)  # the agents' deliveries plus the submitter's outcomes
    out: dict[str, Any] = {
        "agents": agents,
        "processes": processes,
        "roles": dict(Counter(roles)),
        "workload": workload,
        "types": len(types),
        "task_seconds": task_seconds,
        "max_tasks": max_tasks,
        "dispatch": dispatch,
        "tasks": tasks,
        "completed": len(finals),
        "seconds": round(elapsed, 3),
        "tasks_per_s": round(len(finals) / elapsed, 1),
        "latency_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "latency_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        "duplicates": sum(n - 1 for n in executions.values() if n > 1)
        + sum(n - 1 for n in finals.values() if n > 1),
        "losses": tasks - min(len(executions), len(finals)),
        "deliveries_per_task": round(deliveries / tasks, 2),
        "agents_cpu_s": round(cpu, 3),
        "agents_cpu_per_task_us": round(cpu * 1e6 / tasks, 1),
        **_lone_summary(lone_latencies),
    }
    if broker0 is not None and broker1 is not None:
        out["broker_burst_cpu_s"] = round(broker1 - broker0, 3)
        out["broker_cpu_per_task_us"] = round((broker1 - broker0) * 1e6 / tasks, 1)
    if "end" in at_broker:
        start, end = at_broker["start"], at_broker["end"]
        (v0, t_start, r0), (v1, t_end, r1) = start["tick"], end["tick"]
        sent_by_broker = v1 - v0 - (r1 - r0)  # without the $SYS messages we received
        out.update(
            broker_deliveries=sent_by_broker,
            broker_deliveries_per_task=round(sent_by_broker / tasks, 2),
            # from a quiet tick before the first submission to the first quiet one after
            # the burst: the burst, its drain and up to one idle tick interval at each end
            broker_count_window_s=round(t_end - t_start, 3),
            broker_idle_deliveries_per_s=start["rate"],
            settle_s=start["waited_s"],
            drain_s=round(t_end - t0 - elapsed, 3),
        )
    return out


def _lone_summary(latencies: list[float]) -> dict[str, Any]:
    if not latencies:
        return {}
    latencies.sort()
    return {
        "lone_tasks": len(latencies),
        "lone_latency_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "lone_latency_p99_ms": round(latencies[max(int(len(latencies) * 0.99) - 1, 0)] * 1000, 2),
    }
