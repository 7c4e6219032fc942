"""The HTTP API of `06_serve --mode api`: FastAPI app, request models, and the batching scheduler.

Routes: `POST /generate` (our own format), OpenAI-compatible `POST /v1/chat/completions`,
`POST /v1/completions` and `GET /v1/models`, `GET /health`, the chat page at `GET /`, OpenAPI docs at
`/docs`. Every request is validated, formatted and tokenized on the event loop, then handed to one
`Scheduler` thread that owns the model: it admits queued requests into a running `BatchDecoder`
between decode steps (continuous batching), and streams each request's text back to its own asyncio
queue. Errors share one JSON shape, OpenAI's: `{"error": {"message", "type", "param", "code"}}`; a
client's mistake is a 4xx, never a 500.
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
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt
from starlette.exceptions import HTTPException

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
# Sampling colder than this overflows the scaled logits to inf (NaN probabilities); it is greedy in all but name.
GREEDY_BELOW = 1e-5
# A smaller penalty divides repeated tokens' logits past float range, with the same NaN result.
MIN_REPETITION_PENALTY = 0.01


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
    request_timeout: float = 30.0  # seconds to send the whole body once the headers are in


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
        self.cancelled = 0
        self.failed = 0
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
        """`cancelled`: sequences whose client went away (dropped from the queue, or stopped mid-decode, which
        `completed` counts too); `failed`: ended by an internal error."""
        return {
            "active": len(self.decoder), "queued": self.pending.qsize(), "completed": self.completed,
            "cancelled": self.cancelled, "failed": self.failed, "generated_tokens": self.generated_tokens,
            "max_batch_size": self.decoder.max_batch_size,
        }

    def _admit(self, seq: SequenceState) -> None:
        if seq.cancelled:
            self.cancelled += 1
            return
        try:
            self.decoder.add(seq)
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
            seq.fail(f"generation failed: {err}")
        self._count(seq)

    def _count(self, seq: SequenceState) -> None:
        if seq.result is not None:
            self.generated_tokens += len(seq.result.tokens)
            self.completed += 1
            self.cancelled += seq.result.finish_reason == "cancelled"
        elif seq.finish_reason == "error":
            self.failed += 1

    def _new_decoder(self, max_batch_size: int) -> BatchDecoder:
        return BatchDecoder(self.decoder.model, self.decoder.tokenizer, max_batch_size)

    def _isolate(self, running: list[SequenceState]) -> None:
        """After a failed batch step, retries each of its sequences alone: only one that fails again is failed.

        The batch's cache is not trusted after a failure, so every survivor is prefilled again from its own
        tokens, once to retry the step alone and once more to rejoin the new batch.
        """
        self.decoder = self._new_decoder(self.decoder.max_batch_size)
        for seq in running:
            if seq.finish_reason is not None:
                continue
            try:
                alone = self._new_decoder(1)
                alone.resume(seq)
                alone.step()
                if seq.finish_reason is None:
                    self.decoder.resume(seq)
            except Exception as err:  # noqa: BLE001 - this sequence is the culprit
                seq.fail(f"generation failed: {err}")

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
            except Exception:  # noqa: BLE001 - find the sequence that broke the step, keep the others
                self._isolate(running)
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

    async def result(self, request: Request) -> GenerationResult:
        """The whole result; a client that hangs up first cancels the sequence instead of spending its budget."""
        final = asyncio.ensure_future(self._final())
        gone = asyncio.ensure_future(_hung_up(request))
        try:
            await asyncio.wait((final, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            final.cancel()
        if not final.done():
            self.seq.cancel()
            raise ApiError(499, "the client closed the connection before the reply was ready")
        return final.result()

    async def _final(self) -> GenerationResult:
        async for event in self.stream():
            if event.result is not None:
                return event.result
        raise ApiError(500, "generation ended without a result", kind="server_error")


async def _hung_up(request: Request) -> None:
    """Returns once the client disconnects: its body is read, so receive() has nothing else to deliver."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --------------------------------------------------------------------------- request models


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# Field types are strict: `"stream": 0` or `"top_k": false` is a mistake to report, not to coerce. A float field
# still takes a JSON integer (temperature 1).
Number = Annotated[float, Field(strict=True)]
NonEmpty = Annotated[str, Field(min_length=1)]
# One stop string or several, held as a list; an empty one would match at once.
Stops = Annotated[list[NonEmpty], BeforeValidator(_as_list, json_schema_input_type=NonEmpty | list[NonEmpty])]
# Past 64 bits torch's generator overflows; the signed 64-bit range is what other servers take too.
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
OnePrompt = Annotated[list[str], Field(min_length=1, max_length=1)]
COLD = f"below {GREEDY_BELOW:g} is greedy too"
PENALTY = f"{MIN_REPETITION_PENALTY:g}-10; 1.0 = off, below 1 favours repeats"


