"""The gmqtt backend: gmqtt (asyncio) driven from trio through trio-asyncio.

``open_client(url, backend="gmqtt")`` lands here. It offers the interface of the
native client (:class:`~sheri_trio.mqtt._client.Client`) on top of gmqtt 0.8:

* one ``trio_asyncio.open_loop()`` per client, and one trio nursery inside it
  that owns the connection manager and the delivery pump. gmqtt's own asyncio
  tasks (its reader, replays) live on that loop; leaving the loop cancels and
  awaits whatever of them is left, so nothing outlives the client;
* gmqtt's callbacks (on_connect, on_message, on_disconnect, on_subscribe,
  on_unsubscribe) run in the loop's runner task, on the trio thread: they hand
  data to trio with ``send_nowait`` / ``Event.set`` / ``ParkingLot.unpark_all``,
  which is safe there, and always return at once;
* reconnection is ours (trio side, exponential backoff with jitter, as the
  native client): gmqtt's built-in reconnect is switched off, because it runs
  in detached asyncio tasks with a fixed delay, cannot give up cleanly, and
  does not restore subscriptions.

Subscriptions carry subscription identifiers, so each message goes to the
subscriptions it matched (topic matching when the broker sends no identifier);
messages nobody subscribed to wait as "orphans" for a matching subscribe(), as
in the native client. A reconnect that finds no session on the broker restores
the subscriptions and publishes again the unacknowledged QoS 1 messages
(:meth:`GMQTTClient._restorer`), before new publishes go out.

What gmqtt does not offer publicly, and how it is obtained here (each use is
marked "private gmqtt API" below):

* PUBACK tracking: gmqtt's ``persistent_storage=`` argument takes our
  :class:`_InflightStore` (a subclass of ``gmqtt.storage.PersistentStorage``);
  gmqtt calls ``push_message(mid, ...)`` when it sends a QoS 1 PUBLISH,
  ``remove_message_by_mid(mid)`` on its PUBACK, and ``clear()`` when a CONNACK
  says the broker kept no session. That is the completion signal for
  ``publish(..., wait_ack=True)``, and how dropped publishes are noticed.
* PUBACK reason codes: gmqtt 0.8 ignores them. We wrap the package handler's
  ``_package_handler._handle_puback_packet`` to read the code first.
* Our PUBACKs of incoming QoS 1 messages: gmqtt sends them itself, before the
  callback (``optimistic_acknowledgement``) or after a *coroutine* callback returns,
  so an application cannot acknowledge later. We replace
  ``_package_handler._handle_qos_1_publish_packet`` (which hands us the packet id)
  and send the PUBACK with ``_package_handler._send_puback(mid)``: at once, or at
  ``message.ack()`` for ``manual_ack`` subscriptions. QoS 2 stays optimistic.
* Packet ids: gmqtt hands out ids (publishes and requests alike) only up to the
  broker's Receive Maximum, raising ``OverflowError`` beyond; we keep the
  number in use below it. gmqtt never frees the ids of requests lost with a
  connection, nor of publishes it drops on a new session; we free them with
  ``_package_handler.id_generator.free_id``.
* ``_connection._transport``: to pause reading while a subscriber is slow, to
  measure the write buffer, and to abort a connection (connect timeout,
  :meth:`GMQTTClient.abort_connection`); ``_connection._protocol._drain_helper``
  (asyncio's private flow control) to wait for the write buffer to drain.
* ``_clean_session`` is set to False after the first connection, so reconnects
  resume the session, as in the native client.
* ``MQTTConnectError._code``: the CONNACK reason code of a refusal.
* gmqtt's reconnect is switched off by overriding ``Client.reconnect`` (gmqtt
  binds the method as its handler's callback when the client is built).

Limits, compared with the native client:

* TCP and TLS only (no WebSocket).
* While disconnected, ``publish`` waits for the connection instead of queueing
  (``max_queued`` is not used). QoS 0 messages published in the moment a
  connection breaks, before gmqtt notices, are lost.
* Inbound flow control: gmqtt has no Receive Maximum of its own
  (``receive_maximum`` is not sent), so messages held for ``message.ack()`` are
  bounded only by the broker's own in-flight limit.
  Backpressure from a slow subscriber is soft: gmqtt parses a whole read (up
  to 64 KiB) at once, so that much may queue before reading pauses.
* ``Message.packet.packet_id`` is 0 for QoS 2 messages (gmqtt does not pass the
  id on); PUBACK reason strings are not reported, only the codes.
* ``stream_factory`` is not supported (gmqtt opens its own connections).
* The broker's Maximum Packet Size is not checked before sending.
* gmqtt pings after 0.8 keep-alive of silence and drops the connection after
  2 keep-alives without data (the native client: 1 and 1.5).
* gmqtt logs under ``sheri_trio.mqtt.gmqtt.lib`` and ``gmqtt.mqtt.protocol``.
"""

from __future__ import annotations

import logging
import math
import random
import ssl
from collections import deque
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar

