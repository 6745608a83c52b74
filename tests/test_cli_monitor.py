"""``sheri monitor``'s model, :class:`SwarmView`: fed messages, rendered (no broker)."""

from __future__ import annotations

import re
from typing import Any

import mqtt5
from rich.console import Console

from sheri_trio.cli import SwarmView
from sheri_trio.mqtt import Message
from sheri_trio.swarm import Topics, encode


def msg(topic: str, agent_id: str | None, payload: dict[str, Any], retain: bool = False) -> Message:
    data = encode(agent_id, "testing" if agent_id else None, payload)
    return Message(mqtt5.PublishPacket(topic, payload=data, retain=retain))


def state(task_id: str, payload: dict[str, Any]) -> Message:
    data = encode("a1", "testing", {"task_id": task_id, "attempt": 1, **payload})
    return Message(mqtt5.PublishPacket(f"view/tasks/state/{task_id}", payload=data, retain=True))


def test_swarm_view_follows_agents_and_tasks() -> None:
    view = SwarmView(Topics("view"))
    view.feed(msg("view/agents/a1/status", "a1", {"status": "online", "role": "testing"}, True), 0)
    view.feed(msg("view/agents/heartbeat", "a1", {"agent_id": "a1", "running_tasks": 1}), 1.0)
    view.feed(msg("view/tasks/new", None, {"task_id": "t1", "type": "testing.run"}), 1.0)
    view.feed(
        msg("view/tasks/assigned", "a1", {"task_id": "t1", "agent_id": "a1", "attempt": 1}), 1.5
    )
    view.feed(
        msg("view/tasks/progress", "a1", {"task_id": "t1", "state": "running", "attempt": 1}), 1.6
    )
    assert view.tasks["t1"].state == "running"
    assert view.tasks["t1"].agent == "a1"
    view.feed(msg("view/tasks/complete", "a1", {"task_id": "t1", "attempt": 1, "duration": 250}), 2)
    view.feed(msg("view/tasks/failed", "a2", {"task_id": "t1", "attempt": 0}), 2)  # stale: fenced
    task = view.tasks["t1"]
    assert (task.state, task.type, task.duration_ms) == ("done", "testing.run", 250)
    assert view.agents["a1"].running == 1
    assert view.agents["a1"].status == "online"
    console = Console(width=200, record=True)
    console.print(view.render(3.0))
    text = console.export_text()
    assert re.search(r"a1\s.*testing\s.*online\s.*2\.0 s ago", text), text
    assert re.search(r"t1\s.*testing\.run\s.*done\s.*a1\s.*0\.25 s", text), text


def test_swarm_view_learns_the_type_from_retained_states() -> None:
    """``sheri monitor --once`` sees only retained states: their type comes from the
    state's own ``type`` or from the submission kept with ``claimed``."""
    view = SwarmView(Topics("view"))
    view.feed(state("t1", {"state": "failed", "type": "code.generate"}), 1.0)
    view.feed(
        state("t2", {"state": "claimed", "task": {"task_id": "t2", "type": "testing.run"}}), 1.0
    )
    view.feed(state("t3", {"state": "done"}), 1.0)  # an older agent's state: no type
    assert [view.tasks[t].type for t in ("t1", "t2", "t3")] == [
        "code.generate",
        "testing.run",
        None,
    ]


def test_a_final_state_is_kept_against_later_news_of_the_same_attempt() -> None:
    view = SwarmView(Topics("view"))
    view.feed(msg("view/tasks/assigned", "a1", {"task_id": "t1", "agent_id": "a1"}), 1.0)
    view.feed(msg("view/tasks/failed", "a1", {"task_id": "t1", "error": "boom"}), 2.0)
    view.feed(msg("view/tasks/progress", "a1", {"task_id": "t1", "state": "running"}), 2.5)
    view.feed(msg("view/tasks/assigned", "a2", {"task_id": "t1", "agent_id": "a2"}), 3.0)
    task = view.tasks["t1"]
    assert (task.state, task.agent, task.error, task.duration_ms) == ("failed", "a1", "boom", 1000)


def test_a_released_task_is_claimed_again_by_a_later_attempt() -> None:
    view = SwarmView(Topics("view"))
    view.feed(msg("view/tasks/assigned", "a1", {"task_id": "t1", "agent_id": "a1"}), 1.0)
    view.feed(msg("view/tasks/released", "a1", {"task_id": "t1", "attempt": 1}), 2.0)
    assert view.tasks["t1"].state == "released"
    view.feed(
        msg("view/tasks/assigned", "a2", {"task_id": "t1", "agent_id": "a2", "attempt": 2}), 3.0
    )
    assert (view.tasks["t1"].state, view.tasks["t1"].agent) == ("claimed", "a2")


def test_only_the_latest_tasks_are_kept_and_strangers_progress_is_ignored() -> None:
    view = SwarmView(Topics("view"), max_tasks=2)
    view.feed(msg("view/tasks/progress", "a1", {"task_id": "old", "state": "running"}), 0.5)
    assert "old" not in view.tasks  # a task we never saw start
    for n in range(3):
        view.feed(msg("view/tasks/new", None, {"task_id": f"t{n}", "type": "testing.run"}), 1.0)
    assert list(view.tasks) == ["t1", "t2"]
    view.feed(Message(mqtt5.PublishPacket("view/tasks/new", payload=b"not json")), 1.0)
    assert view.messages == 4  # what is not an envelope is not counted


def test_shutdown_marks_the_agent_offline() -> None:
    view = SwarmView(Topics("view"))
    view.feed(msg("view/agents/register", "a1", {"agent_id": "a1", "role": "testing"}), 1.0)
    assert (view.agents["a1"].status, view.agents["a1"].last_seen) == ("online", 1.0)
    view.feed(msg("view/agents/shutdown", "a1", {"agent_id": "a1"}), 2.0)
    assert (view.agents["a1"].status, view.agents["a1"].running) == ("offline", 0)


def test_errors_reported_by_the_swarm_are_shown() -> None:
    view = SwarmView(Topics("view"), claim_store="redis://h:6379/0")
    report = {
        "error": "task t1 attempt 1 was held by two agents (a1 and b1); the broker does not "
        "deliver one order to all agents, e.g. a cluster or a bridge: configure a claim store",
        "kind": "divergence",
        "incident": "second_holder",
        "task_id": "t1",
        "reported_by": "a1",
    }
    view.feed(msg("view/errors", "a1", report), 1.0)
    view.feed(msg("view/errors", "a1", {"error": "not JSON", "topic": "view/tasks/new"}), 1.0)
    assert view.divergences == 1
    console = Console(width=400, record=True)
    console.print(view.render(2.0))
    text = console.export_text()
    assert "a1: task t1 attempt 1 was held by two agents" in text
    assert "configure a claim store" in text
    assert "a1: not JSON" in text
    assert "1 report(s) that tasks ran twice" in text
    assert "claim store redis://h:6379/0" in text
