"""The OpenAI API as clients expect it, through the official `openai` client: scoring (echo + logprobs, what
`lm_eval --model local-completions` sends), chat logprobs, batched and token-id prompts, the served model
name, the context-length error code, and a 400 naming every OpenAI option the server does not implement.

One app serves the micro checkpoint in this process (uvicorn on a thread); expected values come from the
same model run directly: a plain forward pass's log-softmax, or `generate`.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from openai import BadRequestError, NotFoundError, OpenAI
from test_serve_api import in_process

from utils.decoding import GenerationSettings, SequenceState
from utils.generation import encode_prompt, generate
from utils.loading import load_for_inference
from utils.server import ServerSettings, create_app, parse_cors_origins

NAME = "pretrain/micro/final"
PROMPT = "The for statement héllo"  # é is two byte-fallback tokens: no character on its own
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def local(micro_checkpoint):
    return load_for_inference(micro_checkpoint, "cpu")


@pytest.fixture(scope="module")
def base_url(local):
    with in_process(create_app(local, ServerSettings(model_id=NAME, max_new_tokens_cap=48))) as port:
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def client(base_url):
    with OpenAI(base_url=base_url, api_key="unused", timeout=60, max_retries=0) as openai_client:
        yield openai_client


def log_softmax(local, ids: list[int]) -> torch.Tensor:
    """Row i: the model's log-probabilities for the token after ids[:i + 1]."""
    with torch.inference_mode():
        return local.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def greedy(local, prompt, max_new_tokens: int, template: str | None = None):
    return generate(local.model, local.tokenizer, prompt, GenerationSettings(max_new_tokens=max_new_tokens),
                    template)


