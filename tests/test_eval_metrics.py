"""Log-likelihood scoring on real micro models: sliding-window perplexity, word perplexity and bits per byte,
multiple choice / BoolQ, checked against direct computations and against models with hand-set weights."""

from __future__ import annotations

import math

import pytest
import torch
from presets import micro_preset

from utils.checkpoint import load_model
from utils.eval_data import ChoiceItem, boolq_item
from utils.evaluation import (
    EvaluationError,
    LMScore,
    check_context_length,
    encode_pair,
    loglikelihoods,
    perplexity_metrics,
    rolling_windows,
    score_multiple_choice,
    sliding_window_score,
    text_stats,
)
from utils.model import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def micro(micro_checkpoint):
    return load_model(micro_checkpoint)


@pytest.fixture(scope="module")
def documents(micro, corpus):
    _, tok = micro
    return [tok.encode(text, add_special_tokens=False)[:90] for text in corpus[:3]]


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i+1] | ids[:i+1]) for every i, from one plain forward pass over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("length,context,stride",
                         [(1, 8, 8), (2, 8, 8), (9, 8, 8), (50, 8, 8), (50, 8, 3), (50, 16, 1)])
def test_rolling_windows_score_every_token_once_within_the_context(length, context, stride):
    windows = rolling_windows(length, context, stride)
    scored = [t for w in windows for t in range(w.end - w.scored + 1, w.end + 1)]
    assert scored == list(range(1, length))
    for w in windows:
        assert 0 <= w.start < w.end <= length - 1 and w.end - w.start <= context
        # every scored token sees at least context - stride tokens before it (or everything before it)
        first_target = w.end - w.scored + 1
        assert first_target - w.start >= min(context - stride + 1, first_target)


def test_rolling_windows_reject_a_stride_longer_than_the_context():
    with pytest.raises(EvaluationError, match="stride"):
        rolling_windows(10, 4, 5)


def test_sliding_window_equals_one_direct_pass_when_the_window_covers_the_text(micro, documents):
    model, tok = micro
    score = sliding_window_score(model, documents, tok.eos_token_id, 128, 128, 2, CPU)
    direct = [direct_logprobs(model, [tok.eos_token_id] + doc) for doc in documents]
    assert score.tokens == sum(len(d) for d in documents)
    assert score.nll == pytest.approx(-sum(float(lp.sum()) for lp in direct), rel=1e-5)


@pytest.mark.parametrize("context,stride", [(16, 16), (16, 5)])
def test_sliding_window_equals_a_token_by_token_computation(micro, documents, context, stride):
    """Each token scored with exactly the context the windows promise (its window's tokens before it), one
    forward pass per token, no batching."""
    model, tok = micro
    docs = [documents[0][:40], documents[1][:20]]
    score = sliding_window_score(model, docs, tok.eos_token_id, context, stride, 3, CPU)
    expected, correct = 0.0, 0
    for doc in docs:
        sequence = [tok.eos_token_id] + doc
        for w in rolling_windows(len(sequence), context, stride):
            for target in range(w.end - w.scored + 1, w.end + 1):
                with torch.no_grad():
                    logits = model(torch.tensor([sequence[w.start:target]])).logits[0, -1]
                expected -= float(torch.log_softmax(logits.float(), -1)[sequence[target]])
                correct += int(logits.argmax()) == sequence[target]
    assert score.nll == pytest.approx(expected, rel=1e-5)
    assert score.correct == correct


def uniform_model(vocab_size: int):
    """A real Llama whose weights are all zero: every next-token distribution is exactly uniform."""
    model = build_model(micro_preset(vocab_size), seed=0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    return model.eval()


def test_word_perplexity_and_bits_per_byte_of_a_uniform_model(tokenizer):
    vocab = len(tokenizer)
    texts = ["The quick brown fox jumps over the lazy dog.\n",
             "Zwölf Boxkämpfer jagen Viktor quer über den Sylter Deich"]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    score = sliding_window_score(uniform_model(vocab), ids, tokenizer.eos_token_id, 16, 8, 4, CPU)
    metrics = perplexity_metrics(score, text_stats(texts))
    tokens = sum(len(i) for i in ids)
    # The harness's count, re.split(r"\s+", text): 9 + 1 (the empty word after the trailing "\n") + 9.
    words = 19
    utf8_bytes = 45 + 59  # 56 characters, the 3 umlauts take 2 bytes each
    assert (metrics["tokens"], metrics["words"], metrics["bytes"]) == (tokens, words, utf8_bytes)
    assert metrics["token_perplexity"] == pytest.approx(vocab, rel=1e-4)
    # word perplexity = exp(total NLL / words) = vocab ** (tokens / words)
    assert metrics["word_perplexity"] == pytest.approx(vocab ** (tokens / words), rel=1e-4)
    # bits per byte = total NLL / (ln 2 · bytes) = tokens · log2(vocab) / bytes
    assert metrics["bits_per_byte"] == pytest.approx(tokens * math.log2(vocab) / utf8_bytes, rel=1e-4)
    # byte perplexity = exp(total NLL / bytes) = vocab ** (tokens / bytes)
    assert metrics["byte_perplexity"] == pytest.approx(vocab ** (tokens / utf8_bytes), rel=1e-4)


def test_a_diverged_model_reports_nan_perplexity_not_a_number(tokenizer):
    model = uniform_model(len(tokenizer))
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
    score = sliding_window_score(model, [[5, 6, 7, 8]], tokenizer.eos_token_id, 8, 8, 1, CPU)
    assert math.isnan(score.perplexity)
    assert math.isinf(LMScore(nll=1e6, tokens=1).perplexity)


def test_encode_pair_moves_trailing_spaces_into_the_continuation(tokenizer):
    context, continuation = encode_pair(tokenizer, "Answer: ", "yes", prefix_token_id=3)
    assert context == tokenizer.encode("Answer:", add_special_tokens=False)
    assert tokenizer.decode(continuation) == " yes"
    empty_context = encode_pair(tokenizer, "", "yes", prefix_token_id=3)
    assert empty_context == ([3], tokenizer.encode("yes", add_special_tokens=False))


def test_loglikelihoods_equal_direct_sums_including_left_truncation(micro, corpus):
    model, tok = micro
    long_context = tok.encode(corpus[0], add_special_tokens=False)[:200]
    requests = [
        (long_context[:20], tok.encode(" yes", add_special_tokens=False)),
        (long_context[:20], tok.encode(" no", add_special_tokens=False)),
        (long_context, tok.encode(" maybe later", add_special_tokens=False)),  # longer than the context: truncated
        # inputs that are prefixes of one another share a forward pass: ctx, ctx + [40], ctx + [40]
        (long_context[:30], [7]), (long_context[:30], [40, 41]), (long_context[:30], [40, 42]),
    ]
    context = 64
    result = loglikelihoods(model, requests, context, 2, CPU)
    assert result.truncated == 1
    for (ctx, cont), value in zip(requests, result.values):
        kept = (ctx + cont)[-(context + 1):]
        expected = float(direct_logprobs(model, kept)[-len(cont):].sum())
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-4)


