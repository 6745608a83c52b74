"""``open_client(url, backend=...)``: the only module that knows both backends."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

from ._api import ClientOptions, new_client_id
from ._errors import LocalProtocolError
from ._streams import BrokerURL

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ._api import Client

__all__ = ["open_client"]


@asynccontextmanager
async def open_client(
    url: str,
    *,
    backend: Literal["trio", "gmqtt"] = "trio",
    **options: Any,
) -> AsyncIterator[Client]:
    """Connect to the broker at ``url`` and yield a client; close it on exit.

    ``mqtt://`` TCP, ``mqtts://`` TLS, ``ws://`` / ``wss://`` WebSocket (path from
    the URL, ``/mqtt`` by default). Options are the fields of
    :class:`ClientOptions`. Raises :class:`ConnectError` if the first
    connection fails; later losses reconnect with backoff. ``backend="trio"`` is
    the native client (:mod:`._client`), ``"gmqtt"`` gmqtt through trio-asyncio
    (:mod:`._gmqtt`, imported only when asked for).
    """
    opts = ClientOptions(**options)
    if not opts.client_id:
        opts.client_id = new_client_id()
    broker = BrokerURL.parse(url)
    if backend == "gmqtt":
        from ._gmqtt import open_gmqtt_client

        async with open_gmqtt_client(broker, opts) as gclient:
            yield gclient
    elif backend == "trio":
        from ._client import open_trio_client

        async with open_trio_client(broker, opts) as client:
            yield client
    else:
        raise LocalProtocolError(f"unknown backend {backend!r} (use 'trio' or 'gmqtt')")


if TYPE_CHECKING:
    from ._client import MQTTClient
    from ._gmqtt import GMQTTClient

    def _backends_are_clients(native: MQTTClient, gmqtt: GMQTTClient) -> tuple[Client, Client]:
        return native, gmqtt  # mypy checks both backends against the Client protocol
