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
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Final, Literal
from urllib.parse import quote

from ._launcher import HOST, ExitedEarly, Launcher, StartStop, find_executable, free_ports

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["BridgedBrokers", "MosquittoBroker", "Scheme", "bridge_config"]

Scheme = Literal["mqtt", "ws", "mqtts", "wss"]
"""URL schemes served by :class:`MosquittoBroker`."""

_HOST: Final = HOST
_WS_PATH: Final = "/mqtt"
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


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class MosquittoBroker(Launcher[_Ports]):
    """A private Mosquitto broker for tests and demos.

    Everything lives in *workdir*: ``mosquitto.conf``, ``passwd``, ``ca.pem``,
    ``server.pem``/``server.key``, ``mosquitto.log`` (broker log),
    ``mosquitto.stderr.log`` (process output) and ``data/`` (persistence).

    *extra_config* is appended verbatim to the generated configuration,
    after the listeners: it may add global options or further ``listener``
    blocks (options that belong to a listener apply to the last one
    written). Options that the generated configuration already sets must
    not be repeated.

    Start, stop, kill, restart (on the same ports and data dir, keeping persistent
    sessions and queued messages) and the context manager are :class:`Launcher`'s.
    """

    program: ClassVar[str] = "mosquitto"
    package: ClassVar[str] = "mosquitto"

    username: Final[str]
    password: Final[str]
    password_path: Final[Path]
    data_dir: Final[Path]

    def __init__(
        self,
        workdir: Path,
        *,
        tls: bool = True,
        persistence: bool = True,
        nodelay: bool = True,
        extra_config: str = "",
    ) -> None:
        super().__init__(workdir, name="mosquitto", tls=tls)
        self.persistence = persistence
        self.nodelay = nodelay
        self.extra_config = extra_config

        self.username = "sheri"
        self.password = secrets.token_urlsafe(16)
        self.password_path = self.workdir / "passwd"
        self.data_dir = self.workdir / "data"

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

    # -- the launcher's hooks ---------------------------------------------

    def _pick_ports(self) -> _Ports:
        # on the wildcard address: mosquitto 2.0.11 binds WebSocket listeners to every
        # interface
        if self.tls:
            tcp, ws, tls, wss = free_ports(4)
            return _Ports(tcp=tcp, ws=ws, tls=tls, wss=wss)
        tcp, ws = free_ports(2)
        return _Ports(tcp=tcp, ws=ws, tls=None, wss=None)

    def _port_taken(self, exc: ExitedEarly) -> bool:
        return any(marker in str(exc) for marker in _PORT_TAKEN_MARKERS)

    def _prepare(self) -> None:
        super()._prepare()
        if self.persistence:
            self.data_dir.mkdir(exist_ok=True)
        self.password_path.unlink(missing_ok=True)
        subprocess.run(
            [
                find_executable("mosquitto_passwd", self.package),
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

    def _argv(self) -> list[str]:
        return [find_executable(self.program, self.package), "-c", str(self.config_path)]

    def _readiness(self, ports: _Ports) -> Callable[[], str | None]:
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        pending = ports.all()
        logged_running = False

        def ready() -> str | None:
            nonlocal pending, logged_running
            if not logged_running:
                logged_running = self._logged_running(log_offset)
            pending = [port for port in pending if not _accepts(port)]
            if logged_running and not pending:
                return None
            return f"ports not accepting: {pending}"

        return ready

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


class BridgedBrokers(StartStop):
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

    def __repr__(self) -> str:
        return f"<BridgedBrokers {self.first!r} <-> {self._second!r} topic={self.topic!r}>"


def _client_args(broker: MosquittoBroker) -> list[str]:
    return ["-h", broker.host, "-p", str(broker.tcp_port), "-u", broker.username,
            "-P", broker.password, "-V", "mqttv5"]  # fmt: skip


_CLIENTS: Final = "mosquitto-clients"  # the Debian package of mosquitto_sub / _pub


def _cross(source: MosquittoBroker, target: MosquittoBroker, topic: str, deadline: float) -> None:
    """Publish on *source* until a subscriber of *target* receives it (the bridge may not
    have subscribed yet, so one publish can be lost); RuntimeError at *deadline*."""
    seconds = max(int(deadline - time.monotonic()) + 1, 1)
    sub = subprocess.Popen(
        [find_executable("mosquitto_sub", _CLIENTS), *_client_args(target), "-t", topic,
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
                [find_executable("mosquitto_pub", _CLIENTS), *_client_args(source), "-t", topic,
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
