"""``code.review``, ``code.generate``, ``documentation.generate``: the Anthropic Messages API.

``anthropic.AsyncAnthropic`` runs on trio (the SDK's HTTP layer, httpx2, is anyio-based);
it is imported on the first LLM task, so agents that never run one start fast.

Settings, ``[llm]``: ``model``, ``base_url``, ``max_tokens``, ``max_input_bytes``,
``max_retries`` (429/529/5xx are retried by the SDK with backoff, honouring
``retry-after``), ``timeout``, ``stream``, ``api_key_env``. The key comes from the
environment only: ``ANTHROPIC_API_KEY`` (or the variable ``api_key_env`` names), or
``ANTHROPIC_AUTH_TOKEN``; ``ANTHROPIC_BASE_URL`` is honoured when ``base_url`` is unset.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._checks import NAME_RE
from ._base import TaskConfigError, TaskContext, TaskPayloadError
from ._payload import check_keys
from ._process import redact, secret_values
from ._workspace import payload_path, section, state_dir, workspace_root

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["code_generate", "code_review", "documentation_generate", "parse_review"]

DEFAULT_MODEL = "claude-sonnet-5-5"
DEFAULT_MAX_TOKENS = 4096
DEFAULT_MAX_INPUT = 100_000  # bytes of code, diff and files together
DEFAULT_RETRIES = 4
DEFAULT_TIMEOUT = 300.0
MAX_FILES = 200
MAX_INSTRUCTIONS = 4000
SOURCE_SUFFIXES = {
    ".py", ".pyi", ".md", ".rst", ".txt", ".toml", ".cfg", ".ini", ".js", ".ts", ".tsx",
    ".jsx", ".go", ".rs", ".java", ".c", ".h", ".cpp", ".hpp", ".rb", ".sh", ".sql",
    ".yaml", ".yml", ".json", ".html", ".css",
}  # fmt: skip
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".tox", "build", "dist",
             ".mypy_cache", ".pytest_cache", ".ruff_cache"}  # fmt: skip
FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[ \t]*\n(.*?)(?:\n```|\Z)", re.S)

#: tests (and embedders) may set this to give the SDK its HTTP client, e.g.
#: ``lambda: httpx2.AsyncClient(transport=httpx2.MockTransport(handler))``
http_client_factory: Callable[[], Any] | None = None


class ModelOutputError(RuntimeError):
    """The model's answer is not what was asked for (e.g. not the review JSON)."""


# ---------------------------------------------------------------- settings
def _settings(ctx: TaskContext) -> dict[str, Any]:
    cfg = section(ctx, "llm")
    return {
        "model": str(cfg.get("model", DEFAULT_MODEL)),
        "base_url": cfg.get("base_url"),
        "max_tokens": int(cfg.get("max_tokens", DEFAULT_MAX_TOKENS)),
        "max_input_bytes": int(cfg.get("max_input_bytes", DEFAULT_MAX_INPUT)),
        "max_retries": int(cfg.get("max_retries", DEFAULT_RETRIES)),
        "timeout": float(cfg.get("timeout", DEFAULT_TIMEOUT)),
        "stream": bool(cfg.get("stream", True)),
        "api_key_env": str(cfg.get("api_key_env", "ANTHROPIC_API_KEY")),
    }


def _credentials(settings: dict[str, Any]) -> dict[str, str]:
    key = os.environ.get(settings["api_key_env"])
    if key:
        return {"api_key": key}
    token = os.environ.get("ANTHROPIC_AUTH_TOKEN")
    if token:
        return {"auth_token": token}
    raise TaskConfigError(
        f"no Anthropic API key: set {settings['api_key_env']} in the agent's environment "
        "(LLM tasks: code.review, code.generate, documentation.generate)"
    )


