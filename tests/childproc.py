"""Helpers for tests that run an agent or a client in a child process."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
    from pathlib import Path


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    """The first line a child process writes (the rest of that chunk is dropped)."""
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some()
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


@asynccontextmanager
async def online_process(script: str, *args: str) -> AsyncIterator[trio.Process]:
    """``python -c script args...``, once it printed ``online``; killed (SIGKILL) and
    reaped on the way out, whatever happened (a test may have killed it already)."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        assert (await read_line(proc.stdout)).strip() == b"online"
        yield proc
    finally:
        proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
            await proc.stdout.aclose()


# ------------------------------------------------------------- a command's output
class Output:
    """What a running child process writes: its stdout lines as they come (with stderr
    merged into them, or collected apart in :attr:`stderr`)."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.stderr = b""
        self.closed = False
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def pump(self) -> None:
        assert self.proc.stdout is not None
        buffer = b""
        async for chunk in self.proc.stdout:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            self.lines.extend(line.decode(errors="replace") for line in complete)
            self._notify()
        if buffer:
            self.lines.append(buffer.decode(errors="replace"))
        self.closed = True
        self._notify()

    async def pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for chunk in self.proc.stderr:
            self.stderr += chunk

    async def expect(self, pattern: str) -> re.Match[str]:
        """Wait for a line matching ``pattern`` (seen before or after the call)."""
        rx = re.compile(pattern)
        while True:
            for line in self.lines:
                if m := rx.search(line):
                    return m
            if self.closed:
                raise AssertionError(f"no line matches {pattern!r}:\n{self.text}")
            await self._changed.wait()

    async def wait_closed(self) -> None:
        """Wait for the end of the output: every writer of the pipe has exited."""
        while not self.closed:
            await self._changed.wait()

    @property
    def text(self) -> str:
        text = "\n".join(self.lines)
        if self.stderr:
            text += "\n--- stderr ---\n" + self.stderr.decode(errors="replace")
        return text


@asynccontextmanager
async def output_of(
    command: Sequence[str], *, cwd: Path, env: Mapping[str, str], merge_stderr: bool = True
) -> AsyncIterator[Output]:
    """Run *command*, reading its output while the block runs; killed (if still running)
    and reaped on the way out."""
    proc = await trio.lowlevel.open_process(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=env,
    )
    out = Output(proc)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.pump)
            if not merge_stderr:
                nursery.start_soon(out.pump_stderr)
            try:
                yield out
            finally:
                if proc.returncode is None:
                    proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    await stream.aclose()


# ------------------------------------------------------------- a broker frozen on cue
class FreezeBroker(logging.Handler):
    """SIGSTOP a broker process when a log record matches ``pattern`` (once).

    The record is handled synchronously by the code that logs it, and the broker is
    stopped for sure (its ``/proc`` state says so) before that code goes on: e.g. on the
    client's ``connected ... as 'agent-1'`` line the broker has sent CONNACK and will
    answer nothing after it. Whoever installs it must SIGCONT the broker (in a finally).
    """

    def __init__(self, pid: int, pattern: str, on_freeze: Callable[[], object] | None = None):
        super().__init__(logging.DEBUG)
        self.pid = pid
        self.pattern = re.compile(pattern)
        self.on_freeze = on_freeze
        self.frozen = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.frozen or not self.pattern.search(record.getMessage()):
            return
        self.frozen = True
        os.kill(self.pid, signal.SIGSTOP)
        wait_stopped(self.pid)
        if self.on_freeze is not None:
            self.on_freeze()


def wait_stopped(pid: int, within: float = 5.0) -> None:
    """Wait until the kernel has stopped ``pid`` (state T in ``/proc/<pid>/stat``)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        if state in ("T", "t"):
            return
        os.sched_yield()
    raise RuntimeError(f"process {pid} did not stop within {within} s")


@contextmanager
def freeze_broker_on(
    pid: int, pattern: str, on_freeze: Callable[[], object] | None = None
) -> Iterator[FreezeBroker]:
    """In this process: freeze the broker when ``sheri_trio`` logs a line matching
    ``pattern``; always SIGCONT it on the way out."""
    handler = FreezeBroker(pid, pattern, on_freeze)
    logger = logging.getLogger("sheri_trio")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # the client's "connected" and the start-up steps
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        os.kill(pid, signal.SIGCONT)


def freezing_sheri(pid: int, pattern: str) -> list[str]:
    """The ``sheri`` command line, run so that it freezes broker ``pid`` when it logs a
    line matching ``pattern`` (:func:`sheri_freezing_main` in the child)."""
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
        "import childproc; childproc.sheri_freezing_main()"
    )
    return [sys.executable, "-c", code, str(pid), pattern]


def sheri_freezing_main() -> None:
    """``python -c ... PID PATTERN ARGS...``: ``sheri ARGS...`` with a :class:`FreezeBroker`
    (which says ``froze broker PID`` on stderr when it has).

    Its handler sits on the ``sheri_trio`` logger (the CLI sets up the root's), and the
    client's logger is let through at INFO even when the CLI logs only warnings.
    """
    pid, pattern, *args = sys.argv[1:]

    def said() -> None:
        print(f"froze broker {pid}", file=sys.stderr, flush=True)

    logging.getLogger("sheri_trio").addHandler(FreezeBroker(int(pid), pattern, said))
    logging.getLogger("sheri_trio.mqtt").setLevel(logging.INFO)
    from sheri_trio.cli import main

    main(args)
