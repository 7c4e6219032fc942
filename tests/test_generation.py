"""The shared generation module: equal to transformers' generate(), batched = alone, stops, streaming, loading."""

from __future__ import annotations

import json

import pytest
import torch

from utils.decoding import (
    BatchDecoder,
    ContextLengthError,
    GenerationError,
    GenerationSettings,
    LlamaDecodeStep,
    TransformersStep,
)
from utils.generation import ChatSession, encode_prompt, generate, generate_batch, generate_stream
from utils.loading import load_for_inference
from utils.templates import save_template_name, stop_token_ids

PROMPTS = ["The quick brown fox", "def main():\n    return", "A list is a mutable sequence type that", "Hi"]


@pytest.fixture(scope="module")
def loaded(micro_checkpoint):
    return load_for_inference(micro_checkpoint, "cpu")


def hf_generate(loaded, prompt: str, n: int, seed: int | None = None, **kwargs) -> list[int]:
    tok = loaded.tokenizer
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    if seed is not None:
        torch.manual_seed(seed)
    out = loaded.model.generate(
        ids, max_new_tokens=n, eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id, **kwargs
    )
    return out[0, ids.shape[1]:].tolist()


def test_loads_base_checkpoint_for_plain_completion(loaded):
    assert loaded.template is None  # no template.json: a pretrain checkpoint
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float32
    assert not loaded.model.training


def test_greedy_equals_transformers_generate(loaded):
    settings = GenerationSettings(max_new_tokens=40)
    for prompt in PROMPTS:
        result = generate(loaded.model, loaded.tokenizer, prompt, settings)
        expected = hf_generate(loaded, prompt, 40, do_sample=False)
        assert result.tokens == expected[: len(result.tokens)]
        assert result.finish_reason == ("length" if len(result.tokens) == 40 else "stop")
        assert result.text == loaded.tokenizer.decode(result.tokens, skip_special_tokens=True)
        assert result.prompt_tokens == len(encode_prompt(loaded.tokenizer, prompt))


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.8, top_k=20, seed=5),
    dict(temperature=1.3, top_p=0.8, seed=7),
    dict(temperature=0.9, top_k=30, top_p=0.9, repetition_penalty=1.3, seed=3),
    dict(temperature=0.0, repetition_penalty=1.5, seed=0),
])
def test_seeded_sampling_equals_transformers_generate(loaded, kwargs):
    """Same processors in the same order (penalty, temperature, top-k, top-p) and the same random stream."""
    result = generate(loaded.model, loaded.tokenizer, PROMPTS[0], GenerationSettings(max_new_tokens=30, **kwargs))
    # transformers' own defaults (top_k=50) would otherwise apply
    hf_kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0, **{k: v for k, v in kwargs.items() if k != "seed"}}
    if kwargs["temperature"] == 0:
        hf_kwargs = {"do_sample": False, "repetition_penalty": kwargs["repetition_penalty"]}
    expected = hf_generate(loaded, PROMPTS[0], 30, seed=kwargs["seed"], **hf_kwargs)
    assert result.tokens == expected


def test_seed_makes_sampling_reproducible(loaded):
    def sample(seed):
        settings = GenerationSettings(max_new_tokens=25, temperature=1.0, seed=seed)
        return generate(loaded.model, loaded.tokenizer, PROMPTS[2], settings).tokens

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_fast_llama_step_gives_the_same_logits_as_the_model(loaded):
    decoder = BatchDecoder(loaded.model, loaded.tokenizer, max_batch_size=4)
    assert isinstance(decoder.step_fn, LlamaDecodeStep)
    settings = GenerationSettings(max_new_tokens=10)
    for prompt in PROMPTS[:3]:  # three lengths: the batch cache is left-padded
        decoder.add(decoder.new_sequence(encode_prompt(loaded.tokenizer, prompt), settings))
    reference = TransformersStep(loaded.model)
    with torch.inference_mode():
        args = (decoder.next_tokens, decoder.mask, decoder.positions, decoder.kv)
        mask = torch.cat([decoder.mask, decoder.mask.new_ones(3, 1)], dim=1)
        fast_logits, fast_kv = decoder.step_fn(decoder.next_tokens, mask, decoder.positions, decoder.kv)
        ref_logits, ref_kv = reference(args[0], mask, args[2], args[3])
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-5, atol=1e-5)
    for (k1, v1), (k2, v2) in zip(fast_kv, ref_kv):
        torch.testing.assert_close(k1, k2)
        torch.testing.assert_close(v1, v2)


