"""The claim stores against real servers: one suite for every backend (broker, a private
redis-server, a throw-away PostgreSQL database), then each backend's faults.

Leases are short (300 ms) and judged by the server's clock, so tests that need one to
run out wait for it with a bounded poll on the store's own answer (``hold().live``).
Racers are separate stores (separate clients, as separate agents), except for the broker
store, which is one process's view of the broker's order.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import psycopg
import pytest
import redis
import trio
from store_helpers import (
    free_port,
    pg_url,
    set_accepting,
    throwaway_database,
    wait_until,
)

from sheri_trio.stores import (
    BrokerStore,
    ClaimRequest,
    ClaimStore,
    Hold,
    Leadership,
    StoreAuthError,
    StoreConfig,
    StoreConfigError,
    StoreSchemaError,
    StoreTLS,
    StoreUnavailable,
    StoreUnreachable,
    Verdict,
    connect_store,
    open_store,
    parse_store_url,
    resolve_store,
)
from sheri_trio.testing import RedisServer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
    from pathlib import Path

T = TypeVar("T")
LEASE = 0.3  # runs out soon: the tests wait for it (bounded)
SHORT = 1.0  # still live at the next call, even on a loaded machine
LONG = 30.0
RACERS = 6
TASK = "task-1"
OUTCOME = {"status": "success", "result": {"n": 1}, "attempt": 1}


# -- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the module's suite; tests use swarms of their own."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, free to be stopped and restarted (empty)."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """A throw-away database on the machine's PostgreSQL, dropped at the end."""
    with throwaway_database() as name:
        yield name


@pytest.fixture
def fresh_pg_database() -> Iterator[str]:
    """A database of the test's own."""
    with throwaway_database() as name:
        yield name


@dataclass
class Backend:
    kind: str
    config: StoreConfig
    swarm: str
    shared: BrokerStore | None = None

    @property
    def judges_leases(self) -> bool:
        """The broker store leaves a task's lease to the caller's presence judgement."""
        return self.kind != "broker"

    @contextlib.asynccontextmanager
    async def open(self, count: int = 1) -> AsyncIterator[list[ClaimStore]]:
        if self.shared is not None:
            yield [self.shared] * count
            return
        async with contextlib.AsyncExitStack() as stack:
            yield [
                await stack.enter_async_context(open_store(self.config, self.swarm))
                for _ in range(count)
            ]


