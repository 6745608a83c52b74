"""What the private server launchers share (:class:`~sheri_trio._mosquitto.MosquittoBroker`,
:class:`~sheri_trio._redis.RedisServer`).

:class:`Launcher` runs one server program as a subprocess with a work directory of its
own: free ports picked at the first start (and kept by :meth:`Launcher.restart`), a
generated configuration file, an optional ``trustme`` CA with a server certificate for
``localhost`` and ``127.0.0.1``, a wait until the server is ready (or its exit, with the
tail of its log), stop / kill / restart and the context manager (:class:`StartStop`, which
:class:`~sheri_trio._mosquitto.BridgedBrokers` uses too). A subclass says which
program, which ports, what configuration and what "ready" means.
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, ClassVar, Final, Generic, Self, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    import trustme

__all__ = [
    "HOST",
    "TLS_HOST",
    "ExitedEarly",
    "Launcher",
    "StartStop",
    "find_executable",
    "free_ports",
]

HOST: Final = "127.0.0.1"
"""The address every launched server listens on."""
TLS_HOST: Final = "localhost"
"""The host name TLS clients use (the server certificate names it, and ``127.0.0.1``)."""

_START_TIMEOUT: Final = 10.0
_POLL_INTERVAL: Final = 0.02
_STOP_TIMEOUT: Final = 5.0
_START_ATTEMPTS: Final = 3
_SEARCH_PATH: Final = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")

P = TypeVar("P")
"""What a launcher's ports are (one port, or a record of several)."""


def find_executable(name: str, package: str) -> str:
    """The path of program *name* (``PATH``, then the sbin/bin directories), else
    :class:`RuntimeError` naming the Debian *package* that has it."""
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in _SEARCH_PATH:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError(f"{name} not found (install the Debian {package!r} package)")


def free_ports(count: int, host: str = "0.0.0.0") -> list[int]:
    """*count* distinct ports that are free on *host* now.

    Another process may still take one before the server binds it; :meth:`Launcher.start`
    retries then.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ExitedEarly(RuntimeError):
    """The server exited during start-up (often: a port was taken)."""


class StartStop(abc.ABC):
    """A ``with`` block around :meth:`start` and :meth:`stop`."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

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


