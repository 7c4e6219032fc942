"""The decode engine: sampling, incremental detokenization, and one decode loop over the KV cache.

`BatchDecoder` holds the running sequences, left-padded to one cache length, and new sequences can join
between steps (continuous batching: `utils.scheduler` drives it for the API server; `utils.generation`
for one prompt or a batch). Prefill runs through the model's own forward; decode steps of Llama models run
through `LlamaDecodeStep` (the same operations without transformers' per-module overhead), other
architectures through their own forward. Each sequence samples with its own settings and its own seeded
`torch.Generator`, so a seeded request gives the same tokens alone or in a batch — and the same as
`model.generate()` after `torch.manual_seed(seed)`. Text is detokenized incrementally: a stream never shows
half a UTF-8 character or the start of a stop string that is later cut off, and the streamed pieces always
add up to the final text.

This module takes token ids; prompts, chat templates and model loading live in `utils.generation` and
`utils.loading`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from utils.templates import stop_token_ids

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class GenerationError(ValueError):
    """A request that cannot be generated (bad settings, bad messages); the message names the field."""


class ContextLengthError(GenerationError):
    """Prompt plus `max_new_tokens` does not fit in the model's context window."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_window: int):
        self.prompt_tokens, self.max_new_tokens, self.context_window = prompt_tokens, max_new_tokens, context_window
        super().__init__(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{prompt_tokens + max_new_tokens} tokens exceeds the model's context window of {context_window} tokens"
        )


