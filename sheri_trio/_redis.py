"""Run a real, private Redis server (tests of the claim stores, the benchmarks).

:class:`RedisServer` starts ``redis-server`` (Debian's package, Redis 6 or newer) as a
subprocess on a free loopback port, with a work directory of its own and **no
persistence** (``--save "" --appendonly no``): :meth:`RedisServer.restart` brings it
back on the same port *empty*, as a Redis without persistence comes back after a crash.
With ``password=True`` it requires a random password (``requirepass``); with
``tls=True`` it serves TLS only (``rediss://localhost``), with a certificate from a
per-server ``trustme`` CA (:attr:`RedisServer.ca_path`); with ``client_certs=True`` it
also requires a client certificate from that CA (:meth:`RedisServer.issue_client_cert`).

Example::

    with RedisServer(tmp_path) as server:
        url = server.url()  # redis://127.0.0.1:<port>/0 (the password is not in it)

A shipped module (beside :mod:`sheri_trio._mosquitto`); :mod:`sheri_trio.testing`
re-exports it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final, Self

if TYPE_CHECKING:
    from types import TracebackType

    import trustme

__all__ = ["RedisServer"]

_HOST: Final = "127.0.0.1"
_TLS_HOST: Final = "localhost"
_START_TIMEOUT: Final = 10.0
_STOP_TIMEOUT: Final = 5.0
_POLL_INTERVAL: Final = 0.02
_START_ATTEMPTS: Final = 3


def _find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found is not None:
        return found
    for directory in ("/usr/bin", "/usr/sbin", "/usr/local/bin"):
        candidate = Path(directory) / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError("redis-server not found (install the Debian 'redis-server' package)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int, password: str | None, context: ssl.SSLContext | None) -> bool:
    """True once the server answers PING (in RESP, without a client library)."""
    try:
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.create_connection((_HOST, port), timeout=0.5))
            if context is not None:
                sock = stack.enter_context(context.wrap_socket(sock, server_hostname=_TLS_HOST))
            if password is not None:
                sock.sendall(_command("AUTH", password))
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(_command("PING"))
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _command(*words: str) -> bytes:
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class RedisServer:
    """A private ``redis-server`` for tests: free port, own directory, nothing kept on disk.

    Everything lives in *workdir*: ``redis.log`` (the server's log) and
    ``redis.stderr.log`` (process output). :attr:`password` is None unless
    ``password=True``.
    """

    host: Final[str]
    workdir: Final[Path]
    log_path: Final[Path]
    stderr_path: Final[Path]

    def __init__(
        self,
        workdir: Path,
        *,
        password: bool = False,
        tls: bool = False,
        client_certs: bool = False,
    ) -> None:
        if client_certs and not tls:
            raise ValueError("client_certs=True needs tls=True")
        self.workdir = Path(workdir).resolve()
        self.host = _HOST
        self.tls = tls
        self.client_certs = client_certs
        self.password: str | None = secrets.token_urlsafe(16) if password else None
        self.log_path = self.workdir / "redis.log"
        self.stderr_path = self.workdir / "redis.stderr.log"
        self.ca_path = self.workdir / "ca.pem"
        self.cert_path = self.workdir / "server.pem"
        self.key_path = self.workdir / "server.key"
        self._ca: trustme.CA | None = None
        if tls:
            import trustme

            self._ca = trustme.CA()
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the server; return once it answers PING.

        The first start picks a free port; later starts (:meth:`restart`) reuse it.
        Raises :class:`RuntimeError`, with the tail of the log, if the server exits or
        is not ready within 10 s.
        """
        if self.running:
            raise RuntimeError("redis-server is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._port is not None:
            self._launch(self._port)
            return
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = _free_port()
            try:
                self._launch(port)
            except _ExitedEarly:
                # another process may have taken the port between picking and binding
                if attempt == _START_ATTEMPTS:
                    raise
                continue
            self._port = port
            return

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Send *sig*, wait for the exit (SIGKILL after 5 s). Idempotent."""
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
        """Stop abruptly with SIGKILL."""
        self.stop(signal.SIGKILL)

    def restart(self, *, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop with *sig* and start again on the same port: **empty** (no persistence)."""
        self.stop(sig)
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

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
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("redis-server has not been started yet")
        return self._port

    def url(self, db: int = 0) -> str:
        """``redis://127.0.0.1:<port>/<db>`` (``rediss://localhost:...`` with TLS), without
        the password (give it apart)."""
        if self.tls:
            return f"rediss://{_TLS_HOST}:{self.port}/{db}"
        return f"redis://{self.host}:{self.port}/{db}"

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client-side SSL context that trusts the server's CA (and, with
        ``client_certs=True``, presents a client certificate from it)."""
        if self._ca is None:
            raise RuntimeError("TLS is disabled (tls=False)")
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self._ca.configure_trust(ctx)
        if self.client_certs:
            cert, key = self.issue_client_cert("probe")
            ctx.load_cert_chain(cert, key)
        return ctx

    def issue_client_cert(self, name: str = "sheri") -> tuple[Path, Path]:
        """A client certificate from the server's CA: (cert file, key file) in workdir."""
        if self._ca is None:
            raise RuntimeError("TLS is disabled (tls=False)")
        cert = self._ca.issue_cert(f"{name}@sheri.test")
        cert_path, key_path = self.workdir / f"{name}.pem", self.workdir / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        cert.private_key_pem.write_to_path(str(key_path))
        return cert_path, key_path

    def _write_certificates(self) -> None:
        if self._ca is None or self.cert_path.exists():
            return
        cert = self._ca.issue_cert(_TLS_HOST, _HOST)
        self._ca.cert_pem.write_to_path(str(self.ca_path))
        cert.cert_chain_pems[0].write_to_path(str(self.cert_path))
        cert.private_key_pem.write_to_path(str(self.key_path))

    # -- internals ---------------------------------------------------------

    def _launch(self, port: int) -> None:
        self._write_certificates()
        listen = ["--port", str(port)]
        if self.tls:
            auth = "yes" if self.client_certs else "no"
            listen = ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", auth]
            listen += ["--tls-cert-file", str(self.cert_path), "--tls-key-file", str(self.key_path)]
            listen += ["--tls-ca-cert-file", str(self.ca_path)]
        args = [
            _find_redis_server(),
            *listen,
            "--bind",
            self.host,
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self._stderr = self.stderr_path.open("ab")
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            code = self._proc.poll()
            if code is not None:
                self.stop()
                raise _ExitedEarly(self._failure(f"redis-server exited with status {code}"))
            context = self.client_ssl_context() if self.tls else None
            if _ping(port, self.password, context):
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(
                    self._failure(f"redis-server not ready after {_START_TIMEOUT} s")
                )
            time.sleep(_POLL_INTERVAL)

    def _failure(self, message: str) -> str:
        return (
            f"{message}\n--- {self.log_path} (tail) ---\n{_tail(self.log_path)}\n"
            f"--- {self.stderr_path} (tail) ---\n{_tail(self.stderr_path)}"
        )

    def __repr__(self) -> str:
        return (
            f"<RedisServer workdir={str(self.workdir)!r} port={self._port} running={self.running}>"
        )


class _ExitedEarly(RuntimeError):
    """redis-server exited during start-up (often: the port was taken)."""
