#!/usr/bin/env python
"""Benchmark of stage 02's training step: tokens/s and MFU against a minimal plain-PyTorch loop.

CPU (always): the tiny preset's dims in fp32, sequence 256, micro-batch 8. The stage's step (window sampler,
accelerate, fused AdamW with decay groups, clipping, the non-finite guard: `utils.training.optimizer_step`)
and a minimal reference (forward, cross-entropy, backward, clip, torch AdamW) train two copies of the same
model on the same batches, alternated in rounds so that both see the same machine load. Writes
bench/results/pretrain_cpu.json.

GPU (when one is present): tokens/s, MFU and peak memory of the stage's step for the small and base presets
at their preset micro-batch and sequence length, bf16, with and without torch.compile. Writes
bench/results/pretrain_gpu.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from utils.config import load_preset  # noqa: E402
from utils.metrics import memory_mb, mfu, peak_flops, training_flops_per_token  # noqa: E402
from utils.model import build_model, count_parameters, resolve_attention  # noqa: E402
from utils.training import WindowSampler, build_optimizer, matmul_parameters, optimizer_step  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-3, 0.1, 1.0


def synthetic_tokens(vocab_size: int, count: int = 2_000_000, seed: int = 0) -> np.ndarray:
    """Random token ids: the step's cost does not depend on which ids it sees."""
    return np.random.default_rng(seed).integers(0, vocab_size, count, dtype=np.int64).astype(np.uint16)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    config = model.config
    return training_flops_per_token(matmul_parameters(model), config.num_hidden_layers, config.hidden_size, seq_len)


class StageStep:
    """The step 02_pretrain.py runs: windows from the sampler, then `optimizer_step` through accelerate."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, tokens: np.ndarray, batch: int, seq: int):
        self.accelerator = accelerator
        self.model, self.optimizer = accelerator.prepare(model, build_optimizer(model, LEARNING_RATE, WEIGHT_DECAY))
        self.sampler = WindowSampler(tokens, seed=0)
        self.batch, self.seq, self.cursor = batch, seq, 0

    def __call__(self) -> float:
        windows = self.sampler.windows(self.cursor, self.batch, self.seq)
        self.cursor += self.batch
        result = optimizer_step(self.accelerator, self.model, self.optimizer, [windows], LEARNING_RATE, MAX_GRAD_NORM)
        return result.loss


class ReferenceStep:
    """A minimal plain-PyTorch loop on the same model and batches."""

    def __init__(self, model: torch.nn.Module, tokens: np.ndarray, batch: int, seq: int):
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        self.sampler = WindowSampler(tokens, seed=0)
        self.batch, self.seq, self.cursor = batch, seq, 0

    def __call__(self) -> float:
        windows = self.sampler.windows(self.cursor, self.batch, self.seq)
        self.cursor += self.batch
        logits = self.model(input_ids=windows[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def timed(step, count: int) -> float:
    """Seconds per step over `count` steps (the last step's loss is read, so every step has finished)."""
    started = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - started) / count


def bench_cpu(rounds: int, steps: int, warmup: int) -> dict:
    preset = load_preset(ROOT / "config" / "tiny.json")
    batch, seq = 8, 256
    model = build_model(preset, attn_implementation="sdpa", seed=0).train()
    reference_model = copy.deepcopy(model)
    tokens = synthetic_tokens(preset.vocab_size)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    stage = StageStep(accelerator, model, tokens, batch, seq)
    reference = ReferenceStep(reference_model, tokens, batch, seq)
    for _ in range(warmup):
        stage(), reference()
    per_round = []
    for index in range(rounds):
        # Alternate which loop goes first, so a load change mid-round does not always favour one.
        order = [("stage", stage), ("reference", reference)]
        times = dict((name, timed(step, steps)) for name, step in (order if index % 2 == 0 else order[::-1]))
        per_round.append({name: batch * seq / seconds for name, seconds in times.items()})
    fpt = flops_per_token(model, seq)
    device = torch.device("cpu")
    stage_tps = statistics.median(r["stage"] for r in per_round)
    reference_tps = statistics.median(r["reference"] for r in per_round)
    return {
        "config": {"preset": "tiny", "dtype": "fp32", "sequence_length": seq, "micro_batch": batch,
                   "parameters": count_parameters(model).total, "flops_per_token": fpt,
                   "rounds": rounds, "steps_per_round": steps, "warmup_steps": warmup},
        "peak_flops": peak_flops(device),
        "stage": {"tokens_per_second": round(stage_tps, 1), "mfu": round(mfu(stage_tps, fpt, device), 4)},
        "reference": {"tokens_per_second": round(reference_tps, 1), "mfu": round(mfu(reference_tps, fpt, device), 4)},
        "ratio": round(stage_tps / reference_tps, 3),
        "per_round_ratio": [round(r["stage"] / r["reference"], 3) for r in per_round],
        "peak_rss_mb": round(memory_mb(device), 1),
    }


def bench_gpu(steps: int, warmup: int) -> list[dict]:
    device = torch.device("cuda")
    rows = []
    for name in ("small", "base"):
        preset = load_preset(ROOT / "config" / f"{name}.json")
        batch, seq = preset.training.batch_size, preset.training.sequence_length
        for compiled in (False, True):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            accelerator = Accelerator(mixed_precision="bf16")
            model = build_model(preset, attn_implementation=resolve_attention("auto"), seed=0).to(device).train()
            fpt = flops_per_token(model, seq)
            if compiled:
                model = torch.compile(model)
            stage = StageStep(accelerator, model, synthetic_tokens(preset.vocab_size), batch, seq)
            for _ in range(warmup):
                stage()
            seconds = timed(stage, steps)
            tps = batch * seq / seconds
            rows.append({
                "preset": name, "compile": compiled, "micro_batch": batch, "sequence_length": seq,
                "tokens_per_second": round(tps, 1), "mfu": round(mfu(tps, fpt, device) or 0.0, 4),
                "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            })
            print(json.dumps(rows[-1]))
            del stage, model
    return rows


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="CPU: alternating rounds of stage and reference")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per loop per round (GPU: in all)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--skip_cpu", action="store_true", help="only the GPU benchmark")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.skip_cpu:
        result = {"machine": machine(), **bench_cpu(args.rounds, args.steps, args.warmup)}
        (RESULTS / "pretrain_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"CPU: stage {result['stage']['tokens_per_second']:,.0f} tok/s (MFU {result['stage']['mfu']:.1%}) vs "
              f"reference {result['reference']['tokens_per_second']:,.0f} tok/s: {result['ratio']:.2f}×")
    if torch.cuda.is_available():
        result = {"machine": machine(), "runs": bench_gpu(max(args.steps, 10), max(args.warmup, 3))}
        (RESULTS / "pretrain_gpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
