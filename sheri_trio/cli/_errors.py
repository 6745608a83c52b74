"""The CLI's errors and :func:`explain`: the one line and exit code a user sees."""

from __future__ import annotations

import ssl
import sys
from typing import TYPE_CHECKING, Final

import trio

from .._exceptions import leaves as leaves_of
from ..config import ConfigError
from ..dashboard import DashboardError
from ..mqtt import ClientClosed, ConnectError, ConnectionLost, LocalProtocolError, MQTTError
from ..stores import StoreAuthError, StoreConfigError, StoreError, StoreUnavailable
from ..swarm import DuplicateAgent, StartupError
from ._output import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE

if TYPE_CHECKING:
    from ._output import Secrets

__all__ = ["NoAnswer", "NotDelivered", "UsageError", "explain"]


class UsageError(ValueError):
    """A bad argument that the parser could not catch (exit code 2)."""


class AgentProcessFailed(RuntimeError):
    """An agent process of ``sheri swarm --processes`` ended on its own (exit code 1)."""


class NoAnswer(RuntimeError):
    """The broker accepted our connection but did not answer in time (exit code 1)."""

    def __init__(self, seconds: float, what: str, server: str = "broker") -> None:
        super().__init__(
            f"no answer from the {server} within {seconds:g} s while {what}: it accepted the "
            "connection but does not answer (stalled or overloaded?); the bound is "
            "[broker] connect_timeout"
        )


class NotDelivered(RuntimeError):
    """The broker answered 0x10 (no matching subscribers): nobody will see the task."""

    def __init__(self, task_id: str, topic: str, swarm: str) -> None:
        super().__init__(
            f"the broker dropped task {task_id}: nothing subscribes to {topic} (no agent of "
            f"swarm {swarm!r} is online, and no dispatcher session exists); start an agent "
            "(sheri agent, sheri swarm) and submit again"
        )


#: CONNACK reason codes: bad user name or password, not authorized, bad auth method
AUTH_REFUSED: Final = frozenset({0x86, 0x87, 0x8C})


def _connect_hint(error: ConnectError) -> str:
    if error.reason_code in AUTH_REFUSED:
        return (
            "check the user name and password (in the URL mqtt://user:pass@host, "
            "--username/--password, SHERI_USERNAME/SHERI_PASSWORD or sheri.toml [broker])"
        )
    if error.reason_code is not None:
        return "the broker refused the connection"
    if not error.retryable:  # TLS verification failed
        return "check [broker] ca_file, cert_file, key_file or insecure in sheri.toml"
    return "is the broker running, and is --broker (or SHERI_BROKER, sheri.toml) right?"


def _store_hint(error: StoreError) -> str:
    if isinstance(error, StoreAuthError):
        return (
            "check the claim store's user and password (SHERI_CLAIM_STORE, "
            "SHERI_CLAIM_STORE_PASSWORD or [agent] claim_store_password_file)"
        )
    if isinstance(error, StoreUnavailable):
        return "is the claim store running, and is --claim-store (or SHERI_CLAIM_STORE) right?"
    if isinstance(error, StoreConfigError):
        return "check --claim-store, SHERI_CLAIM_STORE or [agent] claim_store"
    return "see docs/stores.md"


def _explain_one(leaf: BaseException) -> tuple[int, str] | None:
    if isinstance(leaf, ConfigError | UsageError):
        return EXIT_USAGE, str(leaf)
    if isinstance(leaf, LocalProtocolError):
        return EXIT_USAGE, f"{leaf}; check --broker, SHERI_BROKER or sheri.toml"
    if isinstance(leaf, StartupError) and isinstance(leaf.cause, StoreError):
        return EXIT_FAILURE, f"{leaf}; {_store_hint(leaf.cause)}"
    if isinstance(leaf, DuplicateAgent | StartupError | NoAnswer | NotDelivered | DashboardError):
        return EXIT_FAILURE, str(leaf)
    if isinstance(leaf, AgentProcessFailed):
        return EXIT_FAILURE, str(leaf)
    if isinstance(leaf, ConnectError):
        return EXIT_FAILURE, f"{leaf}; {_connect_hint(leaf)}"
    if isinstance(leaf, ClientClosed | ConnectionLost):
        return EXIT_FAILURE, f"lost the connection to the broker: {leaf}"
    if isinstance(leaf, MQTTError):
        return EXIT_FAILURE, f"MQTT error: {leaf}"
    if isinstance(leaf, StoreError):  # the messages carry no password
        return EXIT_FAILURE, f"{leaf}; {_store_hint(leaf)}"
    if isinstance(leaf, ssl.SSLError):
        return EXIT_USAGE, f"TLS settings: {leaf}; check [broker] in sheri.toml"
    return None


def explain(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for the errors users make; None for a bug.

    In a group, a Ctrl+C wins; else the first leaf's line, unless a leaf is a bug.
    """
    leaves = [e for e in leaves_of(exc) if not isinstance(e, trio.Cancelled)]
    if not leaves:
        return None
    known: list[tuple[int, str]] = []
    for leaf in leaves:
        if isinstance(leaf, KeyboardInterrupt):
            return EXIT_INTERRUPTED, "interrupted"
        explained = _explain_one(leaf)
        if explained is None:
            return None
        known.append(explained)
    return known[0]


def print_error(exc: BaseException, secrets: Secrets) -> int | None:
    """The exit code of a user's error (:func:`explain`), once its ``sheri: error:`` line
    is on stderr, scrubbed of ``secrets``; None for a bug (nothing printed)."""
    explained = explain(exc)
    if explained is None:
        return None
    code, message = explained
    print(f"sheri: error: {secrets.scrub(message)}", file=sys.stderr, flush=True)
    return code
