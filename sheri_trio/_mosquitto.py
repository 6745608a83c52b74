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

A shipped module (not under :mod:`sheri_trio.testing`) because ``sheri demo`` uses
it; :mod:`sheri_trio.testing` re-exports it.
"""

from __future__ import annotations

import os
import pwd
import secrets
import socket
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final, Literal
from urllib.parse import quote

from ._launcher import HOST, ExitedEarly, Launcher, find_executable, free_ports

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

__all__ = ["MosquittoBroker", "Scheme"]

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
