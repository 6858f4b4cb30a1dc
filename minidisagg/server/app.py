"""The FastAPI application: OpenAI-shaped routes over an ``EngineLoop``, SSE streaming, auth and errors."""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minidisagg.engine.sampling import SamplingParams
from minidisagg.server import protocol as p
from minidisagg.server.engine_loop import EngineLoop, QueueFullError, TokenEvent
from minidisagg.server.metrics import ServerMetrics
from minidisagg.server.requests import (
    EnginePrompt, ModelInfo, chat_params, chat_prompt, check_model, completion_params, completion_prompts, parse_body)

FINISH_REASONS = {"stop": "stop", "length": "length"}  # engine -> API (anything else ends in an error)


def _error_response(err: p.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


class Submitted:
    """The requests one HTTP request put in the engine loop, and the queue their events arrive on."""

    def __init__(self, engine_loop: EngineLoop, prompts: list[EnginePrompt], params: SamplingParams,
                 response_id: str) -> None:
        self.engine_loop = engine_loop
        self.events: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()
        self.request_ids = [f"{response_id}-{i}" for i in range(len(prompts))]
        self.open = set(range(len(prompts)))
        loop = asyncio.get_running_loop()
        try:
            for i, (rid, prompt) in enumerate(zip(self.request_ids, prompts)):
                engine_loop.submit(rid, prompt, params, self._sink(loop, i))
        except QueueFullError as exc:
            self.abort_open(submitted=i)
            raise p.ApiError(503, str(exc), type_="server_overloaded", code="queue_full") from None

    def _sink(self, loop: asyncio.AbstractEventLoop, index: int) -> Any:
        def put(event: TokenEvent) -> None:
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, (index, event))
            except RuntimeError:  # the event loop closed: the server is going down
                pass
        return put

    async def next(self) -> tuple[int, TokenEvent]:
        """The next event of any of the requests."""
        index, event = await self.events.get()
        if event.finished:
            self.open.discard(index)
        return index, event

    def abort_open(self, submitted: Optional[int] = None) -> None:
        """Abort every request that has not finished (its client left, or a sibling could not be queued)."""
        for i in sorted(self.open)[:submitted]:
            self.engine_loop.abort(self.request_ids[i])
        self.open.clear()


def _failure(event: TokenEvent) -> p.ApiError:
    """The error a request that ended without finishing gets (its deadline passed, or a step or worker failed)."""
    code = "request_timeout" if event.finish_reason == "timeout" else "worker_failure"
    return p.ApiError(500, event.error or f"the request ended: {event.finish_reason}", type_="server_error", code=code)


def _check_failed(event: TokenEvent) -> None:
    if event.finished and event.finish_reason not in FINISH_REASONS:
        raise _failure(event)


