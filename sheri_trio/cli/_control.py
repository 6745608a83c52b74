"""``sheri cancel`` and ``sheri retry``: one task, through the swarm's own protocol
(:func:`sheri_trio.swarm.request_cancel`, :func:`sheri_trio.swarm.request_retry`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final

import trio
from cyclopts import Parameter

from ..swarm import (
    TASK_ID_RE,
    CancelOutcome,
    CancelTracker,
    RetryOutcome,
    RetryReport,
    request_cancel,
    request_retry,
)
from ._broker import BROKER_DEFAULTS, BrokerArgs
from ._errors import UsageError
from ._output import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, say, short

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ..mqtt import Client
    from ._broker import BrokerLink

#: exit codes: 0 done, 1 already finished (or not confirmed), 2 unknown task
CANCEL_EXITS: Final = {
    CancelOutcome.CANCELLED: EXIT_OK,
    CancelOutcome.STOPPED: EXIT_OK,
    CancelOutcome.FINISHED: EXIT_FAILURE,
    CancelOutcome.UNKNOWN: EXIT_USAGE,
    CancelOutcome.NO_ANSWER: EXIT_FAILURE,
}
RETRY_EXITS: Final = {
    RetryOutcome.SUBMITTED: EXIT_OK,
    RetryOutcome.REFUSED: EXIT_FAILURE,
    RetryOutcome.UNKNOWN: EXIT_USAGE,
    RetryOutcome.NO_ANSWER: EXIT_FAILURE,
}


@Parameter(name="*")  # its fields are the command's own options: --timeout, --json
@dataclass(frozen=True, kw_only=True, slots=True)
class AnswerArgs:
    """How long cancel and retry wait for the swarm's answer, and how they print it."""

    seconds: Annotated[
        float, Parameter(name="--timeout", help="Seconds to wait for the confirmation.")
    ] = 10.0
    json_line: Annotated[
        bool, Parameter(name="--json", help="Print the outcome as one JSON object.")
    ] = False

    def check(self, task_id: str) -> None:
        """Refuse a bad TASK_ID or --timeout (:class:`UsageError`)."""
        if not TASK_ID_RE.fullmatch(task_id):
            raise UsageError(
                f"TASK_ID: {short(task_id, 40)!r} is not a task id "
                "(1-128 of letters, digits, '.', '_', '-')"
            )
        if not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise UsageError(
                f"--timeout: must be a positive number of seconds, got {self.seconds:g}"
            )

    def show(self, report: dict[str, Any], detail: str) -> None:
        say(json.dumps(report, separators=(",", ":")) if self.json_line else detail)


#: none of the options given
ANSWER_DEFAULTS: Final = AnswerArgs()


async def _ask(
    link: BrokerLink, kind: str, seconds: float, request: Callable[[Client], Awaitable[object]]
) -> None:
    """``request`` over a client of the CLI's own, for at most ``seconds``."""
    async with link.client(kind) as client:
        with trio.move_on_after(seconds):
            await request(client)


async def cancel_cmd(
    task_id: Annotated[str, Parameter(help="The task to cancel.")],
    /,
    *,
    answer: AnswerArgs = ANSWER_DEFAULTS,
    where: BrokerArgs = BROKER_DEFAULTS,
) -> int:
    """Cancel a task: a running one is stopped, a queued one never starts.

    Exit 0 when it is cancelled (or stopped), 1 when it had already finished (or the
    cancel was not confirmed within --timeout), 2 for a task nobody knows.
    """
    answer.check(task_id)
    link = where.link()
    tracker = CancelTracker(link.topics, task_id)
    await _ask(link, "cancel", answer.seconds, lambda client: request_cancel(client, tracker))
    report = tracker.outcome(answer.seconds)
    answer.show(report.to_json(), report.detail)
    return CANCEL_EXITS[report.outcome]


async def retry_cmd(
    task_id: Annotated[str, Parameter(help="The failed task to run again.")],
    /,
    *,
    answer: AnswerArgs = ANSWER_DEFAULTS,
    where: BrokerArgs = BROKER_DEFAULTS,
) -> int:
    """Submit a failed task again, as TASK_ID.retry-N (retry_of: TASK_ID), from the
    submission its final state keeps; print the new task's id.

    Exit 0 once an agent (or the dispatcher) took the retry, 1 when the task did not fail
    (completed, running) or the retry was not confirmed within --timeout, 2 for a task
    the broker keeps no state of.
    """
    answer.check(task_id)
    link = where.link()
    report = RetryReport(task_id)
    await _ask(
        link, "retry", answer.seconds, lambda client: request_retry(client, link.topics, report)
    )
    detail = report.detail
    if report.outcome is RetryOutcome.NO_ANSWER:
        detail += f" within {answer.seconds:g} s"
    answer.show({**report.to_json(), "detail": detail}, detail)
    return RETRY_EXITS[report.outcome]
