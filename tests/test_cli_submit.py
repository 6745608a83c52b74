"""``sheri submit``'s logic: the task it publishes (by the agents' own rules), its
progress lines, why ``--wait`` gave up (the command itself: tests/test_cli.py)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from sheri_trio.cli import UsageError
from sheri_trio.cli._submit import no_claim, progress_line, task_body
from sheri_trio.swarm import PeerTable, PresenceKind, parse_task


def body(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "task_type": "testing.run",
        "payload": "{}",
        "priority": "medium",
        "task_id": None,
        "assigned_to": None,
        "max_retries": None,
        "timeout": None,
    }
    return task_body(**{**args, **overrides})


def test_the_task_has_a_generated_id_and_only_the_arguments_given() -> None:
    plain = body()
    assert re.fullmatch(r"task-[0-9a-f]{12}", plain["task_id"])
    assert plain == {"task_id": plain["task_id"], "type": "testing.run", "payload": {},
                     "priority": "medium"}  # fmt: skip
    full = body(payload='{"a": 1}', priority="high", task_id="t-1", assigned_to="agent-2",
                max_retries=0, timeout=2.5)  # fmt: skip
    assert full == {"task_id": "t-1", "type": "testing.run", "payload": {"a": 1},
                    "priority": "high", "assigned_to": "agent-2", "max_retries": 0,
                    "timeout_s": 2.5}  # fmt: skip
    spec = parse_task(full)  # what the agents will read
    assert (spec.task_id, spec.assigned_to, spec.max_retries, spec.timeout_s) == (
        "t-1",
        "agent-2",
        0,
        2.5,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"payload": "{not json"}, "--payload: not valid JSON (Expecting property name enclosed in double quotes at column 2): {not json"),  # noqa: E501
        ({"payload": "[1]"}, "--payload: must be a JSON object such as '{\"service\": \"api\"}', got [1]"),  # noqa: E501
        ({"task_type": "a b"}, "TYPE: must be a task type such as 'testing.run', got 'a b'"),
        ({"task_id": "a/b"}, "--task-id: 'a/b' is not allowed: use 1-128 of letters, digits, '.', '_', '-'"),  # noqa: E501
        ({"assigned_to": "a b"}, "--assigned-to: must be an agent id, got 'a b'"),
        ({"max_retries": 101}, "--max-retries: must be an integer within 0..100, got 101"),
        ({"timeout": 0.0}, "--timeout: must be a number of seconds within (0, 86400], got 0.0"),
    ],
)  # fmt: skip
def test_a_bad_argument_is_named(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as info:
        body(**overrides)
    assert str(info.value) == message


def test_progress_lines() -> None:
    assert progress_line({"state": "running", "try": 1}) == "progress: running, try 1"
    line = progress_line({"state": "retrying", "message": "again", "error": "boom", "delay": 2})
    assert line == "progress: retrying, again, error=boom, delay=2"


def test_no_claim_names_the_online_agents_that_may_take_it() -> None:
    peers = PeerTable("cli")
    peers.observe("t1", PresenceKind.STATUS, 0, role="testing", online=True)
    peers.observe("t2", PresenceKind.STATUS, 0, role="testing", online=False)
    peers.observe("d1", PresenceKind.STATUS, 0, role="deployment", online=True)
    roles = ("testing",)
    assert no_claim("x", 0.5, roles, None, peers, "") == (
        "no agent claimed task x within 0.5 s; online agents with role testing: t1"
    )
    assert no_claim("x", 2, roles, "t2", peers, "t1 released it") == (
        "no agent claimed task x after t1 released it within 2 s; online agents with role "
        "testing: t1; the task is assigned to t2, which is not online"
    )
    assert no_claim("x", 2, ("review", "general"), "t1", peers, "").endswith(
        "online agents with role review or general: none; the task is assigned to t1, "
        "which is online"
    )


async def test_wait_shows_the_swarm_s_divergence_reports_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A report on {swarm}/errors that the broker keeps no single order (issue 11) is
    shown while --wait follows the task; other error reports are not its business."""
    import trio

    from sheri_trio.cli._submit import _follow
    from sheri_trio.swarm import Topics, encode
    from sheri_trio.testing import MemoryBus

    topics = Topics("s")
    bus = MemoryBus()
    task = body(task_id="t1")
    divergence = {
        "error": "task t0 attempt 1 has two final outcomes (from a and b): it ran twice; "
        "the broker does not deliver one order to all agents, e.g. a cluster or a bridge: "
        "configure a claim store",
        "kind": "divergence",
        "task_id": "t0",
        "reported_by": "a",
    }
    with trio.fail_after(5):
        async with bus.connect("cli") as cli, bus.connect("a") as agent:
            async with cli.subscribe(
                topics.tasks_assigned, topics.tasks_complete, topics.errors, qos=1
            ) as messages:
                for topic, payload in (
                    (topics.errors, {"error": "bad JSON", "topic": "s/tasks/new", "size": 3}),
                    (topics.tasks_assigned, {"task_id": "t1", "agent_id": "a", "attempt": 1}),
                    (topics.errors, divergence),
                    (topics.errors, divergence),  # shown once
                    (topics.tasks_complete, {"task_id": "t1", "agent_id": "a", "attempt": 1}),
                ):
                    await agent.publish(topic, encode("a", "testing", payload), qos=1)
                assert await _follow(messages, topics, task, 5.0) == 0
    out = capsys.readouterr().out
    assert out.count("swarm error (reported by a): task t0 attempt 1 has two final") == 1
    assert "bad JSON" not in out
    assert "configure a claim store" in out
