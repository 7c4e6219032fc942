"""The parts of a training loop every training stage shares.

AdamW with weight-decay groups (or Muon for the hidden matrices beside it), learning-rate schedules, the
deterministic window sampler over memmapped tokens, one accelerate optimizer step (accumulation, clipping,
non-finite guard), the signals that stop a run cleanly, and the `training_state/` files that make a resume exact.
"""

from __future__ import annotations

import ctypes
import math
import random
import re
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from utils.config import OPTIMIZERS, SCHEDULES
from utils.files import atomic_directory, atomic_write_json
from utils.layout import BEST, FINAL, LATEST, STATE_DIR, STEP_PREFIX, TRACKER_DIR, checkpoint_steps
from utils.metrics import training_flops_per_token
from utils.model import cpu_bf16_is_fast
from utils.model_card import write_model_card
from utils.tokenizer import save_tokenizer

SAMPLING = ("strided", "random")
STATE_FILE = "state.pt"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_{rank}.pt"


class TrainingError(ValueError):
    """A training setting or a resumed state that cannot work; the message says which and why."""


# ---------------------------------------------------------------- optimizer and schedules


def decay_parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear layers, embeddings, experts); none on norms and biases."""
    decay, no_decay = [], []
    for parameter in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw(groups: list[dict[str, Any]], learning_rate: float, betas: tuple[float, float], eps: float,
          device: str) -> torch.optim.AdamW:
    """AdamW with each group's peak learning rate kept as `peak_lr`; the fused kernel where the device has one."""
    for group in groups:
        group.setdefault("peak_lr", learning_rate)
    fused = device in _get_fused_kernels_supported_devices()
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused or None)


