"""The dispatcher's trio shell and its election, on a real mosquitto.

The agents here are *scripted*: plain clients that speak the dispatch protocol as
docs/dispatch.md asks of an agent (register, heartbeat, their inbox; for each new
``(task_id, attempt)`` assignment: the retained ``claimed`` state, the claim, then the
final state and the outcome), so every test exercises the real broker, the real
dispatch session and the real core. Nothing sleeps to synchronise: the tests wait on
messages (with timeouts).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import pytest
import trio
from childproc import read_line
from store_helpers import pg_url, set_accepting, throwaway_database

from sheri_trio.mqtt import Will, open_client
from sheri_trio.stores import open_store, parse_store_url
from sheri_trio.swarm import (
    AgentConfig,
    Candidate,
    Messages,
    TermEnd,
    Topics,
    decode_envelope,
    dispatch_client_id,
    encode,
    parse_task,
    read_retained,
    run_agent,
)
from sheri_trio.testing import RedisServer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Sequence
    from pathlib import Path

    from sheri_trio.mqtt import Client
    from sheri_trio.stores import ClaimRequest, ClaimStore, Verdict
    from sheri_trio.testing import MosquittoBroker

ELECTION = (0.0, 0.02)


def dispatcher_config(broker: MosquittoBroker, agent_id: str, swarm: str) -> AgentConfig:
    return AgentConfig(
        role="general",
        agent_id=agent_id,
        swarm=swarm,
        broker=broker.tcp_url,
        heartbeat_interval=0.5,
        lease_time=2.0,
        keep_alive=5,
        dispatch="dispatcher",
        executor_config={"executors": {"simulate": True}},
    )


def submission(task_id: str, task_type: str = "testing.run") -> bytes:
    """What the prototype's test script publishes with mosquitto_pub."""
    body = {
        "id": f"msg_{task_id}",
        "timestamp": "2026-02-22T20:00:00Z",
        "payload": {"task_id": task_id, "type": task_type, "payload": {}},
    }
    return json.dumps(body).encode()


class Tally:
    """What the scripted agents did, shared; waits are on its changes."""

    def __init__(self) -> None:
        self.assigned: Counter[str] = Counter()  # distinct (task, attempt) per task
        self.attempts: dict[str, list[tuple[int, str]]] = {}
        self.completed: Counter[str] = Counter()
        self.duplicates = 0
        self.revocations: list[tuple[str, str, int, str]] = []  # (agent, task, attempt, why)
        self.finishes: list[tuple[str, int, str]] = []  # (task, attempt, agent)
        self._changed = trio.Event()

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Any) -> None:
        while not predicate():
            await self._changed.wait()


