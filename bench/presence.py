"""Start-up and presence of one big swarm, and an agent started next to many finished tasks.

``swarm_presence``: n agents of one swarm (the nine roles in turn) started at once in this
process; the time until every one is online (``run_agent``'s ``task_status``: announced,
and in dispatch mode a dispatcher exists), then the broker's deliveries (``$SYS``, as in
bench/tasks.py) over a few heartbeat intervals of the idle swarm: presence, per interval
and per agent. Issue 10's targets: 1,000 agents online in <= 10 s, <= 3n deliveries per
heartbeat interval.

``retained_start``: ``records`` retained final task states left in the swarm (as a busy
day leaves them, each with its expiry), then one agent started next to them: the time
from its start to online.
"""

from __future__ import annotations

import json
import time
from typing import Any

import trio

from sheri_trio.executors import default_registry
from sheri_trio.mqtt import open_client
from sheri_trio.swarm import AgentConfig, Topics, run_agent

from .machine import raise_fd_limit
from .tasks import NINE_ROLES, SysCounter, dispatch_options


async def _clear_statuses(url: str, swarm: str, agent_ids: list[str]) -> None:
    """Leave no retained agent status behind."""
    topics = Topics(swarm)
    async with open_client(url, client_id=f"{swarm}-cleaner") as client:
        for i, agent_id in enumerate(agent_ids):
            last = i == len(agent_ids) - 1
            await client.publish(
                topics.agent_status(agent_id), b"", qos=1, retain=True, wait_ack=last
            )
        await client.publish(topics.dispatch_status, b"", qos=1, retain=True)
        await client.publish(topics.dispatch_view, b"", qos=1, retain=True)


async def swarm_presence(
    url: str,
    *,
    agents: int,
    dispatch: str,
    heartbeat_interval: float = 2.0,
    intervals: int = 3,
    start_timeout: float = 120.0,
) -> dict[str, Any]:
    swarm = f"bench-presence-{time.monotonic_ns() % 10**9}"
    fd_limit = raise_fd_limit(2 * agents + 64)
    registry = default_registry()
    options = dispatch_options(dispatch)
    ids = [f"{swarm}-{i}" for i in range(agents)]
    online_at: list[float] = []
    out: dict[str, Any] = {
        "agents": agents,
        "dispatch": dispatch,
        "heartbeat_interval": heartbeat_interval,
        "fd_limit": fd_limit,
    }
    async with (
        open_client(url, client_id=f"{swarm}-watch") as watcher,
        watcher.subscribe(*SysCounter.TOPICS, qos=0, retain_handling=2) as sys_msgs,
        trio.open_nursery() as nursery,
    ):
        counter = SysCounter()
        sys_scope = trio.CancelScope()

        async def follow() -> None:
            with sys_scope:
                await counter.run(sys_msgs)

        nursery.start_soon(follow)
        stop = trio.Event()
        everyone = trio.Event()

        async def one(i: int) -> None:
            cfg = AgentConfig(
                role=NINE_ROLES[i % len(NINE_ROLES)],
                agent_id=ids[i],
                swarm=swarm,
                broker=url,
                check_duplicate=False,
                heartbeat_interval=heartbeat_interval,
                lease_time=3 * heartbeat_interval,
                default_timeout=None,
                **options,
            )
            await nursery.start(
                lambda task_status: run_agent(
                    cfg, executors=registry, shutdown=stop, task_status=task_status
                )
            )
            online_at.append(time.perf_counter())
            if len(online_at) == agents:
                everyone.set()

        t0 = time.perf_counter()
        for i in range(agents):
            nursery.start_soon(one, i)
        with trio.move_on_after(start_timeout):
            await everyone.wait()
        out["online"] = len(online_at)
        out["start_s"] = round((max(online_at) if online_at else time.perf_counter()) - t0, 3)
        if online_at:
            online_at.sort()
            out["half_online_s"] = round(online_at[len(online_at) // 2] - t0, 3)
        if everyone.is_set():
            # the start's announcements drain, then a window of whole intervals
            await trio.sleep(heartbeat_interval)
            v0, t_begin, r0 = await counter.next_tick()
            while True:
                v1, t_end, r1 = await counter.next_tick()
                if t_end - t_begin >= intervals * heartbeat_interval:
                    break
            sent = v1 - v0 - (r1 - r0)  # without the $SYS messages we received
            per_interval = sent / (t_end - t_begin) * heartbeat_interval
            out.update(
                window_s=round(t_end - t_begin, 3),
                deliveries=sent,
                deliveries_per_interval=round(per_interval, 1),
                deliveries_per_interval_per_agent=round(per_interval / agents, 2),
            )
        sys_scope.cancel()
        t_stop = time.perf_counter()
        stop.set()
    out["stop_s"] = round(time.perf_counter() - t_stop, 3)
    await _clear_statuses(url, swarm, ids)
    return out


async def retained_start(
    url: str, *, records: int, dispatch: str, expiry: int = 900, reps: int = 3
) -> dict[str, Any]:
    """``records`` final task states retained in the swarm, then an agent started ``reps``
    times next to them (a new agent id each time): seconds from start to online."""
    swarm = f"bench-retained-{time.monotonic_ns() % 10**9}"
    topics = Topics(swarm)
    registry = default_registry()
    options = dispatch_options(dispatch)
    t_fill = time.perf_counter()
    async with open_client(url, client_id=f"{swarm}-filler") as client:
        for i in range(records):
            task_id = f"done-{i}"
            body = {
                "payload": {
                    "task_id": task_id,
                    "state": "completed",
                    "attempt": 1,
                    "agent_id": "someone",
                    "type": "testing.run",
                }
            }
            await client.publish(
                topics.task_state(task_id),
                json.dumps(body).encode(),
                qos=1,
                retain=True,
                message_expiry_interval=expiry,
                wait_ack=i == records - 1,
            )
    fill_s = time.perf_counter() - t_fill
    times: list[float] = []
    ids: list[str] = []
    for rep in range(reps):
        agent_id = f"{swarm}-{rep}"
        ids.append(agent_id)
        cfg = AgentConfig(
            role="general",
            agent_id=agent_id,
            swarm=swarm,
            broker=url,
            check_duplicate=False,
            default_timeout=None,
            **options,
        )
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            t0 = time.perf_counter()
            with trio.fail_after(120):
                await nursery.start(
                    lambda task_status, cfg=cfg, stop=stop: run_agent(
                        cfg, executors=registry, shutdown=stop, task_status=task_status
                    )
                )
            times.append(time.perf_counter() - t0)
            stop.set()
    # the records expire by themselves; clear them now so the broker is left as found
    async with open_client(url, client_id=f"{swarm}-cleaner") as client:
        for i in range(records):
            await client.publish(
                topics.task_state(f"done-{i}"), b"", qos=1, retain=True, wait_ack=i == records - 1
            )
    await _clear_statuses(url, swarm, ids)
    times.sort()
    return {
        "records": records,
        "dispatch": dispatch,
        "fill_s": round(fill_s, 2),
        "online_s": [round(t, 3) for t in times],
        "online_s_median": round(times[len(times) // 2], 3),
    }
