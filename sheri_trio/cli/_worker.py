"""One agent process of ``sheri swarm --processes N``: ``python -m sheri_trio.cli._worker``.

The parent (:func:`sheri_trio.cli._agents.run_agents`) writes this process's share of the
swarm on its stdin, pickled (the configurations carry the broker's credentials: never on
the command line), then follows it: SIGTERM asks it to leave gracefully (a second: at
once), as a signal does for ``sheri swarm`` itself. It runs in a session of its own, so a
Ctrl+C at the terminal reaches the parent only, which passes it on once. The exit code
and the one-line error are those of ``sheri swarm``.
"""

from __future__ import annotations

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
    agents = pickle.load(sys.stdin.buffer)
    with keeping_secrets() as secrets:
        for config, _ in agents:
            remember_secrets(Connection(config.broker, config.swarm, config.client_options))
            remember_password(config.store.password)
        setup_logging(log_level, "swarm", label_first=True)
        try:
            code = trio.run(run_agents, agents)
        except BaseException as exc:
            error_code = print_error(exc, secrets)
            if error_code is None:
                raise
            code = error_code
    raise SystemExit(code)


if __name__ == "__main__":
    main()
