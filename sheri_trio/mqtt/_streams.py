"""Byte transports for MQTT: TCP, TLS, WebSocket and secure WebSocket, chosen by URL.

Every transport is a :class:`ByteStream`: ``send_all(bytes)``, ``receive_some()``
(``b""`` at end of stream) and ``aclose()``. Transport errors are mapped to
:class:`ConnectError` (while connecting) and :class:`ConnectionLost` (after).
"""

from __future__ import annotations

import os
import ssl
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote, unquote, urlsplit

import trio

from .._exceptions import leaves as leaves_of
from ._errors import ConnectError, ConnectionLost, LocalProtocolError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from trio_websocket import WebSocketConnection

__all__ = ["BrokerURL", "ByteStream", "TLSOptions", "redact"]

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}
SCHEME_ALIASES = {"tcp": "mqtt", "ssl": "mqtts", "tls": "mqtts"}


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """A parsed broker URL: ``mqtt://``, ``mqtts://``, ``ws://`` or ``wss://``."""

    scheme: str
    host: str
    port: int
    path: str = "/mqtt"
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise LocalProtocolError(f"bad broker URL {redact(url)!r}: {exc}") from None
        scheme = SCHEME_ALIASES.get(parts.scheme.lower(), parts.scheme.lower())
        if scheme not in DEFAULT_PORTS:
            raise LocalProtocolError(
                f"bad broker URL {redact(url)!r}: scheme must be mqtt, mqtts, ws or wss"
            )
        if not parts.hostname:
            raise LocalProtocolError(f"bad broker URL {redact(url)!r}: no host")
        path = parts.path or ("/mqtt" if scheme in ("ws", "wss") else "")
        if parts.query:
            path += "?" + parts.query
        return cls(
            scheme=scheme,
            host=parts.hostname,
            port=port or DEFAULT_PORTS[scheme],
            path=path,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    @property
    def tls(self) -> bool:
        return self.scheme in ("mqtts", "wss")

    @property
    def websocket(self) -> bool:
        return self.scheme in ("ws", "wss")

    def display(self) -> str:
        """The URL with any password replaced by ``***`` (safe for logs and messages)."""
        auth = ""
        if self.username is not None:
            auth = quote(self.username, safe="") + (":***" if self.password is not None else "")
            auth += "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        path = self.path if self.websocket else ""
        return f"{self.scheme}://{auth}{host}:{self.port}{path}"

    def __str__(self) -> str:
        return self.display()


def redact(url: str) -> str:
    """Hide the password of a URL-like string, even an unparseable one."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"


@dataclass(frozen=True, slots=True)
class TLSOptions:
    """How to verify the broker and (optionally) authenticate ourselves.

    With no options the system's CA store is used. ``insecure`` skips
    verification entirely (tests against self-signed brokers only).
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    context: ssl.SSLContext | None = None
    insecure: bool = False

    def build(self) -> ssl.SSLContext:
        if self.context is not None:
            return self.context
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


class ByteStream(Protocol):
    """The small interface under the MQTT session.

    ``send_nowait`` writes what the transport takes at once without waiting or
    yielding (0 when it cannot: full socket buffer, or a transport that frames its
    writes); ``send_all`` is still needed for the rest.
    """

    async def send_all(self, data: bytes) -> None: ...

    def send_nowait(self, data: bytes) -> int: ...

    async def receive_some(self) -> bytes: ...

    async def aclose(self) -> None: ...


_READ_SIZE = 262144
_STREAK = 4  # reads in a row without a checkpoint, at most


class _TrioStream:
    """TCP or TLS: a trio Stream."""

    __slots__ = ("_fd", "_read_size", "_streak", "_stream")

    def __init__(self, stream: trio.abc.Stream, *, read_size: int = _READ_SIZE) -> None:
        self._stream = stream
        self._read_size = read_size
        self._streak = 0
        # Plain TCP on POSIX: the socket's descriptor (non-blocking, set by trio) takes
        # writes directly; TLS must go through its stream.
        self._fd = (
            stream.socket.fileno()
            if isinstance(stream, trio.SocketStream) and os.name == "posix"
            else -1
        )

    def send_nowait(self, data: bytes) -> int:
        if self._fd < 0:
            return 0
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise ConnectionLost(f"connection lost while sending: {_describe(exc)}") from exc

    async def send_all(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(f"connection lost while sending: {_describe(exc)}") from exc

    async def receive_some(self) -> bytes:
        fd = self._fd
        try:
            if fd < 0:
                return bytes(await self._stream.receive_some(self._read_size))
            # Plain TCP: the descriptor directly. trio's receive_some costs a scheduler
            # pass after every read that found data, and its wrappers more than the read
            # itself; with one small message per wake-up (a swarm's many quiet
            # connections) that was a tenth of the agents' CPU. A read that finds data
            # returns at once, so the caller handles what came before anything else
            # runs; at least every _STREAK-th read is still a checkpoint, so a connection
            # that never runs dry cannot starve the other tasks. Nothing to read: wait.
            if self._streak >= _STREAK:
                self._streak = 0
                await trio.lowlevel.checkpoint()
            while True:
                try:
                    data = os.read(fd, self._read_size)
                    break
                except BlockingIOError:
                    self._streak = 0
                    await trio.lowlevel.wait_readable(fd)
            self._streak += 1
            return data
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(f"connection lost: {_describe(exc)}") from exc

    async def aclose(self) -> None:
        pass  # open_stream closes the socket


class _WebSocketStream:
    """MQTT over WebSocket: every MQTT write is one binary message."""

    __slots__ = ("_ws",)

    def __init__(self, ws: object) -> None:
        self._ws = ws

    async def send_all(self, data: bytes) -> None:
        import trio_websocket

        try:
            await self._ws.send_message(data)  # type: ignore[attr-defined]
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError, OSError) as exc:
            raise ConnectionLost(f"websocket closed while sending: {_describe(exc)}") from exc

    def send_nowait(self, data: bytes) -> int:
        return 0  # one WebSocket message per write: always through send_all

    async def receive_some(self) -> bytes:
        import trio_websocket

        try:
            message = await self._ws.get_message()  # type: ignore[attr-defined]
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            if reason is not None and reason.code in (1000, 1001):
                return b""
            raise ConnectionLost(f"websocket closed: {_describe(exc)}") from exc
        except (trio.BrokenResourceError, OSError) as exc:
            raise ConnectionLost(f"websocket broken: {_describe(exc)}") from exc
        if isinstance(message, str):
            raise ConnectionLost("broker sent a text WebSocket message; MQTT needs binary")
        return bytes(message)

    async def aclose(self) -> None:
        pass  # open_stream closes the WebSocket and its socket


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc) or type(exc).__name__
    return text


