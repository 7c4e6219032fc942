"""Checkpoints every tool takes as they are: plain chat templates, the SentencePiece model and BOS settings
beside the tokenizer, model cards, adapters that find their base from anywhere, standalone merged models,
and GGUF exports that read back (gguf-py, transformers' GGUF loader; llama.cpp where llama-cpp-python is
installed) as the same model."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import re
import runpy
import shutil
import sys
from pathlib import Path

import jinja2
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from presets import micro_preset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from utils.checkpoint import ADAPTER_BASE_KEY, adapter_base_path, verify_checkpoint
from utils.finetune import SFTSettings, load_settings
from utils.gguf_export import IM_END, export_gguf, llama_permute, ollama_template, render_turns
from utils.model import build_model
from utils.model_card import MODEL_CARD
from utils.templates import TEMPLATES, TRAINING_TEMPLATES, get_template
from utils.tokenizer import SPM_FILE, load_tokenizer, save_tokenizer
from utils.tokens import TOKENIZER_DIR

gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What does json.dumps do?"},
    {"role": "assistant", "content": "It turns an object into a JSON string."},
    {"role": "user", "content": "And  json.loads?\nÜber 😀"},
]
# Leading spaces, runs of spaces, newlines, non-ASCII, chat tokens: where tokenizers disagree if they do.
TEXTS = ["def f(x):\n    return x", " leading space", "a\n\n  b\tc", "héllo wörld — 😀 日本語",
         "<|im_start|>user\nhi<|im_end|>\n", "12345 digits"]


def run_script(script: str, args: list[str]) -> tuple[int, str]:
    """A stage in this process (what conftest's run_stage does), for module-scoped fixtures."""
    out, saved = io.StringIO(), sys.argv
    sys.argv = [script, *args]
    AcceleratorState._reset_state(reset_partial_state=True)  # as in a fresh process
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    return code, out.getvalue()


@pytest.fixture(scope="module")
def chain(tmp_path_factory, micro_config, processed_dir) -> Path:
    """02 then 03 (LoRA, merged/ by default) on the micro preset, under a `checkpoints/` tree."""
    root = tmp_path_factory.mktemp("interop")
    pretrain, sft = root / "checkpoints" / "pretrain" / "micro", root / "checkpoints" / "sft" / "micro"
    code, out = run_script("02_pretrain.py", [
        "--config", str(micro_config), "--data_path", str(processed_dir), "--output_dir", str(pretrain),
        "--max_steps", "2", "--batch_size", "2", "--eval_steps", "2", "--save_steps", "2", "--eval_batches", "1"])
    assert code == 0, out[-3000:]
    code, out = run_script("03_sft.py", [
        "--model_path", str(pretrain), "--output_dir", str(sft), "--max_samples", "12", "--max_steps", "2",
        "--batch_size", "4", "--max_length", "64", "--eval_fraction", "0.2", "--max_eval_samples", "2",
        "--eval_steps", "100", "--save_steps", "100", "--logging_steps", "1", "--learning_rate", "5e-3"])
    assert code == 0, out[-3000:]
    return root / "checkpoints"


def render_plain(template: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """What any Jinja engine without transformers' extensions renders."""
    return jinja2.Environment().from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, eos_token="</s>", bos_token="<s>")


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_training_and_inference_templates_render_the_same_text(name, tokenizer):
    with pytest.raises(jinja2.TemplateSyntaxError):  # why the training form must not ship
        render_plain(TRAINING_TEMPLATES[name], CONVERSATION)
    for messages, prompt in ((CONVERSATION, True), (CONVERSATION[:3], False)):
        shipped = render_plain(get_template(name), messages, prompt)
        trained = tokenizer.apply_chat_template(messages, chat_template=TRAINING_TEMPLATES[name], tokenize=False,
                                                add_generation_prompt=prompt)
        assert shipped == trained
        assert render_turns(name, messages, prompt) == shipped  # what the Ollama template is written from


def test_pretrain_checkpoint_is_a_base_model_with_its_sentencepiece_model_and_card(chain, processed_dir):
    final = chain / "pretrain" / "micro" / "final"
    verify_checkpoint(final)
    assert not (final / "chat_template.jinja").exists()
    config = json.loads((final / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and (config["add_bos_token"], config["add_eos_token"]) == (False, False)
    assert (final / "tokenizer.model").read_bytes() == (processed_dir / TOKENIZER_DIR / SPM_FILE).read_bytes()
    tokenizer = load_tokenizer(final)
    assert tokenizer.chat_template is None
    assert tokenizer("The list type")["input_ids"] == tokenizer("The list type", add_special_tokens=False)["input_ids"]
    card = (final / MODEL_CARD).read_text()
    assert MODEL_CARD in json.loads((final / "checksums.json").read_text())
    assert "# micro · pretrain" in card and "| steps | 2 |" in card and "plain completion" in card
    assert re.search(r"\| val_loss \| \d", card)


def test_sft_writes_a_standalone_merged_model_with_the_plain_template(chain):
    sft = chain / "sft" / "micro"
    spm = (chain / "pretrain" / "micro" / "final" / "tokenizer.model").read_bytes()
    for name in ("final", "merged"):
        verify_checkpoint(sft / name)
        assert (sft / name / "tokenizer.model").read_bytes() == spm
        shipped = (sft / name / "chat_template.jinja").read_text()
        assert shipped == get_template("chatml") and "{% generation %}" not in shipped
        assert render_plain(shipped, CONVERSATION) == load_tokenizer(sft / name).apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=True)
    merged_card, adapter_card = (sft / "merged" / MODEL_CARD).read_text(), (sft / "final" / MODEL_CARD).read_text()
    assert "library_name: transformers" in merged_card and "merged into its base: a standalone" in merged_card
    assert "library_name: peft" in adapter_card and "AutoPeftModelForCausalLM" in adapter_card
    assert "| eval_loss |" in merged_card and "| preset | micro |" in merged_card
    assert json.loads((sft / "final" / "run.json").read_text())[ADAPTER_BASE_KEY] == "../../../pretrain/micro/final"


def test_merge_is_the_default_for_lora_and_no_merge_turns_it_off(run_stage):
    for given, merged in ((None, True), (False, False), (True, True)):
        args = argparse.Namespace(merge=given)
        load_settings(SFTSettings, ROOT / "config" / "sft.json", args)
        assert args.merge is merged
    code, stdout, _ = run_stage("04_dpo.py", ["--help"])
    assert code == 0 and "--merge, --no-merge" in stdout


def test_cards_load_snippets_run_and_the_adapter_finds_its_base_from_anywhere(chain, tmp_path, monkeypatch, capsys):
    sft = chain / "sft" / "micro"
    monkeypatch.chdir(tmp_path)  # peft and transformers resolve base_model_name_or_path from the cwd
    outputs = {}
    for name in ("final", "merged"):
        snippet = re.search(r"```python\n(.*?)```", (sft / name / MODEL_CARD).read_text(), re.S).group(1)
        exec(snippet, {})  # noqa: S102 - the card's own instructions, as a reader would paste them
        outputs[name] = capsys.readouterr().out
    assert outputs["final"] == outputs["merged"]  # the adapter on its base is the merged model

    moved = tmp_path / "moved"
    shutil.copytree(chain, moved)
    chain.rename(chain.with_name("away"))  # the absolute path the adapter names is stale now
    try:
        assert adapter_base_path(moved / "sft" / "micro" / "final").resolve() == moved / "pretrain" / "micro" / "final"
    finally:
        chain.with_name("away").rename(chain)


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_gguf_export_reads_back_as_the_checkpoint(chain, tmp_path, outtype):
    merged = chain / "sft" / "micro" / "merged"
    result = export_gguf(merged, tmp_path / f"m-{outtype}.gguf", outtype)
    reader = gguf.GGUFReader(result.path)
    fields = _fields(reader)
    config = json.loads((merged / "config.json").read_text())
    tokenizer = load_tokenizer(merged)
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(merged / "tokenizer.model"))
    expected = {
        "general.architecture": "llama", "general.name": "micro-sft",
        "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7}[outtype],
        "llama.context_length": config["max_position_embeddings"], "llama.embedding_length": config["hidden_size"],
        "llama.block_count": config["num_hidden_layers"], "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"], "llama.rope.dimension_count": 16,
        "llama.rope.freq_base": config["rope_parameters"]["rope_theta"],
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(config["rms_norm_eps"]),
        "llama.vocab_size": config["vocab_size"],
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_token_id,
        "tokenizer.ggml.unknown_token_id": tokenizer.unk_token_id, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False, "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.ggml.eot_token_id": tokenizer.convert_tokens_to_ids(IM_END),
        "tokenizer.chat_template": get_template("chatml"),
        "tokenizer.ggml.tokens": [processor.id_to_piece(i) for i in range(processor.get_piece_size())],
    }
    assert {key: fields.get(key) for key in expected} == expected
    assert fields["tokenizer.ggml.scores"] == pytest.approx([processor.get_score(i) for i in range(len(tokenizer))])
    types = fields["tokenizer.ggml.token_type"]
    control, byte = int(gguf.TokenType.CONTROL), int(gguf.TokenType.BYTE)
    assert [types[tokenizer.convert_tokens_to_ids(t)] for t in ("<s>", "</s>", "<|im_start|>", IM_END)] == [control] * 4
    assert types[tokenizer.convert_tokens_to_ids("<0x0A>")] == byte and types[1] == int(gguf.TokenType.UNKNOWN)

    model = AutoModelForCausalLM.from_pretrained(merged)
    state = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: no output.weight
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {names.get_name(k, try_suffixes=(".weight",)) for k in state}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    Q = gguf.GGMLQuantizationType
    matrix_type = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[outtype]
    for hf_name, weights in state.items():
        tensor = tensors[names.get_name(hf_name, try_suffixes=(".weight",))]
        # GGUF lists dims innermost first; the reader hands the data back in row-major order
        stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weights.shape)
        if hf_name.endswith("q_proj.weight"):
            weights = llama_permute(weights, heads, heads)
        elif hf_name.endswith("k_proj.weight"):
            weights = llama_permute(weights, heads, kv_heads)
        kind = matrix_type if weights.ndim == 2 else Q.F32
        assert tensor.tensor_type == kind, hf_name
        expected_values = gguf.quants.dequantize(gguf.quants.quantize(weights, kind), kind).reshape(weights.shape)
        np.testing.assert_array_equal(stored, expected_values, err_msg=hf_name)

    modelfile = result.modelfile.read_text()
    assert modelfile.startswith(f"FROM ./{result.path.name}\n") and f'PARAMETER stop "{IM_END}"' in modelfile
    assert f'TEMPLATE """{ollama_template("chatml")}"""' in modelfile and "PARAMETER num_ctx 128" in modelfile


