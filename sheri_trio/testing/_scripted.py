"""An in-memory byte stream for the real client, and a scripted broker at its other end.

For unit tests of :class:`~sheri_trio.mqtt.MQTTClient` (integration tests use a real
mosquitto, :class:`~sheri_trio.testing.MosquittoBroker`). The client runs unchanged;
only its byte stream is replaced, through the ``stream_factory`` option::

    broker = ScriptedBroker()

    async def script() -> None:
        conn = await broker.accept()
        await conn.handshake()                      # CONNECT in, CONNACK out
        sub = await conn.expect(mqtt5.SubscribePacket)
        # ...answer, or not: the test decides every reply

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_client(broker.url, stream_factory=broker.stream_factory) as client:
            ...

Nothing here keeps protocol state: :class:`BrokerConnection` decodes what the client
sent (``mqtt5.read``, independently of the session's own framing) and sends the packets
the test gives it. No sockets, no real time: run it under ``autojump_clock``.
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import mqtt5
import trio
import trio.testing

from ..mqtt import ConnectError, ConnectionLost

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ..mqtt import BrokerURL, ByteStream

__all__ = ["BrokerConnection", "MemoryByteStream", "ScriptedBroker"]

P = TypeVar("P")


class MemoryByteStream:
    """The client's end of an in-memory stream, with the client's ``ByteStream`` interface.

    Built on :func:`trio.testing.memory_stream_pair`: what one end sends is readable at
    the other at once. Errors are mapped as the real transports map them
    (:class:`~sheri_trio.mqtt.ConnectionLost`).
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def send_all(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"connection lost while sending: {exc!r}") from exc

    def send_nowait(self, data: bytes) -> int:
        return 0  # everything goes through send_all (the writer task)

    async def receive_some(self) -> bytes:
        try:
            return bytes(await self._stream.receive_some(65536))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"connection lost: {exc!r}") from exc

    async def aclose(self) -> None:
        await self._stream.aclose()


def _frame_length(buf: bytes | bytearray) -> int | None:
    """Total length of the packet at the start of ``buf`` (None: header incomplete)."""
    value = 0
    for i in range(4):
        if 1 + i >= len(buf):
            return None
        byte = buf[1 + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return 2 + i + value
    raise AssertionError(f"the client sent a malformed remaining length: {bytes(buf)!r}")


class BrokerConnection:
    """The broker's end of one connection the client opened.

    ``receive()`` gives the next packet the client sent (None once it closed its end);
    ``send()`` writes packets to it; ``close()`` ends the connection from the broker's
    side (the client sees the connection lost). ``received`` keeps every packet.
    """

    def __init__(self, stream: trio.abc.Stream, number: int) -> None:
        self.number = number  # 1 for the first connection of the broker, 2 next...
        self.received: list[Any] = []
        self._stream = stream
        self._buf = bytearray()
        self._eof = False
        self.closed = False

    async def receive(self) -> Any:
        """The next packet from the client, decoded; None when the client closed."""
        while True:
            total = _frame_length(self._buf)
            if total is not None and len(self._buf) >= total:
                frame = bytes(self._buf[:total])
                del self._buf[:total]
                packet, used = mqtt5.read(memoryview(frame))
                assert used == total, f"codec used {used} of {total} bytes"
                self.received.append(packet)
                return packet
            if self._eof:
                assert not self._buf, f"the client left a partial packet: {bytes(self._buf)!r}"
                return None
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._eof = True
            self._buf += data

    async def expect(self, kind: type[P]) -> P:
        """The next packet, which must be a ``kind`` (AssertionError otherwise)."""
        packet = await self.receive()
        if not isinstance(packet, kind):
            raise AssertionError(f"expected {kind.__name__}, the client sent {packet!r}")
        return packet

    async def wait_closed(self) -> list[Any]:
        """Read until the client closes its end; returns the packets read meanwhile."""
        packets = []
        while (packet := await self.receive()) is not None:
            packets.append(packet)
        return packets

    async def send(self, *packets: Any) -> None:
        """Write packets (``mqtt5`` packet objects, or raw bytes) to the client."""
        data = b"".join(p if isinstance(p, bytes) else p.write() for p in packets)
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client is gone; as a broker writing to a dead socket, ignore

    async def handshake(self, **connack: Any) -> mqtt5.ConnectPacket:
        """Read CONNECT and answer CONNACK(``**connack``); returns the CONNECT."""
        connect = await self.expect(mqtt5.ConnectPacket)
        await self.send(mqtt5.ConnAckPacket(**connack))
        return connect

    async def close(self) -> None:
        """Close the connection from the broker's side."""
        self.closed = True
        await self._stream.aclose()


class ScriptedBroker:
    """Hands each connection of a client to the test as a :class:`BrokerConnection`.

    Pass :meth:`stream_factory` as the client's ``stream_factory`` option; each
    connection attempt of the client then shows up at :meth:`accept`, in order.
    :meth:`refuse` makes attempts fail (as an unreachable broker would);
    ``attempts`` keeps the trio time of every attempt, refused ones included.
    """

    url = "mqtt://scripted-broker.invalid:1883"

    def __init__(self) -> None:
        self.connections: list[BrokerConnection] = []
        self.attempts: list[float] = []
        self._refusals: float = 0
        self._refusal: Exception | None = None
        self._send, self._receive = trio.open_memory_channel[BrokerConnection](math.inf)
        self._attempted = trio.lowlevel.ParkingLot()

    async def wait_attempts(self, count: int) -> None:
        """Wait until the client has tried to connect ``count`` times in all."""
        while len(self.attempts) < count:
            await self._attempted.park()
        await trio.lowlevel.checkpoint()

    def refuse(self, times: float = math.inf, error: Exception | None = None) -> None:
        """Fail the next ``times`` connection attempts with ``error`` (a ConnectError)."""
        self._refusals = times
        self._refusal = error or ConnectError(f"cannot connect to {self.url}: refused (scripted)")

    @asynccontextmanager
    async def stream_factory(self, url: BrokerURL) -> AsyncIterator[ByteStream]:
        """The client's side of a new connection (the ``stream_factory`` option)."""
        await trio.lowlevel.checkpoint()
        self.attempts.append(trio.current_time())
        self._attempted.unpark_all()
        if self._refusals > 0 and self._refusal is not None:
            self._refusals -= 1
            raise self._refusal
        client_end, broker_end = trio.testing.memory_stream_pair()
        conn = BrokerConnection(broker_end, len(self.connections) + 1)
        self.connections.append(conn)
        self._send.send_nowait(conn)
        try:
            yield MemoryByteStream(client_end)
        finally:
            await trio.aclose_forcefully(client_end)

    async def accept(self) -> BrokerConnection:
        """The next connection the client opens (waits for it)."""
        return await self._receive.receive()
