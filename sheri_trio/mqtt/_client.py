"""``open_client()``: the sans-IO session driven over a byte stream, inside a nursery.

The client owns one nursery. In it run the connection manager (connect,
reconnect with backoff) and, per connection, a reader, a writer and a
keep-alive timer. Publishes are encoded into the session's buffer and the
writer sends everything buffered in one ``send_all``; the reader parses every
complete packet of each receive.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias

import mqtt5
import trio

from ._errors import (
    AckTimeout,
    ClientClosed,
    ConnectError,
    ConnectionLost,
    KeepAliveTimeout,
    LocalProtocolError,
    MQTTError,
    PublishError,
    RemoteProtocolError,
    SessionTakenOver,
    SubscribeError,
)
from ._session import (
    Connected,
    Disconnected,
    Message,
    PublishAcked,
    Session,
    SubscribeAcked,
    UnsubscribeAcked,
    disconnect_reason_name,
    reason_names,
    topic_matches,
)
from ._streams import BrokerURL, ByteStream, TLSOptions, open_stream

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Sequence
    from contextlib import AbstractAsyncContextManager

StreamFactory: TypeAlias = "Callable[[BrokerURL], AbstractAsyncContextManager[ByteStream]]"
"""Opens one connection's byte stream (default: :func:`~._streams.open_stream`)."""

__all__ = ["Client", "ClientOptions", "MQTTClient", "Subscription", "Will", "open_client"]

log = logging.getLogger("sheri_trio.mqtt")

