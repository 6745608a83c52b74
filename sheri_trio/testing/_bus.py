"""An in-memory MQTT-like bus for unit tests of the logic above the client (agents).

In the spirit of httpx's ``MockTransport``: :class:`MemoryBus` is an in-process
broker; its :class:`MemoryClient` implements the same
:class:`~sheri_trio.mqtt.Client` interface as the real client, on trio memory
channels, with no sockets, threads or real time, so tests can run under
``trio.testing.MockClock(autojump_threshold=0)`` and assert exact times::

    bus = MemoryBus()
    async with bus.connect("agent-1", will=will) as client:
        async with client.subscribe("swarm/#") as messages:
            await client.publish("swarm/hello", b"hi", qos=1)
            message = await messages.receive()
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import mqtt5
import trio

from ..mqtt import (
    QOS_LEVELS,
    ClientClosed,
    Message,
    Subscription,
    Will,
    check_publish,
    check_subscription,
    topic_matches,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Sequence

    from ..mqtt import Client

__all__ = ["BusRecord", "MemoryBus", "MemoryClient"]

_NO_MATCHING_SUBSCRIBERS: Final = 0x10


@dataclass(frozen=True, slots=True)
class BusRecord:
    """One message as :class:`MemoryBus` routed it: when (trio time), from whom, what."""

    time: float
    sender: str
    message: Message
    will: bool = False

    @property
    def topic(self) -> str:
        return self.message.topic

    @property
    def payload(self) -> bytes:
        return self.message.payload

    @property
    def retain(self) -> bool:
        return self.message.retain

    def json(self) -> Any:
        """The payload decoded as JSON."""
        return json.loads(self.message.payload)


class _BusSubscription(Subscription):
    """A subscription whose messages beyond its buffer wait on the bus (``waiting``),
    as a broker holds them for a slow client: each one taken lets the next one in."""

    def __init__(
        self,
        filters: tuple[str, ...],
        send: trio.MemorySendChannel[Message],
        receive: trio.MemoryReceiveChannel[Message],
        *,
        manual_ack: bool,
        room: trio.lowlevel.ParkingLot,
    ) -> None:
        super().__init__(filters, send, receive, manual_ack=manual_ack)
        #: delivered by the bus, not yet in the buffer (it was full), oldest first
        self.waiting: deque[Message] = deque()
        self._room = room  # the bus's: publishers waiting for their messages to go in

    async def receive(self) -> Message:
        if not self.waiting:
            message = await super().receive()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                message = super().receive_nowait()
            except trio.WouldBlock:  # a buffer of 0: the oldest waits here
                message = self.waiting.popleft()
            await trio.lowlevel.cancel_shielded_checkpoint()
        self._refill()
        return message

    def receive_nowait(self) -> Message:
        try:
            message = super().receive_nowait()
        except trio.WouldBlock:
            if not self.waiting:
                raise
            message = self.waiting.popleft()
        self._refill()
        return message

    def offer(self, message: Message) -> bool | None:
        """Into the buffer if it has room and nothing waits before it (True), else
        behind the waiting ones (False); None if the subscription is closed."""
        if not self.waiting:
            try:
                return True if self.deliver_nowait(message) else None
            except trio.WouldBlock:
                pass
        self.waiting.append(message)
        return False

    def _refill(self) -> None:
        moved = False
        while self.waiting:
            try:
                still_open = self.deliver_nowait(self.waiting[0])
            except trio.WouldBlock:
                break
            if still_open:
                self.waiting.popleft()
            else:
                self.waiting.clear()
            moved = True
        if moved:
            self._room.unpark_all()

    def discard_waiting(self) -> None:
        """The subscription ends: what never reached its buffer is gone with it."""
        if self.waiting:
            self.waiting.clear()
            self._room.unpark_all()

    def holds(self, message: Message) -> bool:
        return any(m is message for m in self.waiting)


class _Entry:
    """One live ``subscribe()`` of one client, as the bus sees it."""

    __slots__ = (
        "client",
        "manual_ack",
        "no_local",
        "plain",
        "qos",
        "retain_handling",
        "shared",
        "subscription",
    )

    def __init__(
        self,
        client: MemoryClient,
        subscription: _BusSubscription,
        *,
        qos: int,
        no_local: bool,
        retain_handling: int,
        manual_ack: bool = False,
    ) -> None:
        self.client = client
        self.subscription = subscription
        self.manual_ack = manual_ack
        self.qos = qos
        self.no_local = no_local
        self.retain_handling = retain_handling
        self.plain: list[str] = []
        self.shared: list[tuple[str, str]] = []  # (group, filter)
        for f in subscription.filters:
            if f.startswith("$share/"):
                _, group, rest = f.split("/", 2)
                self.shared.append((group, rest))
            else:
                self.plain.append(f)

    def matches_plain(self, topic: str) -> bool:
        return any(topic_matches(f, topic) for f in self.plain)

    def deliver(self, message: Message) -> Message | None:
        """Hand a message to the subscription; returns it if it waits for room."""
        if message.qos > self.qos:
            message = _copy(message, qos=self.qos)
        manual = self.manual_ack and message.qos == 1
        if manual:
            message = _copy(message)  # one ack() per subscription that must give one
            message.wait_for_ack(self.client._acked)
        placed = self.subscription.offer(message)
        # None: the subscriber stopped reading, it is leaving its subscribe() block
        if placed is not None:
            self.client.messages_received += 1
            if manual:
                self.client.held_acks += 1
        return message if placed is False else None


def _copy(message: Message, *, qos: int | None = None, retain: bool | None = None) -> Message:
    p = message.packet
    q = int(p.qos) if qos is None else qos
    return Message(
        mqtt5.PublishPacket(
            p.topic,
            p.payload,
            qos=QOS_LEVELS[q],
            retain=p.retain if retain is None else retain,
            packet_id=(p.packet_id or 1) if q else None,
            payload_format_indicator=p.payload_format_indicator,
            message_expiry_interval=p.message_expiry_interval,
            content_type=p.content_type,
            response_topic=p.response_topic,
            correlation_data=p.correlation_data,
            user_properties=list(p.user_properties),
        )
    )


class MemoryBus:
    """An in-process MQTT-like broker for unit tests (no sockets, threads or real time).

    * Topic filters with ``+`` and ``#`` (``$``-topics are not matched by a leading
      wildcard), and shared subscriptions ``$share/{group}/{filter}``: each message
      goes to one member of the group, round robin in subscription order.
    * Every message is routed synchronously inside ``publish()``, so all
      subscriptions see all messages in one global order (the order of the publish
      calls). A message is delivered once to each matching subscription (also
      several subscriptions of one client), at ``min(publish QoS, subscription QoS)``
      with its retain flag as published. QoS makes no other difference: nothing is
      lost, duplicated or acknowledged late.
    * Retained messages: the last non-empty retained payload per topic is kept and
      delivered (``retain=True``) when a matching subscription is made
      (``retain_handling`` 0 or 1; 2: never; shared subscriptions never get them);
      an empty retained payload clears the topic. Message expiry is not applied.
    * Wills: published when a client is killed (:meth:`MemoryClient.kill`),
      disconnects with reason ``0x04``, or is taken over by a new client with the same
      id; not on a graceful ``aclose()``. The will delay is not applied.
    * Subscriptions buffer ``default_buffer`` messages (unbounded by default; the
      ``buffer=`` of ``subscribe()`` overrides it). Nothing is dropped: a message that
      does not fit waits on the bus, in order, until the subscriber takes one, and
      ``publish()`` waits until its message is in every buffer it goes to (the
      backpressure the real client applies: a full subscription stops its reader,
      and the broker's queue, then the publisher, wait). ``publish_nowait()``, wills
      and retained messages cannot wait: theirs simply wait on the bus. Routing stays
      synchronous, so the order of the publish calls is still every subscription's.

    ``history`` records every routed message with its trio time and sender, for
    assertions (``record=False`` turns that off).
    """

    def __init__(self, *, record: bool = True, default_buffer: float = math.inf) -> None:
        self.record = record
        self.default_buffer = default_buffer
        self.history: list[BusRecord] = []
        self.messages_routed = 0
        #: wakes publishers whose messages waited for room in a subscription
        self._room = trio.lowlevel.ParkingLot()
        self._retained: dict[str, Message] = {}
        self._entries: list[_Entry] = []
        self._round_robin: dict[tuple[str, str], int] = {}
        self._clients: dict[str, MemoryClient] = {}
        self._anonymous = itertools.count(1)
        self._new_record = trio.lowlevel.ParkingLot()
        #: called synchronously with every message right after it was delivered; a
        #: listener may publish (``publish_nowait``) to act "between" two messages
        self.listeners: list[Callable[[BusRecord], None]] = []

    # ------------------------------------------------------------- clients
    def open(self, client_id: str = "", will: Will | None = None) -> MemoryClient:
        """A connected client; close it with ``aclose()`` (or crash it with ``kill()``).

        An empty ``client_id`` gets a generated one. A client id already connected
        is taken over: the old client is closed and its will published.
        """
        if not client_id:
            client_id = f"memory-{next(self._anonymous)}"
        old = self._clients.get(client_id)
        if old is not None:
            old._lose("session taken over", publish_will=True)
        client = MemoryClient(self, client_id, will)
        self._clients[client_id] = client
        return client

    @contextlib.asynccontextmanager
    async def connect(
        self, client_id: str = "", will: Will | None = None
    ) -> AsyncIterator[MemoryClient]:
        """``async with bus.connect(id, will=...) as client``: closed gracefully on exit."""
        client = self.open(client_id, will=will)
        await trio.lowlevel.checkpoint()
        try:
            yield client
        finally:
            await client.aclose()

    @property
    def clients(self) -> dict[str, MemoryClient]:
        """The connected clients, by client id."""
        return dict(self._clients)

    @property
    def retained(self) -> dict[str, Message]:
        """The retained messages, by topic."""
        return dict(self._retained)

    # ------------------------------------------------------------ queries
    def records(self, topic_filter: str = "#") -> list[BusRecord]:
        """The recorded messages whose topic matches ``topic_filter``, in routing order."""
        return [r for r in self.history if topic_matches(topic_filter, r.topic)]

    def subscribers(self, topic: str) -> list[str]:
        """Ids of the clients with a subscription matching ``topic`` (shared ones too)."""
        out: list[str] = []
        for entry in self._entries:
            hit = entry.matches_plain(topic) or any(
                topic_matches(f, topic) for _, f in entry.shared
            )
            if hit and entry.client.client_id not in out:
                out.append(entry.client.client_id)
        return out

    async def wait_for(
        self,
        topic_filter: str = "#",
        predicate: Callable[[BusRecord], bool] | None = None,
        *,
        start: int = 0,
    ) -> BusRecord:
        """The first recorded message from ``history[start:]`` that matches; waits if none.

        Needs ``record=True``. Waiting takes no real time: under an autojump clock
        the clock runs on to the next deadline until the message is published.
        """
        if not self.record:
            raise RuntimeError("wait_for needs a bus created with record=True")
        index = start
        while True:
            while index < len(self.history):
                record = self.history[index]
                index += 1
                if topic_matches(topic_filter, record.topic) and (
                    predicate is None or predicate(record)
                ):
                    await trio.lowlevel.checkpoint()
                    return record
            await self._new_record.park()

    # ------------------------------------------------------------- routing
    def _add(self, entry: _Entry) -> None:
        self._entries.append(entry)
        if entry.retain_handling == 2 or not entry.plain:
            return
        for topic, message in list(self._retained.items()):
            if entry.matches_plain(topic):
                entry.deliver(message)

    def _remove(self, entry: _Entry) -> None:
        with contextlib.suppress(ValueError):
            self._entries.remove(entry)

    def _route(
        self, sender: MemoryClient, packet: mqtt5.PublishPacket, *, will: bool
    ) -> list[tuple[_BusSubscription, Message | None]]:
        """Deliver to every matching subscription; returns one (subscription, message)
        per match, the message where it waits for room, else None."""
        message = Message(packet)
        topic = packet.topic
        self.messages_routed += 1
        record = BusRecord(trio.current_time(), sender.client_id, message, will)
        if self.record:
            self.history.append(record)
            self._new_record.unpark_all()
        if packet.retain:
            if packet.payload:
                self._retained[topic] = message
            else:
                self._retained.pop(topic, None)
        targets: list[_Entry] = []
        groups: dict[tuple[str, str], list[_Entry]] = {}
        for entry in self._entries:
            if entry.matches_plain(topic) and not (entry.no_local and entry.client is sender):
                targets.append(entry)
            for key in entry.shared:
                if topic_matches(key[1], topic):
                    members = groups.setdefault(key, [])
                    if entry not in members:
                        members.append(entry)
        for key, members in groups.items():
            turn = self._round_robin.get(key, 0)
            self._round_robin[key] = turn + 1
            chosen = members[turn % len(members)]
            if chosen not in targets:
                targets.append(chosen)
        placed = [(entry.subscription, entry.deliver(message)) for entry in targets]
        for listener in list(self.listeners):
            listener(record)
        return placed


class MemoryClient:
    """A client of :class:`MemoryBus` with the :class:`~sheri_trio.mqtt.Client` interface.

    Connected from creation until ``aclose()``/``disconnect()`` (graceful: no will) or
    :meth:`kill` (a crash: the will is published). Once closed, ``publish()``,
    ``subscribe()`` and ``wait_connected()`` raise :class:`~sheri_trio.mqtt.ClientClosed`
    and every open subscription ends (its iteration stops after the messages already
    buffered, as the real client's do when it stops for good).
    """

    def __init__(self, bus: MemoryBus, client_id: str, will: Will | None = None) -> None:
        self.bus = bus
        self.will = will
        self._client_id = client_id
        self._entries: list[_Entry] = []
        self._closed = False
        self._killed = False
        self._packet_ids: Iterator[int] = itertools.cycle(range(1, 65536))
        self.close_reason: str | None = None
        self.messages_sent = 0
        self.messages_received = 0
        #: manual_ack messages delivered and not yet ack()ed / ack()ed
        self.held_acks = 0
        self.messages_acked = 0

    # ------------------------------------------------------------- status
    @property
    def connected(self) -> bool:
        return not self._closed

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def killed(self) -> bool:
        """True once the client was lost without a graceful close (its will went out)."""
        return self._killed

    def statistics(self) -> dict[str, Any]:
        return {
            "backend": "memory",
            "client_id": self._client_id,
            "connected": self.connected,
            "messages_sent": self.messages_sent,
            "messages_received": self.messages_received,
            "messages_dropped": 0,  # the bus drops nothing (as the real client)
            "messages_waiting": sum(len(e.subscription.waiting) for e in self._entries),
            "held_acks": self.held_acks,
            "messages_acked": self.messages_acked,
            "subscriptions": len(self._entries),
            "killed": self._killed,
            "last_error": self.close_reason,
        }

    async def wait_connected(self) -> None:
        """Return at once while connected; raise ClientClosed once closed."""
        self._check_open()
        await trio.lowlevel.checkpoint()

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed(f"client {self._client_id!r} is closed ({self.close_reason})")

    # ------------------------------------------------------------ publish
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
        """Route the message at once; wait while a subscription it goes to is full.

        Returns (QoS 1 with ``wait_ack``, then yielding once: the "PUBACK"), as a broker's
        PUBACK would, 0x10 (no matching subscribers) when no subscription got the
        message and 0 otherwise; None for QoS 0 and ``wait_ack=False``. Whatever the
        QoS, this returns only once the message is in the buffer of every subscription
        it goes to (backpressure, see :class:`MemoryBus`); cancelled meanwhile, the
        message still reaches them. Raises ClientClosed if this client is closed
        while it waits.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        placed = self._publish(
            topic,
            payload,
            qos=qos,
            retain=retain,
            message_expiry_interval=message_expiry_interval,
            content_type=content_type,
            response_topic=response_topic,
            correlation_data=correlation_data,
            user_properties=user_properties,
        )
        while any(m is not None and sub.holds(m) for sub, m in placed):
            await self.bus._room.park()
            self._check_open()
        if qos and wait_ack:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return 0 if placed else _NO_MATCHING_SUBSCRIBERS
        return None

    def publish_nowait(
        self,
        topic: str,
        payload: bytes | str = b"",
        *,
        qos: int = 0,
        retain: bool = False,
        message_expiry_interval: int | None = None,
        content_type: str | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: Sequence[tuple[str, str]] | None = None,
    ) -> int:
        """Publish synchronously (test-only; not part of the Client interface).

        Subscribers have the message when this returns, before any other task runs:
        e.g. from a bus listener, to land a message right behind another one. It never
        waits: for a full subscription the message waits on the bus, behind the ones
        already waiting (none is dropped). Returns how many subscriptions matched it.
        """
        return len(
            self._publish(
                topic,
                payload,
                qos=qos,
                retain=retain,
                message_expiry_interval=message_expiry_interval,
                content_type=content_type,
                response_topic=response_topic,
                correlation_data=correlation_data,
                user_properties=user_properties,
            )
        )

    def _publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int,
        retain: bool,
        message_expiry_interval: int | None,
        content_type: str | None,
        response_topic: str | None,
        correlation_data: bytes | None,
        user_properties: Sequence[tuple[str, str]] | None,
    ) -> list[tuple[_BusSubscription, Message | None]]:
        self._check_open()
        check_publish(topic, qos)
        if isinstance(payload, str):
            payload = payload.encode()
        packet = mqtt5.PublishPacket(
            topic,
            payload,
            qos=QOS_LEVELS[qos],
            retain=retain,
            packet_id=next(self._packet_ids) if qos else None,
            message_expiry_interval=message_expiry_interval,
            content_type=content_type,
            response_topic=response_topic,
            correlation_data=correlation_data,
            user_properties=list(user_properties) if user_properties else None,
        )
        self.messages_sent += 1
        return self.bus._route(self, packet, will=False)

    # ---------------------------------------------------------- subscribe
    @contextlib.asynccontextmanager
    async def subscribe(
        self,
        *filters: str,
        qos: int = 1,
        no_local: bool = False,
        retain_handling: int = 0,
        buffer: int | None = None,
        manual_ack: bool | None = None,
    ) -> AsyncIterator[Subscription]:
        """Subscribe; matching retained messages are delivered first. Leaving unsubscribes.

        ``manual_ack=True``: QoS 1 messages carry an ``ack()`` that the client counts
        (``held_acks``, ``messages_acked``); the bus never redelivers, acked or not.
        """
        self._check_open()
        check_subscription(filters, qos, retain_handling)
        await trio.lowlevel.checkpoint()  # the SUBSCRIBE / SUBACK round trip
        self._check_open()
        size = self.bus.default_buffer if buffer is None else buffer
        send, receive = trio.open_memory_channel[Message](size)
        sub = _BusSubscription(
            tuple(filters), send, receive, manual_ack=bool(manual_ack), room=self.bus._room
        )
        sub.reason_codes = [qos] * len(filters)
        entry = _Entry(
            self,
            sub,
            qos=qos,
            no_local=no_local,
            retain_handling=retain_handling,
            manual_ack=bool(manual_ack),
        )
        self._entries.append(entry)
        self.bus._add(entry)
        try:
            async with send, receive:
                yield sub
        finally:
            self._drop(entry)

    def _acked(self, message: Message) -> None:
        self.held_acks -= 1
        self.messages_acked += 1

    def _drop(self, entry: _Entry) -> None:
        entry.subscription.discard_waiting()
        self.bus._remove(entry)
        with contextlib.suppress(ValueError):
            self._entries.remove(entry)

    # -------------------------------------------------------------- close
    async def aclose(self) -> None:
        """Close gracefully (the will is discarded). Idempotent."""
        await self.disconnect(0)

    async def disconnect(
        self, reason_code: int = 0, *, session_expiry_interval: int | None = None
    ) -> None:
        """Close; reason ``0x04`` ("disconnect with will message") publishes the will."""
        if not self._closed:
            reason = "disconnected" if reason_code == 0 else f"disconnected (0x{reason_code:02X})"
            self._lose(reason, publish_will=reason_code == 0x04)
            self._killed = False
        await trio.lowlevel.cancel_shielded_checkpoint()

    def kill(self) -> None:
        """Simulate a crash (or a lost connection): subscriptions end, the will goes out.

        Synchronous, so a test can kill a client and cancel its owner in one step,
        before the owner runs again.
        """
        self._lose("killed", publish_will=True)

    def _lose(self, reason: str, *, publish_will: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._killed = True
        self.close_reason = reason
        for entry in list(self._entries):
            self._drop(entry)
            entry.subscription.close()
        if self.bus._clients.get(self._client_id) is self:
            del self.bus._clients[self._client_id]
        self.bus._room.unpark_all()  # our publishes waiting for room: ClientClosed
        will = self.will
        if publish_will and will is not None:
            packet = mqtt5.PublishPacket(
                will.topic,
                will.payload,
                qos=QOS_LEVELS[will.qos],
                retain=will.retain,
                packet_id=next(self._packet_ids) if will.qos else None,
                message_expiry_interval=will.message_expiry_interval,
                content_type=will.content_type,
                user_properties=list(will.user_properties) or None,
            )
            self.bus._route(self, packet, will=True)

    def __repr__(self) -> str:
        state = "connected" if self.connected else f"closed: {self.close_reason}"
        return f"<MemoryClient {self._client_id!r} {state}>"


if TYPE_CHECKING:

    def _memory_client_is_a_client(client: MemoryClient) -> Client:
        return client  # mypy checks MemoryClient against the Client protocol
