"""``sheri submit``: publish a task; with ``--wait``, follow it to its outcome."""

from __future__ import annotations

import json
import math
import re
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import trio
from cyclopts import Parameter

from ..stores import StoreUnavailable
from ..swarm import (
    BadMessage,
    ClaimBook,
    ClaimVerdict,
    PeerTable,
    PresenceKind,
    Topics,
    encode,
    parse_claim,
    parse_outcome,
    parse_task,
    roles_for,
)
from ._broker import BROKER_DEFAULTS, STORE_DEFAULTS, BrokerArgs, StoreArgs, decode
from ._errors import NoAnswer, NotDelivered, UsageError
from ._output import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, say, short

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..mqtt import Client, Message, Subscription
    from ..stores import ClaimStore

Priority = Literal["low", "medium", "high"]

#: a key of a ``tasks/new`` payload -> the argument of ``sheri submit`` that sets it
_ARGUMENTS = {
    "type": "TYPE",
    "task_id": "--task-id",
    "priority": "--priority",
    "assigned_to": "--assigned-to",
    "max_retries": "--max-retries",
    "timeout_s": "--timeout",
}
_REASON_KEY = re.compile(r"'(\w+)' ")

#: the PUBACK reason code of a publish no subscription matched
NO_MATCHING_SUBSCRIBERS: Final = 0x10