class GenerateRequest(BaseModel):
    """`POST /generate`. Unknown fields are rejected, so a typo is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    max_new_tokens: StrictInt | None = Field(None, ge=1, description="capped by the server's --max_new_tokens_cap")
    temperature: Number = Field(0.7, ge=0, le=5, description=f"0 = greedy; {COLD}")
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0, description="0 = off")
    repetition_penalty: Number = Field(1.0, ge=MIN_REPETITION_PENALTY, le=10, description=PENALTY)
    template: TemplateName | None = Field(
        None, description="prompt template; default: the checkpoint's (none = raw completion for a base model)"
    )
    stop: Stops | None = Field(None, description="a non-empty string or a list of them")
    seed: Seed | None = Field(None, description="for reproducible sampling; a signed 64-bit integer")
    stream: StrictBool = False


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
    include_usage: StrictBool = False


class OpenAIRequest(BaseModel):
    """Fields shared by the OpenAI routes; fields OpenAI has and we do not use are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0, le=2, description=f"0 = greedy; {COLD}")
    top_p: Number = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=1, description="only 1 is supported")
    stop: Stops | None = Field(None, description="a non-empty string or a list of them")
    seed: Seed | None = Field(None, description="a signed 64-bit integer")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    top_k: StrictInt = Field(0, ge=0, description="extension (extra_body)")
    repetition_penalty: Number = Field(1.0, ge=MIN_REPETITION_PENALTY, le=10,
                                       description=f"extension (extra_body); {PENALTY}")


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    template: TemplateName | None = Field(None, description="extension (extra_body); default: the checkpoint's")


class CompletionRequest(OpenAIRequest):
    prompt: Annotated[OnePrompt, BeforeValidator(_as_list, json_schema_input_type=str | OnePrompt)] = Field(
        description="one prompt: a string, or a list holding exactly one string"
    )
    max_tokens: StrictInt | None = Field(16, ge=1)


# --------------------------------------------------------------------------- the app


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


def _require_unicode(text: str, param: str) -> None:
    """JSON can escape a lone UTF-16 surrogate (`\\ud800`): that is no character, and no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(400, f"{param} holds a lone UTF-16 surrogate at character {err.start}: not valid Unicode text",
                       param) from None


def _settings(body: GenerateRequest | OpenAIRequest, max_new_tokens: int) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=max_new_tokens, temperature=body.temperature if body.temperature >= GREEDY_BELOW else 0.0,
        top_k=body.top_k, top_p=body.top_p, repetition_penalty=body.repetition_penalty, stop=body.stop or [],
        seed=body.seed,
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
        return {"status": "ok", "model": model_id, "context_length": service.window, **service.scheduler.stats()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(
            WEB_PAGE.read_text(encoding="utf-8"),
            headers={"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                                "style-src 'unsafe-inline'; connect-src 'self'"},
        )

    @app.get("/v1/models", tags=["openai"])
    async def models() -> dict[str, Any]:
        # context_length and max_tokens_cap (extensions) let a client fit its prompt and max_tokens.
        card = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "local",
                "context_length": service.window, "max_tokens_cap": service.settings.max_new_tokens_cap}
        return {"object": "list", "data": [card]}

    @app.post("/generate", tags=["generate"])
    async def generate(body: GenerateRequest, request: Request):
        template = service.template(body.template)
        ids = service.encode(body.prompt, template, "prompt")
        settings = _settings(body, service.budget(body.max_new_tokens, len(ids), "max_new_tokens"))
        generation = service.start(ids, settings)
        if not body.stream:
            return _generate_body(await generation.result(request), model_id)

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
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = [m.plain() for m in body.messages]
        ids = service.encode(messages, service.template(body.template), "messages")
        requested = body.max_completion_tokens or body.max_tokens
        settings = _settings(body, service.budget(requested, len(ids), "max_tokens"))
        generation = service.start(ids, settings)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if not body.stream:
            result = await generation.result(request)
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
    async def completions(body: CompletionRequest, request: Request):
        ids = service.encode(body.prompt[0], None, "prompt")
        settings = _settings(body, service.budget(body.max_tokens, len(ids), "max_tokens"))
        generation = service.start(ids, settings)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}
        if not body.stream:
            result = await generation.result(request)
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
        return JSONResponse(error_body(err.message, err.kind, err.param), status_code=err.status)

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
