"""Running the commands that the configuration names, under ``trio.run_process``.

- **Clean environment**: only ``PATH``, ``HOME``, ``LANG`` from the agent's environment,
  plus the variables the configuration names (``pass_env = [...]``, ``env = {...}``) and
  those the executor sets (``SHERI_*``).
- **Timeout**: the process group gets SIGTERM, then SIGKILL after a grace period; the
  same happens when the task is cancelled.
- **Output limits**: stdout and stderr are merged; the result keeps the first and last
  bytes (``max_output_bytes``); everything goes to a log file in the agent's state dir.
- **Secrets redacted**: values of secret-looking environment variables (``*KEY*``,
  ``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*`` ...) and passwords in URLs never appear in
  output, results or error messages.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from ._base import TaskConfigError
from ._workspace import state_dir

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Mapping
    from pathlib import Path
    from typing import BinaryIO

    from ._base import TaskContext

__all__ = [
    "BASE_ENV",
    "CommandFailed",
    "CommandTimeout",
    "ProcessResult",
    "ToolMissing",
    "clean_env",
    "python_tool",
    "redact",
    "run_command",
    "secret_values",
]

BASE_ENV = ("PATH", "HOME", "LANG")
SECRET_NAME_RE = re.compile(
    r"KEY|TOKEN|SECRET|PASSW|PASSPHRASE|CREDENTIAL|AUTH|PRIVATE|SESSION|COOKIE|DSN|_URL$",
    re.IGNORECASE,
)
URL_PASSWORD_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]{0,30}://)(?P<user>[^\s:/@]{0,256}):[^\s@/]{1,1024}@"
)
DEFAULT_TIMEOUT = 600.0
DEFAULT_MAX_OUTPUT = 256 * 1024
KILL_GRACE = 5.0
MAX_LINE = 4096


class ToolMissing(TaskConfigError):
    """A tool or command that the executor needs is not installed."""


class CommandTimeout(RuntimeError):
    """The command ran longer than its timeout (retried like any failed attempt)."""


class CommandFailed(RuntimeError):
    """The command exited with an unexpected status."""

    def __init__(self, message: str, result: ProcessResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(slots=True)
class ProcessResult:
    argv: list[str]
    exit_code: int
    head: str
    tail: str
    total_bytes: int
    duration: float  # seconds
    log_path: str | None = None
    lines: int = 0
    stderr_tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return self.total_bytes > len(self.head.encode()) + len(self.tail.encode())

    @property
    def output(self) -> str:
        """Head and tail (with a marker between them when the middle was dropped)."""
        if not self.truncated:
            return self.head + self.tail
        return (
            f"{self.head}\n[... output truncated: {self.total_bytes} bytes in all ...]\n{self.tail}"
        )

    def tail_text(self, limit: int = 4000) -> str:
        text = self.output
        return text if len(text) <= limit else "[...]" + text[-limit:]


# ---------------------------------------------------------------- environment
def secret_values(environ: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> list[str]:
    """Values to redact: secret-looking variables of ``environ`` plus ``extra``."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if SECRET_NAME_RE.search(k) and len(v) >= 6}
    values.update(v for v in extra if isinstance(v, str) and len(v) >= 4)
    # longest first, so a secret containing another is replaced whole
    return sorted(values, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    for value in secrets:
        if value in text:
            text = text.replace(value, "***")
    if "://" not in text:
        return text
    return URL_PASSWORD_RE.sub(r"\g<scheme>\g<user>:***@", text)


def clean_env(
    settings: Mapping[str, Any] | None = None,
    extra: Mapping[str, str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """PATH, HOME, LANG, then ``pass_env`` names, ``env`` values, then ``extra``."""
    environ = os.environ if environ is None else environ
    settings = settings or {}
    env = {k: environ[k] for k in BASE_ENV if k in environ}
    env.setdefault("PATH", os.defpath)
    for name in settings.get("pass_env", ()) or ():
        if isinstance(name, str) and name in environ:
            env[name] = environ[name]
    for name, value in (settings.get("env") or {}).items():
        env[str(name)] = str(value)
    env.update(extra or {})
    return env


def python_tool(module: str, tool: str, *, extra: str = "tools") -> list[str]:
    """``[sys.executable, "-m", module]``, or :class:`ToolMissing` naming the tool."""
    if importlib.util.find_spec(module) is None:
        raise ToolMissing(
            f"{tool} is not installed for {sys.executable}: "
            f"install it with `pip install {tool}` (or `pip install 'sheri-trio[{extra}]'`)"
        )
    return [sys.executable, "-m", module]


def resolve_executable(argv: list[str], env: Mapping[str, str], origin: str) -> list[str]:
    """The command with its executable found on the clean PATH, or :class:`ToolMissing`."""
    if not argv:
        raise TaskConfigError(f"{origin}: empty command")
    exe = argv[0]
    if os.sep in exe:
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise ToolMissing(f"{origin}: command not found or not executable: {exe}")
        return argv
    found = shutil.which(exe, path=env.get("PATH", os.defpath))
    if found is None:
        raise ToolMissing(f"{origin}: command not found: {exe!r} (not on PATH)")
    return [found, *argv[1:]]


# ------------------------------------------------------------------ running
class _Output:
    """Bounded capture: the first and last ``limit // 2`` bytes, and every line to a log."""

    def __init__(self, limit: int, log: Any | None) -> None:
        self.half = max(limit // 2, 1024)
        self.head = bytearray()
        self.tail: deque[bytes] = deque()
        self.tail_size = 0
        self.total = 0
        self.lines = 0
        self.log = log

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.log is not None:
            self.log.write(chunk)
        room = self.half - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail.append(chunk)
            self.tail_size += len(chunk)
            while self.tail_size - len(self.tail[0]) >= self.half:
                self.tail_size -= len(self.tail.popleft())

    def texts(self) -> tuple[str, str]:
        tail = b"".join(self.tail)
        if len(tail) > self.half:
            tail = tail[-self.half :]
        return self.head.decode(errors="replace"), tail.decode(errors="replace")


def _open_log(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("wb")


async def _kill_group(process: trio.Process) -> None:
    """deliver_cancel: SIGTERM to the process group, SIGKILL after a grace period."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        process.terminate()
    with trio.move_on_after(KILL_GRACE):
        await process.wait()
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()


async def run_command(
    argv: list[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    time_limit: float | None = DEFAULT_TIMEOUT,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT,
    on_line: Callable[[str], Awaitable[None]] | None = None,
    log_path: Path | None = None,
    secrets: Iterable[str] = (),
    origin: str = "command",
    stdin: bytes | None = None,
) -> ProcessResult:
    """Run ``argv`` (no shell) and return its exit code and bounded, redacted output.

    ``on_line`` gets each output line (redacted, at most 4 KiB) as it arrives. Raises
    :class:`ToolMissing` when the executable is not there and :class:`CommandTimeout`
    after ``time_limit`` seconds (the process group is killed). The exit status is the
    caller's to judge.

    ``time_limit`` is part of the command (a failed attempt, retried), not a cancel scope
    of the caller's: a caller's cancellation (the task was cancelled) kills the process
    group the same way but propagates as ``Cancelled``, never as :class:`CommandTimeout`.
    """
    argv = resolve_executable([str(a) for a in argv], env, origin)
    secrets = list(secrets)
    log = None
    if log_path is not None:
        log = await trio.to_thread.run_sync(_open_log, log_path)
    captured = _Output(max_output_bytes, log)

    async def _line(raw: bytes) -> None:
        """One output line: redacted, logged, kept (bounded), streamed (<= 4 KiB)."""
        text = redact(raw.decode(errors="replace"), secrets)
        captured.add(text.encode() + b"\n")
        captured.lines += 1
        if on_line is not None:
            await on_line(text[:MAX_LINE])

    started = time.monotonic()
    timed_out = False
    try:
        async with trio.open_nursery() as nursery:
            try:
                process: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        argv,
                        cwd=cwd,
                        env=dict(env),
                        stdin=stdin if stdin is not None else subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        check=False,
                        start_new_session=True,
                        deliver_cancel=_kill_group,
                    )
                )
            except FileNotFoundError:
                raise ToolMissing(f"{origin}: command not found: {argv[0]}") from None
            except PermissionError:
                raise ToolMissing(f"{origin}: not executable: {argv[0]}") from None
            assert process.stdout is not None
            with trio.move_on_after(time_limit if time_limit else float("inf")) as scope:
                pending = b""
                async for chunk in process.stdout:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    if len(pending) > MAX_LINE:
                        lines.append(pending)
                        pending = b""
                    for raw in lines:
                        await _line(raw)
                if pending:
                    await _line(pending)
                await process.wait()
            if scope.cancelled_caught:
                timed_out = True
                nursery.cancel_scope.cancel()  # run_process kills the group
    finally:
        if log is not None:
            log.close()
    duration = time.monotonic() - started
    head, tail = captured.texts()
    if timed_out:
        raise CommandTimeout(
            f"{origin}: timed out after {time_limit:g} s: {redact(' '.join(argv), secrets)[:300]}"
        )
    return ProcessResult(
        argv=[redact(a, secrets) for a in argv],
        exit_code=process.returncode if process.returncode is not None else -1,
        head=redact(head, secrets),
        tail=redact(tail, secrets),
        total_bytes=captured.total,
        duration=duration,
        log_path=str(log_path) if log_path is not None else None,
        lines=captured.lines,
    )


# ------------------------------------------------------------ for executors
def _merged(ctx: TaskContext, table: Mapping[str, Any]) -> dict[str, Any]:
    """``[process]`` defaults overridden by the executor's own table."""
    base = ctx.config.get("process")
    merged: dict[str, Any] = dict(base) if isinstance(base, dict) else {}
    for key in ("timeout", "max_output_bytes", "pass_env", "env"):
        if key in table:
            if key in ("pass_env",):
                merged[key] = [*merged.get(key, []), *table[key]]
            elif key == "env":
                merged[key] = {**merged.get(key, {}), **table[key]}
            else:
                merged[key] = table[key]
    return merged


async def run_for_task(
    ctx: TaskContext,
    argv: list[str],
    *,
    table: Mapping[str, Any],
    cwd: Path,
    extra_env: Mapping[str, str] | None = None,
    on_line: Callable[[str], Awaitable[None]] | None = None,
    origin: str,
    secrets: Iterable[str] = (),
) -> ProcessResult:
    """:func:`run_command` with the task's settings: clean env, timeout, limits, log file
    ``<state_dir>/logs/<task_id>.<n>.log``, secrets of the agent's environment redacted."""
    settings = _merged(ctx, table)
    env = clean_env(settings, extra_env)
    configured_secrets = [
        str(v) for k, v in (settings.get("env") or {}).items() if SECRET_NAME_RE.search(str(k))
    ]
    time_limit = float(settings.get("timeout", DEFAULT_TIMEOUT)) or None
    logs = state_dir(ctx) / "logs"
    stem = f"{ctx.task_id}.{ctx.attempt}.{ctx.try_number}"
    n = 0
    while (logs / f"{stem}.{n}.log").exists():
        n += 1
    return await run_command(
        argv,
        cwd=cwd,
        env=env,
        time_limit=time_limit,
        max_output_bytes=int(settings.get("max_output_bytes", DEFAULT_MAX_OUTPUT)),
        on_line=on_line,
        log_path=logs / f"{stem}.{n}.log",
        secrets=secret_values(extra=[*configured_secrets, *secrets]),
        origin=origin,
    )
