"""The CLI's own short-lived clients (``submit``, ``tasks``, ``monitor``): the options
every command shares, where to connect, and waits for the broker bounded by
``[broker] connect_timeout``."""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import trio
from cyclopts import Parameter

from ..config import Connection, connection_settings, load_config
from ..mqtt import ClientOptions, open_client
from ..swarm import BadMessage, decode_envelope, read_retained
from ._errors import NoAnswer
from ._output import LogLevel, remember_secrets, setup_logging

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ..mqtt import Client, Message
    from ..swarm import Envelope, Topics

__all__ = [
    "BrokerOpt",
    "ConfigOpt",
    "LogLevelOpt",
    "PasswordOpt",
    "SwarmOpt",
    "UserOpt",
    "answer_bound",
    "cli_client",
    "cli_connection",
    "decode",
    "read_retained_bounded",
]

# Common options, shared by the commands.
BrokerOpt = Annotated[
    str | None,
    Parameter(help="Broker URL: mqtt://, mqtts://, ws://, wss:// (env SHERI_BROKER)."),
]
SwarmOpt = Annotated[str | None, Parameter(help="Swarm name, the topic prefix (env SHERI_SWARM).")]
UserOpt = Annotated[str | None, Parameter(help="Broker user name (env SHERI_USERNAME).")]
PasswordOpt = Annotated[str | None, Parameter(help="Broker password (env SHERI_PASSWORD).")]
ConfigOpt = Annotated[
    Path | None, Parameter(help="Configuration file (default: ./sheri.toml if present).")
]
LogLevelOpt = Annotated[LogLevel, Parameter(help="Log level of the lines on stderr.")]


def cli_connection(
    config: Path | None,
    broker: str | None,
    swarm: str | None,
    username: str | None,
    password: str | None,
) -> Connection:
    """Where a command's own client connects (its password remembered as a secret);
    logs warnings and worse on stderr."""
    conn = connection_settings(
        load_config(config), broker=broker, swarm=swarm, username=username, password=password
    )
    remember_secrets(conn)
    setup_logging("warning", "sheri")
    return conn


@asynccontextmanager
async def cli_client(conn: Connection, kind: str) -> AsyncIterator[Client]:
    """A short-lived client of the CLI's own (it is not an agent: no will, no session)."""
    async with open_client(
        conn.broker,
        client_id=f"sheri-{kind}-{secrets.token_hex(4)}",
        clean_start=True,
        **conn.client_options,
    ) as client:
        yield client


def answer_bound(conn: Connection) -> float:
    """How long the CLI waits for each answer of the broker: the ``connect_timeout``."""
    return float(conn.client_options.get("connect_timeout", ClientOptions().connect_timeout))


async def read_retained_bounded(
    client: Client, topics: Topics, *filters: str, bound: float, what: str
) -> list[Message]:
    """The retained messages on ``filters``: they all arrive before our own sync marker.

    Each message (the first one included) must come within ``bound`` of the one before,
    else :class:`NoAnswer` says we were reading ``what``.
    """
    sync = topics.sync_marker("cli", secrets.token_hex(6))
    found: list[Message] = []
    with trio.move_on_after(bound) as scope:

        def renew() -> None:
            scope.deadline = trio.current_time() + bound

        await read_retained(client, sync, *filters, into=found, progress=renew)
    if scope.cancelled_caught:
        raise NoAnswer(bound, f"reading {what}")
    return found


def decode(message: Message) -> Envelope | None:
    """The message's envelope; None when it is not one (others may share the topics)."""
    try:
        return decode_envelope(message.payload)
    except BadMessage:
        return None
