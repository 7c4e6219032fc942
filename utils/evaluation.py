"""Log-likelihood evaluation of causal LMs: sliding-window perplexity, multiple choice, token accuracy.

The definitions follow lm-evaluation-harness, so the numbers are comparable with published ones:
- Perplexity ("rolling" log-likelihood): every document is scored on its own; its first token is predicted
  from a single prefix token; the model sees windows of at most `context_length` tokens and each window
  scores the next `stride` tokens. With `stride == context_length` the windows are exactly the harness's
  `loglikelihood_rolling` windows; a smaller stride gives every scored token more context at more cost.
  Word perplexity = exp(total NLL / words); bits per byte = total NLL / (ln 2 · UTF-8 bytes); byte
  perplexity = exp(total NLL / bytes). Words and bytes are counted as the harness's `wikitext` task counts
  them on each original (not detokenized) page: `len(re.split(r"\\s+", page))` words (a page that starts or
  ends with whitespace counts one empty word there) and `len(page.encode("utf-8"))` bytes.
- Multiple choice: each choice is a continuation of the context scored by its summed log-likelihood
  (trailing spaces of the context move to the continuation; the tokens of the continuation are those of
  `encode(context + continuation)` after `len(encode(context))`; too long inputs lose tokens on the left).
  `accuracy` picks the highest sum, `accuracy_norm` the highest sum per character of the choice.
- Generation with references: exact match, corpus BLEU (sacrebleu's default 13a tokenisation, 0-100) and
  ROUGE-1/2/L F1 (rouge-score, 0-1, averaged over prompts, best reference per prompt).
"""

from __future__ import annotations

import math
import re
import resource
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from utils.cli import progress
from utils.decoding import BatchDecoder, GenerationResult, GenerationSettings
from utils.eval_data import ChoiceItem
from utils.generation import Prompt, generate


class EvaluationError(ValueError):
    pass


@dataclass
class LMScore:
    """Totals over scored target tokens: negative log-likelihood (nats), count, top-1 hits."""

    nll: float = 0.0
    tokens: int = 0
    correct: int = 0

    def add(self, other: LMScore) -> None:
        self.nll += other.nll
        self.tokens += other.tokens
        self.correct += other.correct

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return _safe_exp(self.loss)

    @property
    def token_accuracy(self) -> float:
        return self.correct / self.tokens


def _safe_exp(value: float) -> float:
    """exp() that gives inf instead of OverflowError for a diverged model, and keeps NaN as NaN."""
    if math.isnan(value):
        return math.nan
    return math.exp(value) if value < 700 else math.inf


@dataclass(frozen=True)
class Window:
    """Input `sequence[start:end]`, which predicts `sequence[start + 1:end + 1]`; the last `scored` count."""

    start: int
    end: int
    scored: int


def rolling_windows(length: int, context_length: int, stride: int) -> list[Window]:
    """Windows that score every token of `sequence[1:length]` exactly once (`sequence[0]` is the prefix)."""
    if context_length < 1 or not 1 <= stride <= context_length:
        raise EvaluationError(f"need 1 <= stride <= context_length, got stride {stride}, context {context_length}")
    last = length - 1
    if last < 1:
        return []
    end = min(context_length, last)
    windows = [Window(0, end, end)]
    while end < last:
        new_end = min(end + stride, last)
        windows.append(Window(max(0, new_end - context_length), new_end, new_end - end))
        end = new_end
    return windows


def model_context_length(model: PreTrainedModel) -> int:
    return int(model.config.max_position_embeddings)


def check_context_length(model: PreTrainedModel, requested: int | None) -> int:
    """The context to evaluate with: the model's own, or a shorter one; a longer one is an error."""
    limit = model_context_length(model)
    if requested is None:
        return limit
    if requested < 2:
        raise EvaluationError(f"--context_length must be at least 2, got {requested}")
    if requested > limit:
        raise EvaluationError(
            f"--context_length {requested} is longer than the model's context of {limit} tokens "
            "(config.json max_position_embeddings); positions beyond it were never trained"
        )
    return requested