import gmqtt  # type: ignore[import-untyped]
import mqtt5
import trio
import trio_asyncio  # type: ignore[import-untyped]
from gmqtt.storage import PersistentStorage  # type: ignore[import-untyped]

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
    ClientClosed,
    ConnectError,
    ConnectionLost,
    LocalProtocolError,
    MQTTError,
)
from ._reconnect import run_reconnecting
from ._routing import Router, settle
from ._session import (
    FATAL_CONNACK_CODES,
    MAX_SUBSCRIPTION_ID,
    QOS_LEVELS,
    Message,
    check_publish,
    check_subscription,
    connack_reason_name,
)
from ._streams import BrokerURL, TLSOptions, connect_error

if TYPE_CHECKING:
    import asyncio
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from ._api import Will

# Nothing is re-exported: gmqtt is imported only when open_client(backend="gmqtt") asks.
__all__: list[str] = []

log = logging.getLogger("sheri_trio.mqtt.gmqtt")
_gmqtt_log = logging.getLogger("sheri_trio.mqtt.gmqtt.lib")  # gmqtt's own messages

_WRITE_HIGH_WATER: Final = 256 * 1024  # bytes in gmqtt's transport buffer before publishers wait
_NO_WEBSOCKET: Final = "the gmqtt backend has no WebSocket support; use backend='trio'"
T = TypeVar("T")


# --------------------------------------------------------------------- gmqtt glue
class _GmqttWithoutReconnect(gmqtt.Client):  # type: ignore[misc]
    """gmqtt's client with its own reconnect switched off (the trio side reconnects).

    gmqtt binds ``self.reconnect`` as its handler's reconnect callback when the
    client is built, so overriding the method here is enough.
    """

    async def reconnect(self, delay: bool = False) -> None:
        return None


class _Inflight:
    """A QoS 1 publish handed to gmqtt and not yet acknowledged."""

    __slots__ = ("done", "error", "message", "reason_code", "seq", "topic")

    def __init__(self, message: Any, topic: str, seq: int) -> None:
        self.message = message  # the gmqtt.Message, to publish again on a new session
        self.topic = topic
        self.seq = seq  # publish order, to resend in order
        self.done = trio.Event()
        self.reason_code = 0
        self.error: MQTTError | None = None


class _InflightStore(PersistentStorage):  # type: ignore[misc]
    """gmqtt's store of unacknowledged publishes, reporting to the trio side.

    gmqtt calls ``push_message`` when it sends a QoS>0 PUBLISH,
    ``remove_message_by_mid`` on its PUBACK, and ``clear`` when a CONNACK says
    the broker kept no session (it then drops the messages).
    """

    def __init__(
        self, on_removed: Callable[[int], None], on_cleared: Callable[[list[int]], None]
    ) -> None:
        super().__init__()
        self.last_mid: int | None = None
        self._on_removed = on_removed
        self._on_cleared = on_cleared

    def push_message(self, mid: int, raw_package: bytes) -> None:
        super().push_message(mid, raw_package)
        self.last_mid = mid

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        self._on_removed(mid)

    def clear(self) -> None:
        mids = [mid for mid, _ in self.get_all()]
        super().clear()
        self._on_cleared(mids)


class _Request:
    """A SUBSCRIBE or UNSUBSCRIBE waiting for its acknowledgement."""

    __slots__ = ("codes", "done", "lost")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.codes: list[int] | None = None
        self.lost = False


class _SubRecord:
    """One ``subscribe()`` call: its gmqtt subscriptions and identifier."""

    __slots__ = ("acknowledged", "gsubs", "sub", "sub_id")

    def __init__(self, sub: Subscription, sub_id: int, gsubs: list[Any]) -> None:
        self.sub = sub
        self.sub_id = sub_id
        self.gsubs = gsubs
        self.acknowledged = False


def _first(properties: dict[str, Any], name: str) -> Any:
    values = properties.get(name)
    if not values:
        return None
    return values[0] if isinstance(values, list) else values


def _to_message(
    topic: str | bytes, payload: bytes, qos: int, properties: dict[str, Any], mid: int = 0
) -> Message:
    """A gmqtt on_message call as our :class:`Message` (an ``mqtt5.PublishPacket``)."""
    if isinstance(topic, bytes):
        topic = topic.decode("utf-8", errors="replace")
    correlation = _first(properties, "correlation_data")
    packet = mqtt5.PublishPacket(
        topic,
        bytes(payload),
        qos=QOS_LEVELS[qos],
        # gmqtt passes the packet id on to QoS 1 only (through our hook); 0, never a
        # valid id, stands in for it otherwise.
        packet_id=mid if qos else None,
        retain=bool(properties.get("retain")),
        duplicate=bool(properties.get("dup")),
        payload_format_indicator=_first(properties, "payload_format_id") or 0,
        message_expiry_interval=_first(properties, "message_expiry_interval"),
        content_type=_first(properties, "content_type"),
        response_topic=_first(properties, "response_topic"),
        correlation_data=bytes(correlation) if correlation is not None else None,
        subscription_ids=[int(i) for i in properties.get("subscription_identifier", ())] or None,
        user_properties=[(str(k), str(v)) for k, v in properties.get("user_property", ())] or None,
    )
    return Message(packet)


