"""``explain()``: the one line and the exit code a user sees for each known error."""

from __future__ import annotations

import ssl

import pytest
import trio

from sheri_trio.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, NoAnswer, UsageError, explain
from sheri_trio.config import ConfigError
from sheri_trio.mqtt import ConnectError, ConnectionLost, LocalProtocolError, MQTTError
from sheri_trio.swarm import DuplicateAgent


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (ConfigError("sheri.toml: agent.x: unknown key"), EXIT_USAGE, "sheri.toml: agent.x: unknown key"),  # noqa: E501
        (UsageError("--limit: must be at least 1, got 0"), EXIT_USAGE, "--limit: must be at least 1, got 0"),  # noqa: E501
        (LocalProtocolError("bad broker URL"), EXIT_USAGE, "bad broker URL; check --broker, SHERI_BROKER or sheri.toml"),  # noqa: E501
        (DuplicateAgent("an agent with id 'a' is already online"), EXIT_FAILURE, "an agent with id 'a' is already online"),  # noqa: E501
        (NoAnswer(1, "reading x"), EXIT_FAILURE, "no answer from the broker within 1 s while reading x: it accepted the connection but does not answer (stalled or overloaded?); the bound is [broker] connect_timeout"),  # noqa: E501
        (ConnectError("refused", reason_code=0x86, retryable=False), EXIT_FAILURE, "refused; check the user name and password (in the URL mqtt://user:pass@host, --username/--password, SHERI_USERNAME/SHERI_PASSWORD or sheri.toml [broker])"),  # noqa: E501
        (ConnectError("banned", reason_code=0x8A, retryable=False), EXIT_FAILURE, "banned; the broker refused the connection"),  # noqa: E501
        (ConnectError("cert", retryable=False), EXIT_FAILURE, "cert; check [broker] ca_file, cert_file, key_file or insecure in sheri.toml"),  # noqa: E501
        (ConnectError("cannot connect"), EXIT_FAILURE, "cannot connect; is the broker running, and is --broker (or SHERI_BROKER, sheri.toml) right?"),  # noqa: E501
        (ConnectionLost("reset"), EXIT_FAILURE, "lost the connection to the broker: reset"),
        (MQTTError("odd"), EXIT_FAILURE, "MQTT error: odd"),
        (ssl.SSLError(1, "bad key"), EXIT_USAGE, "TLS settings: bad key; check [broker] in sheri.toml"),  # noqa: E501
        (KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted"),
    ],
)  # fmt: skip
def test_known_errors_are_one_line_and_an_exit_code(
    error: BaseException, code: int, line: str
) -> None:
    assert explain(error) == (code, line)


def test_a_bug_is_not_explained() -> None:
    assert explain(RuntimeError("bug")) is None
    assert explain(ExceptionGroup("g", [UsageError("u"), RuntimeError("bug")])) is None


def test_groups_give_their_first_known_leaf_and_a_ctrl_c_wins() -> None:
    group = BaseExceptionGroup(
        "agents", [ExceptionGroup("inner", [DuplicateAgent("dup")]), ConnectionLost("reset")]
    )
    assert explain(group) == (EXIT_FAILURE, "dup")
    stopped = BaseExceptionGroup("g", [ConnectionLost("reset"), KeyboardInterrupt()])
    assert explain(stopped) == (EXIT_INTERRUPTED, "interrupted")


async def test_cancellations_are_left_out() -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.sleep(1)
        except trio.Cancelled as exc:
            cancelled = exc
            assert explain(cancelled) is None
            assert explain(BaseExceptionGroup("g", [cancelled, UsageError("u")])) == (
                EXIT_USAGE,
                "u",
            )
            raise
