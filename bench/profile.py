"""Profile one bench measurement with py-spy: ``python -m bench.profile KIND [options]``.

Runs ``python -m bench.clients KIND ...`` (same options, broker URL from ``BENCH_URL``)
under ``py-spy record`` and prints the functions with the most samples: "self" (where
the time is spent) and "total" (what it is spent under). Samples of threads waiting
in ``epoll``/``select`` and samples taken during imports are dropped unless ``--with-idle``
/ ``--with-imports`` is given.

Example::

    BENCH_URL=mqtt://user:pw@127.0.0.1:1883 python -m bench.profile native -n 200000 --qos 1
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_IDLE = re.compile(r"\b(poll|select|epoll|_poll|wait|acquire)\b")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


def aggregate(
    raw: str, *, with_idle: bool = False, with_imports: bool = False
) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    self_time: collections.Counter[str] = collections.Counter()
    total_time: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [
            _short(f)
            for f in stack.split(";")
            if f and not f.startswith("process ") and not f.startswith("thread ")
        ]
        if not frames:
            continue
        if not with_imports and any(f.startswith("_find_and_load") for f in frames):
            continue  # start-up imports, outside the measured window
        leaf = frames[-1]
        if not with_idle and _IDLE.search(leaf.split(" (")[0]):
            continue
        count = int(count_text)
        samples += count
        self_time[leaf] += count
        for f in set(frames):
            total_time[f] += count
    return samples, self_time, total_time


def render(
    samples: int,
    self_time: collections.Counter[str],
    total_time: collections.Counter[str],
    top: int,
) -> str:
    out = [f"{samples} busy samples", "", f"top {top} by self time:"]
    for name, n in self_time.most_common(top):
        out.append(f"  {100 * n / samples:5.1f}%  {name}")
    out += ["", f"top {top} by total time (inclusive):"]
    for name, n in total_time.most_common(top + 8):
        if name.startswith(("<module>", "_run_module", "run (")):
            continue
        out.append(f"  {100 * n / samples:5.1f}%  {name}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=int, default=500, help="samples per second")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--with-idle", action="store_true", help="keep threads waiting for I/O")
    p.add_argument("--with-imports", action="store_true", help="keep samples taken in imports")
    p.add_argument("--raw", type=Path, help="keep py-spy's raw (collapsed) output here")
    args, rest = p.parse_known_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("py-spy not found: pip install py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = args.raw or Path(tmp) / "raw.txt"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        cmd = [
            spy,
            "record",
            "-r",
            str(args.rate),
            "-f",
            "raw",
            "-o",
            str(raw_path),
            "--",
            sys.executable,
            "-m",
            "bench.clients",
            *rest,
        ]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        result = proc.stdout.strip().splitlines()
        print(result[-1] if result else "(no result)")
        print(
            render(
                *aggregate(
                    raw_path.read_text(), with_idle=args.with_idle, with_imports=args.with_imports
                ),
                top=args.top,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
