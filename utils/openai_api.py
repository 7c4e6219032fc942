"""The HTTP API's wire format: request models and response shapes, apart from how requests are served.

The request models of OpenAI's `/v1/chat/completions` and `/v1/completions` and of our own `/generate`
validate every field: types are strict, a field OpenAI defines is implemented or, when set to anything but
its neutral value, refused (naming it). Below them: a request's `GenerationSettings`, and the response pieces
— usage, finish reasons, the `logprobs` objects of both OpenAI routes, and server-sent-event framing.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

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
from transformers import PreTrainedTokenizerBase

from utils.decoding import MAX_TOP_LOGPROBS, GenerationResult, GenerationSettings, TokenLogprob
from utils.messages import Message

TemplateName = Literal["chatml", "instruct", "chat", "none"]
# Sampling colder than this overflows the scaled logits to inf (NaN probabilities); it is greedy in all but name.
GREEDY_BELOW = 1e-5
# A smaller penalty divides repeated tokens' logits past float range, with the same NaN result.
MIN_REPETITION_PENALTY = 0.01
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on /v1/completions' `logprobs`
# SentencePiece's byte-fallback pieces: one raw byte of a character the vocabulary lacks.
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


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

    def plain(self) -> Message:
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


# --------------------------------------------------------------------------- responses


def sse(data: Any) -> str:
    """One server-sent event: a JSON object, or a bare string such as `[DONE]`."""
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


def generation_settings(body: GenerateRequest | OpenAIRequest, max_new_tokens: int,
                        logprobs: int | None = None) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=max_new_tokens, temperature=body.temperature if body.temperature >= GREEDY_BELOW else 0.0,
        top_k=body.top_k, top_p=body.top_p, repetition_penalty=body.repetition_penalty, stop=body.stop or [],
        seed=body.seed, logprobs=logprobs,
    )


def usage(result: GenerationResult) -> dict[str, int]:
    n = len(result.tokens)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}


def generate_body(result: GenerationResult, model_id: str) -> dict[str, Any]:
    """`POST /generate`'s reply (and its last stream event, after the delta)."""
    return {
        "text": result.text, "tokens": len(result.tokens), "prompt_tokens": result.prompt_tokens,
        "finish_reason": result.finish_reason, "timings": result.timings, "model": model_id,
    }


def openai_finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def fold_choices(pieces: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The /v1/completions choices that a stream's pieces add up to."""
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


# --------------------------------------------------------------------------- logprobs


class TokenText:
    """How logprobs show a token: its exact bytes and its text, cached per token id."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self._bytes: dict[int, bytes] = {}

    def token_bytes(self, token: int) -> bytes:
        """A token's exact UTF-8 bytes: a byte-fallback piece is one byte, which alone may be no character."""
        if token not in self._bytes:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            match = BYTE_PIECE.fullmatch(piece or "")
            self._bytes[token] = (bytes([int(match[1], 16)]) if match
                                  else self.tokenizer.decode([token]).encode("utf-8"))
        return self._bytes[token]

    def token_text(self, token: int) -> str:
        """The token as text; bytes that are no whole character read `bytes:\\xNN` (OpenAI's notation), so two
        byte tokens never share one key of `top_logprobs`."""
        raw = self.token_bytes(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class CompletionLogprobs:
    """The `logprobs` object of one /v1/completions choice, built piece by piece (a stream sends a piece per chunk):
    `tokens`, `token_logprobs`, `top_logprobs` (the top N and the chosen token) and `text_offset`, where each
    token starts in the choice's text, counted over whole characters as the bytes add up."""

    def __init__(self, tokens: TokenText):
        self.tokens = tokens
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
                top.setdefault(self.tokens.token_text(token), logprob)
            self._add(out, entry.token, entry.logprob, top)
        return out

    def _add(self, out: dict[str, list[Any]], token: int, logprob: float | None, top: dict | None) -> None:
        out["tokens"].append(self.tokens.token_text(token))
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(self.offset)
        self.offset += len(self.chars.decode(self.tokens.token_bytes(token)))


def chat_logprobs(tokens: TokenText, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """The `logprobs.content` list of a /v1/chat/completions choice (or chunk)."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        return {"token": tokens.token_text(token), "logprob": logprob, "bytes": list(tokens.token_bytes(token))}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