def _text(payload: dict[str, Any], key: str, limit: int | None = None) -> str | None:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise TaskPayloadError(f"payload '{key}' must be a string")
    if limit is not None and len(value) > limit:
        raise TaskPayloadError(f"payload '{key}' is longer than {limit} characters")
    return value


def _language(payload: dict[str, Any], default: str | None) -> str | None:
    value = payload.get("language", default)
    if value is None:
        return None
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or len(value) > 40:
        raise TaskPayloadError("payload 'language' must be a short name such as 'python'")
    return value


class _Inputs:
    """Code, diff and files, within ``max_input_bytes`` in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.parts: list[str] = []
        self.files: list[str] = []
        self.omitted: list[str] = []

    def add(self, label: str, text: str, *, strict: bool = True) -> bool:
        size = len(text.encode())
        if self.used + size > self.limit:
            if strict:
                raise TaskPayloadError(
                    f"{label} makes the input {self.used + size} bytes; the limit is "
                    f"{self.limit} ([llm] max_input_bytes)"
                )
            return False
        self.used += size
        self.parts.append(text)
        return True

    def add_file(self, root: Path, path: Path, *, strict: bool = True) -> None:
        rel = str(path.relative_to(root))
        try:
            text = path.read_bytes().decode("utf-8", errors="replace")
        except OSError as exc:
            raise TaskPayloadError(f"cannot read {rel}: {exc.strerror or exc}") from None
        if self.add(f"file {rel}", f"=== {rel} ===\n{text}\n", strict=strict):
            self.files.append(rel)
        else:
            self.omitted.append(rel)


def _payload_files(ctx: TaskContext, payload: dict[str, Any], inputs: _Inputs) -> None:
    files = payload.get("files")
    if files is None:
        return
    if not isinstance(files, list) or not files or len(files) > MAX_FILES:
        raise TaskPayloadError(f"payload 'files' must be a list of 1..{MAX_FILES} paths")
    root = workspace_root(ctx)
    for raw in files:
        inputs.add_file(root, payload_path(root, raw, key="files", kind="file"))


def _walk(root: Path, start: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(start):  # does not follow symlinked dirs
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix in SOURCE_SUFFIXES and not path.is_symlink():
                found.append(path)
            if len(found) >= MAX_FILES:
                return found
    # READMEs first, then the rest
    found.sort(key=lambda p: (not p.name.lower().startswith("readme"), str(p.relative_to(root))))
    return found


# ------------------------------------------------------------------ the API
async def _ask(
    ctx: TaskContext,
    settings: dict[str, Any],
    *,
    system: str,
    prompt: str,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """One Messages API call; text deltas become progress events when streaming."""
    credentials = _credentials(settings)
    import anthropic  # lazily: ~1.5 s

    http_client = http_client_factory() if http_client_factory is not None else None
    client = anthropic.AsyncAnthropic(
        api_key=credentials.get("api_key"),
        auth_token=credentials.get("auth_token"),
        base_url=settings["base_url"] or None,  # None: ANTHROPIC_BASE_URL, else the default
        max_retries=settings["max_retries"],
        timeout=settings["timeout"],
        http_client=http_client,
    )
    request = {
        "model": settings["model"],
        "max_tokens": min(max_tokens or settings["max_tokens"], settings["max_tokens"]),
        "system": system,
        "messages": [{"role": "user", "content": prompt}],
    }
    secrets = secret_values(extra=credentials.values())
    await ctx.progress(f"asking {settings['model']}", kind="start")
    try:
        if settings["stream"]:
            pending = ""
            async with client.messages.stream(**request) as stream:
                async for event in stream:
                    if event.type != "content_block_delta" or event.delta.type != "text_delta":
                        continue
                    pending += event.delta.text
                    if "\n" in pending or len(pending) >= 200:
                        await ctx.progress(pending, kind="text")
                        pending = ""
                if pending:
                    await ctx.progress(pending, kind="text")
                message = await stream.get_final_message()
        else:
            message = await client.messages.create(**request)
    except anthropic.APIStatusError as exc:
        raise _status_error(exc, settings, secrets) from None
    except anthropic.APITimeoutError:
        raise RuntimeError(
            f"the Anthropic API did not answer within {settings['timeout']:g} s "
            f"(after {settings['max_retries']} retries)"
        ) from None
    except anthropic.APIConnectionError as exc:
        where = settings["base_url"] or os.environ.get("ANTHROPIC_BASE_URL") or "api.anthropic.com"
        raise RuntimeError(
            redact(f"cannot reach the Anthropic API at {where}: {exc}", secrets)
        ) from None
    finally:
        await client.close()
    text = "".join(getattr(b, "text", "") for b in message.content if b.type == "text")
    usage = message.usage
    return {
        "text": text,
        "model": message.model,
        "stop_reason": message.stop_reason,
        "usage": {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cache_read_input_tokens": getattr(usage, "cache_read_input_tokens", None) or 0,
        },
    }


def _status_error(exc: Any, settings: dict[str, Any], secrets: list[str]) -> Exception:
    status = exc.status_code
    body: dict[str, Any] = exc.body if isinstance(exc.body, dict) else {}
    error: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
    kind = error.get("type", "")
    detail = redact(str(error.get("message") or exc.message)[:300], secrets)
    what = f"{status} {kind}".strip() + f": {detail}"
    if status == 401:
        return TaskConfigError(
            f"the Anthropic API refused the credentials ({what}); check {settings['api_key_env']}"
        )
    if status == 403:
        return TaskConfigError(f"the Anthropic API refused the request ({what})")
    if status == 404:
        return TaskConfigError(
            f"the Anthropic API does not know model {settings['model']!r} ({what}); set [llm] model"
        )
    if status in (400, 413, 422):
        return TaskPayloadError(f"the Anthropic API rejected the request ({what})")
    return RuntimeError(
        f"the Anthropic API answered {what} (after {settings['max_retries']} retries)"
    )


def _keep(ctx: TaskContext, suffix: str, text: str) -> str:
    """Keep the full output in ``<state_dir>/output/`` (the wire result may be cut)."""
    folder = state_dir(ctx) / "output"
    folder.mkdir(exist_ok=True)
    path = folder / f"{ctx.task_id}.{ctx.attempt}.{suffix}"
    path.write_text(text)
    return str(path)


def _result(answer: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": answer["model"],
        "usage": answer["usage"],
        "stop_reason": answer["stop_reason"],
        "truncated": answer["stop_reason"] == "max_tokens",
    }


# ------------------------------------------------------------------ review
REVIEW_SYSTEM = """You are a meticulous senior code reviewer. Review the code or diff you are \
given for bugs, security problems, error handling, concurrency, readability and tests.