def forced_answer_model(tokenizer, favoured: list[int]):
    """A real Llama whose next-token logits are the same at every position: +10 for `favoured` tokens, 0 else.

    Attention and MLP outputs are zero and every embedding is the same vector, so the last hidden state is
    constant; the untied LM head then sets the logits."""
    model = build_model(micro_preset(len(tokenizer), tie_word_embeddings=False), seed=0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                parameter.zero_()
        model.get_input_embeddings().weight.fill_(1.0)
        head = model.get_output_embeddings().weight
        head.zero_()
        head[favoured] = 10.0 / model.config.hidden_size  # the normalised hidden state is all ones
    return model.eval()


def boolq_items(answers: list[bool]) -> list[ChoiceItem]:
    return [
        boolq_item({"question": f"is item {i} real", "passage": f"Passage number {i}.", "answer": a}, f"item {i}")
        for i, a in enumerate(answers)
    ]


@pytest.mark.parametrize("favour", ["yes", "no"])
def test_boolq_follows_a_model_forced_to_one_answer(tokenizer, favour):
    yes_ids = encode_pair(tokenizer, "Answer:", " yes", 3)[1]
    no_ids = encode_pair(tokenizer, "Answer:", " no", 3)[1]
    assert not set(yes_ids) & set(no_ids)
    model = forced_answer_model(tokenizer, yes_ids if favour == "yes" else no_ids)
    answers = [True, True, True, False, True, False, True, True]  # 6 yes, 2 no
    metrics = score_multiple_choice(model, tokenizer, boolq_items(answers), tokenizer.eos_token_id, 128, 3, CPU)
    expected = 6 / 8 if favour == "yes" else 2 / 8
    assert metrics["accuracy"] == pytest.approx(expected)
    assert metrics["accuracy_stderr"] == pytest.approx(math.sqrt(expected * (1 - expected) / 7))
    assert metrics["majority_baseline"] == pytest.approx(6 / 8)
    assert (metrics["samples"], metrics["truncated"], metrics["non_finite"]) == (8, 0, 0)


def test_multiple_choice_accuracy_matches_a_direct_computation(micro):
    """Raw and per-character-normalised accuracy, from scores computed by plain forward passes."""
    model, tok = micro
    items = [
        ChoiceItem("The function returns", ("a list", "nothing at all, ever", "None"), 0),
        ChoiceItem("Use json.dumps to", ("serialize an object", "sleep"), 1),
        ChoiceItem("A tuple is", ("immutable", "mutable", "a function object", "an integer"), 2),
    ]
    metrics = score_multiple_choice(model, tok, items, tok.eos_token_id, 128, 4, CPU)
    hits = hits_norm = 0
    for item in items:
        scores = []
        for choice in item.choices:
            ctx, cont = encode_pair(tok, item.context, " " + choice, tok.eos_token_id)
            scores.append(float(direct_logprobs(model, ctx + cont)[-len(cont):].sum()))
        hits += max(range(len(scores)), key=scores.__getitem__) == item.answer
        norm = [s / len(c) for s, c in zip(scores, item.choices)]
        hits_norm += max(range(len(norm)), key=norm.__getitem__) == item.answer
    assert metrics["accuracy"] == pytest.approx(hits / 3)
    assert metrics["accuracy_norm"] == pytest.approx(hits_norm / 3)
    assert metrics["majority_baseline"] == pytest.approx(1 / 3)


def test_context_longer_than_the_model_is_refused(micro):
    model, _ = micro
    assert check_context_length(model, None) == model.config.max_position_embeddings
    with pytest.raises(EvaluationError, match="longer than the model's context of 128"):
        check_context_length(model, 129)