class ScriptedAgent:
    """A protocol participant of dispatch mode, without the real agent."""

    def __init__(
        self,
        broker: MosquittoBroker,
        swarm: str,
        agent_id: str,
        tally: Tally,
        *,
        role: str = "testing",
        max_tasks: int = 2,
        work: float = 0.002,
        hold: bool = False,
        reconnect: bool = True,
    ) -> None:
        self.url = broker.tcp_url
        self.topics = Topics(swarm)
        self.agent_id = agent_id
        self.role = role
        self.tally = tally
        self.max_tasks = max_tasks
        self.work = work
        self.hold = hold
        self.reconnect = reconnect
        self.messages = Messages(agent_id, role)
        self.seen: set[tuple[str, int]] = set()
        self.running: set[str] = set()
        self.work_scopes: dict[tuple[str, int], trio.CancelScope] = {}
        self.max_running = 0
        self.client: Client | None = None
        self.crashed = False

    async def publish(self, topic: str, payload: dict[str, Any], *, retain: bool = False) -> None:
        assert self.client is not None
        data = encode(self.agent_id, self.role, payload)
        await self.client.publish(topic, data, qos=1, retain=retain, wait_ack=False)

    async def run(self, *, task_status: trio.TaskStatus[ScriptedAgent]) -> None:
        t, m = self.topics, self.messages
        will = encode(self.agent_id, self.role, m.will())
        async with open_client(
            self.url,
            client_id=self.agent_id,
            clean_start=False,
            session_expiry_interval=300,
            reconnect=self.reconnect,
            will=Will(t.agent_status(self.agent_id), will, qos=1, retain=True),
        ) as client:
            self.client = client
            async with (
                client.subscribe(t.agent_inbox(self.agent_id), qos=1) as inbox,
                trio.open_nursery() as nursery,
            ):
                await self.publish(t.agent_status(self.agent_id), m.status("online"), retain=True)
                await self.publish(t.agents_register, m.register(self.max_tasks))
                nursery.start_soon(self._heartbeat)
                task_status.started(self)
                async for message in inbox:
                    payload = decode_envelope(message.payload).payload
                    if payload["kind"] == "assignment":
                        await self._assigned(nursery, payload)
                    elif payload["kind"] == "revocation":
                        key = (payload["task_id"], payload["attempt"])
                        self.tally.revocations.append((self.agent_id, *key, payload["reason"]))
                        work = self.work_scopes.pop(key, None)
                        if work is not None:
                            work.cancel()  # stopped: publishes nothing
                            self.running.discard(key[0])
                        self.tally.changed()

    def crash(self) -> None:
        """Die as a killed process would: the connection dropped (the broker publishes
        the will), no heartbeat after."""
        assert self.client is not None
        self.crashed = True
        self.client.abort_connection()

    async def _heartbeat(self) -> None:
        while not self.crashed:
            beat = self.messages.heartbeat(
                uptime=0.0, rss=0, running=sorted(self.running), capacity=self.max_tasks, queued=0
            )
            await self.publish(self.topics.agents_heartbeat, beat)
            await trio.sleep(0.5)

    async def _assigned(self, nursery: trio.Nursery, payload: dict[str, Any]) -> None:
        task_id, attempt = payload["task_id"], payload["attempt"]
        if (task_id, attempt) in self.seen:
            self.tally.duplicates += 1  # at least once: ignored, as an agent must
            return
        self.seen.add((task_id, attempt))
        self.tally.assigned[task_id] += 1
        self.tally.attempts.setdefault(task_id, []).append((attempt, self.agent_id))
        self.running.add(task_id)
        self.max_running = max(self.max_running, len(self.running))
        t = self.topics
        claimed = {
            "task_id": task_id,
            "agent_id": self.agent_id,
            "state": "claimed",
            "attempt": attempt,
            "task": payload["task"],
        }
        await self.publish(t.task_state(task_id), claimed, retain=True)  # before the claim
        await self.publish(t.tasks_assigned, self.messages.claim(task_id, attempt))
        self.tally.changed()
        if not self.hold:
            nursery.start_soon(self._finish, payload["task"], attempt)

    async def _finish(self, task: dict[str, Any], attempt: int) -> None:
        spec = parse_task(task)
        with trio.CancelScope() as scope:
            self.work_scopes[spec.task_id, attempt] = scope
            await trio.sleep(self.work)  # the work (not a synchronisation)
        if scope.cancelled_caught:
            return
        del self.work_scopes[spec.task_id, attempt]
        t = self.topics
        final = {"task_id": spec.task_id, "agent_id": self.agent_id, "state": "done"}
        await self.publish(t.task_state(spec.task_id), {**final, "attempt": attempt}, retain=True)
        self.running.discard(spec.task_id)
        await self.publish(t.tasks_complete, self.messages.complete(spec, attempt, {}, 1))
        self.tally.completed[spec.task_id] += 1
        self.tally.finishes.append((spec.task_id, attempt, self.agent_id))
        self.tally.changed()


async def eventually(predicate: Any) -> None:
    """Wait for a condition of the dispatcher's core (it reports to nobody), looking
    every few milliseconds; the caller's timeout bounds it."""
    while not predicate():  # noqa: ASYNC110 (nothing to wait on: the core is sans-IO)
        await trio.sleep(0.005)