async def _until_disconnect(request: Request) -> None:
    """Return once the client has closed the connection (the request body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next_unless_gone(sub: Submitted, watcher: asyncio.Future) -> Optional[tuple[int, TokenEvent]]:
    """The next event of ``sub``, or None once the client has gone (``watcher``, ``_until_disconnect``, is done)."""
    getter = asyncio.ensure_future(sub.next())
    await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if not getter.done():
        getter.cancel()
        return None
    return getter.result()


async def _collect(sub: Submitted, request: Request) -> Optional[list[tuple[str, str, int, int]]]:
    """Wait for every request to finish: (text, finish_reason, prompt tokens, completion tokens) each.

    None when the client went away (its requests are aborted then).
    """
    texts = [""] * len(sub.request_ids)
    ends: dict[int, TokenEvent] = {}
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        while sub.open:
            got = await _next_unless_gone(sub, watcher)
            if got is None:
                return None
            index, event = got
            texts[index] += event.text
            _check_failed(event)
            if event.finished:
                ends[index] = event
    finally:
        watcher.cancel()
        sub.abort_open()
    return [(texts[i], FINISH_REASONS[e.finish_reason or "stop"], e.prompt_tokens, e.completion_tokens)
            for i, e in sorted(ends.items())]


async def _stream(sub: Submitted, chat: bool, model: str, response_id: str, include_usage: bool,
                  request: Request) -> AsyncIterator[bytes]:
    """Server-sent events: a chunk per new text, a last chunk with the finish reason, usage, ``[DONE]``.

    A client that leaves is noticed at once, not at the next write (while a long prompt is still
    being prefilled nothing is written for a while): its requests are aborted then.
    """
    created = p.now_s()
    prompt_tokens = completion_tokens = 0
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        if chat:
            yield _sse(p.chat_chunk(response_id, created, model, {"role": "assistant", "content": ""}, None))
        while sub.open:
            got = await _next_unless_gone(sub, watcher)
            if got is None:
                return
            index, event = got
            if event.finished and event.finish_reason not in FINISH_REASONS:
                yield _sse(_failure(event).body())
                break
            reason = FINISH_REASONS[event.finish_reason] if event.finished else None
            if event.text or reason:
                if chat:
                    delta = {"content": event.text} if event.text else {}
                    yield _sse(p.chat_chunk(response_id, created, model, delta, reason))
                else:
                    yield _sse(p.completion_chunk(response_id, created, model, index, event.text, reason))
            if event.finished:
                prompt_tokens += event.prompt_tokens
                completion_tokens += event.completion_tokens
        else:
            if include_usage:
                kind = "chat.completion.chunk" if chat else "text_completion"
                yield _sse(p.usage_chunk(response_id, created, model, kind, p.usage(prompt_tokens, completion_tokens)))
        yield b"data: [DONE]\n\n"
    finally:  # a client that disconnects lands here too: its requests are aborted, their KV blocks freed
        watcher.cancel()
        sub.abort_open()


class AuthAndCount:
    """ASGI middleware: checks the API key on /v1/ routes and counts responses by route and status.

    A plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``) so that the routes still see the
    client's disconnect, which is how an abandoned request gets aborted.
    """

    ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app: ASGIApp, api_key: Optional[str], metrics: ServerMetrics) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key is not None else None
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"]
        given = Headers(scope=scope).get("authorization", "").encode()
        if self.expected is not None and path.startswith("/v1/") and not hmac.compare_digest(given, self.expected):
            refusal = p.ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                 code="invalid_api_key")
            await _error_response(refusal)(scope, receive, send_counted)
        else:
            await self.app(scope, receive, send_counted)
        self.metrics.http_requests.labels(path if path in self.ROUTES else "other", str(status)).inc()


def create_app(engine_loop: EngineLoop, info: ModelInfo, api_key: Optional[str] = None) -> FastAPI:
    """The HTTP application over a started ``EngineLoop`` serving the model ``info`` describes."""
    app = FastAPI(title="minidisagg", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = engine_loop.metrics

    @app.exception_handler(p.ApiError)
    async def api_error(request: Request, exc: p.ApiError) -> JSONResponse:
        """An ``ApiError``: its status and the OpenAI error body."""
        return _error_response(exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        """Anything else: a 500 saying what broke (the server stays up)."""
        return _error_response(p.ApiError(500, f"{type(exc).__name__}: {exc}", type_="server_error"))

    app.add_middleware(AuthAndCount, api_key=api_key, metrics=metrics)

    async def body_of(request: Request) -> Any:
        """The request's JSON body; 400 when it is not JSON."""
        try:
            return await request.json()
        except ValueError:
            raise p.ApiError(400, "the request body is not valid JSON") from None

    async def respond(request: Request, sub: Submitted, chat: bool, model: str, response_id: str,
                      stream: bool, include_usage: bool) -> Response:
        """Stream the submitted requests' events, or wait for them and answer once."""
        if stream:
            return StreamingResponse(_stream(sub, chat, model, response_id, include_usage, request),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await _collect(sub, request)
        if results is None:
            return Response(status_code=499)  # the client closed the connection; nobody reads this
        total = p.usage(sum(r[2] for r in results), sum(r[3] for r in results))
        if chat:
            text, reason = results[0][0], results[0][1]
            choices: list[dict[str, Any]] = [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "logprobs": None, "finish_reason": reason}]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": r[0], "logprobs": None, "finish_reason": r[1]} for i, r in enumerate(results)]
            obj = "text_completion"
        return JSONResponse({"id": response_id, "object": obj, "created": p.now_s(), "model": model,
                             "choices": choices, "usage": total})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        """``POST /v1/completions``."""
        req = parse_body(p.CompletionRequest, await body_of(request))
        check_model(req.model, info)
        params = completion_params(req)
        prompts = completion_prompts(req, info)
        response_id = p.new_id("cmpl")
        sub = Submitted(engine_loop, prompts, params, response_id)
        return await respond(request, sub, False, req.model, response_id, req.stream, req.include_usage())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        req = parse_body(p.ChatCompletionRequest, await body_of(request))
        check_model(req.model, info)
        prompt = chat_prompt(req, info)
        params = chat_params(req, prompt, info)
        response_id = p.new_id("chatcmpl")
        sub = Submitted(engine_loop, [prompt], params, response_id)
        return await respond(request, sub, True, req.model, response_id, req.stream, req.include_usage())

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """``GET /v1/models``: the one model served."""
        return {"object": "list", "data": [{"id": info.name, "object": "model", "created": 0,
                                            "owned_by": "minidisagg", "max_model_len": info.max_model_len}]}

    @app.get("/health")
    async def health() -> Response:
        """``GET /health``: 200 while the engine loop runs, else 503."""
        if not engine_loop.alive:
            return JSONResponse({"status": "down", "error": engine_loop.failure}, status_code=503)
        return JSONResponse({"status": "ok", "requests": engine_loop.num_accepted,
                             "last_step_failure": engine_loop.failure})

    @app.get("/metrics")
    async def prometheus() -> Response:
        """``GET /metrics``: the Prometheus text exposition."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
