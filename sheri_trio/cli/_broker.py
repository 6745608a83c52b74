"""The options every command shares (:class:`BrokerArgs`) and the short-lived clients of
``submit``, ``tasks`` and ``monitor`` (:class:`BrokerLink`), whose waits for the broker
are bounded by ``[broker] connect_timeout``."""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path  # noqa: TC003 (cyclopts reads the annotations at run time)
from typing import TYPE_CHECKING, Annotated, Final

import trio
from cyclopts import Parameter

from ..config import Connection, FileConfig, connection_settings, load_config
from ..mqtt import ClientOptions, open_client
from ..swarm import BadMessage, Topics, decode_envelope, read_retained
from ._errors import NoAnswer
from ._output import remember_secrets, setup_logging

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ..mqtt import Client, Message
    from ..swarm import Envelope


@Parameter(name="*")  # its fields are the command's own options: --broker, --swarm, ...
@dataclass(frozen=True, kw_only=True, slots=True)
class BrokerArgs:
    """The options every command shares: where the broker is and how to reach it."""

    broker: Annotated[
        str | None,
        Parameter(help="Broker URL: mqtt://, mqtts://, ws://, wss:// (env SHERI_BROKER)."),
    ] = None
    swarm: Annotated[
        str | None, Parameter(help="Swarm name, the topic prefix (env SHERI_SWARM).")
    ] = None
    username: Annotated[str | None, Parameter(help="Broker user name (env SHERI_USERNAME).")] = None
    password: Annotated[str | None, Parameter(help="Broker password (env SHERI_PASSWORD).")] = None
    config: Annotated[
        Path | None, Parameter(help="Configuration file (default: ./sheri.toml if present).")
    ] = None

    def connection(self, file_config: FileConfig) -> Connection:
        """The connection these options, the environment and ``file_config`` give."""
        return connection_settings(
            file_config,
            broker=self.broker,
            swarm=self.swarm,
            username=self.username,
            password=self.password,
        )

    def link(self) -> BrokerLink:
        """The way to the broker for a command's own client: settings checked, the
        password remembered as a secret, warnings and worse logged on stderr."""
        conn = self.connection(load_config(self.config))
        remember_secrets(conn)
        setup_logging("warning", "sheri")
        return BrokerLink(conn)


#: none of the options given
BROKER_DEFAULTS: Final = BrokerArgs()


class BrokerLink:
    """A command's own short-lived clients of one broker and swarm, and the bound of
    each wait for the broker's answer (``[broker] connect_timeout``)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.topics = Topics(conn.swarm)
        self.bound = float(
            conn.client_options.get("connect_timeout", ClientOptions().connect_timeout)
        )

    @asynccontextmanager
    async def client(self, kind: str) -> AsyncIterator[Client]:
        """A client of the CLI's own (it is not an agent: no will, no session)."""
        async with open_client(
            self.conn.broker,
            client_id=f"sheri-{kind}-{secrets.token_hex(4)}",
            clean_start=True,
            **self.conn.client_options,
        ) as client:
            yield client

    async def read_retained(self, client: Client, *filters: str, what: str) -> list[Message]:
        """The retained messages on ``filters``: they all arrive before our own sync marker.

        Each message (the first one included) must come within :attr:`bound` of the one
        before, else :class:`NoAnswer` says we were reading ``what``.
        """
        sync = self.topics.sync_marker("cli", secrets.token_hex(6))
        found: list[Message] = []
        with trio.move_on_after(self.bound) as scope:

            def renew() -> None:
                scope.deadline = trio.current_time() + self.bound

            await read_retained(client, sync, *filters, into=found, progress=renew)
        if scope.cancelled_caught:
            raise NoAnswer(self.bound, f"reading {what}")
        return found


def decode(message: Message) -> Envelope | None:
    """The message's envelope; None when it is not one (others may share the topics)."""
    try:
        return decode_envelope(message.payload)
    except BadMessage:
        return None
