"""The HTTP API of `06_serve --mode api`: the FastAPI app, its routes, and the service they share.

Routes: `POST /generate` (our own format), OpenAI-compatible `POST /v1/chat/completions`,
`POST /v1/completions`, `GET /v1/models` and `GET /v1/models/{id}`, `GET /health`, the chat page at `GET /`,
OpenAPI docs at `/docs`. Every request is validated (`utils.openai_api` holds the request models and the
response shapes), formatted and tokenized on the event loop, then handed to the `Scheduler` thread
(`utils.scheduler`) that owns the model; each request's text streams back to its own asyncio queue. Errors
share one JSON shape, OpenAI's: `{"error": {"message", "type", "param", "code"}}`; a client's mistake is a
4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from utils.decoding import (
    ContextLengthError,
    GenerationError,
    GenerationResult,
    GenerationSettings,
    StreamEvent,
    TokenLogprob,
    check_fits,
)
from utils.generation import Prompt, encode_prompt
from utils.loading import LoadedModel
from utils.openai_api import (
    ChatCompletionRequest,
    CompletionLogprobs,
    CompletionRequest,
    GenerateRequest,
    TokenText,
    chat_logprobs,
    fold_choices,
    generate_body,
    generation_settings,
    openai_finish,
    sse,
    usage,
)
from utils.scheduler import QueueFullError, Scheduler, ScoreJob, ScoringError
from utils.templates import TEMPLATES

WEB_PAGE = Path(__file__).resolve().parent / "web" / "chat.html"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "SERVE_API_KEY"
# Routes that never need the API key: the liveness probe, and the static chat page (it holds no data and
# asks for the key, which it then sends as a Bearer token on every API call).
OPEN_PATHS = ("/health", "/")
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
T = TypeVar("T")


@dataclass
class ServerSettings:
    model_id: str  # the name served: listed by /v1/models, and the only `model` a request may name
    default_template: str | None = None  # None: plain completion (a base checkpoint)
    max_new_tokens_cap: int = 512
    default_max_new_tokens: int = 256
    max_batch_size: int = 8
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    request_timeout: float = 30.0  # seconds to send the whole body once the headers are in
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers at all


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --------------------------------------------------------------------------- a request's link to the scheduler


class Generation:
    """One request's link to the scheduler: its sequence and the asyncio queue its events arrive on."""

    def __init__(self, scheduler: Scheduler, prompt_ids: list[int], settings: GenerationSettings):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self.seq = scheduler.decoder.new_sequence(
            prompt_ids, settings, lambda event: loop.call_soon_threadsafe(self.events.put_nowait, event)
        )
        try:
            scheduler.submit(self.seq)
        except QueueFullError:
            raise _busy() from None

    async def stream(self) -> AsyncIterator[StreamEvent]:
        """Events until the last one; stopping early (client gone) cancels the sequence."""
        done = False
        try:
            while True:
                event = await self.events.get()
                if event.error:
                    raise ApiError(500, event.error, kind="server_error")
                done = event.result is not None
                yield event
                if done:
                    return
        finally:
            if not done:
                self.seq.cancel()

    async def result(self, request: Request) -> GenerationResult:
        """The whole result; a client that hangs up first cancels the sequence instead of spending its budget."""
        return await _unless_hung_up(request, self._final(), self.seq.cancel)

    async def _final(self) -> GenerationResult:
        async for event in self.stream():
            if event.result is not None:
                return event.result
        raise ApiError(500, "generation ended without a result", kind="server_error")


def _busy() -> ApiError:
    return ApiError(503, "the server is busy: the request queue is full, retry later", kind="server_busy")


