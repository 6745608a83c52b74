"""What every backend shares: the Client interface, its options, Will, Subscription,
and the one copy of the texts and tables both backends report with.

Nothing here does I/O; :mod:`._client` (native) and :mod:`._gmqtt` implement
:class:`Client`, :mod:`._open` picks one.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias, TypeVar

import mqtt5
import trio

from .._exceptions import real_errors
from ._errors import (
    AckTimeout,
    ConnectionLost,
    MQTTError,
    PublishError,
    SessionTakenOver,
    SubscribeError,
)
from ._session import QOS_LEVELS, Message, disconnect_reason_name, reason_names, topic_matches

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Sequence
    from contextlib import AbstractAsyncContextManager

    from ._streams import BrokerURL, ByteStream, TLSOptions

# What the package re-exports; the rest (StreamFactory, the shared texts) is shared
# between the backends only.
__all__ = ["Client", "ClientOptions", "Subscription", "Will"]

StreamFactory: TypeAlias = "Callable[[BrokerURL], AbstractAsyncContextManager[ByteStream]]"
"""Opens one connection's byte stream (default: :func:`~._streams.open_stream`)."""

T = TypeVar("T")

_PUBACK_NAMES: Final = reason_names(mqtt5.PubAckReasonCode)
_SUBACK_NAMES: Final = reason_names(mqtt5.SubAckReasonCode)
SESSION_TAKEN_OVER: Final = 0x8E


@dataclass(frozen=True, slots=True)
class Will:
    """The last will: published by the broker if we vanish without a normal DISCONNECT."""

    topic: str
    payload: bytes = b""
    qos: int = 1
    retain: bool = False
    delay_interval: int = 0
    message_expiry_interval: int | None = None
    content_type: str | None = None
    user_properties: Sequence[tuple[str, str]] = ()

    def to_packet(self) -> mqtt5.Will:
        return mqtt5.Will(
            self.topic,
            payload=self.payload,
            qos=QOS_LEVELS[self.qos],
            retain=self.retain,
            will_delay_interval=self.delay_interval,
            message_expiry_interval=self.message_expiry_interval,
            content_type=self.content_type,
            user_properties=list(self.user_properties),
        )


@dataclass(slots=True)
class ClientOptions:
    """Everything ``open_client`` accepts besides the URL."""

    client_id: str = ""
    username: str | None = None
    password: str | None = None
    keep_alive: int = 30
    clean_start: bool = True
    session_expiry_interval: int = 0
    will: Will | None = None
    tls: TLSOptions | None = None
    connect_timeout: float = 10.0
    reconnect: bool = True
    reconnect_initial_delay: float = 0.1
    reconnect_max_delay: float = 30.0
    max_reconnect_attempts: int | None = None
    max_queued: int = 10_000
    max_packet_size: int = 1024 * 1024
    receive_maximum: int = 65535
    ws_max_message_size: int = 4 * 1024 * 1024
    close_timeout: float = 5.0
    #: the default of subscribe(manual_ack=...); also: messages that arrive before a
    #: matching subscribe() (orphans) wait for its choice instead of being acked
    manual_ack: bool = False
    #: how long SUBSCRIBE, UNSUBSCRIBE and a waited QoS 1 PUBLISH wait for their
    #: acknowledgement before AckTimeout (and a reconnect); None: no bound
    ack_timeout: float | None = 10.0
    message_buffer: int = 10_000
    orphan_buffer: int = 10_000
    #: opens each connection's byte stream instead of the URL's transport (native
    #: backend only): e.g. ``sheri_trio.testing.ScriptedBroker.stream_factory``
    stream_factory: StreamFactory | None = None


