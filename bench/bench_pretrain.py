#!/usr/bin/env python
"""Benchmark of stage 02's training step: tokens/s and MFU against a minimal plain-PyTorch loop.

CPU (always): the tiny preset's dims in fp32 (`--mixed_precision bf16`: every loop under bf16 autocast),
sequence 256, micro-batch 8, in rounds of one step of each loop that alternate the order (the loops' steps are
neighbours in time, so the machine's drift cancels in the per-round ratios, whose median is the headline figure):
- the stage's step (window sampler, accelerate, fused AdamW with decay groups, clipping, the non-finite
  guard: `utils.training.optimizer_step`) on the preset's transformers model, with the attention `--attn auto`
  picks (SDPA; transformers' eager attention in bf16);
- a plain loop (forward, cross-entropy, backward, clip, torch AdamW) on a copy of the same model;
- a lean GPT written here in the nanoGPT shape (fused QKV, GELU MLP of 4 × width, LayerNorm, learned
  positions, tied head, its own fused AdamW with decay groups) at the tiny preset's width, depth, heads,
  vocabulary and sequence length.
- the stage's step on a copy of the preset's model compiled as `02_pretrain.py --compile` compiles it
  (accelerate's regional compilation: one decoder layer compiled, reused by the others);
- with `--mixed_precision bf16`, also the lean GPT in fp32, as nanoGPT trains on a CPU.
All are scored with one FLOP formula (6 × matmul parameters + attention), so the ratios compare achieved
FLOP/s, not tokens/s of models of different sizes. With `--optimizer muon` the stage's steps use the Muon
recipe instead. Writes bench/results/pretrain_cpu.json (pretrain_cpu_bf16.json in bf16).

GPU (when one is present): tokens/s, MFU and peak memory of the stage's step for the small and base presets
at their preset micro-batch and sequence length, bf16, with and without --compile's regional compilation. Writes
bench/results/pretrain_gpu.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import compile_regions

from utils.config import load_preset
from utils.metrics import memory_mb, mfu, peak_flops, training_flops_per_token
from utils.model import build_model, count_parameters, cpu_bf16_is_fast, resolve_attention
from utils.training import WindowSampler, build_optimizers, flops_per_token, keep_freed_memory, optimizer_step

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "bench" / "results"
LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-3, 0.1, 1.0


def synthetic_tokens(vocab_size: int, count: int = 2_000_000, seed: int = 0) -> np.ndarray:
    """Random token ids: the step's cost does not depend on which ids it sees."""
    return np.random.default_rng(seed).integers(0, vocab_size, count, dtype=np.int64).astype(np.uint16)


class StageStep:
    """The step 02_pretrain.py runs: windows from the sampler, then `optimizer_step` through accelerate."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, tokens: np.ndarray, batch: int, seq: int,
                 optimizer: str = "adamw"):
        self.accelerator = accelerator
        self.model, *self.optimizers = accelerator.prepare(
            model, *build_optimizers(model, optimizer, LEARNING_RATE, WEIGHT_DECAY))
        self.sampler = WindowSampler(tokens, seed=0)
        self.batch, self.seq, self.cursor = batch, seq, 0

    def __call__(self) -> float:
        windows = self.sampler.windows(self.cursor, self.batch, self.seq)
        self.cursor += self.batch
        result = optimizer_step(self.accelerator, self.model, self.optimizers, [windows], 1.0, MAX_GRAD_NORM)
        return result.loss


class LeanBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.up = nn.Linear(width, 4 * width, bias=False)
        self.down = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(self.norm1(x)).split(width, dim=2))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class LeanGPT(nn.Module):
    """The nanoGPT shape, as a reference for what a lean hand-written model achieves on this machine."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, length: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.blocks = nn.ModuleList(LeanBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.size(1), device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def flops_per_token(self, length: int) -> float:
        matmul = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and not n.startswith("positions"))
        return training_flops_per_token(matmul, len(self.blocks), self.norm.normalized_shape[0], length)


