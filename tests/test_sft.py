"""Stage 03: SFT lowers the loss on the replies, the adapter round-trips and matches its merged model, resume
continues where it stopped, bad input ends with a message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.chat_data import DatasetStats, builtin_sft, tokenize_sft
from utils.checkpoint import CheckpointError, adapter_base_path, load_model, verify_checkpoint
from utils.config import ConfigError
from utils.files import sha256_file
from utils.finetune import SFTSettings, StageLogger, build_sft_trainer, load_base_model, load_settings, resolve_input
from utils.metrics import read_metrics
from utils.templates import INSTRUCT, apply_template, load_template_name

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def reply_loss(model, examples) -> float:
    """Mean cross-entropy over the reply tokens only (labels != -100)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            labels = torch.tensor([example.labels])
            loss = model(input_ids=torch.tensor([example.input_ids]), labels=labels).loss
            n = int((labels[:, 1:] != -100).sum())
            total, count = total + loss.item() * n, count + n
    return total / count


def test_sft_lowers_the_reply_loss(micro_checkpoint, tokenizer, tmp_path):
    apply_template(tokenizer, "chatml")
    examples = tokenize_sft(tokenizer, builtin_sft(seed=0)[:16], 96, "truncate", DatasetStats("builtin"))
    model = load_base_model(micro_checkpoint)
    before = reply_loss(model, examples)
    settings = SFTSettings(learning_rate=5e-3, max_steps=30, batch_size=8, logging_steps=10, warmup_ratio=0.0,
                           lr_scheduler_type="constant", eval_fraction=0.0)
    logger = StageLogger("sft", tmp_path / "metrics.jsonl")
    trainer = build_sft_trainer(model, tokenizer, examples, [], settings, tmp_path / "state", logger, max_length=96)
    trainer.train()
    after = reply_loss(trainer.model, examples)
    # an untrained micro model has tiny logits (tied 0.02-std embeddings) that LoRA cannot rescale, so 0.3 nats
    # is a large move for it
    assert after < before - 0.3, (before, after)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["event"] == "train"]
    assert [r["step"] for r in rows] == [1, 10, 20, 30]
    assert all({"loss", "lr", "grad_norm", "tokens", "memory_mb"} <= set(r) for r in rows)
    frozen = [p for n, p in trainer.model.named_parameters() if "lora_" not in n]
    assert frozen and not any(p.requires_grad for p in frozen)


@pytest.fixture(scope="module")
def sft_run(micro_checkpoint, tmp_path_factory):
    """03_sft.py on a messages-format file with the instruct template, --merge, checkpoints every 3 steps."""
    work = tmp_path_factory.mktemp("sft_run")
    records = [{"messages": c} for c in builtin_sft(seed=1)[:40]]
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = work / "sft"
    done = run_script(
        "scripts/03_sft.py", "--model_path", str(micro_checkpoint), "--dataset_path", str(work / "data.jsonl"),
        "--output_dir", str(out), "--prompt_template", "instruct", "--max_steps", "6", "--batch_size", "4",
        "--learning_rate", "3e-3", "--max_length", "96", "--eval_fraction", "0.1", "--eval_steps", "3",
        "--save_steps", "3", "--logging_steps", "2", "--merge",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, micro_checkpoint


def test_sft_writes_a_loadable_adapter_that_matches_its_merged_model(sft_run):
    out, base = sft_run
    assert (out / "latest").read_text().strip() == "final"
    final = resolve_input(out)
    verify_checkpoint(final)
    verify_checkpoint(out / "merged")
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())  # absolute: resolves from any cwd
    assert adapter_base_path(final).resolve() == base.resolve()
    assert load_template_name(final) == load_template_name(out / "merged") == "instruct"
    adapter, tokenizer = load_model(out)
    merged, _ = load_model(out / "merged")
    assert tokenizer.chat_template == INSTRUCT
    ids = torch.tensor([tokenizer("### Instruction:\nWhat does json.dumps do?\n\n### Response:\n")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(adapter(ids).logits, merged(ids).logits, atol=1e-5)
        assert not torch.allclose(adapter(ids).logits, load_model(base)[0](ids).logits, atol=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["train_examples"] == 36 and summary["eval_examples"] == 4
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    events = {r["event"] for r in read_metrics(out / "metrics.jsonl")}
    assert events == {"train", "eval"}
    run = json.loads((final / "run.json").read_text())  # what reproduces the run: data hash, settings, step
    assert run["stage"] == "sft" and run["global_step"] == 6 and run["settings"]["prompt_template"] == "instruct"
    assert run["dataset_sha256"] == sha256_file(out.parent / "data.jsonl")


def test_sft_resume_continues_from_the_last_checkpoint(sft_run):
    out, base = sft_run
    done = run_script(
        "scripts/03_sft.py", "--model_path", str(base), "--dataset_path", str(out.parent / "data.jsonl"),
        "--output_dir", str(out), "--prompt_template", "instruct", "--max_steps", "8", "--batch_size", "4",
        "--learning_rate", "3e-3", "--max_length", "96", "--eval_fraction", "0.1", "--eval_steps", "3",
        "--save_steps", "3", "--logging_steps", "2", "--resume",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-6") and summary["steps"] == 8
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # no step trained twice


def test_sft_bad_input_exits_with_a_message(micro_checkpoint, tmp_path, run_stage):
    code, _, stderr = run_stage("03_sft.py", ["--model_path", str(micro_checkpoint), "--prompt_template", "alpaca",
                                              "--output_dir", str(tmp_path / "out")])
    assert code == 2
    assert "invalid choice: 'alpaca' (choose from 'chatml', 'instruct', 'chat')" in stderr
    assert "Traceback" not in stderr
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"is not a checkpoint: missing model.safetensors, tokenizer.json"):
        resolve_input(tmp_path / "half")
    (tmp_path / "bad.json").write_text(json.dumps({"prompt_template": "alpaca"}))
    with pytest.raises(ConfigError, match="unknown prompt template 'alpaca'; valid templates: chatml, instruct, chat"):
        load_settings(SFTSettings, tmp_path / "bad.json", object())