Answer with ONE JSON object and nothing else (no prose, no code fences), of this shape:
{"approved": true or false,
 "summary": "one or two sentences",
 "comments": [{"file": "path or null", "line": 12 or null,
               "severity": "info" | "minor" | "major" | "critical", "message": "..."}],
 "suggestions": ["a concrete improvement", "..."]}
Approve only when there is no major or critical problem."""


def parse_review(text: str) -> dict[str, Any]:
    """The model's review as {approved, summary, comments[], suggestions[]}, validated."""
    raw = text.strip()
    fenced = FENCE_RE.search(raw)
    if fenced and not raw.startswith("{"):
        raw = fenced.group(2).strip()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        start, end = raw.find("{"), raw.rfind("}")
        try:
            data = json.loads(raw[start : end + 1]) if 0 <= start < end else None
        except ValueError:
            data = None
        if data is None:
            raise ModelOutputError(
                f"the model's review is not the JSON object asked for ({exc}); "
                f"it began: {text[:200]!r}"
            ) from None
    if not isinstance(data, dict):
        raise ModelOutputError(f"the model's review is JSON but not an object: {text[:200]!r}")
    problems = []
    if not isinstance(data.get("approved"), bool):
        problems.append("'approved' must be true or false")
    comments = data.get("comments", [])
    suggestions = data.get("suggestions", [])
    if not isinstance(comments, list):
        problems.append("'comments' must be a list")
    if not isinstance(suggestions, list) or not all(isinstance(s, str) for s in suggestions):
        problems.append("'suggestions' must be a list of strings")
    if problems:
        raise ModelOutputError(
            f"the model's review JSON is invalid: {'; '.join(problems)}; got {text[:200]!r}"
        )
    normal = []
    for c in comments:
        if isinstance(c, str):
            c = {"message": c}
        if not isinstance(c, dict) or not isinstance(c.get("message"), str):
            raise ModelOutputError(
                f"the model's review JSON is invalid: a comment without a 'message': {c!r}"[:300]
            )
        line = c.get("line")
        normal.append(
            {
                "file": c.get("file") if isinstance(c.get("file"), str) else None,
                "line": line if isinstance(line, int) and not isinstance(line, bool) else None,
                "severity": c.get("severity") if c.get("severity") in
                ("info", "minor", "major", "critical") else "info",
                "message": c["message"],
            }
        )  # fmt: skip
    summary = data.get("summary")
    return {
        "approved": data["approved"],
        "summary": summary if isinstance(summary, str) else "",
        "comments": normal,
        "suggestions": suggestions,
    }