class PlainStep:
    """A minimal plain-PyTorch loop: forward, cross-entropy, backward, clip, AdamW step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: np.ndarray, batch: int,
                 seq: int, bf16: bool = False):
        self.model, self.optimizer = model, optimizer
        self.sampler = WindowSampler(tokens, seed=0)
        self.batch, self.seq, self.cursor = batch, seq, 0
        self.bf16 = bf16  # forward and loss under bf16 autocast, as nanoGPT's training loop sets it up

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def __call__(self) -> float:
        windows = self.sampler.windows(self.cursor, self.batch, self.seq)
        self.cursor += self.batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.logits(windows[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def reference_step(model: torch.nn.Module, tokens: np.ndarray, batch: int, seq: int, bf16: bool) -> PlainStep:
    """The plain loop on the stage's own model, with torch AdamW as a tutorial would set it up."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    return PlainStep(model, optimizer, tokens, batch, seq, bf16)


class LeanStep(PlainStep):
    """The lean GPT's own loop: its forward, and fused AdamW with decay groups."""

    def __init__(self, model: LeanGPT, tokens: np.ndarray, batch: int, seq: int, bf16: bool):
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                       {"params": rest, "weight_decay": 0.0}], lr=LEARNING_RATE, fused=True)
        super().__init__(model, optimizer, tokens, batch, seq, bf16)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)


def timed(step, count: int) -> float:
    """Seconds per step over `count` steps (the last step's loss is read, so every step has finished)."""
    started = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - started) / count


def bench_cpu(rounds: int, steps: int, warmup: int, optimizer: str, precision: str) -> dict:
    preset = load_preset(ROOT / "config" / "tiny.json")
    batch, seq, bf16 = 8, 256, precision == "bf16"
    attention = resolve_attention("auto", "cpu", precision, seq)  # as 02_pretrain.py picks it
    model = build_model(preset, attn_implementation=attention, seed=0).train()
    reference_model, compiled_model = copy.deepcopy(model), compile_regions(copy.deepcopy(model))
    torch.manual_seed(0)
    lean_model = LeanGPT(preset.vocab_size, preset.d_model, preset.n_layer, preset.n_head, seq).train()
    tokens = synthetic_tokens(preset.vocab_size)
    accelerator = Accelerator(cpu=True, mixed_precision=precision)
    keep_freed_memory(accelerator.device)  # as 02_pretrain.py does; it holds for all the loops in this process
    loops = {"stage": StageStep(accelerator, model, tokens, batch, seq, optimizer),
             "stage_compiled": StageStep(accelerator, compiled_model, tokens, batch, seq, optimizer),
             "reference": reference_step(reference_model, tokens, batch, seq, bf16),
             "lean": LeanStep(lean_model, tokens, batch, seq, bf16)}
    same_model = flops_per_token(model, seq)
    flops = {"stage": same_model, "stage_compiled": same_model, "reference": same_model,
             "lean": lean_model.flops_per_token(seq)}
    if bf16:  # nanoGPT trains in fp32 on a CPU: its autocast context is for CUDA only
        loops["lean_fp32"] = LeanStep(copy.deepcopy(lean_model), tokens, batch, seq, bf16=False)
        flops["lean_fp32"] = flops["lean"]
    started = time.perf_counter()
    loops["stage_compiled"]()
    compile_seconds = time.perf_counter() - started
    for _ in range(warmup):
        for step in loops.values():
            step()
    per_round = []
    for index in range(rounds):
        # Alternate the order, so a load change mid-round does not always favour one loop.
        order = list(loops.items()) if index % 2 == 0 else list(loops.items())[::-1]
        per_round.append({name: flops[name] * batch * seq / timed(step, steps) for name, step in order})
    device = torch.device("cpu")
    achieved = {name: statistics.median(r[name] for r in per_round) for name in loops}
    return {
        "config": {"preset": "tiny", "dtype": "bf16 autocast" if bf16 else "fp32", "attention": attention,
                   "sequence_length": seq, "micro_batch": batch,
                   "d_ff": preset.d_ff, "optimizer": optimizer, "parameters": count_parameters(model).total,
                   "lean_parameters": sum(p.numel() for p in lean_model.parameters()),
                   "flops_per_token": flops, "rounds": rounds, "steps_per_round": steps, "warmup_steps": warmup,
                   "first_compiled_step_seconds": round(compile_seconds, 1)},
        "peak_flops": peak_flops(device, precision),
        **{name: {"tokens_per_second": round(achieved[name] / flops[name], 1),
                  "achieved_gflops": round(achieved[name] / 1e9, 2),
                  "mfu": round(mfu(achieved[name] / flops[name], flops[name], device, precision), 4)}
           for name in loops},
        **paired_ratios(per_round, "stage", "lean", "ratio_vs_lean"),
        **paired_ratios(per_round, "stage", "reference", "ratio_vs_plain_loop"),
        **paired_ratios(per_round, "stage_compiled", "lean", "compiled_ratio_vs_lean"),
        **(paired_ratios(per_round, "stage", "lean_fp32", "ratio_vs_lean_fp32") if bf16 else {}),
        "peak_rss_mb": round(memory_mb(device), 1),
    }