def _will_message(will: Will) -> Any:
    props: dict[str, Any] = {}
    if will.delay_interval:
        props["will_delay_interval"] = will.delay_interval
    if will.message_expiry_interval is not None:
        props["message_expiry_interval"] = will.message_expiry_interval
    if will.content_type is not None:
        props["content_type"] = will.content_type
    if will.user_properties:
        props["user_property"] = list(will.user_properties)
    return gmqtt.Message(will.topic, will.payload, qos=will.qos, retain=will.retain, **props)


# ------------------------------------------------------------------------ client
class GMQTTClient:
    """The :class:`~sheri_trio.mqtt.Client` interface on gmqtt. Create it with ``open_client``."""

    def __init__(
        self,
        url: BrokerURL,
        options: ClientOptions,
        loop: asyncio.AbstractEventLoop,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.url = url
        self.options = options
        self._loop = loop
        self._ssl = ssl_context
        username = options.username if options.username is not None else url.username
        password = options.password if options.password is not None else url.password
        if password is not None and username is None:
            raise LocalProtocolError("the gmqtt backend cannot send a password without a user name")
        # Not receive_maximum: gmqtt acknowledges on receipt, and would report our
        # value as the broker's to on_connect (it merges CONNECT into CONNACK properties).
        props: dict[str, Any] = {"maximum_packet_size": options.max_packet_size}
        if options.session_expiry_interval:
            props["session_expiry_interval"] = options.session_expiry_interval
        self._store = _InflightStore(self._on_acked, self._on_store_cleared)
        self._gmqtt: Any = _GmqttWithoutReconnect(
            options.client_id,
            clean_session=options.clean_start,
            # PUBACK goes out before on_message runs. With False, gmqtt would send
            # it only for coroutine callbacks (never for a plain function like ours).
            optimistic_acknowledgement=True,
            will_message=_will_message(options.will) if options.will else None,
            persistent_storage=self._store,
            logger=_gmqtt_log,
            **props,
        )
        if username is not None:
            self._gmqtt.set_auth_credentials(username, password)
        self._gmqtt.on_connect = self._on_connect
        self._gmqtt.on_disconnect = self._on_disconnect
        self._gmqtt.on_message = self._on_message
        self._gmqtt.on_subscribe = self._on_subscribe
        self._gmqtt.on_unsubscribe = self._on_unsubscribe
        self._hook_puback()
        self._hook_qos1 = self._hook_qos1_publish()

        self._client_id = options.client_id
        self._connected = False
        self._connected_event = trio.Event()
        self._lost = trio.Event()
        self._lost_error: MQTTError | None = None
        self._abort_reason: MQTTError | None = None  # why we dropped the connection
        self._connected_at = math.inf
        self._attempt_scope: trio.CancelScope | None = None
        self._manager_scope: trio.CancelScope | None = None
        self._space = trio.lowlevel.ParkingLot()
        self._closed = False
        self._fatal: BaseException | None = None
        # packet ids: in-flight publishes, awaited requests, and acks nobody awaits
        self._inflight: dict[int, _Inflight] = {}
        self._requests: dict[int, _Request] = {}
        self._unawaited: set[int] = set()
        self._id_limit = 65535 - 1
        self._published = 0
        # what a connection without session must restore, by _restorer (trio side)
        self._resend: list[_Inflight] = []
        self._resubscribe: list[_SubRecord] = []
        self._restoring = False
        self._restore_event = trio.Event()
        # SUBSCRIBEs sent again after a reconnect, which nobody else bounds:
        # packet id -> (deadline, filters), timed by _watch_resubscriptions
        self._resubscribing: dict[int, tuple[float, tuple[str, ...]]] = {}
        self._resubscribed = trio.Event()
        # subscriptions and delivery
        self._records: dict[int, _SubRecord] = {}
        self._router = Router(options.orphan_buffer)
        self._next_sub_id = random.randint(1, 1 << 26)
        self._sub_ids_available = True
        self._backlog: deque[tuple[Message, list[Subscription]]] = deque()
        self._backlog_event = trio.Event()
        self.connections = 0
        self.messages_received = 0
        self.messages_dropped = 0
        self.last_error: str | None = None

    # ---------------------------------------------------------------- status
    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def client_id(self) -> str:
        return self._client_id

    def statistics(self) -> dict[str, Any]:
        if self._closed or self._fatal is not None:
            state = "closed"
        else:
            state = "connected" if self._connected else "disconnected"
        return {
            "backend": "gmqtt",
            "url": self.url.display(),
            "state": state,
            "connections": self.connections,
            "inflight": len(self._inflight),
            "requests": len(self._requests),
            "subscriptions": len(self._router.subs),
            "orphans": len(self._router.orphans),
            "backlog": len(self._backlog),
            "restoring": self._restoring,
            "messages_received": self.messages_received,
            "messages_dropped": self.messages_dropped + self._router.dropped,
            "last_error": self.last_error,
        }

    async def wait_connected(self) -> None:
        """Wait until the client is connected (returns at once if it is)."""
        while not self._connected:
            self._check_open()
            await self._connected_event.wait()

    def _check_open(self) -> None:
        if self._fatal is not None:
            raise ClientClosed(f"client stopped: {self._fatal}") from self._fatal
        if self._closed:
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

        QoS 0 returns None once gmqtt wrote it to its transport. QoS 1 returns the
        broker's PUBACK reason code once it acknowledged it (0x00, or 0x10 "no
        matching subscribers"; >= 0x80 raise PublishError); ``wait_ack=False``
        returns None once it is sent (it is resent until acknowledged). While
        disconnected this waits for the connection; it also waits while the broker's
        Receive Maximum of QoS 1 publishes are in flight, or gmqtt's write buffer is
        full (backpressure).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        check_publish(topic, qos)
        if isinstance(payload, str):
            payload = payload.encode()
        props: dict[str, Any] = {}
        if message_expiry_interval is not None:
            props["message_expiry_interval"] = message_expiry_interval
        if content_type is not None:
            props["content_type"] = content_type
        if response_topic is not None:
            props["response_topic"] = response_topic
        if correlation_data is not None:
            props["correlation_data"] = correlation_data
        if user_properties:
            props["user_property"] = list(user_properties)
        try:
            message = gmqtt.Message(topic, payload, qos=qos, retain=retain, **props)
        except ValueError as exc:
            raise LocalProtocolError(f"cannot publish: {exc}") from None
        await self._wait_for_room(need_id=qos > 0)
        record = self._send_publish(message, topic)
        if record is None or not wait_ack:
            return None
        await self._ack_bound(record.done.wait, "PUBLISH", f"PUBLISH to {topic!r}", "PUBACK")
        if record.error is not None:
            raise record.error
        code = record.reason_code
        if code >= 0x80:
            raise publish_refused(topic, code)
        return code

    def _send_publish(self, message: Any, topic: str) -> _Inflight | None:
        """Hand one message to gmqtt (synchronously: nothing can arrive in between)."""
        try:
            self._gmqtt.publish(message)
        except OverflowError as exc:  # gmqtt ran out of packet ids: a bookkeeping bug
            raise LocalProtocolError(f"gmqtt refused the publish: {exc}") from None
        except (TypeError, ValueError, UnicodeError, OSError) as exc:
            raise LocalProtocolError(f"cannot publish to {topic!r}: {exc}") from None
        if message.qos == 0:
            return None
        mid = self._store.last_mid
        assert mid is not None
        self._published += 1
        record = _Inflight(message, topic, self._published)
        self._inflight[mid] = record
        return record

    def _ids_in_use(self) -> int:
        return len(self._inflight) + len(self._requests) + len(self._unawaited)

    async def _wait_for_room(self, *, need_id: bool) -> None:
        """Wait until connected and restored, a packet id free, the write buffer not full."""
        while True:
            self._check_open()
            if not self._connected or self._restoring:
                await self._space.park()
                continue
            if need_id and self._ids_in_use() >= self._id_limit:
                await self._space.park()
                continue
            if self._write_buffer_size() > _WRITE_HIGH_WATER and await self._drain():
                continue
            return

    def _on_acked(self, mid: int) -> None:
        """gmqtt removed an acknowledged publish from its store (asyncio side)."""
        record = self._inflight.pop(mid, None)
        if record is not None:
            record.done.set()
            self._space.unpark_all()

    def _on_store_cleared(self, mids: list[int]) -> None:
        """A new connection found no session: gmqtt dropped the unacknowledged publishes.

        We free their ids (gmqtt does not) and :meth:`_restorer` publishes them
        again, as the native client resends them on a new session.
        """
        for mid in mids:
            self._free_id(mid)
            record = self._inflight.pop(mid, None)
            if record is not None:
                self._resend.append(record)

    def _hook_puback(self) -> None:
        """Read PUBACK reason codes, which gmqtt 0.8 ignores (private handler method)."""
        # private gmqtt API: the package handler and its PUBACK method
        handler = getattr(self._gmqtt, "_package_handler", None)
        original = getattr(handler, "_handle_puback_packet", None)
        if handler is None or original is None:
            log.warning("gmqtt internals changed: PUBACK reason codes are not reported")
            return

        def handle_puback(cmd: int, packet: bytes) -> None:
            if len(packet) >= 3:
                record = self._inflight.get(int.from_bytes(packet[:2], "big"))
                if record is not None:
                    record.reason_code = packet[2]
            original(cmd, packet)

        handler._handle_puback_packet = handle_puback

    def _free_id(self, mid: int) -> None:
        # private gmqtt API: the packet id allocator
        handler = getattr(self._gmqtt, "_package_handler", None)
        generator = getattr(handler, "id_generator", None)
        if generator is not None:
            generator.free_id(mid)

    # ------------------------------------------------------------- transport
    def _transport(self) -> Any:
        # private gmqtt API: the current connection's asyncio transport
        connection = getattr(self._gmqtt, "_connection", None)
        return getattr(connection, "_transport", None)

    def _write_buffer_size(self) -> int:
        transport = self._transport()
        if transport is None or transport.is_closing():
            return 0
        return int(transport.get_write_buffer_size())

    async def _drain(self) -> bool:
        """Wait until gmqtt's transport has written most of its buffer out.

        Returns False, without waiting, if that cannot be done (internals changed).
        """
        # private gmqtt API (the protocol) and private asyncio API (_drain_helper)
        connection = getattr(self._gmqtt, "_connection", None)
        helper = getattr(getattr(connection, "_protocol", None), "_drain_helper", None)
        if helper is None:
            return False
        try:
            await trio_asyncio.aio_as_trio(helper, loop=self._loop)()
        except (ConnectionError, OSError):
            await trio.lowlevel.checkpoint()  # on_disconnect reports the loss
        return True

    def _pause_reading(self) -> None:
        transport = self._transport()
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def _resume_reading(self) -> None:
        transport = self._transport()
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def _abort_transport(self) -> None:
        transport = self._transport()
        if transport is not None and not transport.is_closing():
            transport.abort()

    def abort_connection(self) -> None:
        """Drop the connection without DISCONNECT, as a crash would (for tests).

        The broker then publishes the will; the client reconnects if allowed.
        """
        self._abort_transport()

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
        ``manual_ack=True``: QoS 1 messages are acknowledged at ``message.ack()``.
        """
        self._check_open()
        check_subscription(filters, qos, retain_handling)
        send, receive = trio.open_memory_channel[Message](
            self.options.message_buffer if buffer is None else buffer
        )
        manual = self.options.manual_ack if manual_ack is None else manual_ack
        if manual and not self._hook_qos1:
            raise LocalProtocolError("manual_ack is not available: gmqtt internals changed")
        sub = Subscription(tuple(filters), send, receive, manual_ack=manual)
        sub_id = self._next_sub_id
        self._next_sub_id = self._next_sub_id % MAX_SUBSCRIPTION_ID + 1
        record = _SubRecord(
            sub,
            sub_id,
            [
                gmqtt.Subscription(
                    pattern,
                    qos=qos,
                    no_local=no_local,
                    retain_as_published=True,
                    retain_handling_options=retain_handling,
                    subscription_identifier=sub_id,
                )
                for pattern in filters
            ],
        )
        self._records[sub_id] = record
        self._router.add(sub_id, sub)
        what = "SUBSCRIBE " + ", ".join(repr(f) for f in filters)
        body_failed = False
        try:
            codes = await self._ack_bound(
                lambda: self._request(lambda: self._send_subscribe(record), filters=filters),
                "SUBSCRIBE",
                what,
                "SUBACK",
            )
            sub.reason_codes = codes
            refused = subscribe_refused(filters, codes)
            if refused is not None:
                raise refused
            record.acknowledged = True
            for message in self._router.replay(sub):
                self._settle(message, sub.manual_ack)
            try:
                async with send, receive:
                    yield sub
            except BaseException:
                body_failed = True
                raise
        finally:
            self._records.pop(sub_id, None)
            self._router.remove(sub_id, sub)
            self._forget_gmqtt_subscriptions(record)
            if not self._closed and self._fatal is None and self._connected:

                async def unsubscribe() -> None:
                    await self._ack_bound(
                        lambda: self._request(
                            lambda: int(self._gmqtt.unsubscribe(list(filters))), retry=False
                        ),
                        "UNSUBSCRIBE",
                        "UN" + what,
                        "UNSUBACK",
                    )

                await unsubscribe_on_exit(
                    unsubscribe, self.options.close_timeout, body_failed=body_failed
                )

    async def _ack_bound(
        self, wait: Callable[[], Awaitable[T]], packet: str, what: str, ack: str
    ) -> T:
        """Run ``wait`` for at most ``ack_timeout``, as the native client (``bounded_ack``)."""
        return await bounded_ack(
            wait,
            self.options.ack_timeout,
            partial(ack_timeout_error, packet, what, ack, self.url),
            up_since=self._up_since,
            drop_connection=self._drop_connection,
        )

    def _up_since(self) -> float:
        return self._connected_at if self._connected else math.inf

    def _drop_connection(self, error: MQTTError) -> None:
        """End the current connection because of ``error``; the manager reconnects."""
        log.warning("dropping the connection to %s: %s", self.url, error)
        self._abort_reason = error
        self._on_disconnect(self._gmqtt, None)  # disconnected from now on
        self._abort_transport()

    def _bound_resubscription(self, mid: int, filters: tuple[str, ...]) -> None:
        timeout = self.options.ack_timeout
        if timeout is not None:
            self._resubscribing[mid] = (trio.current_time() + timeout, filters)
            self._resubscribed.set()

    async def _watch_resubscriptions(self) -> None:
        """Drop the connection when a SUBSCRIBE sent again after a reconnect goes
        unanswered for ``ack_timeout`` (owned by the connection's nursery).

        Nobody else waits for those SUBACKs: a broker that never sends them would
        leave us connected but deaf.
        """
        timeout = self.options.ack_timeout
        while timeout is not None:
            if not self._resubscribing:
                self._resubscribed = trio.Event()
                await self._resubscribed.wait()
                continue
            await trio.sleep_until(min(d for d, _ in self._resubscribing.values()))
            now = trio.current_time()
            overdue = [f for d, fs in self._resubscribing.values() if d <= now for f in fs]
            if overdue and self._connected:
                error = resubscribe_timed_out(overdue, self.url, timeout)
                log.error(
                    "%s (connected at %.3f, now %.3f): dropping the connection",
                    error,
                    self._connected_at,
                    now,
                )
                self._drop_connection(error)
                return

    def _forget_gmqtt_subscriptions(self, record: _SubRecord) -> None:
        gsubs = record.gsubs
        self._gmqtt.subscriptions = [
            s for s in self._gmqtt.subscriptions if all(s is not g for g in gsubs)
        ]

    def _send_subscribe(self, record: _SubRecord) -> int:
        # gmqtt.subscribe appends to its list; drop an earlier copy of the same record.
        self._forget_gmqtt_subscriptions(record)
        sub_id = record.sub_id if self._sub_ids_available else None
        return int(self._gmqtt.subscribe(record.gsubs, subscription_identifier=sub_id))

    async def _request(
        self, send: Callable[[], int], *, retry: bool = True, filters: tuple[str, ...] = ()
    ) -> list[int]:
        """Send a SUBSCRIBE/UNSUBSCRIBE and wait for its acknowledgement.

        A request lost with its connection is sent again on the next one
        (``retry``: a SUBSCRIBE of ``filters``), else ConnectionLost is raised.
        """
        again: tuple[str, ...] | None = None  # the filters of a SUBSCRIBE sent again
        while True:
            await self._wait_for_room(need_id=True)
            try:
                mid = send()
            except OverflowError as exc:  # gmqtt ran out of packet ids: a bookkeeping bug
                raise LocalProtocolError(f"gmqtt refused the request: {exc}") from None
            if again is not None:
                # our caller's bound began on an earlier connection: bound this one too
                self._bound_resubscription(mid, again)
            request = _Request()
            self._requests[mid] = request
            try:
                await request.done.wait()
            finally:
                if self._requests.pop(mid, None) is not None:
                    self._unawaited.add(mid)  # cancelled: its ack still frees the id
            self._check_open()
            if request.codes is not None:
                return request.codes
            if not retry:
                raise ConnectionLost("connection lost before the broker answered")
            again = filters

    def _on_subscribe(self, client: Any, mid: int, codes: Sequence[int], properties: Any) -> None:
        self._request_done(mid, list(codes))

    def _on_unsubscribe(self, client: Any, mid: int, codes: Sequence[int]) -> None:
        self._request_done(mid, list(codes))

    def _request_done(self, mid: int, codes: list[int]) -> None:
        request = self._requests.pop(mid, None)
        if request is not None:
            request.codes = codes
            request.done.set()
        self._unawaited.discard(mid)
        self._resubscribing.pop(mid, None)
        self._space.unpark_all()

    # ------------------------------------------------------ incoming messages
    def _on_message(
        self, client: Any, topic: str | bytes, payload: bytes, qos: int, properties: dict[str, Any]
    ) -> int:
        """gmqtt's message callback (asyncio side) for QoS 0 and 2 (QoS 1: _on_qos1).

        Returns 0 (success) at once; gmqtt already acknowledged a QoS 2 message
        (optimistic acknowledgement).
        """
        self._receive(topic, payload, qos, properties, None)
        return 0

    def _receive(
        self,
        topic: str | bytes,
        payload: bytes,
        qos: int,
        properties: dict[str, Any],
        mid: int | None,
    ) -> None:
        """Route one message without blocking; ``mid``: a QoS 1 message whose PUBACK
        is ours to send (now, or at ``message.ack()`` for manual_ack subscriptions)."""
        try:
            message = _to_message(topic, payload, qos, properties, mid or 0)
        except Exception as exc:  # nothing may escape into gmqtt's reader
            self.messages_dropped += 1
            log.warning("dropped a message gmqtt could not hand over: %r", exc)
            if mid is not None:
                self._send_puback(mid)
            return
        if mid is not None:
            message.ack_id = (self.connections, mid)
        self.messages_received += 1
        targets = self._router.targets(message)
        if not targets:
            if not self.options.manual_ack:
                self._settle(message, False)
            self._router.park(message)
            return
        if message.ack_id is not None:
            self._settle(message, any(s.manual_ack for s in targets))
        if self._backlog:  # keep the order: behind what already waits
            self._backlog.append((message, targets))
            self._pause_reading()
            return
        for i, sub in enumerate(targets):
            try:
                sub.deliver_nowait(message)
            except trio.WouldBlock:
                # A slow subscriber: the pump delivers with backpressure, and the
                # socket is not read meanwhile.
                self._backlog.append((message, targets[i:]))
                self._backlog_event.set()
                self._pause_reading()
                return

    # ---------------------------------------------------- acknowledgements
    def _hook_qos1_publish(self) -> bool:
        """Take over the PUBACK of incoming QoS 1 messages (private handler method).

        gmqtt acknowledges a QoS 1 message before its callback runs (optimistic
        acknowledgement), or after a coroutine callback; neither lets the application
        acknowledge later. We replace the handler's QoS 1 method: it hands us the
        packet id, and we send the PUBACK ourselves (``_send_puback``).
        """
        # private gmqtt API: the package handler, its QoS 1 and PUBACK methods
        handler: Any = getattr(self._gmqtt, "_package_handler", None)
        if not hasattr(handler, "_handle_qos_1_publish_packet") or not hasattr(
            handler, "_send_puback"
        ):
            log.warning("gmqtt internals changed: manual_ack acknowledges on receipt")
            return False

        def handle_qos1(mid: int, packet: bytes, topic: str, properties: dict[str, Any]) -> None:
            self._receive(topic, packet, 1, properties, mid)

        handler._handle_qos_1_publish_packet = handle_qos1
        return True

    def _send_puback(self, mid: int) -> None:
        # private gmqtt API: the handler's PUBACK sender
        self._gmqtt._package_handler._send_puback(mid)

    def _settle(self, message: Message, manual: bool) -> None:
        """Who acknowledges a QoS 1 message: the application (manual), or us now."""
        settle(message, manual, ack_later=self._ack_message, ack_now=self._ack)

    def _ack_message(self, message: Message) -> None:
        if message.ack_id is not None:
            self._ack(message.ack_id)

    def _ack(self, ack_id: tuple[int, int]) -> None:
        connection, mid = ack_id
        if connection == self.connections and self._connected:
            self._send_puback(mid)

    async def _pump(self) -> None:
        """Deliver messages that found a subscription's buffer full (owned by the nursery)."""
        while True:
            await self._backlog_event.wait()
            self._backlog_event = trio.Event()
            while self._backlog:
                message, targets = self._backlog[0]
                for sub in targets:
                    await sub.deliver(message)
                self._backlog.popleft()
            self._resume_reading()

    # ------------------------------------------------------------ connection
    def _on_connect(self, client: Any, flags: int, rc: int, properties: dict[str, Any]) -> None:
        """CONNACK accepted (asyncio side)."""
        scope = self._attempt_scope
        if scope is not None:
            scope.deadline = math.inf  # replays may take a while: the connect timeout is over
        receive_maximum = _first(properties, "receive_maximum") or 65535
        self._id_limit = max(int(receive_maximum) - 1, 1)
        self._sub_ids_available = _first(properties, "sub_id_available") != 0
        assigned = _first(properties, "assigned_client_identifier")
        if assigned:
            self._client_id = str(assigned)
        self._connected = True
        self._connected_at = trio.current_time()
        self._lost_error = None
        self._abort_reason = None
        self.connections += 1
        session_present = bool(flags)
        log.info(
            "connected to %s as %r (session present: %s)",
            self.url,
            self._client_id,
            "yes" if session_present else "no",
        )
        # The broker forgot our subscriptions: make them again (ones still waiting
        # for their first SUBACK are resent by their subscribe()). Publishes gmqtt
        # dropped for want of a session go out again, in their order. Both need
        # packet ids, which may be scarce: _restorer sends them as ids free up,
        # and holds new publishes and requests back until it is done.
        self._resubscribe = (
            [] if session_present else [r for r in self._records.values() if r.acknowledged]
        )
        self._resend.sort(key=lambda r: r.seq)
        if self._resubscribe or self._resend:
            self._restoring = True
            self._restore_event.set()
        self._connected_event.set()
        self._space.unpark_all()

    def _on_disconnect(self, client: Any, packet: Any, exc: Any = None) -> None:
        """The broker sent DISCONNECT or the connection broke (asyncio side)."""
        if not self._connected:
            return  # a refused or unfinished attempt, or our own DISCONNECT
        self._connected = False
        self._connected_at = math.inf
        self._connected_event = trio.Event()
        error: MQTTError
        if self._abort_reason is not None:
            error, self._abort_reason = self._abort_reason, None
        elif isinstance(packet, (bytes, bytearray)) and packet:
            error = broker_disconnected(packet[0], None, self._client_id)
        else:
            error = ConnectionLost("connection lost")
        self._lost_error = error
        # Requests die with their connection; gmqtt never frees their ids.
        for mid, request in list(self._requests.items()):
            request.lost = True
            request.done.set()
            self._free_id(mid)
        self._requests.clear()
        for mid in self._unawaited:
            self._free_id(mid)
        self._unawaited.clear()
        self._resubscribing.clear()
        self._lost.set()
        self._space.unpark_all()

    async def _restorer(self) -> None:
        """Restore subscriptions and publishes after a reconnect (owned by the nursery)."""
        while True:
            await self._restore_event.wait()
            self._restore_event = trio.Event()
            while self._connected and (self._resubscribe or self._resend):
                if self._ids_in_use() >= self._id_limit:
                    await self._space.park()
                    continue
                if self._resubscribe:
                    record = self._resubscribe.pop(0)
                    if record.sub_id in self._records:  # not unsubscribed meanwhile
                        sub_mid = self._send_subscribe(record)
                        self._unawaited.add(sub_mid)
                        self._bound_resubscription(sub_mid, record.sub.filters)
                    continue
                pending = self._resend.pop(0)
                try:
                    self._gmqtt.publish(pending.message)
                except OverflowError as exc:
                    pending.error = ConnectionLost(f"could not resend to {pending.topic!r}: {exc}")
                    pending.done.set()
                    continue
                mid = self._store.last_mid
                assert mid is not None
                self._inflight[mid] = pending
            if not (self._resubscribe or self._resend):
                self._restoring = False
            self._space.unpark_all()

    async def _connect_once(self) -> None:
        """One connection attempt; returns once connected, raises ConnectError."""
        opts = self.options
        where = self.url.display()
        gm = self._gmqtt
        error: ConnectError | None = None
        with trio.move_on_after(opts.connect_timeout) as scope:
            self._attempt_scope = scope
            try:
                await trio_asyncio.aio_as_trio(gm.connect, loop=self._loop)(
                    self.url.host,
                    self.url.port,
                    ssl=self._ssl if self._ssl is not None else False,
                    keepalive=opts.keep_alive,
                    raise_exc=True,
                )
            except gmqtt.MQTTConnectError as exc:
                code = getattr(exc, "_code", None)  # private gmqtt API
                if isinstance(code, int):
                    error = ConnectError(
                        f"cannot connect to {where}: broker refused the connection: "
                        f"{connack_reason_name(code)}",
                        reason_code=code,
                        retryable=code not in FATAL_CONNACK_CODES,
                    )
                else:
                    error = ConnectError(f"cannot connect to {where}: {exc}")
            except OSError as exc:  # refused, unreachable, TLS (ssl.SSLError is an OSError)
                error = connect_error(where, exc)
            except Exception as exc:  # gmqtt or asyncio internals: never leak them
                error = ConnectError(f"cannot connect to {where}: {type(exc).__name__}: {exc}")
            finally:
                self._attempt_scope = None
        if error is None and scope.cancelled_caught and not self._connected:
            error = ConnectError(
                f"cannot connect to {where}: no answer within {opts.connect_timeout:g} s"
            )
        if error is not None:
            if self._connected:
                self._on_disconnect(gm, b"")
            self._abort_transport()
            raise error
        # private gmqtt API: reconnects resume the session, as in the native client
        gm._clean_session = False

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
        self._lost = trio.Event()
        await self._connect_once()
        on_connected()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_resubscriptions)
            await self._lost.wait()
            nursery.cancel_scope.cancel()
        if self._closed:
            return
        error = self._lost_error or ConnectionLost("connection lost")
        self._abort_transport()
        raise error

    def _set_fatal(self, exc: BaseException) -> None:
        self._fatal = exc
        self._fail_waiters(ClientClosed(f"client stopped: {exc}"))
        for sub in self._router.subs:
            sub.close()

    def _fail_waiters(self, error: MQTTError) -> None:
        self._connected_event.set()
        self._space.unpark_all()
        for request in self._requests.values():
            request.done.set()
        for record in [*self._inflight.values(), *self._resend]:
            if not record.done.is_set():
                record.error = error
                record.done.set()

    # ---------------------------------------------------------------- close
    async def aclose(self) -> None:
        """Wait for in-flight publishes, send DISCONNECT (the will is discarded), stop.

        Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        try:
            with trio.move_on_after(self.options.close_timeout) as scope:
                scope.shield = True
                while (self._inflight or self._resend) and self._connected:
                    await self._space.park()
                if self._connected:
                    self._connected = False  # our own DISCONNECT is not a loss
                    try:
                        await trio_asyncio.aio_as_trio(self._gmqtt.disconnect, loop=self._loop)()
                    except Exception as exc:  # the connection may break meanwhile
                        log.debug("error while disconnecting: %r", exc)
        finally:
            self._connected = False
            self._abort_transport()  # a no-op unless the DISCONNECT timed out
            self._fail_waiters(ClientClosed("client closed"))
            if self._manager_scope is not None:
                self._manager_scope.cancel()


@asynccontextmanager
async def open_gmqtt_client(broker: BrokerURL, opts: ClientOptions) -> AsyncIterator[GMQTTClient]:
    """Connect with gmqtt, in a trio-asyncio loop of its own, and yield the client.

    ``mqtt://`` and ``mqtts://`` only. Raises :class:`ConnectError` if the first
    connection fails; later losses reconnect with backoff (``opts.reconnect``).
    """
    if broker.websocket:
        raise LocalProtocolError(_NO_WEBSOCKET)
    if opts.stream_factory is not None:
        raise LocalProtocolError("the gmqtt backend cannot use a stream_factory")
    if broker.scheme not in ("mqtt", "mqtts"):
        raise LocalProtocolError(
            f"the gmqtt backend supports mqtt:// and mqtts://, not {broker.scheme}://"
        )
    ssl_context: ssl.SSLContext | None = None
    if broker.tls:
        try:
            ssl_context = (opts.tls or TLSOptions()).build()
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"bad TLS settings: {exc}", retryable=False) from exc
    with collapse_exception_groups():
        async with trio_asyncio.open_loop() as loop, trio.open_nursery() as nursery:
            client = GMQTTClient(broker, opts, loop, ssl_context)
            await nursery.start(client._run)
            nursery.start_soon(client._pump)
            nursery.start_soon(client._restorer)
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
