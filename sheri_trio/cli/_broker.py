"""The options every command shares (:class:`BrokerArgs`), the claim store's
(:class:`StoreArgs`: ``agent``, ``swarm``, ``submit`` and ``monitor``) and the short-lived
clients of ``submit``, ``tasks`` and ``monitor`` (:class:`BrokerLink`), whose waits for
the broker and the store are bounded by ``[broker] connect_timeout``."""

from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path  # noqa: TC003 (cyclopts reads the annotations at run time)
from typing import TYPE_CHECKING, Annotated, Any, Final
from urllib.parse import urlsplit

import trio
from cyclopts import Parameter

from ..config import Connection, FileConfig, connection_settings, load_config, store_settings
from ..mqtt import ClientOptions, open_client
from ..stores import StoreConfig, connect_store
from ..swarm import BadMessage, Topics, decode_envelope, read_retained
from ._errors import NoAnswer
from ._output import remember_password, remember_secrets, setup_logging

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ..mqtt import Client, Message
    from ..stores import ClaimStore
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

    def password_on_command_line(self) -> bool:
        """Whether a broker password came as a flag (``--password``, or inside
        ``--broker``): every user of the machine sees it in ``ps``."""
        if self.password:
            return True
        try:
            return bool(self.broker and urlsplit(self.broker).password)
        except ValueError:
            return False  # a bad URL: its own error comes when it is parsed

    def warn_visible_password(self) -> None:
        """Say so, once logging is set up (the password itself is never shown)."""
        if self.password_on_command_line():
            logging.getLogger("sheri_trio.cli").warning(
                "the broker password was given on the command line (--password or inside "
                "--broker), where other users of this machine see it (ps): use "
                "SHERI_PASSWORD, SHERI_BROKER or [broker] password in sheri.toml"
            )

    def link(self, store: StoreArgs | None = None) -> BrokerLink:
        """The way to the broker for a command's own client: settings checked, the
        password remembered as a secret, warnings and worse logged on stderr. With
        ``store``: the claim store's settings too (:meth:`BrokerLink.claim_store`)."""
        file_config = load_config(self.config)
        conn = self.connection(file_config)
        remember_secrets(conn)
        claims = store.settings(file_config) if store is not None else None
        setup_logging("warning", "sheri")
        self.warn_visible_password()
        return BrokerLink(conn, claims)


#: none of the options given
BROKER_DEFAULTS: Final = BrokerArgs()


@Parameter(name="*")
@dataclass(frozen=True, kw_only=True, slots=True)
class StoreArgs:
    """The claim store's options (docs/stores.md). Its password is never an option: it
    comes from ``SHERI_CLAIM_STORE`` (the whole URL), ``SHERI_CLAIM_STORE_PASSWORD`` or
    ``[agent] claim_store_password_file``; a password inside ``--claim-store`` is refused."""

    claim_store: Annotated[
        str | None,
        Parameter(
            help="Claim store: broker (default), redis://[user@]host[:port][/db], rediss://, "
            "postgresql://[user@]host[:port]/db (env SHERI_CLAIM_STORE). No password here: "
            "SHERI_CLAIM_STORE_PASSWORD or [agent] claim_store_password_file."
        ),
    ] = None
    claim_store_ca: Annotated[
        Path | None, Parameter(help="CA file of the claim store's TLS certificate.")
    ] = None
    claim_store_cert: Annotated[
        Path | None, Parameter(help="Client certificate for the claim store (with its key).")
    ] = None
    claim_store_key: Annotated[Path | None, Parameter(help="Key of --claim-store-cert.")] = None

    def overrides(self) -> dict[str, Any]:
        """The options as ``build_agent_config`` settings (None: not given)."""
        return {
            "claim_store": self.claim_store,
            "claim_store_ca": _text(self.claim_store_ca),
            "claim_store_cert": _text(self.claim_store_cert),
            "claim_store_key": _text(self.claim_store_key),
        }

    def settings(self, file_config: FileConfig) -> StoreConfig:
        """The claim store these options, the environment and ``file_config`` give; its
        password remembered as a secret."""
        store = store_settings(
            file_config,
            claim_store=self.claim_store,
            claim_store_ca=_text(self.claim_store_ca),
            claim_store_cert=_text(self.claim_store_cert),
            claim_store_key=_text(self.claim_store_key),
        )
        remember_password(store.password)
        return store


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


#: none of the claim store's options given
STORE_DEFAULTS: Final = StoreArgs()


class BrokerLink:
    """A command's own short-lived clients of one broker and swarm, and the bound of
    each wait for the broker's answer (``[broker] connect_timeout``)."""

    def __init__(self, conn: Connection, store: StoreConfig | None = None) -> None:
        self.conn = conn
        self.store = store
        self.topics = Topics(conn.swarm)
        self.bound = float(
            conn.client_options.get("connect_timeout", ClientOptions().connect_timeout)
        )

    @asynccontextmanager
    async def claim_store(self) -> AsyncIterator[ClaimStore | None]:
        """The claim store, opened and checked (None: ``broker``, nothing to open).

        Raises :class:`~sheri_trio.stores.StoreError` (unreachable, credentials refused)
        or :class:`NoAnswer` when it does not answer within :attr:`bound`.
        """
        if self.store is None or self.store.kind == "broker":
            yield None
            return
        store: ClaimStore | None = None
        with trio.move_on_after(self.bound):
            store = await connect_store(self.store, self.conn.swarm)
        if store is None:
            raise NoAnswer(self.bound, f"opening the claim store {self.store.url}", "claim store")
        try:
            yield store
        finally:
            with trio.move_on_after(self.bound, shield=True):
                await store.aclose()

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