def _right_padded(rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


@torch.inference_mode()
def _scored_logprobs(
    model: PreTrainedModel, inputs: Sequence[Sequence[int]], scored: Sequence[int], device: torch.device
) -> list[torch.Tensor]:
    """Log-softmax rows (fp32, on `device`) of the last `scored[i]` positions of each input, one forward pass.

    Inputs are right-padded without an attention mask: in a causal model a real position never attends to
    the padding after it. Only the scored positions go through the LM head (`logits_to_keep` as a mask).
    """
    ids = _right_padded(inputs, pad_id=0)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for row, (seq, count) in enumerate(zip(inputs, scored)):
        keep[row, len(seq) - count:len(seq)] = True
    logits = model(input_ids=ids.to(device), logits_to_keep=keep.to(device), use_cache=False).logits
    return list(torch.split(torch.log_softmax(logits.float(), dim=-1), list(scored)))


def _batches(items: list, batch_size: int) -> Iterable[list]:
    for i in range(0, len(items), batch_size):
        yield items[i:i + batch_size]


def sliding_window_score(
    model: PreTrainedModel,
    documents: Sequence[Sequence[int]],
    prefix_token_id: int | None,
    context_length: int,
    stride: int,
    batch_size: int,
    device: torch.device,
    desc: str = "perplexity",
) -> LMScore:
    """NLL, count and top-1 hits of every token of every document, scored with rolling windows.

    With `prefix_token_id` each document's first token is predicted from that token (the harness's
    convention); with None the first token is context only (for a continuous token stream like val.bin).
    """
    work = []
    for doc in documents:
        sequence = ([prefix_token_id] if prefix_token_id is not None else []) + list(doc)
        work.extend((sequence, w) for w in rolling_windows(len(sequence), context_length, stride))
    total = LMScore()
    bar = progress(total=len(work), desc=desc, unit="window")
    for batch in _batches(work, batch_size):
        inputs = [seq[w.start:w.end] for seq, w in batch]
        targets = [torch.tensor(seq[w.end - w.scored + 1:w.end + 1], device=device) for seq, w in batch]
        for rows, target in zip(_scored_logprobs(model, inputs, [w.scored for _, w in batch], device), targets):
            total.add(LMScore(
                nll=-rows.gather(1, target[:, None]).sum().item(),
                tokens=len(target),
                correct=int((rows.argmax(-1) == target).sum()),
            ))
        bar.update(len(batch))
    bar.close()
    return total


@dataclass(frozen=True)
class TextStats:
    words: int
    bytes: int


WORD_SEPARATOR = re.compile(r"\s+")


def text_stats(documents: Iterable[str]) -> TextStats:
    """Words and UTF-8 bytes as lm-evaluation-harness's `wikitext` task counts them (see the module doc)."""
    docs = list(documents)
    return TextStats(words=sum(len(WORD_SEPARATOR.split(d)) for d in docs),
                     bytes=sum(len(d.encode("utf-8")) for d in docs))


def perplexity_metrics(score: LMScore, stats: TextStats | None = None) -> dict[str, float | int]:
    """Token perplexity and accuracy, plus word perplexity and bits per byte when the text is known."""
    metrics: dict[str, float | int] = {
        "loss": score.loss,
        "token_perplexity": score.perplexity,
        "token_accuracy": score.token_accuracy,
        "tokens": score.tokens,
    }
    if stats is not None:
        metrics.update(
            word_perplexity=_safe_exp(score.nll / stats.words),
            byte_perplexity=_safe_exp(score.nll / stats.bytes),
            bits_per_byte=score.nll / (math.log(2) * stats.bytes),
            words=stats.words,
            bytes=stats.bytes,
        )
    return metrics


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str, prefix_token_id: int
) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split the way the harness splits them (see the module doc)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [prefix_token_id], tokenizer.encode(continuation, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids):]


@dataclass
class LoglikelihoodResult:
    values: list[float]
    truncated: int = 0


def loglikelihoods(
    model: PreTrainedModel,
    requests: Sequence[tuple[list[int], list[int]]],
    context_length: int,
    batch_size: int,
    device: torch.device,
    desc: str = "loglikelihood",
) -> LoglikelihoodResult:
    """Summed log-probability of each continuation given its context (token ids).

    Requests share forward passes: one whose model input is a prefix of another's input with the same
    context (` no` against ` yes` when ` yes` is two tokens) reads its log-probabilities from that longer
    pass, since in a causal model a position never sees what comes after it.
    """
    targets, contexts, inputs, truncated = [], [], [], 0
    for index, (context, continuation) in enumerate(requests):
        if not continuation:
            raise EvaluationError(f"request {index}: the continuation encodes to no tokens")
        whole = context + continuation
        truncated += len(whole) > context_length + 1
        whole = whole[-(context_length + 1):]
        scored = min(len(continuation), context_length)
        targets.append(whole[-scored:])
        contexts.append(tuple(whole[:-scored]))
        inputs.append(tuple(whole[:-1]))
    groups: dict[tuple[int, ...], list[int]] = {}
    carriers: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for index in sorted(range(len(requests)), key=lambda i: -len(inputs[i])):
        same_context = carriers.setdefault(contexts[index], [])
        carrier = next((c for c in same_context if c[:len(inputs[index])] == inputs[index]), None)
        if carrier is None:
            carrier = inputs[index]
            same_context.append(carrier)
            groups[carrier] = []
        groups[carrier].append(index)
    values = [0.0] * len(requests)
    # Longest first: the slowest batches (and any out-of-memory) come at the start.
    order = sorted(groups, key=len, reverse=True)
    bar = progress(total=len(order), desc=desc, unit="input")
    for batch in _batches(order, batch_size):
        # Every request of a group is scored from the end of their shared context on.
        scored = [len(key) - len(contexts[groups[key][0]]) + 1 for key in batch]
        for key, rows in zip(batch, _scored_logprobs(model, batch, scored, device)):
            for index in groups[key]:
                target = torch.tensor(targets[index], device=device)
                values[index] = rows[:len(target)].gather(1, target[:, None]).sum().item()
        bar.update(len(batch))
    bar.close()
    return LoglikelihoodResult(values, truncated)