async def _hung_up(request: Request) -> None:
    """Returns once the client disconnects: its body is read, so receive() has nothing else to deliver."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_hung_up(request: Request, work: Awaitable[T], on_hang_up: Callable[[], None]) -> T:
    """`work`'s result, unless the client disconnects first: then `work` is cancelled and `on_hang_up` called."""
    final = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_hung_up(request))
    try:
        await asyncio.wait((final, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        final.cancel()
    if not final.done():
        on_hang_up()
        raise ApiError(499, "the client closed the connection before the reply was ready")
    return final.result()


async def _merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of several streams as they come; the first failure ends them all (the rest are cancelled)."""
    items: asyncio.Queue[tuple[T | None, BaseException | None, bool]] = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                items.put_nowait((item, None, False))
        except Exception as err:  # noqa: BLE001 - handed to the consumer, which raises it
            items.put_nowait((None, err, True))
            return
        items.put_nowait((None, None, True))

    tasks = [asyncio.ensure_future(pump(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            item, error, ended = await items.get()
            if error is not None:
                raise error
            if ended:
                running -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


# --------------------------------------------------------------------------- the service


class Service:
    """What the routes share: the loaded model, the settings and the scheduler."""

    def __init__(self, loaded: LoadedModel, settings: ServerSettings):
        self.loaded = loaded
        self.settings = settings
        self.window = loaded.model.config.max_position_embeddings
        # Ids past the tokenizer cannot be shown, past the embedding cannot be run.
        self.vocab_size = min(len(loaded.tokenizer), loaded.model.config.vocab_size)
        self.scheduler = Scheduler(loaded, settings.max_batch_size, settings.max_queue)
        self.tokens = TokenText(loaded.tokenizer)

    def check_model(self, requested: str | None) -> None:
        """A request may name the served model or none; another name is vLLM's and OpenAI's 404."""
        if requested and requested != self.settings.model_id:
            raise ApiError(404, f"The model `{requested}` does not exist.", "model", code="model_not_found")

    def completion_prompt(self, prompt: str | list[int], param: str) -> tuple[list[int], str]:
        """A /v1/completions prompt's ids and the text `echo` returns for it."""
        if isinstance(prompt, str):
            return self.encode(prompt, None, param), prompt
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"{param} holds token id {bad}, outside the vocabulary (0-{self.vocab_size - 1})",
                           param)
        return list(prompt), self.loaded.tokenizer.decode(prompt)

    def score(self, ids: list[int], top: int) -> asyncio.Future[list[TokenLogprob]]:
        """The entries of `ids[1:]`, computed on the scheduler's thread, the model's only user."""
        job = ScoreJob(ids, top)
        try:
            self.scheduler.submit(job)
        except QueueFullError:
            raise _busy() from None
        return asyncio.wrap_future(job.future)

    def template(self, requested: str | None) -> str | None:
        if requested == "none":
            return None
        return requested or self.settings.default_template

    def encode(self, prompt: Prompt, template: str | None, param: str) -> list[int]:
        texts = [(param, prompt)] if isinstance(prompt, str) else [
            (f"{param}.{i}.content", m["content"]) for i, m in enumerate(prompt)
        ]
        for where, text in texts:
            _require_unicode(text, where)
        try:
            return encode_prompt(self.loaded.tokenizer, prompt, template)
        except GenerationError as err:
            raise ApiError(400, str(err), param) from None

    def budget(self, requested: int | None, prompt_tokens: int, param: str) -> int:
        """max_new_tokens: capped by the server; omitted = as much as fits, up to the server default."""
        cap = self.settings.max_new_tokens_cap
        if requested is None:
            room = self.window - prompt_tokens
            if room < 1:
                raise ApiError(400, f"prompt ({prompt_tokens} tokens) fills the model's context window of "
                                    f"{self.window} tokens; no room to generate", "prompt",
                               code=CONTEXT_LENGTH_EXCEEDED)
            return min(self.settings.default_max_new_tokens, cap, room)
        wanted = min(requested, cap)
        try:
            check_fits(prompt_tokens, wanted, self.window)
        except ContextLengthError as err:
            raise ApiError(400, str(err), param, code=CONTEXT_LENGTH_EXCEEDED) from None
        return wanted

    def start(self, prompt_ids: list[int], settings: GenerationSettings) -> Generation:
        try:
            return Generation(self.scheduler, prompt_ids, settings)
        except GenerationError as err:
            raise ApiError(400, str(err)) from None


def _require_unicode(text: str, param: str) -> None:
    """JSON can escape a lone UTF-16 surrogate (`\\ud800`): that is no character, and no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(400, f"{param} holds a lone UTF-16 surrogate at character {err.start}: not valid Unicode text",
                       param) from None


# --------------------------------------------------------------------------- /v1/completions' prompts


@dataclass
class CompletionPart:
    """One prompt of a /v1/completions request and the work started for it."""

    ids: list[int]
    text: str  # what `echo` returns
    scoring: asyncio.Future[list[TokenLogprob]] | None  # echo with logprobs
    generation: Generation | None  # None: max_tokens 0

    def cancel(self) -> None:
        if self.scoring is not None:
            self.scoring.cancel()
        if self.generation is not None:
            self.generation.seq.cancel()


async def _scored(scoring: asyncio.Future[list[TokenLogprob]]) -> list[TokenLogprob]:
    """The echoed prompt's entries; the scheduler thread's failure to score it is the server's error."""
    try:
        return await scoring
    except ScoringError as err:
        raise ApiError(500, str(err), kind="server_error") from None


async def _completion_pieces(service: Service, index: int, part: CompletionPart, body: CompletionRequest
                             ) -> AsyncIterator[tuple[dict[str, Any], GenerationResult | None]]:
    """One choice's pieces, each with the final result once there is one: the echoed prompt, then the text as it
    is generated."""
    logprobs = CompletionLogprobs(service.tokens) if body.logprobs is not None else None
    finish = None if part.generation else "length"
    if body.echo:
        piece = None
        if logprobs is not None:
            piece = logprobs.piece(await _scored(part.scoring), first=part.ids[0])
        yield {"index": index, "text": part.text, "logprobs": piece, "finish_reason": finish}, None
    elif part.generation is None:
        piece = logprobs.piece([]) if logprobs is not None else None
        yield {"index": index, "text": "", "logprobs": piece, "finish_reason": finish}, None
    if part.generation is None:
        return
    async for event in part.generation.stream():
        finish = None if event.result is None else openai_finish(event.result.finish_reason)
        piece = logprobs.piece(event.logprobs) if logprobs is not None else None
        yield {"index": index, "text": event.delta, "logprobs": piece, "finish_reason": finish}, event.result


def _completion_usage(parts: list[CompletionPart], results: dict[int, GenerationResult]) -> dict[str, int]:
    prompt = sum(len(p.ids) for p in parts)
    completion = sum(len(r.tokens) for r in results.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# --------------------------------------------------------------------------- routes


def register_routes(app: FastAPI, service: Service) -> None:
    for route in ROUTES:
        route(app, service)


def _route_health(app: FastAPI, service: Service) -> None:
    @app.get("/health", tags=["meta"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.settings.model_id, "context_length": service.window,
                **service.scheduler.stats()}


def _route_chat_page(app: FastAPI, service: Service) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(
            WEB_PAGE.read_text(encoding="utf-8"),
            headers={"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                                "style-src 'unsafe-inline'; connect-src 'self'"},
        )


def _route_models(app: FastAPI, service: Service) -> None:
    model_id = service.settings.model_id
    # context_length and max_tokens_cap (extensions) let a client fit its prompt and max_tokens.
    card = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "local",
            "context_length": service.window, "max_tokens_cap": service.settings.max_new_tokens_cap}

    @app.get("/v1/models", tags=["openai"])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    # `path`: a served name like `sft/tiny/final` holds slashes.
    @app.get("/v1/models/{model:path}", tags=["openai"])
    async def model_card(model: str) -> dict[str, Any]:
        if model != model_id:
            raise ApiError(404, f"The model `{model}` does not exist.", "model", code="model_not_found")
        return card


def _route_generate(app: FastAPI, service: Service) -> None:
    @app.post("/generate", tags=["generate"])
    async def generate(body: GenerateRequest, request: Request):
        template = service.template(body.template)
        ids = service.encode(body.prompt, template, "prompt")
        settings = generation_settings(body, service.budget(body.max_new_tokens, len(ids), "max_new_tokens"))
        generation = service.start(ids, settings)
        if not body.stream:
            return generate_body(await generation.result(request), service.settings.model_id)
        return _event_stream(_generate_events(generation, service.settings.model_id))


async def _generate_events(generation: Generation, model_id: str) -> AsyncIterator[str]:
    async for event in _guarded(generation.stream()):
        if isinstance(event, dict):
            yield sse(event)
        elif event.result is None:
            yield sse({"delta": event.delta})
        else:
            yield sse({"delta": event.delta, **generate_body(event.result, model_id)})
    yield sse("[DONE]")


def _route_chat_completions(app: FastAPI, service: Service) -> None:
    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        service.check_model(body.model)
        messages = [m.plain() for m in body.messages]
        ids = service.encode(messages, service.template(body.template), "messages")
        requested = body.max_completion_tokens or body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        settings = generation_settings(body, service.budget(requested, len(ids), "max_tokens"), logprobs=top)
        generation = service.start(ids, settings)
        reply = ChatReply(service.tokens, body, {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                                                 "model": service.settings.model_id})
        if not body.stream:
            return reply.completion(await generation.result(request))
        return _event_stream(_chat_events(reply, generation))


@dataclass
class ChatReply:
    """The shapes of one /v1/chat/completions reply: the whole completion, or its stream's chunks."""

    tokens: TokenText
    body: ChatCompletionRequest
    head: dict[str, Any]  # id, created, model: the same in every chunk

    def logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        return {"content": chat_logprobs(self.tokens, entries), "refusal": None} if self.body.logprobs else None

    def completion(self, result: GenerationResult) -> dict[str, Any]:
        message = {"role": "assistant", "content": result.text}
        choice = {"index": 0, "message": message, "finish_reason": openai_finish(result.finish_reason),
                  "logprobs": self.logprobs(result.logprobs or [])}
        return {**self.head, "object": "chat.completion", "choices": [choice], "usage": usage(result)}

    def chunk(self, delta: dict[str, str], finish: str | None,
              entries: list[TokenLogprob] | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish,
                  "logprobs": self.logprobs(entries) if entries else None}
        return {**self.head, "object": "chat.completion.chunk", "choices": [choice]}


async def _chat_events(reply: ChatReply, generation: Generation) -> AsyncIterator[str]:
    yield sse(reply.chunk({"role": "assistant", "content": ""}, None))
    async for event in _guarded(generation.stream()):
        if isinstance(event, dict):
            yield sse(event)
            break
        # A piece of text and the tokens sampled for it; tokens that add no text yet wait for the next.
        if event.delta:
            yield sse(reply.chunk({"content": event.delta}, None, event.logprobs))
        if event.result is not None:
            pending = [] if event.delta else event.logprobs
            yield sse(reply.chunk({}, openai_finish(event.result.finish_reason), pending))
            if reply.body.stream_options and reply.body.stream_options.include_usage:
                yield sse({**reply.head, "object": "chat.completion.chunk", "choices": [],
                           "usage": usage(event.result)})
    yield sse("[DONE]")


def _route_completions(app: FastAPI, service: Service) -> None:
    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: CompletionRequest, request: Request):
        service.check_model(body.model)
        parts = _start_completion(service, body)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": service.settings.model_id}
        pieces = _merged([_completion_pieces(service, i, part, body) for i, part in enumerate(parts)])
        results: dict[int, GenerationResult] = {}
        if not body.stream:
            collected = await _unless_hung_up(request, _collect(pieces, results), lambda: _cancel(parts))
            return {**head, "choices": fold_choices(collected, len(parts)), "usage": _completion_usage(parts, results)}
        return _event_stream(_completion_events(pieces, parts, results, body, head))


def _start_completion(service: Service, body: CompletionRequest) -> list[CompletionPart]:
    """Every prompt is checked before any starts, so a 400 leaves nothing running; a full queue cancels the
    prompts already started."""
    one = len(body.prompt) == 1
    planned = []
    for i, prompt in enumerate(body.prompt):
        param = "prompt" if one else f"prompt.{i}"
        ids, text = service.completion_prompt(prompt, param)
        planned.append((ids, text, service.budget(body.max_tokens, len(ids), "max_tokens")))
    parts: list[CompletionPart] = []
    try:
        for ids, text, max_new in planned:
            scoring = service.score(ids, body.logprobs) if body.echo and body.logprobs is not None else None
            parts.append(CompletionPart(ids, text, scoring, None))
            if max_new:
                parts[-1].generation = service.start(ids, generation_settings(body, max_new, logprobs=body.logprobs))
    except ApiError:
        _cancel(parts)
        raise
    return parts


def _cancel(parts: list[CompletionPart]) -> None:
    for part in parts:
        part.cancel()


async def _collect(pieces: AsyncIterator[tuple[dict[str, Any], GenerationResult | None]],
                   results: dict[int, GenerationResult]) -> list[dict[str, Any]]:
    """All the pieces of the choices; each choice's final result lands in `results`, by index."""
    collected = []
    async for piece, result in pieces:
        collected.append(piece)
        if result is not None:
            results[piece["index"]] = result
    return collected


async def _completion_events(pieces: AsyncIterator[tuple[dict[str, Any], GenerationResult | None]],
                             parts: list[CompletionPart], results: dict[int, GenerationResult],
                             body: CompletionRequest, head: dict[str, Any]) -> AsyncIterator[str]:
    try:
        async for item in _guarded(pieces):
            if isinstance(item, dict):
                yield sse(item)
                break
            piece, result = item
            if result is not None:
                results[piece["index"]] = result
            if piece["text"] or piece["finish_reason"] or (piece["logprobs"] or {}).get("tokens"):
                yield sse({**head, "choices": [piece]})
        else:
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**head, "choices": [], "usage": _completion_usage(parts, results)})
    finally:
        _cancel(parts)
    yield sse("[DONE]")