def test_echo_scores_the_prompt_as_a_forward_pass_does(client, local):
    ids = encode_prompt(local.tokenizer, PROMPT)
    out = client.completions.create(model=NAME, prompt=PROMPT, echo=True, max_tokens=0, logprobs=3)
    choice = out.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = log_softmax(local, ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(want[i - 1, ids[i]].item(), abs=TOLERANCE)
        values, top = want[i - 1].topk(3)
        assert len(lp.top_logprobs[i]) in (3, 4)  # the top 3 and the chosen token
        assert sorted(lp.top_logprobs[i].values(), reverse=True)[:3] == pytest.approx(values.tolist(), abs=TOLERANCE)
        assert lp.top_logprobs[i][lp.tokens[i]] == lp.token_logprobs[i]
    assert [t for t in lp.tokens if t.startswith("bytes:")] == ["bytes:\\xc3", "bytes:\\xa9"]
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert token.startswith("bytes:") or PROMPT[offset:offset + len(token)] == token
    assert lp.text_offset[-1] == len(PROMPT) - len(lp.tokens[-1])


def test_lm_eval_loglikelihood_request(base_url, local):
    """What lm_eval's local-completions sends: token ids in a batch, echo, max_tokens 1, logprobs 1; it sums
    token_logprobs[context length:-1], so the one generated token must come last."""
    context, continuation = encode_prompt(local.tokenizer, "A list is"), encode_prompt(local.tokenizer, " mutable")
    whole = context + continuation
    body = {"model": NAME, "prompt": [whole, context], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    choices = httpx.post(f"{base_url}/completions", json=body, timeout=60).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    lp = choices[0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(whole) + 1
    want = log_softmax(local, whole)
    score = sum(lp["token_logprobs"][len(context):-1])
    assert score == pytest.approx(sum(want[i - 1, whole[i]].item() for i in range(len(context), len(whole))),
                                  abs=TOLERANCE)
    last = lp["token_logprobs"][-1]  # greedy: the generated token is the most likely one
    assert last == max(lp["top_logprobs"][-1].values()) == pytest.approx(want[-1].max().item(), abs=TOLERANCE)
    assert choices[1]["text"].startswith(local.tokenizer.decode(context))


def test_generated_tokens_logprobs_match_a_forward_pass(client, local):
    ids = encode_prompt(local.tokenizer, "The json module")
    result = greedy(local, "The json module", 6)
    out = client.completions.create(model=NAME, prompt="The json module", max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == result.text and len(lp.tokens) >= len(result.tokens)
    want = log_softmax(local, ids + result.tokens)
    for i, token in enumerate(result.tokens):
        assert lp.token_logprobs[i] == pytest.approx(want[len(ids) - 1 + i, token].item(), abs=TOLERANCE)
    assert lp.text_offset[0] == 0  # without echo, offsets count from the completion's start
    streamed = list(client.completions.create(model=NAME, prompt="The json module", max_tokens=6, temperature=0,
                                              logprobs=2, stream=True))
    assert sum((c.choices[0].logprobs.token_logprobs for c in streamed), []) == lp.token_logprobs


def test_chat_logprobs_and_top_logprobs(client, local):
    messages = [{"role": "user", "content": "What is a list?"}]
    result = greedy(local, messages, 8)
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                         top_logprobs=2)
    content = out.choices[0].logprobs.content
    ids = encode_prompt(local.tokenizer, messages)
    want = log_softmax(local, ids + result.tokens)
    assert out.choices[0].message.content == result.text
    for i, (entry, token) in enumerate(zip(content, result.tokens)):
        assert entry.logprob == pytest.approx(want[len(ids) - 1 + i, token].item(), abs=TOLERANCE)
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token  # greedy: the top one
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    assert b"".join(bytes(e.bytes) for e in content[:len(result.tokens)]) == result.text.encode()
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == content
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_a_stop_token_keeps_its_logprob(local):
    """A scorer reads the log-probability of whatever came last, EOS included, though EOS adds no token."""
    eos = local.tokenizer.eos_token_id
    seq = SequenceState([eos], GenerationSettings(max_new_tokens=4, logprobs=1), local.tokenizer, stop_ids=[eos])
    logits = torch.zeros(len(local.tokenizer))
    logits[eos] = 10.0
    assert seq.accept(logits) is None
    assert seq.result.tokens == [] and [e.token for e in seq.result.logprobs] == [eos]


def test_list_of_prompts_and_token_id_prompts(client, local):
    prompts = ["Lists and tuples", "The for statement", "What is a dict?"]
    out = client.completions.create(model=NAME, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    results = [greedy(local, p, 8) for p in prompts]
    assert [c.text for c in out.choices] == [r.text for r in results]
    assert out.usage.completion_tokens == sum(len(r.tokens) for r in results)
    ids = [encode_prompt(local.tokenizer, p) for p in prompts]
    assert client.completions.create(model=NAME, prompt=ids[0], max_tokens=8, temperature=0).choices[0].text == \
        results[0].text
    by_ids = client.completions.create(model=NAME, prompt=ids[1:], max_tokens=8, temperature=0)
    assert [c.text for c in by_ids.choices] == [r.text for r in results[1:]]
    stream = client.completions.create(model=NAME, prompt=prompts, max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    texts, usage = ["", "", ""], None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
        usage = chunk.usage or usage
    assert texts == [r.text for r in results] and usage.completion_tokens == out.usage.completion_tokens
    too_big = httpx.post(f"{client.base_url}completions", json={"prompt": [1, 10**9]}, timeout=30)
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "prompt"


def test_served_model_name_and_the_model_field(client, base_url):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(NotFoundError) as missing:
        client.models.retrieve("gpt-4")
    assert missing.value.code == "model_not_found"
    assert missing.value.body["message"] == "The model `gpt-4` does not exist."
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    unnamed = httpx.post(f"{base_url}/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert unnamed.status_code == 200 and unnamed.json()["model"] == NAME


@pytest.mark.parametrize("route", ["chat", "completions", "echo"])
def test_context_length_exceeded_code(client, route):
    with pytest.raises(BadRequestError) as refused:
        if route == "chat":
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "word " * 150}],
                                           max_tokens=10)
        else:
            client.completions.create(model=NAME, prompt="word " * 150, max_tokens=0 if route == "echo" else 10,
                                      echo=route == "echo", logprobs=0)
    assert refused.value.code == "context_length_exceeded" and refused.value.type == "invalid_request_error"
    assert "context window of 128 tokens" in refused.value.message


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
COMPLETION = {"prompt": "hi", "max_tokens": 1}


@pytest.mark.parametrize("route, extra, param", [
    ("chat", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("chat", {"n": 2}, "n"),
    ("chat", {"presence_penalty": 0.5}, "presence_penalty"),
    ("completions", {"frequency_penalty": -1}, "frequency_penalty"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("chat", {"function_call": "auto"}, "function_call"),
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"suffix": "}"}, "suffix"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ("chat", {"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
])
def test_unsupported_options_are_400_naming_them(base_url, route, extra, param):
    body = {**(CHAT if route == "chat" else COMPLETION), **extra}
    path = "chat/completions" if route == "chat" else "completions"
    response = httpx.post(f"{base_url}/{path}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]


@pytest.mark.parametrize("route, extra", [
    ("chat", {"user": "u1", "metadata": {"k": "v"}, "store": False, "n": 1, "presence_penalty": 0,
              "response_format": {"type": "text"}, "tool_choice": "none", "tools": [], "parallel_tool_calls": True,
              "messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                           {"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                           {"role": "user", "content": "again"}]}),
    ("completions", {"user": "u1", "best_of": 1, "suffix": "", "logit_bias": {}, "frequency_penalty": 0.0}),
])
def test_neutral_values_of_unsupported_options_are_accepted(base_url, route, extra):
    body = {**(CHAT if route == "chat" else COMPLETION), **extra}
    path = "chat/completions" if route == "chat" else "completions"
    assert httpx.post(f"{base_url}/{path}", json=body, timeout=30).status_code == 200


def test_cors_origins_flag_parsing():
    assert parse_cors_origins(None) == []
    assert parse_cors_origins(" http://localhost:3000, https://app.example.com ") == [
        "http://localhost:3000", "https://app.example.com"]
    assert parse_cors_origins("*") == ["*"]
    for bad in ("", " , ", "http://localhost:3000/", "localhost:3000"):
        with pytest.raises(ValueError, match="--cors_origins"):
            parse_cors_origins(bad)