def test_batched_decoding_equals_decoding_alone(loaded):
    greedy = GenerationSettings(max_new_tokens=30)
    seeded = [GenerationSettings(max_new_tokens=10 + 5 * i, temperature=0.9, top_p=0.95, seed=i) for i in range(4)]
    for settings in (greedy, seeded):
        alone = [generate(loaded.model, loaded.tokenizer, p, s)
                 for p, s in zip(PROMPTS, settings if isinstance(settings, list) else [settings] * 4)]
        together = generate_batch(loaded.model, loaded.tokenizer, PROMPTS, settings, max_batch_size=3)
        assert [r.tokens for r in together] == [r.tokens for r in alone]
        assert [r.text for r in together] == [r.text for r in alone]


def test_moe_model_uses_its_own_forward_batched_and_alone(tokenizer):
    """Architectures without the fast path (Mixtral MoE) decode through transformers' forward."""
    from presets import micro_preset

    from utils.model import build_model

    model = build_model(micro_preset(len(tokenizer), n_experts=4, experts_per_token=2, router_aux_loss_coef=0.01),
                        tokenizer, seed=0).eval()
    assert isinstance(BatchDecoder(model, tokenizer).step_fn, TransformersStep)
    settings = GenerationSettings(max_new_tokens=15)
    alone = [generate(model, tokenizer, p, settings).tokens for p in PROMPTS[:3]]
    assert [r.tokens for r in generate_batch(model, tokenizer, PROMPTS[:3], settings)] == alone
    ids = tokenizer(PROMPTS[0], add_special_tokens=False, return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=15, do_sample=False, eos_token_id=stop_token_ids(tokenizer),
                              pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    assert alone[0] == expected[: len(alone[0])]


def test_sequence_joining_a_running_batch_is_unaffected(loaded):
    """Continuous batching: a request admitted mid-decode gets the tokens it would get alone."""
    tok = loaded.tokenizer
    decoder = BatchDecoder(loaded.model, tok, max_batch_size=4)
    first = decoder.new_sequence(encode_prompt(tok, PROMPTS[2]), GenerationSettings(max_new_tokens=30))
    decoder.add(first)
    for _ in range(7):
        decoder.step()
    late = decoder.new_sequence(encode_prompt(tok, PROMPTS[0]), GenerationSettings(max_new_tokens=12))
    decoder.add(late)
    while first.result is None or late.result is None:
        decoder.step()
    assert len(decoder) == 0 and decoder.kv is None
    settings = [GenerationSettings(max_new_tokens=30), GenerationSettings(max_new_tokens=12)]
    for seq, prompt, s in zip((first, late), (PROMPTS[2], PROMPTS[0]), settings):
        assert seq.result.tokens == generate(loaded.model, tok, prompt, s).tokens


def test_stop_string_cuts_text_and_stream_never_shows_it(loaded):
    tok = loaded.tokenizer
    free = generate(loaded.model, tok, PROMPTS[0], GenerationSettings(max_new_tokens=40))
    # a 3-character stop string whose first occurrence comes after some streamed text
    stop = next(free.text[i:i + 3] for i in range(5, len(free.text) - 3) if free.text.find(free.text[i:i + 3]) == i)
    settings = GenerationSettings(max_new_tokens=40, stop=[stop])
    result = generate(loaded.model, tok, PROMPTS[0], settings)
    assert result.finish_reason == "stop"
    assert result.text == free.text[: free.text.find(stop)]
    events = list(generate_stream(loaded.model, tok, PROMPTS[0], settings))
    assert "".join(e.delta for e in events) == result.text
    assert events[-1].result.text == result.text and all(e.result is None for e in events[:-1])
    assert sum(1 for e in events if e.delta) > 1  # really streamed, not one final chunk


def test_template_stop_token_ends_the_reply(loaded):
    """A stop token (EOS / <|im_end|>) ends generation and is not part of the text or tokens."""
    tok = loaded.tokenizer
    free = generate(loaded.model, tok, PROMPTS[3], GenerationSettings(max_new_tokens=20)).tokens
    decoder = BatchDecoder(loaded.model, tok, max_batch_size=1)
    decoder.stop_ids = [free[5]]
    seq = decoder.new_sequence(encode_prompt(tok, PROMPTS[3]), GenerationSettings(max_new_tokens=20))
    decoder.add(seq)
    while seq.result is None:
        decoder.step()
    cut = free.index(free[5])
    assert seq.result.finish_reason == "stop"
    assert seq.result.tokens == free[:cut]
    assert tok.eos_token_id in stop_token_ids(tok) and tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok)


