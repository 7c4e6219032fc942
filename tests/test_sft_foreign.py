"""03_sft starting from Hugging Face models that are not pipeline checkpoints: a Qwen2-style model whose tokenizer
brings its own chat template (kept), a GPT-2-style one without any (ChatML tokens and template added, embeddings
resized and trained), and a Hub id that cannot be reached offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from utils.chat_data import builtin_sft
from utils.checkpoint import load_model, verify_checkpoint
from utils.decoding import GenerationSettings
from utils.generation import generate
from utils.loading import load_for_inference
from utils.templates import CHATML, NATIVE, load_template_name

TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"


def byte_bpe(corpus: list[str], special: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus[:200], trainer)
    return tokenizer


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("foreign_data") / "data.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in builtin_sft(seed=3)[:12]))
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, corpus) -> Path:
    """A 2-layer Qwen2 with its own byte-level BPE and the Qwen2.5 chat template (which has no generation tags)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=byte_bpe(corpus, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = (TRL_TEMPLATES / "qwen2_5.jinja").read_text()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("qwen_foreign")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, corpus) -> Path:
    """A 2-layer GPT-2 (Conv1D layers, tied embeddings) with a byte-level BPE that has no chat template."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_bpe(corpus, ["<|endoftext|>"]),
                                        eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("gpt2_foreign")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_sft(run_stage, model_dir: Path, data: Path, out: Path, *extra: str) -> str:
    code, stdout, stderr = run_stage("03_sft.py", [
        "--model_path", str(model_dir), "--dataset_path", str(data), "--output_dir", str(out), "--max_steps", "2",
        "--batch_size", "4", "--max_length", "128", "--eval_fraction", "0", "--logging_steps", "1",
        "--learning_rate", "1e-2", *extra,
    ])
    assert code == 0, (code, stderr[-3000:])
    return stdout


def generates(directory: Path) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What does json.dumps do?"}],
                                           add_generation_prompt=True, return_dict=True, return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]
    return output[0].tolist()


def test_sft_keeps_a_foreign_tokenizer_and_its_chat_template(qwen_dir, sft_data, tmp_path, run_stage, monkeypatch):
    out = tmp_path / "sft"
    run_sft(run_stage, qwen_dir, sft_data, out)
    original = AutoTokenizer.from_pretrained(qwen_dir)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["template"] == NATIVE and summary["loss_on"] == "assistant replies"  # trl's Qwen2.5 version
    assert summary["added_tokens"] == []
    for name in ("final", "merged"):
        verify_checkpoint(out / name)
        assert load_template_name(out / name) == NATIVE
    assert not (out / "base").exists()  # nothing added: the adapter's base is the foreign model itself
    adapter_config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(qwen_dir.resolve())
    assert sorted(adapter_config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    monkeypatch.chdir(tmp_path.parent)  # checkpoints resolve from any working directory
    merged_tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    assert merged_tokenizer.get_vocab() == original.get_vocab()
    assert merged_tokenizer.chat_template == original.chat_template
    generates(out / "merged")
    adapter, _ = load_model(out / "final")
    merged, _ = load_model(out / "merged")
    ids = torch.tensor([original("def f(x): return x")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(adapter(ids).logits, merged(ids).logits, atol=1e-5)
    # 05 and 06 prompt it with its own template ("native"), as it was fine-tuned.
    loaded = load_for_inference(out / "merged")
    assert loaded.template == NATIVE
    reply = generate(loaded.model, loaded.tokenizer, [{"role": "user", "content": "Hi"}],
                     GenerationSettings(max_new_tokens=3, temperature=0.0), template=loaded.template)
    assert reply.prompt_tokens == len(original.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                                   add_generation_prompt=True, tokenize=True,
                                                                   return_dict=False))


def test_sft_adds_chatml_to_a_foreign_tokenizer_without_a_template(gpt2_dir, sft_data, tmp_path, run_stage,
                                                                    monkeypatch):
    out = tmp_path / "sft"
    stdout = run_sft(run_stage, gpt2_dir, sft_data, out)
    assert "adapting all its linear layers" in stdout  # GPT-2 has none of the Llama projection names
    original = AutoTokenizer.from_pretrained(gpt2_dir)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["template"] == "chatml" and summary["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    monkeypatch.chdir(tmp_path.parent)
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    assert len(tokenizer) == len(original) + 2
    assert {k: v for k, v in tokenizer.get_vocab().items() if k in original.get_vocab()} == original.get_vocab()
    assert tokenizer.chat_template == CHATML and load_template_name(out / "merged") == "chatml"
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.get_input_embeddings().num_embeddings == len(tokenizer)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in merged.generation_config.eos_token_id
    generates(out / "merged")
    # the adapter sits on the resized start, saved before training, and trained the new rows
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    assert json.loads((out / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (out / "base").resolve())
    assert not torch.equal(base.get_input_embeddings().weight[start], merged.get_input_embeddings().weight[start])
    adapter, _ = load_model(out / "final")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(adapter(ids).logits, merged(ids).logits, atol=1e-5)


def test_sft_hub_id_offline_is_one_error(run_stage, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # conftest sets it too; huggingface_hub read it when imported
    code, _, stderr = run_stage("03_sft.py", ["--model_path", "no-such-org/no-such-model",
                                              "--output_dir", str(tmp_path / "out")])
    assert code == 2, stderr
    assert stderr.startswith("error: --model_path 'no-such-org/no-such-model' is not a local directory")
    assert "HF_HUB_OFFLINE is set" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_sft_refuses_pickled_weights(qwen_dir, tmp_path, run_stage):
    """A foreign directory with only pytorch_model.bin is refused before anything is unpickled."""
    pickled = tmp_path / "pickled"
    shutil.copytree(qwen_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    code, _, stderr = run_stage("03_sft.py", ["--model_path", str(pickled), "--output_dir", str(tmp_path / "out")])
    assert code == 2 and "missing model.safetensors" in stderr, stderr
    assert not (tmp_path / "out").exists()
