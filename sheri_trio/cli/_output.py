"""What the CLI prints: the log line format, secrets kept out of it, exit codes, exits.

Secrets (broker passwords) are remembered in a :class:`Secrets` bound to the current
:func:`main` call (:func:`keeping_secrets`), not in a module-wide set: the log formatter
and the error line of that call scrub them.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn

from ..mqtt import BrokerURL

if TYPE_CHECKING:
    from collections.abc import Iterator

    from rich.text import Text

    from ..config import Connection

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "LineFormatter",
    "LogLevel",
    "agent_label",
    "exit_now",
    "remember_password",
    "remember_secrets",
    "scrub",
    "setup_logging",
]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

LogLevel = Literal["debug", "info", "warning", "error"]


# ----------------------------------------------------------------------- secrets
class Secrets:
    """Passwords that never appear in what we print, even inside an error message."""

    #: shorter ones would scrub ordinary words
    MIN_LENGTH: Final = 3

    def __init__(self) -> None:
        self._known: set[str] = set()

    def remember(self, conn: Connection) -> None:
        """The passwords of ``conn``: in its URL, and in its client options."""
        for secret in (BrokerURL.parse(conn.broker).password, conn.client_options.get("password")):
            if isinstance(secret, str) and len(secret) >= self.MIN_LENGTH:
                self._known.add(secret)

    def add(self, secret: str | None) -> None:
        """One more password (e.g. the claim store's)."""
        if secret is not None and len(secret) >= self.MIN_LENGTH:
            self._known.add(secret)

    def scrub(self, text: str) -> str:
        for secret in self._known:
            text = text.replace(secret, "***")
        return text


_secrets: contextvars.ContextVar[Secrets] = contextvars.ContextVar("sheri_secrets")


@contextlib.contextmanager
def keeping_secrets() -> Iterator[Secrets]:
    """Bind a new :class:`Secrets` for the code that runs inside (one ``sheri`` call);
    trio's tasks and threads started inside inherit it."""
    token = _secrets.set(Secrets())
    try:
        yield _secrets.get()
    finally:
        _secrets.reset(token)


def current_secrets() -> Secrets:
    """The bound :class:`Secrets` (outside :func:`keeping_secrets`: a new one, bound
    in the current context)."""
    try:
        return _secrets.get()
    except LookupError:
        _secrets.set(Secrets())
        return _secrets.get()


def remember_secrets(conn: Connection) -> None:
    current_secrets().remember(conn)


def remember_password(secret: str | None) -> None:
    """Keep ``secret`` (a claim store's password) out of what this call prints."""
    current_secrets().add(secret)


def scrub(text: str) -> str:
    return current_secrets().scrub(text)


def say(text: str = "") -> None:
    """One line on stdout, scrubbed."""
    print(scrub(text), flush=True)


def short(value: Any, limit: int = 400) -> str:
    """``value`` as text (JSON unless a string), cut at ``limit`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------- logging
#: the label of the agent a trio task works for (set per agent by ``sheri swarm``)
agent_label: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "sheri_agent_label", default=None
)


class LineFormatter(logging.Formatter):
    """``2026-02-22T20:00:00.123 [agent-id] info: event key=value`` (or ``[label] time ...``).

    Lines are scrubbed with the :class:`Secrets` bound when the formatter is made.
    """

    def __init__(self, default_label: str, *, label_first: bool) -> None:
        super().__init__()
        self.default_label = default_label
        self.label_first = label_first
        self.secrets = current_secrets()

    def format(self, record: logging.LogRecord) -> str:
        label = agent_label.get() or getattr(record, "agent_id", None) or self.default_label
        when = datetime.fromtimestamp(record.created).isoformat(timespec="milliseconds")
        level = record.levelname.lower()
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if self.label_first:
            line = f"[{label}] {when} {level}: {message}"
        else:
            line = f"{when} [{label}] {level}: {message}"
        return self.secrets.scrub(line)


def setup_logging(
    level: str,
    default_label: str,
    *,
    label_first: bool = False,
    handler: logging.Handler | None = None,
) -> logging.Handler:
    """Every record through ``handler`` (default: stderr) in :class:`LineFormatter`'s
    format, at ``level`` and above."""
    handler = handler or logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(default_label, label_first=label_first))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("transitions", "trio-websocket", "trio_websocket"):  # info lines drown ours
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler


# ------------------------------------------------------------------------- exits
def exit_now(code: int) -> NoReturn:
    """Leave without any clean-up: the broker publishes our last will (offline)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# ------------------------------------------------------------------ task states
_STATE_STYLES: Final = {
    "done": "green",
    "failed": "red",
    "expired": "red",
    "cancelled": "yellow",
    "released": "yellow",
    "timed_out": "yellow",
    "retrying": "yellow",
    "running": "cyan",
    "claimed": "cyan",
}


def styled_state(state: str) -> Text:
    from rich.text import Text

    return Text(state, style=_STATE_STYLES.get(state, ""))


def state_type(p: dict[str, Any]) -> str | None:
    """The task type of a progress or retained state payload: its own ``type``, or that of
    the submission kept with ``claimed`` (states from before ``type`` was added)."""
    submitted = p.get("task")
    kind = p.get("type") or (submitted.get("type") if isinstance(submitted, dict) else None)
    return str(kind) if kind else None