async def wait_status(statuses: Any, predicate: Any) -> dict[str, Any]:
    """The next dispatch/status payload for which ``predicate`` holds."""
    async for message in statuses:
        if message.payload:
            payload = decode_envelope(message.payload).payload
            if predicate(payload):
                return payload
    raise AssertionError("status subscription ended")


async def elect(nursery: trio.Nursery, candidate: Candidate, watcher: Client) -> None:
    """Start ``candidate`` and wait until the status names it online (it is subscribed)."""
    swarm = candidate.config.swarm
    async with watcher.subscribe(f"{swarm}/dispatch/status") as statuses:
        await nursery.start(candidate.run)
        await wait_status(
            statuses, lambda s: s["status"] == "online" and s["agent_id"] == candidate.me
        )


async def stop_all(*candidates: Candidate) -> None:
    """Stop standing, as run_agent does when its agent has left: terms end cleanly."""
    for c in candidates:
        c.stop()
    for c in candidates:
        await c.stopped.wait()


@dataclass
class Scene:
    """A swarm of scripted agents on ``broker``: a follower connection (for candidates),
    a submitter's, and the nursery they all run in."""

    broker: MosquittoBroker
    swarm: str
    tally: Tally
    follow: Client
    submitter: Client
    nursery: trio.Nursery

    async def agent(self, agent_id: str, **options: Any) -> ScriptedAgent:
        """A scripted agent, registered and subscribed to its inbox."""
        agent = ScriptedAgent(self.broker, self.swarm, agent_id, self.tally, **options)
        started: ScriptedAgent = await self.nursery.start(agent.run)
        return started

    async def dispatcher(self, agent_id: str = "d1") -> Candidate:
        """A candidate on the follower connection, once the status names it online."""
        config = dispatcher_config(self.broker, agent_id, self.swarm)
        candidate = Candidate(config, self.follow, delay=ELECTION)
        await elect(self.nursery, candidate, self.submitter)
        return candidate

    async def submit(self, ids: list[str]) -> None:
        await submit_all(self.submitter, self.swarm, ids)

    async def end(self, *candidates: Candidate) -> None:
        """The candidates stop (their terms end cleanly), then everything else."""
        await stop_all(*candidates)
        self.nursery.cancel_scope.cancel()


@asynccontextmanager
async def scene(broker: MosquittoBroker, swarm: str, tally: Tally) -> AsyncIterator[Scene]:
    async with (
        open_client(broker.tcp_url) as follow,
        open_client(broker.tcp_url) as submitter,
        trio.open_nursery() as nursery,
    ):
        yield Scene(broker, swarm, tally, follow, submitter, nursery)


async def submit_all(client: Client, swarm: str, ids: list[str]) -> None:
    for task_id in ids:
        await client.publish(f"{swarm}/tasks/new", submission(task_id), qos=1, wait_ack=False)


def accepted(tally: Tally) -> Counter[str]:
    """Completions per task, but of the attempts taken over (their holder looked gone:
    the dispatcher fences their outcomes off)."""
    revoked = {(t, attempt) for _, t, attempt, why in tally.revocations if why == "holder_gone"}
    return Counter(t for t, attempt, _ in tally.finishes if (t, attempt) not in revoked)


def assert_each_once(tally: Tally, ids: list[str]) -> None:
    assert set(tally.completed) == set(ids)
    assert set(tally.completed.values()) == {1}
    assert set(tally.assigned.values()) == {1}
    assert all(attempts == [(1, attempts[0][1])] for attempts in tally.attempts.values())


# ------------------------------------------------------------------------ the shell
def test_dispatch_client_id_keeps_swarms_apart() -> None:
    assert dispatch_client_id("sheri") == "sheri-dispatch.sheri"
    assert dispatch_client_id("a/b") == "sheri-dispatch.a:b"
    assert dispatch_client_id("a/b") != dispatch_client_id("a.b")


