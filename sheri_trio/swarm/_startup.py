"""An agent's start-up: named steps, each bounded, and a shutdown that works at every step.

Start-up is a sequence of :class:`StartupStep`: claim store (open and check it, when one is
configured), probe (is this agent id online already?),
connect (the agent's persistent session), subscribe, load task states, announce. One
cancel scope spans the whole start-up (:meth:`Startup.bounded`); each step
(:meth:`Startup.step`) logs its name and moves that scope's deadline to its bound, as the
client does for CONNACK. One scope, not one per step, because the connection and the
subscription a step opens outlive it: a scope of the step's own would have to close before
them. A step that runs out of time ends start-up with a :class:`StartupError` naming the
step and its likely cause. A shutdown requested before the agent is online
(:meth:`Startup.interrupt`) cancels the start-up where it is: nothing was claimed, so
nothing is released.

:meth:`Startup.guard` relays a shutdown event from the first step on;
:func:`~._agent.run_agent` puts it together with the probe, the connection and the agent.
Nothing here knows the agent itself.
"""

from __future__ import annotations

import enum
import logging
import math
import secrets
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .._exceptions import real_errors
from ..mqtt import ClientOptions, ConnectError, MQTTError, Will, open_client
from ._messages import Messages, encode
from ._protocol import BadMessage, Topics, decode_envelope

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from ..mqtt import Client, Message
    from ._config import AgentConfig

__all__ = [
    "DuplicateAgent",
    "Startup",
    "StartupError",
    "StartupStep",
    "agent_connection",
    "check_duplicate",
    "read_retained",
    "startup_timeout",
]

log = logging.getLogger("sheri_trio.agent")


class StartupStep(enum.Enum):
    """The steps of an agent's start-up, in order; the value is the name logged."""

    CLAIM_STORE = "claim store"  # a store other than the broker: opened and checked
    PROBE = "probe"
    CONNECT = "connect"
    SUBSCRIBE = "subscribe"
    LOAD_TASK_STATES = "load task states"
    DISPATCHER = "dispatcher"  # dispatch mode: until the swarm has an elected dispatcher
    ANNOUNCE = "announce"

    @property
    def waiting_for(self) -> str:
        """What the step waits for, in words."""
        return _WAITING_FOR[self]

    @property
    def likely_cause(self) -> str:
        """Why it most likely did not finish in time."""
        return _LIKELY_CAUSES[self]


_WAITING_FOR = {
    StartupStep.CLAIM_STORE: "the claim store's answer (connection, credentials, version)",
    StartupStep.PROBE: "the duplicate-id probe: its own connection, our retained status "
    "and its sync marker",
    StartupStep.CONNECT: "the CONNACK of the agent's persistent session",
    StartupStep.SUBSCRIBE: "the SUBACK of the agent's subscription to the swarm's topics",
    StartupStep.LOAD_TASK_STATES: "the retained task states and our sync marker behind them",
    StartupStep.ANNOUNCE: "the PUBACK of our online status and registration",
    StartupStep.DISPATCHER: "the swarm's dispatcher (the retained dispatch/status online): "
    "one of the agents in dispatch mode is elected",
}
_STALLED = "the broker accepted the connection but does not answer (stalled or overloaded?)"
_LIKELY_CAUSES = {
    StartupStep.CLAIM_STORE: "the claim store accepts connections but does not answer "
    "(stalled, overloaded, or a firewall dropping packets?); check --claim-store, "
    "SHERI_CLAIM_STORE or [agent] claim_store",
    StartupStep.PROBE: "the broker, or a proxy in front of it, does not answer "
    "(stalled or overloaded?)",
    StartupStep.CONNECT: "the broker, or a proxy in front of it, accepts TCP connections but "
    "does not answer them (stalled or overloaded?)",
    StartupStep.SUBSCRIBE: _STALLED,
    StartupStep.LOAD_TASK_STATES: _STALLED,
    StartupStep.ANNOUNCE: _STALLED,
    StartupStep.DISPATCHER: "no agent in dispatch mode could become the dispatcher (see the "
    "log for the election), or the swarm's other agents use dispatch = 'broadcast'",
}


class DuplicateAgent(RuntimeError):
    """An agent with this id is already online in the swarm."""


class StartupError(RuntimeError):
    """A start-up step did not finish within its bound, or failed with ``cause``.

    ``str()`` names the agent, the step, the bound, what the step waited for and the likely
    cause, e.g. ``agent a1: start-up step 'subscribe' did not finish within 10 s (waiting
    for the SUBACK of ...): the broker accepted the connection but does not answer ...``;
    or, with a cause (an MQTT error other than ``ConnectError``, which keeps its type):
    ``agent a1: start-up step 'subscribe' failed: subscription refused (...)``.
    """

    def __init__(
        self,
        agent_id: str,
        step: StartupStep,
        seconds: float | None,
        *,
        cause: BaseException | None = None,
    ) -> None:
        if cause is not None:
            text = f"agent {agent_id}: start-up step {step.value!r} failed: {cause}"
        else:
            text = (
                f"agent {agent_id}: start-up step {step.value!r} did not finish within "
                f"{seconds:g} s (waiting for {step.waiting_for}): {step.likely_cause}; "
                "the bound is [agent] startup_timeout (default: [broker] connect_timeout)"
            )
        super().__init__(text)
        self.agent_id = agent_id
        self.step = step
        self.seconds = seconds
        self.cause = cause