_QOS = (mqtt5.QoS.AT_MOST_ONCE, mqtt5.QoS.AT_LEAST_ONCE, mqtt5.QoS.EXACTLY_ONCE)
_OUT_HIGH_WATER = 256 * 1024  # bytes buffered for the writer before publishers wait


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
            qos=_QOS[self.qos],
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
    extra: dict[str, Any] = field(default_factory=dict)


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
        and cancellation is always seen.
        """
        if self._streak < 64:
            try:
                message = self._receive.receive_nowait()
            except trio.WouldBlock:
                pass
            else:
                self._streak += 1
                await trio.lowlevel.checkpoint_if_cancelled()
                return message
        self._streak = 0
        return await self._receive.receive()

    def receive_nowait(self) -> Message:
        return self._receive.receive_nowait()

    def matches(self, topic: str) -> bool:
        return any(topic_matches(f, topic) for f in self.filters)


class Router:
    """Which subscriptions a message goes to, and the messages that have none yet.

    Messages are routed by their subscription identifiers, or by topic when they carry
    none of ours (mosquitto 2.0.11 loses the ids of messages it queued across a
    restart). A message no subscription wants waits in a bounded backlog (``orphans``)
    for the ``subscribe()`` it may belong to: after a reconnect, queued messages can
    arrive before our resubscription is confirmed. Shared by every backend.
    """

    def __init__(self, orphan_buffer: int) -> None:
        self.by_id: dict[int, Subscription] = {}
        self.subs: list[Subscription] = []
        self.orphans: deque[Message] = deque(maxlen=max(orphan_buffer, 1))
        self.dropped = 0  # orphans pushed out of a full backlog

    def add(self, sub_id: int, sub: Subscription) -> None:
        self.by_id[sub_id] = sub
        self.subs.append(sub)

    def remove(self, sub_id: int, sub: Subscription) -> None:
        self.by_id.pop(sub_id, None)
        self.subs.remove(sub)

    def targets(self, message: Message) -> list[Subscription]:
        ids = message.packet.subscription_ids
        if ids:
            by_id = self.by_id
            targets = [by_id[i] for i in ids if i in by_id]
            if targets:
                return targets
        return [s for s in self.subs if s.matches(message.topic)]

    def park(self, message: Message) -> None:
        """Keep a message that no subscription wants (the oldest goes when full)."""
        if len(self.orphans) == self.orphans.maxlen:
            self.dropped += 1
            log.warning("no subscription for %r and the backlog is full: dropped", message.topic)
        self.orphans.append(message)

    def replay(self, sub: Subscription) -> list[Message]:
        """Hand a new subscription the parked messages it matches (as many as fit).

        Returns the messages handed over (the caller settles their acknowledgement).
        """
        if not self.orphans:
            return []
        keep: deque[Message] = deque(maxlen=self.orphans.maxlen)
        replayed: list[Message] = []
        for message in self.orphans:
            if sub.matches(message.topic):
                try:
                    sub._send.send_nowait(message)
                except trio.WouldBlock:
                    keep.append(message)
                else:
                    replayed.append(message)
            else:
                keep.append(message)
        self.orphans = keep
        return replayed

    @property
    def manual(self) -> int:
        """How many live subscriptions acknowledge manually."""
        return sum(1 for s in self.subs if s.manual_ack)


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
    ) -> Any: ...

    async def wait_connected(self) -> None: ...

    async def aclose(self) -> None: ...

    def statistics(self) -> dict[str, Any]: ...


class MQTTClient:
    """The native trio client. Create it with :func:`open_client`."""

    def __init__(self, url: BrokerURL, options: ClientOptions) -> None:
        self.url = url
        self.options = options
        self.log = log
        password = options.password if options.password is not None else url.password
        self._session = Session(
            options.client_id,
            username=options.username if options.username is not None else url.username,
            password=password.encode() if password is not None else None,
            keep_alive=options.keep_alive,
            clean_start=options.clean_start,
            session_expiry_interval=options.session_expiry_interval,
            will=options.will.to_packet() if options.will else None,
            receive_maximum=options.receive_maximum,
            max_packet_size=options.max_packet_size,
        )
        self._session.hold_acks = options.manual_ack
        self._stream: ByteStream | None = None
        self._wake_writer = trio.Event()
        self._unsent = b""  # the part of a direct write the socket did not take
        self._sending = False  # the writer is in send_all
        self._space = trio.lowlevel.ParkingLot()
        self._requests: dict[int, tuple[trio.Event, list[Any]]] = {}
        self._router = Router(options.orphan_buffer)
        self._next_sub_id = random.randint(1, 1 << 26)
        self._connected_event = trio.Event()
        self._closing = False  # no new operations
        self._closed = False  # stop reconnecting
        self._connection_ended = trio.Event()
        self._fatal: BaseException | None = None
        self._manager_scope: trio.CancelScope | None = None
        self._connection_scope: trio.CancelScope | None = None
        self._abort_error: MQTTError | None = None  # why we dropped the connection
        self._connected_at = math.inf  # trio time of the current connection's CONNACK
        self.connections = 0
        self.messages_received = 0
        self.messages_dropped = 0
        self.last_error: str | None = None

    # ---------------------------------------------------------------- status
    @property
    def connected(self) -> bool:
        return self._session.connected and self._stream is not None

    @property
    def client_id(self) -> str:
        return self._session.client_id

    @property
    def session(self) -> Session:
        return self._session

    def statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] = dict(self._session.statistics())
        stats.update(
            backend="trio",
            url=self.url.display(),
            connections=self.connections,
            messages_received=self.messages_received,
            messages_dropped=self.messages_dropped + self._router.dropped,
            subscriptions=len(self._router.subs),
            orphans=len(self._router.orphans),
            last_error=self.last_error,
        )
        return stats

    async def wait_connected(self) -> None:
        """Wait until the client is connected (returns at once if it is)."""
        while not self.connected:
            self._check_open()
            await self._connected_event.wait()

    def _check_open(self) -> None:
        if self._fatal is not None:
            raise ClientClosed(f"client stopped: {self._fatal}") from self._fatal
        if self._closing:
            raise ClientClosed("client is closed")

    # --------------------------------------------------------------- publish
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
    ) -> int | None:
        """Publish a message; returns the PUBACK reason code of a waited QoS 1 publish.

        QoS 0 returns None once the message is buffered. QoS 1 returns once the broker
        acknowledged it, with the PUBACK's reason code: 0x00 success, 0x10 "no matching
        subscribers" (the broker accepted it, nobody got it); codes >= 0x80 raise
        PublishError. ``wait_ack=False`` returns None once it is queued (the session
        still resends it until acknowledged). The wait is bounded by ``ack_timeout``
        (AckTimeout). While disconnected, messages queue up to ``max_queued``; beyond
        that this waits (backpressure).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        session = self._session
        if session.queued_count >= self.options.max_queued or (
            len(session._out) >= _OUT_HIGH_WATER
        ):
            await self._wait_for_space()
        if isinstance(payload, str):
            payload = payload.encode()
        pub = session.publish(
            topic,
            payload,
            qos=qos,
            retain=retain,
            message_expiry_interval=message_expiry_interval,
            content_type=content_type,
            response_topic=response_topic,
            correlation_data=correlation_data,
            user_properties=list(user_properties) if user_properties else None,
        )
        self._kick()
        if pub is None or not wait_ack:
            return None
        done = trio.Event()
        pub.waiter = done
        await self._wait_ack(done, "PUBLISH", f"PUBLISH to {topic!r}", "PUBACK")
        code = pub.reason_code
        if code is not None and code >= 0x80:
            name = _PUBACK_NAMES.get(code, "UNKNOWN")
            detail = f": {pub.reason_string}" if pub.reason_string else ""
            raise PublishError(
                f"broker refused publish to {topic!r}: {name} (0x{code:02X}){detail}",
                reason_code=code,
            )
        return code

    async def _wait_for_space(self) -> None:
        session = self._session
        while session.queued_count >= self.options.max_queued or (
            len(session._out) >= _OUT_HIGH_WATER
        ):
            self._check_open()
            await self._space.park()

    def _kick(self) -> None:
        if not self._wake_writer.is_set():
            self._wake_writer.set()

    # ------------------------------------------------------------- subscribe
    @asynccontextmanager
    async def subscribe(
        self,
        *filters: str,
        qos: int = 1,
        no_local: bool = False,
        retain_handling: int = 0,
        buffer: int | None = None,
        manual_ack: bool | None = None,
    ) -> AsyncIterator[Subscription]:
        """Subscribe; messages arrive on the yielded :class:`Subscription`.

        Leaving the block unsubscribes. A message that matches several
        subscriptions of this client is delivered to each of them.

        ``manual_ack=True`` (default: the client's ``manual_ack`` option): a QoS 1
        message is acknowledged to the broker only when the application calls
        ``message.ack()``, e.g. once it has recorded it; see docs/transports.md.
        """
        self._check_open()
        if qos not in (0, 1, 2):
            raise LocalProtocolError(f"invalid QoS {qos}")
        send, receive = trio.open_memory_channel[Message](
            self.options.message_buffer if buffer is None else buffer
        )
        manual = self.options.manual_ack if manual_ack is None else manual_ack
        sub = Subscription(tuple(filters), send, receive, manual_ack=manual)
        topic_filters = [
            mqtt5.TopicFilter(
                f,
                max_qos=_QOS[qos],
                no_local=no_local,
                retain_as_published=True,
                retain_handling=mqtt5.RetainHandling(retain_handling),
            )
            for f in filters
        ]
        sub_id = self._next_sub_id
        self._next_sub_id = self._next_sub_id % 268_000_000 + 1
        self._router.add(sub_id, sub)
        self._update_hold_acks()
        try:
            packet_id, handle = self._session.subscribe(topic_filters, subscription_id=sub_id)
        except BaseException:
            self._router.remove(sub_id, sub)
            self._update_hold_acks()
            raise
        what = "SUBSCRIBE " + ", ".join(repr(f) for f in filters)
        acknowledged = body_failed = False
        try:
            codes = await self._wait_request(packet_id, "SUBSCRIBE", what, "SUBACK")
            sub.reason_codes = codes
            failed = [c for c in codes if c >= 0x80]
            if failed:
                names = ", ".join(
                    f"{f}: {_suback_name(c)}" for f, c in zip(filters, codes, strict=False)
                )
                raise SubscribeError(f"subscription refused ({names})", reason_codes=codes)
            acknowledged = True
            for message in self._router.replay(sub):
                self._settle(message, sub.manual_ack)
            self._kick()
            try:
                async with send, receive:
                    yield sub
            except BaseException:
                body_failed = True
                raise
        finally:
            self._router.remove(sub_id, sub)
            self._update_hold_acks()
            if not self._closed and self._fatal is None:
                with trio.move_on_after(self.options.close_timeout) as scope:
                    scope.shield = True
                    try:
                        upid = self._session.unsubscribe(handle)
                        self._kick()
                        if upid is not None and self.connected and acknowledged:
                            await self._wait_request(upid, "UNSUBSCRIBE", "UN" + what, "UNSUBACK")
                    except AckTimeout:
                        if not body_failed:
                            raise
                    except MQTTError:
                        pass

    async def _wait_request(self, packet_id: int, packet: str, what: str, ack: str) -> list[int]:
        event = trio.Event()
        slot: list[Any] = []
        self._requests[packet_id] = (event, slot)
        self._kick()
        try:
            await self._wait_ack(event, packet, what, ack)
        finally:
            self._requests.pop(packet_id, None)
        if slot and isinstance(slot[0], BaseException):
            raise slot[0]
        return list(slot[0]) if slot else []

    async def _wait_ack(self, done: trio.Event, packet: str, what: str, ack: str) -> None:
        """Wait for an acknowledgement, at most ``ack_timeout`` (the caller's scopes too).

        When the bound is reached on a connection that was up the whole time, the
        broker is misbehaving: the connection is dropped (and made again), then
        AckTimeout is raised.
        """
        timeout = self.options.ack_timeout
        if timeout is None:
            await done.wait()
            return
        start = trio.current_time()
        with trio.move_on_after(timeout) as scope:
            await done.wait()
        if not scope.cancelled_caught:
            return
        error = AckTimeout(
            f"{what}: no {ack} from {self.url.display()} within {timeout:g} s",
            packet=packet,
            timeout=timeout,
        )
        if self.connected and self._connected_at <= start:
            self._drop_connection(error)
        raise error

    def abort_connection(self) -> None:
        """Drop the connection without DISCONNECT, as a crash would (for tests).

        The broker then publishes the will; the client reconnects if allowed.
        """
        self._drop_connection(ConnectionLost("connection aborted"))

    def _drop_connection(self, error: MQTTError) -> None:
        """End the current connection because of ``error``; the manager reconnects."""
        if self._connection_scope is None or self._abort_error is not None:
            return
        log.warning("dropping the connection to %s: %s", self.url, error)
        self._abort_error = error
        self._stream = None  # not connected from now on
        self._connection_scope.cancel()

    # ---------------------------------------------------------------- close
    async def aclose(self) -> None:
        """Flush, send DISCONNECT (so the will is discarded) and stop. Idempotent."""
        await self.disconnect(0)

    async def disconnect(
        self, reason_code: int = 0, *, session_expiry_interval: int | None = None
    ) -> None:
        """Close with a DISCONNECT reason code; 0x04 asks the broker to publish the will.

        ``session_expiry_interval=0`` tells the broker to drop our session now (a
        persistent client leaving for good).

        Waits (at most ``close_timeout``, also across a reconnect) until every queued
        and in-flight publish is acknowledged, then sends DISCONNECT and waits for the
        broker to close the connection.
        """
        if self._closing:
            return
        self._closing = True
        try:
            with trio.move_on_after(self.options.close_timeout) as scope:
                scope.shield = True
                session = self._session
                while (session.queued_count or session.inflight_count) and self._fatal is None:
                    await self._space.park()
                self._closed = True
                if self.connected:
                    ended = self._connection_ended
                    session.disconnect(reason_code, session_expiry_interval=session_expiry_interval)
                    self._kick()
                    await ended.wait()
        finally:
            self._closed = True
            self._space.unpark_all()
            self._connected_event.set()
            for event, slot in list(self._requests.values()):
                slot.append(ClientClosed("client closed"))
                event.set()
            if self._manager_scope is not None:
                self._manager_scope.cancel()

    # ------------------------------------------------------- connection loop
    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, and reconnect with backoff until closed. Owned by the client nursery."""
        opts = self.options
        attempt = 0
        started = False
        with trio.CancelScope() as self._manager_scope:
            while not self._closed:
                connections = self.connections
                try:
                    await self._connect_and_serve(task_status if not started else None)
                    started = True
                except ConnectError as exc:
                    self.last_error = str(exc)
                    if not started or not exc.retryable:
                        self._set_fatal(exc)
                        if not started:
                            raise
                        return
                    log.warning("%s (attempt %d)", exc, attempt + 1)
                except SessionTakenOver as exc:
                    self.last_error = str(exc)
                    self._set_fatal(exc)
                    return
                except (ConnectionLost, RemoteProtocolError, KeepAliveTimeout, AckTimeout) as exc:
                    self.last_error = str(exc)
                    if self._closed:
                        return
                    started = True
                    log.warning("MQTT connection to %s lost: %s", self.url, exc)
                finally:
                    self._session.connection_lost()
                    self._unsent = b""
                    self._stream = None
                    self._connected_at = math.inf
                    if self._connected_event.is_set():
                        # (only then: replacing an unset event would strand its waiters)
                        self._connected_event = trio.Event()
                    self._connection_ended.set()
                    self._space.unpark_all()
                if self.connections > connections:
                    attempt = 0  # a connection was made: the next outage backs off afresh
                if self._closed:
                    return
                if not opts.reconnect:
                    self._set_fatal(ConnectionLost(self.last_error or "connection lost"))
                    return
                attempt += 1
                if (
                    opts.max_reconnect_attempts is not None
                    and attempt > opts.max_reconnect_attempts
                ):
                    self._set_fatal(ConnectionLost(f"gave up after {attempt - 1} reconnects"))
                    return
                cap = min(
                    opts.reconnect_max_delay, opts.reconnect_initial_delay * 2 ** (attempt - 1)
                )
                delay = random.uniform(cap / 2, cap)  # "equal jitter": never zero, never in step
                log.info("reconnecting to %s in %.2f s (attempt %d)", self.url, delay, attempt)
                await trio.sleep(delay)

    def _set_fatal(self, exc: BaseException) -> None:
        self._fatal = exc
        self._connected_event.set()
        self._space.unpark_all()
        for event, slot in list(self._requests.values()):
            slot.append(ClientClosed(f"client stopped: {exc}"))
            event.set()
        for sub in self._router.subs:
            sub._send.close()

    async def _connect_and_serve(self, task_status: trio.TaskStatus[None] | None) -> None:
        opts = self.options
        session = self._session
        if opts.stream_factory is not None:
            connect_stream = opts.stream_factory(self.url)
        else:
            connect_stream = open_stream(
                self.url, tls=opts.tls, ws_max_message_size=opts.ws_max_message_size
            )
        self._abort_error = None
        with trio.move_on_after(opts.connect_timeout) as timeout, collapse_exception_groups():
            async with connect_stream as stream:
                timeout.deadline = trio.current_time() + opts.connect_timeout
                session.start_connection(trio.current_time())
                await stream.send_all(session.data_to_send(trio.current_time()))
                connected = present = False
                early: list[Message] = []  # queued messages often share CONNACK's segment
                while not connected:
                    data = await stream.receive_some()
                    if not data:
                        raise ConnectError(
                            f"{self.url}: broker closed the connection before CONNACK"
                        )
                    for event in session.receive_data(data, trio.current_time()):
                        if isinstance(event, Connected):
                            connected = True
                            present = event.session_present
                        elif type(event) is Message:
                            early.append(event)
                        else:
                            self._dispatch(event)
                timeout.deadline = math.inf
                self._stream = stream
                self._connection_ended = trio.Event()
                self._connected_at = trio.current_time()
                self.connections += 1
                log.info(
                    "connected to %s as %r (session present: %s)",
                    self.url,
                    session.client_id,
                    "yes" if present else "no",
                )
                self._connected_event.set()
                self._space.unpark_all()
                self._kick()  # resent publishes and resubscriptions are waiting in the buffer
                if task_status is not None:
                    task_status.started()
                try:
                    with trio.CancelScope() as self._connection_scope:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._writer, stream)
                            nursery.start_soon(self._timer)
                            for message in early:
                                await self._deliver(message)
                            await self._reader(stream)
                            nursery.cancel_scope.cancel()
                finally:
                    self._connection_scope = None
                if self._abort_error is not None:
                    raise self._abort_error
        if timeout.cancelled_caught:
            raise ConnectError(
                f"cannot connect to {self.url}: no answer within {opts.connect_timeout:g} s"
            )

    async def _reader(self, stream: ByteStream) -> None:
        session = self._session
        dispatch = self._dispatch
        while True:
            data = await stream.receive_some()
            if not data:
                if self._closed:
                    return
                raise ConnectionLost("broker closed the connection")
            events = session.receive_data(data, trio.current_time())
            acked = False
            for event in events:
                if type(event) is Message:
                    await self._deliver(event)
                elif type(event) is PublishAcked:
                    waiter = event.publish.waiter
                    if waiter is not None:
                        waiter.set()
                    acked = True
                else:
                    dispatch(event)
            if acked:
                self._space.unpark_all()  # window slots freed: queued publishes moved up
            if session.has_data_to_send():
                # The acks and window refills of this read go out now, from here, when
                # the socket takes them at once: the writer task's turn would cost a
                # scheduler pass on every round trip of the QoS 1 window.
                if self._unsent or self._sending:
                    self._kick()
                else:
                    data = session.data_to_send(trio.current_time())
                    sent = stream.send_nowait(data)
                    if sent < len(data):
                        self._unsent = data[sent:]
                        self._kick()

    async def _writer(self, stream: ByteStream) -> None:
        session = self._session
        while True:
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            data = session.data_to_send(trio.current_time())
            if self._unsent:
                data, self._unsent = self._unsent + data, b""
            self._space.unpark_all()
            if data:
                self._sending = True
                try:
                    await stream.send_all(data)
                finally:
                    self._sending = False

    async def _timer(self) -> None:
        session = self._session
        while True:
            deadline = session.next_deadline()
            if deadline is None:
                await trio.sleep_forever()
                return
            await trio.sleep_until(deadline)
            session.handle_timer(trio.current_time())
            self._kick()

    # ---------------------------------------------------- acknowledgements
    def _update_hold_acks(self) -> None:
        """The session holds PUBACKs while manual acknowledgement may be wanted."""
        self._session.hold_acks = self.options.manual_ack or self._router.manual > 0

    def _settle(self, message: Message, manual: bool) -> None:
        """Decide who acknowledges a held QoS 1 message: the application, or us now."""
        if message.ack_id is None or message._acker is not None:
            return
        if manual:
            message._acker = self._ack_message
        else:
            self._session.ack(message.ack_id)

    def _ack_message(self, message: Message) -> None:
        """``Message.ack()`` of a manual_ack subscription's message."""
        ack_id = message.ack_id
        if ack_id is not None and self._session.ack(ack_id):
            self._kick()

    async def _deliver(self, message: Message) -> None:
        self.messages_received += 1
        targets = self._router.targets(message)
        if not targets:
            # With the manual_ack option an orphan's PUBACK waits for the subscription
            # it may belong to (replay settles it); else it is acknowledged now.
            if not self.options.manual_ack:
                self._settle(message, False)
            self._router.park(message)
            return
        if message.ack_id is not None:
            self._settle(message, any(s.manual_ack for s in targets))
        for sub in targets:
            channel = sub._send
            try:
                channel.send_nowait(message)
            except trio.WouldBlock:
                await channel.send(message)  # backpressure: stop reading the socket
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    def _dispatch(self, event: object) -> None:
        if isinstance(event, PublishAcked):
            waiter = event.publish.waiter
            if waiter is not None:
                waiter.set()
            self._space.unpark_all()
        elif isinstance(event, (SubscribeAcked, UnsubscribeAcked)):
            entry = self._requests.get(event.packet_id)
            if entry is not None:
                entry[1].append(event.reason_codes)
                entry[0].set()
        elif isinstance(event, Disconnected):
            text = disconnect_reason_name(event.reason_code)
            if event.reason_string:
                text += f": {event.reason_string}"
            if event.reason_code == 0x8E:
                raise SessionTakenOver(
                    f"broker disconnected us: {text} (another client uses id {self.client_id!r})",
                    reason_code=event.reason_code,
                )
            raise ConnectionLost(f"broker disconnected us: {text}", reason_code=event.reason_code)