class Subscription:
    """Messages of one ``subscribe()`` call: ``async for message in subscription``."""

    def __init__(
        self,
        filters: tuple[str, ...],
        send: trio.MemorySendChannel[Message],
        receive: trio.MemoryReceiveChannel[Message],
        *,
        manual_ack: bool = False,
    ) -> None:
        self.filters = filters
        #: QoS 1 messages wait for ``message.ack()`` before the client acknowledges them
        self.manual_ack = manual_ack
        self.reason_codes: list[int] = []
        self._send = send
        self._receive = receive
        self._streak = 0

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def receive(self) -> Message:
        """The next message; raises trio.EndOfChannel once the subscription is closed.

        Messages already delivered are taken without a trip through the scheduler (a
        burst of one read costs one pass, not one per message); every 64th call, and
        whenever none is waiting, this is a full checkpoint, so other tasks still run
        and cancellation is always seen. Cancel-safe as trio's channels are: a
        cancelled call has taken no message (the cancellation is checked first).
        """
        if self._streak < 64:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                message = self._receive.receive_nowait()
            except trio.WouldBlock:
                pass
            else:
                self._streak += 1
                return message
        self._streak = 0
        return await self._receive.receive()

    def receive_nowait(self) -> Message:
        return self._receive.receive_nowait()

    # The producer side, for backends (and the in-memory bus): not for applications.
    def deliver_nowait(self, message: Message) -> bool:
        """Buffer a message at once; False if the subscription is closed.

        Raises ``trio.WouldBlock`` when the buffer is full (then :meth:`deliver`).
        """
        try:
            self._send.send_nowait(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    async def deliver(self, message: Message) -> None:
        """Buffer a message, waiting while the buffer is full (backpressure).

        Dropped without error if the subscription is closed (its reader left).
        """
        try:
            await self._send.send(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def close(self) -> None:
        """No more messages: iteration ends after the ones already buffered."""
        self._send.close()

    def matches(self, topic: str) -> bool:
        return any(topic_matches(f, topic) for f in self.filters)


class Client(Protocol):
    """What every backend implements (native trio, gmqtt through trio-asyncio)."""

    @property
    def connected(self) -> bool: ...

    async def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        *,
        qos: int = 0,
        retain: bool = False,
        wait_ack: bool = True,
        message_expiry_interval: int | None = None,
        content_type: str | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: Sequence[tuple[str, str]] | None = None,
    ) -> int | None: ...

    def subscribe(
        self,
        *filters: str,
        qos: int = 1,
        no_local: bool = False,
        retain_handling: int = 0,
        buffer: int | None = None,
        manual_ack: bool | None = None,
    ) -> AbstractAsyncContextManager[Subscription]: ...

    async def wait_connected(self) -> None: ...

    async def aclose(self) -> None: ...

    def statistics(self) -> dict[str, Any]: ...


# ------------------------------------------------------------- shared texts
def publish_refused(topic: str, code: int, reason: str | None = None) -> PublishError:
    """The error of a PUBACK with a failure code (>= 0x80)."""
    name = _PUBACK_NAMES.get(code, "UNKNOWN")
    detail = f": {reason}" if reason else ""
    return PublishError(
        f"broker refused publish to {topic!r}: {name} (0x{code:02X}){detail}", reason_code=code
    )


def subscribe_refused(filters: Sequence[str], codes: list[int]) -> SubscribeError | None:
    """The error of a SUBACK with a failure code, or None if every filter was granted."""
    if not any(c >= 0x80 for c in codes):
        return None
    names = ", ".join(
        f"{f}: {_SUBACK_NAMES.get(c, 'UNKNOWN')} (0x{c:02X})"
        for f, c in zip(filters, codes, strict=False)
    )
    return SubscribeError(f"subscription refused ({names})", reason_codes=codes)


def broker_disconnected(code: int, reason: str | None, client_id: str) -> ConnectionLost:
    """A broker DISCONNECT as our error: SessionTakenOver for 0x8E, else ConnectionLost."""
    text = disconnect_reason_name(code)
    if reason:
        text += f": {reason}"
    if code == SESSION_TAKEN_OVER:
        return SessionTakenOver(
            f"broker disconnected us: {text} (another client uses id {client_id!r})",
            reason_code=code,
        )
    return ConnectionLost(f"broker disconnected us: {text}", reason_code=code)


def ack_timeout_error(
    packet: str, what: str, ack: str, url: BrokerURL, timeout: float
) -> AckTimeout:
    """``what``: the request as told (``SUBSCRIBE 't/a'``); ``ack``: what never came."""
    return AckTimeout(
        f"{what}: no {ack} from {url.display()} within {timeout:g} s",
        packet=packet,
        timeout=timeout,
    )


async def bounded_ack(
    wait: Callable[[], Awaitable[T]],
    bound: float | None,
    timed_out: Callable[[float], AckTimeout],
    *,
    up_since: Callable[[], float],
    drop_connection: Callable[[AckTimeout], None],
) -> T:
    """Run ``wait`` (a wait for an acknowledgement) for at most ``bound`` seconds.

    The bound of every explicit wait of both backends. On expiry, if the connection
    was up for the whole bound (``up_since()``: its CONNACK's trio time, inf while
    there is none), the broker is misbehaving: ``drop_connection`` ends it (the client
    reconnects with backoff). Then ``timed_out(bound)`` is raised. A caller's own,
    shorter cancel scope still wins (and is not held against the broker).
    """
    if bound is None:
        return await wait()
    start = trio.current_time()
    with trio.move_on_after(bound):
        return await wait()
    error = timed_out(bound)
    if up_since() <= start:
        drop_connection(error)
    raise error


async def unsubscribe_on_exit(
    unsubscribe: Callable[[], Awaitable[object]], close_timeout: float, *, body_failed: bool
) -> None:
    """Leaving a subscription: ``unsubscribe()`` (UNSUBSCRIBE and the wait for its
    UNSUBACK), shielded, since the block may be leaving because it was cancelled, and
    bounded by ``close_timeout``. Both backends end a subscription so.

    Its AckTimeout is raised unless the block's own error is on its way out
    (``body_failed``); any other error of ours (a connection closing meanwhile) is
    dropped: the broker forgets the subscription with the connection anyway.
    """
    with trio.move_on_after(close_timeout) as scope:
        scope.shield = True
        try:
            await unsubscribe()
        except AckTimeout:
            if not body_failed:
                raise
        except MQTTError:
            pass


def resubscribe_timed_out(filters: Sequence[str], url: BrokerURL, timeout: float) -> AckTimeout:
    """The SUBSCRIBEs a reconnect sent on its own (nobody else waits for them) went
    unanswered for ``timeout``: the connection is deaf, the client drops it."""
    what = "SUBSCRIBE " + ", ".join(repr(f) for f in filters) + " (sent at reconnect)"
    return ack_timeout_error("SUBSCRIBE", what, "SUBACK", url, timeout)


@contextmanager
def collapse_exception_groups() -> Iterator[None]:
    """Raise the one real error of a nursery's exception group as itself.

    Cancellations that only accompany it are dropped; several errors of ours (the
    same broken connection seen by two loops) surface as the first; any other
    mixture is left as a group.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        real = real_errors(group)
        if len(real) == 1:
            raise real[0] from None
        if real and all(isinstance(e, MQTTError) for e in real):
            # e.g. reader and writer both saw the connection break: one error, told once
            raise real[0] from None
        raise


def new_client_id() -> str:
    return f"sheri-{random.getrandbits(48):012x}"