class Startup:
    """The steps of one agent's start-up under one cancel scope.

    ``timeout`` bounds each step (None: steps are only logged, e.g. an :class:`Agent` run
    by a test under its own ``fail_after``). Outside :meth:`bounded` steps are only logged.
    """

    def __init__(self, agent_id: str, timeout: float | None = None) -> None:
        self.agent_id = agent_id
        self.timeout = timeout
        #: the step in progress; after a failure or an interruption, the step it ended in
        self.current: StartupStep | None = None
        self._begun: StartupStep = StartupStep.CLAIM_STORE  # the last step begun
        #: every step finished: the agent is online
        self.finished = False
        self.interrupted = False
        self._scope: trio.CancelScope | None = None

    @contextmanager
    def bounded(self) -> Iterator[Startup]:
        """The scope of the whole start-up (and of what follows it, unbounded).

        Raises :class:`StartupError` when a step runs out of time; returns quietly when
        :meth:`interrupt` stopped the start-up.
        """
        with trio.CancelScope() as scope:
            self._scope = scope
            try:
                yield self
            finally:
                self._scope = None
        if not scope.cancelled_caught:
            return
        step = self.current or self._begun
        if self.interrupted:
            self._log(logging.INFO, "start-up interrupted: nothing to release", step=step.value)
            return
        assert self.timeout is not None  # only a deadline or interrupt() cancel this scope
        raise StartupError(self.agent_id, step, self.timeout)

    @contextmanager
    def step(self, step: StartupStep) -> Iterator[Startup]:
        """Log ``step`` and bound it: the start-up scope's deadline is ``timeout`` away."""
        self.current = self._begun = step
        started = trio.current_time()
        self._log(logging.INFO, f"start-up: {step.value}", timeout=self.timeout)
        self.renew()
        yield self
        # left normally (on an error or a cancellation, ``current`` keeps the step)
        if self._scope is not None:
            self._scope.deadline = math.inf
        self.current = None
        if step is StartupStep.ANNOUNCE:  # the last step: online
            self.finished = True
        elapsed = trio.current_time() - started
        self._log(logging.DEBUG, f"start-up: {step.value} done", seconds=f"{elapsed:.3f}")

    @asynccontextmanager
    async def guard(
        self, shutdown: trio.Event | None, on_shutdown: Callable[[], object]
    ) -> AsyncIterator[Startup]:
        """The start-up and the life after it, in :meth:`bounded`'s scope, with ``shutdown``
        relayed from the first step on: set before every step finished, it interrupts the
        start-up (the block is left quietly); after, it calls ``on_shutdown`` (the agent's
        graceful way out).

        Errors come out as themselves, not in groups. An MQTT error during a step becomes
        a :class:`StartupError` naming it; a ``ConnectError`` keeps its type (the CLI's
        hints depend on its reason code), its message names the step.
        """
        try:
            with self.bounded(), _single_error():
                async with trio.open_nursery() as nursery:
                    if shutdown is not None:
                        nursery.start_soon(self._relay, shutdown, on_shutdown)
                    yield self
                    nursery.cancel_scope.cancel()  # the relay
        except ConnectError as exc:
            step = f" (start-up step {self.current.value!r})" if self.current else ""
            raise ConnectError(
                f"agent {self.agent_id}{step}: {exc}",
                reason_code=exc.reason_code,
                retryable=exc.retryable,
            ) from None
        except MQTTError as exc:  # e.g. a refused publish or subscription, a lost connection
            if self.current is None:  # online: not a start-up error
                raise
            raise StartupError(self.agent_id, self.current, self.timeout, cause=exc) from exc

    async def _relay(self, shutdown: trio.Event, on_shutdown: Callable[[], object]) -> None:
        await shutdown.wait()
        if self.finished:
            on_shutdown()
        else:
            self.interrupt()

    def renew(self) -> None:
        """The current step made progress: give it its whole bound again from now."""
        if self._scope is not None and self.timeout is not None and self.current is not None:
            self._scope.deadline = trio.current_time() + self.timeout

    def interrupt(self) -> None:
        """Stop the start-up where it is (a shutdown requested before the agent is online)."""
        self.interrupted = True
        if self._scope is not None:
            self._scope.cancel()

    def _log(self, level: int, event: str, **fields: Any) -> None:
        if not log.isEnabledFor(level):
            return
        parts = [f"agent={self.agent_id}"]
        for key, value in fields.items():
            if value is not None:
                parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
        log.log(level, "%s %s", event, " ".join(parts), extra={"agent_id": self.agent_id})


