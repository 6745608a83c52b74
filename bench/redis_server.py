"""A private ``redis-server`` for the peers' rows: a free port on 127.0.0.1, a work
directory of its own, no persistence (``save ""``, ``appendonly no``) and a per-run
password (in its config file, not on a command line)."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.password = secrets.token_urlsafe(16)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, attempts: int = 3) -> None:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            self.port = _free_port()
            conf = self.workdir / "redis.conf"
            conf.write_text(
                "\n".join(
                    [
                        f"port {self.port}",
                        "bind 127.0.0.1",
                        "protected-mode yes",
                        f"requirepass {self.password}",
                        f"dir {self.workdir}",
                        'save ""',
                        "appendonly no",
                        "daemonize no",
                        f"logfile {self.workdir / 'redis.log'}",
                    ]
                )
                + "\n"
            )
            self._proc = subprocess.Popen(
                [exe, str(conf)], stdin=subprocess.DEVNULL, cwd=self.workdir
            )
            if self._wait_ready():
                return
            self.stop()
            if attempt == attempts - 1:
                log = self.workdir / "redis.log"
                tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                raise RuntimeError(f"redis-server did not start: {tail}")

    def _wait_ready(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        pw = self.password
        auth = f"*2\r\n$4\r\nAUTH\r\n${len(pw)}\r\n{pw}\r\n*1\r\n$4\r\nPING\r\n"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(auth.encode())
                    reply = b""
                    while b"PONG" not in reply and len(reply) < 200:
                        chunk = s.recv(200)
                        if not chunk:
                            break
                        reply += chunk
                    if b"PONG" in reply:
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