@pytest.fixture(params=["broker", "redis", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Backend:
    swarm = f"test-{secrets.token_hex(4)}"
    if request.param == "broker":
        return Backend("broker", resolve_store("broker"), swarm, BrokerStore(swarm))
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return Backend("redis", parse_store_url(server.url(), source="flag"), swarm)
    database: str = request.getfixturevalue("pg_database")
    return Backend("postgresql", parse_store_url(pg_url(database), source="flag"), swarm)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[ClaimStore]:
    async with backend.open() as (one,):
        yield one


async def lapsed(store: ClaimStore, task_id: str = TASK) -> None:
    """Wait (bounded) until the store says the task's lease has run out."""

    async def gone() -> bool:
        hold = await store.hold(task_id)
        return hold is None or not hold.live

    await wait_until(gone)


async def race(n: int, fn: Callable[[int], Awaitable[T]]) -> list[T]:
    """Run ``fn(i)`` for i in range(n) concurrently; their results in order."""
    results: dict[int, T] = {}

    async def one(i: int) -> None:
        results[i] = await fn(i)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    return [results[i] for i in range(n)]


# -- the suite, for every backend --------------------------------------------


async def test_the_first_claim_wins_and_a_second_claim_of_the_attempt_loses(
    store: ClaimStore,
) -> None:
    assert await store.hold(TASK) is None
    assert await store.claim(TASK, 1, "a", LONG) is Verdict.WON
    assert await store.claim(TASK, 1, "b", LONG) is Verdict.LOST
    assert await store.claim(TASK, 1, "a", LONG) is Verdict.WON  # a retry: same answer
    hold = await store.hold(TASK)
    assert hold is not None
    assert (hold.attempt, hold.holder, hold.live, hold.released, hold.finished) == (
        1,
        "a",
        True,
        False,
        False,
    )


async def test_racing_claims_of_one_attempt_have_one_winner(backend: Backend) -> None:
    async with backend.open(RACERS) as stores:
        for task in (f"task-{k}" for k in range(5)):

            async def claim(i: int, task: str = task) -> Verdict:
                return await stores[i].claim(task, 1, f"agent-{i}", LONG)

            verdicts = await race(RACERS, claim)
            assert sorted(v.value for v in verdicts) == ["lost"] * (RACERS - 1) + ["won"]
            hold = await stores[0].hold(task)
            assert hold is not None
            assert hold.holder == f"agent-{verdicts.index(Verdict.WON)}"


async def test_a_newer_attempt_waits_for_a_release_and_an_older_one_is_stale(
    store: ClaimStore,
) -> None:
    assert await store.claim(TASK, 1, "a", LONG) is Verdict.WON
    assert await store.claim(TASK, 2, "b", LONG) is Verdict.HELD
    assert await store.release(TASK, 1, "b") is False  # not the holder
    assert await store.release(TASK, 1, "a") is True
    assert await store.release(TASK, 1, "a") is True  # a retry
    hold = await store.hold(TASK)
    assert hold is not None
    assert hold.released
    assert not hold.live
    assert await store.renew(TASK, 1, "a", LONG) is False
    assert await store.assert_hold(TASK, 1, "a", LONG) is False
    assert await store.finish(TASK, 1, "a", OUTCOME) is False
    assert await store.claim(TASK, 1, "c", LONG) is Verdict.LOST
    assert await store.claim(TASK, 2, "b", LONG) is Verdict.WON
    assert await store.claim(TASK, 1, "c", LONG) is Verdict.STALE


async def test_renew_keeps_the_hold(backend: Backend, store: ClaimStore) -> None:
    assert await store.claim(TASK, 1, "a", SHORT) is Verdict.WON
    assert await store.renew(TASK, 1, "b", SHORT) is False
    assert await store.renew(TASK, 2, "a", SHORT) is False
    start = trio.current_time()
    span = 2 * SHORT if backend.judges_leases else 0.0
    while True:  # heartbeats for two leases' worth
        assert await store.renew(TASK, 1, "a", SHORT) is True
        if trio.current_time() - start >= span:
            break
        await trio.sleep(SHORT / 10)
    hold = await store.hold(TASK)
    assert hold is not None
    assert hold.live
    assert hold.holder == "a"
    if backend.judges_leases:
        takeover = await store.takeover(TASK, 2, "b", LEASE, holder_dead=True)
        assert takeover is Verdict.HELD


async def test_takeover_after_the_lease_ran_out_happens_exactly_once(backend: Backend) -> None:
    async with backend.open(RACERS) as stores:
        first = stores[0]
        assert await first.claim(TASK, 1, "a", SHORT) is Verdict.WON
        with pytest.raises(ValueError, match="dead"):
            await first.takeover(TASK, 2, "b", LEASE, holder_dead=False)
        if backend.judges_leases:
            assert await first.takeover(TASK, 2, "b", LONG, holder_dead=True) is Verdict.HELD
            await lapsed(first)
            assert await first.renew(TASK, 1, "a", LEASE) is False  # lapsed: not renewed

        verdicts = await race(
            RACERS,
            lambda i: stores[i].takeover(TASK, 2, f"agent-{i}", LONG, holder_dead=True),
        )
        assert sorted(v.value for v in verdicts) == ["lost"] * (RACERS - 1) + ["won"]
        winner = f"agent-{verdicts.index(Verdict.WON)}"
        hold = await first.hold(TASK)
        assert hold is not None
        assert (hold.attempt, hold.holder) == (2, winner)
        # the stale holder is fenced off
        assert await first.finish(TASK, 1, "a", OUTCOME) is False
        assert await first.assert_hold(TASK, 1, "a", LEASE) is False
        assert await first.release(TASK, 1, "a") is False
        assert await first.claim(TASK, 1, "a", LEASE) is Verdict.STALE
        assert await first.takeover(TASK, 2, "x", LEASE, holder_dead=True) is Verdict.LOST
        assert await first.finish(TASK, 2, winner, {"attempt": 2}) is True
        stored = await first.outcome(TASK)
        assert stored is not None
        assert (stored.attempt, stored.holder) == (2, winner)


async def test_exactly_one_finish_is_accepted_and_the_outcome_is_kept(
    backend: Backend,
) -> None:
    async with backend.open(RACERS) as stores:
        first = stores[0]
        assert await first.outcome(TASK) is None
        assert await first.claim(TASK, 1, "a", LONG) is Verdict.WON
        accepted = await race(
            RACERS,
            lambda i: stores[i].finish(TASK, 1, "a" if i == 0 else f"agent-{i}", OUTCOME),
        )
        assert accepted == [True] + [False] * (RACERS - 1)
        assert await first.finish(TASK, 1, "a", {"other": True}) is True  # a retry: kept
        stored = await first.outcome(TASK)
        assert stored is not None
        assert (stored.task_id, stored.attempt, stored.holder) == (TASK, 1, "a")
        assert stored.outcome == OUTCOME
        hold = await first.hold(TASK)
        assert hold is not None
        assert hold.finished
        assert not hold.live
        assert await first.claim(TASK, 2, "b", LONG) is Verdict.FINISHED
        assert await first.takeover(TASK, 2, "b", LONG, holder_dead=True) is Verdict.FINISHED
        assert await first.renew(TASK, 1, "a", LONG) is False
        assert await first.assert_hold(TASK, 1, "a", LONG) is False


async def finish_or_takeover(backend: Backend, task: str) -> tuple[bool, Verdict]:
    """The holder's late finish and another's takeover, at once."""
    async with backend.open(2) as (holder, other):
        assert await holder.claim(task, 1, "a", LEASE) is Verdict.WON
        if backend.judges_leases:
            await lapsed(holder, task)
        results: dict[str, object] = {}

        async def finish() -> None:
            results["finish"] = await holder.finish(task, 1, "a", OUTCOME)

        async def take() -> None:
            results["takeover"] = await other.takeover(task, 2, "b", LONG, holder_dead=True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(finish)
            nursery.start_soon(take)
        finished, took = results["finish"], results["takeover"]
        assert isinstance(finished, bool)
        assert isinstance(took, Verdict)
        stored = await other.outcome(task)
        assert (stored is not None) is finished
        return finished, took


async def test_a_late_finish_and_a_takeover_race_one_of_them_wins(backend: Backend) -> None:
    for round_ in range(3):
        outcome = await finish_or_takeover(backend, f"race-{round_}")
        assert outcome in ((True, Verdict.FINISHED), (False, Verdict.WON))


async def test_a_store_that_lost_the_record_lets_the_holder_reassert_or_finish(
    store: ClaimStore,
) -> None:
    assert await store.assert_hold(TASK, 3, "a", LONG) is True  # no record: re-created
    assert await store.assert_hold(TASK, 3, "a", LONG) is True
    assert await store.assert_hold(TASK, 3, "b", LONG) is False  # another holder exists
    assert await store.claim(TASK, 3, "b", LONG) is Verdict.LOST
    assert await store.finish("other-task", 2, "a", OUTCOME) is True  # no record: accepted
    assert await store.finish("other-task", 2, "b", OUTCOME) is False


async def test_leader_election_with_epochs(backend: Backend) -> None:
    async with backend.open(RACERS) as stores:
        first = stores[0]
        assert await first.leader("dispatch") is None
        terms = await race(
            RACERS, lambda i: stores[i].acquire_leader("dispatch", f"agent-{i}", LONG)
        )
        won = [t for t in terms if t is not None]
        assert len(won) == 1
        term = won[0]
        assert isinstance(term, Leadership)
        assert term.epoch == 1
        assert await first.leader("dispatch") == term
        assert await first.renew_leader(term, LONG) is True
        again = await first.acquire_leader("dispatch", term.holder, LONG)
        assert again == term  # its own term back
        assert await first.acquire_leader("other", "x", LONG) is not None  # names are apart
        assert await first.release_leader(Leadership("dispatch", "nobody", 1)) is False
        assert await first.release_leader(term) is True
        assert await first.leader("dispatch") is None
        assert await first.renew_leader(term, LONG) is False

        second = await first.acquire_leader("dispatch", "agent-x", SHORT)
        assert second is not None
        assert second.epoch == 2
        assert await first.acquire_leader("dispatch", "agent-y", SHORT) is None

        async def vacant() -> bool:
            return await first.leader("dispatch") is None

        await wait_until(vacant)
        assert await first.renew_leader(second, LEASE) is False  # lapsed: step down
        assert await first.release_leader(second) is False
        third = await first.acquire_leader("dispatch", "agent-y", LONG, known_epoch=10)
        assert third == Leadership("dispatch", "agent-y", 11)
        assert await first.renew_leader(second, LEASE) is False


async def test_bad_arguments_are_refused_locally(store: ClaimStore) -> None:
    with pytest.raises(ValueError, match="attempt"):
        await store.claim(TASK, 0, "a", LONG)
    with pytest.raises(ValueError, match="lease"):
        await store.claim(TASK, 1, "a", 0)
    with pytest.raises(ValueError, match="lease"):
        await store.acquire_leader("dispatch", "a", -1)


# -- batches: claim_many is claim/takeover one after the other ---------------


@contextlib.asynccontextmanager
async def two_swarms(backend: Backend) -> AsyncIterator[tuple[ClaimStore, ClaimStore]]:
    """Two stores of the backend on two new swarms (the same empty start)."""
    one, two = f"{backend.swarm}-one", f"{backend.swarm}-two"
    if backend.shared is not None:
        yield BrokerStore(one), BrokerStore(two)
        return
    async with open_store(backend.config, one) as a, open_store(backend.config, two) as b:
        yield a, b


async def one_by_one(store: ClaimStore, requests: Sequence[ClaimRequest]) -> list[Verdict]:
    verdicts = []
    for r in requests:
        if r.takeover:
            verdicts.append(
                await store.takeover(r.task_id, r.attempt, r.holder, r.lease, holder_dead=True)
            )
        else:
            verdicts.append(await store.claim(r.task_id, r.attempt, r.holder, r.lease))
    return verdicts


async def holds(store: ClaimStore, tasks: Sequence[str]) -> list[Hold | None]:
    return [await store.hold(t) for t in tasks]


async def test_a_batch_of_claims_gives_what_one_claim_after_the_other_gives(
    backend: Backend,
) -> None:
    """A table: every verdict, the same task more than once in the batch."""
    async with two_swarms(backend) as (batched, single):
        for s in (batched, single):
            assert await s.claim("done", 1, "a", LONG) is Verdict.WON
            assert await s.finish("done", 1, "a", OUTCOME) is True
            assert await s.claim("given", 1, "a", LONG) is Verdict.WON
            assert await s.release("given", 1, "a") is True
            assert await s.claim("held", 1, "a", LONG) is Verdict.WON
        # a takeover of a live lease: the store's clock says HELD; the broker store
        # takes the caller's word that the holder is dead
        took = Verdict.HELD if backend.judges_leases else Verdict.WON
        table = [
            (ClaimRequest("new", 1, "a", LONG), Verdict.WON),
            (ClaimRequest("new", 1, "b", LONG), Verdict.LOST),
            (ClaimRequest("new", 1, "a", LONG), Verdict.WON),  # the same claim again
            (ClaimRequest("new", 2, "b", LONG), Verdict.HELD),
            (ClaimRequest("done", 2, "b", LONG), Verdict.FINISHED),
            (ClaimRequest("done", 2, "b", LONG, takeover=True), Verdict.FINISHED),
            (ClaimRequest("given", 1, "c", LONG), Verdict.LOST),
            (ClaimRequest("given", 2, "c", LONG), Verdict.WON),
            (ClaimRequest("given", 2, "d", LONG), Verdict.LOST),
            (ClaimRequest("given", 1, "a", LONG), Verdict.STALE),
            (ClaimRequest("held", 2, "b", LONG, takeover=True), took),
            (
                ClaimRequest("held", 2, "c", LONG, takeover=True),
                Verdict.HELD if backend.judges_leases else Verdict.LOST,
            ),
        ]
        requests = [request for request, _ in table]
        assert await batched.claim_many(requests) == [verdict for _, verdict in table]
        assert await one_by_one(single, requests) == [verdict for _, verdict in table]
        tasks = ["new", "done", "given", "held"]
        assert await holds(batched, tasks) == await holds(single, tasks)
        assert await batched.claim_many([]) == []


async def test_random_batches_give_what_one_claim_after_the_other_gives(
    backend: Backend,
) -> None:
    """Seeded random batches over a few tasks (duplicates, stale, newer attempts,
    takeovers), with releases and finishes between them: the same verdicts and holds."""
    rng = random.Random(11)
    tasks = [f"task-{k}" for k in range(4)]
    async with two_swarms(backend) as (batched, single):
        for _ in range(12):
            requests = [
                ClaimRequest(
                    rng.choice(tasks),
                    rng.randint(1, 4),
                    rng.choice("abc"),
                    LONG,
                    takeover=rng.random() < 0.3,
                )
                for _ in range(rng.randint(1, 10))
            ]
            assert await batched.claim_many(requests) == await one_by_one(single, requests)
            now = await holds(batched, tasks)
            assert now == await holds(single, tasks)
            for hold in now:  # then each held task: released, finished or left
                if hold is None or hold.finished:
                    continue
                choice = rng.random()
                for s in (batched, single):
                    if choice < 0.3:
                        await s.release(hold.task_id, hold.attempt, hold.holder)
                    elif choice < 0.45:
                        await s.finish(hold.task_id, hold.attempt, hold.holder, OUTCOME)


async def test_racing_batches_have_one_winner_per_task(backend: Backend) -> None:
    """Batches of the same tasks in different orders, at once: one winner each, and
    no deadlock between them (PostgreSQL locks a batch's rows in one order)."""
    tasks = [f"task-{k}" for k in range(10)]
    async with backend.open(RACERS) as stores:

        async def batch(i: int) -> list[Verdict]:
            order = random.Random(i).sample(tasks, len(tasks))
            verdicts = await stores[i].claim_many(
                [ClaimRequest(t, 1, f"agent-{i}", LONG) for t in order]
            )
            return [verdicts[order.index(t)] for t in tasks]

        results = await race(RACERS, batch)
    for k in range(len(tasks)):
        assert sorted(r[k].value for r in results) == ["lost"] * (RACERS - 1) + ["won"]


async def test_a_bad_request_refuses_the_whole_batch_before_anything_is_asked(
    store: ClaimStore,
) -> None:
    with pytest.raises(ValueError, match="attempt"):
        await store.claim_many([ClaimRequest(TASK, 1, "a", LONG), ClaimRequest(TASK, 0, "a", LONG)])
    with pytest.raises(ValueError, match="lease"):
        await store.claim_many([ClaimRequest(TASK, 1, "a", LONG), ClaimRequest("x", 1, "a", 0)])
    assert await store.hold(TASK) is None


async def test_availability_probe_answers(store: ClaimStore) -> None:
    await store.ping()
    with trio.fail_after(5):
        await store.wait_available()


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:{port}/0", "postgresql://postgres@127.0.0.1:{port}/db"]
)
async def test_the_caller_s_cancel_scope_bounds_a_store_that_never_answers(url: str) -> None:
    """A listener that accepts connections (the kernel does) but never answers: the
    caller's cancel scope still ends the wait (the worker thread is abandoned)."""
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(8)
        config = parse_store_url(url.format(port=blackhole.getsockname()[1]), source="flag")
        start = trio.current_time()
        with trio.move_on_after(0.3) as scope:
            await connect_store(config, "s")
        assert scope.cancelled_caught
        assert trio.current_time() - start < 2


# -- the broker store's own rules --------------------------------------------


async def test_broker_store_leaves_the_task_lease_to_presence() -> None:
    store = BrokerStore("s")
    assert store.kind == "broker"
    assert store.swarm == "s"
    assert await store.claim(TASK, 1, "a", LEASE) is Verdict.WON
    # the caller saw the holder dead: the first takeover in order wins, at once
    assert await store.takeover(TASK, 2, "b", LEASE, holder_dead=True) is Verdict.WON
    assert await store.takeover(TASK, 2, "c", LEASE, holder_dead=True) is Verdict.LOST


async def test_broker_store_leadership_by_the_clock(autojump_clock: trio.abc.Clock) -> None:
    store = BrokerStore("s")
    term = await store.acquire_leader("dispatch", "a", 10)
    assert term is not None
    await trio.sleep(9.999)
    assert await store.renew_leader(term, 10)
    await trio.sleep(10)
    assert await store.leader("dispatch") is None
    assert not await store.renew_leader(term, 10)


async def test_broker_store_forgets_the_oldest_finished_tasks() -> None:
    store = BrokerStore("s", finished_limit=2)
    for i in range(3):
        assert await store.finish(f"t{i}", 1, "a", {"i": i})
    assert await store.outcome("t0") is None
    assert [(await store.outcome(f"t{i}")) is not None for i in (1, 2)] == [True, True]


# -- Redis -------------------------------------------------------------------


def redis_config(server: RedisServer, *, password: str | None = None) -> StoreConfig:
    return parse_store_url(server.url(), source="flag", password=password)


async def test_redis_restarted_empty_holders_reassert_and_no_one_holds_twice(
    fresh_redis: RedisServer,
) -> None:
    config = redis_config(fresh_redis)
    async with open_store(config, "s") as a, open_store(config, "s") as b:
        assert await a.claim("kept", 1, "a", LONG) is Verdict.WON
        assert await a.claim("taken", 1, "a", LONG) is Verdict.WON
        term = await a.acquire_leader("dispatch", "a", LONG)
        assert term is not None
        await trio.to_thread.run_sync(fresh_redis.restart)

        # the holder's renew fails (the key is gone), so it re-asserts its hold
        assert await a.renew("kept", 1, "a", LONG) is False
        assert await a.assert_hold("kept", 1, "a", LONG) is True
        assert await b.claim("kept", 1, "b", LONG) is Verdict.LOST
        # a is alive in presence, but b tries anyway: the lease is live again
        assert await b.takeover("kept", 2, "b", LONG, holder_dead=True) is Verdict.HELD
        assert await a.finish("kept", 1, "a", OUTCOME) is True

        # "taken": its holder was seen dead, and b took over before a re-asserted
        assert await b.takeover("taken", 2, "b", LONG, holder_dead=True) is Verdict.WON
        assert await a.assert_hold("taken", 1, "a", LONG) is False
        assert await a.finish("taken", 1, "a", OUTCOME) is False
        hold = await a.hold("taken")
        assert hold is not None
        assert (hold.attempt, hold.holder) == (2, "b")

        # the leader's term is gone with the data: it steps down; epochs keep growing
        assert await a.renew_leader(term, LONG) is False
        assert await b.acquire_leader("dispatch", "b", LONG, known_epoch=term.epoch) == (
            Leadership("dispatch", "b", term.epoch + 1)
        )


async def test_redis_stopped_is_unavailable_then_works_again(fresh_redis: RedisServer) -> None:
    async with open_store(redis_config(fresh_redis), "s") as store:
        assert await store.claim(TASK, 1, "a", LONG) is Verdict.WON
        fresh_redis.stop()
        with pytest.raises(StoreUnavailable, match="is unavailable") as info:
            await store.renew(TASK, 1, "a", LONG)
        assert not isinstance(info.value, StoreUnreachable)
        assert f"127.0.0.1:{fresh_redis.port}" in str(info.value)
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with trio.move_on_after(0.3) as probing:
            await store.wait_available()
        assert probing.cancelled_caught  # it waits while the store is away

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, fresh_redis.start)
            with trio.fail_after(10):
                await store.wait_available()
        # back, and empty: the holder re-asserts
        assert await store.assert_hold(TASK, 1, "a", LONG) is True
        assert await store.claim(TASK, 1, "b", LONG) is Verdict.LOST


async def test_redis_batch_unavailable_then_after_a_restart_and_a_script_flush(
    fresh_redis: RedisServer,
) -> None:
    batch = [ClaimRequest(TASK, 1, "a", LONG), ClaimRequest(TASK, 1, "b", LONG)]
    async with open_store(redis_config(fresh_redis), "s") as store:
        assert await store.claim_many(batch) == [Verdict.WON, Verdict.LOST]
        fresh_redis.stop()
        with pytest.raises(StoreUnavailable, match="is unavailable"):
            await store.claim_many(batch)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, fresh_redis.start)
            with trio.fail_after(10):
                await store.wait_available()
        # back, empty: no record and no script (NOSCRIPT: loaded, the batch sent again)
        assert await store.claim_many(batch[::-1]) == [Verdict.WON, Verdict.LOST]
        with redis.Redis(host=fresh_redis.host, port=fresh_redis.port) as admin_client:
            admin_client.script_flush()
        more = [ClaimRequest("other", 1, "a", LONG), *batch]
        assert await store.claim_many(more) == [Verdict.WON, Verdict.LOST, Verdict.WON]


