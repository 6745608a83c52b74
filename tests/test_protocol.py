"""The wire protocol: envelopes, submissions, claims and outcomes, from untrusted bytes."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sheri_trio.swarm._messages import encode
from sheri_trio.swarm._protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    BadMessage,
    Claim,
    Envelope,
    Outcome,
    TaskSpec,
    Topics,
    decode_envelope,
    parse_cancel,
    parse_claim,
    parse_outcome,
    parse_task,
)

#: what the prototype's test script publishes with mosquitto_pub (no agent_id, no role, no v)
SEED = (
    b'{"id": "msg_test_deploy", "timestamp": "2026-02-22T20:00:00Z", '
    b'"payload": {"task_id": "task_deploy_test", "type": "deployment.deploy", '
    b'"priority": "high", "payload": {"service": "test-service", "version": "1.0.0"}}}'
)


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def env(payload: dict[str, Any], **fields: Any) -> Envelope:
    return decode_envelope(raw({"id": "m", "timestamp": "2026-01-01T00:00:00Z", **fields,
                                "payload": payload}))  # fmt: skip


# ------------------------------------------------------------------ envelope
def test_seed_message_from_mosquitto_pub() -> None:
    e = decode_envelope(SEED)
    assert e == Envelope(
        id="msg_test_deploy",
        timestamp="2026-02-22T20:00:00Z",
        payload={
            "task_id": "task_deploy_test",
            "type": "deployment.deploy",
            "priority": "high",
            "payload": {"service": "test-service", "version": "1.0.0"},
        },
        agent_id=None,
        role=None,
        version=0,
    )
    spec = parse_task(e.payload)
    assert spec == TaskSpec(
        task_id="task_deploy_test",
        type="deployment.deploy",
        payload={"service": "test-service", "version": "1.0.0"},
        priority="high",
    )
    assert (spec.assigned_to, spec.max_retries, spec.timeout_s, spec.expires_at) == (
        None,
        3,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("agent_id", "role", "payload"),
    [
        ("sheri-ml-1a2b3c4d", "testing", {"task_id": "t1", "attempt": 2}),
        ("a", "general", {}),
        ("A.b_c-9" * 18, "database", {"nested": {"list": [1, 2.5, None, True, "ü"]}}),
        (None, None, {"task_id": "t1", "type": "testing.run"}),
    ],
)
def test_envelope_round_trip(agent_id: str | None, role: str | None, payload: Any) -> None:
    data = encode(agent_id, role, payload)
    obj = json.loads(data)
    assert ("agent_id" in obj) == (agent_id is not None)
    e = decode_envelope(data)
    assert (e.agent_id, e.role, e.payload, e.version) == (agent_id, role, payload, PROTOCOL_VERSION)
    uuid.UUID(e.id)
    assert e.timestamp.endswith("Z")
    datetime.fromisoformat(e.timestamp.replace("Z", "+00:00"))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"id": 7}, {"id": "7"}),
        ({"id": "msg_001", "v": 0}, {"id": "msg_001", "version": 0}),
        ({"v": 3, "role": "anything"}, {"version": 3, "role": "anything"}),
        ({}, {"id": "", "timestamp": "", "version": 0}),
        ({"agent_id": None, "role": None}, {"agent_id": None, "role": None}),
        ({"unknown": [1, 2]}, {}),
    ],
)
def test_envelope_accepts(extra: dict[str, Any], expected: dict[str, Any]) -> None:
    e = decode_envelope(raw({**extra, "payload": {"x": 1}}))
    for key, value in expected.items():
        assert getattr(e, key) == value
    assert e.payload == {"x": 1}


@pytest.mark.parametrize(
    ("data", "reason", "task_id"),
    [
        (b"", "not valid JSON", None),
        (b"{", "not valid JSON", None),
        (b"\xff\xfe{}", "not UTF-8", None),
        (b'{"payload": {"task_id": "\xc3\x28"}}', "not UTF-8", None),
        (b"[]", "JSON object, not list", None),
        (b'"text"', "JSON object, not str", None),
        (b"null", "JSON object, not NoneType", None),
        (b"42", "JSON object, not int", None),
        # too deep: json.loads raises RecursionError
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON", None),
        (b"{}", "no 'payload' object", None),
        (b'{"payload": []}', "no 'payload' object", None),
        (b'{"payload": "x"}', "no 'payload' object", None),
        (b'{"payload": null}', "no 'payload' object", None),
        (b'{"task_id": "t-top"}', "no 'payload' object", "t-top"),
        (b'{"task_id": "../etc"}', "no 'payload' object", None),
        (b'{"id": true, "payload": {"task_id": "t1"}}', "'id'", "t1"),
        (b'{"id": [1], "payload": {}}', "'id'", None),
        (b'{"id": 1.5, "payload": {}}', "'id'", None),
        (b'{"timestamp": 5, "payload": {"task_id": "t1"}}', "'timestamp'", "t1"),
        (b'{"agent_id": "a/b", "payload": {}}', "'agent_id'", None),
        (b'{"agent_id": "", "payload": {}}', "'agent_id'", None),
        (b'{"agent_id": 5, "payload": {}}', "'agent_id'", None),
        (b'{"agent_id": "' + b"a" * 129 + b'", "payload": {}}', "'agent_id'", None),
        (b'{"role": 1, "payload": {}}', "'role'", None),
        (b'{"v": -1, "payload": {}}', "'v'", None),
        (b'{"v": true, "payload": {}}', "'v'", None),
        (b'{"v": "1", "payload": {}}', "'v'", None),
        (b'{"v": 1.0, "payload": {"payload": {"task_id": "inner"}}}', "'v'", "inner"),
    ],
)
def test_envelope_refusals(data: bytes, reason: str, task_id: str | None) -> None:
    with pytest.raises(BadMessage) as info:
        decode_envelope(data)
    assert reason in info.value.reason
    assert str(info.value) == info.value.reason
    assert info.value.task_id == task_id


def test_envelope_size_limit() -> None:
    body = raw({"payload": {"blob": "x" * 100}})
    assert decode_envelope(body, max_bytes=len(body)).payload["blob"] == "x" * 100
    with pytest.raises(BadMessage, match=f"of {len(body)} bytes exceeds the limit of 100"):
        decode_envelope(body, max_bytes=100)
    big = raw({"payload": {"blob": "x" * MAX_MESSAGE_BYTES}})
    with pytest.raises(BadMessage, match="exceeds the limit"):
        decode_envelope(big)


def test_envelope_refuses_a_huge_integer_as_bad_message() -> None:
    with pytest.raises(BadMessage):
        decode_envelope(b'{"payload": {"n": ' + b"1" * 5000 + b"}}")


# ---------------------------------------------------------------- submissions
UTC_2030 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    "spec",
    [
        TaskSpec("t1", "testing.run", {}),
        TaskSpec("T.1_a-b", "custom.kind", [1, "two"], priority="low"),
        TaskSpec("x" * 128, "x" * 64, None, priority="high", assigned_to="agent-7"),
        TaskSpec("t2", "deployment.deploy", {"v": 1}, max_retries=0, timeout_s=0.5),
        TaskSpec("t3", "a", "text", max_retries=100, timeout_s=86400.0, expires_at=UTC_2030),
        TaskSpec("t3.retry-1", "testing.run", {}, retry_of="t3"),
    ],
)
def test_task_round_trip(spec: TaskSpec) -> None:
    wire = spec.to_wire()
    assert parse_task(json.loads(json.dumps(wire))) == spec


@pytest.mark.parametrize(
    ("fields", "attr", "expected"),
    [
        ({}, "payload", {}),
        ({"priority": None}, "priority", "medium"),
        ({"timeout_s": 5}, "timeout_s", 5.0),
        ({"max_retries": 0}, "max_retries", 0),
        ({"expires_at": "2030-01-02T03:04:05Z"}, "expires_at", UTC_2030),
        ({"expires_at": "2030-01-02T03:04:05z"}, "expires_at", UTC_2030),
        ({"expires_at": "2030-01-02T03:04:05"}, "expires_at", UTC_2030),
        (
            {"expires_at": "2030-01-02T05:04:05+02:00"},
            "expires_at",
            datetime(2030, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2))),
        ),
        ({"unknown": 1}, "extra", {}),
    ],
)
def test_task_field_defaults_and_forms(fields: dict[str, Any], attr: str, expected: Any) -> None:
    spec = parse_task({"task_id": "t1", "type": "testing.run", **fields})
    assert getattr(spec, attr) == expected


def test_task_default_max_retries_comes_from_the_caller() -> None:
    spec = parse_task({"task_id": "t1", "type": "x"}, default_max_retries=7)
    assert spec.max_retries == 7


@pytest.mark.parametrize(
    ("fields", "reason", "task_id"),
    [
        ({"task_id": None}, "'task_id' must be a string", None),
        ({"task_id": 5}, "'task_id' must be a string", None),
        ({"task_id": ""}, "not allowed", None),
        ({"task_id": "../etc"}, "not allowed", None),
        ({"task_id": "a/b"}, "not allowed", None),
        ({"task_id": "a+b"}, "not allowed", None),
        ({"task_id": "a b"}, "not allowed", None),
        ({"task_id": "x" * 129}, "not allowed", None),
        ({"task_id": "x" * 500}, "not allowed", None),
        ({"type": None}, "'type'", "t1"),
        ({"type": 5}, "'type'", "t1"),
        ({"type": ""}, "'type'", "t1"),
        ({"type": "a/b"}, "'type'", "t1"),
        ({"type": "x" * 65}, "'type'", "t1"),
        ({"priority": 5}, "'priority'", "t1"),
        ({"priority": "urgent"}, "'priority'", "t1"),
        ({"priority": "HIGH"}, "'priority'", "t1"),
        ({"priority": True}, "'priority'", "t1"),
        ({"assigned_to": 5}, "'assigned_to'", "t1"),
        ({"assigned_to": "a/b"}, "'assigned_to'", "t1"),
        ({"assigned_to": ""}, "'assigned_to'", "t1"),
        ({"max_retries": -1}, "'max_retries'", "t1"),
        ({"max_retries": 101}, "'max_retries'", "t1"),
        ({"max_retries": "3"}, "'max_retries'", "t1"),
        ({"max_retries": True}, "'max_retries'", "t1"),
        ({"max_retries": 1.0}, "'max_retries'", "t1"),
        ({"timeout_s": 0}, "'timeout_s'", "t1"),
        ({"timeout_s": -1}, "'timeout_s'", "t1"),
        ({"timeout_s": 86401}, "'timeout_s'", "t1"),
        ({"timeout_s": "5"}, "'timeout_s'", "t1"),
        ({"timeout_s": True}, "'timeout_s'", "t1"),
        ({"timeout_s": float("nan")}, "'timeout_s'", "t1"),
        ({"timeout_s": float("inf")}, "'timeout_s'", "t1"),
        ({"expires_at": 5}, "'expires_at'", "t1"),
        ({"expires_at": "soon"}, "'expires_at'", "t1"),
        ({"expires_at": ""}, "'expires_at'", "t1"),
        ({"retry_of": 5}, "'retry_of'", "t1"),
        ({"retry_of": "../t"}, "'retry_of'", "t1"),
    ],
)
def test_task_refusals(fields: dict[str, Any], reason: str, task_id: str | None) -> None:
    payload = {"task_id": "t1", "type": "testing.run", **fields}
    with pytest.raises(BadMessage) as info:
        parse_task(payload)
    assert reason in info.value.reason
    assert info.value.task_id == task_id


def test_a_refused_task_id_is_shown_shortened() -> None:
    with pytest.raises(BadMessage) as info:
        parse_task({"task_id": "y" * 500, "type": "x"})
    assert "y" * 40 + "..." in info.value.reason
    assert "y" * 41 not in info.value.reason


@pytest.mark.parametrize("priority", [[], ["high"], {}, {"a": 1}])
def test_task_refuses_an_unhashable_priority_as_bad_message(priority: Any) -> None:
    with pytest.raises(BadMessage) as info:
        parse_task({"task_id": "t1", "type": "x", "priority": priority})
    assert info.value.task_id == "t1"


# --------------------------------------------------------- claims and outcomes
@pytest.mark.parametrize(
    ("payload", "envelope", "expected"),
    [
        (
            {"task_id": "t1", "agent_id": "a1", "role": "testing", "attempt": 3},
            {},
            Claim("t1", "a1", 3, "testing"),
        ),
        ({"task_id": "t1"}, {"agent_id": "a2", "role": "review"}, Claim("t1", "a2", 1, "review")),
        ({"task_id": "t1", "agent_id": "a3", "role": 7}, {}, Claim("t1", "a3", 1, None)),
        (
            {"task_id": "t1", "agent_id": "p", "attempt": 1},
            {"agent_id": "e"},
            Claim("t1", "p", 1, None),
        ),
    ],
)
def test_claim_parsing(payload: dict[str, Any], envelope: dict[str, Any], expected: Claim) -> None:
    assert parse_claim(env(payload, **envelope)) == expected


def test_claim_round_trip_from_encode() -> None:
    data = encode("a1", "testing", {"task_id": "t1", "agent_id": "a1", "attempt": 2})
    assert parse_claim(decode_envelope(data)) == Claim("t1", "a1", 2, "testing")


@pytest.mark.parametrize(
    ("payload", "reason", "task_id"),
    [
        ({}, "'task_id'", None),
        ({"task_id": "../x", "agent_id": "a"}, "not allowed", None),
        ({"task_id": "t1"}, "valid 'agent_id'", "t1"),
        ({"task_id": "t1", "agent_id": "a/b"}, "valid 'agent_id'", "t1"),
        ({"task_id": "t1", "agent_id": 5}, "valid 'agent_id'", "t1"),
        ({"task_id": "t1", "agent_id": "a", "attempt": 0}, "'attempt'", "t1"),
        ({"task_id": "t1", "agent_id": "a", "attempt": -2}, "'attempt'", "t1"),
        ({"task_id": "t1", "agent_id": "a", "attempt": "2"}, "'attempt'", "t1"),
        ({"task_id": "t1", "agent_id": "a", "attempt": True}, "'attempt'", "t1"),
        ({"task_id": "t1", "agent_id": "a", "attempt": 1.0}, "'attempt'", "t1"),
        ({"task_id": "t1", "agent_id": "a", "attempt": None}, "'attempt'", "t1"),
    ],
)
def test_claim_refusals(payload: dict[str, Any], reason: str, task_id: str | None) -> None:
    with pytest.raises(BadMessage) as info:
        parse_claim(env(payload))
    assert reason in info.value.reason
    assert info.value.task_id == task_id


@pytest.mark.parametrize("success", [True, False])
@pytest.mark.parametrize(
    ("payload", "envelope", "agent_id", "attempt"),
    [
        ({"task_id": "t1", "agent_id": "a1", "attempt": 2}, {}, "a1", 2),
        ({"task_id": "t1"}, {"agent_id": "a2"}, "a2", 1),
        ({"task_id": "t1"}, {}, None, 1),
        ({"task_id": "t1", "agent_id": 5}, {}, None, 1),
    ],
)
def test_outcome_parsing(
    success: bool,
    payload: dict[str, Any],
    envelope: dict[str, Any],
    agent_id: str | None,
    attempt: int,
) -> None:
    outcome = parse_outcome(env(payload, **envelope), success=success)
    assert outcome == Outcome("t1", agent_id, attempt, success, payload)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({}, "'task_id'"),
        ({"task_id": "a b"}, "not allowed"),
        ({"task_id": "t1", "attempt": 0}, "'attempt'"),
        ({"task_id": "t1", "attempt": False}, "'attempt'"),
        ({"task_id": "t1", "attempt": "1"}, "'attempt'"),
    ],
)
def test_outcome_refusals(payload: dict[str, Any], reason: str) -> None:
    with pytest.raises(BadMessage, match=reason):
        parse_outcome(env(payload), success=True)


# --------------------------------------------------------------------- topics
def test_topics() -> None:
    t = Topics("org/team")
    assert t.tasks_new == "org/team/tasks/new"
    assert t.task_state("t1") == "org/team/tasks/state/t1"
    assert t.task_pending("t1") == "org/team/tasks/pending/t1"
    assert t.agent_status("a1") == "org/team/agents/a1/status"
    assert t.status_agent_id("org/team/agents/a1/status") == "a1"
    assert t.status_agent_id("org/team/agents/a/b/status") is None
    assert t.status_agent_id("other/agents/a1/status") is None
    assert t.sync_marker("a1", "ff00") == "org/team/agents/a1/sync/ff00"
    assert t.agent_inbox("a1") == "org/team/agents/a1/inbox"
    assert t.status_agent_id("org/team/agents/a1/inbox") is None
    assert t.dispatch_status == "org/team/dispatch/status"


@pytest.mark.parametrize("swarm", ["", "a/b/c/d/e", "a//b", "a/+", "#", "a b", "/a", "x" * 65])
def test_invalid_swarm_names(swarm: str) -> None:
    with pytest.raises(ValueError, match="invalid swarm name"):
        Topics(swarm)


# ----------------------------------------------------------------- hypothesis
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
task_ids = st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True) | st.text(max_size=140)


def mostly(valid: st.SearchStrategy[Any], junk: st.SearchStrategy[Any]) -> Any:
    """``valid`` four times in five, else ``junk``: deep fields still get checked."""
    return st.integers(0, 4).flatmap(lambda i: valid if i else junk)


def _task_like(values: st.SearchStrategy[Any], priorities: st.SearchStrategy[Any]) -> Any:
    """Submissions that are mostly valid, with any field possibly replaced by junk."""
    valid_ids = st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True)

    return st.fixed_dictionaries(
        {
            "task_id": mostly(valid_ids, task_ids | values),
            "type": mostly(st.sampled_from(["testing.run", "x"]), st.just("a/b") | values),
        },
        optional={
            "priority": mostly(st.sampled_from(["low", "medium", "high", None]), priorities),
            "assigned_to": mostly(valid_ids, task_ids | values),
            "max_retries": mostly(st.integers(0, 100), st.integers(-5, 105) | values),
            "timeout_s": mostly(st.floats(0.001, 86400), st.floats(-1, 90000) | values),
            "expires_at": mostly(
                st.datetimes().map(datetime.isoformat), st.text(max_size=30) | values
            ),
            "payload": values,
        },
    )


def _envelope_like(task: Any) -> Any:
    return st.fixed_dictionaries(
        {"payload": mostly(task, json_values)},
        optional={
            "id": mostly(st.text(max_size=10) | st.integers(), json_values),
            "timestamp": mostly(st.text(max_size=10), json_values),
            "agent_id": mostly(st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True), json_values),
            "role": mostly(st.text(max_size=10), json_values),
            "v": mostly(st.integers(0, 3), json_values),
        },
    )


def _decode_all(data: bytes) -> None:
    """Everything an agent does with a tasks/new message, up to the task spec."""
    error: BadMessage | None = None
    try:
        parse_task(decode_envelope(data).payload)
    except BadMessage as exc:
        error = exc
    if error is not None:
        assert error.reason
        assert error.task_id is None or isinstance(error.task_id, str)


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_bad_message(data: bytes) -> None:
    _decode_all(data)


@FAST
@given(json_values)
def test_arbitrary_json_raises_only_bad_message(value: Any) -> None:
    _decode_all(json.dumps(value).encode())


@FAST
@given(_envelope_like(_task_like(json_values, scalars)))
def test_arbitrary_task_like_json_raises_only_bad_message(value: Any) -> None:
    # Priorities are hashable scalars here: lists and objects crash parse_task (see the
    # xfail test_task_refuses_an_unhashable_priority_as_bad_message).
    _decode_all(json.dumps(value).encode())


@FAST
@given(_envelope_like(_task_like(json_values, scalars)), st.booleans())
def test_arbitrary_claims_and_outcomes_raise_only_bad_message(value: Any, success: bool) -> None:
    try:
        e = decode_envelope(json.dumps(value).encode())
    except BadMessage:
        return
    for parse in (parse_claim, lambda e: parse_outcome(e, success=success)):
        try:
            parse(e)
        except BadMessage:
            pass


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"task_id": "t1"}, ("t1", None)),  # the prototype's form
        ({"task_id": "t1", "request_id": "a1b2.c_d-e"}, ("t1", "a1b2.c_d-e")),
        ({"task_id": "t1", "request_id": None}, ("t1", None)),
    ],
)
def test_cancel_parsing(payload: dict[str, Any], expected: tuple[str, str | None]) -> None:
    request = parse_cancel(decode_envelope(encode(None, None, payload)))
    assert (request.task_id, request.request_id) == expected


@pytest.mark.parametrize(
    ("payload", "reason", "task_id"),
    [
        ({}, "'task_id'", None),
        ({"task_id": "a/b", "request_id": "r"}, "not allowed", None),
        ({"task_id": "t1", "request_id": 5}, "'request_id'", "t1"),
        ({"task_id": "t1", "request_id": ""}, "'request_id'", "t1"),
        ({"task_id": "t1", "request_id": "r/1"}, "'request_id'", "t1"),
        ({"task_id": "t1", "request_id": "r" * 65}, "'request_id'", "t1"),
    ],
)
def test_cancel_refusals(payload: dict[str, Any], reason: str, task_id: str | None) -> None:
    with pytest.raises(BadMessage, match=reason) as info:
        parse_cancel(decode_envelope(encode(None, None, payload)))
    assert info.value.task_id == task_id


@FAST
@given(_envelope_like(_task_like(json_values, scalars)))
def test_arbitrary_cancels_raise_only_bad_message(value: Any) -> None:
    try:
        e = decode_envelope(json.dumps(value).encode())
    except BadMessage:
        return
    try:
        parse_cancel(e)
    except BadMessage:
        pass


@FAST
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_bad_message(text: str) -> None:
    _decode_all(text.encode("utf-8", "surrogatepass"))


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.generate],  # finding it is enough: no shrinking
)
@given(_envelope_like(_task_like(json_values, json_values)))
def test_arbitrary_task_like_json_with_any_priority_raises_only_bad_message(value: Any) -> None:
    _decode_all(json.dumps(value).encode())
