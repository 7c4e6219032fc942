"""The GPU path: what only a CUDA GPU can show (marked `gpu`: skipped without one, run by bench/gpu_check.sh),
and the CPU side of it that every run checks: the GPU check's dry run, and the one-paragraph refusals of --fp8
and --load_in_4bit where they cannot run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import queue
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from presets import micro_preset

from utils.chat_data import DatasetStats, builtin_sft, tokenize_sft
from utils.config import ConfigError
from utils.decoding import BatchDecoder, GenerationSettings
from utils.finetune import SFTSettings, StageLogger, build_sft_trainer, check_4bit_flags, load_base_model
from utils.generation import encode_prompt, generate
from utils.gpu import FP8_MIN_CAPABILITY, GPUFeatureError, check_4bit_loading, check_fp8_training
from utils.loading import load_for_inference
from utils.metrics import read_metrics
from utils.model import build_model
from utils.scheduler import Scheduler
from utils.server import ServerSettings, create_app
from utils.templates import apply_template
from utils.tokenizer import load_tokenizer
from utils.tokens import open_tokens
from utils.training import WindowSampler, causal_lm_loss

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "scripts/02_pretrain.py"
CUDA = torch.device("cuda")
# 8 steps of 4 × 64 tokens, a checkpoint at step 4, a metrics row every step.
RUN = ["--max_steps", "8", "--save_steps", "4", "--eval_steps", "4", "--eval_batches", "2", "--logging_steps", "1",
       "--batch_size", "4"]
PROMPTS = ["The quick brown fox", "def main():\n    return", "A list is a mutable sequence type that", "Hi",
           "import json", "class Point:", "The for statement", "Dictionaries map keys to"]


# ---------------------------------------------------------------- CPU: the check's dry run and the refusals


def test_gpu_check_dry_run_prints_the_plan_and_writes_the_skeleton(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", "bench/gpu_check.sh", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "DRY_RUN": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    parts = ["install", "extras", "gpu_tests", "pipeline_smoke", "decode", "pretrain_bench"]
    assert list(report["parts"]) == parts and report["dry_run"] is True and report["passed"] is None
    reason = "dry run" if torch.cuda.is_available() else "no CUDA"
    assert all(part["skipped"] == reason for part in report["parts"].values())
    assert sum(part["limit_s"] for part in report["parts"].values()) <= 480
    assert report["versions"]["torch"] == torch.__version__
    for name in parts:
        assert f"  {name} " in done.stdout
    assert not (out / "gpu_check.log").exists()  # nothing was run


def without_module(monkeypatch, name: str) -> None:
    """`name` looks uninstalled to importlib.util.find_spec, which the GPU checks use."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda module, *args: None if module == name else find_spec(module, *args))


def test_fp8_is_refused_where_it_cannot_run(monkeypatch, run_stage):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_stage("02_pretrain.py", ["--config", "config/micro.json", "--data_path", "unused", "--fp8"])
    assert code == 2 and err.startswith("error: --fp8 needs a CUDA GPU with FP8 tensor cores"), (code, err)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (8, 0))
    with pytest.raises(GPUFeatureError, match=r"compute capability 8\.9 or newer.*A100-SXM4-80GB has 8\.0"):
        check_fp8_training(CUDA)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: FP8_MIN_CAPABILITY)
    without_module(monkeypatch, "torchao")
    with pytest.raises(GPUFeatureError, match=r"torchao is not installed: pip install torchao"):
        check_fp8_training(CUDA)


def test_load_in_4bit_is_refused_with_full_merge_on_cpu_and_without_bitsandbytes(monkeypatch, run_stage):
    qlora = dict(load_in_4bit=True, full=False, merge=False)
    with pytest.raises(ConfigError, match=r"--load_in_4bit cannot be combined with --full: 4-bit weights .* cannot "
                                          r"be fully fine-tuned"):
        check_4bit_flags(argparse.Namespace(**{**qlora, "full": True}))
    with pytest.raises(ConfigError, match=r"cannot be combined with --merge"):
        check_4bit_flags(argparse.Namespace(**{**qlora, "merge": True}))
    check_4bit_flags(argparse.Namespace(load_in_4bit=False, full=True, merge=True))  # no --load_in_4bit: no checks
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for script in ("03_sft.py", "04_dpo.py"):
        code, _, err = run_stage(script, ["--load_in_4bit", "--model_path", "unused"])
        assert code == 2 and err.startswith("error: --load_in_4bit needs a CUDA GPU"), (script, code, err)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    without_module(monkeypatch, "bitsandbytes")
    with pytest.raises(GPUFeatureError, match=r"not installed: pip install bitsandbytes"):
        check_4bit_loading()


# ---------------------------------------------------------------- GPU