async def test_redis_wrong_or_missing_password_is_a_credentials_error(
    tmp_path: Path,
) -> None:
    with RedisServer(tmp_path / "redis", password=True) as server:
        assert server.password is not None
        wrong = "not-the-" + secrets.token_hex(4)
        with pytest.raises(StoreAuthError, match="refused the credentials") as info:
            async with open_store(redis_config(server, password=wrong), "s"):
                pass  # pragma: no cover
        assert wrong not in str(info.value)
        with pytest.raises(StoreAuthError):
            async with open_store(redis_config(server), "s"):
                pass  # pragma: no cover

        environ = {"SHERI_CLAIM_STORE_PASSWORD": server.password}
        config = resolve_store(server.url(), source="flag", environ=environ)
        assert server.password not in repr(config)
        assert server.password not in config.url
        async with open_store(config, "s") as store:
            assert await store.claim(TASK, 1, "a", LONG) is Verdict.WON

        # the whole URL from the environment may carry the password
        url = f"redis://:{server.password}@127.0.0.1:{server.port}/0"
        config = resolve_store(environ={"SHERI_CLAIM_STORE": url})
        assert config.password == server.password
        async with open_store(config, "s") as store:
            assert await store.claim(TASK, 1, "a", LONG) is Verdict.WON


async def test_redis_acl_user_limited_to_the_claim_keys(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", password=True) as server:
        admin_client = redis.Redis(host=server.host, port=server.port, password=server.password)
        with admin_client:
            admin_client.acl_setuser(
                "claims",
                enabled=True,
                passwords=["+claims-pw"],
                keys=["sheri:*"],
                commands=["+@all", "-info"],
            )
            admin_client.acl_setuser(
                "nokeys", enabled=True, passwords=["+nokeys-pw"], commands=["+@all"]
            )
        url = f"redis://claims@127.0.0.1:{server.port}/0"
        config = resolve_store(url, environ={"SHERI_CLAIM_STORE_PASSWORD": "claims-pw"})
        assert config.url == f"redis://claims:***@127.0.0.1:{server.port}/0"
        async with open_store(config, "s") as store:  # no INFO: the version check pings
            assert await store.claim(TASK, 1, "a", LONG) is Verdict.WON
        url = f"redis://nokeys@127.0.0.1:{server.port}/0"
        config = resolve_store(url, environ={"SHERI_CLAIM_STORE_PASSWORD": "nokeys-pw"})
        async with open_store(config, "s") as store:
            with pytest.raises(StoreAuthError, match="denies the user access"):
                await store.claim(TASK, 1, "a", LONG)


async def test_redis_unreachable_at_open() -> None:
    port = free_port()
    config = parse_store_url(f"redis://127.0.0.1:{port}/0", source="flag")
    with pytest.raises(StoreUnreachable, match="is unreachable") as info:
        async with open_store(config, "s"):
            pass  # pragma: no cover
    assert f"127.0.0.1:{port}" in str(info.value)


async def test_rediss_verifies_the_server_certificate(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", tls=True, password=True) as server:
        assert server.url().startswith("rediss://localhost:")
        password = server.password
        trusted = parse_store_url(
            server.url(), source="flag", tls=StoreTLS(ca_file=server.ca_path), password=password
        )
        async with open_store(trusted, "s") as store:
            assert await store.claim(TASK, 1, "a", LONG) is Verdict.WON
        untrusted = parse_store_url(server.url(), source="flag", password=password)
        with pytest.raises(StoreUnreachable, match="certificate verify failed"):
            async with open_store(untrusted, "s"):
                pass  # pragma: no cover
        insecure = parse_store_url(
            server.url(), source="flag", tls=StoreTLS(insecure=True), password=password
        )
        async with open_store(insecure, "s") as store:
            assert await store.claim(TASK, 1, "a", LONG) is Verdict.WON


async def test_rediss_with_a_client_certificate(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", tls=True, client_certs=True) as server:
        cert, key = server.issue_client_cert()
        tls = StoreTLS(ca_file=server.ca_path, cert_file=cert, key_file=key)
        async with open_store(parse_store_url(server.url(), source="flag", tls=tls), "s") as s:
            assert await s.claim(TASK, 1, "a", LONG) is Verdict.WON
        without = parse_store_url(server.url(), source="flag", tls=StoreTLS(ca_file=server.ca_path))
        with pytest.raises(StoreUnreachable):
            async with open_store(without, "s"):
                pass  # pragma: no cover


async def test_redis_keys_carry_the_swarm(redis_server: RedisServer) -> None:
    config = redis_config(redis_server)
    async with open_store(config, "one") as one, open_store(config, "two") as two:
        assert await one.claim(TASK, 1, "a", LONG) is Verdict.WON
        assert await two.claim(TASK, 1, "b", LONG) is Verdict.WON


# -- PostgreSQL --------------------------------------------------------------


def pg_config(database: str, user: str = "postgres") -> StoreConfig:
    return parse_store_url(pg_url(database, user), source="flag")


async def test_postgres_unavailable_then_works_again(fresh_pg_database: str) -> None:
    async with open_store(pg_config(fresh_pg_database), "s") as store:
        assert await store.claim(TASK, 1, "a", LONG) is Verdict.WON
        await trio.to_thread.run_sync(set_accepting, fresh_pg_database, False)
        try:
            with pytest.raises(StoreUnavailable, match="is unavailable"):
                await store.renew(TASK, 1, "a", LONG)
            with pytest.raises(StoreUnavailable):
                await store.ping()
            with trio.move_on_after(0.3) as probing:
                await store.wait_available()
            assert probing.cancelled_caught
        finally:
            await trio.to_thread.run_sync(set_accepting, fresh_pg_database, True)
        with trio.fail_after(10):
            await store.wait_available()
        assert await store.renew(TASK, 1, "a", LONG) is True  # nothing was lost


async def test_postgres_batch_unavailable_then_works_again(fresh_pg_database: str) -> None:
    batch = [ClaimRequest(TASK, 1, "a", LONG), ClaimRequest(TASK, 1, "b", LONG)]
    async with open_store(pg_config(fresh_pg_database), "s") as store:
        assert await store.claim_many(batch) == [Verdict.WON, Verdict.LOST]
        await trio.to_thread.run_sync(set_accepting, fresh_pg_database, False)
        try:
            with pytest.raises(StoreUnavailable, match="is unavailable"):
                await store.claim_many(batch[::-1])
        finally:
            await trio.to_thread.run_sync(set_accepting, fresh_pg_database, True)
        with trio.fail_after(10):
            await store.wait_available()
        # nothing was lost, and the refused batch took no effect
        assert await store.claim_many(batch[::-1]) == [Verdict.LOST, Verdict.WON]


async def test_postgres_open_errors(fresh_pg_database: str) -> None:
    port = free_port()
    unreachable = parse_store_url(f"postgresql://postgres@127.0.0.1:{port}/x", source="flag")
    with pytest.raises(StoreUnreachable, match="is unreachable"):
        async with open_store(unreachable, "s"):
            pass  # pragma: no cover
    with pytest.raises(StoreAuthError, match="refused the credentials"):
        async with open_store(pg_config(fresh_pg_database, user="no_such_role"), "s"):
            pass  # pragma: no cover
    with pytest.raises(StoreConfigError, match="does not exist"):
        async with open_store(pg_config("sheri_no_such_database"), "s"):
            pass  # pragma: no cover


async def test_postgres_schema_version_is_checked(fresh_pg_database: str) -> None:
    config = pg_config(fresh_pg_database)
    async with open_store(config, "s"):
        pass
    async with open_store(config, "s"):  # a second open finds the tables
        pass

    def bump() -> None:
        with psycopg.connect(
            host="127.0.0.1", user="postgres", dbname=fresh_pg_database, autocommit=True
        ) as conn:
            conn.execute("UPDATE sheri_store_schema SET version = 99")

    await trio.to_thread.run_sync(bump)
    with pytest.raises(StoreSchemaError, match="schema version 99"):
        async with open_store(config, "s"):
            pass  # pragma: no cover


async def test_postgres_concurrent_first_opens_create_the_schema_once(
    fresh_pg_database: str,
) -> None:
    config = pg_config(fresh_pg_database)

    async def one(i: int) -> Verdict:
        async with open_store(config, "s") as store:
            return await store.claim(TASK, 1, f"agent-{i}", LONG)

    verdicts = await race(4, one)
    assert sorted(v.value for v in verdicts) == ["lost"] * 3 + ["won"]
