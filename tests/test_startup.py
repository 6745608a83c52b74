"""An agent's start-up: named steps, each bounded; shutdown at every step.

Unit tests of :class:`Startup` run on trio's MockClock; the rest run :func:`run_agent`
against a real mosquitto frozen with SIGSTOP at a chosen point of the start-up (on a log
line the agent writes just before the step's I/O, see ``childproc.FreezeBroker``).
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
import trio
from childproc import freeze_broker_on

from sheri_trio.mqtt import ConnectError, PublishError, open_client
from sheri_trio.swarm._agent import AgentConfig, run_agent
from sheri_trio.swarm._messages import encode
from sheri_trio.swarm._protocol import Topics
from sheri_trio.swarm._startup import (
    Startup,
    StartupError,
    StartupStep,
    agent_connection,
    read_retained,
    startup_timeout,
)
from sheri_trio.testing import MosquittoBroker

if TYPE_CHECKING:
    from pathlib import Path

#: the broker's steps (dispatch mode and the claim store have tests of their own)
STEPS = [s for s in StartupStep if s not in (StartupStep.DISPATCHER, StartupStep.CLAIM_STORE)]

#: the bound of each step, and of a client's close, in the tests against a frozen broker
BOUND = 1.0
CLOSE = 0.3


# ---------------------------------------------------------------- Startup itself
async def test_each_step_gets_its_bound_and_progress_renews_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    startup = Startup("a1", 2.0)

    async def steps() -> None:
        with startup.bounded():
            with startup.step(StartupStep.SUBSCRIBE):
                await trio.sleep(1.5)
            with startup.step(StartupStep.LOAD_TASK_STATES):  # a bound of its own, from now
                await trio.sleep(1.5)
                startup.renew()  # a message came: 2 s again
                await trio.sleep(1.5)
            await trio.sleep(100)  # between steps: unbounded
            with startup.step(StartupStep.ANNOUNCE):
                await trio.sleep_forever()

    with pytest.raises(StartupError) as info:
        await steps()
    assert trio.current_time() == 1.5 + 3.0 + 100 + 2.0
    assert info.value.step is StartupStep.ANNOUNCE
    assert info.value.seconds == 2.0
    assert str(info.value) == (
        "agent a1: start-up step 'announce' did not finish within 2 s (waiting for the "
        "PUBACK of our online status and registration): the broker accepted the connection "
        "but does not answer (stalled or overloaded?); the bound is [agent] startup_timeout "
        "(default: [broker] connect_timeout)"
    )
    assert not startup.finished


async def test_finished_after_announce_and_unbounded_from_then(
    autojump_clock: trio.testing.MockClock,
) -> None:
    startup = Startup("a1", 1.0)
    with startup.bounded():
        for step in STEPS:
            with startup.step(step):
                assert startup.current is step
                await trio.sleep(0.5)
        assert startup.finished
        assert startup.current is None
        await trio.sleep(1000)  # the agent's life, under the same scope
    assert trio.current_time() == 0.5 * len(STEPS) + 1000


async def test_interrupt_stops_the_step_quietly(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    startup = Startup("a1", 10.0)
    caplog.set_level(logging.INFO, logger="sheri_trio.agent")
    async with trio.open_nursery() as nursery:
        with startup.bounded():
            with startup.step(StartupStep.SUBSCRIBE):
                nursery.start_soon(partial(_later, 3, startup.interrupt))
                await trio.sleep_forever()
    assert trio.current_time() == 3
    assert startup.interrupted
    assert startup.current is StartupStep.SUBSCRIBE
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "start-up: subscribe agent=a1 timeout=10",
        "start-up interrupted: nothing to release agent=a1 step=subscribe",
    ]


async def test_without_a_bound_steps_are_only_logged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    startup = Startup("a1")  # what Agent.run uses when it is not given one
    with startup.step(StartupStep.SUBSCRIBE):
        await trio.sleep(10_000)
    with startup.bounded(), startup.step(StartupStep.ANNOUNCE):
        await trio.sleep(10_000)
    assert startup.finished


async def _later(delay: float, fn: Any) -> None:
    await trio.sleep(delay)
    fn()


def test_the_bound_is_startup_timeout_else_connect_timeout() -> None:
    assert startup_timeout(AgentConfig(broker="mqtt://x")) == 10.0  # the client's default
    assert startup_timeout(AgentConfig(client_options={"connect_timeout": 3})) == 3.0
    both = AgentConfig(startup_timeout=1.5, client_options={"connect_timeout": 3})
    assert startup_timeout(both) == 1.5


# --------------------------------------------------- against a frozen mosquitto
def _config(broker: MosquittoBroker, agent_id: str, **kw: Any) -> AgentConfig:
    options: dict[str, Any] = {
        "role": "testing",
        "agent_id": agent_id,
        "swarm": f"startup-{secrets.token_hex(3)}",
        "broker": broker.tcp_url,
        "heartbeat_interval": 0.5,
        "lease_time": 2.0,
        "grace_period": 2.0,
        "startup_timeout": BOUND,
        "client_options": {"connect_timeout": 5.0, "close_timeout": CLOSE},
        "executor_config": {"executors": {"simulate": True}},
    }
    options.update(kw)
    return AgentConfig(**options)


def _freeze_at(step: StartupStep, agent_id: str) -> str:
    """The log line on which to freeze the broker so that ``step`` cannot finish."""
    if step is StartupStep.PROBE:  # the probe connected; its SUBSCRIBE goes unanswered
        return rf"^connected to .* as '{agent_id}\.probe\."
    if step is StartupStep.SUBSCRIBE:  # the agent connected; its SUBSCRIBE goes unanswered
        return rf"^connected to .* as '{agent_id}'"
    return rf"^start-up: {step.value} agent={agent_id} "  # before the step's first packet


@pytest.mark.parametrize("step", STEPS, ids=[s.name.lower() for s in STEPS])
async def test_a_frozen_broker_fails_the_step_within_its_bound(
    fresh_broker: MosquittoBroker, caplog: pytest.LogCaptureFixture, step: StartupStep
) -> None:
    pid = fresh_broker.pid
    assert pid is not None
    config = _config(fresh_broker, "frozen-1")
    caplog.set_level(logging.INFO, logger="sheri_trio")
    started = trio.current_time()
    with trio.fail_after(20), freeze_broker_on(pid, _freeze_at(step, "frozen-1")) as freezer:
        with pytest.raises(StartupError) as info:
            await run_agent(config)
        elapsed = trio.current_time() - started
    assert freezer.frozen
    assert info.value.step is step
    assert f"agent frozen-1: start-up step '{step.value}' did not finish within 1 s" in str(
        info.value
    )
    # the bound, then the clients' clean-up against a broker that answers nothing: up to
    # two unsubscribes (the sync's, the agent's) and the close, CLOSE each
    assert BOUND <= elapsed <= BOUND + 3 * CLOSE + 1.0, elapsed
    messages = [r.getMessage() for r in caplog.records]
    assert f"start-up: {step.value} agent=frozen-1 timeout=1" in messages
    assert not any(m.startswith("online") for m in messages)


async def test_no_connack_is_the_clients_connect_timeout_named_by_step(
    fresh_broker: MosquittoBroker,
) -> None:
    pid = fresh_broker.pid
    assert pid is not None
    config = _config(
        fresh_broker,
        "frozen-2",
        startup_timeout=5.0,
        client_options={"connect_timeout": 0.5, "close_timeout": CLOSE},
    )
    with trio.fail_after(20), freeze_broker_on(pid, r"^start-up: connect agent=frozen-2 "):
        with pytest.raises(ConnectError) as info:
            await run_agent(config)
    assert str(info.value).startswith("agent frozen-2 (start-up step 'connect'): cannot connect")
    assert "no answer within 0.5 s" in str(info.value)


@pytest.mark.parametrize(
    "step",
    [StartupStep.PROBE, StartupStep.SUBSCRIBE, StartupStep.ANNOUNCE],
    ids=["probe", "subscribe", "announce"],
)
async def test_shutdown_during_start_up_ends_within_the_grace_period(
    fresh_broker: MosquittoBroker, caplog: pytest.LogCaptureFixture, step: StartupStep
) -> None:
    pid = fresh_broker.pid
    assert pid is not None
    config = _config(fresh_broker, "frozen-3", startup_timeout=60.0)
    shutdown = trio.Event()
    frozen = trio.Event()
    caplog.set_level(logging.INFO, logger="sheri_trio")
    with trio.fail_after(20), freeze_broker_on(pid, _freeze_at(step, "frozen-3"), frozen.set):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(run_agent, config, shutdown=shutdown))
            await frozen.wait()
            shutdown.set()
            asked = trio.current_time()
        took = trio.current_time() - asked  # run_agent returned: no error, nothing raised
    assert took <= config.grace_period, took
    messages = [r.getMessage() for r in caplog.records]
    assert f"start-up interrupted: nothing to release agent=frozen-3 step={step.value}" in messages
    assert not any(m.startswith("online") for m in messages)


# ------------------------------------------------------------------- the will
async def _retained_status(broker: MosquittoBroker, config: AgentConfig) -> Any:
    topic = Topics(config.swarm).agent_status(config.agent_id)
    async with open_client(broker.tcp_url) as reader, reader.subscribe(topic) as messages:
        message = await messages.receive()
    return json.loads(message.payload)["payload"]["status"]


async def test_leaving_before_start_up_finished_lets_the_will_say_offline(
    broker: MosquittoBroker,
) -> None:
    """An interrupted start-up may have published our online status: the broker
    publishes the will (retained offline); after a finished one, the agent says offline
    itself, so the will is discarded (here: the status stays as we left it)."""
    for finished, expected in ((False, "offline"), (True, "online")):
        config = AgentConfig(
            role="testing",
            agent_id=f"will-{secrets.token_hex(3)}",
            swarm="startup-will",
            broker=broker.tcp_url,
        )
        startup = Startup(config.agent_id)
        startup.finished = finished
        topic = Topics(config.swarm).agent_status(config.agent_id)
        online = encode(config.agent_id, config.role, {"status": "online"})
        with trio.fail_after(10):
            async with agent_connection(config, startup) as client:
                await client.publish(topic, online, qos=1, retain=True)
            assert await _retained_status(broker, config) == expected


@pytest.mark.parametrize("dispatch", ["broadcast", "dispatcher"])
async def test_a_refused_request_is_a_start_up_error_naming_the_step(
    tmp_path: Path, dispatch: str
) -> None:
    """mosquitto grants SUBSCRIBEs its ACL denies (and delivers nothing); it refuses
    the publish of our sync marker (broadcast: behind the retained task states;
    dispatcher: in our inbox, behind its backlog): ``load task states`` fails, saying why."""
    acl = tmp_path / "acl"
    acl.write_text("user sheri\ntopic readwrite elsewhere/#\n")  # nothing of the swarm
    with MosquittoBroker(tmp_path / "mosquitto", tls=False, extra_config=f"acl_file {acl}") as b:
        config = _config(b, "refused-1", check_duplicate=False, dispatch=dispatch)
        with trio.fail_after(10), pytest.raises(StartupError) as info:
            await run_agent(config)
    assert info.value.step is StartupStep.LOAD_TASK_STATES
    assert isinstance(info.value.cause, PublishError)
    text = str(info.value)
    marker = "sync/" if dispatch == "broadcast" else "inbox'"
    assert text.startswith(
        "agent refused-1: start-up step 'load task states' failed: broker refused publish to "
        f"'{config.swarm}/agents/refused-1/{marker}"
    ), text
    assert text.endswith("': NOT_AUTHORIZED (0x87)"), text


async def test_a_claim_store_that_accepts_and_never_answers_fails_its_step(
    fresh_broker: MosquittoBroker,
) -> None:
    """A listening socket nobody serves: TCP connects, the store's handshake never ends."""
    from sheri_trio.stores import parse_store_url

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        config = _config(fresh_broker, "stalled-1", dispatch="broadcast")  # the store's mode
        config.store = parse_store_url(url, source="flag")
        with trio.fail_after(20), pytest.raises(StartupError) as info:
            await run_agent(config)
    assert info.value.step is StartupStep.CLAIM_STORE
    assert str(info.value).startswith(
        "agent stalled-1: start-up step 'claim store' did not finish within 1 s (waiting for "
        "the claim store's answer"
    )


# ------------------------------------------------------------------ read_retained
@pytest.mark.parametrize("records", [2_000, 20_000])
async def test_read_retained_takes_more_messages_than_a_subscription_buffers(
    broker: MosquittoBroker, records: int
) -> None:
    """The retained set may be far larger than the subscription's buffer: the read takes
    the messages while the marker goes out. (It waited for the marker's PUBACK first,
    which the broker may send behind the retained messages; with the buffer full the
    reader stopped, and the PUBACK never came.)"""
    prefix = f"rr-{secrets.token_hex(4)}"
    async with open_client(broker.tcp_url) as filler:
        for i in range(records):
            await filler.publish(
                f"{prefix}/s/{i}", b"x", qos=1, retain=True, wait_ack=i == records - 1
            )
    try:
        async with open_client(broker.tcp_url, message_buffer=50) as client:
            with trio.fail_after(30):
                found = await read_retained(client, f"{prefix}/sync", f"{prefix}/s/+")
        assert len(found) == records
    finally:
        async with open_client(broker.tcp_url) as cleaner:
            for i in range(records):
                await cleaner.publish(
                    f"{prefix}/s/{i}", b"", qos=1, retain=True, wait_ack=i == records - 1
                )