async def code_review(ctx: TaskContext) -> dict[str, Any]:
    """code.review {code? | diff? | files?, language?, instructions?} ->
    {approved, comments[], suggestions[], summary, usage, model}."""
    payload = ctx.payload_dict()
    check_keys(ctx, payload, {"code", "diff", "files", "language", "instructions"})
    settings = _settings(ctx)
    inputs = _Inputs(settings["max_input_bytes"])
    language = _language(payload, None)
    instructions = _text(payload, "instructions", MAX_INSTRUCTIONS)
    code, diff = _text(payload, "code"), _text(payload, "diff")
    if code:
        inputs.add("'code'", f"=== code{f' ({language})' if language else ''} ===\n{code}\n")
    if diff:
        inputs.add("'diff'", f"=== diff ===\n{diff}\n")
    _payload_files(ctx, payload, inputs)
    if not inputs.parts:
        raise TaskPayloadError(
            "code.review needs 'code', 'diff' or 'files' (paths in the workspace)"
        )
    prompt = "Review this:\n\n" + "".join(inputs.parts)
    if instructions:
        prompt += f"\nThe requester adds: {instructions}\n"
    answer = await _ask(ctx, settings, system=REVIEW_SYSTEM, prompt=prompt)
    try:
        review = parse_review(answer["text"])
    except ModelOutputError as exc:
        if answer["stop_reason"] == "max_tokens":
            raise ModelOutputError(f"{exc} (the answer was cut at [llm] max_tokens)") from None
        raise
    return {**review, "files": inputs.files, **_result(answer)}


# ---------------------------------------------------------------- generate
GENERATE_SYSTEM = """You are an expert programmer. Write the code that is asked for: complete, \
correct, idiomatic, with brief comments where they help. Answer with the code only, in one \
fenced code block, and nothing before or after it."""


def extract_code(text: str) -> str:
    match = FENCE_RE.search(text)
    return (match.group(2) if match else text).strip("\n") + "\n"


