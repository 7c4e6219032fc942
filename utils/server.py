"""The HTTP API of `06_serve --mode api`: FastAPI app, request models, and the batching scheduler.

Routes: `POST /generate` (our own format), OpenAI-compatible `POST /v1/chat/completions`,
`POST /v1/completions` and `GET /v1/models`, `GET /health`, the chat page at `GET /`, OpenAPI docs at
`/docs`. Every request is validated, formatted and tokenized on the event loop, then handed to one
`Scheduler` thread that owns the model: it admits queued requests into a running `BatchDecoder`
between decode steps (continuous batching), and streams each request's text back to its own asyncio
queue. Errors share one JSON shape, OpenAI's: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from utils.generation import (
    BatchDecoder,
    ContextLengthError,
    GenerationError,
    GenerationResult,
    GenerationSettings,
    LoadedModel,
    Prompt,
    SequenceState,
    StreamEvent,
    check_fits,
    encode_prompt,
)
from utils.templates import TEMPLATES

WEB_PAGE = Path(__file__).resolve().parent / "web" / "chat.html"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "SERVE_API_KEY"
# Routes that never need the API key: the liveness probe, and the static chat page (it holds no data and
# asks for the key, which it then sends as a Bearer token on every API call).
OPEN_PATHS = ("/health", "/")
TemplateName = Literal["chatml", "instruct", "chat", "none"]


@dataclass
class ServerSettings:
    model_id: str
    default_template: str | None = None  # None: plain completion (a base checkpoint)
    max_new_tokens_cap: int = 512
    default_max_new_tokens: int = 256
    max_batch_size: int = 8
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    api_key: str | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --------------------------------------------------------------------------- scheduler


class QueueFullError(Exception):
    pass


class Scheduler:
    """The one thread that runs the model: admits queued sequences between steps, up to `max_batch_size`."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int, max_queue: int):
        # Its own tokenizer copy: the event loop encodes prompts while this thread decodes.
        self.decoder = BatchDecoder(loaded.model, copy.deepcopy(loaded.tokenizer), max_batch_size=max_batch_size)
        self.pending: queue.Queue[SequenceState | None] = queue.Queue(maxsize=max_queue)
        self.completed = 0
        self.generated_tokens = 0
        self.thread = threading.Thread(target=self._loop, name="decode-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.pending.put(None)
        self.thread.join(timeout=10)

    def submit(self, seq: SequenceState) -> None:
        try:
            self.pending.put_nowait(seq)
        except queue.Full:
            raise QueueFullError from None

    def stats(self) -> dict[str, int]:
        return {
            "active": len(self.decoder), "queued": self.pending.qsize(), "completed": self.completed,
            "generated_tokens": self.generated_tokens, "max_batch_size": self.decoder.max_batch_size,
        }

    def _admit(self, seq: SequenceState) -> None:
        if seq.cancelled:
            return
        try:
            self.decoder.add(seq)
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
            seq.fail(f"generation failed: {err}")
        self._count(seq)

    def _count(self, seq: SequenceState) -> None:
        if seq.result is not None:
            self.completed += 1
            self.generated_tokens += len(seq.result.tokens)

    def _loop(self) -> None:
        while True:
            if not len(self.decoder):
                item = self.pending.get()
                if item is None:
                    return
                self._admit(item)
            while self.decoder.has_room:
                try:
                    item = self.pending.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    return
                self._admit(item)
            running = list(self.decoder.sequences)
            try:
                self.decoder.step()
            except Exception as err:  # noqa: BLE001 - fail the batch, keep serving
                for seq in running:
                    seq.fail(f"generation failed: {err}")
                self.decoder = BatchDecoder(self.decoder.model, self.decoder.tokenizer, self.decoder.max_batch_size)
            for seq in running:
                self._count(seq)


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
            raise ApiError(503, "the server is busy: the request queue is full, retry later",
                           kind="server_busy") from None

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

    async def result(self) -> GenerationResult:
        async for event in self.stream():
            if event.result is not None:
                return event.result
        raise ApiError(500, "generation ended without a result", kind="server_error")


# --------------------------------------------------------------------------- request models


class GenerateRequest(BaseModel):
    """`POST /generate`. Unknown fields are rejected, so a typo is a 422 naming it."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    max_new_tokens: int | None = Field(None, ge=1, description="capped by the server's --max_new_tokens_cap")
    temperature: float = Field(0.7, ge=0, le=5, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="1.0 = off")
    template: TemplateName | None = Field(
        None, description="prompt template; default: the checkpoint's (none = raw completion for a base model)"
    )
    stop: list[str] | str | None = None
    seed: int | None = None
    stream: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """Fields shared by the OpenAI routes; fields OpenAI has and we do not use are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stop: list[str] | str | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int = Field(0, ge=0, description="extension (extra_body)")
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="extension (extra_body)")


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    template: TemplateName | None = Field(None, description="extension (extra_body); default: the checkpoint's")


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)

    @model_validator(mode="after")
    def _single_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("prompt: only one prompt per request is supported")
        return self