@asynccontextmanager
async def open_stream(
    url: BrokerURL,
    *,
    tls: TLSOptions | None = None,
    ws_max_message_size: int = 4 * 1024 * 1024,
    ws_headers: list[tuple[bytes, bytes]] | None = None,
) -> AsyncIterator[ByteStream]:
    """Connect the byte transport the URL names. The caller sets the timeout.

    We own the socket in every case (trio-websocket only wraps it), so it is
    closed on every way out, cancellation included.
    """
    ssl_context: ssl.SSLContext | None = None
    if url.tls:
        try:
            ssl_context = (tls or TLSOptions()).build()
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"bad TLS settings: {exc}", retryable=False) from exc
    where = url.display()
    try:
        tcp = await trio.open_tcp_stream(url.host, url.port)
    except OSError as exc:
        raise connect_error(where, exc) from exc
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = tcp
    try:
        if ssl_context is not None:
            stream = trio.SSLStream(tcp, ssl_context, server_hostname=url.host)
            try:
                await stream.do_handshake()
            except (trio.BrokenResourceError, OSError) as exc:
                raise connect_error(where, exc) from exc
        if not url.websocket:
            yield _TrioStream(stream)
            return
        handshaken = False
        try:
            async with trio.open_nursery() as nursery:
                ws = await _websocket_handshake(
                    nursery, stream, url, ws_max_message_size, ws_headers
                )
                handshaken = True
                try:
                    yield _WebSocketStream(ws)
                finally:
                    with trio.move_on_after(1) as scope:
                        scope.shield = True
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # A failed handshake comes out of the nursery (trio-websocket's reader runs
            # there: a rejected upgrade is raised by it) as a group: one ConnectError.
            # After the handshake, the caller's errors pass as they are.
            error = None if handshaken else _handshake_error(where, group)
            if error is None:
                raise
            raise error from None
    finally:
        await trio.aclose_forcefully(stream)


async def _websocket_handshake(
    nursery: trio.Nursery,
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
    url: BrokerURL,
    max_message_size: int,
    headers: list[tuple[bytes, bytes]] | None,
) -> WebSocketConnection:
    import trio_websocket

    where = url.display()
    try:
        ws = await trio_websocket.wrap_client_stream(
            nursery,
            stream,
            _hostport(url),
            url.path,
            subprotocols=["mqtt"],
            extra_headers=headers,
            message_queue_size=64,
            max_message_size=max_message_size,
            receive_buffer_size=65536,
        )
    except (
        trio_websocket.ConnectionRejected,
        trio_websocket.HandshakeError,
        trio.BrokenResourceError,
        OSError,
    ) as exc:
        raise _handshake_error(where, exc) or connect_error(where, exc) from exc
    if ws.subprotocol != "mqtt":
        raise ConnectError(f"{where}: the server did not accept the 'mqtt' WebSocket subprotocol")
    return ws


def _handshake_error(where: str, exc: BaseException) -> ConnectError | None:
    """A failed WebSocket handshake (possibly inside a group) as one ConnectError;
    None for anything else."""
    import trio_websocket

    leaves = [e for e in leaves_of(exc) if not isinstance(e, trio.Cancelled)]
    if not leaves:
        return None
    first = leaves[0]
    if isinstance(first, ConnectError):
        return first
    if isinstance(first, trio_websocket.ConnectionRejected):
        return ConnectError(
            f"cannot connect to {where}: WebSocket upgrade rejected (HTTP {first.status_code})",
            retryable=first.status_code >= 500,
        )
    if isinstance(first, (trio_websocket.HandshakeError, trio.BrokenResourceError, OSError)):
        return connect_error(where, first)
    return None


def _hostport(url: BrokerURL) -> str:
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{host}:{url.port}"


def connect_error(where: str, exc: BaseException) -> ConnectError:
    """A transport failure while connecting, as our ConnectError (root cause named)."""
    cause: BaseException = exc
    while True:  # dig out the root cause from trio's wrappers
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        elif isinstance(cause, (trio.BrokenResourceError, OSError)) and isinstance(
            cause.__cause__, BaseException
        ):
            cause = cause.__cause__
        else:
            break
    if isinstance(cause, ssl.SSLCertVerificationError):
        return ConnectError(
            f"cannot connect to {where}: TLS certificate verification failed: "
            f"{cause.verify_message}",
            retryable=False,
        )
    if isinstance(cause, ssl.SSLError):
        return ConnectError(f"cannot connect to {where}: TLS error: {cause.reason or cause}")
    return ConnectError(f"cannot connect to {where}: {_describe(cause)}")