def build_optimizer(
    model: torch.nn.Module,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over decay groups."""
    device = next(model.parameters()).device.type
    return adamw(decay_parameter_groups(model, weight_decay), learning_rate, betas, eps, device)


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory(device: torch.device) -> bool:
    """Training on a CPU under glibc: serve large tensors from the heap and keep freed memory for reuse.
    Otherwise glibc maps every block over 32 MB (the logits and their gradient) fresh from the kernel and
    unmaps it when freed, so each step page-faults through it again: ~10 % of a tiny-preset step here.
    Returns whether the setting was applied."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def muon_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The hidden weight matrices Muon takes: every trainable parameter of 2 or more dimensions except the
    input embedding and the LM head. Muon orthogonalises 2-D updates only, so anything else is an error."""
    embeddings = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        embeddings.add(id(head.weight))
    matrices = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or parameter.dim() < 2 or id(parameter) in embeddings:
            continue
        if parameter.dim() != 2:
            raise TrainingError(
                f"--optimizer muon: parameter {name} has shape {tuple(parameter.shape)}; torch.optim.Muon "
                "updates 2-D matrices only (MoE expert banks are 3-D), so use --optimizer adamw for this model"
            )
        matrices.append(parameter)
    return matrices


_torch_newton_schulz = torch.optim._muon._zeropower_via_newtonschulz


def _newton_schulz_fp32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                        eps: float) -> torch.Tensor:
    """torch's Muon orthogonalisation, computed in fp32 instead of torch's bf16."""
    a, b, c = ns_coefficients
    ortho = grad.float()
    if grad.size(0) > grad.size(1):
        ortho = ortho.T
    ortho = ortho / ortho.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = ortho @ ortho.T
        ortho = torch.addmm(ortho, torch.addmm(gram, gram, gram, beta=b, alpha=c), ortho, beta=a)
    if grad.size(0) > grad.size(1):
        ortho = ortho.T
    return ortho.to(grad.dtype)


def _newton_schulz(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                   eps: float) -> torch.Tensor:
    """torch's bf16 iteration on a GPU and on a CPU with bf16 units (0.05 s per step of the tiny preset, against
    0.15 s in fp32); fp32 on other CPUs, whose bf16 matmuls are ~100x slower (14 s instead of 0.2 s)."""
    if grad.device.type != "cpu" or cpu_bf16_is_fast():
        return _torch_newton_schulz(grad, ns_coefficients, ns_steps, eps)
    return _newton_schulz_fp32(grad, ns_coefficients, ns_steps, eps)


torch.optim._muon._zeropower_via_newtonschulz = _newton_schulz


def build_optimizers(
    model: torch.nn.Module,
    name: str,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    muon_learning_rate: float = 0.02,
    muon_momentum: float = 0.95,
) -> list[torch.optim.Optimizer]:
    """`adamw`: one AdamW. `muon`: torch.optim.Muon on the hidden matrices at its own learning rate, and AdamW
    on the embeddings, the LM head, norms and biases (the split of nanochat and modded-nanogpt)."""
    if name not in OPTIMIZERS:
        raise TrainingError(f"--optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name == "adamw":
        return [build_optimizer(model, learning_rate, weight_decay, betas, eps)]
    matrices = muon_matrices(model)
    taken = {id(p) for p in matrices}
    rest = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad and id(p) not in taken]
    device = next(model.parameters()).device.type
    muon = torch.optim.Muon(matrices, lr=muon_learning_rate, weight_decay=weight_decay, momentum=muon_momentum)
    for group in muon.param_groups:
        group["peak_lr"] = muon_learning_rate
    return [muon, adamw([{"params": rest, "weight_decay": 0.0}], learning_rate, betas, eps, device)]


def learning_rates(optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, float]:
    """The current learning rate of each optimizer kind, for the log line (`lr` is AdamW's)."""
    rates = {}
    for optimizer in optimizers:
        inner = _inner(optimizer)
        key = "muon_lr" if isinstance(inner, torch.optim.Muon) else "lr"
        rates.setdefault(key, inner.param_groups[0]["lr"])
    return rates


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a pure function of the optimizer step, so a resumed run gets exactly the same values.

    Linear warmup from peak/warmup_steps to the peak, then: cosine or linear decay to `min_lr_ratio`·peak
    at `total_steps`; `wsd` holds the peak and decays linearly over the last `decay_fraction` of the run;
    `constant` holds the peak.
    """

    name: str
    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise TrainingError(f"--lr_scheduler must be one of {SCHEDULES}, got {self.name!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainingError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise TrainingError(f"--decay_fraction must be in (0, 1], got {self.decay_fraction}")

    @property
    def decay_start(self) -> int:
        """The first step below the peak, after warmup: where `wsd` starts decaying, the end for `constant`.

        Until then the learning rate does not depend on `total_steps`, so the step count may still change."""
        if self.name == "constant":
            return self.total_steps
        if self.name == "wsd":
            return self.total_steps - max(1, round(self.decay_fraction * (self.total_steps - self.warmup_steps)))
        return self.warmup_steps

    def factor(self, step: int) -> float:
        """The learning rate at `step` as a share of the peak; every parameter group scales its own peak by it."""
        return self(step) / self.peak_lr

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        floor = self.peak_lr * self.min_lr_ratio
        if self.name == "constant":
            return self.peak_lr
        if self.name == "wsd":
            if step < self.decay_start:
                return self.peak_lr
            progress = min(1.0, (step - self.decay_start + 1) / (self.total_steps - self.decay_start))
            return self.peak_lr + (floor - self.peak_lr) * progress
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps + 1) / span)
        if self.name == "linear":
            return self.peak_lr + (floor - self.peak_lr) * progress
        return floor + (self.peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


DURATION = re.compile(r"(\d+(?:\.\d+)?)([smh])")
DURATION_FORMS = "a number with s, m or h: 45s, 10m, 1.5h"


def parse_duration(text: str) -> float:
    """`45s`, `10m`, `1.5h` → seconds."""
    match = DURATION.fullmatch(text.strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise TrainingError(f"--time_budget {text!r} is not a duration; use {DURATION_FORMS}")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


@dataclass(frozen=True)
class BudgetProbe:
    """Measured costs, in seconds, that decide how many steps fit in a time budget."""

    step: float  # one optimizer step, after warm-up (and compilation)
    evaluation: float  # one validation pass
    save: float  # one complete checkpoint


def steps_in_budget(budget: float, elapsed: float, probe: BudgetProbe, eval_steps: int, save_steps: int,
                    safety: float = 0.05) -> int:
    """Optimizer steps such that training, periodic evaluations (each may also write best/), periodic
    checkpoints, and the final evaluation and save all end by `budget` seconds after the process started.
    `safety` keeps a share of what is left for the speed's drift."""
    left = (budget - elapsed) * (1.0 - safety) - probe.evaluation - 2 * probe.save
    per_step = probe.step
    if eval_steps:
        per_step += (probe.evaluation + probe.save) / eval_steps
    if save_steps:
        per_step += probe.save / save_steps
    return max(0, math.floor(left / per_step))


def steps_in_epochs(epochs: float, train_tokens: int, tokens_per_step: int) -> int:
    """Whole steps in `epochs` passes over `train_tokens` (at least one): the ceiling of --max_epochs."""
    return max(1, math.floor(epochs * train_tokens / tokens_per_step))


def parse_seq_len_schedule(text: str | None, final_length: int) -> list[tuple[int, float]]:
    """`"256:0.2,512:0.5,1024:1.0"` → [(256, 0.2), (512, 0.5), (1024, 1.0)]: length up to a fraction of the run.

    Every length must divide the final one: the batch keeps its token count, so a stage at length L uses
    final_length / L times as many rows (same memory for activations, same tokens per step).
    """
    if not text:
        return [(final_length, 1.0)]
    stages = []
    for item in text.split(","):
        try:
            length_text, fraction_text = item.split(":")
            stages.append((int(length_text), float(fraction_text)))
        except ValueError:
            raise TrainingError(
                f"--seq_len_schedule item {item!r} is not LENGTH:FRACTION (e.g. \"256:0.2,512:0.5,1024:1.0\")"
            ) from None
    fractions = [f for _, f in stages]
    if fractions != sorted(fractions) or len(set(fractions)) != len(fractions) or not 0 < fractions[0]:
        raise TrainingError(f"--seq_len_schedule fractions must increase within (0, 1], got {fractions}")
    if fractions[-1] != 1.0:
        raise TrainingError(f"--seq_len_schedule must end at fraction 1.0 (the whole run), got {fractions[-1]}")
    if stages[-1][0] != final_length:
        raise TrainingError(
            f"--seq_len_schedule must end at --sequence_length {final_length}, got {stages[-1][0]}"
        )
    for length, _ in stages:
        if length <= 0 or final_length % length:
            raise TrainingError(
                f"--seq_len_schedule length {length} must divide --sequence_length {final_length} "
                "(shorter stages use proportionally more rows per batch)"
            )
    return stages


def seq_len_at(stages: list[tuple[int, float]], step: int, total_steps: int) -> int:
    for length, fraction in stages:
        if step < fraction * total_steps:
            return length
    return stages[-1][0]


# ---------------------------------------------------------------- data


class WindowSampler:
    """Windows of `length + 1` tokens from a flat token array, as a pure function of a window cursor.

    `strided`: the non-overlapping windows of each epoch in a shuffled order (seeded by seed and epoch), so
    an epoch reads every token once. `random`: uniformly random starts (nanoGPT style). Either way the
    windows at cursor c depend only on (seed, c, length), so a resumed run sees exactly the same batches.
    """

    BLOCK = 4096

    def __init__(self, tokens: np.ndarray, seed: int, mode: str = "strided"):
        if mode not in SAMPLING:
            raise TrainingError(f"--sampling must be one of {SAMPLING}, got {mode!r}")
        self.tokens = tokens
        self.seed = seed
        self.mode = mode
        self._cache: dict[tuple, np.ndarray] = {}

    def windows_per_epoch(self, length: int) -> int:
        return max(0, (len(self.tokens) - 1) // length)

    def _starts_block(self, key: tuple, make: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[key] = make()
        return self._cache[key]

    def starts(self, cursor: int, count: int, length: int) -> np.ndarray:
        n = self.windows_per_epoch(length)
        if n == 0:
            raise TrainingError(
                f"the token file holds {len(self.tokens)} tokens, fewer than one window of {length + 1}"
            )
        index = np.arange(cursor, cursor + count, dtype=np.int64)
        if self.mode == "strided":
            epochs, positions = np.divmod(index, n)
            out = np.empty(count, dtype=np.int64)
            for epoch in np.unique(epochs):
                order = self._starts_block(
                    ("perm", int(epoch), length),
                    lambda epoch=epoch: np.random.default_rng([self.seed, int(epoch), length]).permutation(n),
                )
                selected = epochs == epoch
                out[selected] = order[positions[selected]] * length
            return out
        blocks, offsets = np.divmod(index, self.BLOCK)
        out = np.empty(count, dtype=np.int64)
        high = len(self.tokens) - length
        for block in np.unique(blocks):
            values = self._starts_block(
                ("rand", int(block), length),
                lambda block=block: np.random.default_rng([self.seed, int(block), length]).integers(
                    0, high, self.BLOCK),
            )
            selected = blocks == block
            out[selected] = values[offsets[selected]]
        return out

    def gather(self, starts: np.ndarray, length: int) -> torch.Tensor:
        """(len(starts), length + 1) int64 token windows at the given start offsets."""
        return torch.from_numpy(self.tokens[starts[:, None] + np.arange(length + 1)].astype(np.int64))

    def windows(self, cursor: int, count: int, length: int) -> torch.Tensor:
        """`count` windows starting at window number `cursor`."""
        return self.gather(self.starts(cursor, count, length), length)


def evaluation_windows(tokens: np.ndarray, length: int, count: int) -> torch.Tensor:
    """`count` windows spread evenly over the whole validation file (the same ones at every evaluation)."""
    if len(tokens) < length + 1:
        raise TrainingError(
            f"the validation file holds {len(tokens)} tokens, fewer than one window of {length + 1}; "
            "prepare more validation data or pass --eval_steps 0"
        )
    available = (len(tokens) - 1) // length
    count = min(count, available)
    starts = np.linspace(0, (available - 1) * length, count).astype(np.int64)
    return torch.from_numpy(tokens[starts[:, None] + np.arange(length + 1)].astype(np.int64))


def rank_micro_batches(starts: np.ndarray, accumulation: int, num_processes: int, rank: int) -> list[np.ndarray]:
    """This process's micro-batches of a step's window starts: micro-step j covers a contiguous block split
    across processes, so N processes × B rows see exactly what 1 process × N·B rows would."""
    rows = len(starts) // (accumulation * num_processes)
    return [starts[(micro * num_processes + rank) * rows:][:rows] for micro in range(accumulation)]


# ---------------------------------------------------------------- one optimizer step


def causal_lm_loss(model: torch.nn.Module, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """Next-token cross-entropy of a (batch, length + 1) window, the MoE router auxiliary loss (or None),
    and the router logits (or None)."""
    outputs = model(input_ids=window[:, :-1], use_cache=False)
    logits = outputs.logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), window[:, 1:].reshape(-1))
    return loss, getattr(outputs, "aux_loss", None), getattr(outputs, "router_logits", None)


def expert_load(router_logits: tuple[torch.Tensor, ...], top_k: int) -> list[float]:
    """Share of top-k routing assignments each expert received, averaged over layers (uniform = 1/E each)."""
    counts = None
    for layer in router_logits:
        chosen = layer.detach().float().topk(top_k, dim=-1).indices.reshape(-1)
        layer_counts = torch.bincount(chosen, minlength=layer.size(-1)).float()
        counts = layer_counts if counts is None else counts + layer_counts
    return (counts / counts.sum()).tolist()


@dataclass
class StepResult:
    loss: float  # language-model loss (mean over micro-batches and processes)
    grad_norm: float
    applied: bool  # False: non-finite loss or gradients, the update was skipped
    aux_loss: float | None = None
    expert_load: list[float] | None = None
    stop_requested: bool = False


def optimizer_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    micro_batches: list[torch.Tensor],
    lr_factor: float,
    max_grad_norm: float,
    aux_loss_coef: float = 0.0,
    top_k: int = 0,
    want_expert_load: bool = False,
    stop_requested: Callable[[], bool] | None = None,
) -> StepResult:
    """Forward/backward over the micro-batches (gradients synchronised on the last only), clip, update.

    Every parameter group's learning rate is its `peak_lr` × `lr_factor`. A non-finite loss or gradient
    norm skips the update. The step costs one host sync, which also carries the stop-signal flag (read after
    the backward passes) so that every process stops after the same step.
    """
    accelerator.gradient_accumulation_steps = len(micro_batches)
    accelerator.step = 0
    # Set before the backward passes: DeepSpeed's engine updates inside the last one.
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_factor
    lm_total = torch.zeros((), device=accelerator.device)
    aux_total = torch.zeros((), device=accelerator.device)
    router_logits, has_aux = None, False
    for index, batch in enumerate(micro_batches):
        with accelerator.accumulate(model):
            loss, aux, router = causal_lm_loss(model, batch.to(accelerator.device, non_blocking=True))
            total = loss if aux is None else loss + aux_loss_coef * aux
            accelerator.backward(total)
        lm_total += loss.detach()
        if aux is not None:
            aux_total += aux.detach()
            has_aux = True
        if want_expert_load and router is not None and index == len(micro_batches) - 1:
            router_logits = router
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
    if not torch.is_tensor(grad_norm):  # DeepSpeed may report a float or nothing
        grad_norm = torch.tensor(float(grad_norm or 0.0))
    stop = float(stop_requested()) if stop_requested else 0.0
    summary = torch.stack([lm_total, aux_total, torch.tensor(stop, device=accelerator.device)])
    if accelerator.num_processes > 1:
        summary = accelerator.reduce(summary, reduction="sum")
    # The gradient norm is already global (gradients are synchronised); one host sync for everything.
    lm_sum, aux_sum, stops, norm = torch.cat([summary, grad_norm.reshape(1).to(summary)]).tolist()
    scale = len(micro_batches) * accelerator.num_processes
    loss_finite = math.isfinite(lm_sum) and math.isfinite(aux_sum)
    # With fp16 loss scaling, inf gradients are routine: the scaler skips that update and lowers its scale.
    scaler_handles_it = accelerator.scaler is not None and loss_finite
    applied = loss_finite and (math.isfinite(norm) or scaler_handles_it)
    if applied:
        for optimizer in optimizers:
            optimizer.step()
        if accelerator.scaler is not None:
            applied = not optimizers[0].step_was_skipped
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return StepResult(
        loss=lm_sum / scale,
        grad_norm=norm,
        applied=applied,
        aux_loss=aux_sum / scale if has_aux else None,
        expert_load=expert_load(router_logits, top_k) if router_logits is not None else None,
        stop_requested=stops > 0,
    )


def drop_gradients(model: torch.nn.Module) -> None:
    """Frees gradients whatever the accumulation state (after an out-of-memory micro-step)."""
    for parameter in model.parameters():
        parameter.grad = None


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over `windows`, split across processes."""
    model.eval()
    mine = windows[accelerator.process_index:: accelerator.num_processes]
    totals = torch.zeros(2, device=accelerator.device)
    for begin in range(0, len(mine), batch_size):
        batch = mine[begin: begin + batch_size].to(accelerator.device)
        loss, _, _ = causal_lm_loss(model, batch)
        totals += torch.stack([loss * len(batch), torch.tensor(float(len(batch)), device=accelerator.device)])
    model.train()
    totals = accelerator.reduce(totals, reduction="sum") if accelerator.num_processes > 1 else totals
    loss_sum, count = totals.tolist()
    return loss_sum / max(count, 1.0)


# ---------------------------------------------------------------- compute accounting


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters one token multiplies through: every weight matrix except the embedding lookup, plus the LM
    head even when tied; MoE expert banks (3-D) count only their routed share."""
    config = model.config
    embedding = model.get_input_embeddings().weight
    total = 0
    for parameter in model.parameters():
        if parameter is embedding or parameter.dim() < 2:
            continue
        share = 1.0
        if parameter.dim() == 3 and getattr(config, "num_local_experts", 0):
            share = config.num_experts_per_tok / config.num_local_experts
        total += int(parameter.numel() * share)
    head = model.get_output_embeddings()
    if head is not None and head.weight is embedding:
        total += embedding.numel()
    return total


def flops_per_token(model: torch.nn.Module, length: int) -> float:
    """Training FLOPs per token of a transformers model at sequence `length` (the formula MFU uses)."""
    config = model.config
    return training_flops_per_token(matmul_parameters(model), config.num_hidden_layers, config.hidden_size, length)


# ---------------------------------------------------------------- faults


class BadStepGuard:
    """Counts skipped (non-finite) updates; `failed` once `max_bad_steps` come in a row."""

    def __init__(self, max_bad_steps: int, total: int = 0):
        self.max_bad_steps = max_bad_steps
        self.in_a_row = 0
        self.total = total

    def record(self, applied: bool) -> None:
        if applied:
            self.in_a_row = 0
        else:
            self.in_a_row += 1
            self.total += 1

    @property
    def failed(self) -> bool:
        return self.max_bad_steps > 0 and self.in_a_row >= self.max_bad_steps


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step (a second SIGINT stops at once)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or 0)