async def test_each_submission_reaches_one_agent_within_its_capacity(
    broker: MosquittoBroker,
) -> None:
    swarm = "d-basic/x"  # a '/' in the swarm: the dispatch client id must take it
    tally = Tally()
    ids = [f"t{i}" for i in range(40)]
    with trio.fail_after(30):
        async with scene(broker, swarm, tally) as sc:
            agents = [await sc.agent(f"a{i}", max_tasks=2, work=0.01) for i in range(2)]
            async with sc.follow.subscribe(f"{swarm}/dispatch/status") as statuses:
                candidate = Candidate(
                    dispatcher_config(broker, "d1", swarm), sc.follow, delay=ELECTION
                )
                await sc.nursery.start(candidate.run)
                status = await wait_status(statuses, lambda s: s["status"] == "online")
            assert status["agent_id"] == "d1"
            assert candidate.dispatching
            await sc.submit(ids)
            # an invalid submission with a task id: failed once, by the dispatcher
            async with sc.submitter.subscribe(f"{swarm}/tasks/failed") as failed:
                bad = submission("bad", "no such")
                await sc.submitter.publish(f"{swarm}/tasks/new", bad, qos=1)
                outcome = decode_envelope((await failed.receive()).payload).payload
            assert outcome["task_id"] == "bad"
            assert outcome["reason"] == "invalid_task"
            await tally.wait_for(lambda: len(tally.completed) == len(ids))
            await sc.end(candidate)
    assert_each_once(tally, ids)
    assert all(a.max_running <= a.max_tasks for a in agents)
    assert all(a.max_running == a.max_tasks for a in agents)  # both were kept busy
    assert candidate.terms == [(1, TermEnd.STOPPED)]


async def test_300_tasks_over_5_agents_one_assignment_and_one_outcome_each(
    broker: MosquittoBroker,
) -> None:
    swarm = "d-300"
    tally = Tally()
    ids = [f"t{i}" for i in range(300)]
    with trio.fail_after(60):
        async with scene(broker, swarm, tally) as sc:
            agents = [await sc.agent(f"a{i}", max_tasks=4) for i in range(5)]
            candidate = await sc.dispatcher()
            await sc.submit(ids)
            await tally.wait_for(lambda: len(tally.completed) == len(ids))
            shell = candidate.shell
            assert shell is not None
            await eventually(lambda: shell.core.counters["completed"] == len(ids))

            stats = shell.core.statistics(trio.current_time())
            await sc.end(candidate)
    assert_each_once(tally, ids)
    assert all(a.max_running <= a.max_tasks for a in agents)
    assert all(a.seen for a in agents)  # everyone got work
    assert stats.queued == stats.assigned == stats.claimed == 0
    assert stats.counters["accepted"] == stats.counters["assigned"] == len(ids)
    assert tally.duplicates == 0


async def test_a_killed_agent_s_tasks_are_revoked_and_reassigned_once(
    broker: MosquittoBroker,
) -> None:
    swarm = "d-kill"
    tally = Tally()
    ids = ["k1", "k2"]
    with trio.fail_after(30):
        async with scene(broker, swarm, tally) as sc:
            victim = await sc.agent("victim", max_tasks=2, hold=True, reconnect=False)
            candidate = await sc.dispatcher()
            await sc.submit(ids)
            await tally.wait_for(lambda: sum(tally.assigned.values()) == 2)
            await sc.agent("survivor", max_tasks=2)
            victim.crash()  # its will: offline; its lease (2 s) runs out, then the takeover
            await tally.wait_for(lambda: len(tally.completed) == 2)
            await sc.end(candidate)
    for task_id in ids:
        assert tally.attempts[task_id] == [(1, "victim"), (2, "survivor")]
        assert tally.completed[task_id] == 1
    assert tally.duplicates == 0
    # the revocations went to the victim's inbox (its session keeps them for its return)
    with trio.fail_after(10):
        async with (
            open_client(broker.tcp_url, client_id="victim", clean_start=False) as back,
            back.subscribe(f"{swarm}/agents/victim/inbox") as inbox,
        ):
            got = sorted(
                (p["task_id"], p["attempt"], p["reason"], p.get("epoch"))
                for p in [decode_envelope((await inbox.receive()).payload).payload for _ in ids]
            )
    # each carries the term's epoch (the swarm's first term: 1), which agents fence on
    assert got == [("k1", 1, "holder_gone", 1), ("k2", 1, "holder_gone", 1)]