def pretrain(config: Path, data: Path, output_dir: Path, *args: str, prefix: tuple[str, ...] = (),
             timeout: int = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, *prefix, SCRIPT, "--config", str(config), "--data_path", str(data), "--output_dir",
               str(output_dir), *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def train_rows(output_dir: Path) -> list[dict]:
    return [row for row in read_metrics(output_dir / "metrics.jsonl") if row["event"] == "train"]


def micro_model(tokenizer_dir: Path, attn: str = "sdpa") -> torch.nn.Module:
    tokenizer = load_tokenizer(tokenizer_dir)
    return build_model(micro_preset(len(tokenizer)), tokenizer, attn_implementation=attn, seed=0)


def train_windows(processed_dir: Path, rows: int = 8, length: int = 64) -> torch.Tensor:
    return WindowSampler(open_tokens(processed_dir, "train"), seed=0).windows(0, rows, length)


@pytest.mark.gpu
def test_bf16_training_step_matches_fp32(tokenizer_dir, processed_dir):
    batch = train_windows(processed_dir).to(CUDA)
    steps = {}
    for precision in ("fp32", "bf16"):
        model = micro_model(tokenizer_dir).to(CUDA).train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            dtype = model(input_ids=batch[:, :-1]).logits.dtype
            loss = causal_lm_loss(model, batch)[0]
        loss.backward()
        steps[precision] = dtype, loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])
    (fp32_dtype, fp32_loss, fp32_grad), (bf16_dtype, bf16_loss, bf16_grad) = steps["fp32"], steps["bf16"]
    assert fp32_dtype == torch.float32 and bf16_dtype == torch.bfloat16
    assert bf16_loss == pytest.approx(fp32_loss, rel=1e-2)
    # The gradients, not the loss after an AdamW update: Adam's first step is about sign(gradient), so rounding
    # noise in near-zero gradients becomes full-size updates in either precision.
    assert bf16_grad.norm().item() == pytest.approx(fp32_grad.norm().item(), rel=5e-2)
    assert torch.nn.functional.cosine_similarity(bf16_grad, fp32_grad, dim=0).item() > 0.99


