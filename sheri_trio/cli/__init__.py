"""The ``sheri`` command line: run agents, submit tasks, look at a swarm.

Commands (``sheri COMMAND --help`` for the details)::

    sheri agent   --role R --agent-id ID --broker URL --swarm S   one agent, until Ctrl+C
    sheri swarm   [--agents N] [--roles a,b,...]                   N agents in one process
    sheri submit  TYPE [--payload JSON] [--wait]                   publish a task
    sheri tasks   [--state failed]                                 recent tasks, final states
    sheri cancel  TASK_ID [--timeout 10] [--json]                  stop or never start a task
    sheri retry   TASK_ID [--timeout 10] [--json]                  submit a failed task again
    sheri monitor                                                  live table of agents, tasks
    sheri dashboard [--port 8080] [--db PATH]                      live web page, history
    sheri demo    [--keep] [--llm] [--broker URL]                  a local swarm at work

The TypeScript prototype's spelling keeps working unchanged::

    sheri --mqtt --role deployment --agent-id deploy-agent-01 \\
          --broker mqtt://localhost:1883 --swarm opencto-dev

:func:`main` rewrites it before parsing: when ``--mqtt`` is among the arguments it is
dropped and ``agent`` is put first, so the line above is ``sheri agent --role ...``.

Settings come from the flags, then the environment (``SHERI_BROKER``, ``SHERI_SWARM``,
``SHERI_ROLE``, ``SHERI_AGENT_ID``, ``SHERI_MAX_TASKS``, ``SHERI_USERNAME``,
``SHERI_PASSWORD``), then ``sheri.toml`` (see :mod:`sheri_trio.config`).

Errors are one line on stderr, ``sheri: error: ...``. Exit codes: 0 success, 1 a
runtime failure (broker unreachable or refusing us, duplicate agent id, a task that
failed), 2 a usage or configuration error (or, for ``submit --wait``, no agent claimed
the task in time; for ``cancel`` and ``retry``, an unknown task), 130 stopped by a second
Ctrl+C. ``cancel`` and ``retry`` exit 1 for a task that had already finished (or did not
fail).

One module per command group: ``_agents`` (agent, swarm), ``_submit``, ``_tasks``,
``_control`` (cancel, retry),
``_monitor`` (and :class:`SwarmView`, its model), ``_dashboard`` (the web page of
:mod:`sheri_trio.dashboard`); ``_broker`` holds what the commands'
own clients share, ``_output`` the log format, secret scrubbing and exits, ``_errors``
:func:`explain`. ``sheri demo`` lives in :mod:`sheri_trio.demo`, imported when it runs.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from cyclopts import App

from .. import __version__
from ._agents import DEFAULT_SWARM_ROLES as DEFAULT_SWARM_ROLES
from ._agents import agent_cmd, swarm_cmd
from ._control import cancel_cmd, retry_cmd
from ._dashboard import dashboard_cmd
from ._errors import NoAnswer as NoAnswer
from ._errors import NotDelivered as NotDelivered
from ._errors import UsageError as UsageError
from ._errors import explain as explain
from ._errors import print_error
from ._monitor import AgentRow as AgentRow
from ._monitor import SwarmView as SwarmView
from ._monitor import TaskRow as TaskRow
from ._monitor import monitor_cmd
from ._output import EXIT_FAILURE as EXIT_FAILURE
from ._output import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from ._output import EXIT_OK as EXIT_OK
from ._output import EXIT_USAGE as EXIT_USAGE
from ._output import LineFormatter as LineFormatter
from ._output import LogLevel as LogLevel
from ._output import agent_label as agent_label
from ._output import exit_now as exit_now
from ._output import keeping_secrets
from ._output import remember_password as remember_password
from ._output import remember_secrets as remember_secrets
from ._output import scrub as scrub
from ._output import setup_logging as setup_logging
from ._submit import submit_cmd
from ._tasks import tasks_cmd

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cyclopts.exceptions import CycloptsError


def _format_error(error: CycloptsError) -> Any:
    from rich.text import Text

    return Text(f"sheri: error: {str(error).strip()} (see --help)")


app = App(
    name="sheri",
    help="Role-based agents cooperating over MQTT: run them, give them tasks, watch them.",
    version=__version__,
    backend="trio",
    error_formatter=_format_error,
)
app.command(agent_cmd, name="agent")
app.command(swarm_cmd, name="swarm")
app.command(submit_cmd, name="submit")
app.command(tasks_cmd, name="tasks")
app.command(cancel_cmd, name="cancel")
app.command(retry_cmd, name="retry")
app.command(monitor_cmd, name="monitor")
app.command(dashboard_cmd, name="dashboard")
# The command lives in sheri_trio/demo.py, imported only when it runs (it imports us).
app.command(
    "sheri_trio.demo:demo_cmd",
    name="demo",
    help="A private mosquitto, 9 agents and a mix of tasks, shown live (needs no API key).",
)


def rewrite_prototype_argv(argv: Sequence[str]) -> list[str]:
    """``sheri --mqtt --role R ...`` (the prototype) -> ``sheri agent --role R ...``."""
    args = list(argv)
    end = args.index("--") if "--" in args else len(args)
    if "--mqtt" not in args[:end]:
        return args
    args = [a for i, a in enumerate(args) if not (a == "--mqtt" and i < end)]
    if not args or args[0] != "agent":
        args.insert(0, "agent")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """The ``sheri`` entry point (also ``python -m sheri_trio``)."""
    tokens = rewrite_prototype_argv(sys.argv[1:] if argv is None else argv)
    with keeping_secrets() as secrets:
        try:
            app(tokens)
        except SystemExit:
            raise
        except BaseException as exc:
            code = print_error(exc, secrets)
            if code is None:
                raise
            raise SystemExit(code) from None
