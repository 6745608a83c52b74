"""The agent's timing and decisions, on the in-memory bus under an autojump clock.

Every test runs agents over :class:`sheri_trio.testing.MemoryBus` with
``MockClock(autojump_threshold=0)`` (pytest-trio's ``autojump_clock``): virtual time
runs on to the next deadline whenever every task waits, so heartbeats, leases,
backoffs and timeouts take no real time and their instants are exact. Configured
periods are dyadic (1, 2.5, 0.5, ...) so the expected times are exact floats too.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from sheri_trio.executors import ExecutorRegistry, TaskContext, TaskPayloadError
from sheri_trio.mqtt import ClientClosed, Will
from sheri_trio.swarm._agent import Agent, AgentConfig, rendezvous_score
from sheri_trio.swarm._claims import ClaimBook
from sheri_trio.swarm._messages import encode
from sheri_trio.swarm._protocol import (
    BadMessage,
    Claim,
    Outcome,
    Topics,
    decode_envelope,
    parse_claim,
    parse_outcome,
)
from sheri_trio.testing import BusRecord, MemoryBus, MemoryClient

if TYPE_CHECKING:
    from collections.abc import Callable


SWARM = "t"
T = Topics(SWARM)


# --------------------------------------------------------------------- helpers
@dataclass
class Call:
    agent_id: str
    task_id: str
    attempt: int
    try_number: int
    start: float
    end: float | None = None
    outcome: str = "running"


class Script:
    """One executor for every task type, driven by the task's payload.

    ``hang`` (bool): sleep forever; ``hang_on`` (agent ids): sleep forever on those;
    ``gate`` (name): wait until ``script.gate(name)`` is set; ``sleep`` (seconds);
    ``fail`` (n): raise on tries 1..n; ``invalid``: raise TaskPayloadError.
    """

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._gates: dict[str, trio.Event] = {}
        self.registry = ExecutorRegistry()
        self.registry.fallback = self

    def gate(self, name: str) -> trio.Event:
        return self._gates.setdefault(name, trio.Event())

    def calls_for(self, task_id: str) -> list[Call]:
        return [c for c in self.calls if c.task_id == task_id]

    async def __call__(self, ctx: TaskContext) -> dict[str, Any]:
        call = Call(ctx.agent_id, ctx.task_id, ctx.attempt, ctx.try_number, trio.current_time())
        self.calls.append(call)
        p = ctx.payload if isinstance(ctx.payload, dict) else {}
        try:
            if p.get("hang") or ctx.agent_id in p.get("hang_on", ()):
                await trio.sleep_forever()
            if "gate" in p:
                await self.gate(p["gate"]).wait()
            if p.get("sleep"):
                await trio.sleep(p["sleep"])
            if p.get("invalid"):
                raise TaskPayloadError("payload refused by the executor")
            if ctx.try_number <= p.get("fail", 0):
                raise RuntimeError(f"failure on try {ctx.try_number}")
        except BaseException as exc:
            call.outcome = type(exc).__name__
            raise
        finally:
            call.end = trio.current_time()
        call.outcome = "ok"
        return {"ok": True, "by": ctx.agent_id}


def cfg(agent_id: str, role: str = "testing", **kw: Any) -> AgentConfig:
    options: dict[str, Any] = {
        "swarm": SWARM,
        "heartbeat_interval": 10.0,
        "lease_time": 30.0,
        "grace_period": 10.0,
        "max_retries": 3,
        "retry_initial_delay": 1.0,
        "retry_max_delay": 60.0,
        "check_duplicate": False,
        # The broadcast rule (claims in the bus's order, the peer table, preference
        # windows), pinned: the default, dispatcher mode, needs an elected dispatcher,
        # whose candidate opens a real connection with a persistent session (queued while
        # nobody serves, unacked messages redelivered), which the MemoryBus does not have.
        # Dispatcher mode runs these behaviours on a real mosquitto (tests/test_agent.py,
        # tests/test_dispatch_e2e.py); its agent side is tested at the end of this file,
        # the test playing the dispatcher.
        "dispatch": "broadcast",
    }
    options.update(kw)
    return AgentConfig(role=role, agent_id=agent_id, **options)


def agent_will(config: AgentConfig) -> Will:
    """The will ``agent_connection`` gives an agent's real connection."""
    payload = {
        "agent_id": config.agent_id,
        "role": config.role,
        "status": "offline",
        "reason": "connection lost",
    }
    return Will(
        Topics(config.swarm).agent_status(config.agent_id),
        encode(config.agent_id, config.role, payload),
        qos=1,
        retain=True,
    )


@dataclass
class Hosted:
    agent: Agent
    client: MemoryClient
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    finished: trio.Event = field(default_factory=trio.Event)

    def crash(self) -> None:
        """Lose the connection (the will goes out, if any) and stop the agent's code."""
        self.client.kill()
        self.scope.cancel()


