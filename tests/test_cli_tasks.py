"""``sheri tasks``' rows: retained task states, filtered, latest first."""

from __future__ import annotations

from typing import Any

import mqtt5

from sheri_trio.cli._tasks import task_rows
from sheri_trio.mqtt import Message
from sheri_trio.swarm import encode


def _state(task_id: str, **payload: Any) -> Message:
    data = encode("a1", "testing", {"task_id": task_id, **payload})
    return Message(mqtt5.PublishPacket(f"s/tasks/state/{task_id}", payload=data, retain=True))


def test_rows_are_filtered_by_state_latest_first_and_limited() -> None:
    retained = [
        _state("t1", state="done", at="2026-01-01T00:00:01Z"),
        _state("t2", state="failed", at="2026-01-01T00:00:03Z"),
        _state("t3", state="failed", at="2026-01-01T00:00:02Z"),
        Message(mqtt5.PublishPacket("s/tasks/state/x", payload=b"not json", retain=True)),
        Message(mqtt5.PublishPacket("s/tasks/state/y", payload=encode(None, None, {}))),
    ]
    assert [r["task_id"] for r in task_rows(retained, None, 10)] == ["t2", "t3", "t1"]
    assert [r["task_id"] for r in task_rows(retained, {"failed"}, 10)] == ["t2", "t3"]
    assert [r["task_id"] for r in task_rows(retained, {"done", "failed"}, 2)] == ["t2", "t3"]