# --------------------------------------------------------------------------- the app


def _stops(stop: list[str] | str | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


class Service:
    """What the routes share: the loaded model, the settings and the scheduler."""

    def __init__(self, loaded: LoadedModel, settings: ServerSettings):
        self.loaded = loaded
        self.settings = settings
        self.window = loaded.model.config.max_position_embeddings
        self.scheduler = Scheduler(loaded, settings.max_batch_size, settings.max_queue)

    def template(self, requested: str | None) -> str | None:
        if requested == "none":
            return None
        return requested or self.settings.default_template

    def encode(self, prompt: Prompt, template: str | None, param: str) -> list[int]:
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
                                    f"{self.window} tokens; no room to generate", "prompt")
            return min(self.settings.default_max_new_tokens, cap, room)
        wanted = min(requested, cap)
        try:
            check_fits(prompt_tokens, wanted, self.window)
        except ContextLengthError as err:
            raise ApiError(400, str(err), param, kind="context_length_exceeded") from None
        return wanted

    def start(self, prompt_ids: list[int], settings: GenerationSettings) -> Generation:
        try:
            return Generation(self.scheduler, prompt_ids, settings)
        except GenerationError as err:
            raise ApiError(400, str(err)) from None


def _settings(body: GenerateRequest | OpenAIRequest, max_new_tokens: int) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=max_new_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
        repetition_penalty=body.repetition_penalty, stop=_stops(body.stop), seed=body.seed,
    )


def _usage(result: GenerationResult) -> dict[str, int]:
    n = len(result.tokens)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}


def _generate_body(result: GenerationResult, model_id: str) -> dict[str, Any]:
    return {
        "text": result.text, "tokens": len(result.tokens), "prompt_tokens": result.prompt_tokens,
        "finish_reason": result.finish_reason, "timings": result.timings, "model": model_id,
    }


