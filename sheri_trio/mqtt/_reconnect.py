"""The one reconnect loop: backoff with equal jitter around a connect-once callable.

Both backends run :func:`run_reconnecting` in their nursery; what differs (how one
connection is made and served) is the ``serve_once`` callable they pass.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

import trio

from ._errors import (
    AckTimeout,
    ConnectError,
    ConnectionLost,
    KeepAliveTimeout,
    RemoteProtocolError,
    SessionTakenOver,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._api import ClientOptions
    from ._streams import BrokerURL

__all__: list[str] = []  # shared by the backends, not public

log = logging.getLogger("sheri_trio.mqtt")

#: the ways an established connection ends that reconnecting can cure
LOSSES = (ConnectionLost, RemoteProtocolError, KeepAliveTimeout, AckTimeout)


def backoff_delay(options: ClientOptions, attempt: int) -> float:
    """The wait before reconnect attempt ``attempt`` (1, 2, ...) of one outage.

    The cap doubles from ``reconnect_initial_delay`` up to ``reconnect_max_delay``; the
    delay is drawn from [cap/2, cap] ("equal jitter"): never zero, never in step.
    """
    # (the exponent is bounded: 2.0 ** 1024 overflows, after ~8 h of a 30 s cap)
    doubling = 2.0 ** min(attempt - 1, 64)
    cap = min(options.reconnect_max_delay, options.reconnect_initial_delay * doubling)
    return random.uniform(cap / 2, cap)


async def run_reconnecting(
    serve_once: Callable[[Callable[[], None]], Awaitable[None]],
    options: ClientOptions,
    url: BrokerURL,
    *,
    is_closed: Callable[[], bool],
    on_error: Callable[[str], None],
    set_fatal: Callable[[BaseException], None],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Connect, and reconnect with backoff until closed or given up.

    ``serve_once(connected)`` makes one connection and serves it until it ends: it
    calls ``connected()`` once the broker accepted it, returns when we closed it, and
    raises why it ended otherwise. The first ``connected()`` reports ``task_status``
    started; a failure before it is raised (as ConnectError), after it retried.
    ``on_error`` records every failure's text; ``set_fatal`` stops the client:
    a refusal that cannot be retried, a session taken over, ``reconnect=False``, or
    ``max_reconnect_attempts`` exhausted. The backoff starts afresh after every
    connection that was made.
    """
    attempt = 0
    started = False
    last_error: str | None = None
    while not is_closed():
        made = False

        def connected() -> None:
            nonlocal made, started
            made = True
            if not started:
                started = True
                task_status.started()

        try:
            await serve_once(connected)
        except ConnectError as exc:
            last_error = str(exc)
            on_error(last_error)
            if not started or not exc.retryable:
                set_fatal(exc)
                if not started:
                    raise
                return
            log.warning("%s (attempt %d)", exc, attempt + 1)
        except SessionTakenOver as exc:
            last_error = str(exc)
            on_error(last_error)
            set_fatal(exc)
            return
        except LOSSES as exc:
            last_error = str(exc)
            on_error(last_error)
            if is_closed():
                return
            if not started:  # broke before CONNACK: the first connection failed
                error = ConnectError(f"cannot connect to {url.display()}: {exc}")
                set_fatal(error)
                raise error from exc
            log.warning("MQTT connection to %s lost: %s", url, exc)
        if made:
            attempt = 0  # a connection was made: this outage backs off afresh
        if is_closed():
            return
        if not options.reconnect:
            set_fatal(ConnectionLost(last_error or "connection lost"))
            return
        attempt += 1
        if options.max_reconnect_attempts is not None and attempt > options.max_reconnect_attempts:
            set_fatal(ConnectionLost(f"gave up after {attempt - 1} reconnects"))
            return
        delay = backoff_delay(options, attempt)
        log.info("reconnecting to %s in %.2f s (attempt %d)", url, delay, attempt)
        await trio.sleep(delay)
