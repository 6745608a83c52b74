"""Tests of sheri_trio.testing.MosquittoBroker against the real mosquitto binary."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import uuid
from typing import TYPE_CHECKING

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import sheri_trio._mosquitto as testing_mod
from sheri_trio.testing import MosquittoBroker

if TYPE_CHECKING:
    from pathlib import Path

    from paho.mqtt.reasoncodes import ReasonCode

TIMEOUT = 10.0


def _topic() -> str:
    return f"test/broker/{uuid.uuid4().hex}"


def _tcp_args(broker: MosquittoBroker, *, password: str | None = None) -> list[str]:
    return [
        "-V", "5",
        "-h", broker.host,
        "-p", str(broker.tcp_port),
        "-u", broker.username,
        "-P", broker.password if password is None else password,
    ]  # fmt: skip


def _tls_args(broker: MosquittoBroker) -> list[str]:
    return [
        "-V", "5",
        "-h", broker.tls_host,
        "-p", str(broker.tls_port),
        "--cafile", str(broker.ca_path),
        "-u", broker.username,
        "-P", broker.password,
    ]  # fmt: skip


def _pub(args: list[str], *extra: str) -> None:
    subprocess.run(
        ["mosquitto_pub", *args, *extra],
        check=True,
        timeout=TIMEOUT,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )


def _round_trip(sub_args: list[str], pub_args: list[str]) -> None:
    """Subscribe for one message, publish it retained, then clear it.

    The message is retained, so it is delivered whether the subscription
    or the publication reaches the broker first: no sleep needed.
    """
    topic = _topic()
    payload = f"hello {uuid.uuid4().hex}"
    sub = subprocess.Popen(
        ["mosquitto_sub", *sub_args, "-t", topic, "-q", "1", "-C", "1", "-W", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        _pub(pub_args, "-t", topic, "-q", "1", "-r", "-m", payload)
        out, err = sub.communicate(timeout=TIMEOUT)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate()
        _pub(pub_args, "-t", topic, "-r", "-n")  # clear the retained message
    assert sub.returncode == 0, err
    assert out == payload + "\n"


def test_tcp_round_trip(broker: MosquittoBroker) -> None:
    _round_trip(_tcp_args(broker), _tcp_args(broker))


def test_tls_round_trip(broker: MosquittoBroker) -> None:
    _round_trip(_tls_args(broker), _tls_args(broker))


def test_wrong_password_refused(broker: MosquittoBroker) -> None:
    result = subprocess.run(
        ["mosquitto_sub", *_tcp_args(broker, password="wrong"), "-t", _topic(),
         "-C", "1", "-W", "5"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Not authorized" in result.stderr


def test_anonymous_refused(broker: MosquittoBroker) -> None:
    result = subprocess.run(
        ["mosquitto_sub", "-V", "5", "-h", broker.host, "-p", str(broker.tcp_port),
         "-t", _topic(), "-C", "1", "-W", "5"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode != 0


def _paho_connect_and_get_retained(
    broker: MosquittoBroker, *, tls: bool, password: str | None = None
) -> tuple[ReasonCode, bytes | None]:
    """Connect over WebSocket (path /mqtt) with paho; fetch a retained message.

    Returns the CONNACK reason code and the payload received (None if the
    connection was refused).
    """
    topic = _topic()
    payload = f"ws {uuid.uuid4().hex}".encode()
    connack: list[ReasonCode] = []
    received: list[bytes] = []

    def on_connect(
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: object,
    ) -> None:
        connack.append(reason_code)
        if not reason_code.is_failure:
            client.subscribe(topic, qos=1)

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        received.append(bytes(msg.payload))

    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"ws-test-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv5,
        transport="websockets",
    )
    client.ws_set_options(path="/mqtt")
    client.username_pw_set(broker.username, broker.password if password is None else password)
    client.on_connect = on_connect
    client.on_message = on_message
    if tls:
        client.tls_set_context(broker.client_ssl_context())
        host, port = broker.tls_host, broker.wss_port
    else:
        host, port = broker.host, broker.ws_port
    if password is None:
        _pub(_tcp_args(broker), "-t", topic, "-q", "1", "-r", "-m", payload.decode())
    try:
        client.connect(host, port)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not (connack and (connack[0].is_failure or received)):
            client.loop(timeout=0.05)
        if connack and not connack[0].is_failure:
            client.disconnect()
        # Let paho close its socket (after DISCONNECT, or the broker's close).
        while client.socket() is not None and time.monotonic() < deadline:
            client.loop(timeout=0.05)
    finally:
        if password is None:
            _pub(_tcp_args(broker), "-t", topic, "-r", "-n")
    assert connack, "no CONNACK received"
    return connack[0], (received[0] if received else None)


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_websocket_listeners(broker: MosquittoBroker, tls: bool) -> None:
    reason, payload = _paho_connect_and_get_retained(broker, tls=tls)
    assert not reason.is_failure
    assert payload is not None
    assert payload.startswith(b"ws ")


def test_websocket_wrong_password_refused(broker: MosquittoBroker) -> None:
    reason, payload = _paho_connect_and_get_retained(broker, tls=False, password="wrong")
    assert reason.is_failure
    assert payload is None


def test_urls(broker: MosquittoBroker) -> None:
    cred = f"{broker.username}:{broker.password}@"
    assert broker.tcp_url == f"mqtt://{cred}127.0.0.1:{broker.tcp_port}"
    assert broker.ws_url == f"ws://{cred}127.0.0.1:{broker.ws_port}/mqtt"
    assert broker.tls_url == f"mqtts://{cred}localhost:{broker.tls_port}"
    assert broker.wss_url == f"wss://{cred}localhost:{broker.wss_port}/mqtt"
    assert broker.url("mqtt", credentials=False) == f"mqtt://127.0.0.1:{broker.tcp_port}"
    ports = {broker.tcp_port, broker.ws_port, broker.tls_port, broker.wss_port}
    assert len(ports) == 4
    with pytest.raises(ValueError, match="unknown scheme"):
        broker.url("http")  # type: ignore[arg-type]


def test_generated_config(broker: MosquittoBroker) -> None:
    lines = broker.config_path.read_text().splitlines()
    assert "set_tcp_nodelay true" in lines
    assert "allow_anonymous false" in lines
    assert "per_listener_settings false" in lines
    assert f"password_file {broker.password_path}" in lines
    assert "persistence true" in lines
    assert f"listener {broker.wss_port} 127.0.0.1" in lines
    assert broker.ca_path.read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_restart_keeps_ports_and_queued_messages(fresh_broker: MosquittoBroker) -> None:
    b = fresh_broker
    ports = (b.tcp_port, b.ws_port, b.tls_port, b.wss_port)
    client_id = f"persistent-{uuid.uuid4().hex[:8]}"
    topic = _topic()
    session = ["-i", client_id, "-c", "-x", "3600", "-q", "1", "-t", topic]
    # Create a persistent session with a QoS 1 subscription, then leave.
    subprocess.run(
        ["mosquitto_sub", *_tcp_args(b), *session, "-E"],
        check=True, timeout=TIMEOUT, capture_output=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    # Queued for the offline session (not retained).
    _pub(_tcp_args(b), "-t", topic, "-q", "1", "-m", "queued")

    old_pid = b.pid
    b.restart()
    assert b.running
    assert b.pid != old_pid
    assert (b.tcp_port, b.ws_port, b.tls_port, b.wss_port) == ports

    result = subprocess.run(
        ["mosquitto_sub", *_tcp_args(b), *session, "-C", "1", "-W", "5"],
        capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "queued\n"
    _round_trip(_tls_args(b), _tcp_args(b))


def test_kill_stop_idempotent_and_start_again(fresh_broker: MosquittoBroker) -> None:
    b = fresh_broker
    port = b.tcp_port
    b.kill()
    assert not b.running
    assert b.pid is None
    b.stop()  # idempotent
    b.stop(signal.SIGINT)
    b.start()
    assert b.tcp_port == port
    with pytest.raises(RuntimeError, match="already running"):
        b.start()
    _round_trip(_tcp_args(b), _tcp_args(b))


def test_without_tls(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path, tls=False, persistence=False) as b:
        assert b.running
        with pytest.raises(RuntimeError, match="TLS"):
            _ = b.tls_url
        with pytest.raises(RuntimeError, match="TLS"):
            _ = b.ca
        assert "persistence false" in b.config_path.read_text().splitlines()
        _round_trip(_tcp_args(b), _tcp_args(b))
    assert not b.running


def test_bad_config_raises_with_log(tmp_path: Path) -> None:
    b = MosquittoBroker(tmp_path, extra_config="no_such_option 1")
    with pytest.raises(RuntimeError, match="no_such_option"):
        b.start()
    assert not b.running


def test_retries_when_port_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_free_ports = testing_mod.free_ports
    calls: list[list[int]] = []
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]

        def fake_free_ports(count: int) -> list[int]:
            ports = real_free_ports(count)
            if not calls:
                ports[0] = taken  # the first attempt collides
            calls.append(ports)
            return ports

        monkeypatch.setattr(testing_mod, "free_ports", fake_free_ports)
        with MosquittoBroker(tmp_path, tls=False) as b:
            assert len(calls) == 2
            assert b.tcp_port != taken
            _round_trip(_tcp_args(b), _tcp_args(b))


def test_not_started(tmp_path: Path) -> None:
    b = MosquittoBroker(tmp_path)
    with pytest.raises(RuntimeError, match="not been started"):
        _ = b.tcp_url
    b.stop()  # stopping a never-started broker is fine