def _openai_finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def register_routes(app: FastAPI, service: Service) -> None:
    model_id = service.settings.model_id

    @app.get("/health", tags=["meta"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, **service.scheduler.stats()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(
            WEB_PAGE.read_text(encoding="utf-8"),
            headers={"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                                "style-src 'unsafe-inline'; connect-src 'self'"},
        )

    @app.get("/v1/models", tags=["openai"])
    async def models() -> dict[str, Any]:
        card = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "local"}
        return {"object": "list", "data": [card]}

    @app.post("/generate", tags=["generate"])
    async def generate(body: GenerateRequest):
        template = service.template(body.template)
        ids = service.encode(body.prompt, template, "prompt")
        settings = _settings(body, service.budget(body.max_new_tokens, len(ids), "max_new_tokens"))
        generation = service.start(ids, settings)
        if not body.stream:
            return _generate_body(await generation.result(), model_id)

        async def events() -> AsyncIterator[str]:
            async for event in _guarded(generation.stream()):
                if isinstance(event, dict):
                    yield _sse(event)
                elif event.result is None:
                    yield _sse({"delta": event.delta})
                else:
                    yield _sse({"delta": event.delta, **_generate_body(event.result, model_id)})
            yield _sse("[DONE]")

        return _event_stream(events())

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest):
        messages = [m.plain() for m in body.messages]
        ids = service.encode(messages, service.template(body.template), "messages")
        requested = body.max_completion_tokens or body.max_tokens
        settings = _settings(body, service.budget(requested, len(ids), "max_tokens"))
        generation = service.start(ids, settings)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if not body.stream:
            result = await generation.result()
            message = {"role": "assistant", "content": result.text}
            choice = {"index": 0, "message": message, "finish_reason": _openai_finish(result.finish_reason),
                      "logprobs": None}
            return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(result)}

        def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}

        async def events() -> AsyncIterator[str]:
            yield _sse(chunk({"role": "assistant", "content": ""}, None))
            async for event in _guarded(generation.stream()):
                if isinstance(event, dict):
                    yield _sse(event)
                    break
                if event.delta:
                    yield _sse(chunk({"content": event.delta}, None))
                if event.result is not None:
                    yield _sse(chunk({}, _openai_finish(event.result.finish_reason)))
                    if body.stream_options and body.stream_options.include_usage:
                        usage = {**head, "object": "chat.completion.chunk", "choices": [],
                                 "usage": _usage(event.result)}
                        yield _sse(usage)
            yield _sse("[DONE]")

        return _event_stream(events())

    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: CompletionRequest):
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        ids = service.encode(prompt, None, "prompt")
        settings = _settings(body, service.budget(body.max_tokens, len(ids), "max_tokens"))
        generation = service.start(ids, settings)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}
        if not body.stream:
            result = await generation.result()
            choice = {"index": 0, "text": result.text, "finish_reason": _openai_finish(result.finish_reason),
                      "logprobs": None}
            return {**head, "choices": [choice], "usage": _usage(result)}

        async def events() -> AsyncIterator[str]:
            async for event in _guarded(generation.stream()):
                if isinstance(event, dict):
                    yield _sse(event)
                    break
                finish = None if event.result is None else _openai_finish(event.result.finish_reason)
                if event.delta or finish:
                    choice = {"index": 0, "text": event.delta, "finish_reason": finish, "logprobs": None}
                    yield _sse({**head, "choices": [choice]})
                if event.result is not None and body.stream_options and body.stream_options.include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(event.result)})
            yield _sse("[DONE]")

        return _event_stream(events())


async def _guarded(events: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent | dict[str, Any]]:
    """Once a stream has started its status is sent; a later failure becomes a final error event."""
    try:
        async for event in events:
            yield event
    except ApiError as err:
        yield error_body(err.message, err.kind)


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(error_body(err.message, err.kind, err.param), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        fields = [_field_name(tuple(p.get("loc", ()))) for p in problems]
        message = "; ".join(f"{f}: {p.get('msg', 'invalid')}" for f, p in zip(fields, problems))
        body = error_body(f"invalid request: {message}", "invalid_request_error", fields[0] if fields else None)
        body["detail"] = [{"loc": list(p.get("loc", ())), "msg": p.get("msg"), "type": p.get("type")} for p in problems]
        return JSONResponse(body, status_code=422)


class Guard:
    """ASGI middleware: the Bearer API key (when set) and the request body size limit, before any route runs."""

    def __init__(self, app: Callable, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

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
        body, more, messages = 0, True, []
        while more:
            message = await receive()
            messages.append(message)
            body += len(message.get("body", b""))
            more = message.get("more_body", False) and message["type"] == "http.request"
            if body > self.max_body_bytes:
                await _respond(send, 413, self._too_large())
                return

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

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
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    return app


def api_key_for(host: str, flag: str | None) -> str | None:
    """The API key (flag, else environment); refuses to bind beyond loopback without one."""
    key = flag or os.environ.get(API_KEY_ENV) or None
    if host not in LOCAL_HOSTS and not key:
        raise ValueError(
            f"--host {host} exposes the server beyond this machine: set --api_key (or {API_KEY_ENV}) so every "
            "request must carry 'Authorization: Bearer <key>', or keep the default --host 127.0.0.1"
        )
    return key
