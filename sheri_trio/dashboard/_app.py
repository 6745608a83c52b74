"""The dashboard's web side: a Starlette app over a :class:`Board` (the model, the
broker client, the token, the page's live feed). No server here: :mod:`._server` runs
it on hypercorn's trio worker.

Routes::

    GET  /                      the page (?token=...: sets the cookie, then redirects to /)
    GET  /static/{file}         its script and style sheet
    GET  /events                server-sent events: a snapshot, then batched updates
    GET  /api/state             the snapshot as JSON
    GET  /api/tasks/{id}        one task: its events, result or error, retries
    POST /api/tasks             submit (token)         {type, payload, priority, ...}
    POST /api/tasks/{id}/cancel cancel (token)         publishes {swarm}/tasks/cancel
    POST /api/tasks/{id}/retry  retry (token)          publishes {id}.retry-{n}
    GET  /metrics               Prometheus text format
"""

from __future__ import annotations

import secrets
import time
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

import orjson
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from ..swarm import BadMessage, check_task_id, encode
from ._model import (
    SETTLED,
    RetryNotAllowed,
    SubmitError,
    retry_submission,
    submission_from_form,
)

if TYPE_CHECKING:
    from starlette.requests import Request

    from ..mqtt import Client
    from ._metrics import Metrics
    from ._model import SwarmModel

__all__ = ["COOKIE", "Board", "EventStream", "Hub", "create_app"]

COOKIE: Final = "sheri_dashboard_token"
#: files of the page, served from the package
STATIC: Final = {"app.js": "text/javascript", "style.css": "text/css"}
#: an event stream whose reader lags this many batches behind is closed (it reconnects)
STREAM_BUFFER: Final = 64


def sse(event: str, data: bytes) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


class Hub:
    """The open event streams; a batch goes to each without waiting."""

    def __init__(self) -> None:
        self.streams: set[trio.MemorySendChannel[bytes]] = set()
        self.closed = False
        self.sent = 0
        self.dropped = 0

    def open(self) -> trio.MemoryReceiveChannel[bytes]:
        send, receive = trio.open_memory_channel[bytes](STREAM_BUFFER)
        if self.closed:
            send.close()
        else:
            self.streams.add(send)
        return receive

    def broadcast(self, chunk: bytes) -> None:
        for send in list(self.streams):
            try:
                send.send_nowait(chunk)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                # too slow (or gone): closed; its page reconnects and gets a snapshot
                self.dropped += 1
                self.streams.discard(send)
                send.close()
        self.sent += 1

    def close(self) -> None:
        self.closed = True
        for send in self.streams:
            send.close()
        self.streams.clear()


