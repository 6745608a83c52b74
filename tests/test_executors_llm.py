"""code.review, code.generate, documentation.generate through the real anthropic SDK,
on trio, with an httpx2.MockTransport standing in for the API (no network)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx2
import pytest
import trio
from executor_helpers import make_ctx

from sheri_trio.executors import TaskConfigError, TaskPayloadError, _llm
from sheri_trio.executors._llm import (
    ModelOutputError,
    code_generate,
    code_review,
    documentation_generate,
)

if TYPE_CHECKING:
    from pathlib import Path

REVIEW = {
    "approved": False,
    "summary": "Shell injection.",
    "comments": [
        {"file": "app.py", "line": 4, "severity": "critical", "message": "shell=True with input"}
    ],
    "suggestions": ["pass a list of arguments without shell=True"],
}


def _message(text: str, model: str, *, stop: str = "end_turn") -> dict[str, Any]:
    return {
        "id": "msg_1", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": stop,
        "stop_sequence": None, "usage": {"input_tokens": 120, "output_tokens": 34},
    }  # fmt: skip


def _sse(chunks: list[str], model: str) -> bytes:
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_2", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 200, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
    ]  # fmt: skip
    for chunk in chunks:
        delta = {"type": "text_delta", "text": chunk}
        events.append(
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
        )
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                           "stop_sequence": None}, "usage": {"output_tokens": 57}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    return "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events).encode()


class FakeAPI:
    """Scripted answers: each item is (status, text) or a callable making a response."""

    def __init__(self) -> None:
        self.script: list[Any] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[httpx2.Headers] = []

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        self.requests.append(body)
        self.headers.append(request.headers)
        status, text = self.script.pop(0)
        if status != 200:
            kind = {401: "authentication_error", 429: "rate_limit_error",
                    529: "overloaded_error"}.get(status, "api_error")  # fmt: skip
            return httpx2.Response(
                status,
                headers={"retry-after-ms": "1", "request-id": "req_1"},
                json={"type": "error", "error": {"type": kind, "message": text}},
            )
        if body.get("stream"):
            chunks = text if isinstance(text, list) else [text]
            return httpx2.Response(
                200, headers={"content-type": "text/event-stream"},
                content=_sse(chunks, body["model"]),
            )  # fmt: skip
        return httpx2.Response(200, json=_message(text, body["model"]))


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeAPI:
    fake = FakeAPI()

    def factory() -> httpx2.AsyncClient:
        return httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handler))

    monkeypatch.setattr(_llm, "http_client_factory", factory)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-key-123456")
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    return fake


def _cfg(**llm: Any) -> dict[str, Any]:
    return {"llm": {"base_url": "http://llm.test", "model": "claude-test-1", **llm}}


async def test_review_plain_response(api: FakeAPI, tmp_path: Path) -> None:
    api.script = [(200, json.dumps(REVIEW))]
    payload = {"code": "import subprocess\nsubprocess.call(x, shell=True)\n", "language": "python"}
    ctx, _ = make_ctx("code.review", payload, config=_cfg(stream=False), state=tmp_path)
    result = await code_review(ctx)
    assert result["approved"] is False
    assert result["comments"][0] == REVIEW["comments"][0]
    assert result["suggestions"] == REVIEW["suggestions"]
    assert result["usage"]["input_tokens"] == 120
    assert result["usage"]["output_tokens"] == 34
    assert result["model"] == "claude-test-1"
    sent = api.requests[0]
    assert sent["model"] == "claude-test-1"
    assert sent["max_tokens"] == 4096
    assert "JSON" in sent["system"]
    assert "shell=True" in sent["messages"][0]["content"]
    assert api.headers[0]["authorization"] == "Bearer sk-ant-test-key-123456"
    assert trio.lowlevel.current_task()  # it all ran on trio


async def test_review_streaming_deltas_become_progress(api: FakeAPI, tmp_path: Path) -> None:
    text = json.dumps(REVIEW, indent=1)
    api.script = [(200, [text[:40], text[40:90], text[90:]])]
    ctx, rec = make_ctx("code.review", {"diff": "-a\n+b\n"}, config=_cfg(), state=tmp_path)
    result = await code_review(ctx)
    assert api.requests[0]["stream"] is True
    streamed = rec.messages(kind="text")
    assert len(streamed) >= 2
    assert "".join(streamed) == text
    assert result["approved"] is False
    assert result["usage"]["output_tokens"] == 57


async def test_review_of_workspace_files_with_fenced_json(api: FakeAPI, tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("print('hi')\n")
    api.script = [(200, "```json\n" + json.dumps({"approved": True, "comments": ["ok"],
                                                  "suggestions": []}) + "\n```")]  # fmt: skip
    ctx, _ = make_ctx("code.review", {"files": ["app.py"]}, config=_cfg(stream=False),
                      workspace=tmp_path, state=tmp_path / "s")  # fmt: skip
    result = await code_review(ctx)
    assert result["approved"] is True
    assert result["files"] == ["app.py"]
    assert result["comments"] == [{"file": None, "line": None, "severity": "info", "message": "ok"}]
    assert "print('hi')" in api.requests[0]["messages"][0]["content"]


async def test_429_then_success(api: FakeAPI, tmp_path: Path) -> None:
    api.script = [
        (429, "slow down"),
        (529, "overloaded"),
        (200, "```python\ndef f():\n    pass\n```"),
    ]
    ctx, _ = make_ctx("code.generate", {"prompt": "an empty function f"}, config=_cfg(),
                      state=tmp_path)  # fmt: skip
    result = await code_generate(ctx)
    assert result["code"] == "def f():\n    pass\n"
    assert result["language"] == "python"
    assert len(api.requests) == 3
    assert [h["x-stainless-retry-count"] for h in api.headers] == ["0", "1", "2"]


async def test_rate_limited_after_all_retries(api: FakeAPI, tmp_path: Path) -> None:
    api.script = [(429, "slow down")] * 2
    ctx, _ = make_ctx("code.generate", {"prompt": "x"}, config=_cfg(max_retries=1),
                      state=tmp_path)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"429 rate_limit_error: slow down \(after 1 retries\)"):
        await code_generate(ctx)


async def test_401_is_a_clear_config_error(api: FakeAPI, tmp_path: Path) -> None:
    api.script = [(401, "invalid x-api-key")]
    ctx, _ = make_ctx("code.generate", {"prompt": "x"}, config=_cfg(), state=tmp_path)
    with pytest.raises(
        TaskConfigError,
        match=r"refused the credentials \(401 authentication_error: invalid x-api-key\); "
        r"check ANTHROPIC_API_KEY",
    ) as info:
        await code_generate(ctx)
    assert "sk-ant-test" not in str(info.value)
    assert len(api.requests) == 1  # not retried


@pytest.mark.parametrize(
    "answer",
    [
        "Looks fine to me!",
        '{"approved": "yes", "comments": [], "suggestions": []}',
        '["approved"]',
        '{"approved": true, "comments": [{"line": 3}], "suggestions": []}',
    ],
)
async def test_malformed_review_is_a_clear_failure(
    api: FakeAPI, tmp_path: Path, answer: str
) -> None:
    api.script = [(200, answer)]
    ctx, _ = make_ctx("code.review", {"code": "x = 1"}, config=_cfg(stream=False), state=tmp_path)
    with pytest.raises(ModelOutputError, match="the model's review"):
        await code_review(ctx)


async def test_no_key_fails_at_once(
    api: FakeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    for task_type, executor, payload in [
        ("code.review", code_review, {"code": "x = 1"}),
        ("code.generate", code_generate, {"prompt": "x"}),
        ("documentation.generate", documentation_generate, {"code": "x = 1"}),
    ]:
        ctx, _ = make_ctx(task_type, payload, config=_cfg(), state=tmp_path)
        with pytest.raises(TaskConfigError, match="no Anthropic API key: set ANTHROPIC_API_KEY"):
            await executor(ctx)
    assert api.requests == []


async def test_docs_of_the_workspace(api: FakeAPI, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "pkg").mkdir(parents=True)
    (ws / "README.md").write_text("# calc\n")
    (ws / "pkg" / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    (ws / ".venv").mkdir()
    (ws / ".venv" / "junk.py").write_text("junk = 1\n")
    api.script = [(200, ["# calc\n\nAdds numbers.\n", "\n# API\n\n`add(a, b)`\n"])]
    ctx, rec = make_ctx("documentation.generate", {}, config=_cfg(), workspace=ws, state=tmp_path)
    result = await documentation_generate(ctx)
    assert (result["status"], result["format"], result["pages"]) == ("generated", "markdown", 2)
    assert result["content"].startswith("# calc")
    assert result["files"] == ["README.md", "pkg/calc.py"]
    assert await trio.Path(result["saved_to"]).read_text() == result["content"]
    sent = api.requests[0]["messages"][0]["content"]
    assert "=== README.md ===" in sent
    assert "junk" not in sent
    assert rec.messages(kind="text")


@pytest.mark.parametrize(
    ("task_type", "payload", "message"),
    [
        ("code.review", {}, "needs 'code', 'diff' or 'files'"),
        (
            "code.review",
            {"code": "x" * 2000},
            r"input 20\d\d bytes; the limit is 1000|limit is 1000",
        ),
        ("code.review", {"files": ["../secret.txt"]}, "escapes the workspace"),
        ("code.review", {"files": ["/etc/passwd"]}, "outside the workspace"),
        ("code.review", {"code": "x", "command": "cat /etc/passwd"}, "cannot carry commands"),
        ("code.generate", {}, "needs 'prompt'"),
        ("code.generate", {"prompt": "x", "language": "py thon; rm"}, "'language' must be"),
        ("documentation.generate", {"format": "pdf"}, "'format' must be one of"),
        ("documentation.generate", {"path": "../.."}, "escapes the workspace"),
    ],
)
async def test_refused_inputs(
    api: FakeAPI, tmp_path: Path, task_type: str, payload: dict, message: str
) -> None:
    executor = {"code.review": code_review, "code.generate": code_generate,
                "documentation.generate": documentation_generate}[task_type]  # fmt: skip
    (tmp_path / "ws").mkdir()
    ctx, _ = make_ctx(task_type, payload, config=_cfg(max_input_bytes=1000),
                      workspace=tmp_path / "ws", state=tmp_path / "s")  # fmt: skip
    with pytest.raises(TaskPayloadError, match=message):
        await executor(ctx)
    assert api.requests == []