async def test_two_candidates_racing_one_dispatcher_the_other_follows(
    broker: MosquittoBroker,
) -> None:
    swarm = "d-race"
    tally = Tally()
    with trio.fail_after(30):
        async with open_client(broker.tcp_url) as f2, scene(broker, swarm, tally) as sc:
            await sc.agent("a0")
            candidates = [
                Candidate(dispatcher_config(broker, f"d{i}", swarm), f, delay=(0.0, 0.005))
                for i, f in enumerate((sc.follow, f2))
            ]
            for c in candidates:
                sc.nursery.start_soon(c.run)
            async with sc.submitter.subscribe(f"{swarm}/dispatch/status") as statuses:
                await wait_status(statuses, lambda s: s["status"] == "online")
            # a submission makes the round trip through whoever is the dispatcher
            await sc.submit(["r1"])
            await tally.wait_for(lambda: tally.completed["r1"] == 1)
            # both followers have seen the final status: one of them names itself in it
            for c in candidates:
                await c._look_again()
            dispatching = [c for c in candidates if c.dispatching]
            assert len(dispatching) == 1
            winner = dispatching[0]
            assert all(c.status is not None for c in candidates)
            assert all(c.status and c.status["agent_id"] == winner.me for c in candidates)
            loser = candidates[1 - candidates.index(winner)]
            assert loser.vacancy() is None  # it follows
            # whoever was taken over stepped down (told so, or its connection closed)
            handed_over = {TermEnd.TAKEN_OVER, TermEnd.LOST}
            assert {end for _, end in loser.terms} <= handed_over
            assert {end for _, end in winner.terms} <= handed_over
            assert len(loser.terms) + len(winner.terms) <= 2  # no fight
            await sc.submit(["r2"])
            await tally.wait_for(lambda: tally.completed["r2"] == 1)
            await sc.end(*candidates)


async def test_candidates_of_one_process_stand_one_at_a_time(broker: MosquittoBroker) -> None:
    """A cold start of many agents in one process (``sheri swarm``): every candidate finds
    no status at once, and without a turn each would connect the dispatch session and take
    it from the one before (an election storm: 1,890 takeovers at 1,000 agents). With the
    process's turn exactly one term is started, and everyone follows it."""
    swarm = "d-storm"
    n = 20
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            follows = [
                await stack.enter_async_context(open_client(broker.tcp_url)) for _ in range(n)
            ]
            nursery = await stack.enter_async_context(trio.open_nursery())
            candidates = [
                Candidate(dispatcher_config(broker, f"s{i}", swarm), f, delay=(0.0, 0.0))
                for i, f in enumerate(follows)
            ]
            for c in candidates:
                nursery.start_soon(c.run)
            async with follows[0].subscribe(f"{swarm}/dispatch/status") as statuses:
                await wait_status(statuses, lambda s: s["status"] == "online")
            for c in candidates:
                await c._look_again()
            dispatching = [c for c in candidates if c.dispatching]
            assert len(dispatching) == 1
            assert sum(len(c.terms) for c in candidates) == 0  # no term has ended: no takeover
            assert all(c.vacancy() is None for c in candidates)
            await stop_all(*candidates)
            nursery.cancel_scope.cancel()


_CANDIDATE_PROC = """
import sys, trio
from sheri_trio.mqtt import open_client
from sheri_trio.swarm import AgentConfig, Candidate
cfg = AgentConfig(role="general", agent_id=sys.argv[2], swarm=sys.argv[3], broker=sys.argv[1],
                  heartbeat_interval=0.5, lease_time=2.0, keep_alive=5, dispatch="dispatcher")
async def main():
    async with open_client(cfg.broker) as follow, trio.open_nursery() as n:
        await n.start(Candidate(cfg, follow, delay=(0.0, 0.01)).run)
        print("following", flush=True)
trio.run(main)
"""


