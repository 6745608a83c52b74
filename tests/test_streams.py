"""The byte transports of :mod:`sheri_trio.mqtt._streams`: broker URLs, their redaction,
TLS options, and the streams themselves against local TCP, TLS and WebSocket listeners."""

from __future__ import annotations

import socket
import ssl
import struct
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
import trio_websocket
import trustme

from sheri_trio.mqtt import (
    BrokerURL,
    ConnectError,
    ConnectionLost,
    LocalProtocolError,
    TLSOptions,
    redact,
)
from sheri_trio.mqtt._streams import _STREAK, _TrioStream, open_stream

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path


# ------------------------------------------------------------------ BrokerURL.parse
@pytest.mark.parametrize(
    ("url", "scheme", "port", "tls", "websocket"),
    [
        ("mqtt://h", "mqtt", 1883, False, False),
        ("tcp://h", "mqtt", 1883, False, False),
        ("MQTT://h", "mqtt", 1883, False, False),
        ("mqtts://h", "mqtts", 8883, True, False),
        ("ssl://h", "mqtts", 8883, True, False),
        ("tls://h", "mqtts", 8883, True, False),
        ("ws://h", "ws", 80, False, True),
        ("wss://h", "wss", 443, True, True),
        ("mqtt://h:1234", "mqtt", 1234, False, False),
        ("wss://h:8443", "wss", 8443, True, True),
    ],
)
def test_schemes_aliases_and_default_ports(
    url: str, scheme: str, port: int, tls: bool, websocket: bool
) -> None:
    parsed = BrokerURL.parse(url)
    assert (parsed.scheme, parsed.host, parsed.port) == (scheme, "h", port)
    assert (parsed.tls, parsed.websocket) == (tls, websocket)
    assert (parsed.username, parsed.password) == (None, None)


def test_websocket_path_defaults_to_mqtt_and_keeps_the_query() -> None:
    assert BrokerURL.parse("ws://h").path == "/mqtt"
    assert BrokerURL.parse("wss://h:1/").path == "/"
    assert BrokerURL.parse("ws://h/custom/path?token=x").path == "/custom/path?token=x"
    assert BrokerURL.parse("mqtt://h").path == ""


def test_credentials_are_percent_decoded() -> None:
    url = BrokerURL.parse("mqtt://us%40er:p%3Ass%2Fw@broker:1883")
    assert (url.username, url.password) == ("us@er", "p:ss/w")
    assert BrokerURL.parse("mqtt://user@h").password is None
    assert BrokerURL.parse("mqtt://user:@h").password == ""


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://u:secret@h", "scheme must be mqtt, mqtts, ws or wss"),
        ("h:1883", "scheme must be"),
        ("mqtt://u:secret@:1883", "no host"),
        ("mqtt://u:secret@h:notaport", "Port could not be cast"),
        ("mqtt://u:secret@h:99999", "Port out of range"),
    ],
)
def test_bad_urls_are_refused_without_the_password(url: str, reason: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        BrokerURL.parse(url)
    assert reason in str(info.value)
    assert "secret" not in str(info.value)


# ----------------------------------------------------------- display and redact
@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mqtt://h", "mqtt://h:1883"),
        ("mqtt://user:secret@h:1", "mqtt://user:***@h:1"),
        ("mqtt://user@h:1", "mqtt://user@h:1"),
        ("mqtt://us%40er:secret@h:1", "mqtt://us%40er:***@h:1"),
        ("mqtt://[::1]:1883", "mqtt://[::1]:1883"),
        ("ws://u:s@h:80/p", "ws://u:***@h:80/p"),
        ("wss://h", "wss://h:443/mqtt"),
        ("tcp://h:2", "mqtt://h:2"),
    ],
)
def test_display_hides_the_password(url: str, shown: str) -> None:
    parsed = BrokerURL.parse(url)
    assert parsed.display() == shown
    assert str(parsed) == shown
    assert "secret" not in repr(parsed.display())


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("mqtt://user:secret@h:1", "mqtt://user:***@h:1"),
        ("mqtt://user:se@cret@h", "mqtt://user:***@h"),  # the last @ ends the userinfo
        ("mqtt://user@h", "mqtt://user@h"),
        ("mqtt://h:1", "mqtt://h:1"),
        ("not a url", "not a url"),
        ("weird://u:p@[bad", "weird://u:***@[bad"),  # unparseable, still redacted
    ],
)
def test_redact(text: str, redacted: str) -> None:
    assert redact(text) == redacted


# ------------------------------------------------------------------ TLSOptions
def test_default_tls_verifies_against_the_system_store() -> None:
    ctx = TLSOptions().build()
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.check_hostname