async def host(
    bus: MemoryBus,
    config: AgentConfig,
    script: Script,
    *,
    will: Will | None = None,
    task_status: trio.TaskStatus[Hosted] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one agent on its own client; a crash (``Hosted.crash``) ends it quietly."""
    client = bus.open(config.agent_id, will=will)
    hosted = Hosted(Agent(config, client, executors=script.registry), client)
    try:
        with hosted.scope:
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(hosted.agent.run)
                    task_status.started(hosted)
            except* ClientClosed:
                if not client.killed:
                    raise
    finally:
        hosted.finished.set()
        await client.aclose()


async def start(
    nursery: trio.Nursery,
    bus: MemoryBus,
    config: AgentConfig,
    script: Script,
    *,
    will: Will | None = None,
) -> Hosted:
    hosted: Hosted = await nursery.start(
        lambda task_status: host(bus, config, script, will=will, task_status=task_status)
    )
    return hosted


def submission(task_id: str, task_type: str = "testing.run", **fields: Any) -> bytes:
    """A task as the prototype's ``mosquitto_pub`` sends it: no agent_id, no role."""
    body = {"task_id": task_id, "type": task_type, "payload": {}, **fields}
    return json.dumps(
        {"id": f"msg_{task_id[:40]}", "timestamp": "2026-02-22T20:00:00Z", "payload": body}
    ).encode()


async def submit(
    client: MemoryClient, task_id: str, task_type: str = "testing.run", **fields: Any
) -> None:
    await client.publish(T.tasks_new, submission(task_id, task_type, **fields), qos=1)


async def run_burst(
    bus: MemoryBus, client: MemoryClient, task_ids: list[str], **fields: Any
) -> None:
    """Submit every task at once, then wait until each has completed."""
    for task_id in task_ids:
        await submit(client, task_id, **fields)
    for task_id in task_ids:
        await wait(bus, T.tasks_complete, task_id=task_id)


def body(record: BusRecord) -> dict[str, Any]:
    payload: dict[str, Any] = record.json()["payload"]
    return payload


def on(topic: str, bus: MemoryBus, **match: Any) -> list[BusRecord]:
    """The recorded messages on ``topic`` whose payload has every field of ``match``."""
    return [r for r in bus.records(topic) if all(body(r).get(k) == v for k, v in match.items())]


def waiting(**match: Any) -> Callable[[BusRecord], bool]:
    def predicate(record: BusRecord) -> bool:
        try:
            payload = body(record)
        except (ValueError, KeyError, TypeError):
            return False
        return all(payload.get(k) == v for k, v in match.items())

    return predicate


async def wait(bus: MemoryBus, topic: str, **match: Any) -> BusRecord:
    return await bus.wait_for(topic, waiting(**match))


def accepted_outcomes(bus: MemoryBus) -> dict[str, dict[str, Any]]:
    """Replay the bus through a fresh ClaimBook: what any late observer accepts."""
    book = ClaimBook()
    accepted: dict[str, dict[str, Any]] = {}
    for record in bus.records(f"{SWARM}/tasks/+"):
        try:
            env = decode_envelope(record.payload)
            if record.topic == T.tasks_assigned:
                book.observe_claim(parse_claim(env), record.time)
            elif record.topic in (T.tasks_complete, T.tasks_failed):
                outcome = parse_outcome(env, success=record.topic == T.tasks_complete)
                if book.observe_outcome(outcome):
                    accepted[outcome.task_id] = {"time": record.time, **outcome.payload}
        except BadMessage:
            continue
    return accepted


async def blocker(bus: MemoryBus, watcher: MemoryClient, agent_id: str, seconds: float) -> None:
    """Keep ``agent_id`` (max_tasks=1) busy for ``seconds`` from now, so others win claims."""
    task_id = f"block-{agent_id}"
    await submit(watcher, task_id, assigned_to=agent_id, payload={"sleep": seconds})
    await wait(bus, T.tasks_progress, task_id=task_id, event="start")


@pytest.fixture
def bus() -> MemoryBus:
    return MemoryBus()


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def fixed_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retry backoff without jitter: ``random.uniform(a, b)`` returns ``b``."""
    monkeypatch.setattr(random, "uniform", lambda a, b: b)


# ------------------------------------------------------------------- presence
async def test_heartbeat_schedule_and_fields(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await trio.sleep(3)  # the schedule follows the agent's start, not time zero
            a = await start(nursery, bus, cfg("hb", max_tasks=1, heartbeat_interval=10), script)
            t0 = a.agent.started_at
            assert t0 == 3.0
            await submit(watcher, "hb-1", payload={"sleep": 25})
            await wait(bus, T.tasks_progress, task_id="hb-1", event="start")
            await submit(watcher, "hb-2", payload={"sleep": 25})
            await wait(bus, T.agents_heartbeat, uptime=30.0)
            nursery.cancel_scope.cancel()
    beats = bus.records(T.agents_heartbeat)
    assert [r.time for r in beats] == [t0 + 10, t0 + 20, t0 + 30]
    for record, uptime, running, queued in zip(
        beats, (10.0, 20.0, 30.0), (["hb-1"], ["hb-1"], ["hb-2"]), (1, 1, 0), strict=True
    ):
        env = record.json()
        assert (env["agent_id"], env["role"]) == ("hb", "testing")
        p = env["payload"]
        assert p["status"] == "alive"
        assert p["agent_id"] == "hb"
        assert p["uptime"] == uptime
        assert p["running"] == running
        assert p["running_tasks"] == len(running)
        assert p["capacity"] == 1
        assert p["queued"] == queued
        assert type(p["memory"]["rss"]) is int
        assert p["memory"]["rss"] > 0


@pytest.mark.parametrize("agents", [1, 4])
async def test_register_only_after_subscriptions_are_in_place(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script, agents: int
) -> None:
    """A task sent the instant a register is seen is never missed."""
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            async with watcher.subscribe(T.agents_register) as registers:
                for i in range(agents):
                    nursery.start_soon(host, bus, cfg(f"r{i}"), script)
                for _ in range(agents):
                    message = await registers.receive()
                    agent_id = json.loads(message.payload)["payload"]["agent_id"]
                    assert agent_id in bus.subscribers(T.tasks_new)
                    await submit(watcher, f"after-{agent_id}", assigned_to=agent_id)
            for i in range(agents):
                await wait(bus, T.tasks_complete, task_id=f"after-r{i}", agent_id=f"r{i}")
            nursery.cancel_scope.cancel()
    # retained online status first, then the register
    status = bus.records(T.agent_status("r0"))[0]
    register = on(T.agents_register, bus, agent_id="r0")[0]
    assert bus.history.index(status) < bus.history.index(register)
    assert status.retain
    assert body(status)["status"] == "online"


# -------------------------------------------------------------------- leases
LEASE = {"heartbeat_interval": 3.0, "lease_time": 10.0}


def first_lease_check_at_or_after(started: float, lease_time: float, instant: float) -> float:
    """The lease loop sleeps lease_time/4 in a loop from the agent's start."""
    period = lease_time / 4
    check = started + period
    while check < instant:
        check += period
    return check


async def test_silent_holder_is_taken_over_at_the_first_lease_check_after_expiry(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            config_a = cfg("A", **LEASE)
            config_b = cfg("B", max_tasks=1, **LEASE)
            a = await start(nursery, bus, config_a, script)  # no will: a silent death
            b = await start(nursery, bus, config_b, script)
            await blocker(bus, watcher, "B", 1)
            await submit(watcher, "lease-1", payload={"hang_on": ["A"], "gate": "lease-1"})
            first = await wait(bus, T.tasks_assigned, task_id="lease-1")
            assert (body(first)["agent_id"], body(first)["attempt"]) == ("A", 1)

            await trio.sleep_until(7.0)
            a.crash()  # no will, no heartbeat from now on
            last_beat = on(T.agents_heartbeat, bus, agent_id="A")[-1].time
            assert last_beat == 6.0
            expected = first_lease_check_at_or_after(
                b.agent.started_at, config_b.lease_time, last_beat + config_b.lease_time
            )
            assert expected == 17.5

            takeover = await wait(bus, T.tasks_assigned, task_id="lease-1", attempt=2)
            assert takeover.time == expected
            assert body(takeover)["agent_id"] == "B"
            await wait(bus, T.tasks_progress, task_id="lease-1", agent_id="B", event="start")

            # The old holder's late result arrives while B runs attempt 2: fenced off.
            late = encode(
                "A",
                "testing",
                {"task_id": "lease-1", "agent_id": "A", "status": "success", "attempt": 1},
            )
            await watcher.publish(T.tasks_complete, late, qos=1)
            await trio.sleep(1)
            assert list(b.agent.scheduler.running) == ["lease-1"]
            holder = b.agent.book.holder("lease-1")
            assert holder is not None
            assert (holder.agent_id, holder.attempt) == ("B", 2)
            assert not b.agent.book.is_finished("lease-1")

            script.gate("lease-1").set()
            done = await wait(bus, T.tasks_complete, task_id="lease-1", agent_id="B")
            assert body(done)["attempt"] == 2
            assert b.agent.book.is_finished("lease-1")

            # ... and once more after the end: nothing changes.
            counters = dict(b.agent.counters)
            published = len(bus.history)
            await watcher.publish(T.tasks_complete, late, qos=1)
            await trio.sleep(1)
            assert b.agent.book.is_finished("lease-1")
            assert b.agent.counters == counters
            assert len(bus.history) == published + 1  # only the fake itself
            nursery.cancel_scope.cancel()
    accepted = accepted_outcomes(bus)["lease-1"]
    assert (accepted["agent_id"], accepted["attempt"]) == ("B", 2)
    assert [(c.agent_id, c.attempt, c.outcome) for c in script.calls_for("lease-1")] == [
        ("A", 1, "Cancelled"),
        ("B", 2, "ok"),
    ]


def test_claim_book_fences_an_outcome_of_an_older_attempt() -> None:
    book = ClaimBook()
    book.observe_claim(Claim("t1", "A", 1, "testing"), 0.0)
    book.observe_claim(Claim("t1", "B", 2, "testing"), 17.5)
    assert not book.observe_outcome(Outcome("t1", "A", 1, True, {}))
    assert not book.is_finished("t1")
    holder = book.holder("t1")
    assert holder is not None
    assert (holder.agent_id, holder.attempt) == ("B", 2)
    assert book.observe_outcome(Outcome("t1", "B", 2, True, {}))
    assert book.is_finished("t1")
    assert not book.observe_outcome(Outcome("t1", "A", 1, True, {}))
    assert not book.observe_outcome(Outcome("t1", "B", 2, False, {}))  # duplicate


async def test_holder_killed_with_its_will_is_offline_at_once_and_taken_over_at_its_lease(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    """A will is no takeover (mosquitto publishes every will when the broker stops, so
    a broker's restart looks the same): the holder is offline at once, its task taken
    over when its lease runs out, as a silent holder's."""
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            config_a = cfg("A", **LEASE)
            config_b = cfg("B", max_tasks=1, **LEASE)
            a = await start(nursery, bus, config_a, script, will=agent_will(config_a))
            b = await start(nursery, bus, config_b, script)
            await blocker(bus, watcher, "B", 1)
            await submit(watcher, "will-1", payload={"hang_on": ["A"]})
            await wait(bus, T.tasks_assigned, task_id="will-1", agent_id="A")

            await trio.sleep_until(7.25)  # between A's heartbeats and B's lease checks
            a.crash()
            will = bus.history[-1]
            assert will.will
            assert will.topic == T.agent_status("A")
            assert body(will)["status"] == "offline"

            last_beat = on(T.agents_heartbeat, bus, agent_id="A")[-1].time
            expected = first_lease_check_at_or_after(
                b.agent.started_at, config_b.lease_time, last_beat + config_b.lease_time
            )
            takeover = await wait(bus, T.tasks_assigned, task_id="will-1", attempt=2)
            assert takeover.time == expected == 17.5
            assert body(takeover)["agent_id"] == "B"
            done = await wait(bus, T.tasks_complete, task_id="will-1")
            assert (body(done)["agent_id"], body(done)["attempt"]) == ("B", 2)
            assert not b.agent.peers["A"].online
            nursery.cancel_scope.cancel()
    assert accepted_outcomes(bus)["will-1"]["agent_id"] == "B"


async def test_holder_killed_and_started_again_is_taken_over_at_its_register(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    """A register comes once per process: a holder killed and started again at once
    holds nothing of its predecessor's, which is taken over then, not at the lease."""
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            config_a = cfg("A", **LEASE)
            a = await start(nursery, bus, config_a, script, will=agent_will(config_a))
            await start(nursery, bus, cfg("B", max_tasks=1, **LEASE), script)
            await blocker(bus, watcher, "B", 1)
            await submit(watcher, "again-1", payload={"hang_on": ["A"]})
            await wait(bus, T.tasks_assigned, task_id="again-1", agent_id="A")

            await trio.sleep_until(7.25)
            a.crash()
            # started again (as another role, so that it does not claim the task itself)
            await start(nursery, bus, cfg("A", role="deployment", **LEASE), script)
            registered = on(T.agents_register, bus, agent_id="A")[-1].time
            takeover = await wait(bus, T.tasks_assigned, task_id="again-1", attempt=2)
            assert takeover.time == registered == 7.25
            assert body(takeover)["agent_id"] == "B"
            nursery.cancel_scope.cancel()


# -------------------------------------------------------------------- retries
def progress(bus: MemoryBus, task_id: str, event: str) -> list[BusRecord]:
    return on(T.tasks_progress, bus, task_id=task_id, event=event)


async def test_retry_backoff_delays_are_published_and_kept(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script, fixed_jitter: None
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(
                nursery, bus, cfg("R", retry_initial_delay=1.0, retry_max_delay=60.0), script
            )
            await submit(watcher, "retry-1", payload={"sleep": 0.5, "fail": 2})
            done = await wait(bus, T.tasks_complete, task_id="retry-1")
            nursery.cancel_scope.cancel()
    starts = progress(bus, "retry-1", "start")
    retries = progress(bus, "retry-1", "retry")
    assert [body(r)["try"] for r in starts] == [1, 2, 3]
    assert [body(r)["state"] for r in retries] == ["retrying", "retrying"]
    assert [body(r)["delay"] for r in retries] == [1.0, 2.0]  # initial * 2 ** (try - 1)
    assert all("failure on try" in body(r)["error"] for r in retries)
    for failure, following in zip(retries, starts[1:], strict=True):
        assert following.time == failure.time + body(failure)["delay"]
    assert [r.time for r in starts] == [0.0, 1.5, 4.0]
    assert [r.time for r in retries] == [0.5, 2.0]
    assert done.time == 4.5
    assert body(done)["attempt"] == 1
    assert on(T.tasks_failed, bus) == []


async def test_retry_delays_are_jittered_within_half_to_full_cap(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(
                nursery,
                bus,
                cfg("R", retry_initial_delay=1.0, retry_max_delay=3.0, max_retries=4),
                script,
            )
            await submit(watcher, "jitter-1", payload={"fail": 4})
            await wait(bus, T.tasks_complete, task_id="jitter-1")
            nursery.cancel_scope.cancel()
    starts = progress(bus, "jitter-1", "start")
    retries = progress(bus, "jitter-1", "retry")
    caps = [1.0, 2.0, 3.0, 3.0]  # capped by retry_max_delay
    for cap, failure, following in zip(caps, retries, starts[1:], strict=True):
        delay = body(failure)["delay"]
        assert cap / 2 - 0.0005 <= delay <= cap
        # The published delay is rounded to the millisecond.
        assert following.time == pytest.approx(failure.time + delay, abs=0.0005)


async def test_retry_start_is_exactly_failure_plus_published_delay_with_jitter(
    autojump_clock: trio.testing.MockClock,
    bus: MemoryBus,
    script: Script,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(random, "uniform", lambda a, b: a + (b - a) * 0.5555555)
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("R"), script)
            await submit(watcher, "jitter-2", payload={"fail": 1})
            await wait(bus, T.tasks_complete, task_id="jitter-2")
            nursery.cancel_scope.cancel()
    (failure,) = progress(bus, "jitter-2", "retry")
    following = progress(bus, "jitter-2", "start")[1]
    assert following.time == failure.time + body(failure)["delay"]


async def test_retries_exhausted_one_failed_with_reason_error(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script, fixed_jitter: None
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("R1", max_retries=2), script)
            await start(nursery, bus, cfg("R2", max_retries=2), script)
            await submit(watcher, "exhaust-1", payload={"fail": 99})
            await wait(bus, T.tasks_failed, task_id="exhaust-1")
            await trio.sleep(100)  # nothing more comes (no takeover, no second report)
            nursery.cancel_scope.cancel()
    (failed,) = on(T.tasks_failed, bus, task_id="exhaust-1")
    assert body(failed)["reason"] == "error"
    assert "after 3 tries" in body(failed)["error"]
    assert body(failed)["attempt"] == 1
    calls = script.calls_for("exhaust-1")
    assert [c.try_number for c in calls] == [1, 2, 3]
    assert len({c.agent_id for c in calls}) == 1
    assert len(progress(bus, "exhaust-1", "retry")) == 2
    assert on(T.tasks_complete, bus) == []


async def test_per_task_timeout_then_retry_then_failure_timeout(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script, fixed_jitter: None
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("TO", max_retries=1), script)
            await trio.sleep(2)
            await submit(watcher, "slow-1", timeout_s=5, payload={"hang": True})
            failed = await wait(bus, T.tasks_failed, task_id="slow-1")
            nursery.cancel_scope.cancel()
    timeouts = progress(bus, "slow-1", "time_out")
    assert [r.time for r in timeouts] == [7.0, 13.0]  # 2 + 5; 7 + 1 (backoff) + 5
    assert all(body(r)["state"] == "timed_out" for r in timeouts)
    assert [r.time for r in progress(bus, "slow-1", "start")] == [2.0, 8.0]
    (retry,) = progress(bus, "slow-1", "retry")
    assert (retry.time, body(retry)["previous"], body(retry)["delay"]) == (7.0, "timed_out", 1.0)
    assert failed.time == 13.0
    assert body(failed)["error"] == "timed out after 5 s (after 2 tries)"
    (final,) = progress(bus, "slow-1", "fail")
    assert (final.time, body(final)["previous"], body(final)["state"]) == (
        13.0,
        "timed_out",
        "failed",
    )
    assert [c.outcome for c in script.calls_for("slow-1")] == ["Cancelled", "Cancelled"]
    assert len(on(T.tasks_failed, bus)) == 1


async def test_final_timeout_is_reported_with_reason_timeout(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script, fixed_jitter: None
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("TO", max_retries=0), script)
            await submit(watcher, "slow-2", timeout_s=5, payload={"hang": True})
            failed = await wait(bus, T.tasks_failed, task_id="slow-2")
            nursery.cancel_scope.cancel()
    assert failed.time == 5.0
    assert body(failed)["reason"] == "timeout"


# ----------------------------------------------------------- cancel, shutdown
async def test_cancel_request_stops_a_running_task_at_once(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("C1"), script)
            await start(nursery, bus, cfg("C2"), script)
            await submit(watcher, "cancel-1", payload={"hang": True})
            await wait(bus, T.tasks_progress, task_id="cancel-1", event="start")
            await trio.sleep(4)
            await watcher.publish(
                T.tasks_cancel, json.dumps({"payload": {"task_id": "cancel-1"}}), qos=1
            )
            asked = trio.current_time()
            failed = await wait(bus, T.tasks_failed, task_id="cancel-1")
            await trio.sleep(100)
            nursery.cancel_scope.cancel()
    assert failed.time == asked == 4.0
    assert body(failed)["reason"] == "cancelled"
    assert len(on(T.tasks_failed, bus, task_id="cancel-1")) == 1
    (call,) = script.calls_for("cancel-1")
    assert (call.outcome, call.end) == ("Cancelled", 4.0)
    (cancelled,) = progress(bus, "cancel-1", "cancel")
    assert body(cancelled)["state"] == "cancelled"


async def test_graceful_shutdown_completes_within_grace_and_releases_the_rest(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            s = await start(nursery, bus, cfg("S", grace_period=5.0), script)
            b = await start(nursery, bus, cfg("B", max_tasks=1), script)
            await blocker(bus, watcher, "B", 1)
            await submit(watcher, "short-1", payload={"sleep": 3})
            await submit(watcher, "long-1", payload={"hang_on": ["S"]})
            await wait(bus, T.tasks_assigned, task_id="long-1", agent_id="S")
            await wait(bus, T.tasks_assigned, task_id="short-1", agent_id="S")

            await trio.sleep_until(2.0)
            s.agent.request_shutdown()
            t_shutdown = trio.current_time()
            await s.finished.wait()
            takeover = await wait(bus, T.tasks_assigned, task_id="long-1", attempt=2)
            done = await wait(bus, T.tasks_complete, task_id="long-1")
            nursery.cancel_scope.cancel()
    grace = s.agent.config.grace_period
    (short,) = on(T.tasks_complete, bus, task_id="short-1")
    assert (short.time, body(short)["agent_id"], body(short)["attempt"]) == (3.0, "S", 1)
    (released,) = on(T.tasks_released, bus)
    assert released.time == t_shutdown + grace == 7.0
    assert (body(released)["task_id"], body(released)["agent_id"]) == ("long-1", "S")
    assert body(released)["attempt"] == 1
    assert (takeover.time, body(takeover)["agent_id"]) == (7.0, "B")
    assert (body(done)["agent_id"], body(done)["attempt"]) == ("B", 2)
    assert b.agent.counters["won"] == 2

    (shutdown,) = bus.records(T.agents_shutdown)
    assert shutdown.time == 7.0
    assert (body(shutdown)["reason"], body(shutdown)["agent_id"]) == ("graceful", "S")
    status = bus.retained[T.agent_status("S")]
    offline = json.loads(status.payload)["payload"]
    assert (offline["status"], offline["reason"]) == ("offline", "shutdown")
    assert status.retain
    # S claimed nothing once it began to shut down
    assert [r.time for r in on(T.tasks_assigned, bus, agent_id="S")] == [0.0, 0.0]


async def test_claim_winning_during_shutdown_does_not_crash_the_agent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Shutdown is requested the instant the agent's claim is routed, before it sees it win.

    Whether the agent's intake or its drain runs first is up to trio's randomised
    scheduling; 40 rounds make a miss vanishingly unlikely.
    """
    for _ in range(40):
        bus, script = MemoryBus(), Script()
        with trio.fail_after(1000):
            async with trio.open_nursery() as nursery:
                watcher = bus.open("watcher")
                s = await start(nursery, bus, cfg("S"), script)

                def shutdown_on_claim(record: BusRecord, agent: Agent = s.agent) -> None:
                    if record.topic == T.tasks_assigned:
                        agent.request_shutdown()

                bus.listeners.append(shutdown_on_claim)
                await submit(watcher, "x-1")
                await s.finished.wait()
                nursery.cancel_scope.cancel()
        assert bus.records(T.agents_shutdown)
        assert on(T.tasks_complete, bus, task_id="x-1") or on(T.tasks_released, bus, task_id="x-1")


async def test_cancel_before_start_is_reported_once_whoever_is_online(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("a-monitor", role="monitoring"), script)
            await start(nursery, bus, cfg("b-tester", max_tasks=1), script)
            await blocker(bus, watcher, "b-tester", 50)
            await submit(watcher, "queued-1")  # waits in b-tester's queue
            await trio.sleep(1)
            await watcher.publish(
                T.tasks_cancel, json.dumps({"payload": {"task_id": "queued-1"}}), qos=1
            )
            await trio.sleep(100)
            nursery.cancel_scope.cancel()
    assert script.calls_for("queued-1") == []
    (failed,) = on(T.tasks_failed, bus, task_id="queued-1")
    assert body(failed)["reason"] == "cancelled"


async def test_cancel_before_start_is_reported_once(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("a-tester", max_tasks=1), script)
            await start(nursery, bus, cfg("b-tester", max_tasks=1), script)
            await blocker(bus, watcher, "a-tester", 50)
            await blocker(bus, watcher, "b-tester", 50)
            await submit(watcher, "queued-2")  # waits in both queues
            await trio.sleep(1)
            await watcher.publish(
                T.tasks_cancel, json.dumps({"payload": {"task_id": "queued-2"}}), qos=1
            )
            await trio.sleep(100)
            nursery.cancel_scope.cancel()
    assert script.calls_for("queued-2") == []
    (failed,) = on(T.tasks_failed, bus, task_id="queued-2")
    assert (body(failed)["reason"], body(failed)["agent_id"]) == ("cancelled", "a-tester")
    assert on(T.tasks_assigned, bus, task_id="queued-2") == []


# ------------------------------------------------------------------- choosing
async def test_busy_agent_claims_by_priority(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("P", max_tasks=1), script)
            await submit(watcher, "first", payload={"sleep": 10})
            await wait(bus, T.tasks_progress, task_id="first", event="start")
            await trio.sleep(1)
            for prio in ("low", "high", "medium"):
                await submit(watcher, f"p-{prio}", priority=prio, payload={"sleep": 1})
            await wait(bus, T.tasks_complete, task_id="p-low")
            nursery.cancel_scope.cancel()
    claims = [(body(r)["task_id"], r.time) for r in bus.records(T.tasks_assigned)]
    assert claims == [("first", 0.0), ("p-high", 10.0), ("p-medium", 11.0), ("p-low", 12.0)]


async def test_agents_of_one_role_drain_a_burst_without_racing_for_the_same_tasks(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    """Two busy agents of one role each claim the tasks that rank them first (rendezvous
    hashing) before the other's, so a burst costs about one claim per task (before:
    both claimed the oldest queued task at each freed slot, ~40 % lost claims)."""
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            for name in ("A", "B"):
                await start(nursery, bus, cfg(name, max_tasks=2), script)
            await blocker(bus, watcher, "A", 1)
            await blocker(bus, watcher, "B", 1)
            burst = [f"burst-{i}" for i in range(40)]
            await run_burst(bus, watcher, burst, payload={"sleep": 1})
            nursery.cancel_scope.cancel()
    claims = Counter(body(r)["task_id"] for r in bus.records(T.tasks_assigned))
    runs = Counter(c.task_id for c in script.calls)
    assert all(runs[t] == 1 for t in burst)
    by_agent = Counter(c.agent_id for c in script.calls if c.task_id in burst)
    assert by_agent["A"] >= 10, by_agent
    assert by_agent["B"] >= 10, by_agent
    lost = sum(claims[t] - 1 for t in burst)
    assert lost <= 4, claims


async def test_busy_agent_never_claims_beyond_max_tasks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A task that lands right behind the agent's winning claim must wait for the slot.

    A bus listener publishes task "two" the instant P's claim for "one" is routed, so
    both reach P's intake in one batch. Whether P's claimer then runs before "one"
    enters ``_running`` depends on trio's randomised scheduling order (about one time
    in two); 40 rounds make a miss vanishingly unlikely.
    """
    for round_ in range(40):
        bus, script = MemoryBus(), Script()
        with trio.fail_after(1000):
            async with trio.open_nursery() as nursery:
                watcher = bus.open("watcher")

                def behind_claim(record: BusRecord, watcher: MemoryClient = watcher) -> None:
                    if record.topic == T.tasks_assigned and body(record)["task_id"] == "one":
                        watcher.publish_nowait(
                            T.tasks_new, submission("two", payload={"sleep": 5}), qos=1
                        )

                bus.listeners.append(behind_claim)
                await start(nursery, bus, cfg("P", max_tasks=1), script)
                t0 = trio.current_time()
                await submit(watcher, "one", payload={"sleep": 5})
                await wait(bus, T.tasks_complete, task_id="two")
                nursery.cancel_scope.cancel()
        claims = [(body(r)["task_id"], r.time - t0) for r in bus.records(T.tasks_assigned)]
        assert claims == [("one", 0.0), ("two", 5.0)], f"round {round_}"


async def test_assigned_task_is_claimed_only_by_its_agent(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            x = await start(nursery, bus, cfg("X", max_tasks=1), script)
            y = await start(nursery, bus, cfg("Y"), script)
            await blocker(bus, watcher, "X", 5)
            await submit(watcher, "for-x", assigned_to="X")
            await trio.sleep(2)
            assert not y.agent.scheduler.running  # Y is idle and eligible by role
            await wait(bus, T.tasks_complete, task_id="for-x")
            await trio.sleep(100)
            nursery.cancel_scope.cancel()
    claims = on(T.tasks_assigned, bus, task_id="for-x")
    assert [(body(r)["agent_id"], r.time) for r in claims] == [("X", 5.0)]
    assert [c.agent_id for c in script.calls_for("for-x")] == ["X"]
    assert x.agent.counters["won"] == 2
    assert y.agent.counters["claimed"] == 0


async def test_expired_task_fails_once_without_running(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("E1"), script)
            await start(nursery, bus, cfg("E2"), script)
            await submit(watcher, "old-1", expires_at="2000-01-01T00:00:00Z")
            await wait(bus, T.tasks_failed, task_id="old-1")
            await trio.sleep(100)
            nursery.cancel_scope.cancel()
    (failed,) = on(T.tasks_failed, bus)
    assert body(failed)["reason"] == "expired"
    assert script.calls == []
    (expired,) = progress(bus, "old-1", "expire")
    assert body(expired)["state"] == "expired"


async def test_invalid_payload_fails_once_without_retries(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            for i in range(3):
                await start(nursery, bus, cfg(f"V{i}", max_retries=5), script)
            await submit(watcher, "refused-1", payload={"invalid": True})
            await wait(bus, T.tasks_failed, task_id="refused-1")
            await trio.sleep(200)
            nursery.cancel_scope.cancel()
    (failed,) = on(T.tasks_failed, bus)
    assert body(failed)["reason"] == "invalid_payload"
    assert "payload refused by the executor" in body(failed)["error"]
    assert len(script.calls) == 1
    assert progress(bus, "refused-1", "retry") == []
    holder = body(failed)["agent_id"]
    assert len(on(T.tasks_assigned, bus, task_id="refused-1", agent_id=holder)) == 1


async def test_completed_task_republished_is_not_run_again(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("D1"), script)
            await start(nursery, bus, cfg("D2"), script)
            await submit(watcher, "dup-1", payload={"sleep": 2})
            await trio.sleep(1)
            await submit(watcher, "dup-1", payload={"sleep": 2})  # while it runs
            await wait(bus, T.tasks_complete, task_id="dup-1")
            await submit(watcher, "dup-1", payload={"sleep": 2})  # after it completed
            await trio.sleep(100)
            await submit(watcher, "dup-1", payload={"sleep": 2})
            await trio.sleep(100)
            nursery.cancel_scope.cancel()
    assert len(script.calls_for("dup-1")) == 1
    assert len(on(T.tasks_complete, bus, task_id="dup-1")) == 1
    assert on(T.tasks_failed, bus) == []


# ----------------------------------------------------------------- bad input
LONG_ID = "x" * 500
BAD_INPUT: list[tuple[str, bytes]] = [
    ("invalid JSON", b'{"payload": {"task_id": "j-1",'),
    ("non-UTF-8", b'{"payload": {"task_id": "\xff\xfe"}}'),
    ("JSON array", b'[{"payload": {"task_id": "arr-1"}}]'),
    ("missing payload", b'{"id": "msg_1", "timestamp": "2026-02-22T20:00:00Z"}'),
    ("path-like task id", submission("../etc")),
    ("500-char task id", submission(LONG_ID)),
    ("oversized", submission("big-1", payload={"blob": "y" * 5000})),
]


async def test_bad_input_is_reported_once_and_the_agents_keep_working(
    autojump_clock: trio.testing.MockClock,
    bus: MemoryBus,
    script: Script,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sheri_trio.agent")
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            a = await start(nursery, bus, cfg("a-agent", max_message_bytes=4096), script)
            b = await start(nursery, bus, cfg("b-agent", max_message_bytes=4096), script)
            for _, raw in BAD_INPUT:
                await watcher.publish(T.tasks_new, raw, qos=1)
            await submit(watcher, "bad-prio", priority=5)  # usable id, invalid field
            await submit(watcher, "good-1")
            await wait(bus, T.tasks_complete, task_id="good-1")
            await trio.sleep(100)
            assert not a.finished.is_set()
            assert not b.finished.is_set()
            nursery.cancel_scope.cancel()
    errors = bus.records(T.errors)
    assert len(errors) == len(BAD_INPUT)  # one report per bad message, by one agent
    reports = [body(r) for r in errors]
    assert {r["reported_by"] for r in reports} == {"a-agent"}  # the smallest online id
    assert {r["topic"] for r in reports} == {T.tasks_new}
    assert all("task_id" not in r for r in reports)
    by_kind = dict(zip([k for k, _ in BAD_INPUT], reports, strict=True))
    assert "not valid JSON" in by_kind["invalid JSON"]["error"]
    assert "not UTF-8" in by_kind["non-UTF-8"]["error"]
    assert "JSON object" in by_kind["JSON array"]["error"]
    assert "payload" in by_kind["missing payload"]["error"]
    assert "not allowed" in by_kind["path-like task id"]["error"]
    assert "not allowed" in by_kind["500-char task id"]["error"]
    assert "exceeds the limit of 4096" in by_kind["oversized"]["error"]
    assert by_kind["oversized"]["size"] > 4096

    (failed,) = on(T.tasks_failed, bus)
    assert (body(failed)["task_id"], body(failed)["reason"]) == ("bad-prio", "invalid_task")
    assert "priority" in body(failed)["error"]
    assert [c.task_id for c in script.calls] == ["good-1"]
    assert a.agent.counters["bad_messages"] == b.agent.counters["bad_messages"] == len(BAD_INPUT)
    refused = [r for r in caplog.records if r.getMessage().startswith("refused message")]
    assert len(refused) == 2 * len(BAD_INPUT)  # every agent logs every one
    assert all(f"topic={T.tasks_new}" in r.getMessage() for r in refused)


async def test_missing_payload_with_a_top_level_task_id_is_reported_with_it(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("M"), script)
            await watcher.publish(T.tasks_new, b'{"task_id": "np-1", "type": "testing.run"}')
            report = await bus.wait_for(T.errors)
            await trio.sleep(50)
            nursery.cancel_scope.cancel()
    assert body(report)["task_id"] == "np-1"
    assert on(T.tasks_failed, bus) == []


@pytest.mark.parametrize("priority", [["high"], {"level": "high"}])
async def test_agent_survives_an_unhashable_priority(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script, priority: Any
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("U"), script)
            await submit(watcher, "prio-list", priority=priority)
            await submit(watcher, "good-2")
            await wait(bus, T.tasks_complete, task_id="good-2")
            nursery.cancel_scope.cancel()
    (failed,) = on(T.tasks_failed, bus)
    assert body(failed)["reason"] == "invalid_task"


async def test_agent_survives_a_huge_integer(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("H"), script)
            raw = b'{"payload": {"task_id": "huge-1", "n": ' + b"9" * 5000 + b"}}"
            await watcher.publish(T.tasks_new, raw)
            await submit(watcher, "good-3")
            await wait(bus, T.tasks_complete, task_id="good-3")
            nursery.cancel_scope.cancel()
    assert len(bus.records(T.errors)) == 1


async def test_seed_message_counts_by_kind(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    """The prototype's deploy message runs once on the deployment agent, not on others."""
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("dep-1", role="deployment"), script)
            await start(nursery, bus, cfg("dep-2", role="deployment"), script)
            await start(nursery, bus, cfg("tst-1"), script)
            await submit(watcher, "task_deploy_test", "deployment.deploy", priority="high")
            await wait(bus, T.tasks_complete, task_id="task_deploy_test")
            await trio.sleep(100)
            nursery.cancel_scope.cancel()
    by_agent = Counter(c.agent_id for c in script.calls)
    assert sum(by_agent.values()) == 1
    assert set(by_agent) <= {"dep-1", "dep-2"}


async def test_alerts_see_the_agents_view_of_the_swarm(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script, tmp_path: Any
) -> None:
    """monitoring.alerts gets the agent's view: a peer whose will fired is an alert."""
    from sheri_trio.executors import default_registry

    # The executor keeps its state in SQLite through worker threads; with a threshold of
    # 0 the clock would jump past every deadline while a thread runs (all tasks wait).
    autojump_clock.autojump_threshold = 0.05

    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            config = {
                "state_dir": str(tmp_path),
                "monitoring": {"alerts": {"offline": True, "heartbeat_max_age": 30}},
            }
            mon_cfg = cfg("mon", role="monitoring")
            mon_cfg.executor_config = config
            async with bus.connect("peer", will=None) as peer:
                await peer.publish(
                    T.agent_status("peer"),
                    json.dumps({"payload": {"status": "online", "role": "testing"}}),
                    qos=1,
                    retain=True,
                )
            mon = Agent(mon_cfg, bus.open("mon"), executors=default_registry())
            await nursery.start(mon.run)
            await watcher.publish(
                T.agent_status("peer"),
                json.dumps({"payload": {"status": "offline", "role": "testing"}}),
                qos=1,
                retain=True,
            )
            await submit(watcher, "alerts-1", task_type="monitoring.alerts")
            done = await bus.wait_for(T.tasks_complete, waiting(task_id="alerts-1"))
            nursery.cancel_scope.cancel()
    result = body(done)["result"]
    assert result["active_alerts"] >= 1
    assert any(a.get("agent_id") == "peer" for a in result["alerts"])


async def test_an_oversized_result_is_published_truncated_and_stored_whole(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, tmp_path: Any
) -> None:
    big = {"rows": [{"n": i, "text": "é" * 50} for i in range(400)]}  # ~40 KB of JSON
    autojump_clock.autojump_threshold = 0.05  # the result is written in a worker thread
    registry = ExecutorRegistry()

    async def produce(ctx: TaskContext) -> dict[str, Any]:
        return big

    registry.fallback = produce
    config = cfg("R", max_result_bytes=4096, executor_config={"state_dir": str(tmp_path)})
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            client = bus.open("R")
            agent = Agent(config, client, executors=registry)
            await nursery.start(agent.run)
            await submit(watcher, "big-1")
            record = await wait(bus, T.tasks_complete, task_id="big-1")
            nursery.cancel_scope.cancel()
    result = body(record)["result"]
    assert result["truncated"] is True
    assert len(record.payload) < 4096 + 1024
    stored = tmp_path / "results" / "big-1.1.json"
    assert result["stored"] == str(stored)
    assert json.loads(stored.read_bytes()) == big
    assert result["size"] == stored.stat().st_size
    assert (stored.stat().st_mode & 0o777) == 0o600
    assert result["head"].startswith('{"rows":[{"n":0,')


async def test_a_busy_peers_tasks_wait_at_most_the_preference_window(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    """B is online but stuck; A (one slot) keeps getting new tasks. The tasks B ranks
    first must not wait behind every newer task A prefers: each goes before the tasks
    submitted more than ``preference_window`` (4) after it."""
    window = 4
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("A", max_tasks=1, preference_window=window), script)
            await start(nursery, bus, cfg("B", max_tasks=1, preference_window=window), script)
            await submit(watcher, "stuck", assigned_to="B", payload={"hang": True})
            await wait(bus, T.tasks_progress, task_id="stuck", event="start")
            await blocker(bus, watcher, "A", 1)
            burst = [f"w-{i}" for i in range(24)]
            await run_burst(bus, watcher, burst, payload={"sleep": 1})
            nursery.cancel_scope.cancel()
    # rendezvous hashing, as the agents rank (docs/protocol.md, claim rule 2)
    prefers_b = {t for t in burst if rendezvous_score(f"{t}/B") > rendezvous_score(f"{t}/A")}
    started = [c.task_id for c in script.calls if c.agent_id == "A" and c.task_id in burst]
    assert sorted(started) == sorted(burst)  # A ran them all, B never freed up
    assert prefers_b, "no task ranks B first: pick other ids"
    for task_id in prefers_b:
        position = burst.index(task_id)
        later = {t for t in burst[position + window + 1 :] if t not in prefers_b}
        ran_before = set(started[: started.index(task_id)])
        assert not (later & ran_before), (task_id, sorted(later & ran_before))


# ------------------------------------------------------------ dispatch mode
async def dispatcher_online(bus: MemoryBus) -> MemoryClient:
    """The test plays the swarm's dispatcher: its retained dispatch/status says online."""
    dispatcher = bus.open("disp")
    status = {"agent_id": "disp", "epoch": 1, "status": "online"}
    await dispatcher.publish(
        T.dispatch_status, encode("disp", "general", status), qos=1, retain=True
    )
    return dispatcher


async def test_dispatch_mode_agent_runs_what_its_inbox_assigns_and_acks_each_message(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    """The agent side of docs/dispatch.md, with the test as the dispatcher: an assignment
    runs once (the retained claimed record before the claim, then the outcome), a
    revocation stops a run silently, a cancel fails it; every inbox message is acked."""
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            dispatcher = await dispatcher_online(bus)
            a = await start(nursery, bus, cfg("A", dispatch="dispatcher"), script)
            assert bus.subscribers(T.tasks_new) == []  # O(1): agents do not follow submissions
            inbox = T.agent_inbox("A")

            async def send(kind: str, task_id: str, attempt: int = 1, **task: Any) -> None:
                body: dict[str, Any] = {"kind": kind, "task_id": task_id, "attempt": attempt}
                if kind == "assignment":
                    body["task"] = {"task_id": task_id, "type": "testing.run", **task}
                await dispatcher.publish(inbox, encode("disp", "general", body), qos=1)

            await send("assignment", "d-1", payload={})
            done = await wait(bus, T.tasks_complete, task_id="d-1")
            await send("assignment", "d-2", payload={"hang": True})
            await wait(bus, T.tasks_progress, task_id="d-2", event="start")
            await send("revocation", "d-2", reason="holder lost")
            await wait(bus, T.tasks_progress, task_id="d-2", event="release")
            await send("assignment", "d-3", attempt=2, payload={"hang": True})
            await wait(bus, T.tasks_progress, task_id="d-3", event="start")
            await send("cancel", "d-3", attempt=2)
            failed = await wait(bus, T.tasks_failed, task_id="d-3")
            await trio.sleep(1)
            # the dispatcher's retained status, our sync marker, and the 5 sent here
            assert a.client.statistics()["messages_acked"] == 7
            nursery.cancel_scope.cancel()
    assert body(done)["attempt"] == 1
    assert (body(failed)["reason"], body(failed)["attempt"]) == ("cancelled", 2)
    assert [c.task_id for c in script.calls] == ["d-1", "d-2", "d-3"]
    # claimed record first, then the claim (the dispatcher reacts to the claim)
    d1 = [r for r in bus.records(f"{SWARM}/#") if body(r).get("task_id") == "d-1"]
    kinds = [(r.topic, body(r).get("state")) for r in d1]
    assert kinds.index((T.task_state("d-1"), "claimed")) < kinds.index((T.tasks_assigned, None))
    # the revoked run wrote no retained record over the new holder's
    assert [body(r)["state"] for r in bus.records(T.task_state("d-2"))] == ["claimed"]


async def test_dispatch_mode_a_task_taken_from_us_after_we_finished_it_runs_its_new_attempt(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    """What a silence of lease_time does (we were cut off that long): the dispatcher
    takes over a task we had finished (revocation; our outcome
    of attempt 1 fenced off) and assigns attempt 2 to us. It runs once more and ends
    with its outcome; ignored, it stayed assigned to us, a slot held for ever."""
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            dispatcher = await dispatcher_online(bus)
            a = await start(nursery, bus, cfg("A", dispatch="dispatcher", max_tasks=1), script)
            inbox = T.agent_inbox("A")

            async def send(kind: str, attempt: int) -> None:
                message: dict[str, Any] = {"kind": kind, "task_id": "r-1", "attempt": attempt}
                if kind == "assignment":
                    message["task"] = {"task_id": "r-1", "type": "testing.run", "payload": {}}
                await dispatcher.publish(inbox, encode("disp", "general", message), qos=1)

            await send("assignment", 1)
            first = await wait(bus, T.tasks_complete, task_id="r-1")
            await send("revocation", 1)
            await send("assignment", 1)  # a redelivery of attempt 1: a duplicate
            await send("assignment", 2)
            second = await wait(bus, T.tasks_complete, task_id="r-1", attempt=2)
            await send("assignment", 2)  # a redelivery of attempt 2: a duplicate
            await trio.sleep(1)
            assert a.agent.scheduler.free_slots() == 1
            nursery.cancel_scope.cancel()
    assert (body(first)["attempt"], body(second)["attempt"]) == (1, 2)
    assert [(c.task_id, c.attempt) for c in script.calls] == [("r-1", 1), ("r-1", 2)]
    claims = [body(r)["attempt"] for r in bus.records(T.tasks_assigned)]
    assert claims == [1, 2]


async def test_dispatch_mode_alerts_read_the_dispatchers_view(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, tmp_path: Any
) -> None:
    """In dispatch mode an agent follows no presence: monitoring.alerts reads the
    dispatcher's retained dispatch/view instead (and says so when there is none)."""
    from sheri_trio.executors import default_registry

    autojump_clock.autojump_threshold = 0.05  # the executor's SQLite runs in threads
    config = cfg("mon", role="monitoring", dispatch="dispatcher")
    config.executor_config = {
        "state_dir": str(tmp_path),
        "monitoring": {"alerts": {"offline": True}},
    }
    inbox = T.agent_inbox("mon")
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            dispatcher = await dispatcher_online(bus)
            mon = Agent(config, bus.open("mon"), executors=default_registry())
            await nursery.start(mon.run)

            async def assign(task_id: str) -> dict[str, Any]:
                task = {"task_id": task_id, "type": "monitoring.alerts", "payload": {}}
                assignment = {"kind": "assignment", "task_id": task_id, "attempt": 1, "task": task}
                await dispatcher.publish(inbox, encode("disp", "general", assignment), qos=1)
                record = await wait(bus, T.tasks_complete, task_id=task_id)
                result: dict[str, Any] = body(record)["result"]
                return result

            without = await assign("alerts-0")
            view = {
                "agents": [{"agent_id": "gone", "role": "testing", "online": False}],
                "outcomes": {"completed": 3, "failed": 0},
                "epoch": 1,
            }
            await dispatcher.publish(
                T.dispatch_view, encode("disp", "general", view), qos=1, retain=True
            )
            with_view = await assign("alerts-1")
            nursery.cancel_scope.cancel()
    assert any("no swarm view" in s for s in without["skipped"])
    assert [a.get("agent_id") for a in with_view["alerts"]] == ["gone"]


async def test_a_burst_of_alerts_reads_the_dispatchers_view_once(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, tmp_path: Any
) -> None:
    """Concurrent monitoring.alerts share one read of dispatch/view, and a view read
    within a tenth of heartbeat_interval is reused; after that a new one is read."""
    from sheri_trio.executors import default_registry

    autojump_clock.autojump_threshold = 0.05  # the executor's SQLite runs in threads
    config = cfg("mon", role="monitoring", dispatch="dispatcher", max_tasks=8)
    config.executor_config = {
        "state_dir": str(tmp_path),
        "monitoring": {"alerts": {"offline": True}},
    }
    inbox = T.agent_inbox("mon")

    def view(gone: str) -> bytes:
        agents = [{"agent_id": gone, "role": "testing", "online": False}]
        return encode("disp", "general", {"agents": agents, "outcomes": {}, "epoch": 1})

    async def assign(task_ids: list[str]) -> list[list[str]]:
        for task_id in task_ids:
            task = {"task_id": task_id, "type": "monitoring.alerts", "payload": {}}
            assignment = {"kind": "assignment", "task_id": task_id, "attempt": 1, "task": task}
            await dispatcher.publish(inbox, encode("disp", "general", assignment), qos=1)
        gone = []
        for task_id in task_ids:
            result = body(await wait(bus, T.tasks_complete, task_id=task_id))["result"]
            gone.append([a["agent_id"] for a in result["alerts"]])
        return gone

    def reads() -> int:
        return len(bus.records(f"{SWARM}/agents/mon/sync/+"))

    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            dispatcher = await dispatcher_online(bus)
            await dispatcher.publish(T.dispatch_view, view("a1"), qos=1, retain=True)
            mon = Agent(config, bus.open("mon"), executors=default_registry())
            await nursery.start(mon.run)
            before = reads()
            assert await assign([f"burst-{i}" for i in range(6)]) == [["a1"]] * 6
            assert reads() - before == 1
            await dispatcher.publish(T.dispatch_view, view("a2"), qos=1, retain=True)
            await trio.sleep(config.heartbeat_interval / 10)
            assert await assign(["later"]) == [["a2"]]
            assert reads() - before == 2
            nursery.cancel_scope.cancel()


async def test_dispatch_mode_agent_is_online_only_once_the_swarm_has_a_dispatcher(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    """Submissions published while no dispatch session exists have no subscriber (the
    broker drops them): a dispatch-mode agent's start-up waits for the dispatcher, a
    bounded step of its own, and only then announces itself, so a submitter waiting for
    its register (the prototype's scripts) never publishes into that void."""
    from sheri_trio.swarm import Startup, StartupError, StartupStep

    alone = Agent(cfg("A", dispatch="dispatcher"), bus.open("A"), executors=script.registry)
    startup = Startup("A", 5.0)
    with pytest.raises(StartupError) as info, startup.bounded():
        await alone.run(startup=startup)
    assert info.value.step is StartupStep.DISPATCHER
    assert trio.current_time() == 5.0
    assert not bus.records(T.agents_register)
    assert not bus.records(T.agent_status("A"))

    await dispatcher_online(bus)
    b = Agent(cfg("B", dispatch="dispatcher"), bus.open("B"), executors=script.registry)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(b.run)
            assert b.scheduler.dispatcher == ("disp", 1)
            nursery.cancel_scope.cancel()
    (register,) = bus.records(T.agents_register)
    assert register.json()["payload"]["agent_id"] == "B"
    topics = [r.topic for r in bus.history if r.sender == "B"]
    # B's inbox marker (load task states), then (the dispatcher known) status and register
    assert topics.index(T.agent_status("B")) > topics.index(T.agent_inbox("B"))
    assert topics.index(T.agents_register) > topics.index(T.agent_status("B"))


async def test_a_finished_tasks_record_expires_after_final_retention(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    """The claimed record lives state_retention; the final one final_retention (what
    the broker keeps of finished tasks, and how long a resubmitted id is known)."""
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("R", state_retention=600, final_retention=60), script)
            await submit(watcher, "ret-1")
            await wait(bus, T.tasks_complete, task_id="ret-1")
            nursery.cancel_scope.cancel()
    expiries = {
        body(r)["state"]: r.message.packet.message_expiry_interval
        for r in bus.records(T.task_state("ret-1"))
    }
    assert expiries == {"claimed": 600, "done": 60}


# ------------------------------------------------------------ final states
async def test_a_final_state_keeps_the_submission_unless_it_would_be_too_large(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    """``sheri retry`` reads the submission from the final retained state; a record that
    would exceed ``max_message_bytes`` with it goes without it (``task_omitted``)."""
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            watcher = bus.open("watcher")
            await start(nursery, bus, cfg("fs", max_message_bytes=8192), script)
            await submit(watcher, "small", payload={"fail": 9}, max_retries=0)
            # fits as a submission (< 8 KiB), not in a final record with a long error too
            await submit(watcher, "big", payload={"fail": 9, "pad": "x" * 7950}, max_retries=0)
            for task_id in ("small", "big"):
                await wait(bus, T.tasks_failed, task_id=task_id)
            nursery.cancel_scope.cancel()
    small = body(bus.records(T.task_state("small"))[-1])
    assert small["state"] == "failed"
    assert small["task"] == {
        "task_id": "small",
        "type": "testing.run",
        "payload": {"fail": 9},
        "priority": "medium",
        "max_retries": 0,
    }
    (claimed, final) = bus.records(T.task_state("big"))
    assert body(claimed)["state"] == "claimed"
    big = body(final)
    assert big["state"] == "failed"
    assert "task" not in big
    assert big["task_omitted"] == "too large"
    assert len(final.message.payload) <= 8192


async def test_dispatch_mode_agent_refuses_a_deposed_dispatchers_inbox_messages(
    autojump_clock: trio.testing.MockClock, bus: MemoryBus, script: Script
) -> None:
    """docs/dispatch.md, "Fencing by epoch": once a newer term is known, the old term's
    assignment never runs and its revocation stops nothing; each is acknowledged (the
    broker must not deliver it again) and reported on {swarm}/errors. The new term's
    messages are carried out."""
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            old = await dispatcher_online(bus)  # epoch 1
            a = await start(nursery, bus, cfg("A", dispatch="dispatcher"), script)
            new = bus.open("disp2")
            status = {"agent_id": "disp2", "epoch": 2, "status": "online"}
            await new.publish(
                T.dispatch_status, encode("disp2", "general", status), qos=1, retain=True
            )
            inbox = T.agent_inbox("A")

            async def send(
                sender: MemoryClient, epoch: int, kind: str, task_id: str, **task: Any
            ) -> None:
                body: dict[str, Any] = {
                    "kind": kind,
                    "task_id": task_id,
                    "attempt": 1,
                    "epoch": epoch,
                }
                if kind == "assignment":
                    body["task"] = {"task_id": task_id, "type": "testing.run", **task}
                else:
                    body["reason"] = "holder_gone"
                await sender.publish(inbox, encode(sender.client_id, "general", body), qos=1)

            await send(new, 2, "assignment", "e-1", payload={"hang": True})
            await wait(bus, T.tasks_progress, task_id="e-1", event="start")
            await send(old, 1, "revocation", "e-1")
            await wait(bus, T.errors, task_id="e-1")
            await send(old, 1, "assignment", "e-2", payload={})
            report = await wait(bus, T.errors, task_id="e-2")
            await trio.sleep(1)
            assert not on(T.tasks_progress, bus, task_id="e-1", event="release")
            assert a.agent.scheduler.entries["e-1"].phase.value == "running"
            await send(new, 2, "revocation", "e-1")
            await wait(bus, T.tasks_progress, task_id="e-1", event="release")
            await trio.sleep(1)
            # both statuses, our sync marker, and the 4 sent here
            assert a.client.statistics()["messages_acked"] == 7
            nursery.cancel_scope.cancel()
    assert [c.task_id for c in script.calls] == ["e-1"]
    assert (
        body(report)["error"] == "assignment from a deposed dispatcher (epoch 1; current epoch 2)"
    )
    assert (body(report)["topic"], body(report)["reported_by"]) == (inbox, "A")
    assert not on(T.tasks_assigned, bus, task_id="e-2")
