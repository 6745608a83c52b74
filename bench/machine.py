"""Versions and machine facts recorded with every bench run (read locally, no network)."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

PACKAGES = (
    "sheri-trio",
    "trio",
    "trio-websocket",
    "trio-asyncio",
    "mqtt5",
    "paho-mqtt",
    "gmqtt",
    "aiomqtt",
    "celery",
    "kombu",
    "dramatiq",
    "arq",
    "redis",
)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["mosquitto (local binary)"] = _first_line(["mosquitto", "-h"], "/usr/sbin/mosquitto")
    out["mosquitto_pub"] = _first_line(["mosquitto_pub", "--help"], match="version")
    out["redis-server"] = _first_line(["redis-server", "--version"], "/usr/bin/redis-server")
    return out


def _first_line(
    cmd: list[str], fallback: str | None = None, match: str | None = None
) -> str | None:
    exe = shutil.which(cmd[0]) or fallback
    if exe is None or not os.path.exists(exe):
        return None
    try:
        proc = subprocess.run(
            [exe, *cmd[1:]], capture_output=True, timeout=5, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (proc.stdout or proc.stderr).decode(errors="replace").strip().splitlines()
    if match is not None:
        lines = [line for line in lines if match in line]
    return lines[0].strip() if lines else None


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": memory_gib(),
        "kernel": platform.release(),
        "os": platform.platform(terse=True),
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting for I/O)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    guest = sum(fields[8:10]) if len(fields) > 9 else 0  # already counted in user/nice
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds of this process's finished children (the measurement subprocesses)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def process_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used so far (``/proc/PID/stat``)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int | None) -> float | None:
    """CPU seconds of process ``pid`` and of its living descendants (a worker pool)."""
    if pid is None:
        return None
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        cpu = process_cpu_s(p)
        if cpu is not None:
            total += cpu
        todo += children.get(p, [])
    return total


def raise_fd_limit(need: int) -> int:
    """Raise this process's open-file limit to ``need`` (at most the hard limit) if it is
    lower; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