class Launcher(StartStop, Generic[P]):
    """A private server process in *workdir*: ``<name>.conf`` (its configuration),
    ``<name>.log`` (its log), ``<name>.stderr.log`` (its output) and, with *tls*,
    ``ca.pem``, ``server.pem`` and ``server.key``.

    Subclasses set :attr:`program` and :attr:`package` and implement the hooks
    :meth:`_pick_ports`, :meth:`_config_text`, :meth:`_argv` and :meth:`_readiness`.
    """

    program: ClassVar[str]
    """The executable, also the name in messages (``mosquitto``)."""
    package: ClassVar[str]
    """The Debian package that has it."""

    host: Final[str]
    tls_host: Final[str]
    workdir: Final[Path]
    config_path: Final[Path]
    log_path: Final[Path]
    stderr_path: Final[Path]
    ca_path: Final[Path]
    cert_path: Final[Path]
    key_path: Final[Path]

    def __init__(self, workdir: Path, *, name: str, tls: bool) -> None:
        self.workdir = Path(workdir).resolve()
        self.tls = tls
        self.host = HOST
        self.tls_host = TLS_HOST
        self.config_path = self.workdir / f"{name}.conf"
        self.log_path = self.workdir / f"{name}.log"
        self.stderr_path = self.workdir / f"{name}.stderr.log"
        self.ca_path = self.workdir / "ca.pem"
        self.cert_path = self.workdir / "server.pem"
        self.key_path = self.workdir / "server.key"
        self._ca: trustme.CA | None = None
        if tls:
            import trustme

            self._ca = trustme.CA()
        self._ports: P | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._prepared = False

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the server; return once it is ready.

        The first start picks free ports; later starts (see :meth:`restart`) reuse them.
        Raises :class:`RuntimeError`, with the tail of the server's log, if the server
        exits or is not ready within 10 s.
        """
        if self.running:
            raise RuntimeError(f"{self.program} is already running")
        if not self._prepared:
            self._prepare()
            self._prepared = True
        if self._ports is not None:
            self._launch(self._ports)
            return
        for attempt in range(1, _START_ATTEMPTS + 1):
            ports = self._pick_ports()
            try:
                self._launch(ports)
            except ExitedEarly as exc:
                # A port may have been taken between picking and binding.
                if attempt == _START_ATTEMPTS or not self._port_taken(exc):
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
            if self._stderr is not None:
                with contextlib.suppress(OSError):
                    self._stderr.close()
                self._stderr = None

    def kill(self) -> None:
        """Stop abruptly with SIGKILL (nothing saved: a crash)."""
        self.stop(signal.SIGKILL)

    def restart(self, *, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop with *sig* and start again on the same ports."""
        self.stop(sig)
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- TLS -------------------------------------------------------------

    @property
    def ca(self) -> trustme.CA:
        """The ``trustme`` CA that signed the server certificate."""
        if self._ca is None:
            raise RuntimeError("TLS is disabled (tls=False)")
        return self._ca

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client-side SSL context that trusts :attr:`ca`."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(ctx)
        return ctx

    # -- hooks -------------------------------------------------------------

    def _pick_ports(self) -> P:
        """Free ports for a first start."""
        raise NotImplementedError

    def _config_text(self, ports: P) -> str:
        """The configuration file for a start on *ports*."""
        raise NotImplementedError

    def _argv(self) -> list[str]:
        """The command line that runs the server on :attr:`config_path`."""
        raise NotImplementedError

    def _readiness(self, ports: P) -> Callable[[], str | None]:
        """Called before the server starts; the check it returns is polled until it
        returns None (ready), else says what is not ready yet (or "")."""
        raise NotImplementedError

    def _port_taken(self, exc: ExitedEarly) -> bool:
        """Whether an exit during start-up may be a port taken (then another is tried)."""
        return True

    def _prepare(self) -> None:
        """Write the files that stay the same for the server's whole life."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._ca is not None:
            self._ca.cert_pem.write_to_path(str(self.ca_path))
            server = self._ca.issue_cert(TLS_HOST, HOST)
            server.private_key_pem.write_to_path(str(self.key_path))
            self.cert_path.unlink(missing_ok=True)
            for blob in server.cert_chain_pems:
                blob.write_to_path(str(self.cert_path), append=True)

    # -- internals ---------------------------------------------------------

    def _require_ports(self) -> P:
        if self._ports is None:
            raise RuntimeError(f"{self.program} has not been started yet")
        return self._ports

    def _launch(self, ports: P) -> None:
        # the configuration may hold a password: readable by us alone
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as config:
            config.write(self._config_text(ports))
        ready = self._readiness(ports)
        self._stderr = self.stderr_path.open("ab")
        self._proc = subprocess.Popen(
            self._argv(),
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        try:
            self._wait_ready(ready)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def _wait_ready(self, ready: Callable[[], str | None]) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ExitedEarly(self._failure(f"{self.program} exited with status {code}"))
            missing = ready()
            if missing is None:
                return
            if time.monotonic() >= deadline:
                detail = f" ({missing})" if missing else ""
                raise RuntimeError(
                    self._failure(f"{self.program} not ready after {_START_TIMEOUT:.0f} s{detail}")
                )
            time.sleep(_POLL_INTERVAL)

    def _failure(self, message: str) -> str:
        return (
            f"{message}\nconfig: {self.config_path}\n"
            f"--- {self.log_path} (tail) ---\n{_tail(self.log_path)}\n"
            f"--- {self.stderr_path} (tail) ---\n{_tail(self.stderr_path)}"
        )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} workdir={str(self.workdir)!r} ports={self._ports} "
            f"running={self.running}>"
        )