_PUBACK_NAMES = reason_names(mqtt5.PubAckReasonCode)
_SUBACK_NAMES = reason_names(mqtt5.SubAckReasonCode)


def _suback_name(code: int) -> str:
    return f"{_SUBACK_NAMES.get(code, 'UNKNOWN')} (0x{code:02X})"


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
        real = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
        if len(real) == 1:
            raise real[0] from None
        if real and all(isinstance(e, MQTTError) for e in real):
            # e.g. reader and writer both saw the connection break: one error, told once
            raise real[0] from None
        raise


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _new_client_id() -> str:
    return f"sheri-{random.getrandbits(48):012x}"


@asynccontextmanager
async def open_client(
    url: str,
    *,
    backend: Literal["trio", "gmqtt"] = "trio",
    **options: Any,
) -> AsyncIterator[Client]:
    """Connect to the broker at ``url`` and yield a client; close it on exit.

    ``mqtt://`` TCP, ``mqtts://`` TLS, ``ws://`` / ``wss://`` WebSocket (path from
    the URL, ``/mqtt`` by default). Options are the fields of
    :class:`ClientOptions`. Raises :class:`ConnectError` if the first
    connection fails; later losses reconnect with backoff.
    """
    opts = ClientOptions(**options)
    if not opts.client_id:
        opts.client_id = _new_client_id()
    broker = BrokerURL.parse(url)
    if backend == "gmqtt":
        from ._gmqtt import open_gmqtt_client

        async with open_gmqtt_client(broker, opts) as gclient:
            yield gclient
        return
    if backend != "trio":
        raise LocalProtocolError(f"unknown backend {backend!r} (use 'trio' or 'gmqtt')")
    client = MQTTClient(broker, opts)
    with collapse_exception_groups():  # users see our errors, not groups (as trio-websocket)
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run)
            try:
                yield client
            finally:
                await client.aclose()
