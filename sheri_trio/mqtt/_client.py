"""The native trio backend: the sans-IO session driven over a byte stream, in a nursery.

The client owns one nursery. In it run the connection manager (connect,
reconnect with backoff: :mod:`._reconnect`) and, per connection, a reader, a
writer and a keep-alive timer. Publishes are encoded into the session's buffer
and the writer sends everything buffered in one ``send_all``; the reader parses
every complete packet of each receive.
"""

from __future__ import annotations

import logging
import math
import random
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import mqtt5
import trio

from ._api import (
    ClientOptions,
    Subscription,
    ack_timeout_error,
    bounded_ack,
    broker_disconnected,
    collapse_exception_groups,
    publish_refused,
    resubscribe_timed_out,
    subscribe_refused,
    unsubscribe_on_exit,
)
from ._errors import (
    AckTimeout,
    ClientClosed,
    ConnectError,
    ConnectionLost,
    MQTTError,
)
from ._reconnect import run_reconnecting
from ._routing import Router, settle
from ._session import (
    QOS_LEVELS,
    Connected,
    Disconnected,
    Message,
    PublishAcked,
    Session,
    SubscribeAcked,
    UnsubscribeAcked,
    check_subscription,
)
from ._streams import BrokerURL, ByteStream, open_stream

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

__all__ = ["MQTTClient"]

log = logging.getLogger("sheri_trio.mqtt")

_OUT_HIGH_WATER = 256 * 1024  # bytes buffered for the writer before publishers wait