# ---------------------------------------------------------------- training state


@dataclass
class TrainState:
    """Counters that, with the optimizer and RNG states, define where a run is."""

    step: int = 0
    tokens: int = 0
    cursor: int = 0  # windows consumed from the sampler
    micro_batch_size: int = 0
    gradient_accumulation_steps: int = 0
    best_val_loss: float | None = None
    evals_without_improvement: int = 0
    bad_steps: int = 0


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generators, as tensors and plain types only."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state((
        "MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
        numpy_state["has_gauss"], numpy_state["gauss"],
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _state_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    if accelerator.distributed_type == DistributedType.FSDP:
        return model
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def optimizer_state(
    accelerator: Accelerator, model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]
) -> dict | None:
    """The full state of every optimizer, keyed by parameter name (gathered under FSDP; a collective call there).

    DeepSpeed keeps its optimizer inside its engine, in its own pickled format, which is never read here.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return None
    sharded = accelerator.distributed_type == DistributedType.FSDP
    options = StateDictOptions(full_state_dict=True, cpu_offload=sharded)
    return get_optimizer_state_dict(_state_model(accelerator, model), [_inner(o) for o in optimizers],
                                    options=options)


def load_optimizer_state(
    accelerator: Accelerator, model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer], state: dict
) -> None:
    """Restores moments and step counts; hyper-parameters (peak learning rates, weight decay, betas) stay as
    this run set them, so a setting changed on resume takes effect instead of being overwritten by the saved one."""
    inner = [_inner(o) for o in optimizers]
    settings = [[{k: v for k, v in group.items() if k != "params"} for group in o.param_groups] for o in inner]
    set_optimizer_state_dict(_state_model(accelerator, model), inner, state,
                             options=StateDictOptions(full_state_dict=True))
    for optimizer, saved in zip(inner, settings):
        for group, values in zip(optimizer.param_groups, saved):
            group.update(values)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


def write_training_state(
    directory: Path, state: TrainState, optimizer: dict | None, rng_states: list[dict[str, Any]]
) -> None:
    """`training_state/`: counters (state.pt), optimizer (optimizer.pt), one RNG file per process."""
    target = directory / STATE_DIR
    target.mkdir(parents=True, exist_ok=True)
    torch.save(asdict(state), target / STATE_FILE)
    if optimizer is not None:
        torch.save(optimizer, target / OPTIMIZER_FILE)
    for rank, rng in enumerate(rng_states):
        torch.save(rng, target / RNG_FILE.format(rank=rank))


def read_training_state(directory: Path, rank: int) -> tuple[TrainState, dict | None, dict[str, Any] | None]:
    """Counters, optimizer state (None when not saved) and this process's RNG state (None when the saving
    run had fewer processes)."""
    source = directory / STATE_DIR
    if not (source / STATE_FILE).is_file():
        raise TrainingError(
            f"{directory} cannot be resumed: {STATE_DIR}/{STATE_FILE} is missing (a model-only checkpoint; "
            "start a new run from it instead)"
        )
    state = TrainState(**torch.load(source / STATE_FILE, weights_only=True))
    optimizer_file = source / OPTIMIZER_FILE
    optimizer = torch.load(optimizer_file, weights_only=True) if optimizer_file.is_file() else None
    rng_file = source / RNG_FILE.format(rank=rank)
    rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    return state, optimizer, rng


# What a training stage writes into its output dir; --overwrite_output_dir removes these and nothing else.
OWNED_NAMES = (FINAL, BEST, LATEST, TRACKER_DIR, "metrics.jsonl", "summary.json", "wandb", "mlruns")
OWNED_PREFIXES = (STEP_PREFIX, ".tmp-", ".old-")


def _is_owned(name: str) -> bool:
    return name.startswith(OWNED_PREFIXES) or name in OWNED_NAMES


def check_output_dir(output_dir: Path, resuming: bool, overwrite: bool) -> bool:
    """Refuses to mix a new run into an old one; returns whether the old run's files must be cleared first.

    A non-empty dir needs --overwrite_output_dir or a resume, unless it holds only this stage's debris and
    no checkpoint (a run killed before its first save): that one is simply started over.
    """
    existing = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if not existing or resuming:
        return False
    has_checkpoint = any(name in (FINAL, BEST, LATEST) or name.startswith(STEP_PREFIX) for name in existing)
    if overwrite or (all(_is_owned(name) for name in existing) and not has_checkpoint):
        return True
    shown = ", ".join(existing[:6]) + (" …" if len(existing) > 6 else "")
    raise FileExistsError(
        f"output dir {output_dir} is not empty ({shown}); pass --resume_from_checkpoint latest to continue "
        "that run, --overwrite_output_dir to start over, or another --output_dir"
    )


def clear_output_dir(output_dir: Path) -> list[str]:
    """Removes what an earlier run of a training stage wrote (checkpoints, pointer, logs); returns the names."""
    removed = []
    for path in sorted(output_dir.iterdir()):
        if _is_owned(path.name):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path.name)
    return removed


def save_checkpoint(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    tokenizer: Any,
    directory: Path,
    state: TrainState,
    run_info: dict[str, Any],
) -> None:
    """Writes a complete checkpoint (HF model dir + tokenizer + training_state/ + run.json + README.md) atomically.

    A base model ships no chat template: it was never trained on one, and tools that find one would prompt
    it as a chat model.

    Every process must call it: gathering sharded weights, optimizer state and RNG states is collective.
    """
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    model_state = accelerator.get_state_dict(model) if sharded else None
    optimizer_full = optimizer_state(accelerator, model, optimizers)
    rng_states = [capture_rng_state()]
    if accelerator.num_processes > 1:
        rng_states = gather_object(rng_states)
    if accelerator.is_main_process:
        with atomic_directory(directory) as tmp:
            unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
            unwrapped.save_pretrained(tmp, state_dict=model_state)
            save_tokenizer(tokenizer, tmp, chat_template=None)
            write_training_state(tmp, state, optimizer_full, rng_states)
            atomic_write_json(tmp / "run.json", run_info)
            write_model_card(tmp, directory.resolve(), unwrapped, run_info, template=None)
    accelerator.wait_for_everyone()


def prune_checkpoints(output_dir: Path, keep: int, protected: set[Path]) -> list[Path]:
    """Deletes the oldest `step_<N>/` beyond `keep` (0 = keep all), never a protected one; returns them."""
    if keep <= 0:
        return []
    steps = sorted(checkpoint_steps(output_dir))
    removable = [path for _, path in steps if path.resolve() not in {p.resolve() for p in protected}]
    excess = len(steps) - keep
    removed = removable[:max(0, excess)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
