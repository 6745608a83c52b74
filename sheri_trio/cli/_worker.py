"""One agent process of ``sheri swarm --processes N``: ``python -m sheri_trio.cli._worker``.

The parent (:func:`sheri_trio.cli._agents.run_agents`) writes this process's share of the
swarm on its stdin, pickled (the configurations carry the broker's credentials: never on
the command line), and keeps the pipe open: end-of-file on it means the parent is gone
(even killed), and the agents leave gracefully. SIGTERM asks them to leave gracefully (a
second: at once), as a signal does for ``sheri swarm`` itself. It runs in a session of its own, so a
Ctrl+C at the terminal reaches the parent only, which passes it on once. The exit code
and the one-line error are those of ``sheri swarm``.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys

import trio

from ..config import Connection
from ._agents import run_agents
from ._errors import print_error
from ._output import keeping_secrets, remember_password, remember_secrets, setup_logging

__all__: list[str] = []  # an entry point (python -m), not an API


def main() -> None:
    log_level = sys.argv[1] if len(sys.argv) > 1 else "info"
    agents = pickle.loads(_read_share())
    with keeping_secrets() as secrets:
        for config, _ in agents:
            remember_secrets(Connection(config.broker, config.swarm, config.client_options))
            remember_password(config.store.password)
        setup_logging(log_level, "swarm", label_first=True)
        try:
            code = trio.run(functools.partial(run_agents, agents, lifeline=_parent_gone))
        except BaseException as exc:
            error_code = print_error(exc, secrets)
            if error_code is None:
                raise
            code = error_code
    raise SystemExit(code)


def _read_share() -> bytes:
    """Our share of the swarm: its length (8 bytes), then that many bytes. Read exactly
    that: the pipe stays open after it (see :func:`_parent_gone`)."""
    fd = sys.stdin.fileno()

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise SystemExit(
                    "sheri_trio.cli._worker: stdin ended before the share of the swarm"
                )
            data += chunk
        return data

    return exactly(int.from_bytes(exactly(8), "big"))


async def _parent_gone() -> None:
    """Return once stdin ends: the parent closed it, or died (the kernel closed it)."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))  # FdStream closes its fd
    async with stdin:
        while True:
            try:
                if not await stdin.receive_some():
                    return
            except trio.BrokenResourceError:
                return


if __name__ == "__main__":
    main()