@contextmanager
def _single_error() -> Iterator[None]:
    """Raise the one real error of a nursery's group as itself (Cancelled left out)."""
    try:
        yield
    except BaseExceptionGroup as group:
        real = real_errors(group)
        if len(real) == 1:
            raise real[0] from None
        raise


def startup_timeout(config: AgentConfig) -> float:
    """The bound of each start-up step: ``startup_timeout``, else the ``connect_timeout``."""
    if config.startup_timeout is not None:
        return config.startup_timeout
    connect = config.client_options.get("connect_timeout", ClientOptions().connect_timeout)
    return float(connect)


# ---------------------------------------------------------------------- helpers
async def publish_json(
    client: Client,
    topic: str,
    data: bytes,
    *,
    retain: bool = False,
    expiry: int | None = None,
    wait_ack: bool = True,
) -> int | None:
    """Publish an encoded message as the agent and the dispatcher do: QoS 1,
    ``application/json``, ``expiry`` its message expiry interval (None: none)."""
    return await client.publish(
        topic,
        data,
        qos=1,
        retain=retain,
        wait_ack=wait_ack,
        message_expiry_interval=expiry,
        content_type="application/json",
    )


async def read_retained(
    client: Client,
    sync_topic: str,
    *filters: str,
    into: list[Message] | None = None,
    progress: Callable[[], object] | None = None,
) -> list[Message]:
    """The retained (non-empty) messages on ``filters``.

    Subscribes to them and to ``sync_topic``, then publishes on ``sync_topic``: the broker
    sends a subscription's retained messages before it handles our later publish, so they
    have all arrived when the marker comes back. ``into`` collects them as they arrive (so a
    caller's timeout keeps what came). ``progress`` is called on every message that
    arrives: a caller whose deadline bounds the wait for the next message (the first one
    included) renews it there, so a large retained set is not cut short.
    """
    found = [] if into is None else into
    async with client.subscribe(*filters, sync_topic, qos=1) as messages:
        try:
            async with trio.open_nursery() as nursery:
                # The messages are taken while the marker's PUBACK is awaited, not after
                # it: the broker may send the PUBACK behind thousands of retained
                # messages, and with nobody taking them the subscription's buffer filled,
                # the reader stopped, and the PUBACK never came (100,000 retained task
                # states: a start-up that never ended). A refused marker still ends it.
                nursery.start_soon(partial(client.publish, sync_topic, b"sync", qos=1))
                async for message in messages:
                    if progress is not None:
                        progress()
                    if message.topic == sync_topic:
                        break  # its echo: the broker took it; no need to await its PUBACK
                    if message.payload:
                        found.append(message)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the refused marker's PublishError, as itself
            real = real_errors(group)
            if len(real) == 1:
                raise real[0] from None
            raise
    return found


def _connection_options(config: AgentConfig) -> dict[str, Any]:
    options = {"keep_alive": config.keep_alive}
    options.update(config.client_options)
    return options


async def check_duplicate(config: AgentConfig) -> None:
    """Refuse to start if the swarm's retained status says this agent id is online."""
    topics = Topics(config.swarm)
    probe_topic = topics.sync_marker(config.agent_id, secrets.token_hex(4))
    status: dict[str, Any] | None = None
    async with open_client(
        config.broker,
        client_id=f"{config.agent_id}.probe.{secrets.token_hex(3)}",
        clean_start=True,
        **_connection_options(config),
    ) as probe:
        for m in await read_retained(probe, probe_topic, topics.agent_status(config.agent_id)):
            try:
                status = decode_envelope(m.payload).payload
            except BadMessage:
                status = None
    if status and status.get("status") == "online":
        raise DuplicateAgent(
            f"an agent with id {config.agent_id!r} is already online in swarm "
            f"{config.swarm!r} (since {status.get('timestamp', '?')}); choose another --agent-id "
            "(if it crashed, its last will marks it offline within 1.5x its keep-alive)"
        )


@asynccontextmanager
async def agent_connection(
    config: AgentConfig, startup: Startup | None = None
) -> AsyncIterator[Client]:
    """The agent's persistent MQTT session, with its last will.

    Leaving before ``startup`` finished (a failed or interrupted start-up: our online
    status may be out) asks the broker to publish the will, so the retained status says
    offline.
    """
    topics = Topics(config.swarm)
    will_payload = encode(
        config.agent_id, config.role, Messages(config.agent_id, config.role).will()
    )
    async with open_client(
        config.broker,
        client_id=config.agent_id,
        clean_start=False,  # mosquitto 2.0.11 only persists sessions begun this way
        session_expiry_interval=config.session_expiry,
        will=Will(topics.agent_status(config.agent_id), will_payload, qos=1, retain=True),
        **_connection_options(config),
    ) as client:
        try:
            yield client
        finally:
            if hasattr(client, "disconnect"):
                # Leaving for good: the broker need not keep our session.
                reason = 0x04 if startup is not None and not startup.finished else 0
                await client.disconnect(reason, session_expiry_interval=0)