async def test_dispatcher_killed_mid_burst_another_takes_over_nothing_lost_or_doubled(
    broker: MosquittoBroker,
) -> None:
    swarm = "d-sigkill"
    tally = Tally()
    ids = [f"t{i}" for i in range(300)]
    with trio.fail_after(60):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", _CANDIDATE_PROC, broker.tcp_url, "doomed", swarm],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert proc.stdout is not None
            async with (
                scene(broker, swarm, tally) as sc,
                sc.submitter.subscribe(f"{swarm}/dispatch/status") as statuses,
            ):
                assert (await read_line(proc.stdout)).strip() == b"following"
                await wait_status(statuses, lambda s: s == s | {"agent_id": "doomed"})
                heir_config = dispatcher_config(broker, "heir", swarm)
                heir = Candidate(heir_config, sc.follow, delay=ELECTION)
                await sc.nursery.start(heir.run)
                for i in range(4):
                    await sc.agent(f"a{i}")
                await sc.submit(ids)
                await tally.wait_for(lambda: len(tally.completed) >= 60)
                proc.send_signal(signal.SIGKILL)
                status = await wait_status(statuses, lambda s: s["status"] == "online")
                assert status["agent_id"] == "heir"
                assert status["epoch"] == 2
                await tally.wait_for(lambda: len(tally.completed) == len(ids))
                await sc.end(heir)
        finally:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
                if proc.stdout is not None:
                    await proc.stdout.aclose()
    assert_each_once(tally, ids)  # duplicates of one attempt (at least once) are ignored


async def test_broker_restart_mid_burst_carries_on(fresh_broker: MosquittoBroker) -> None:
    swarm = "d-restart"
    tally = Tally()
    ids = [f"t{i}" for i in range(200)]
    with trio.fail_after(60):
        async with scene(fresh_broker, swarm, tally) as sc:
            for i in range(3):
                await sc.agent(f"a{i}")
            candidate = await sc.dispatcher()
            await sc.submit(ids[:100])
            await tally.wait_for(lambda: len(tally.completed) >= 30)
            await trio.to_thread.run_sync(fresh_broker.restart)
            await sc.submit(ids[100:])
            await tally.wait_for(lambda: len(accepted(tally)) == len(ids))
            await sc.end(candidate)
    # one accepted outcome per task, and each ran once: the wills the broker's restart
    # published took nothing over (docs/protocol.md, "Sessions, presence and absence")
    assert set(accepted(tally)) == set(ids)
    assert set(accepted(tally).values()) == {1}
    assert set(tally.completed.values()) == {1}
    assert not [r for r in tally.revocations if r[3] == "holder_gone"]
    # the restart ended the term (the dispatch client never reconnects by itself); the
    # candidate stood again
    ends = [end for _, end in candidate.terms]
    assert ends[-1] is TermEnd.STOPPED
    assert set(ends[:-1]) <= {TermEnd.LOST, TermEnd.FAILED}
    assert TermEnd.LOST in ends


# ---------------------------------------------------------------- run_agent's hook
async def test_run_agent_in_dispatcher_mode_stands_and_its_shutdown_ends_the_term(
    broker: MosquittoBroker,
) -> None:
    swarm = "d-hook"
    config = dispatcher_config(broker, "hooked", swarm)
    with trio.fail_after(20):
        async with (
            open_client(broker.tcp_url) as watcher,
            watcher.subscribe(f"{swarm}/dispatch/status") as statuses,
            trio.open_nursery() as nursery,
        ):
            shutdown = trio.Event()
            nursery.start_soon(lambda: run_agent(config, shutdown=shutdown))
            online = await wait_status(statuses, lambda s: s["status"] == "online")
            assert online["agent_id"] == "hooked"
            shutdown.set()
            offline = await wait_status(statuses, lambda s: s["status"] == "offline")
            assert offline == {"agent_id": "hooked", "epoch": online["epoch"], "status": "offline"}