def test_transformers_loads_the_gguf_as_the_same_model_and_tokenizer(chain, tmp_path):
    merged = chain / "sft" / "micro" / "merged"
    reference = AutoModelForCausalLM.from_pretrained(merged).eval()
    tokenizer = load_tokenizer(merged)
    ids = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    for outtype in ("f32", "f16"):
        export_gguf(merged, tmp_path / f"{outtype}.gguf", outtype)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"{outtype}.gguf", dtype=torch.float32).eval()
        expected = reference
        if outtype == "f16":  # the same model with its matrices rounded as the file stores them
            expected = AutoModelForCausalLM.from_pretrained(merged).eval()
            with torch.no_grad():
                for parameter in expected.parameters():
                    if parameter.ndim == 2:
                        parameter.copy_(parameter.half().float())
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, expected(ids).logits, rtol=0, atol=1e-5)
            greedy = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
            assert torch.equal(loaded.generate(ids, **greedy), expected.generate(ids, **greedy))

    from tokenizers import pre_tokenizers

    read_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="f32.gguf")
    assert read_back.add_bos_token is False and read_back.eos_token == "</s>"
    # transformers 5.23 builds every sentencepiece GGUF tokenizer with a dummy prefix, ignoring the file's
    # tokenizer.ggml.add_space_prefix = false (llama.cpp honours it); with the flag applied the tokens are ours.
    read_back.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=False)
    for text in TEXTS:
        assert read_back(text)["input_ids"] == tokenizer(text)["input_ids"], text