def _stderr(hits: Sequence[bool]) -> float:
    """Standard error of a mean of 0/1 outcomes (sample standard deviation / sqrt(n), as the harness)."""
    n = len(hits)
    if n < 2:
        return math.nan
    p = sum(hits) / n
    return math.sqrt(p * (1 - p) / (n - 1))


def score_multiple_choice(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[ChoiceItem],
    prefix_token_id: int,
    context_length: int,
    batch_size: int,
    device: torch.device,
    delimiter: str = " ",
    desc: str = "multiple choice",
    scores_out: list[list[float]] | None = None,
) -> dict[str, float | int]:
    """Accuracy by summed log-likelihood and by log-likelihood per character, with standard errors.
    `scores_out`, when given, receives each item's summed log-likelihood per choice."""
    requests, owners = [], []
    for number, item in enumerate(items):
        for choice in item.choices:
            requests.append(encode_pair(tokenizer, item.context, delimiter + choice, prefix_token_id))
            owners.append(number)
    result = loglikelihoods(model, requests, context_length, batch_size, device, desc=desc)
    per_item: list[list[float]] = [[] for _ in items]
    for owner, value in zip(owners, result.values):
        per_item[owner].append(value)
    if scores_out is not None:
        scores_out.extend(per_item)
    hits, hits_norm, non_finite = [], [], 0
    for item, scores in zip(items, per_item):
        non_finite += not all(math.isfinite(s) for s in scores)
        hits.append(_argmax(scores) == item.answer)
        normalised = [s / max(len(c), 1) for s, c in zip(scores, item.choices)]
        hits_norm.append(_argmax(normalised) == item.answer)
    majority = Counter(item.answer for item in items).most_common(1)[0][1]
    # Non-finite scores make the choice arbitrary: report no accuracy rather than a misleading one.
    invalid = math.nan if non_finite else 0.0
    return {
        "accuracy": sum(hits) / len(items) + invalid,
        "accuracy_stderr": _stderr(hits),
        "accuracy_norm": sum(hits_norm) / len(items) + invalid,
        "accuracy_norm_stderr": _stderr(hits_norm),
        "majority_baseline": majority / len(items),
        "samples": len(items),
        "truncated": result.truncated,
        "non_finite": non_finite,
    }


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or this process's peak resident memory on CPU (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _decode_one(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int],
                settings: GenerationSettings) -> GenerationResult:
    decoder = BatchDecoder(model, tokenizer, max_batch_size=1)
    sequence = decoder.new_sequence(prompt_ids, settings)
    decoder.add(sequence)
    while sequence.result is None:
        decoder.step()
    return sequence.result


def measure_speed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    seed: int = 0,
) -> dict[str, float | int]:
    """Greedy generation from a fixed random prompt (speed does not depend on the content): the medians of
    prefill tokens/s, decode tokens/s and time to first token over `repeats` runs after one warm-up run."""
    generator = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    prompt = ordinary[torch.randint(len(ordinary), (prompt_tokens,), generator=generator)].tolist()
    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0)
    _decode_one(model, tokenizer, prompt, settings)
    runs = [_decode_one(model, tokenizer, prompt, settings) for _ in range(repeats)]
    return {
        "prompt_tokens": prompt_tokens,
        "generated_tokens": statistics.median(len(r.tokens) for r in runs),
        "prefill_tokens_per_second": statistics.median(prompt_tokens / r.timings["prefill_seconds"] for r in runs),
        "decode_tokens_per_second": statistics.median(r.timings["decode_tokens_per_second"] for r in runs),
        "time_to_first_token_seconds": statistics.median(r.timings["time_to_first_token_seconds"] for r in runs),
        "repeats": repeats,
    }


def smoke_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    settings: GenerationSettings,
    template: str | None,
) -> list[dict[str, object]]:
    """One generation per prompt with the checkpoint's chat template (None: plain completion of strings)."""
    samples = []
    for prompt in progress(prompts, desc="generate", unit="prompt"):
        result = generate(model, tokenizer, prompt, settings, template=template)
        samples.append({
            "prompt": prompt,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "generated_tokens": len(result.tokens),
            "timings": result.timings,
        })
    return samples


def reference_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float | int]:
    """Exact match, BLEU and ROUGE of generations against their references (sacrebleu and rouge-score)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise EvaluationError(f"{len(predictions)} generations for {len(references)} reference sets")
    exact = [any(p.strip() == r.strip() for r in refs) for p, refs in zip(predictions, references)]
    streams = [list(stream) for stream in zip(*references)]
    bleu = sacrebleu.corpus_bleu(list(predictions), streams)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    rouge: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for prediction, refs in zip(predictions, references):
        scores = [scorer.score(r, prediction) for r in refs]
        for key in rouge:
            rouge[key].append(max(s[key].fmeasure for s in scores))
    return {
        "exact_match": sum(exact) / len(exact),
        "bleu": bleu.score,
        **{key: sum(values) / len(values) for key, values in rouge.items()},
        "samples": len(predictions),
    }
