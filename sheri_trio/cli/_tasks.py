"""``sheri tasks``: the retained state of each task, most recent first."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

from cyclopts import Parameter

from ._broker import BROKER_DEFAULTS, BrokerArgs, decode
from ._errors import UsageError
from ._output import EXIT_OK, say, scrub, state_type, styled_state

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable

    from ..mqtt import Message


def task_rows(
    retained: Iterable[Message], wanted: Collection[str] | None, limit: int
) -> list[dict[str, Any]]:
    """The payloads of retained task states (in ``wanted`` states), latest first."""
    rows: list[dict[str, Any]] = []
    for message in retained:
        env = decode(message)
        if env is None or not isinstance(env.payload.get("task_id"), str):
            continue
        if wanted is None or env.payload.get("state") in wanted:
            rows.append(env.payload)
    rows.sort(key=lambda r: str(r.get("at", "")), reverse=True)
    return rows[:limit]


async def tasks_cmd(
    *,
    state: Annotated[
        str | None, Parameter(help="Only these states (comma-separated), e.g. failed.")
    ] = None,
    limit: Annotated[int, Parameter(help="At most this many, most recent first.")] = 50,
    json_lines: Annotated[
        bool, Parameter(name="--json", help="One JSON object per line instead of a table.")
    ] = False,
    where: BrokerArgs = BROKER_DEFAULTS,
) -> int:
    """Recent tasks and their last recorded state (the retained {swarm}/tasks/state/+)."""
    wanted = {s.strip() for s in state.split(",") if s.strip()} if state else None
    if limit < 1:
        raise UsageError(f"--limit: must be at least 1, got {limit}")
    link = where.link()
    topics = link.topics
    async with link.client("tasks") as client:
        retained = await link.read_retained(
            client,
            topics.tasks_state_all,
            what=f"the retained task states ({topics.tasks_state_all})",
        )
    rows = task_rows(retained, wanted, limit)
    if json_lines:
        for row in rows:
            say(json.dumps(row, separators=(",", ":"), default=str))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tasks in {link.conn.swarm}" + (f" ({state})" if state else ""))
    for column in ("task", "type", "state", "agent", "attempt", "at", "detail"):
        table.add_column(column, no_wrap=column != "detail", overflow="fold")
    for row in rows:
        detail = row.get("error") or (
            f"{row['duration']} ms" if isinstance(row.get("duration"), int | float) else ""
        )
        table.add_row(
            str(row.get("task_id")),
            state_type(row) or "?",
            styled_state(str(row.get("state", "?"))),
            str(row.get("agent_id", "")),
            str(row.get("attempt", "")),
            str(row.get("at", "")),
            scrub(str(detail)),
        )
    console = Console()
    console.print(table)
    if not rows:
        console.print("no tasks" + (f" in state {state}" if state else ""))
    return EXIT_OK