def test_qk_norm_presets_export_as_qwen3_without_permutation(tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(tokenizer_dir)
    preset = dataclasses.replace(micro_preset(len(tokenizer)), qk_norm=True, initializer_range=0.1)
    model = build_model(preset, tokenizer, seed=0).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                parameter.uniform_(0.5, 1.5)  # not all ones, so a lost or swapped norm shows
    model.save_pretrained(tmp_path / "ckpt")
    save_tokenizer(tokenizer, tmp_path / "ckpt", chat_template=None)
    result = export_gguf(tmp_path / "ckpt", tmp_path / "qk.gguf", "f32")
    reader = gguf.GGUFReader(result.path)
    assert _fields(reader)["general.architecture"] == "qwen3" and "tokenizer.chat_template" not in reader.fields
    assert _fields(reader)["qwen3.attention.key_length"] == 16
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    state = model.state_dict()
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"], state["model.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(tensors["blk.1.attn_k_norm.weight"], state["model.layers.1.self_attn.k_norm.weight"])
    # transformers' qwen3 GGUF mapping reads no head size (Qwen3Config's default is 128), so the config is given
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="qk.gguf", dtype=torch.float32,
                                                  config=AutoConfig.from_pretrained(tmp_path / "ckpt")).eval()
    ids = torch.tensor([tokenizer("def f(x):\n    return x")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert result.modelfile.read_text() == 'FROM ./qk.gguf\nTEMPLATE """{{ .Prompt }}"""\nPARAMETER num_ctx 128\n'


def test_export_refuses_what_it_cannot_write_faithfully(chain, micro_checkpoint, tmp_path, run_stage):
    code, _, stderr = run_stage("export_gguf.py", ["--model_path", str(chain / "sft" / "micro"),
                                                   "--output", str(tmp_path / "a.gguf")])
    assert code == 2 and "is a LoRA adapter; export the standalone model next to it" in stderr
    assert str(chain / "sft" / "micro" / "merged") in stderr
    code, _, stderr = run_stage("export_gguf.py", ["--model_path", str(micro_checkpoint),
                                                   "--output", str(tmp_path / "b.gguf")])
    assert code == 2 and "has no tokenizer.model" in stderr and "sentencepiece.model" in stderr
    moe = tmp_path / "moe"
    shutil.copytree(chain / "pretrain" / "micro" / "final", moe)
    config = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**config, "model_type": "mixtral"}))
    code, _, stderr = run_stage("export_gguf.py", ["--model_path", str(moe), "--output", str(tmp_path / "c.gguf")])
    assert code == 2 and "mixture-of-experts" in stderr
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


def test_llama_cpp_continues_and_scores_like_transformers_at_f16(chain, tmp_path):
    """Opt-in (make test-gguf): needs llama-cpp-python, compiled from source (requirements-gguf.txt)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    merged = chain / "sft" / "micro" / "merged"
    export_gguf(merged, tmp_path / "m.gguf", "f16")
    tokenizer = load_tokenizer(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.copy_(parameter.half().float())
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, logits_all=True, verbose=False)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"], text
    ids = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=False)
    llm.reset()
    llm.eval(ids)
    theirs = torch.log_softmax(torch.tensor(np.array(llm.eval_logits, dtype=np.float32)), dim=-1)
    with torch.no_grad():
        ours = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    targets = torch.tensor(ids[1:])
    per_token = lambda logp: logp[:-1].gather(1, targets[:, None])[:, 0]  # noqa: E731
    torch.testing.assert_close(per_token(theirs), per_token(ours), rtol=0, atol=1e-3)
    greedy = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    llm.reset()
    continuation = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        continuation.append(token)
        if len(continuation) == len(greedy):
            break
    assert continuation == greedy