class MQTTClient:
    """The native trio client. Create it with :func:`open_client`."""

    def __init__(self, url: BrokerURL, options: ClientOptions) -> None:
        self.url = url
        self.options = options
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
            ack_timeout=options.ack_timeout,
        )
        self._session.hold_acks = options.manual_ack
        self._stream: ByteStream | None = None
        self._wake_writer = trio.Event()
        self._unsent = b""  # the part of a direct write the socket did not take
        self._sending = False  # the writer is in send_all
        self._space = trio.lowlevel.ParkingLot()
        self._requests: dict[int, tuple[trio.Event, list[Any]]] = {}
        #: the publishes waiting for their PUBACK: told ClientClosed when the client stops
        #: (else they would wait out ack_timeout for an answer that cannot come)
        self._publish_waiters: dict[trio.Event, list[BaseException]] = {}
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
        stopped: list[BaseException] = []
        self._publish_waiters[done] = stopped
        try:
            await self._wait_ack(done, "PUBLISH", f"PUBLISH to {topic!r}", "PUBACK")
        finally:
            del self._publish_waiters[done]
        if stopped and pub.reason_code is None:
            raise stopped[0]
        code = pub.reason_code
        if code is not None and code >= 0x80:
            raise publish_refused(topic, code, pub.reason_string)
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
        check_subscription(filters, qos, retain_handling)
        send, receive = trio.open_memory_channel[Message](
            self.options.message_buffer if buffer is None else buffer
        )
        manual = self.options.manual_ack if manual_ack is None else manual_ack
        sub = Subscription(tuple(filters), send, receive, manual_ack=manual)
        topic_filters = [
            mqtt5.TopicFilter(
                f,
                max_qos=QOS_LEVELS[qos],
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
            refused = subscribe_refused(filters, codes)
            if refused is not None:
                raise refused
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

                async def unsubscribe() -> None:
                    upid = self._session.unsubscribe(handle)
                    self._kick()
                    if upid is not None and self.connected and acknowledged:
                        await self._wait_request(upid, "UNSUBSCRIBE", "UN" + what, "UNSUBACK")

                await unsubscribe_on_exit(
                    unsubscribe, self.options.close_timeout, body_failed=body_failed
                )

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
        """Wait for an acknowledgement, at most ``ack_timeout`` (see ``bounded_ack``)."""
        await bounded_ack(
            done.wait,
            self.options.ack_timeout,
            partial(ack_timeout_error, packet, what, ack, self.url),
            up_since=self._up_since,
            drop_connection=self._drop_connection,
        )

    def _up_since(self) -> float:
        return self._connected_at if self.connected else math.inf

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
            self._wake_publishers(ClientClosed("client closed before the PUBACK came"))
            if self._manager_scope is not None:
                self._manager_scope.cancel()

    # ------------------------------------------------------- connection loop
    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, and reconnect with backoff until closed. Owned by the client nursery."""
        with trio.CancelScope() as self._manager_scope:
            await run_reconnecting(
                self._serve_once,
                self.options,
                self.url,
                is_closed=lambda: self._closed,
                on_error=self._on_error,
                set_fatal=self._set_fatal,
                task_status=task_status,
            )

    def _on_error(self, text: str) -> None:
        self.last_error = text

    async def _serve_once(self, on_connected: Callable[[], None]) -> None:
        """One connection, from connecting to its end (the reconnect loop's callable)."""
        try:
            await self._connect_and_serve(on_connected)
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

    def _set_fatal(self, exc: BaseException) -> None:
        self._fatal = exc
        self._connected_event.set()
        self._space.unpark_all()
        for event, slot in list(self._requests.values()):
            slot.append(ClientClosed(f"client stopped: {exc}"))
            event.set()
        self._wake_publishers(ClientClosed(f"client stopped before the PUBACK came: {exc}"))
        for sub in self._router.subs:
            sub.close()

    def _wake_publishers(self, error: ClientClosed) -> None:
        for event, slot in list(self._publish_waiters.items()):
            slot.append(error)
            event.set()

    async def _connect_and_serve(self, on_connected: Callable[[], None]) -> None:
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
                on_connected()
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
            # One scheduler pass before taking the data: what the tasks woken with the
            # waker publish (an agent's task runner, started as its assignment is acked)
            # goes out in the same write. At 90 agents, one task each, that is a write
            # less per task and ~8 % more tasks/s; latency and throughput stay as they were.
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._wake_writer = trio.Event()
            data = session.data_to_send(trio.current_time())
            if self._unsent:
                data, self._unsent = self._unsent + data, b""
            self._space.unpark_all()
            if data:
                # What the socket takes at once goes without trio's send_all, which costs
                # a scheduler pass per write; the wait for the next wake-up is this
                # task's checkpoint. TLS and WebSocket take nothing this way.
                sent = stream.send_nowait(data)
                if sent == len(data):
                    continue
                self._sending = True
                try:
                    await stream.send_all(data[sent:] if sent else data)
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
            now = trio.current_time()
            overdue = session.overdue_subscribes(now)
            if overdue:
                raise self._resubscribe_timed_out(overdue)
            session.handle_timer(now)
            self._kick()

    def _resubscribe_timed_out(self, filters: Sequence[str]) -> AckTimeout:
        """The SUBSCRIBEs the session sent at CONNACK went unanswered: a deaf connection.

        Nobody else waits for them (a resubscription; a pending subscribe() whose own
        bound began on an earlier connection), so the timer ends the connection and the
        manager reconnects with backoff, as an explicit wait would.
        """
        timeout = self.options.ack_timeout
        assert timeout is not None
        error = resubscribe_timed_out(filters, self.url, timeout)
        log.error(
            "%s (connected at %.3f, now %.3f): dropping the connection",
            error,
            self._connected_at,
            trio.current_time(),
        )
        return error

    # ---------------------------------------------------- acknowledgements
    def _update_hold_acks(self) -> None:
        """The session holds PUBACKs while manual acknowledgement may be wanted."""
        self._session.hold_acks = self.options.manual_ack or self._router.manual > 0

    def _settle(self, message: Message, manual: bool) -> None:
        """Who acknowledges a held QoS 1 message: the application, or us now."""
        settle(message, manual, ack_later=self._ack_message, ack_now=self._session.ack)

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
            try:
                sub.deliver_nowait(message)
            except trio.WouldBlock:
                await sub.deliver(message)  # backpressure: stop reading the socket

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
            raise broker_disconnected(event.reason_code, event.reason_string, self.client_id)


@asynccontextmanager
async def open_trio_client(broker: BrokerURL, opts: ClientOptions) -> AsyncIterator[MQTTClient]:
    """Connect with the native client, in a nursery of its own, and yield it.

    Raises :class:`ConnectError` if the first connection fails; later losses
    reconnect with backoff. Reached through :func:`~._open.open_client`.
    """
    client = MQTTClient(broker, opts)
    with collapse_exception_groups():  # users see our errors, not groups (as trio-websocket)
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run)
            try:
                yield client
            finally:
                await client.aclose()