@pytest.mark.parametrize("mode", ["broadcast"])
async def test_run_agent_in_broadcast_mode_stands_for_nothing(
    broker: MosquittoBroker, mode: str
) -> None:
    swarm = "d-broadcast"
    config = dispatcher_config(broker, "plain", swarm)
    config.dispatch = mode
    with trio.fail_after(20):
        async with open_client(broker.tcp_url) as watcher, trio.open_nursery() as nursery:
            shutdown = trio.Event()
            await nursery.start(
                lambda task_status: run_agent(config, shutdown=shutdown, task_status=task_status)
            )
            sync = f"{swarm}/agents/test/sync/1"
            found = await read_retained(watcher, sync, f"{swarm}/dispatch/status")
            shutdown.set()
    assert found == []


# ------------------------------------------------------------------ the flag
@pytest.mark.parametrize("command", ["agent", "swarm"])
def test_the_dispatch_flag_of_agent_and_swarm(command: str) -> None:
    from sheri_trio.cli import app

    function, bound, *_ = app.parse_args([command, "--dispatch", "dispatcher"])
    assert function.__name__ == f"{command}_cmd"
    assert bound.arguments["dispatch"] == "dispatcher"


def test_dispatch_from_flag_environment_and_file() -> None:
    from sheri_trio.config import ConfigError, FileConfig, build_agent_config

    assert build_agent_config(FileConfig(), env={}).dispatch == "dispatcher"  # the default
    from_env = build_agent_config(FileConfig(), env={"SHERI_DISPATCH": "broadcast"})
    assert from_env.dispatch == "broadcast"
    flag = build_agent_config(
        FileConfig(), env={"SHERI_DISPATCH": "broadcast"}, dispatch="dispatcher"
    )
    assert flag.dispatch == "dispatcher"
    flag = build_agent_config(FileConfig(), env={}, dispatch="broadcast")
    assert flag.dispatch == "broadcast"
    file = FileConfig(agent={"dispatch": "broadcast"})
    assert build_agent_config(file, env={}).dispatch == "broadcast"
    env_over_file = build_agent_config(file, env={"SHERI_DISPATCH": "dispatcher"})
    assert env_over_file.dispatch == "dispatcher"
    with pytest.raises(ConfigError, match=r"^--dispatch: "):
        build_agent_config(FileConfig(), env={}, dispatch="shared")
    with pytest.raises(ConfigError, match=r"^SHERI_DISPATCH: "):
        build_agent_config(FileConfig(), env={"SHERI_DISPATCH": "shared"})
    assert AgentConfig().dispatch_session_expiry == 7 * 86_400


def test_a_term_lost_while_its_decider_publishes_ends_lost_not_failed() -> None:
    """The connection lost while the decider publishes raises ClientClosed inside the
    term's nursery, as a group: the term ends `lost` (the candidate stands again at
    once), not `failed` (a backoff), which is what the broker's restart is."""
    from sheri_trio.mqtt import ClientClosed
    from sheri_trio.swarm._dispatching import _ended_by, _one_error

    lost = ClientClosed("client stopped: connection lost")
    leaf = _one_error(BaseExceptionGroup("", [BaseExceptionGroup("", [lost])]))
    assert leaf is lost
    assert _ended_by(leaf) == (TermEnd.LOST, str(lost))
    assert _one_error(BaseExceptionGroup("", [lost, ValueError("a bug")])) is None
    assert _ended_by(trio.TooSlowError())[0] is TermEnd.FAILED