class EventStream:
    """One page's event stream: its first chunk, then the hub's batches until the hub
    closes the channel. An iterator, not an async generator: Starlette stops iterating
    when the page goes away (a cancel), and a suspended generator would only be
    finalized by the garbage collector; here the channel is closed at once."""

    def __init__(self, first: bytes, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self.first: bytes | None = first
        self.receive = receive

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> bytes:
        if self.first is not None:
            chunk, self.first = self.first, None
            return chunk
        try:
            return await self.receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
        except BaseException:
            self.receive.close()  # the page went away (cancelled): the hub drops it
            raise


class Board:
    """What the routes work on."""

    def __init__(
        self,
        model: SwarmModel,
        client: Client,
        token: str,
        metrics: Metrics,
        *,
        bound: float = 10.0,
        hub: Hub | None = None,
    ) -> None:
        self.model = model
        self.client = client
        self.token = token
        self.metrics = metrics
        self.bound = bound
        self.hub = hub or Hub()
        self.topics = model.topics

    def connected(self) -> bool:
        return self.client.connected

    def snapshot(self, writable: bool) -> bytes:
        state = self.model.snapshot(time.time())
        state["broker"] = self.connected()
        state["writable"] = writable
        return orjson.dumps(state, default=str)

    # ------------------------------------------------------------- tokens
    def token_of(self, request: Request) -> str | None:
        header = request.headers.get("x-sheri-token")
        if header:
            return header
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return request.cookies.get(COOKIE)

    def valid(self, token: str | None) -> bool:
        return token is not None and secrets.compare_digest(token.encode(), self.token.encode())

    def refuse(self, request: Request) -> Response | None:
        """None when the request may act; else the 401/403 that says why not."""
        origin = request.headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host"):
            return _error(403, f"cross-site request from {origin} refused")
        token = self.token_of(request)
        if token is None:
            return _error(
                401,
                "this action needs the dashboard's token: open the URL that sheri dashboard "
                "printed at start (http://HOST:PORT/?token=...), or send the header "
                "X-Sheri-Token",
            )
        if not self.valid(token):
            return _error(
                403,
                "bad token: it does not match this dashboard's (see the URL sheri dashboard "
                "printed at start, or SHERI_DASHBOARD_TOKEN)",
            )
        return None

    # ------------------------------------------------------------ publish
    async def publish(self, topic: str, body: dict[str, Any], what: str) -> Response | None:
        """Publish (QoS 1, the PUBACK awaited within :attr:`bound`); None when it went out,
        else the response that says why not."""
        if not self.client.connected:
            return _error(503, f"not connected to the broker: {what} was not published")
        with trio.move_on_after(self.bound) as scope:
            await self.client.publish(
                topic, encode(None, None, body), qos=1, content_type="application/json"
            )
        if scope.cancelled_caught:
            return _error(504, f"no PUBACK from the broker within {self.bound:g} s for {what}")
        return None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _page(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def create_app(board: Board) -> Starlette:
    """The Starlette app of one :class:`Board`."""

    async def index(request: Request) -> Response:
        given = request.query_params.get("token")
        if given is not None:
            if not board.valid(given):
                html = _page("badtoken.html")
                response: Response = HTMLResponse(html, status_code=403)
                response.delete_cookie(COOKIE)
                return response
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, given, httponly=True, samesite="strict")
            return response
        return HTMLResponse(_page("index.html"), headers={"Cache-Control": "no-store"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return _error(404, f"no such file: {name}")
        return Response(_page(name), media_type=STATIC[name])

    def writable(request: Request) -> bool:
        return board.valid(board.token_of(request))

    async def state(request: Request) -> Response:
        return Response(board.snapshot(writable(request)), media_type="application/json")

    async def events(request: Request) -> Response:
        receive = board.hub.open()
        first = board.snapshot(writable(request))

        return StreamingResponse(
            EventStream(b"retry: 1000\n" + sse("snapshot", first), receive),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def task_detail(request: Request) -> Response:
        found = board.model.detail(request.path_params["task_id"])
        if found is None:
            return _error(404, f"unknown task {request.path_params['task_id']}")
        return Response(orjson.dumps(found, default=str), media_type="application/json")

    async def submit(request: Request) -> Response:
        refused = board.refuse(request)
        if refused is not None:
            return refused
        try:
            form = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "the request must be a JSON object")
        try:
            body = submission_from_form(form)
        except SubmitError as exc:
            return _error(400, f"task not submitted: {exc}")
        if body["task_id"] in board.model.tasks:
            return _error(409, f"task not submitted: task id {body['task_id']} is already known")
        failed = await board.publish(board.topics.tasks_new, body, f"task {body['task_id']}")
        if failed is not None:
            return failed
        return JSONResponse({"task_id": body["task_id"], "submitted": body}, status_code=202)

    async def cancel(request: Request) -> Response:
        refused = board.refuse(request)
        if refused is not None:
            return refused
        try:
            task_id = check_task_id(request.path_params["task_id"])
        except BadMessage as exc:
            return _error(400, exc.reason)
        task = board.model.tasks.get(task_id)
        if task is not None and task.state in SETTLED:
            return _error(409, f"task {task_id} is already {task.state}: nothing to cancel")
        failed = await board.publish(
            board.topics.tasks_cancel, {"task_id": task_id}, f"the cancel of {task_id}"
        )
        if failed is not None:
            return failed
        return JSONResponse({"task_id": task_id, "cancel": "requested"}, status_code=202)

    async def retry(request: Request) -> Response:
        refused = board.refuse(request)
        if refused is not None:
            return refused
        try:
            body = retry_submission(board.model, request.path_params["task_id"])
        except RetryNotAllowed as exc:
            return _error(409, f"not retried: {exc}")
        except SubmitError as exc:
            return _error(400, f"not retried: {exc}")
        failed = await board.publish(board.topics.tasks_new, body, f"task {body['task_id']}")
        if failed is not None:
            return failed
        return JSONResponse(
            {"task_id": body["task_id"], "retry_of": body["retry_of"]}, status_code=202
        )

    async def metrics(request: Request) -> Response:
        return Response(board.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/static/{name}", static),
            Route("/events", events),
            Route("/api/state", state),
            Route("/api/tasks", submit, methods=["POST"]),
            Route("/api/tasks/{task_id}", task_detail),
            Route("/api/tasks/{task_id}/cancel", cancel, methods=["POST"]),
            Route("/api/tasks/{task_id}/retry", retry, methods=["POST"]),
            Route("/metrics", metrics),
        ]
    )
