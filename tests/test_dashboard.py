"""The dashboard without a browser: its model fed messages (state out), the submit and
retry rules, the history file, /metrics, and the routes of the Starlette app (httpx2
against the ASGI app, over the in-memory bus)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

import httpx2
import orjson
import pytest
import trio

from sheri_trio.dashboard import (
    COOKIE,
    AgentRow,
    Board,
    History,
    HistoryError,
    Metrics,
    SubmitError,
    SwarmModel,
    TaskRow,
    create_app,
    retry_submission,
    submission_from_form,
)
from sheri_trio.swarm import Topics, encode
from sheri_trio.testing import MemoryBus

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

T = Topics("dash")


def msg(
    model: SwarmModel,
    topic: str,
    payload: dict[str, Any],
    now: float,
    *,
    agent: tuple[str, str] | None = None,
    retain: bool = False,
) -> None:
    agent_id, role = agent if agent is not None else (None, None)
    model.feed(topic, encode(agent_id, role, payload), retain, now)


A1 = ("tester-1", "testing")


def online(model: SwarmModel, now: float = 100.0, agent: tuple[str, str] = A1) -> None:
    msg(model, T.agent_status(agent[0]), {"status": "online"}, now, agent=agent, retain=True)
    msg(
        model,
        T.agents_register,
        {"agent_id": agent[0], "role": agent[1], "max_tasks": 4},
        now,
        agent=agent,
    )


def run_task(model: SwarmModel, task_id: str, now: float, *, success: bool = True) -> None:
    msg(model, T.tasks_new, {"task_id": task_id, "type": "testing.run", "payload": {}}, now)
    msg(model, T.tasks_assigned, {"task_id": task_id, "attempt": 1}, now + 0.1, agent=A1)
    msg(
        model,
        T.tasks_progress,
        {"task_id": task_id, "attempt": 1, "state": "running", "try": 1, "type": "testing.run"},
        now + 0.3,
        agent=A1,
    )
    if success:
        outcome = {"task_id": task_id, "attempt": 1, "type": "testing.run", "result": {"ok": 1}}
        msg(model, T.tasks_complete, {**outcome, "duration": 250}, now + 0.5, agent=A1)
    else:
        outcome = {"task_id": task_id, "attempt": 1, "type": "testing.run", "error": "boom"}
        msg(model, T.tasks_failed, {**outcome, "reason": "error"}, now + 0.5, agent=A1)


# ---------------------------------------------------------------------- the model
def test_agents_come_from_status_register_and_heartbeat() -> None:
    model = SwarmModel(T)
    online(model)
    msg(
        model,
        T.agents_heartbeat,
        {"agent_id": "tester-1", "running": ["t1"], "running_tasks": 1, "queued": 3, "capacity": 4},
        110.0,
        agent=A1,
    )
    row = model.agents["tester-1"]
    assert (row.role, row.status, row.last_seen) == ("testing", "online", 110.0)
    assert (row.running, row.queued, row.capacity, row.running_ids) == (1, 3, 4, ["t1"])
    assert model.online_by_role()["testing"] == 1
    changes = model.take_changes()
    assert changes is not None
    assert [a["agent_id"] for a in changes["agents"]] == ["tester-1"]
    assert model.take_changes() is None  # taken


def test_a_will_marks_the_agent_offline_and_raises_an_alert() -> None:
    model = SwarmModel(T)
    online(model)
    will = {"status": "offline", "reason": "connection lost"}
    msg(model, T.agent_status("tester-1"), will, 120.0, agent=A1, retain=True)
    row = model.agents["tester-1"]
    assert (row.status, row.reason, row.running) == ("offline", "connection lost", 0)
    [alert] = [a for a in model.alerts if a.kind == "agent-offline"]
    assert alert.agent_id == "tester-1"
    assert "connection lost" in alert.message


def test_a_silent_agent_is_raised_once() -> None:
    model = SwarmModel(T)
    online(model, 100.0)
    model.check(120.0)
    assert not model.alerts
    model.check(131.0)
    model.check(140.0)
    assert [a.kind for a in model.alerts] == ["agent-silent"]


def test_a_task_from_submission_to_outcome() -> None:
    model = SwarmModel(T)
    online(model)
    run_task(model, "t1", 200.0)
    task = model.tasks["t1"]
    assert (task.state, task.agent, task.role, task.attempt) == ("done", "tester-1", "testing", 1)
    assert task.submitted == 200.0
    assert task.started == pytest.approx(200.1)
    assert task.running_since == pytest.approx(200.3)
    assert task.finished == pytest.approx(200.5)
    assert (task.duration_ms, task.result) == (250, {"ok": 1})
    assert [e["state"] for e in task.events] == ["running"]
    assert task.submission is not None
    assert task.submission["type"] == "testing.run"
    assert model.outcomes == {("completed", "testing.run"): 1}
    assert model.claim_to_start == [pytest.approx(0.2)]
    series = model.rate_series(201.0, 2)
    assert series == [[200, 1, 1, 0], [201, 0, 0, 0]]


def test_failures_cancels_and_retries_are_told_apart() -> None:
    model = SwarmModel(T)
    online(model)
    run_task(model, "bad", 10.0, success=False)
    assert (model.tasks["bad"].state, model.tasks["bad"].error) == ("failed", "boom")
    msg(model, T.tasks_new, {"task_id": "c", "type": "testing.run"}, 20.0)
    msg(model, T.tasks_assigned, {"task_id": "c", "attempt": 1}, 20.1, agent=A1)
    progress = {"task_id": "c", "attempt": 1, "state": "retrying", "error": "x", "delay": 0.5}
    msg(model, T.tasks_progress, progress, 20.2, agent=A1)
    cancelled = {"task_id": "c", "attempt": 1, "reason": "cancelled", "error": "cancelled"}
    msg(model, T.tasks_failed, cancelled, 20.3, agent=A1)
    task = model.tasks["c"]
    assert (task.state, task.retries, task.reason) == ("cancelled", 1, "cancelled")
    assert model.outcomes[("cancelled", "testing.run")] == 1


def test_a_stale_attempt_is_fenced_off_and_a_takeover_counted() -> None:
    model = SwarmModel(T)
    online(model)
    msg(model, T.tasks_new, {"task_id": "t", "type": "testing.run"}, 1.0)
    msg(model, T.tasks_assigned, {"task_id": "t", "attempt": 1}, 1.1, agent=A1)
    other = ("tester-2", "testing")
    msg(model, T.tasks_assigned, {"task_id": "t", "attempt": 2}, 5.0, agent=other)
    msg(model, T.tasks_complete, {"task_id": "t", "attempt": 1}, 6.0, agent=A1)
    assert model.tasks["t"].state == "claimed"  # attempt 1's outcome is stale
    msg(model, T.tasks_complete, {"task_id": "t", "attempt": 2}, 7.0, agent=other)
    assert (model.tasks["t"].state, model.tasks["t"].agent) == ("done", "tester-2")
    assert model.takeovers == 1
    # a duplicate outcome changes nothing
    msg(model, T.tasks_failed, {"task_id": "t", "attempt": 2}, 8.0, agent=other)
    assert model.tasks["t"].state == "done"


def test_retained_states_and_dispatch_records() -> None:
    model = SwarmModel(T)
    record = {
        "task_id": "q",
        "state": "queued",
        "attempt": 1,
        "task": {"task_id": "q", "type": "database.backup"},
        "dispatcher": "d",
    }
    msg(model, T.task_state("q"), record, 1.0, retain=True)
    assert (model.tasks["q"].state, model.tasks["q"].type) == ("queued", "database.backup")
    assert model.pending_by_role()["database"] == 1
    final = {"task_id": "q", "state": "done", "attempt": 1, "type": "database.backup"}
    msg(model, T.task_state("q"), final, 2.0, agent=("db-1", "database"), retain=True)
    assert (model.tasks["q"].state, model.tasks["q"].agent) == ("done", "db-1")
    assert model.pending_by_role()["database"] == 0
    # the dispatcher's view (once per heartbeat interval) does not override the records
    view = {"agents": [], "queued_by_role": {"testing": 7, "database": 1}}
    msg(model, T.dispatch_view, view, 3.0, retain=True)
    assert model.pending_by_role()["testing"] == model.pending_by_role()["database"] == 0


def test_errors_topic_and_untrusted_input() -> None:
    model = SwarmModel(T)
    online(model)
    report = {"error": "message is not valid JSON", "topic": T.tasks_new, "reported_by": "x"}
    msg(model, T.errors, report, 1.0)
    assert model.errors == 1
    assert model.alerts[-1].kind == "error"
    for junk in (b"\xff\xfe", b"[1]", b'{"payload": 3}', b"{" * 100, b"x" * 300_000):
        model.feed(T.tasks_new, junk, False, 2.0)
    assert model.refused == 5
    bad_id = {"task_id": "../etc", "type": "testing.run"}
    msg(model, T.tasks_new, bad_id, 3.0)
    wrong_types = {"task_id": "w", "attempt": "x", "duration": "y", "type": 5}
    msg(model, T.tasks_complete, wrong_types, 3.0, agent=A1)
    assert "../etc" not in model.tasks
    assert model.tasks["w"].state == "done"
    model.feed(T.task_state("w"), b"", True, 4.0)  # a cleared retained state
    assert model.refused == 5


def test_a_task_for_a_role_nobody_has_raises_an_alert() -> None:
    model = SwarmModel(T)
    online(model)
    msg(model, T.tasks_new, {"task_id": "d", "type": "deployment.deploy"}, 1.0)
    assert [a.kind for a in model.alerts] == ["no-agent"]
    assert model.pending_by_role()["deployment"] == 1
    for i in range(100):  # a burst: one alert a minute
        msg(model, T.tasks_new, {"task_id": f"d{i}", "type": "deployment.deploy"}, 2.0 + i)
    assert [a.kind for a in model.alerts] == ["no-agent", "no-agent"]
    msg(model, T.tasks_new, {"task_id": "ok", "type": "testing.run"}, 2.0)
    assert len(model.alerts) == 2  # a tester is online


def test_the_model_keeps_a_bounded_number_of_tasks() -> None:
    model = SwarmModel(T, max_tasks=10)
    for i in range(25):
        msg(model, T.tasks_new, {"task_id": f"t{i}", "type": "testing.run"}, float(i))
    assert list(model.tasks) == [f"t{i}" for i in range(15, 25)]
    snapshot = model.snapshot(30.0, max_tasks=3)
    assert [t["task_id"] for t in snapshot["tasks"]] == ["t24", "t23", "t22"]


def test_the_model_forgets_agents_not_online_beyond_its_bound() -> None:
    """Agents that come and go under new ids do not grow the dashboard: beyond
    ``max_agents`` the earliest one not online is forgotten (the history still gets its
    last state); online agents are kept whatever their number."""
    model = SwarmModel(T, max_agents=3)
    for i in range(3):
        agent = f"a{i}"
        msg(model, T.agent_status(agent), {"status": "online"}, 1.0, agent=(agent, "testing"))
    gone = {"status": "offline", "reason": "graceful shutdown"}
    msg(model, T.agent_status("a1"), gone, 2.0, agent=("a1", "testing"), retain=True)
    model.take_dirty()
    msg(model, T.agent_status("a2"), gone, 3.0, agent=("a2", "testing"), retain=True)
    msg(model, T.agent_status("a3"), {"status": "online"}, 4.0, agent=("a3", "testing"))
    assert list(model.agents) == ["a0", "a2", "a3"]  # a1: the earliest not online
    msg(model, T.agent_status("a4"), {"status": "online"}, 5.0, agent=("a4", "testing"))
    assert list(model.agents) == ["a0", "a3", "a4"]  # a2 forgotten, its change not lost:
    _, dirty, _ = model.take_dirty()
    assert {(a.agent_id, a.status) for a in dirty} >= {("a2", "offline"), ("a4", "online")}
    for i in range(5, 8):  # all online: kept beyond the bound
        agent = f"a{i}"
        msg(model, T.agent_status(agent), {"status": "online"}, 6.0, agent=(agent, "testing"))
    assert len(model.agents) == 6
    assert model.online_by_role()["testing"] == 6

    restored = SwarmModel(T, max_agents=2)  # the history may hold more than the bound
    rows = [AgentRow(f"h{i}", "testing", "offline") for i in range(5)]
    restored.restore([], rows, [])
    assert list(restored.agents) == ["h3", "h4"]


# ---------------------------------------------------------------- submit, retry
def test_a_form_is_checked_by_the_agents_rules() -> None:
    body = submission_from_form(
        {"type": "testing.run", "payload": '{"a": 1}', "priority": "high", "task_id": "f-1"}
    )
    assert body == {
        "type": "testing.run",
        "payload": {"a": 1},
        "task_id": "f-1",
        "priority": "high",
    }
    assert submission_from_form({"type": "x"})["task_id"].startswith("task-")
    for form, says in (
        ({"type": ""}, "type"),
        ({"type": "testing.run", "payload": "{"}, "not valid JSON"),
        ({"type": "testing.run", "payload": "[1]"}, "JSON object"),
        ({"type": "testing.run", "priority": "urgent"}, "priority"),
        ({"type": "testing.run", "task_id": "a/b"}, "task_id"),
        ({"type": "bad type"}, "type"),
        ([1], "JSON object"),
    ):
        with pytest.raises(SubmitError, match=says):
            submission_from_form(form)


def test_retry_builds_a_new_task_from_the_submission() -> None:
    model = SwarmModel(T)
    online(model)
    run_task(model, "r", 1.0, success=False)
    body = retry_submission(model, "r")
    assert body["task_id"] == "r.retry-1"
    assert (body["retry_of"], body["type"], body["payload"]) == ("r", "testing.run", {})
    msg(model, T.tasks_new, body, 5.0)
    assert retry_submission(model, "r")["task_id"] == "r.retry-2"
    assert model.tasks["r.retry-1"].retry_of == "r"
    assert model.detail("r")["retry_chain"] == [{"task_id": "r.retry-1", "state": "new"}]
    with pytest.raises(SubmitError, match="it has not failed: only a failed task is retried"):
        retry_submission(model, "r.retry-1")
    run_task(model, "ok", 6.0, success=True)
    with pytest.raises(SubmitError, match="completed: only a failed task is retried"):
        retry_submission(model, "ok")
    with pytest.raises(SubmitError, match="unknown"):
        retry_submission(model, "nope")


# ------------------------------------------------------------------- history
async def test_history_keeps_tasks_agents_and_alerts_across_a_restart(tmp_path: Path) -> None:
    model = SwarmModel(T)
    online(model)
    run_task(model, "h1", 1000.0)
    model.check(2000.0)
    history = History(tmp_path / "h.sqlite3", retention=7 * 86400)
    await history.open(2000.0)
    await history.write(*model.take_dirty(), 2000.0)
    assert model.take_dirty() == ([], [], [])
    await history.aclose()
    again = History(tmp_path / "h.sqlite3", retention=7 * 86400)
    await again.open(2001.0)
    tasks, agents, alerts = await again.load()
    await again.aclose()
    assert [(t.task_id, t.state, t.result) for t in tasks] == [("h1", "done", {"ok": 1})]
    assert [a.agent_id for a in agents] == ["tester-1"]
    assert [a.kind for a in alerts] == ["agent-silent"]
    restored = SwarmModel(T)
    restored.restore(tasks, agents, alerts)
    assert restored.detail("h1") is not None
    assert restored.take_changes() is None
    assert restored.agents["tester-1"].status == "unknown"  # until it says it is online
    assert restored.online_by_role()["testing"] == 0
    online(restored, 2002.0)
    assert restored.agents["tester-1"].status == "online"
    assert not [a for a in restored.alerts if a.at > 2000.0]


async def test_history_drops_what_is_older_than_its_retention(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite3", retention=60)
    await history.open(1000.0)
    await history.write([TaskRow("old", updated=900.0), TaskRow("new", updated=990.0)], [], [], 0)
    await history.aclose()
    history = History(tmp_path / "h.sqlite3", retention=60)
    await history.open(1000.0)
    tasks, _, _ = await history.load()
    await history.aclose()
    assert [t.task_id for t in tasks] == ["new"]


async def test_a_corrupt_history_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    path.write_bytes(b"this is not sqlite " * 400)
    with pytest.raises(HistoryError, match=r"not a usable SQLite database.*move it away"):
        await History(path, 60).open(0.0)


async def test_a_locked_history_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    first = History(path, 60)
    await first.open(0.0)
    try:
        with pytest.raises(HistoryError, match=r"locked by another process"):
            await History(path, 60).open(0.0)
    finally:
        await first.aclose()
    other = sqlite3.connect(path)  # once closed, anyone may open it
    other.execute("SELECT count(*) FROM tasks").fetchall()
    other.close()


# ------------------------------------------------------------------- metrics
def test_metrics_in_the_prometheus_text_format() -> None:
    model = SwarmModel(T)
    online(model)
    run_task(model, "m1", 1.0)
    run_task(model, "m2", 2.0, success=False)
    msg(model, T.errors, {"error": "x"}, 3.0)
    text = Metrics(model, lambda: True).render().decode()
    assert 'sheri_agents_online{role="testing",swarm="dash"} 1.0' in text
    assert (
        'sheri_tasks_finished_total{outcome="completed",swarm="dash",type="testing.run"} 1.0'
        in (text)
    )
    assert (
        'sheri_tasks_finished_total{outcome="failed",swarm="dash",type="testing.run"} 1.0' in text
    )
    assert 'sheri_claim_to_start_seconds_count{swarm="dash"} 2.0' in text
    assert 'sheri_claim_to_start_seconds_bucket{le="0.25",swarm="dash"} 2.0' in text
    assert 'sheri_swarm_errors_total{swarm="dash"} 1.0' in text
    assert 'sheri_takeovers_total{swarm="dash"} 0.0' in text
    assert 'sheri_tasks_pending{role="testing",swarm="dash"} 0.0' in text
    assert 'sheri_dashboard_broker_connected{swarm="dash"} 1.0' in text


# -------------------------------------------------------------------- routes
TOKEN = "s3cret-token"


class Site:
    def __init__(self, bus: MemoryBus, board: Board, http: httpx2.AsyncClient) -> None:
        self.bus, self.board, self.http = bus, board, http

    def published(self, topic: str) -> list[Any]:
        return [r.json()["payload"] for r in self.bus.records(topic)]


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    bus = MemoryBus()
    client = bus.open("dashboard")
    model = SwarmModel(T)
    online(model)
    board = Board(model, client, TOKEN, Metrics(model, lambda: client.connected), bound=2.0)
    transport = httpx2.ASGITransport(app=create_app(board))
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield Site(bus, board, http)


async def test_the_page_and_its_files_are_served(site: Site) -> None:
    page = await site.http.get("/")
    assert page.status_code == 200
    assert "/static/app.js" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from elsewhere
    for name, kind in (("app.js", "javascript"), ("style.css", "css")):
        r = await site.http.get(f"/static/{name}")
        assert r.status_code == 200
        assert kind in r.headers["content-type"]
    assert (await site.http.get("/static/../_app.py")).status_code == 404


async def test_a_token_visit_sets_the_cookie_and_a_bad_one_is_refused(site: Site) -> None:
    r = await site.http.get(f"/?token={TOKEN}")
    assert r.status_code == 303
    assert r.headers["location"] == "/"
    assert site.http.cookies[COOKIE] == TOKEN
    state = (await site.http.get("/api/state")).json()
    assert state["writable"] is True
    site.http.cookies.clear()
    bad = await site.http.get("/?token=wrong")
    assert bad.status_code == 403
    assert "does not match" in bad.text
    assert (await site.http.get("/api/state")).json()["writable"] is False


async def test_actions_need_the_token(site: Site) -> None:
    body = {"type": "testing.run"}
    none = await site.http.post("/api/tasks", json=body)
    assert none.status_code == 401
    assert "needs the dashboard's token" in none.json()["error"]
    wrong = await site.http.post("/api/tasks", json=body, headers={"X-Sheri-Token": "nope"})
    assert wrong.status_code == 403
    assert "bad token" in wrong.json()["error"]
    cross = await site.http.post(
        "/api/tasks", json=body, headers={"X-Sheri-Token": TOKEN, "Origin": "http://evil.example"}
    )
    assert cross.status_code == 403
    for path in ("/api/tasks/x/cancel", "/api/tasks/x/retry"):
        assert (await site.http.post(path)).status_code == 401
    assert site.published(T.tasks_new) == []
    assert site.published(T.tasks_cancel) == []


async def test_submit_publishes_a_checked_task(site: Site) -> None:
    site.http.cookies.set(COOKIE, TOKEN)
    r = await site.http.post(
        "/api/tasks", json={"type": "testing.run", "payload": '{"suite": "unit"}', "task_id": "s1"}
    )
    assert r.status_code == 202, r.text
    assert r.json()["task_id"] == "s1"
    [task] = site.published(T.tasks_new)
    assert task == {"type": "testing.run", "payload": {"suite": "unit"}, "task_id": "s1",
                    "priority": "medium"}  # fmt: skip


async def test_a_bad_task_is_refused_and_nothing_published(site: Site) -> None:
    site.http.cookies.set(COOKIE, TOKEN)
    for form in ({"type": "testing.run", "payload": "{nope"}, {"type": "a b"}, {"type": 3}):
        r = await site.http.post("/api/tasks", json=form)
        assert r.status_code == 400
        assert r.json()["error"].startswith("task not submitted: ")
    r = await site.http.post("/api/tasks", content=b"not json")
    assert r.status_code == 400
    run_task(site.board.model, "dup", 1.0)
    r = await site.http.post("/api/tasks", json={"type": "testing.run", "task_id": "dup"})
    assert r.status_code == 409
    assert site.published(T.tasks_new) == []


async def test_cancel_and_retry_publish_on_the_swarm_topics(site: Site) -> None:
    site.http.cookies.set(COOKIE, TOKEN)
    model = site.board.model
    msg(model, T.tasks_new, {"task_id": "long", "type": "testing.run"}, 1.0)
    r = await site.http.post("/api/tasks/long/cancel")
    assert r.status_code == 202
    assert site.published(T.tasks_cancel) == [{"task_id": "long"}]
    run_task(model, "gone", 2.0, success=False)
    assert (await site.http.post("/api/tasks/gone/cancel")).status_code == 409
    r = await site.http.post("/api/tasks/gone/retry")
    assert r.status_code == 202
    assert r.json() == {"task_id": "gone.retry-1", "retry_of": "gone"}
    [retry] = site.published(T.tasks_new)
    assert (retry["task_id"], retry["retry_of"], retry["type"]) == (
        "gone.retry-1",
        "gone",
        "testing.run",
    )
    assert (await site.http.post("/api/tasks/long/retry")).status_code == 409
    assert (await site.http.post("/api/tasks/a..b:c/cancel")).status_code == 400


async def test_without_the_broker_nothing_is_published(site: Site) -> None:
    site.http.cookies.set(COOKIE, TOKEN)
    site.board.client.kill()  # type: ignore[attr-defined]
    r = await site.http.post("/api/tasks", json={"type": "testing.run"})
    assert r.status_code == 503
    assert "not connected to the broker" in r.json()["error"]
    assert (await site.http.get("/api/state")).json()["broker"] is False


async def test_task_detail_state_and_metrics_routes(site: Site) -> None:
    run_task(site.board.model, "d1", 1.0)
    detail = (await site.http.get("/api/tasks/d1")).json()
    assert (detail["state"], detail["result"]) == ("done", {"ok": 1})
    assert detail["events"][0]["state"] == "running"
    assert (await site.http.get("/api/tasks/nope")).status_code == 404
    state = (await site.http.get("/api/state")).json()
    assert [t["task_id"] for t in state["tasks"]] == ["d1"]
    assert state["agents"][0]["agent_id"] == "tester-1"
    metrics = await site.http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "sheri_agents_online" in metrics.text


async def test_the_event_stream_starts_with_a_snapshot(site: Site) -> None:
    hub = site.board.hub
    receive = hub.open()
    hub.broadcast(b"event: update\ndata: {}\n\n")
    assert receive.receive_nowait().startswith(b"event: update")
    for _ in range(70):  # a reader that lags too far behind is closed
        hub.broadcast(b": x\n\n")
    assert hub.dropped == 1
    assert not hub.streams
    snapshot = orjson.loads(site.board.snapshot(False))
    assert snapshot["swarm"] == "dash"
    with trio.fail_after(1):
        async with receive:
            assert len([c async for c in receive]) == 64


def test_the_outcome_after_its_retained_final_state_still_brings_the_result() -> None:
    model = SwarmModel(T)
    online(model)
    msg(model, T.tasks_new, {"task_id": "o", "type": "testing.run"}, 1.0)
    final = {"task_id": "o", "state": "done", "attempt": 1, "type": "testing.run"}
    msg(model, T.task_state("o"), final, 2.0, agent=A1, retain=False)
    done = {"task_id": "o", "attempt": 1, "type": "testing.run", "result": {"r": 1}}
    msg(model, T.tasks_complete, done, 2.1, agent=A1)
    assert (model.tasks["o"].state, model.tasks["o"].result) == ("done", {"r": 1})
    assert model.outcomes == {("completed", "testing.run"): 1}