def test_insecure_tls_verifies_nothing() -> None:
    ctx = TLSOptions(insecure=True).build()
    assert ctx.verify_mode is ssl.CERT_NONE
    assert not ctx.check_hostname


def test_a_ready_context_is_used_as_it_is() -> None:
    mine = ssl.create_default_context()
    assert TLSOptions(context=mine, insecure=True).build() is mine


def test_ca_file_and_client_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = ca.issue_cert("client")
    cert_file = tmp_path / "client.pem"
    key_file = tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    ctx = TLSOptions(ca_file=str(ca_file), cert_file=str(cert_file), key_file=str(key_file)).build()
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert len(ctx.get_ca_certs()) == 1


# ---------------------------------------------------------- streams over local TCP
async def _listener(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def _echo(stream: trio.abc.Stream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data)


async def test_tcp_round_trip_send_nowait_and_end_of_stream() -> None:
    async with trio.open_nursery() as nursery:
        port = await _listener(nursery, _echo)
        with trio.fail_after(5):
            async with open_stream(BrokerURL.parse(f"mqtt://127.0.0.1:{port}")) as stream:
                await stream.send_all(b"hello")
                assert await stream.receive_some() == b"hello"
                # a plain socket takes a small write at once, without yielding
                assert stream.send_nowait(b"direct") == 6
                assert await stream.receive_some() == b"direct"
        nursery.cancel_scope.cancel()


async def test_the_peer_closing_is_an_empty_read() -> None:
    async def close_at_once(stream: trio.SocketStream) -> None:
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        port = await _listener(nursery, close_at_once)
        with trio.fail_after(5):
            async with open_stream(BrokerURL.parse(f"mqtt://127.0.0.1:{port}")) as stream:
                assert await stream.receive_some() == b""
        nursery.cancel_scope.cancel()


async def test_a_connection_that_never_runs_dry_does_not_starve_other_tasks() -> None:
    """A read that finds data returns without a scheduler pass, but not forever: with
    more waiting than it reads, another task still runs every few reads."""
    mine, theirs = socket.socketpair()
    with trio.socket.from_stdlib_socket(mine) as ours, theirs:
        theirs.sendall(b"x" * 100_000)  # waiting for us at once: 200 reads of 500 bytes
        stream = _TrioStream(trio.SocketStream(ours), read_size=500)
        turns = 0

        async def other() -> None:
            nonlocal turns
            while True:
                turns += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.lowlevel.checkpoint()
            turns = 0
            for _ in range(100):
                assert await stream.receive_some() == b"x" * 500
            nursery.cancel_scope.cancel()
    # a scheduler pass every _STREAK reads (4): neither never (starved) nor at every read
    assert _STREAK == 4
    assert 23 <= turns <= 26


async def test_a_quiet_connection_waits_for_data() -> None:
    sent = trio.Event()

    async def later(stream: trio.SocketStream) -> None:
        await sent.wait()
        await stream.send_all(b"late")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await _listener(nursery, later)
        with trio.fail_after(5):
            async with open_stream(BrokerURL.parse(f"mqtt://127.0.0.1:{port}")) as stream:
                got: list[bytes] = []

                async def read() -> None:
                    got.append(await stream.receive_some())

                async with trio.open_nursery() as readers:
                    readers.start_soon(read)
                    await trio.testing.wait_all_tasks_blocked()
                    assert got == []  # blocked on the socket, not spinning
                    sent.set()
                assert got == [b"late"]
        nursery.cancel_scope.cancel()


async def test_a_reset_connection_is_lost() -> None:
    async def reset(stream: trio.SocketStream) -> None:
        # SO_LINGER 0: close sends a RST instead of a FIN
        stream.socket.setsockopt(
            trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        port = await _listener(nursery, reset)
        with trio.fail_after(5):
            async with open_stream(BrokerURL.parse(f"mqtt://127.0.0.1:{port}")) as stream:
                with pytest.raises(ConnectionLost, match="connection lost: connection reset"):
                    await stream.receive_some()
        nursery.cancel_scope.cancel()


async def test_a_refused_port_is_a_connect_error() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(ConnectError) as info:
            async with open_stream(BrokerURL.parse(f"mqtt://u:secret@127.0.0.1:{port}")):
                pytest.fail("connected to a closed port")
    assert str(info.value) == f"cannot connect to mqtt://u:***@127.0.0.1:{port}: connection refused"
    assert info.value.retryable


async def test_bad_tls_settings_fail_before_connecting(tmp_path: Path) -> None:
    options = TLSOptions(ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConnectError, match="bad TLS settings") as info:
        async with open_stream(BrokerURL.parse("mqtts://127.0.0.1:1"), tls=options):
            pytest.fail("connected")
    assert not info.value.retryable


# ------------------------------------------------------------------ TLS, locally
@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


def _client_tls(ca: trustme.CA) -> TLSOptions:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return TLSOptions(context=ctx)


async def test_tls_round_trip_goes_through_send_all(ca: trustme.CA) -> None:
    server_ctx = _server_context(ca)

    async def tls_echo(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, server_ctx, server_side=True)
        try:
            await _echo(stream)
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        port = await _listener(nursery, tls_echo)
        with trio.fail_after(5):
            url = BrokerURL.parse(f"mqtts://127.0.0.1:{port}")
            async with open_stream(url, tls=_client_tls(ca)) as stream:
                assert stream.send_nowait(b"x") == 0  # TLS: never written directly
                await stream.send_all(b"secure")
                assert await stream.receive_some() == b"secure"
        nursery.cancel_scope.cancel()


async def test_an_untrusted_certificate_is_refused_for_good(ca: trustme.CA) -> None:
    server_ctx = _server_context(ca)

    async def tls_server(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, server_ctx, server_side=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            pass
        await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        port = await _listener(nursery, tls_server)
        with trio.fail_after(5), pytest.raises(ConnectError) as info:
            # the system store does not know our throw-away CA
            async with open_stream(BrokerURL.parse(f"mqtts://127.0.0.1:{port}")):
                pytest.fail("trusted an unknown CA")
        nursery.cancel_scope.cancel()
    assert "TLS certificate verification failed" in str(info.value)
    assert not info.value.retryable


# -------------------------------------------------------------- WebSocket, locally
async def _ws_server(
    nursery: trio.Nursery,
    handler: Callable[[trio_websocket.WebSocketRequest], Awaitable[None]],
) -> int:
    server = await nursery.start(
        partial(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
    )
    return int(server.port)


async def test_websocket_path_subprotocol_and_binary_messages() -> None:
    seen: list[tuple[str, tuple[str, ...]]] = []

    async def mqtt_over_ws(request: trio_websocket.WebSocketRequest) -> None:
        seen.append((request.path, request.proposed_subprotocols))
        ws = await request.accept(subprotocol="mqtt")
        while True:
            try:
                message = await ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            await ws.send_message(message)
            if message == b"bye":
                await ws.aclose(1000)
                return

    async with trio.open_nursery() as nursery:
        port = await _ws_server(nursery, mqtt_over_ws)
        with trio.fail_after(5):
            async with open_stream(BrokerURL.parse(f"ws://127.0.0.1:{port}/broker")) as stream:
                assert stream.send_nowait(b"x") == 0  # one WebSocket message per write
                await stream.send_all(b"\x10\x00")
                assert await stream.receive_some() == b"\x10\x00"
                await stream.send_all(b"bye")
                assert await stream.receive_some() == b"bye"
                assert await stream.receive_some() == b""  # a normal close: end of stream
            async with open_stream(BrokerURL.parse(f"ws://127.0.0.1:{port}")) as stream:
                await stream.send_all(b"bye")
                assert await stream.receive_some() == b"bye"
        nursery.cancel_scope.cancel()
    assert seen == [("/broker", ("mqtt",)), ("/mqtt", ("mqtt",))]


async def test_a_server_without_the_mqtt_subprotocol_is_refused() -> None:
    async def plain(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await trio.sleep(5)
        await ws.aclose()

    async with trio.open_nursery() as nursery:
        port = await _ws_server(nursery, plain)
        with trio.fail_after(5), pytest.raises(ConnectError, match="'mqtt' WebSocket subprotocol"):
            async with open_stream(BrokerURL.parse(f"ws://127.0.0.1:{port}")):
                pytest.fail("accepted a server without the subprotocol")
        nursery.cancel_scope.cancel()


async def test_a_rejected_upgrade_names_the_http_status() -> None:
    async def reject(request: trio_websocket.WebSocketRequest) -> None:
        await request.reject(403)

    async with trio.open_nursery() as nursery:
        port = await _ws_server(nursery, reject)
        with trio.fail_after(5), pytest.raises(ConnectError) as info:
            async with open_stream(BrokerURL.parse(f"ws://127.0.0.1:{port}")):
                pytest.fail("upgraded")
        nursery.cancel_scope.cancel()
    assert "WebSocket upgrade rejected (HTTP 403)" in str(info.value)
    assert not info.value.retryable


async def test_a_text_message_is_a_lost_connection() -> None:
    async def texting(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="mqtt")
        await ws.send_message("text")
        await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        port = await _ws_server(nursery, texting)
        with trio.fail_after(5):
            async with open_stream(BrokerURL.parse(f"ws://127.0.0.1:{port}")) as stream:
                with pytest.raises(ConnectionLost, match="text WebSocket message"):
                    await stream.receive_some()
        nursery.cancel_scope.cancel()