# ------------------------------------------------------------- with a claim store
class CountingStore:
    """A real claim store that counts the dispatcher's claims: each batch's size, and
    the claims asked one by one."""

    def __init__(self, inner: ClaimStore) -> None:
        self.inner = inner
        self.batches: list[int] = []
        self.refused_batches = 0
        self.single = 0
        self.refused = trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[Verdict]:
        self.batches.append(len(requests))
        try:
            return await self.inner.claim_many(requests)
        except Exception:
            self.refused_batches += 1
            self.refused.set()
            raise

    async def claim(self, *args: Any, **kwargs: Any) -> Verdict:
        self.single += 1
        return await self.inner.claim(*args, **kwargs)

    async def takeover(self, *args: Any, **kwargs: Any) -> Verdict:
        self.single += 1
        return await self.inner.takeover(*args, **kwargs)


@contextmanager
def store_url(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "redis":
        with RedisServer(tmp_path / "redis") as server:
            yield server.url()
        return
    with throwaway_database() as name:
        yield pg_url(name)


async def wait_queued(candidate: Candidate, n: int) -> None:
    def queued() -> bool:
        shell = candidate.shell
        return shell is not None and shell.core.queued() == n

    await eventually(queued)


@pytest.mark.parametrize("kind", ["redis", "postgresql"])
async def test_with_a_store_a_round_of_assignments_is_one_claim_many(
    broker: MosquittoBroker, tmp_path: Path, kind: str
) -> None:
    """Tasks queued while no agent is free, then one agent registers with a slot for each:
    the round's assignments are one store call, and each task runs once."""
    swarm = f"d-batch-{kind}"
    tally = Tally()
    ids = [f"t{i}" for i in range(8)]
    with store_url(kind, tmp_path) as url, trio.fail_after(30):
        config = replace(
            dispatcher_config(broker, "d1", swarm), store=parse_store_url(url, source="flag")
        )
        async with open_store(config.store, swarm) as real, scene(broker, swarm, tally) as sc:
            counting = CountingStore(real)
            store = cast("ClaimStore", counting)
            candidate = Candidate(config, sc.follow, delay=ELECTION, store=store)
            await elect(sc.nursery, candidate, sc.submitter)
            await sc.submit(ids)
            await wait_queued(candidate, len(ids))
            await sc.agent("a0", max_tasks=len(ids))
            await tally.wait_for(lambda: len(tally.completed) == len(ids))
            await sc.end(candidate)
    assert_each_once(tally, ids)
    assert counting.batches == [len(ids)]
    assert counting.single == 0


async def test_a_batch_without_the_store_goes_back_whole_then_runs(
    broker: MosquittoBroker,
) -> None:
    """The store refuses connections as the round's batch goes out: every assignment of
    it goes back to the queue; once the store answers, the next round's batch has them
    all, and each task runs once."""
    swarm = "d-batch-down"
    tally = Tally()
    ids = [f"t{i}" for i in range(6)]
    with throwaway_database() as name, trio.fail_after(30):
        config = replace(
            dispatcher_config(broker, "d1", swarm),
            store=parse_store_url(pg_url(name), source="flag"),
        )
        async with open_store(config.store, swarm) as real, scene(broker, swarm, tally) as sc:
            counting = CountingStore(real)
            candidate = Candidate(
                config, sc.follow, delay=ELECTION, store=cast("ClaimStore", counting)
            )
            await elect(sc.nursery, candidate, sc.submitter)
            await sc.submit(ids)
            await wait_queued(candidate, len(ids))
            await trio.to_thread.run_sync(set_accepting, name, False)
            try:
                await sc.agent("a0", max_tasks=len(ids))
                await counting.refused.wait()
                shell = candidate.shell
                assert shell is not None
                assert shell.core.counters["store_unavailable"] == len(ids)
                assert shell.core.queued() == len(ids)
            finally:
                await trio.to_thread.run_sync(set_accepting, name, True)
            await tally.wait_for(lambda: len(tally.completed) == len(ids))
            assert candidate.shell is shell  # the same term: it was never deposed
            await sc.end(candidate)
    assert_each_once(tally, ids)
    assert counting.batches == [len(ids), len(ids)]
    assert counting.refused_batches == 1
    assert counting.single == 0