def test_stream_text_is_whole_characters(loaded):
    """Byte-fallback tokens can split a character; the stream holds them back until complete."""
    tok = loaded.tokenizer
    for prompt in ("héllo → wörld", "日本語のテキスト"):
        events = list(generate_stream(loaded.model, tok, prompt, GenerationSettings(max_new_tokens=40)))
        final = events[-1].result.text
        assert "".join(e.delta for e in events) == final
        for event in events[:-1]:
            assert not event.delta.endswith("\ufffd")


def test_chat_template_formatting_and_control_tokens_are_plain_text(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"}]
    ids = encode_prompt(tokenizer, messages, "chatml")
    text = tokenizer.decode(ids)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi <|im_end|> there<|im_end|>\n" \
                   "<|im_start|>assistant\n"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == 2  # the one typed by the user is text, not a turn boundary
    assert tokenizer.decode(encode_prompt(tokenizer, "Hi", "instruct")) == "### Instruction:\nHi\n\n### Response:\n"
    assert encode_prompt(tokenizer, "") == [tokenizer.eos_token_id]
    with pytest.raises(GenerationError, match=r"messages\[1\]\.role"):
        encode_prompt(tokenizer, [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "chatml")


def test_context_window_and_settings_errors_name_the_problem(loaded):
    long_prompt = " ".join(["word"] * 200)
    with pytest.raises(ContextLengthError, match=r"exceeds the model's context window of 128 tokens") as err:
        generate(loaded.model, loaded.tokenizer, long_prompt, GenerationSettings(max_new_tokens=10))
    assert err.value.prompt_tokens > 118 and err.value.context_window == 128
    for field, value in [("top_p", 0.0), ("temperature", -1.0), ("max_new_tokens", 0), ("stop", [""])]:
        with pytest.raises(GenerationError, match=f"'{field}'"):
            GenerationSettings(**{field: value}).validate()


def test_chat_session_drops_oldest_turns_to_fit(tokenizer):
    session = ChatSession(tokenizer, "chatml", window=128, system="sys")
    for i in range(6):
        session.record(f"question {i}", f"answer {i}")
    messages, dropped = session.prompt("latest question", max_new_tokens=40)
    assert dropped > 0 and len(session.turns) == 6 - dropped
    assert messages[0] == {"role": "system", "content": "sys"}
    assert messages[-1] == {"role": "user", "content": "latest question"}
    assert messages[-3]["content"] == "question 5"  # the newest turns are the ones kept
    assert len(encode_prompt(tokenizer, messages, "chatml")) + 40 <= 128
    session.reset()
    assert session.prompt("x", 10) == (session.messages("x"), 0) and session.turns == []


def test_adapter_checkpoint_loads_on_its_base_and_is_merged(micro_checkpoint, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from utils.tokenizer import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(micro_checkpoint)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a trained-looking adapter that changes the outputs
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    load_tokenizer(micro_checkpoint).save_pretrained(adapter)
    save_template_name(adapter, "instruct")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(micro_checkpoint)

    loaded = load_for_inference(adapter, "cpu")
    assert loaded.template == "instruct"
    assert not isinstance(loaded.model, PeftModel)  # merged for speed
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(micro_checkpoint), adapter).eval()
    tok = loaded.tokenizer
    ids = torch.tensor([encode_prompt(tok, "Hello", "instruct")])
    expected = reference.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=stop_token_ids(tok),
                                  pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    result = generate(loaded.model, tok, "Hello", GenerationSettings(max_new_tokens=20), template="instruct")
    assert result.tokens == expected[: len(result.tokens)]
    base_result = generate(load_for_inference(micro_checkpoint, "cpu").model, tok, "Hello",
                           GenerationSettings(max_new_tokens=20), template="instruct")
    assert base_result.tokens != result.tokens