def paired_ratios(per_round: list[dict], loop: str, other: str, key: str) -> dict:
    """`loop`'s achieved FLOP/s over `other`'s as `key`: the median of the per-round ratios (paired in time),
    with the quartiles of those ratios and the ratio of the two medians beside it."""
    ratios = sorted(r[loop] / r[other] for r in per_round)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {key: round(statistics.median(ratios), 3),
            f"{key}_quartiles": [round(quartiles[0], 3), round(quartiles[2], 3)],
            key.replace("ratio_vs", "ratio_of_medians_vs"): round(statistics.median(r[loop] for r in per_round)
                                                                  / statistics.median(r[other] for r in per_round), 3),
            f"per_round_{key}": [round(r[loop] / r[other], 3) for r in per_round]}


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
                model = compile_regions(model)  # as 02_pretrain.py --compile does
            stage = StageStep(accelerator, model, synthetic_tokens(preset.vocab_size), batch, seq,
                              preset.training.optimizer)
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
    parser.add_argument("--rounds", type=int, default=25, help="CPU: alternating rounds of stage and reference")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per loop per round (GPU: 10 at least)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first (a compiled step settles after 3-4)")
    parser.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw",
                        help="CPU: the stage step's optimizer (the lean and plain loops use AdamW)")
    parser.add_argument("--mixed_precision", choices=("auto", "no", "bf16"), default="no",
                        help="CPU: every loop's precision (auto: as 02_pretrain.py resolves it here). bf16 also "
                             "times the lean GPT in fp32, as nanoGPT trains on a CPU")
    parser.add_argument("--skip_cpu", action="store_true", help="only the GPU benchmark")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.skip_cpu:
        precision = args.mixed_precision
        if precision == "auto":
            precision = "bf16" if cpu_bf16_is_fast() else "no"
        result = {"machine": machine(),
                  **bench_cpu(args.rounds, args.steps, args.warmup, args.optimizer, precision)}
        name = "pretrain_cpu_bf16.json" if precision == "bf16" else "pretrain_cpu.json"
        (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        if "ratio_vs_lean_fp32" in result:
            print(f"CPU, bf16: stage {result['ratio_vs_lean_fp32']:.3f}× the lean GPT in fp32 "
                  f"(quartiles {result['ratio_vs_lean_fp32_quartiles']})")
        print(f"CPU: stage {result['stage']['achieved_gflops']:.1f} GFLOP/s (MFU {result['stage']['mfu']:.1%}); "
              f"{result['ratio_vs_lean']:.3f}× the lean GPT ({result['lean']['achieved_gflops']:.1f} GFLOP/s; "
              f"quartiles {result['ratio_vs_lean_quartiles']}), {result['ratio_vs_plain_loop']:.3f}× the plain "
              "loop on the same model (medians of the per-round ratios)")
        print(f"CPU, --compile: stage {result['stage_compiled']['achieved_gflops']:.1f} GFLOP/s; "
              f"{result['compiled_ratio_vs_lean']:.3f}× the lean GPT (quartiles "
              f"{result['compiled_ratio_vs_lean_quartiles']}); first step (compilation) "
              f"{result['config']['first_compiled_step_seconds']} s")
    if torch.cuda.is_available():
        result = {"machine": machine(), "runs": bench_gpu(max(args.steps, 10), max(args.warmup, 3))}
        (RESULTS / "pretrain_gpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
