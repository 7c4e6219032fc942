"""The HTTP API of `06_serve --mode api`: FastAPI app, request models, and the batching scheduler.

Routes: `POST /generate` (our own format), OpenAI-compatible `POST /v1/chat/completions`,
`POST /v1/completions`, `GET /v1/models` and `GET /v1/models/{id}`, `GET /health`, the chat page at `GET /`,
OpenAPI docs at `/docs`. Every request is validated, formatted and tokenized on the event loop, then handed
to one `Scheduler` thread that owns the model: it admits queued requests into a running `BatchDecoder`
between decode steps (continuous batching), streams each request's text back to its own asyncio queue,
and runs the forward passes that score prompts (`echo` with `logprobs`). Errors share one JSON shape,
OpenAI's: `{"error": {"message", "type", "param", "code"}}`; a client's mistake is a 4xx, never a 500. A
field OpenAI defines is implemented or, when set to anything but its neutral value, a 400 naming it.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import copy
import hmac
import json
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
)
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from utils.generation import (
    MAX_TOP_LOGPROBS,
    BatchDecoder,
    ContextLengthError,
    GenerationError,
    GenerationResult,
    GenerationSettings,
    LoadedModel,
    Prompt,
    SequenceState,
    StreamEvent,
    TokenLogprob,
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
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on /v1/completions' `logprobs`
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
# SentencePiece's byte-fallback pieces: one raw byte of a character the vocabulary lacks.
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
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


# --------------------------------------------------------------------------- scheduler


class QueueFullError(Exception):
    pass


@dataclass
class ScoreJob:
    """A prompt to score (`BatchDecoder.score`) on the scheduler's thread; a cancelled future skips it."""

    ids: list[int]
    top: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Scheduler:
    """The one thread that runs the model: admits queued sequences between steps, up to `max_batch_size`,
    and scores prompts between steps too."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int, max_queue: int):
        # Its own tokenizer copy: the event loop encodes prompts while this thread decodes.
        self.decoder = BatchDecoder(loaded.model, copy.deepcopy(loaded.tokenizer), max_batch_size=max_batch_size)
        self.pending: queue.Queue[SequenceState | ScoreJob | None] = queue.Queue(maxsize=max_queue)
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

    def submit(self, item: SequenceState | ScoreJob) -> None:
        try:
            self.pending.put_nowait(item)
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

    def _admit(self, seq: SequenceState | ScoreJob) -> None:
        if isinstance(seq, ScoreJob):
            self._score(seq)
            return
        if seq.cancelled:
            self.cancelled += 1
            return
        try:
            self.decoder.add(seq)
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
            seq.fail(f"generation failed: {err}")
        self._count(seq)

    def _score(self, job: ScoreJob) -> None:
        if not job.future.set_running_or_notify_cancel():  # its client is gone
            return
        try:
            job.future.set_result(self.decoder.score(job.ids, job.top))
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
            job.future.set_exception(ApiError(500, f"scoring the prompt failed: {err}", kind="server_error"))

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
COLD = f"below {GREEDY_BELOW:g} is greedy too"
PENALTY = f"{MIN_REPETITION_PENALTY:g}-10; 1.0 = off, below 1 favours repeats"


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)  # a bool is no token id


def _prompts(value: Any) -> Any:
    """One prompt or a batch of them, as a list: each a string or a non-empty list of token ids."""
    if isinstance(value, str) or _is_token_ids(value):
        return [value]
    if not isinstance(value, list) or not value:
        raise ValueError("must be a string, a list of token ids, or a non-empty list of strings or token-id lists")
    for i, item in enumerate(value):
        if not (isinstance(item, str) or _is_token_ids(item)):
            raise ValueError(f"item {i} is neither a string nor a non-empty list of integer token ids")
    return value


Prompts = Annotated[
    list[str | list[int]],
    BeforeValidator(_prompts, json_schema_input_type=str | list[str] | list[int] | list[list[int]]),
]


def _off(value: Any) -> bool:
    return not value


def _unsupported(kind: Any, accepted: str = "null", neutral: Callable[[Any], bool] = _off) -> Any:
    """An OpenAI field this server does not implement: its neutral values pass, any other is a 400 naming the
    field, since a client that asked for it must not get an answer that silently lacks it."""

    def check(value: Any) -> Any:
        if not neutral(value):
            raise ValueError(f"not supported by this server (only {accepted} is accepted)")
        return value

    return Annotated[kind | None, AfterValidator(check), Field(description=f"not supported: only {accepted}")]


def _is_text_format(value: dict[str, Any] | None) -> bool:
    return value is None or value.get("type") == "text"


ZeroOnly = _unsupported(Number, "0")
NoMap = _unsupported(dict[str, Number], "null or {}")
NoList = _unsupported(list[Any], "null or []")
NoObject = _unsupported(dict[str, Any], "null")
NoString = _unsupported(str, "null")
NoneChoice = _unsupported(str | dict[str, Any], 'null or "none"', lambda v: v in (None, "none"))
TextFormat = _unsupported(dict[str, Any], 'null or {"type": "text"}', _is_text_format)
TextModality = _unsupported(list[str], 'null or ["text"]', lambda v: v in (None, ["text"]))
OneBest = _unsupported(StrictInt, "null or 1", lambda v: v in (None, 1))
NoSuffix = _unsupported(str, 'null or ""')


def _text_only(value: Any) -> Any:
    """Text parts only: OpenAI's other part types (image_url, input_audio, file) hold what this model cannot read."""
    if isinstance(value, list):
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise ValueError(f"part {i} is of type '{kind}': this server reads text parts only")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f'part {i} must be {{"type": "text", "text": <a string>}}')
    elif value is not None and not isinstance(value, str):
        raise ValueError("must be a string, a list of text parts, or null (in an assistant turn)")
    return value


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
    content: Annotated[
        str | list[ContentPart] | None,
        BeforeValidator(_text_only, json_schema_input_type=str | list[ContentPart] | None),
    ] = Field(None, validate_default=True, description="a string or text parts; null only in an assistant turn")
    name: str | None = Field(None, description="accepted, unused")
    tool_calls: NoList = None

    @field_validator("content")
    @classmethod
    def _content_required(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.data.get("role") != "assistant":
            raise ValueError("required: only an assistant turn may leave it null")
        return value

    def plain(self) -> dict[str, str]:
        parts = [self.content] if isinstance(self.content, str) else [p.text for p in self.content or []]
        return {"role": "system" if self.role == "developer" else self.role, "content": "".join(parts)}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class OpenAIRequest(BaseModel):
    """Fields shared by the OpenAI routes. Every field OpenAI defines is declared: implemented, accepted as
    harmless (`user`), or refused unless neutral (`_unsupported`); fields OpenAI does not define are ignored, as
    vLLM does, since clients send their own vendors' extensions."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="the served model name; omitted = that model; another is a 404")
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
    user: str | None = Field(None, description="accepted, unused")
    frequency_penalty: ZeroOnly = None
    presence_penalty: ZeroOnly = None
    logit_bias: NoMap = None


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = Field(False, description="each generated token's log-probability")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                           description="most likely alternatives per token; needs logprobs")
    template: TemplateName | None = Field(None, description="extension (extra_body); default: the checkpoint's")
    metadata: dict[str, str] | None = Field(None, description="accepted, unused")
    store: StrictBool | None = Field(None, description="accepted, unused: nothing is stored")
    service_tier: str | None = Field(None, description="accepted, unused")
    safety_identifier: str | None = Field(None, description="accepted, unused")
    prompt_cache_key: str | None = Field(None, description="accepted, unused")
    parallel_tool_calls: StrictBool | None = Field(None, description="accepted, unused (there are no tools)")
    response_format: TextFormat = None
    tools: NoList = None
    tool_choice: NoneChoice = None
    functions: NoList = None
    function_call: NoneChoice = None
    audio: NoObject = None
    modalities: TextModality = None
    prediction: NoObject = None
    reasoning_effort: NoString = None
    verbosity: NoString = None
    web_search_options: NoObject = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return value


class CompletionRequest(OpenAIRequest):
    prompt: Prompts = Field(
        description="a string, a list of token ids, or a batch: a list of strings or of token-id lists (one "
                    "choice each, in order)"
    )
    max_tokens: StrictInt | None = Field(16, ge=0, description="0 = generate nothing (with echo: score the prompt)")
    echo: StrictBool = Field(False, description="the prompt comes back before the completion (and in logprobs)")
    logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_COMPLETION_LOGPROBS,
        description="each token's log-probability and the top N alternatives (the chosen token is added)",
    )
    best_of: OneBest = None
    suffix: NoSuffix = None


# --------------------------------------------------------------------------- the app


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


class Service:
    """What the routes share: the loaded model, the settings and the scheduler."""

    def __init__(self, loaded: LoadedModel, settings: ServerSettings):
        self.loaded = loaded
        self.settings = settings
        self.window = loaded.model.config.max_position_embeddings
        # Ids past the tokenizer cannot be shown, past the embedding cannot be run.
        self.vocab_size = min(len(loaded.tokenizer), loaded.model.config.vocab_size)
        self.scheduler = Scheduler(loaded, settings.max_batch_size, settings.max_queue)
        self._token_bytes: dict[int, bytes] = {}

    def check_model(self, requested: str | None) -> None:
        """A request may name the served model or none; another name is vLLM's and OpenAI's 404."""
        if requested and requested != self.settings.model_id:
            raise ApiError(404, f"The model `{requested}` does not exist.", "model", code="model_not_found")

    def token_bytes(self, token: int) -> bytes:
        """A token's exact UTF-8 bytes: a byte-fallback piece is one byte, which alone may be no character."""
        if token not in self._token_bytes:
            piece = self.loaded.tokenizer.convert_ids_to_tokens(token)
            match = BYTE_PIECE.fullmatch(piece or "")
            self._token_bytes[token] = (bytes([int(match[1], 16)]) if match
                                        else self.loaded.tokenizer.decode([token]).encode("utf-8"))
        return self._token_bytes[token]

    def token_text(self, token: int) -> str:
        """The token as text; bytes that are no whole character read `bytes:\\xNN` (OpenAI's notation), so two
        byte tokens never share one key of `top_logprobs`."""
        raw = self.token_bytes(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

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


def _settings(body: GenerateRequest | OpenAIRequest, max_new_tokens: int,
              logprobs: int | None = None) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=max_new_tokens, temperature=body.temperature if body.temperature >= GREEDY_BELOW else 0.0,
        top_k=body.top_k, top_p=body.top_p, repetition_penalty=body.repetition_penalty, stop=body.stop or [],
        seed=body.seed, logprobs=logprobs,
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


class CompletionLogprobs:
    """The `logprobs` object of one /v1/completions choice, built piece by piece (a stream sends a piece per chunk):
    `tokens`, `token_logprobs`, `top_logprobs` (the top N and the chosen token) and `text_offset`, where each
    token starts in the choice's text, counted over whole characters as the bytes add up."""

    def __init__(self, service: Service):
        self.service = service
        self.chars = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.offset = 0

    def piece(self, entries: list[TokenLogprob], first: int | None = None) -> dict[str, list[Any]]:
        """`first`: the prompt's first token, which has nothing before it to be scored by (null logprobs)."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if first is not None:
            self._add(out, first, None, None)
        for entry in entries:
            top: dict[str, float] = {}
            for token, logprob in [*entry.top, (entry.token, entry.logprob)]:
                top.setdefault(self.service.token_text(token), logprob)
            self._add(out, entry.token, entry.logprob, top)
        return out

    def _add(self, out: dict[str, list[Any]], token: int, logprob: float | None, top: dict | None) -> None:
        out["tokens"].append(self.service.token_text(token))
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(self.offset)
        self.offset += len(self.chars.decode(self.service.token_bytes(token)))


def _chat_logprobs(service: Service, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    def one(token: int, logprob: float) -> dict[str, Any]:
        return {"token": service.token_text(token), "logprob": logprob, "bytes": list(service.token_bytes(token))}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]


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


async def _completion_pieces(service: Service, index: int, part: CompletionPart, body: CompletionRequest
                             ) -> AsyncIterator[tuple[dict[str, Any], GenerationResult | None]]:
    """One choice's pieces, each with the final result once there is one: the echoed prompt, then the text as it
    is generated."""
    logprobs = CompletionLogprobs(service) if body.logprobs is not None else None
    finish = None if part.generation else "length"
    if body.echo:
        piece = None
        if logprobs is not None:
            piece = logprobs.piece(await part.scoring, first=part.ids[0])
        yield {"index": index, "text": part.text, "logprobs": piece, "finish_reason": finish}, None
    elif part.generation is None:
        piece = logprobs.piece([]) if logprobs is not None else None
        yield {"index": index, "text": "", "logprobs": piece, "finish_reason": finish}, None
    if part.generation is None:
        return
    async for event in part.generation.stream():
        finish = None if event.result is None else _openai_finish(event.result.finish_reason)
        piece = logprobs.piece(event.logprobs) if logprobs is not None else None
        yield {"index": index, "text": event.delta, "logprobs": piece, "finish_reason": finish}, event.result


def _completion_usage(parts: list[CompletionPart], results: dict[int, GenerationResult]) -> dict[str, int]:
    prompt = sum(len(p.ids) for p in parts)
    completion = sum(len(r.tokens) for r in results.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _fold(pieces: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The choices that a stream's pieces add up to."""
    choices = [{"index": i, "text": "", "logprobs": None, "finish_reason": None} for i in range(count)]
    for piece in pieces:
        choice = choices[piece["index"]]
        choice["text"] += piece["text"]
        choice["finish_reason"] = piece["finish_reason"] or choice["finish_reason"]
        if piece["logprobs"] is not None:
            if choice["logprobs"] is None:
                choice["logprobs"] = {key: [] for key in piece["logprobs"]}
            for key, values in piece["logprobs"].items():
                choice["logprobs"][key] += values
    return choices


def register_routes(app: FastAPI, service: Service) -> None:
    model_id = service.settings.model_id
    created = int(time.time())

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

    # context_length and max_tokens_cap (extensions) let a client fit its prompt and max_tokens.
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "local",
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
        service.check_model(body.model)
        messages = [m.plain() for m in body.messages]
        ids = service.encode(messages, service.template(body.template), "messages")
        requested = body.max_completion_tokens or body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        settings = _settings(body, service.budget(requested, len(ids), "max_tokens"), logprobs=top)
        generation = service.start(ids, settings)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}

        def logprobs(entries: list[TokenLogprob]) -> dict[str, Any] | None:
            return {"content": _chat_logprobs(service, entries), "refusal": None} if body.logprobs else None

        if not body.stream:
            result = await generation.result(request)
            message = {"role": "assistant", "content": result.text}
            choice = {"index": 0, "message": message, "finish_reason": _openai_finish(result.finish_reason),
                      "logprobs": logprobs(result.logprobs or [])}
            return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(result)}

        def chunk(delta: dict[str, str], finish: str | None,
                  entries: list[TokenLogprob] | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish,
                      "logprobs": logprobs(entries) if entries else None}
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}

        async def events() -> AsyncIterator[str]:
            yield _sse(chunk({"role": "assistant", "content": ""}, None))
            async for event in _guarded(generation.stream()):
                if isinstance(event, dict):
                    yield _sse(event)
                    break
                # A piece of text and the tokens sampled for it; tokens that add no text yet wait for the next.
                if event.delta:
                    yield _sse(chunk({"content": event.delta}, None, event.logprobs))
                if event.result is not None:
                    pending = [] if event.delta else event.logprobs
                    yield _sse(chunk({}, _openai_finish(event.result.finish_reason), pending))
                    if body.stream_options and body.stream_options.include_usage:
                        usage = {**head, "object": "chat.completion.chunk", "choices": [],
                                 "usage": _usage(event.result)}
                        yield _sse(usage)
            yield _sse("[DONE]")

        return _event_stream(events())

    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: CompletionRequest, request: Request):
        service.check_model(body.model)
        parts = start_completion(body)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}
        pieces = _merged([_completion_pieces(service, i, part, body) for i, part in enumerate(parts)])
        results: dict[int, GenerationResult] = {}

        def cancel() -> None:
            for part in parts:
                part.cancel()

        if not body.stream:
            async def collect() -> list[dict[str, Any]]:
                collected = []
                async for piece, result in pieces:
                    collected.append(piece)
                    if result is not None:
                        results[piece["index"]] = result
                return collected

            choices = _fold(await _unless_hung_up(request, collect(), cancel), len(parts))
            return {**head, "choices": choices, "usage": _completion_usage(parts, results)}

        async def events() -> AsyncIterator[str]:
            try:
                async for item in _guarded(pieces):
                    if isinstance(item, dict):
                        yield _sse(item)
                        break
                    piece, result = item
                    if result is not None:
                        results[piece["index"]] = result
                    if piece["text"] or piece["finish_reason"] or (piece["logprobs"] or {}).get("tokens"):
                        yield _sse({**head, "choices": [piece]})
                else:
                    if body.stream_options and body.stream_options.include_usage:
                        yield _sse({**head, "choices": [], "usage": _completion_usage(parts, results)})
            finally:
                cancel()
            yield _sse("[DONE]")

        return _event_stream(events())

    def start_completion(body: CompletionRequest) -> list[CompletionPart]:
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
                    parts[-1].generation = service.start(ids, _settings(body, max_new, logprobs=body.logprobs))
        except ApiError:
            for part in parts:
                part.cancel()
            raise
        return parts


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