ROUTES = (_route_health, _route_chat_page, _route_models, _route_generate, _route_chat_completions,
          _route_completions)


async def _guarded(events: AsyncIterator[T]) -> AsyncIterator[T | dict[str, Any]]:
    """Once a stream has started its status is sent; a later failure becomes a final error event."""
    try:
        async for event in events:
            yield event
    except ApiError as err:
        yield error_body(err.message, err.kind, err.param, err.code)


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _unreadable_body(problems: list[dict[str, Any]]) -> str | None:
    """Why the body is no JSON object at all (then there is no field to name), or None."""
    for problem in problems:
        if problem.get("type") == "json_invalid":
            reason = problem.get("ctx", {}).get("error", "decode error")
            return f"the request body is not valid JSON: {reason} at character {problem['loc'][-1]}"
        if tuple(problem.get("loc", ())) == ("body",):
            return "the request body must be a JSON object, sent with 'Content-Type: application/json'"
    return None


def register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(error_body(err.message, err.kind, err.param, err.code), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        kind = "server_error" if err.status_code >= 500 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, err: Exception) -> JSONResponse:
        # Starlette still logs the traceback; the client gets the usual error object, not a plain-text page.
        return JSONResponse(error_body("internal server error (the server log has the details)", "server_error"),
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        unreadable = _unreadable_body(problems)
        if unreadable:
            return JSONResponse(error_body(unreadable, "invalid_request_error"), status_code=400)
        fields = [_field_name(tuple(p.get("loc", ()))) for p in problems]
        message = "; ".join(f"{f}: {p.get('msg', 'invalid')}" for f, p in zip(fields, problems))
        body = error_body(f"invalid request: {message}", "invalid_request_error", fields[0] if fields else None)
        body["detail"] = [{"loc": list(p.get("loc", ())), "msg": p.get("msg"), "type": p.get("type")} for p in problems]
        return JSONResponse(body, status_code=400)


class Guard:
    """ASGI middleware, before any route runs: the Bearer API key (when set), the body size limit, and a deadline
    for the body (uvicorn has none: a client that trickles its body in would hold its connection forever)."""

    def __init__(self, app: Callable, api_key: str | None, max_body_bytes: int, request_timeout: float):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            await _respond(send, 401, error_body("missing or invalid API key: send 'Authorization: Bearer <key>'",
                                                 "authentication_error"), {"www-authenticate": "Bearer"})
            return
        declared = headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _respond(send, 413, self._too_large())
            return
        try:
            async with asyncio.timeout(self.request_timeout):
                messages = await self._read_body(receive)
        except TimeoutError:
            message = f"the request body did not arrive within {self.request_timeout:g} s"
            await _respond(send, 408, error_body(message, "invalid_request_error"), {"connection": "close"})
            return
        if messages is None:
            await _respond(send, 413, self._too_large())
            return

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Callable) -> list[dict] | None:
        """The body's messages, or None once it grows past the limit."""
        body, more, messages = 0, True, []
        while more:
            message = await receive()
            messages.append(message)
            body += len(message.get("body", b""))
            more = message.get("more_body", False) and message["type"] == "http.request"
            if body > self.max_body_bytes:
                return None
        return messages

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def _too_large(self) -> dict[str, Any]:
        return error_body(f"request body exceeds the server limit of {self.max_body_bytes} bytes",
                          "invalid_request_error")