def task_body(
    task_type: str,
    payload: str,
    priority: str,
    task_id: str | None,
    assigned_to: str | None,
    max_retries: int | None,
    timeout: float | None,
) -> dict[str, Any]:
    """The ``tasks/new`` payload of the command's arguments, checked by the agents' own
    rules (:func:`sheri_trio.swarm.parse_task`); a mistake names its argument."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"--payload: not valid JSON ({exc.msg} at column {exc.colno}): {short(payload, 80)}"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(
            f'--payload: must be a JSON object such as \'{{"service": "api"}}\', '
            f"got {short(payload, 80)}"
        )
    body: dict[str, Any] = {
        "task_id": f"task-{uuid.uuid4().hex[:12]}" if task_id is None else task_id,
        "type": task_type,
        "payload": data,
        "priority": priority,
    }
    for key, value in (
        ("assigned_to", assigned_to),
        ("max_retries", max_retries),
        ("timeout_s", timeout),
    ):
        if value is not None:
            body[key] = value
    try:
        parse_task(body)
    except BadMessage as exc:
        found = _REASON_KEY.match(exc.reason)
        if found is None or found[1] not in _ARGUMENTS:
            raise UsageError(f"task: {exc.reason}") from None
        key = found[1]
        reason = exc.reason[found.end() :]
        if key != "task_id":  # its reason shows the value already
            reason += f", got {short(repr(body[key]), 80)}"
        raise UsageError(f"{_ARGUMENTS[key]}: {reason}") from None
    return body


async def submit_cmd(
    task_type: Annotated[str, Parameter(help="Task type, e.g. testing.run, deployment.deploy.")],
    /,
    *,
    payload: Annotated[str, Parameter(help="The task's payload, a JSON object.")] = "{}",
    priority: Priority = "medium",
    task_id: Annotated[str | None, Parameter(help="Default: task-<12 hex>.")] = None,
    assigned_to: Annotated[str | None, Parameter(help="Only this agent may take it.")] = None,
    max_retries: Annotated[int | None, Parameter(help="Retries after a failed try.")] = None,
    task_timeout: Annotated[
        float | None, Parameter(name="--timeout", help="Seconds allowed per try.")
    ] = None,
    wait: Annotated[bool, Parameter(help="Follow the task to its outcome.")] = False,
    wait_timeout: Annotated[float, Parameter(help="Seconds to wait for an agent's claim.")] = 10.0,
    where: BrokerArgs = BROKER_DEFAULTS,
    store: StoreArgs = STORE_DEFAULTS,
) -> int:
    """Publish a task on {swarm}/tasks/new; print its id (or, with --wait, its course).

    With --wait: exit 0 when it succeeds, 1 when it fails, 2 when no agent claims it
    within --wait-timeout. With a claim store, --wait opens it first and accepts only
    the outcome the store accepted.
    """
    body = task_body(task_type, payload, priority, task_id, assigned_to, max_retries, task_timeout)
    if not (wait_timeout > 0 and math.isfinite(wait_timeout)):
        raise UsageError(
            f"--wait-timeout: must be a positive number of seconds, got {wait_timeout:g}"
        )
    link = where.link(store)
    topics = link.topics
    data = encode(None, None, body)
    bound = link.bound
    async with link.client("submit") as client:
        if not wait:
            with trio.move_on_after(bound) as scope:
                code = await client.publish(
                    topics.tasks_new, data, qos=1, content_type="application/json"
                )
            if scope.cancelled_caught:
                raise NoAnswer(bound, f"publishing task {body['task_id']} (waiting for its PUBACK)")
            if code == NO_MATCHING_SUBSCRIBERS:
                raise NotDelivered(body["task_id"], topics.tasks_new, topics.swarm)
            say(body["task_id"])
            return EXIT_OK
        async with link.claim_store() as claims:
            return await _submit_and_follow(client, topics, body, data, wait_timeout, bound, claims)


async def _submit_and_follow(
    client: Client,
    topics: Topics,
    body: dict[str, Any],
    data: bytes,
    wait_timeout: float,
    bound: float,
    claims: ClaimStore | None = None,
) -> int:
    """Subscribe, publish (each answer of the broker within ``bound``), then follow."""
    waiting_for = "subscribing to the task's topics (waiting for the SUBACK)"
    with trio.move_on_after(bound) as answer:  # lifted once the task is out
        async with client.subscribe(
            topics.tasks_assigned,
            topics.tasks_progress,
            topics.tasks_complete,
            topics.tasks_failed,
            topics.tasks_released,
            topics.agents_status_all,
            topics.errors,
            qos=1,
        ) as messages:
            waiting_for = f"publishing task {body['task_id']} (waiting for its PUBACK)"
            code = await client.publish(
                topics.tasks_new, data, qos=1, content_type="application/json"
            )
            if code == NO_MATCHING_SUBSCRIBERS:
                raise NotDelivered(body["task_id"], topics.tasks_new, topics.swarm)
            answer.deadline = math.inf
            return await _follow(messages, topics, body, wait_timeout, claims)
    raise NoAnswer(bound, waiting_for)


async def _stored_elsewhere(
    claims: ClaimStore | None, task_id: str, attempt: int, agent: str
) -> str:
    """Why the claim store did not accept this outcome ("": it did, or there is no store)."""
    if claims is None:
        return ""
    try:
        stored = await claims.outcome(task_id)
    except StoreUnavailable as exc:
        say(f"the claim store did not answer ({exc}): the outcome is not confirmed")
        return ""
    if stored is None or (stored.attempt, stored.holder) == (attempt, agent):
        return ""
    return f"the claim store accepted attempt {stored.attempt} by {stored.holder}"


async def _follow(
    messages: Subscription,
    topics: Topics,
    body: dict[str, Any],
    wait_timeout: float,
    claims: ClaimStore | None = None,
) -> int:
    task_id: str = body["task_id"]
    roles = roles_for(body["type"])
    peers = PeerTable("cli")  # from the retained statuses (the CLI is not among them)
    book = ClaimBook()
    holder: tuple[str, int] | None = None  # (agent id, attempt) of the latest winning claim
    waiting_since = ""  # why we wait for a claim: "" (first claim) or what happened
    reported: set[str] = set()  # the swarm's divergence reports shown (once each)
    say(f"submitted {task_id} ({body['type']}, priority {body['priority']}) to {topics.swarm}")
    deadline = trio.current_time() + wait_timeout
    while True:
        message: Message | None = None
        with trio.move_on_at(deadline if holder is None else math.inf):
            message = await messages.receive()
        if message is None:
            say(
                no_claim(
                    task_id, wait_timeout, roles, body.get("assigned_to"), peers, waiting_since
                )
            )
            return EXIT_USAGE
        env = decode(message)
        if env is None:
            continue
        p = env.payload
        topic = message.topic
        if topic == topics.errors:
            error = p.get("error")
            if p.get("kind") == "divergence" and isinstance(error, str) and error not in reported:
                reported.add(error)  # about this task or another: the swarm is affected
                say(f"swarm error (reported by {p.get('reported_by', '?')}): {short(error, 600)}")
            continue
        status_of = topics.status_agent_id(topic)
        if status_of is not None:
            role = p.get("role", env.role)
            online = p.get("status") == "online"
            peers.observe(
                status_of,
                PresenceKind.STATUS,
                trio.current_time(),
                role=role if isinstance(role, str) else None,
                online=online,
            )
            if holder is not None and holder[0] == status_of and not online:
                say(f"holder {status_of} went offline; waiting for another agent to take over")
                waiting_since = f"{status_of} went offline"
                holder = None
                deadline = trio.current_time() + wait_timeout
            continue
        if p.get("task_id") != task_id:
            continue
        try:
            if topic == topics.tasks_assigned:
                claim = parse_claim(env)
                if book.observe_claim(claim, trio.current_time()) is ClaimVerdict.WON:
                    holder = (claim.agent_id, claim.attempt)
                    say(
                        f"claimed by {claim.agent_id} ({claim.role or '?'}), "
                        f"attempt {claim.attempt}"
                    )
            elif topic == topics.tasks_released:
                claim = parse_claim(env)
                if book.release(task_id, claim.attempt):
                    say(f"released by {claim.agent_id} (attempt {claim.attempt})")
                    waiting_since = f"{claim.agent_id} released it"
                    holder = None
                    deadline = trio.current_time() + wait_timeout
            elif topic == topics.tasks_progress:
                attempt = p.get("attempt", 1)
                if holder is not None and attempt == holder[1]:
                    say(progress_line(p))
            else:
                outcome = parse_outcome(env, success=topic == topics.tasks_complete)
                refused = await _stored_elsewhere(
                    claims, task_id, outcome.attempt, outcome.agent_id or ""
                )
                if refused:
                    say(f"ignored an outcome of attempt {outcome.attempt}: {refused}")
                    continue
                if not book.observe_outcome(outcome):
                    continue  # a stale attempt's outcome: fenced off
                if outcome.success:
                    say(
                        f"complete: success by {outcome.agent_id}, attempt {outcome.attempt}, "
                        f"{p.get('duration', '?')} ms"
                    )
                    say(f"result: {short(p.get('result'), 4000)}")
                    return EXIT_OK
                say(
                    f"failed: {p.get('error', '?')} (reason {p.get('reason', '?')}) "
                    f"by {outcome.agent_id or '?'}, attempt {outcome.attempt}"
                )
                return EXIT_FAILURE
        except BadMessage:
            continue


def progress_line(p: dict[str, Any]) -> str:
    """One ``tasks/progress`` payload as ``progress: running, try 1, ...``."""
    state = p.get("state", "?")
    parts = [f"progress: {state}"]
    if "try" in p:
        parts.append(f"try {p['try']}")
    if p.get("message"):
        parts.append(str(p["message"]))
    for key in ("error", "delay"):
        if key in p:
            parts.append(f"{key}={p[key]}")
    return ", ".join(parts)


def no_claim(
    task_id: str,
    wait_timeout: float,
    roles: Sequence[str],
    assigned_to: str | None,
    peers: PeerTable,
    why: str,
) -> str:
    """Why ``--wait`` gave up: which agents that may take the task are online."""
    after = f" after {why}" if why else ""
    online = sorted(a for a in peers.online_ids() if peers[a].role in roles)
    text = (
        f"no agent claimed task {task_id}{after} within {wait_timeout:g} s; "
        f"online agents with role {' or '.join(roles)}: {', '.join(online) or 'none'}"
    )
    if assigned_to is not None:
        peer = peers.get(assigned_to)
        state = "online" if peer is not None and peer.online else "not online"
        text += f"; the task is assigned to {assigned_to}, which is {state}"
    return text
