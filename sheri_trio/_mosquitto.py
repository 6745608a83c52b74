"""Run a real, private Mosquitto broker (tests, ``sheri demo``, the benchmarks).

:class:`MosquittoBroker` starts the Debian ``mosquitto`` binary (2.0.x) as a
subprocess with a generated configuration in a work directory of its own:

* four listeners on free ports: plain TCP, WebSocket, TLS over TCP and
  WebSocket over TLS (certificates from a per-broker ``trustme`` CA);
* no anonymous access: a per-broker password file with one user,
  ``sheri``, and a random password (Mosquitto 2.0.11 binds WebSocket
  listeners to *all* interfaces whatever address is configured, so every
  listener must require the per-run password);
* ``set_tcp_nodelay true`` by default (with Nagle's algorithm on, a QoS 1
  round trip through Mosquitto takes ~40 ms);
* persistence in ``<workdir>/data/``, so :meth:`MosquittoBroker.restart`
  keeps persistent sessions and queued QoS 1/2 messages, on the same ports.

Example::

    with MosquittoBroker(tmp_path) as broker:
        url = broker.tcp_url  # mqtt://sheri:<password>@127.0.0.1:<port>

:class:`BridgedBrokers` starts two of them, the second bridged to the first (as two
sites of one swarm would be): a broker pair that keeps no single order of messages.

A shipped module (not under :mod:`sheri_trio.testing`) because ``sheri demo`` uses
it; :mod:`sheri_trio.testing` re-exports it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final, Literal, Self
from urllib.parse import quote

if TYPE_CHECKING:
    from types import TracebackType

    import trustme

__all__ = ["BridgedBrokers", "MosquittoBroker", "Scheme", "bridge_config"]

Scheme = Literal["mqtt", "ws", "mqtts", "wss"]
"""URL schemes served by :class:`MosquittoBroker`."""

_HOST: Final = "127.0.0.1"
_TLS_HOST: Final = "localhost"
_WS_PATH: Final = "/mqtt"
_START_TIMEOUT: Final = 10.0
_POLL_INTERVAL: Final = 0.02
_STOP_TIMEOUT: Final = 5.0
_START_ATTEMPTS: Final = 3
_READY_MARKER: Final = " running"
_PORT_TAKEN_MARKERS: Final = ("Address already in use", "Unable to create websockets listener")


@dataclass(frozen=True, slots=True)
class _Ports:
    tcp: int
    ws: int
    tls: int | None
    wss: int | None

    def all(self) -> list[int]:
        return [p for p in (self.tcp, self.ws, self.tls, self.wss) if p is not None]


def _find_executable(name: str) -> str:
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError(f"{name} not found (install the Debian 'mosquitto' packages)")


def _free_ports(count: int) -> list[int]:
    """Return *count* distinct ports that are currently free.

    Bound on the wildcard address, because Mosquitto 2.0.11 binds WebSocket
    listeners to every interface. Another process may still take a port
    before Mosquitto binds it; :meth:`MosquittoBroker.start` retries then.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("0.0.0.0", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class MosquittoBroker:
    """A private Mosquitto broker for tests and demos.

    Everything lives in *workdir*: ``mosquitto.conf``, ``passwd``, ``ca.pem``,
    ``server.pem``/``server.key``, ``mosquitto.log`` (broker log),
    ``mosquitto.stderr.log`` (process output) and ``data/`` (persistence).

    *extra_config* is appended verbatim to the generated configuration,
    after the listeners: it may add global options or further ``listener``
    blocks (options that belong to a listener apply to the last one
    written). Options that the generated configuration already sets must
    not be repeated.
    """

    username: Final[str]
    password: Final[str]
    host: Final[str]
    tls_host: Final[str]
    workdir: Final[Path]
    config_path: Final[Path]
    password_path: Final[Path]
    log_path: Final[Path]
    stderr_path: Final[Path]
    data_dir: Final[Path]
    ca_path: Final[Path]
    cert_path: Final[Path]
    key_path: Final[Path]

    def __init__(
        self,
        workdir: Path,
        *,
        tls: bool = True,
        persistence: bool = True,
        nodelay: bool = True,
        extra_config: str = "",
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.tls = tls
        self.persistence = persistence
        self.nodelay = nodelay
        self.extra_config = extra_config

        self.username = "sheri"
        self.password = secrets.token_urlsafe(16)
        self.host = _HOST
        self.tls_host = _TLS_HOST

        self.config_path = self.workdir / "mosquitto.conf"
        self.password_path = self.workdir / "passwd"
        self.log_path = self.workdir / "mosquitto.log"
        self.stderr_path = self.workdir / "mosquitto.stderr.log"
        self.data_dir = self.workdir / "data"
        self.ca_path = self.workdir / "ca.pem"
        self.cert_path = self.workdir / "server.pem"
        self.key_path = self.workdir / "server.key"

        self._ca: trustme.CA | None = None
        if tls:
            import trustme

            self._ca = trustme.CA()
        self._ports: _Ports | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._prepared = False

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the broker; return once every listener accepts connections.

        The first start picks free ports; later starts (see :meth:`restart`)
        reuse them. Raises :class:`RuntimeError`, with the tail of the
        Mosquitto log, if the broker exits or is not ready within 10 s.
        """
        if self.running:
            raise RuntimeError("mosquitto is already running")
        self._prepare()
        if self._ports is not None:
            self._launch(self._ports)
            return
        for attempt in range(1, _START_ATTEMPTS + 1):
            ports = self._pick_ports()
            try:
                self._launch(ports)
            except _ExitedEarly as exc:
                # A port may have been taken between picking and binding.
                if attempt == _START_ATTEMPTS or not any(
                    marker in str(exc) for marker in _PORT_TAKEN_MARKERS
                ):
                    raise
                continue
            self._ports = ports
            return

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Send *sig*, wait for exit (SIGKILL after 5 s). Idempotent."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(timeout=_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            self._proc = None
            self._close_stderr()

    def kill(self) -> None:
        """Stop abruptly with SIGKILL (no persistence save: a crash)."""
        self.stop(signal.SIGKILL)

    def restart(self, *, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop with *sig* and start again on the same ports and data dir."""
        self.stop(sig)
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------

    @property
    def tcp_port(self) -> int:
        return self._require_ports().tcp

    @property
    def ws_port(self) -> int:
        return self._require_ports().ws

    @property
    def tls_port(self) -> int:
        port = self._require_ports().tls
        if port is None:
            raise RuntimeError("TLS listeners are disabled (tls=False)")
        return port

    @property
    def wss_port(self) -> int:
        port = self._require_ports().wss
        if port is None:
            raise RuntimeError("TLS listeners are disabled (tls=False)")
        return port

    def url(self, scheme: Scheme, *, credentials: bool = True) -> str:
        """URL of the listener serving *scheme*.

        ``mqtt``/``ws`` use host ``127.0.0.1``; ``mqtts``/``wss`` use
        ``localhost`` so that hostname verification against the server
        certificate works. WebSocket URLs have path ``/mqtt``.
        """
        match scheme:
            case "mqtt":
                host, port, path = self.host, self.tcp_port, ""
            case "ws":
                host, port, path = self.host, self.ws_port, _WS_PATH
            case "mqtts":
                host, port, path = self.tls_host, self.tls_port, ""
            case "wss":
                host, port, path = self.tls_host, self.wss_port, _WS_PATH
            case _:
                raise ValueError(f"unknown scheme {scheme!r}")
        userinfo = ""
        if credentials:
            userinfo = f"{quote(self.username, safe='')}:{quote(self.password, safe='')}@"
        return f"{scheme}://{userinfo}{host}:{port}{path}"

    @property
    def tcp_url(self) -> str:
        return self.url("mqtt")

    @property
    def ws_url(self) -> str:
        return self.url("ws")

    @property
    def tls_url(self) -> str:
        return self.url("mqtts")

    @property
    def wss_url(self) -> str:
        return self.url("wss")

    # -- TLS -------------------------------------------------------------

    @property
    def ca(self) -> trustme.CA:
        """The ``trustme`` CA that signed the server certificate."""
        if self._ca is None:
            raise RuntimeError("TLS listeners are disabled (tls=False)")
        return self._ca

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client-side SSL context that trusts :attr:`ca`."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(ctx)
        return ctx

    # -- internals ---------------------------------------------------------

    def _require_ports(self) -> _Ports:
        if self._ports is None:
            raise RuntimeError("broker has not been started yet")
        return self._ports

    def _pick_ports(self) -> _Ports:
        if self.tls:
            tcp, ws, tls, wss = _free_ports(4)
            return _Ports(tcp=tcp, ws=ws, tls=tls, wss=wss)
        tcp, ws = _free_ports(2)
        return _Ports(tcp=tcp, ws=ws, tls=None, wss=None)

    def _prepare(self) -> None:
        """Write the files that stay the same for the broker's whole life."""
        if self._prepared:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.persistence:
            self.data_dir.mkdir(exist_ok=True)
        self.password_path.unlink(missing_ok=True)
        subprocess.run(
            [
                _find_executable("mosquitto_passwd"),
                "-b",
                "-c",
                str(self.password_path),
                self.username,
                self.password,
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        if self._ca is not None:
            self._ca.cert_pem.write_to_path(str(self.ca_path))
            server = self._ca.issue_cert(_TLS_HOST, _HOST)
            server.private_key_pem.write_to_path(str(self.key_path))
            self.cert_path.unlink(missing_ok=True)
            for blob in server.cert_chain_pems:
                blob.write_to_path(str(self.cert_path), append=True)
        self._prepared = True

    def _config_text(self, ports: _Ports) -> str:
        # mosquitto drops root privileges to user "mosquitto" by default; it
        # could then not read our (often 0700) work directory. Naming the
        # current user keeps it as is (a no-op when not run as root).
        user = pwd.getpwuid(os.geteuid()).pw_name
        lines = [
            "# generated by sheri_trio.testing.MosquittoBroker",
            f"user {user}",
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {self.password_path}",
            f"set_tcp_nodelay {'true' if self.nodelay else 'false'}",
            "max_queued_messages 100000",
            "sys_interval 1",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.data_dir}/"]
        else:
            lines.append("persistence false")
        lines += ["", f"listener {ports.tcp} {_HOST}", "protocol mqtt"]
        lines += ["", f"listener {ports.ws} {_HOST}", "protocol websockets"]
        tls_lines = [f"certfile {self.cert_path}", f"keyfile {self.key_path}"]
        if ports.tls is not None:
            lines += ["", f"listener {ports.tls} {_HOST}", "protocol mqtt", *tls_lines]
        if ports.wss is not None:
            lines += ["", f"listener {ports.wss} {_HOST}", "protocol websockets", *tls_lines]
        text = "\n".join(lines) + "\n"
        if self.extra_config:
            text += "\n# extra_config\n" + self.extra_config.rstrip("\n") + "\n"
        return text

    def _launch(self, ports: _Ports) -> None:
        self.config_path.write_text(self._config_text(ports))
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._stderr = self.stderr_path.open("ab")
        self._proc = subprocess.Popen(
            [_find_executable("mosquitto"), "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        try:
            self._wait_ready(ports, log_offset)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def _wait_ready(self, ports: _Ports, log_offset: int) -> None:
        assert self._proc is not None
        pending = ports.all()
        logged_running = False
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            code = self._proc.poll()
            if code is not None:
                raise _ExitedEarly(self._failure(f"mosquitto exited with status {code}"))
            if not logged_running:
                logged_running = self._logged_running(log_offset)
            pending = [port for port in pending if not _accepts(port)]
            if logged_running and not pending:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    self._failure(
                        f"mosquitto not ready after {_START_TIMEOUT:.0f} s "
                        f"(ports not accepting: {pending})"
                    )
                )
            time.sleep(_POLL_INTERVAL)

    def _logged_running(self, offset: int) -> bool:
        # "mosquitto version X running" is logged once every listener is bound.
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return False
        return any(
            line.endswith(_READY_MARKER) and "mosquitto version" in line
            for line in text.splitlines()
        )

    def _failure(self, message: str) -> str:
        return (
            f"{message}\nconfig: {self.config_path}\n"
            f"--- {self.log_path} (tail) ---\n{_tail(self.log_path)}\n"
            f"--- {self.stderr_path} (tail) ---\n{_tail(self.stderr_path)}"
        )

    def _close_stderr(self) -> None:
        if self._stderr is not None:
            with contextlib.suppress(OSError):
                self._stderr.close()
            self._stderr = None

    def __repr__(self) -> str:
        ports = self._ports.all() if self._ports is not None else None
        return (
            f"<MosquittoBroker workdir={str(self.workdir)!r} ports={ports} running={self.running}>"
        )


class _ExitedEarly(RuntimeError):
    """mosquitto exited during start-up (often: a port was taken)."""


# ------------------------------------------------------------------- a bridged pair
_BRIDGE_TIMEOUT: Final = 10.0
_BRIDGE_PROBE_EVERY: Final = 0.05


def bridge_config(
    remote: MosquittoBroker, *, topic: str = "#", name: str = "sheri-bridge", qos: int = 1
) -> str:
    """The ``extra_config`` of a broker that bridges *topic* (both ways) to *remote*,
    which must be started (its port and password go into the text), as issue 11's
    reproduction sets it up: MQTT v5, a clean session, ``try_private``."""
    return "\n".join(
        [
            f"connection {name}",
            f"address {remote.host}:{remote.tcp_port}",
            f"remote_username {remote.username}",
            f"remote_password {remote.password}",
            f"remote_clientid {name}-{secrets.token_hex(4)}",
            "bridge_protocol_version mqttv50",
            "cleansession true",
            "try_private true",
            "restart_timeout 1",  # back soon after the remote restarts
            f"topic {topic} both {qos}",
        ]
    )


class BridgedBrokers:
    """Two private mosquittos, :attr:`second` bridged to :attr:`first` on *topic*.

    :meth:`start` returns once a message crosses the bridge both ways (published on one
    broker until the other delivers it, within 10 s), so a test starts on a working
    bridge. Each side is a :class:`MosquittoBroker` (``workdir/first``,
    ``workdir/second``) with its own password: clients use ``first.tcp_url`` or
    ``second.tcp_url``. *tls*, *persistence*, *nodelay* go to both.

    Example::

        with BridgedBrokers(tmp_path, topic="swarm-1/#") as pair:
            urls = [pair.first.tcp_url, pair.second.tcp_url]
    """

    def __init__(
        self,
        workdir: Path,
        *,
        topic: str = "#",
        tls: bool = True,
        persistence: bool = True,
        nodelay: bool = True,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.topic = topic
        self._options = {"tls": tls, "persistence": persistence, "nodelay": nodelay}
        self.first = MosquittoBroker(
            self.workdir / "first", tls=tls, persistence=persistence, nodelay=nodelay
        )
        self._second: MosquittoBroker | None = None

    @property
    def second(self) -> MosquittoBroker:
        if self._second is None:
            raise RuntimeError("the bridged pair has not been started yet")
        return self._second

    @property
    def brokers(self) -> tuple[MosquittoBroker, MosquittoBroker]:
        return self.first, self.second

    def start(self) -> None:
        """Start both brokers, then wait until the bridge carries messages both ways."""
        self.first.start()
        try:
            if self._second is None:
                self._second = MosquittoBroker(
                    self.workdir / "second",
                    extra_config=bridge_config(self.first, topic=self.topic),
                    tls=self._options["tls"],
                    persistence=self._options["persistence"],
                    nodelay=self._options["nodelay"],
                )
            self._second.start()
            self.wait_bridged()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop both (idempotent)."""
        try:
            if self._second is not None:
                self._second.stop()
        finally:
            self.first.stop()

    def wait_bridged(self, timeout: float = _BRIDGE_TIMEOUT) -> None:
        """Return once a message published on each broker reaches the other."""
        deadline = time.monotonic() + timeout
        for source, target in ((self.first, self.second), (self.second, self.first)):
            _cross(source, target, self._probe_topic(), deadline)

    def _probe_topic(self) -> str:
        probe = f"sheri-bridge-probe/{secrets.token_hex(4)}"
        if self.topic == "#":
            return probe
        if self.topic.endswith("/#"):
            return f"{self.topic[:-2]}/{probe}"
        return self.topic  # a topic without wildcard: the probe uses it as it is

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<BridgedBrokers {self.first!r} <-> {self._second!r} topic={self.topic!r}>"


def _client_args(broker: MosquittoBroker) -> list[str]:
    return ["-h", broker.host, "-p", str(broker.tcp_port), "-u", broker.username,
            "-P", broker.password, "-V", "mqttv5"]  # fmt: skip


def _cross(source: MosquittoBroker, target: MosquittoBroker, topic: str, deadline: float) -> None:
    """Publish on *source* until a subscriber of *target* receives it (the bridge may not
    have subscribed yet, so one publish can be lost); RuntimeError at *deadline*."""
    seconds = max(int(deadline - time.monotonic()) + 1, 1)
    sub = subprocess.Popen(
        [_find_executable("mosquitto_sub"), *_client_args(target), "-t", topic,
         "-C", "1", "-W", str(seconds), "-q", "1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        while sub.poll() is None:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"the bridge {source!r} -> {target!r} carried nothing on {topic} "
                    f"within its timeout; see {target.log_path} and {source.log_path}"
                )
            subprocess.run(
                [_find_executable("mosquitto_pub"), *_client_args(source), "-t", topic,
                 "-m", "probe", "-q", "1"],
                check=False, stdin=subprocess.DEVNULL, capture_output=True, timeout=5,
            )  # fmt: skip
            with contextlib.suppress(subprocess.TimeoutExpired):
                sub.wait(timeout=_BRIDGE_PROBE_EVERY)
        if sub.returncode != 0:
            _, err = sub.communicate()
            raise RuntimeError(
                f"the bridge {source!r} -> {target!r}: mosquitto_sub failed: "
                f"{err.decode(errors='replace').strip()}"
            )
    finally:
        if sub.poll() is None:
            sub.kill()
        sub.communicate()