async def _respond(send: Callable, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    header_list = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    header_list += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": header_list})
    await send({"type": "http.response.body", "body": raw})


def create_app(loaded: LoadedModel, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving `loaded`; the scheduler thread starts and stops with the app's lifespan."""
    service = Service(loaded, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.scheduler.start()
        yield
        service.scheduler.stop()

    app = FastAPI(
        title="mini-LLM server",
        description=f"Serving {settings.model_id}. OpenAI-compatible routes under /v1; templates: "
                    f"{', '.join(TEMPLATES)}.",
        lifespan=lifespan,
    )
    app.state.service = service
    register_error_handlers(app)
    register_routes(app, service)
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       request_timeout=settings.request_timeout)
    if settings.cors_origins:
        # Added last, so it runs first: it answers a browser's preflight, which carries no API key, before the
        # Guard, and it adds its headers to the Guard's 401s too, so a page can read why it was refused.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    return app


def parse_cors_origins(value: str | None) -> list[str]:
    """`--cors_origins`: comma-separated origins (`scheme://host[:port]`, as browsers send them) or `*`."""
    if value is None:
        return []
    origins = [origin.strip() for origin in value.split(",") if origin.strip()]
    if not origins:
        raise ValueError("--cors_origins is empty: give origins such as https://app.example.com, or *")
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"--cors_origins: {origin!r} is not an origin: a browser sends scheme://host[:port], "
                             "with no path and no trailing slash (e.g. http://localhost:3000), or use *")
    return origins


def api_key_for(host: str, flag: str | None) -> str | None:
    """The API key (flag, else environment); refuses to bind beyond loopback without one."""
    key = flag or os.environ.get(API_KEY_ENV) or None
    if host not in LOCAL_HOSTS and not key:
        raise ValueError(
            f"--host {host} exposes the server beyond this machine: set --api_key (or {API_KEY_ENV}) so every "
            "request must carry 'Authorization: Bearer <key>', or keep the default --host 127.0.0.1"
        )
    return key
