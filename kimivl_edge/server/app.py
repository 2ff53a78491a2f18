"""The FastAPI app: routes, and the ASGI layers around them (request log -> CORS -> API key -> body limit).

Every error leaves in the OpenAI shape (``errors.APIError``); an unexpected exception is logged with its traceback
and the client gets a one-line 500. The model's decoder is touched only by the scheduler's worker thread; a request
with images is also handed to its encoder thread (``KimiVL.pre_encode``) while it waits.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .completion import (DELTA_FIELD, STARTED, Done, ModelCard, PromptProgress, chunk, completion, final_chunk,
                         prepare_turn, run_turn, usage)
from .config import ServerConfig
from .errors import INTERNAL, LOADING, APIError, bad_request, invalid_field
from .scheduler import Job, QueueFull, Scheduler
from .schemas import ChatRequest, DetokenizeRequest, TokenizeRequest
from .web import add_web_routes, is_page_file

log = logging.getLogger("kimivl_edge.server")


def create_app(cfg: ServerConfig, loader: Callable[[], Any], on_load_error: Callable[[], None] | None = None
               ) -> FastAPI:
    """The app; ``loader()`` returns the KimiVL and runs on the worker thread when the app starts."""
    def load() -> Any:
        model = loader()
        model.encode_progress = sched.check_cancelled  # a cancelled request's vision encode stops per layer
        return model

    sched = Scheduler(load, cfg.max_queue, on_load_error, cfg.parallel)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sched.start()
        yield
        await run_in_threadpool(sched.stop)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = sched
    api = _Api(cfg, sched)
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"])
    app.add_api_route("/tokenize", api.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", api.detokenize, methods=["POST"])
    add_web_routes(app, cfg)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    if cfg.api_key:
        app.add_middleware(ApiKey, key=cfg.api_key)
    if cfg.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestLog)
    return app


class _Api:
    def __init__(self, cfg: ServerConfig, sched: Scheduler):
        self.cfg, self.sched = cfg, sched
        self.started = int(time.time())
        self._card: ModelCard | None = None

    @property
    def card(self) -> ModelCard:
        if self.sched.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.sched.load_error}", "model_load_failed")
        if not self.sched.ready:
            raise LOADING
        if self._card is None:
            self._card = ModelCard.of(self.sched.model, self.cfg.model_id)
        return self._card

    async def health(self) -> dict:
        self.card  # noqa: B018  (503 until the model is loaded)
        return {"status": "ok"}

    async def models(self) -> dict:
        return {"object": "list", "data": [self.card.entry(self.started)]}

    async def tokenize(self, body: TokenizeRequest) -> dict:
        # the tokenizer is pure Python/tiktoken, not llama.cpp: it runs beside the worker, not behind it
        self.card  # noqa: B018  (503 until the model is loaded)
        tok = self.sched.model.tokenizer
        ids = await run_in_threadpool(tok.encode if body.parse_special else tok.encode_ordinary, body.content)
        return {"tokens": ids}

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        self.card  # noqa: B018
        tok = self.sched.model.tokenizer
        try:
            return {"content": await run_in_threadpool(tok.decode, body.tokens)}
        except ValueError as e:
            raise invalid_field(str(e), "tokens") from None

    async def chat(self, body: ChatRequest, request: Request) -> Any:
        card = self.card
        turn = await run_in_threadpool(prepare_turn, body, self.cfg, card)
        job = Job(lambda emit, cancelled: run_turn(self.sched.model, turn, emit, cancelled), asyncio.get_running_loop(),
                  turn.pre_encode if _has_media(turn.messages) else None, turn)
        try:
            self.sched.submit(job)
        except QueueFull:
            raise APIError(429, f"the server is busy: {self.sched.max_queue} requests are waiting (--max-queue)",
                           "queue_full") from None
        watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, job))
        events = job.events()
        try:
            first = await anext(events, None)
        except BaseException:
            watcher.cancel()
            raise
        cid, created = f"chatcmpl-{request.state.request_id}", int(time.time())
        if body.stream:
            sse = _sse(cid, created, card, first, events, body.include_usage, request, job, watcher)
            return StreamingResponse(sse, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            text: dict[str, list[str]] = {"answer": [], "reasoning": []}
            ev = first
            while not isinstance(ev, Done):
                if ev is None:  # cancelled before it ran: the client has gone
                    raise APIError(400, "request cancelled", "cancelled")
                if isinstance(ev, tuple):  # a piece (STARTED and PromptProgress carry no text)
                    text[ev[0]].append(ev[1])
                ev = await anext(events, None)
        finally:
            watcher.cancel()
        request.state.usage = ev.stats
        reasoning = "".join(text["reasoning"]) if turn.split_thinking else None
        return JSONResponse(completion(cid, created, card, "".join(text["answer"]), reasoning, ev))


def _has_media(messages: list[dict]) -> bool:
    """Whether a turn has parts for the vision encoder (what the scheduler's encoder thread prepares)."""
    return any(p.get("type") != "text" for m in messages if isinstance(m["content"], list) for p in m["content"])


async def _cancel_on_disconnect(receive: Receive, job: Job) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _sse(cid: str, created: int, card: ModelCard, first: Any, events: AsyncIterator[Any], include_usage: bool,
               request: Request, job: Job, watcher: asyncio.Task) -> AsyncIterator[str]:
    """The turn as server-sent events: the role, the pieces, the finish (with ``timings``), the usage chunk if asked
    for, then ``[DONE]``. An error after the headers went out is sent as an ``{"error": ...}`` event."""
    def data(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    cut = True  # until the turn's end has been read: its Done, or its events' end (cancelled before it ran)
    try:
        yield data(chunk(cid, created, card, {"role": "assistant", "content": None}))
        ev = first
        while ev is not None:
            if isinstance(ev, Done):
                cut = False
                request.state.usage = ev.stats
                yield data(final_chunk(cid, created, card, ev))
                if include_usage:
                    yield data({**chunk(cid, created, card, {}), "choices": [], "usage": usage(ev.stats)})
                break
            if isinstance(ev, PromptProgress):
                yield data({**chunk(cid, created, card, {}), "prompt_progress": dataclasses.asdict(ev)})
            elif ev != STARTED:
                kind, text = ev
                yield data(chunk(cid, created, card, {DELTA_FIELD[kind]: text}))
            ev = await anext(events, None)
        cut = False
        yield "data: [DONE]\n\n"
    except APIError as e:
        cut = False
        yield data(e.body())
    except Exception:
        cut = False
        log.exception("request %s failed while streaming", request.state.request_id)
        yield data(INTERNAL.body())
    finally:
        job.cancel()
        watcher.cancel()
        if cut:  # the client has gone mid-turn
            _log_when_stopped(request.state.request_id, job)


_stopping: set[asyncio.Task] = set()  # the tasks of _log_when_stopped, referenced until they end


def _log_when_stopped(rid: str, job: Job) -> None:
    """A stream cut short (its client gone): the request's own line is written at once, without token counts, so
    one more line says how far the turn went once the worker has stopped it."""
    async def wait() -> None:
        try:
            async for ev in job.events():
                if isinstance(ev, Done):
                    log.info("%s stopped: prompt %d completion %d", rid, ev.stats.prompt_tokens,
                             ev.stats.generated_tokens)
        except Exception as e:  # the turn failed after its client had gone: there is nobody to tell
            log.debug("request %s failed after its client had gone: %s", rid, e)

    task = asyncio.get_running_loop().create_task(wait())
    _stopping.add(task)
    task.add_done_callback(_stopping.discard)


# -- errors ---------------------------------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, APIError)
        return JSONResponse(e.body(), status_code=e.status)

    async def validation(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, RequestValidationError)
        err = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
        if err.get("type") == "json_invalid":
            return await api_error(request, bad_request("the request body is not valid JSON"))
        param = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
        return await api_error(request, invalid_field(f"{param or 'body'}: {err['msg']}", param))

    async def http(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, HTTPException)
        msg = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
        return await api_error(request, APIError(e.status_code, msg.get(e.status_code, str(e.detail)),
                                                 "not_found" if e.status_code == 404 else None))

    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.error("request %s failed", getattr(request.state, "request_id", "?"), exc_info=e)
        return await api_error(request, INTERNAL)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(Exception, unexpected)


async def _send_error(send: Send, e: APIError) -> None:
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# -- ASGI layers ----------------------------------------------------------------------------------------------
class RequestLog:
    """Gives each request an id and logs one line when it ends: id, method, path, status, prompt and completion
    tokens, seconds, and "(client gone)" when the response did not reach its end."""

    _ids = itertools.count(1)

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["request_id"] = rid = f"{next(self._ids):06d}"
        t0, status, ended = time.perf_counter(), [0], [False]

        async def watched_send(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)
            ended[0] = msg["type"] == "http.response.body" and not msg.get("more_body")

        try:
            await self.app(scope, receive, watched_send)
        finally:
            st = state.get("usage")
            tokens = f"prompt {st.prompt_tokens} completion {st.generated_tokens}" if st else "-"
            log.info("%s %s %s %d %s %.3fs%s", rid, scope["method"], scope["path"], status[0], tokens,
                     time.perf_counter() - t0, "" if ended[0] else " (client gone)")


class ApiKey:
    """``Authorization: Bearer KEY`` on every route but /health and the page's static files, compared in constant
    time."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health" and not is_page_file(scope["path"]) \
                and scope["method"] != "OPTIONS":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                return await _send_error(send, APIError(401, "invalid or missing API key", "invalid_api_key"))
        await self.app(scope, receive, send)


class BodyLimit:
    """Reads the whole body up front (at most ``limit`` bytes, else 413), then replays it to the app; later
    ``receive`` calls pass through (they report the client's disconnect)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"request body exceeds {self.limit} bytes (--max-body)", "request_too_large")
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            return await _send_error(send, too_large)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            size += len(msg.get("body", b""))
            if size > self.limit:
                return await _send_error(send, too_large)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)