@dataclass
class GenerationSettings:
    """How to sample. temperature 0 = greedy; top_k 0 and top_p 1.0 = off; repetition_penalty 1.0 = off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # Record each generated token's log-probability and this many most likely alternatives; None = off.
    logprobs: int | None = None

    def validate(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature >= 0, "a number >= 0 (0 = greedy)"),
            ("top_k", self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "a number > 0 (1.0 = off)"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "a list of non-empty strings"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"None or an integer 0-{MAX_TOP_LOGPROBS}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise GenerationError(f"generation setting '{name}' must be {expected}, got {getattr(self, name)!r}")

    def replace(self, **changes: Any) -> GenerationSettings:
        return dataclasses.replace(self, **changes)


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (raw logits: before temperature, penalties and filters) and the
    `top` most likely tokens at its position, as (token, log-probability), most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class GenerationResult:
    """`tokens`: the generated ids (the stop token excluded); `finish_reason`: stop, length or cancelled.

    `logprobs` (when the settings ask for them): one entry per token in `tokens`, plus the stop token's when a
    stop token ended the sequence (a scorer needs the log-probability of what the model chose, EOS included).
    """

    text: str
    tokens: list[int]
    finish_reason: str
    timings: dict[str, float]
    prompt_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None


@dataclass
class StreamEvent:
    """One piece of a streamed generation: new text, and on the last event the whole result (or an error).

    `logprobs`: the entries of the tokens sampled since the previous event (a token can add no text yet).
    """

    delta: str
    result: GenerationResult | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


# --------------------------------------------------------------------------- the context window


def context_window(model: PreTrainedModel) -> int:
    return int(model.config.max_position_embeddings)


def check_fits(prompt_tokens: int, max_new_tokens: int, window: int) -> None:
    if prompt_tokens + max_new_tokens > window:
        raise ContextLengthError(prompt_tokens, max_new_tokens, window)


# --------------------------------------------------------------------------- sampling


def _penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: positive logits of tokens already seen are divided by the penalty, negative multiplied."""
    scores = logits.gather(0, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(0, seen, scores)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[-1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, settings: GenerationSettings, seen: torch.Tensor | None,
                generator: torch.Generator | None) -> int:
    """The next token from one row of logits: repetition penalty, then greedy or temperature/top-k/top-p."""
    logits = logits.float()
    if settings.repetition_penalty != 1.0 and seen is not None:
        logits = _penalize_repeats(logits, seen, settings.repetition_penalty)
    if settings.temperature == 0:
        return int(logits.argmax())
    logits = _filter_top_k_top_p(logits / settings.temperature, settings.top_k, settings.top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Entries for `tokens` (n,) chosen after the logits rows (n, vocab): their log-softmax and the top alternatives."""
    log_probs = logits.float().log_softmax(-1)
    chosen = log_probs.gather(1, tokens[:, None])[:, 0].tolist()
    values, indices = log_probs.topk(top, dim=-1)
    return [
        TokenLogprob(token, logprob, list(zip(ids, lps)))
        for token, logprob, ids, lps in zip(tokens.tolist(), chosen, indices.tolist(), values.tolist())
    ]


# --------------------------------------------------------------------------- detokenization


class TextStream:
    """Turns a growing list of token ids into safe text deltas and detects stop strings."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.emitted = ""
        self.stopped = False

    def _held_back(self, text: str) -> int:
        """How many trailing characters may still turn into a stop string or a complete UTF-8 character."""
        hold = len(text) - len(text.rstrip("\ufffd"))
        body = text[: len(text) - hold]
        for s in self.stop:
            for n in range(min(len(s) - 1, len(body)), 0, -1):
                if body.endswith(s[:n]):
                    hold = max(hold, len(text) - len(body) + n)
                    break
        return hold

    def update(self, ids: list[int], final: bool = False) -> str:
        """The new text since the last call; sets `stopped` when a stop string appeared (it is cut off)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped, final = text[:cut], True, True
        visible = text if final else text[: len(text) - self._held_back(text)]
        if not visible.startswith(self.emitted):
            # A decoder that rewrote already-shown text (never seen with byte-fallback BPE): keep the stream
            # consistent by showing only what extends it.
            return ""
        delta, self.emitted = visible[len(self.emitted):], visible
        return delta


# --------------------------------------------------------------------------- the decode loop


class SequenceState:
    """One request inside a `BatchDecoder`: its prompt, settings, sampler state and output so far."""

    def __init__(
        self,
        prompt_ids: list[int],
        settings: GenerationSettings,
        tokenizer: PreTrainedTokenizerBase,
        on_event: Callable[[StreamEvent], None] | None = None,
        stop_ids: Sequence[int] = (),
    ):
        settings.validate()
        self.prompt_ids = list(prompt_ids)
        self.settings = settings
        self.on_event = on_event
        self.stop_ids = set(stop_ids)
        self.generated: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self._reported_logprobs = 0
        self.text = TextStream(tokenizer, settings.stop)
        self.generator: torch.Generator | None = None
        if settings.temperature > 0:
            self.generator = torch.Generator()
            if settings.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(settings.seed)
        self.seen = torch.tensor(self.prompt_ids, dtype=torch.long)
        self.finish_reason: str | None = None
        self.cancelled = False
        self.result: GenerationResult | None = None
        self.created = time.perf_counter()
        self.started: float | None = None
        self.prefilled_at: float | None = None
        self.first_token_at: float | None = None

    def accept(self, logits: torch.Tensor) -> int | None:
        """Samples from this sequence's logits row; returns the token to feed next, or None when finished."""
        token = sample_next(logits, self.settings, self.seen, self.generator)
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        if self.settings.logprobs is not None:
            self.logprobs += token_logprobs(logits[None], torch.tensor([token]), self.settings.logprobs)
        if token in self.stop_ids:
            self._finish("stop")
            return None
        self.generated.append(token)
        if self.settings.repetition_penalty != 1.0:
            self.seen = torch.cat([self.seen, torch.tensor([token])])
        delta = self.text.update(self.generated)
        if self.text.stopped:
            self._finish("stop", delta)
            return None
        if len(self.generated) >= self.settings.max_new_tokens:
            self._finish("length", delta)
            return None
        if delta and self.on_event:
            self.on_event(StreamEvent(delta, logprobs=self._new_logprobs()))
        return token

    def _new_logprobs(self) -> list[TokenLogprob]:
        new = self.logprobs[self._reported_logprobs:]
        self._reported_logprobs = len(self.logprobs)
        return new

    def cancel(self) -> None:
        self.cancelled = True

    def fail(self, message: str) -> None:
        """Ends the sequence on an internal error; the caller's stream gets the message as its last event."""
        self.finish_reason = "error"
        if self.on_event:
            self.on_event(StreamEvent("", error=message))

    def _finish(self, reason: str, pending: str = "") -> None:
        delta = pending + ("" if self.text.stopped else self.text.update(self.generated, final=True))
        end = time.perf_counter()
        started = self.started or self.created
        first = self.first_token_at or end
        prefilled = self.prefilled_at or first
        decode_tokens = max(len(self.generated) - 1, 0)
        decode_seconds = end - first
        self.finish_reason = reason
        self.result = GenerationResult(
            text=self.text.emitted,
            tokens=list(self.generated),
            finish_reason=reason,
            prompt_tokens=len(self.prompt_ids),
            logprobs=list(self.logprobs) if self.settings.logprobs is not None else None,
            timings={
                "queue_seconds": round(started - self.created, 6),
                "prefill_seconds": round(prefilled - started, 6),
                "time_to_first_token_seconds": round(first - started, 6),
                "decode_seconds": round(decode_seconds, 6),
                "total_seconds": round(end - started, 6),
                "decode_tokens_per_second": round(decode_tokens / decode_seconds, 2) if decode_seconds > 0 else 0.0,
            },
        )
        if self.on_event:
            self.on_event(StreamEvent(delta, self.result, logprobs=self._new_logprobs()))


KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (batch, kv heads, length, head dim)


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _cache_layers(cache: DynamicCache) -> KVCache:
    return [(k, v) for k, v, *_ in cache]


class TransformersStep:
    """One decode step through the model's own forward: works for every causal LM transformers loads."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        # MoE models would otherwise compute their training-only router loss on every step.
        self.extra = {"output_router_logits": False} if hasattr(model.config, "output_router_logits") else {}

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                 kv: KVCache) -> tuple[torch.Tensor, KVCache]:
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=positions[:, None] if mask is not None else None,
            past_key_values=DynamicCache(kv),
            use_cache=True,
            **self.extra,
        )
        return out.logits[:, -1], _cache_layers(out.past_key_values)


class LlamaDecodeStep:
    """A Llama decode step written as one flat function over the model's own weights.

    The same tensor operations, in the same order, as transformers' Llama forward for one new token
    (so the logits are identical), without the per-module Python overhead that dominates a small model's
    decode time on CPU. Used only for the architectures `supports` accepts; others use `TransformersStep`.
    """

    def __init__(self, model: PreTrainedModel):
        config = model.config
        self.eps = config.rms_norm_eps
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.n_rep = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.act = torch.nn.functional.silu
        self.embed = model.model.embed_tokens.weight
        self.layers = [
            (
                layer.input_layernorm.weight,
                layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight,
                layer.self_attn.o_proj.weight,
                layer.post_attention_layernorm.weight,
                layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight,
            )
            for layer in model.model.layers
        ]
        self.norm = model.model.norm.weight
        self.lm_head = model.lm_head.weight
        window = torch.arange(config.max_position_embeddings, device=self.embed.device)[None]
        cos, sin = model.model.rotary_emb(self.embed[:1], window)
        self.cos, self.sin = cos[0], sin[0]

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        config = model.config
        return (
            type(model).__name__ == "LlamaForCausalLM"
            and config.hidden_act == "silu"
            and not config.attention_bias
            and not config.mlp_bias
            and config.rope_parameters.get("rope_type", "default") == "default"
            and getattr(config, "pretraining_tp", 1) == 1
        )

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                 kv: KVCache) -> tuple[torch.Tensor, KVCache]:
        linear = torch.nn.functional.linear
        batch = tokens.shape[0]
        hidden = self.embed[tokens][:, None]  # (batch, 1, d_model)
        cos, sin = self.cos[positions][:, None, None], self.sin[positions][:, None, None]
        bool_mask = None if mask is None else mask.bool()[:, None, None, :]
        new_kv = []
        for (norm_in, wq, wk, wv, wo, norm_post, w_gate, w_up, w_down), (past_k, past_v) in zip(self.layers, kv):
            x = self._rms(hidden, norm_in)
            q = linear(x, wq).view(batch, 1, -1, self.head_dim).transpose(1, 2)
            k = linear(x, wk).view(batch, 1, -1, self.head_dim).transpose(1, 2)
            v = linear(x, wv).view(batch, 1, -1, self.head_dim).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
            new_kv.append((k, v))
            if bool_mask is None:
                attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling, enable_gqa=True)
            else:  # transformers' masked GQA decode: query heads folded onto their key/value head
                packed = q.reshape(batch, -1, self.n_rep, self.head_dim)
                attn = torch.nn.functional.scaled_dot_product_attention(
                    packed, k, v, attn_mask=bool_mask, scale=self.scaling
                ).reshape(batch, -1, 1, self.head_dim)
            hidden = hidden + linear(attn.transpose(1, 2).reshape(batch, 1, -1), wo)
            x = self._rms(hidden, norm_post)
            hidden = hidden + linear(self.act(linear(x, w_gate)) * linear(x, w_up), w_down)
        return linear(self._rms(hidden, self.norm), self.lm_head)[:, -1], new_kv


class BatchDecoder:
    """Decodes several sequences together over one left-padded KV cache; sequences join and leave between steps.

    A new sequence is prefilled alone, then its cache is left-padded (or the batch's is) to a common length
    and concatenated on the batch axis; the attention mask hides the padding and explicit position ids
    keep every sequence's RoPE positions its own. Finished sequences are dropped from the cache at once,
    and padding columns no remaining sequence needs are trimmed.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.window = context_window(model)
        self.device = next(model.parameters()).device
        self.stop_ids = stop_token_ids(tokenizer)
        reference = TransformersStep(model)
        self.prefill_extra = reference.extra
        self.step_fn = LlamaDecodeStep(model) if LlamaDecodeStep.supports(model) else reference
        self.sequences: list[SequenceState] = []
        self.kv: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (batch, cache length) 1 = real token
        self.positions: torch.Tensor | None = None  # (batch,) position of the token fed next
        self.next_tokens: torch.Tensor | None = None  # (batch,)

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def has_room(self) -> bool:
        return len(self.sequences) < self.max_batch_size

    def new_sequence(self, prompt_ids: list[int], settings: GenerationSettings,
                     on_event: Callable[[StreamEvent], None] | None = None) -> SequenceState:
        """Validates a request (settings, context window) before it is queued; raises GenerationError."""
        settings.validate()
        check_fits(len(prompt_ids), settings.max_new_tokens, self.window)
        return SequenceState(prompt_ids, settings, self.tokenizer, on_event, self.stop_ids)

    @torch.inference_mode()
    def add(self, seq: SequenceState) -> None:
        """Prefills `seq` and samples its first token; it joins the batch unless that already finished it."""
        seq.started = time.perf_counter()
        input_ids = torch.tensor([seq.prompt_ids], device=self.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                         **self.prefill_extra)
        seq.prefilled_at = time.perf_counter()
        token = seq.accept(out.logits[0, -1].cpu())
        if token is not None:
            self._join(seq, _cache_layers(out.past_key_values), token)

    @torch.inference_mode()
    def score(self, ids: list[int], top: int) -> list[TokenLogprob]:
        """The entries of `ids[1:]`, each given the tokens before it (the first has no context): one forward pass."""
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=False, **self.prefill_extra)
        return token_logprobs(out.logits[0, :-1].cpu(), torch.tensor(ids[1:], dtype=torch.long), top)

    @torch.inference_mode()
    def resume(self, seq: SequenceState) -> None:
        """Joins a sequence already decoding elsewhere (a batch that failed): its cache is rebuilt from its tokens."""
        context = torch.tensor([seq.prompt_ids + seq.generated[:-1]], device=self.device)
        out = self.model(input_ids=context, past_key_values=DynamicCache(config=self.model.config), use_cache=True,
                         logits_to_keep=1, **self.prefill_extra)
        self._join(seq, _cache_layers(out.past_key_values), seq.generated[-1])

    def _join(self, seq: SequenceState, kv: KVCache, token: int) -> None:
        length = kv[0][0].shape[2]
        mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        position = torch.tensor([length], device=self.device)
        next_token = torch.tensor([token], device=self.device)
        if self.kv is None:
            self.kv, self.mask, self.positions, self.next_tokens = kv, mask, position, next_token
        else:
            width = max(self.mask.shape[1], length)
            self.kv = [
                (torch.cat([_left_pad(k0, width, 2), _left_pad(k1, width, 2)]),
                 torch.cat([_left_pad(v0, width, 2), _left_pad(v1, width, 2)]))
                for (k0, v0), (k1, v1) in zip(self.kv, kv)
            ]
            self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
            self.positions = torch.cat([self.positions, position])
            self.next_tokens = torch.cat([self.next_tokens, next_token])
        self.sequences.append(seq)

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every running sequence; finished and cancelled ones leave the batch."""
        for seq in self.sequences:
            if seq.cancelled and seq.finish_reason is None:
                seq._finish("cancelled")
        self._select([i for i, s in enumerate(self.sequences) if s.finish_reason is None])
        if not self.sequences:
            return
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.sequences), 1)], dim=1)
        padded = not bool(self.mask.all())
        logits, self.kv = self.step_fn(self.next_tokens, self.mask if padded else None, self.positions, self.kv)
        self.positions = self.positions + 1
        logits = logits.float().cpu()
        tokens = [seq.accept(logits[i]) for i, seq in enumerate(self.sequences)]
        self.next_tokens = torch.tensor([t if t is not None else 0 for t in tokens], device=self.device)
        self._select([i for i, t in enumerate(tokens) if t is not None])

    def _select(self, keep: list[int]) -> None:
        if len(keep) == len(self.sequences):
            return
        self.sequences = [self.sequences[i] for i in keep]
        if not keep:
            self.kv = self.mask = self.positions = self.next_tokens = None
            return
        index = torch.tensor(keep, device=self.device)
        self.mask, self.positions, self.next_tokens = self.mask[index], self.positions[index], self.next_tokens[index]
        # Drop leading columns that are padding for every sequence still running.
        first_real = int(self.mask.any(dim=0).long().argmax())
        self.mask = self.mask[:, first_real:]
        self.kv = [(k[index, :, first_real:], v[index, :, first_real:]) for k, v in self.kv]