async def code_generate(ctx: TaskContext) -> dict[str, Any]:
    """code.generate {prompt, language?, files?} -> {code, language, usage, model}."""
    payload = ctx.payload_dict()
    keys = {"prompt", "description", "spec", "language", "files", "max_tokens"}
    check_keys(ctx, payload, keys)
    settings = _settings(ctx)
    prompt = next(
        (t for k in ("prompt", "description", "spec") if (t := _text(payload, k, 20_000))), None
    )
    if not prompt:
        raise TaskPayloadError("code.generate needs 'prompt' (what to write)")
    language = _language(payload, "python") or "python"
    max_tokens = payload.get("max_tokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise TaskPayloadError("payload 'max_tokens' must be a positive integer")
    inputs = _Inputs(settings["max_input_bytes"])
    inputs.add("'prompt'", prompt)
    _payload_files(ctx, payload, inputs)
    context = "".join(inputs.parts[1:])
    text = f"Language: {language}\n\nTask:\n{prompt}\n"
    if context:
        text += f"\nExisting code for context:\n{context}"
    answer = await _ask(ctx, settings, system=GENERATE_SYSTEM, prompt=text, max_tokens=max_tokens)
    code = extract_code(answer["text"])
    if not code.strip():
        raise ModelOutputError("the model returned no code")
    return {
        "code": code,
        "language": language,
        "files": inputs.files,
        "saved_to": _keep(ctx, "code.txt", code),
        **_result(answer),
    }


# -------------------------------------------------------------------- docs
FORMATS = ("markdown", "rst", "html")
DOCS_SYSTEM = """You are a technical writer. Write clear, accurate documentation for the code \
you are given: what it is for, how to install and use it, its main modules and functions with \
examples. Do not invent features the code does not have. Answer with the document only, in \
{fmt}, no preamble."""
HEADING_RE = {
    "markdown": re.compile(r"^# \S", re.M),
    "rst": re.compile(r"^\S.*\n={3,}\s*$", re.M),
    "html": re.compile(r"<h1[\s>]", re.I),
}


async def documentation_generate(ctx: TaskContext) -> dict[str, Any]:
    """documentation.generate {path? | files? | code?, format?, topic?} ->
    {status: "generated", pages, format, content, usage, model}.

    With no input given it documents the workspace (READMEs first, then sources, up to
    ``max_input_bytes``).
    """
    payload = ctx.payload_dict()
    check_keys(ctx, payload, {"path", "files", "code", "format", "topic", "language"})
    settings = _settings(ctx)
    fmt = payload.get("format", "markdown")
    if fmt not in FORMATS:
        raise TaskPayloadError(f"payload 'format' must be one of {', '.join(FORMATS)}")
    topic = _text(payload, "topic", MAX_INSTRUCTIONS)
    inputs = _Inputs(settings["max_input_bytes"])
    code = _text(payload, "code")
    if code:
        inputs.add("'code'", f"=== code ===\n{code}\n")
    _payload_files(ctx, payload, inputs)
    if "path" in payload or not inputs.parts:
        root = workspace_root(ctx)
        start = payload_path(root, payload["path"], kind="dir") if "path" in payload else root
        for path in _walk(root, start):
            inputs.add_file(root, path, strict=False)
        if not inputs.files:
            raise TaskPayloadError(
                f"nothing to document in {start}: no source files (give 'code' or 'files')"
            )
    prompt = "Document this code:\n\n" + "".join(inputs.parts)
    if inputs.omitted:
        prompt += f"\n(Not shown, over the size limit: {', '.join(inputs.omitted[:50])})\n"
    if topic:
        prompt += f"\nFocus: {topic}\n"
    answer = await _ask(ctx, settings, system=DOCS_SYSTEM.format(fmt=fmt), prompt=prompt)
    content = answer["text"].strip()
    if fmt == "markdown" and content.startswith("```"):
        content = extract_code(content).strip()
    if not content:
        raise ModelOutputError("the model returned an empty document")
    pages = max(1, len(HEADING_RE[fmt].findall(content)))
    return {
        "status": "generated",
        "pages": pages,
        "format": fmt,
        "content": content,
        "files": inputs.files,
        "files_omitted": inputs.omitted,
        "saved_to": _keep(ctx, {"markdown": "md", "rst": "rst", "html": "html"}[fmt], content),
        **_result(answer),
    }