@pytest.mark.gpu
def test_flash_attention_2_matches_sdpa(tokenizer_dir, processed_dir):
    pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    ids = train_windows(processed_dir, rows=4)[:, :-1].to(CUDA)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0  # a left-padded row: flash-attn takes its variable-length path
    logits = {}
    for attn in ("sdpa", "flash_attention_2"):
        model = micro_model(tokenizer_dir, attn).to(CUDA, torch.bfloat16).eval()
        with torch.no_grad():
            logits[attn] = model(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool()
    torch.testing.assert_close(logits["flash_attention_2"][real], logits["sdpa"][real], atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_compiled_pretraining_runs_a_few_steps(micro_config, processed_dir, tmp_path):
    out = tmp_path / "compiled"
    pretrain(micro_config, processed_dir, out, "--compile", "--max_steps", "6", "--logging_steps", "1",
             "--eval_steps", "0", "--save_steps", "0", "--eval_batches", "2", "--batch_size", "4")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["device"].startswith("cuda") and summary["precision"] == "bf16"
    rows = train_rows(out)
    assert [row["step"] for row in rows] == list(range(1, 7)) and all(math.isfinite(row["loss"]) for row in rows)


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, micro_config, processed_dir) -> Path:
    """8 bf16 steps with a checkpoint at step 4; eager attention, whose backward has no atomics (SDPA's fused
    kernels accumulate in an order that can change between processes)."""
    out = tmp_path_factory.mktemp("gpu_run") / "out"
    pretrain(micro_config, processed_dir, out, *RUN, "--attn", "eager")
    return out


@pytest.mark.gpu
def test_resume_on_gpu_continues_exactly(gpu_run, micro_config, processed_dir, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(gpu_run / "step_4", out / "step_4")
    (out / "latest").write_text("step_4\n")
    shutil.copy(gpu_run / "metrics.jsonl", out / "metrics.jsonl")  # rows after step 4 are dropped on resume
    done = pretrain(micro_config, processed_dir, out, "--resume_from_checkpoint", "latest")
    assert "resumed from" in done.stdout
    timing = ("time", "tokens_per_second", "mfu", "memory_mb")
    resumed, original = ([{k: v for k, v in row.items() if k not in timing} for row in read_metrics(path)]
                         for path in (out / "metrics.jsonl", gpu_run / "metrics.jsonl"))
    assert [(r["event"], r["step"]) for r in resumed] == [(r["event"], r["step"]) for r in original]
    for mine, theirs in zip(resumed, original):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            # Same data, moments, schedule and RNG give the same numbers; a tolerance only for GPU reductions
            # that may sum in another order (a wrong batch or lost moments moves the loss by percent).
            expected = pytest.approx(value, rel=1e-4, abs=1e-6) if isinstance(value, float) else value
            assert mine[key] == expected, (mine["step"], key)


@pytest.mark.gpu
def test_out_of_memory_halves_the_micro_batch(micro_config, processed_dir, tmp_path):
    # A 1 GiB allocator cap makes a 4096-row micro-batch fail in the real allocator, as a too-large batch does.
    capped = ("import runpy, sys, torch; total = torch.cuda.get_device_properties(0).total_memory; "
              "torch.cuda.set_per_process_memory_fraction(min(1.0, 2**30 / total)); sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    out = tmp_path / "oom"
    done = pretrain(micro_config, processed_dir, out, "--batch_size", "4096", "--auto_batch_size", "--max_steps", "2",
                    "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "0", "--eval_batches", "1",
                    prefix=("-c", capped))
    assert "out of memory; micro-batch now" in done.stdout
    changes = [row for row in read_metrics(out / "metrics.jsonl") if row["event"] == "batch_size"]
    sizes = [4096] + [row["micro_batch_size"] for row in changes]
    assert len(sizes) > 1 and all(b == a // 2 for a, b in zip(sizes, sizes[1:]))
    assert all(row["micro_batch_size"] * row["gradient_accumulation_steps"] == 4096 for row in changes)
    assert [row["tokens"] for row in train_rows(out)] == [4096 * 64, 2 * 4096 * 64]  # the same tokens per step


@pytest.mark.gpu
def test_fp8_pretraining_tracks_bf16_and_saves_a_plain_checkpoint(gpu_run, micro_config, processed_dir, tmp_path):
    if torch.cuda.get_device_capability() < FP8_MIN_CAPABILITY:
        pytest.skip(f"{torch.cuda.get_device_name()} has no FP8 tensor cores")
    pytest.importorskip("torchao", reason="torchao is not installed")
    out = tmp_path / "fp8"
    done = pretrain(micro_config, processed_dir, out, "--max_steps", "3", "--eval_steps", "0", "--save_steps", "0",
                    "--eval_batches", "2", "--logging_steps", "1", "--batch_size", "4", "--attn", "eager", "--fp8")
    assert "fp8: 14 linear layers train with float8 matmuls" in done.stdout  # 7 per block, not the tied head
    # Step 1 is computed before any update: it differs from bf16's only by the float8 matmuls.
    assert train_rows(out)[0]["loss"] == pytest.approx(train_rows(gpu_run)[0]["loss"], rel=5e-2)
    from transformers import AutoModelForCausalLM

    _, loading = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]  # the same keys as a plain model


@pytest.mark.gpu
def test_qlora_trains_a_lora_adapter_on_4bit_weights(micro_checkpoint, tokenizer, tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    model = load_base_model(micro_checkpoint, "sdpa", load_in_4bit=True)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14
    apply_template(tokenizer, "chatml")
    examples = tokenize_sft(tokenizer, builtin_sft(seed=0)[:16], 96, "truncate", DatasetStats("builtin"))
    settings = SFTSettings(learning_rate=1e-3, max_steps=4, batch_size=4, logging_steps=1, warmup_ratio=0.0,
                           eval_fraction=0.0)
    trainer = build_sft_trainer(model, tokenizer, examples, [], settings, tmp_path / "state",
                                StageLogger("sft", tmp_path / "metrics.jsonl"), max_length=96, precision="bf16")
    result = trainer.train()
    assert math.isfinite(result.training_loss) and trainer.state.global_step == 4
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


@pytest.mark.gpu
def test_server_decodes_on_gpu_and_a_batch_of_8_greedy_streams_equals_sequential(micro_checkpoint, monkeypatch):
    served = load_for_inference(micro_checkpoint, "cuda")  # as 06_serve.py loads it: bf16 on this GPU
    from fastapi.testclient import TestClient

    with TestClient(create_app(served, ServerSettings(model_id="micro"))) as client:
        answer = client.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 8, "temperature": 0})
    assert answer.status_code == 200 and isinstance(answer.json()["text"], str)

    # fp32 for the comparison: in bf16 a batch's matrix products round differently from one sequence's, which can
    # flip a near-tie argmax; that is rounding, not a batching bug.
    loaded = load_for_inference(micro_checkpoint, "cuda", torch.float32)
    assert next(loaded.model.parameters()).device.type == "cuda"
    settings = GenerationSettings(max_new_tokens=24)
    alone = [generate(loaded.model, loaded.tokenizer, prompt, settings).tokens for prompt in PROMPTS]
    widths = []
    step = BatchDecoder.step

    def counted_step(self: BatchDecoder) -> None:
        widths.append(len(self))
        step(self)

    monkeypatch.setattr(BatchDecoder, "step", counted_step)
    scheduler = Scheduler(loaded, max_batch_size=8, max_queue=8)
    events = [queue.Queue() for _ in PROMPTS]
    for prompt, inbox in zip(PROMPTS, events):  # all queued before the thread starts: one batch of 8
        scheduler.submit(scheduler.decoder.new_sequence(encode_prompt(loaded.tokenizer, prompt), settings, inbox.put))
    scheduler.start()
    try:
        finals = []
        for inbox in events:
            while (event := inbox.get(timeout=60)).result is None and event.error is None:
                pass
            finals.append(event)
    finally:
        scheduler.stop()
    assert max(widths) == 8
    assert [event.result.tokens for event in finals] == alone
