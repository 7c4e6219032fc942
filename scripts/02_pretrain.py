#!/usr/bin/env python
"""Stage 02: pretrain a Llama-style (or Mixtral-style MoE) model from scratch on a processed data dir.

One accelerate loop for CPU, one GPU, several GPUs (DDP) and FSDP/DeepSpeed (`accelerate launch
--config_file config/accelerate/<setup>.yaml scripts/02_pretrain.py ...`). Windows of sequence_length + 1
tokens come from the memmapped train.bin in an order fixed by --seed; checkpoints (step_<N>/, best/, final/,
and the `latest` pointer) hold the optimizer, RNG and data position, so `--resume_from_checkpoint latest`
continues exactly where the run stopped.

Settings come, in order of precedence, from: flags given on the command line, the resumed checkpoint's
run.json, the preset's `training` block, the defaults shown in parentheses.

`--time_budget 10m` replaces a step count: the run times a few real steps (the model, optimizer and RNG are
restored afterwards, so they change nothing), one evaluation and one checkpoint save, then fixes max_steps
so that everything ends within the budget counted from the process start, and lays the LR schedule out over
those steps. The decision is kept in run.json, so a resume continues the same schedule.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DistributedType, broadcast_object_list  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from utils.checkpoint import (  # noqa: E402
    LATEST,
    CheckpointError,
    atomic_write_text,
    git_commit,
    recover_interrupted_writes,
    resolve_checkpoint,
    sha256_file,
    update_latest,
    verify_checkpoint,
)
from utils.cli import StageSummary, progress, quiet_libraries, run_main  # noqa: E402
from utils.config import OPTIMIZERS, SCHEDULES, ModelPreset, load_preset  # noqa: E402
from utils.files import read_json  # noqa: E402
from utils.gpu import check_fp8_training, convert_to_fp8_training  # noqa: E402
from utils.metrics import MetricsLogger, has_torn_tail, memory_mb, mfu, read_metrics  # noqa: E402
from utils.model import (  # noqa: E402
    ATTN_CHOICES,
    PRECISION_CHOICES,
    build_model,
    count_parameters,
    resolve_attention,
    resolve_precision,
)
from utils.templates import stop_token_ids  # noqa: E402
from utils.tokenizer import load_tokenizer  # noqa: E402
from utils.tokens import META, TOKENIZER_DIR, open_tokens, read_meta  # noqa: E402
from utils.training import (  # noqa: E402
    DURATION_FORMS,
    SAMPLING,
    BadStepGuard,
    BudgetProbe,
    LRSchedule,
    StepResult,
    StopSignals,
    TrainingError,
    TrainState,
    WindowSampler,
    build_optimizers,
    capture_rng_state,
    check_output_dir,
    clear_output_dir,
    drop_gradients,
    evaluate,
    evaluation_windows,
    learning_rates,
    load_optimizer_state,
    flops_per_token,
    optimizer_step,
    parse_duration,
    parse_seq_len_schedule,
    prune_checkpoints,
    rank_micro_batches,
    read_training_state,
    restore_rng_state,
    save_checkpoint,
    seq_len_at,
    steps_in_budget,
)

# Built-in defaults for settings the preset's training block does not hold.
DEFAULTS: dict[str, Any] = {
    "muon_momentum": 0.95, "min_lr_ratio": 0.1, "decay_fraction": 0.2, "adam_beta1": 0.9, "adam_beta2": 0.95,
    "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "seed": 42, "sampling": "strided", "seq_len_schedule": None,
    "eval_steps": 500, "eval_batches": 20, "save_steps": 1000, "save_total_limit": 3, "logging_steps": 50,
    "early_stopping_patience": 0, "max_bad_steps": 5, "mixed_precision": "auto", "attn": "auto",
}
PRESET_SETTINGS = ("batch_size", "gradient_accumulation_steps", "sequence_length", "learning_rate", "warmup_steps",
                   "weight_decay", "optimizer", "muon_learning_rate", "lr_scheduler")
BUDGET = ("max_steps", "max_tokens", "num_epochs", "time_budget")
# Settings that change the numbers a run computes: a resume that changes one is not an exact continuation.
EXACT_SETTINGS = PRESET_SETTINGS + BUDGET + (
    "muon_momentum", "min_lr_ratio", "decay_fraction", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "seed", "sampling", "seq_len_schedule", "mixed_precision", "fp8",
)
EXIT_DIVERGED = 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("model, data and output")
    io.add_argument("--config", required=True, help="model preset JSON (config/tiny.json, small, base, tiny-moe)")
    io.add_argument("--data_path", required=True,
                    help="processed data dir from stage 01 (train.bin, val.bin, tokenizer/)")
    io.add_argument("--output_dir", default=None, help="default: checkpoints/pretrain/<preset model_name>")
    io.add_argument("--overwrite_output_dir", action="store_true",
                    help="start over in a non-empty output dir (its checkpoints and logs are deleted)")
    io.add_argument("--resume_from_checkpoint", default=None,
                    help="'latest' (the output dir's latest complete checkpoint) or a checkpoint dir")
    io.add_argument("--settings", default=None,
                    help="JSON object of settings by flag name without '--' (e.g. the best.json of a sweep); "
                         "flags given on the command line win over it, and it wins over the preset")
    budget = parser.add_argument_group("budget (one of; default: the preset's max_steps)")
    exclusive = budget.add_mutually_exclusive_group()
    exclusive.add_argument("--max_steps", type=int, default=None, help="optimizer steps")
    exclusive.add_argument("--max_tokens", type=int, default=None, help="training tokens (rounded up to whole steps)")
    exclusive.add_argument("--num_epochs", type=float, default=None, help="passes over train.bin")
    # Not in the exclusive group: its error must name the accepted forms.
    budget.add_argument("--time_budget", default=None,
                        help=f"wall-clock budget of the whole run ({DURATION_FORMS}); fixes max_steps from timed steps")
    batch = parser.add_argument_group("batch and data order")
    batch.add_argument("--batch_size", type=int, default=None, help="sequences per device per micro-step (preset)")
    batch.add_argument("--gradient_accumulation_steps", type=int, default=None, help="micro-steps per update (preset)")
    batch.add_argument("--sequence_length", type=int, default=None, help="tokens per sequence (preset)")
    batch.add_argument("--seq_len_schedule", default=None,
                       help='curriculum "256:0.2,512:0.5,1024:1.0": length up to a fraction of the run; every length '
                            "divides --sequence_length and shorter stages use proportionally more rows")
    batch.add_argument("--sampling", choices=SAMPLING, default=None,
                       help="strided: shuffled non-overlapping windows, every token once per epoch (default); "
                            "random: random window starts")
    batch.add_argument("--auto_batch_size", action="store_true",
                       help="on GPU out-of-memory halve the micro-batch and double accumulation, then carry on")
    opt = parser.add_argument_group("optimizer and schedule")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                     help="adamw, or muon: torch.optim.Muon on the hidden matrices, AdamW on embeddings, head and "
                          "norms (preset)")
    opt.add_argument("--learning_rate", type=float, default=None, help="peak learning rate of AdamW (preset)")
    opt.add_argument("--muon_learning_rate", type=float, default=None,
                     help="peak learning rate of Muon's matrices (preset)")
    opt.add_argument("--muon_momentum", type=float, default=None, help="Muon's Nesterov momentum (0.95)")
    opt.add_argument("--lr_scheduler", choices=SCHEDULES, default=None,
                     help="cosine, linear, wsd (warmup-stable-decay: the decay ends on time) or constant (preset)")
    opt.add_argument("--warmup_steps", type=int, default=None, help="linear warmup steps (preset)")
    opt.add_argument("--min_lr_ratio", type=float, default=None, help="final LR as a share of the peak (0.1)")
    opt.add_argument("--decay_fraction", type=float, default=None, help="wsd: share of the run spent decaying (0.2)")
    opt.add_argument("--weight_decay", type=float, default=None, help="AdamW weight decay on matrices (preset)")
    opt.add_argument("--adam_beta1", type=float, default=None, help="AdamW beta1 (0.9)")
    opt.add_argument("--adam_beta2", type=float, default=None, help="AdamW beta2 (0.95)")
    opt.add_argument("--adam_epsilon", type=float, default=None, help="AdamW epsilon (1e-8)")
    opt.add_argument("--max_grad_norm", type=float, default=None, help="gradient clipping norm, 0 = off (1.0)")
    speed = parser.add_argument_group("precision and speed")
    speed.add_argument("--mixed_precision", choices=PRECISION_CHOICES, default=None,
                       help="auto (default) = bf16 on a GPU that supports it, fp32 on CPU")
    speed.add_argument("--attn", choices=ATTN_CHOICES, default=None,
                       help="attention kernel; auto (default) = flash_attention_2 when installed and usable, else sdpa")
    speed.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model")
    speed.add_argument("--fp8", action="store_true",
                       help="float8 matmuls in the linear layers (torchao; a GPU of compute capability 8.9+: "
                            "Ada, Hopper); pair it with --compile, without which the casts cost more than they save")
    monitor = parser.add_argument_group("evaluation, checkpoints and logging")
    monitor.add_argument("--eval_steps", type=int, default=None,
                         help="validate every N steps, 0 = only at the end (500)")
    monitor.add_argument("--eval_batches", type=int, default=None,
                         help="validation batches (of --batch_size per process) per evaluation (20)")
    monitor.add_argument("--early_stopping_patience", type=int, default=None,
                         help="stop after N evaluations without a better validation loss, 0 = off (0)")
    monitor.add_argument("--save_steps", type=int, default=None, help="write step_<N>/ every N steps, 0 = off (1000)")
    monitor.add_argument("--save_total_limit", type=int, default=None, help="step_<N>/ dirs to keep, 0 = all (3)")
    monitor.add_argument("--logging_steps", type=int, default=None,
                         help="log line and metrics.jsonl row every N steps (50)")
    monitor.add_argument("--report_to", choices=("none", "tensorboard", "wandb"), default="none",
                         help="also log through accelerate's tracker (wandb runs offline without an API key)")
    monitor.add_argument("--max_bad_steps", type=int, default=None,
                         help="stop after N non-finite steps in a row (each one skips its update), 0 = never (5)")
    monitor.add_argument("--seed", type=int, default=None, help="model init and data order (42)")
    monitor.add_argument("--dry_run", action="store_true",
                         help="build model and data, print sizes and estimates from a few timed steps, write nothing")
    args = parser.parse_args()
    if args.settings:
        apply_settings_file(parser, args)
    return args


def apply_settings_file(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fills the flags not given from --settings; each value is checked as its flag would check it."""
    values = read_json(args.settings, "--settings")
    if not isinstance(values, dict):
        raise TrainingError(f"--settings {args.settings}: expected a JSON object of flag names and values")
    allowed = (*PRESET_SETTINGS, *DEFAULTS)
    actions = {action.dest: action for action in parser._actions}
    for name, value in values.items():
        if name not in allowed:
            raise TrainingError(f"--settings {args.settings}: {name!r} is not a setting it can hold; "
                                f"allowed: {', '.join(sorted(allowed))}")
        if getattr(args, name) is not None:
            continue
        action = actions[name]
        try:
            value = action.type(value) if action.type and value is not None else value
        except (TypeError, ValueError):
            raise TrainingError(f"--settings {args.settings}: {name} {value!r} is not a valid "
                                f"{action.type.__name__}") from None
        if action.choices and value not in action.choices:
            raise TrainingError(f"--settings {args.settings}: {name} {value!r} is not one of "
                                f"{', '.join(map(str, action.choices))}")
        setattr(args, name, value)


# ---------------------------------------------------------------- settings


def find_resume_checkpoint(args: argparse.Namespace, output_dir: Path) -> Path | None:
    """The checkpoint to resume from, verified complete (every file present, every sha256 matching)."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == LATEST:
        if not (output_dir / LATEST).is_file():
            raise CheckpointError(
                f"nothing to resume in {output_dir}: it has no '{LATEST}' pointer (no complete checkpoint was "
                "written); start without --resume_from_checkpoint"
            )
        path = resolve_checkpoint(output_dir / LATEST)
    else:
        path = resolve_checkpoint(Path(args.resume_from_checkpoint))
    if not path.is_dir():
        raise CheckpointError(f"checkpoint to resume {path} does not exist")
    verify_checkpoint(path)
    if not (path / "run.json").is_file():
        raise CheckpointError(f"checkpoint {path} has no run.json: it was not written by this stage")
    return path


def resolve_settings(args: argparse.Namespace, preset: ModelPreset, resumed_args: dict[str, Any] | None) -> list[str]:
    """Fills every unset flag (flag > resumed run > preset > default); returns the settings a resume changed."""
    given = {name for name in (*PRESET_SETTINGS, *BUDGET, *DEFAULTS) if getattr(args, name) is not None}
    if "time_budget" in given and given & {"max_steps", "max_tokens", "num_epochs"}:
        other = next(n for n in BUDGET if n in given and n != "time_budget")
        raise TrainingError(f"--time_budget cannot be combined with --{other}: give one budget (--time_budget "
                            f"takes {DURATION_FORMS})")
    previous = resumed_args or {}
    for name in (*PRESET_SETTINGS, *DEFAULTS):
        if name in given:
            continue
        if name in previous:
            setattr(args, name, previous[name])
        elif name in PRESET_SETTINGS:
            setattr(args, name, getattr(preset.training, name))
        else:
            setattr(args, name, DEFAULTS[name])
    if not given & set(BUDGET):
        for name in BUDGET:
            setattr(args, name, previous.get(name))
        if all(getattr(args, name) is None for name in BUDGET):
            args.max_steps = preset.training.max_steps
    elif "time_budget" in given and previous.get("time_budget"):
        # The step count was fixed when the run started; the same budget continues that schedule exactly.
        if args.time_budget != previous["time_budget"]:
            raise TrainingError(
                f"--time_budget {args.time_budget}: the resumed run fixed its step count at the start "
                f"({previous['max_steps']} steps for --time_budget {previous['time_budget']}); resume with the "
                "same budget, or pass --max_steps to change the length"
            )
        args.max_steps = previous["max_steps"]
    check_settings(args, preset)
    saved_optimizer = previous.get("optimizer", "adamw") if resumed_args is not None else args.optimizer
    if saved_optimizer != args.optimizer:
        raise TrainingError(
            f"--optimizer {args.optimizer}: the checkpoint holds {saved_optimizer}'s state; resume with "
            f"--optimizer {saved_optimizer}, or start a new run from its weights"
        )
    return [
        f"{name} {previous[name]} → {getattr(args, name)}"
        for name in EXACT_SETTINGS if name in previous and previous[name] != getattr(args, name)
    ]


def check_settings(args: argparse.Namespace, preset: ModelPreset) -> None:
    if args.time_budget is not None:
        parse_duration(args.time_budget)
    positive = ["batch_size", "gradient_accumulation_steps", "sequence_length", "learning_rate", "eval_batches",
                "muon_learning_rate"]
    for name in positive + [n for n in BUDGET if getattr(args, n) is not None and n != "time_budget"]:
        if getattr(args, name) <= 0:
            raise TrainingError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("warmup_steps", "weight_decay", "max_grad_norm", "eval_steps", "save_steps", "save_total_limit",
                 "early_stopping_patience", "max_bad_steps"):
        if getattr(args, name) < 0:
            raise TrainingError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.muon_momentum < 1.0:
        raise TrainingError(f"--muon_momentum must be in [0, 1), got {args.muon_momentum}")
    if args.logging_steps <= 0:
        raise TrainingError(f"--logging_steps must be positive, got {args.logging_steps}")
    if args.sequence_length > preset.sequence_length:
        raise TrainingError(
            f"--sequence_length {args.sequence_length} exceeds the preset's sequence_length {preset.sequence_length} "
            f"({args.config}), the model's maximum position"
        )


@dataclass
class Plan:
    """What the run will do, derived once from the settings and the data."""

    tokens_per_step: int
    total_steps: int
    stages: list[tuple[int, float]]
    schedule: LRSchedule
    flops_per_token: dict[int, float]

    def seq_len(self, step: int) -> int:
        return seq_len_at(self.stages, step, self.total_steps)

    def rows(self, step: int, micro_batch_size: int, final_length: int) -> int:
        return micro_batch_size * final_length // self.seq_len(step)


def make_plan(args: argparse.Namespace, train_tokens: int, accelerator: Accelerator, model: torch.nn.Module) -> Plan:
    num_processes = accelerator.num_processes
    tokens_per_step = args.batch_size * args.gradient_accumulation_steps * num_processes * args.sequence_length
    if args.max_steps is None and args.time_budget is not None:
        # Until the budget is measured: a plan for timing steps only (warmup LR, final sequence length).
        return Plan(tokens_per_step, 1, [(args.sequence_length, 1.0)],
                    LRSchedule("constant", args.learning_rate, args.warmup_steps, 1),
                    {args.sequence_length: flops_per_token(model, args.sequence_length)})
    if args.max_steps is not None:
        total = args.max_steps
    elif args.max_tokens is not None:
        total = math.ceil(args.max_tokens / tokens_per_step)
    else:
        total = math.ceil(args.num_epochs * train_tokens / tokens_per_step)
    warmup = args.warmup_steps
    if warmup >= total:
        warmup = max(0, total // 10)
        accelerator.print(f"note: --warmup_steps {args.warmup_steps} >= {total} total steps; "
                          f"warming up for {warmup} steps")
    stages = parse_seq_len_schedule(args.seq_len_schedule, args.sequence_length)
    schedule = LRSchedule(args.lr_scheduler, args.learning_rate, warmup, total, args.min_lr_ratio, args.decay_fraction)
    return Plan(tokens_per_step, total, stages, schedule,
                {length: flops_per_token(model, length) for length, _ in stages})



# ---------------------------------------------------------------- data, model, checkpoints


@dataclass
class Data:
    path: Path
    meta: dict[str, Any]
    tokenizer: Any
    train: Any
    val: Any


def load_data(data_path: str) -> Data:
    path = Path(data_path)
    meta = read_meta(path)
    tokenizer = load_tokenizer(path / TOKENIZER_DIR)
    if meta.get("vocab_size") not in (None, len(tokenizer)):
        raise TrainingError(
            f"{path / META} says vocab_size {meta['vocab_size']} but {path / TOKENIZER_DIR} has {len(tokenizer)} "
            "tokens: the data dir is inconsistent; prepare it again"
        )
    return Data(path, meta, tokenizer, open_tokens(path, "train"), open_tokens(path, "val"))


def check_resume_compatible(checkpoint: Path, run: dict[str, Any], preset: ModelPreset, data: Data) -> None:
    """The resumed checkpoint must have the preset's architecture and the data's tokenizer."""
    saved_vocab = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    saved_sha = run.get("data", {}).get("tokenizer_sha256")
    data_sha = data.meta.get("tokenizer_sha256")
    if saved_vocab != len(data.tokenizer) or (saved_sha and data_sha and saved_sha != data_sha):
        raise CheckpointError(
            f"tokenizer mismatch: checkpoint {checkpoint} was trained with a {saved_vocab}-token vocabulary "
            f"(tokenizer sha256 {str(saved_sha)[:12]}), but {data.path / TOKENIZER_DIR} has {len(data.tokenizer)} "
            f"tokens (sha256 {str(data_sha)[:12]}); resume with the data dir the run started on "
            f"({run.get('data', {}).get('path')}), or start a new run in another --output_dir"
        )
    saved = {k: v for k, v in run.get("preset", {}).items() if k not in ("training", "vocab_size")}
    current = {k: v for k, v in dataclasses.asdict(preset).items() if k not in ("training", "vocab_size")}
    changed = sorted(k for k in current if k in saved and saved[k] != current[k])
    if changed:
        details = ", ".join(f"{k}: {saved[k]} → {current[k]}" for k in changed)
        raise CheckpointError(
            f"checkpoint {checkpoint} has a different architecture than {preset.model_name!r} ({details}); "
            "resume with the preset it was trained with"
        )


def truncate_metrics(run: Run, path: Path, step: int) -> None:
    """Drops rows logged after the resumed step by the interrupted run, so the log reads as one run."""
    if has_torn_tail(path):
        run.say(f"note: dropped the unfinished last line of {path} (the previous process died while writing it)")
    rows = [row for row in read_metrics(path) if row.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def set_generation_defaults(model: torch.nn.Module, tokenizer: Any) -> None:
    """Generation stops at </s> and at <|im_end|>, so chat checkpoints built on this model stop cleanly."""
    config = model.generation_config
    config.eos_token_id = stop_token_ids(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id


def make_accelerator(args: argparse.Namespace, output_dir: Path) -> Accelerator:
    log_with = None
    if args.report_to == "tensorboard":
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            raise TrainingError("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
        log_with = "tensorboard"
    elif args.report_to == "wandb":
        from accelerate.utils import is_wandb_available

        if not is_wandb_available():
            raise TrainingError("--report_to wandb needs the wandb package: pip install wandb")
        if not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(output_dir))
    # Several processes without a GPU (torchrun, `accelerate launch --multi_gpu` on a CPU machine): DDP over gloo.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=cpu_processes, mixed_precision=resolve_precision(args.mixed_precision), log_with=log_with,
        project_dir=str(output_dir), gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    if args.optimizer == "muon":
        check_muon_supported(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if args.auto_batch_size:
            raise TrainingError("--auto_batch_size is not supported under DeepSpeed (its engine fixes the "
                                "accumulation); set --batch_size and --gradient_accumulation_steps instead")
        deepspeed = accelerator.state.deepspeed_plugin.deepspeed_config
        deepspeed["train_micro_batch_size_per_gpu"] = args.batch_size
        deepspeed["gradient_accumulation_steps"] = args.gradient_accumulation_steps
        deepspeed["gradient_clipping"] = args.max_grad_norm
    return accelerator


def check_muon_supported(accelerator: Accelerator) -> None:
    """Muon runs on one process or DDP (every process holds whole matrices to orthogonalise)."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise TrainingError(
            f"--optimizer muon is not supported under {accelerator.distributed_type.value}: torch.optim.Muon needs "
            "whole (unsharded) matrices; use DDP (accelerate launch --multi_gpu) or --optimizer adamw"
        )
    if accelerator.mixed_precision == "fp16":
        raise TrainingError(
            "--optimizer muon with fp16: one loss scaler cannot drive Muon and AdamW together; use "
            "--mixed_precision bf16 (or no)"
        )


# ---------------------------------------------------------------- the run


class Run:
    """The live objects of one training run, and the ways it reports and saves what it has done."""

    def __init__(self, args, preset, data, plan, accelerator, model, optimizers, state, output_dir):
        self.args, self.preset, self.data, self.plan = args, preset, data, plan
        self.accelerator, self.model, self.optimizers = accelerator, model, optimizers
        self.state, self.output_dir = state, output_dir
        self.metrics = MetricsLogger(output_dir / "metrics.jsonl",
                                     enabled=accelerator.is_main_process and not args.dry_run)
        self.last: dict[str, Any] = {}
        self.bar = None
        self.budget_decision: dict[str, Any] | None = None

    def say(self, message: str, error: bool = False) -> None:
        if not self.accelerator.is_main_process:
            return
        if self.bar is not None and not error:
            self.bar.write(message)
        else:
            print(message, file=sys.stderr if error else sys.stdout, flush=True)

    def log(self, row: dict[str, Any]) -> None:
        self.metrics.log(row)
        if self.args.report_to != "none":
            numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(numeric, step=row["step"])

    def run_info(self, reason: str) -> dict[str, Any]:
        return {
            "stage": "pretrain",
            "reason": reason,
            "step": self.state.step,
            "tokens": self.state.tokens,
            "preset": dataclasses.asdict(self.preset),
            "args": vars(self.args),
            "command": sys.argv,
            "data": {
                "path": str(self.data.path),
                "meta_sha256": sha256_file(self.data.path / META),
                "tokenizer_sha256": self.data.meta.get("tokenizer_sha256"),
                "vocab_size": len(self.data.tokenizer),
            },
            "world_size": self.accelerator.num_processes,
            "time_budget": self.budget_decision,
            "git_commit": git_commit(),
            "metrics": self.last,
        }

    def save(self, name: str, reason: str, point_latest: bool = True) -> Path:
        """Writes `<output_dir>/<name>/`; then (main process) moves `latest` to it and prunes old step dirs."""
        directory = self.output_dir / name
        save_checkpoint(self.accelerator, self.model, self.optimizers, self.data.tokenizer, directory, self.state,
                        self.run_info(reason))
        if self.accelerator.is_main_process and point_latest:
            update_latest(self.output_dir, name)
            prune_checkpoints(self.output_dir, self.args.save_total_limit, {directory})
        self.accelerator.wait_for_everyone()
        return directory

    def resume_command(self) -> str:
        args = self.args
        return (f"python scripts/02_pretrain.py --config {args.config} --data_path {args.data_path} "
                f"--output_dir {args.output_dir} --resume_from_checkpoint latest")


@dataclass
class Throughput:
    """Tokens and training seconds (evaluation and saving excluded) since the last log line, and in all."""

    tokens: int = 0
    seconds: float = 0.0
    loss_sum: float = 0.0
    good_steps: int = 0
    total_tokens: int = 0
    total_seconds: float = 0.0

    def add(self, tokens: int, seconds: float, result: StepResult) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.total_seconds += seconds
        if result.applied:
            self.loss_sum += result.loss
            self.good_steps += 1
            self.total_tokens += tokens

    def reset_window(self) -> None:
        self.tokens, self.seconds, self.loss_sum, self.good_steps = 0, 0.0, 0.0, 0


def take_step(run: Run, sampler: WindowSampler, step: int, want_expert_load: bool,
              stop_requested: Callable[[], bool] | None = None) -> tuple[StepResult, int, int]:
    """One optimizer step on the windows at the state's cursor; halves the micro-batch on GPU OOM if allowed.

    Returns the result, the windows consumed and the tokens trained on (all processes)."""
    args, plan, state, accelerator = run.args, run.plan, run.state, run.accelerator
    length = plan.seq_len(step)
    while True:
        rows = plan.rows(step, state.micro_batch_size, args.sequence_length)
        count = rows * state.gradient_accumulation_steps * accelerator.num_processes
        starts = rank_micro_batches(sampler.starts(state.cursor, count, length), state.gradient_accumulation_steps,
                                    accelerator.num_processes, accelerator.process_index)
        batches = [sampler.gather(micro, length) for micro in starts]
        try:
            result = optimizer_step(
                accelerator, run.model, run.optimizers, batches, plan.schedule.factor(step), args.max_grad_norm,
                run.preset.router_aux_loss_coef, run.preset.experts_per_token, want_expert_load, stop_requested,
            )
            return result, count, count * length
        except torch.OutOfMemoryError:
            if not args.auto_batch_size or state.micro_batch_size == 1:
                raise TrainingError(
                    f"out of GPU memory at micro-batch {state.micro_batch_size} × {length} tokens; lower "
                    "--batch_size (raising --gradient_accumulation_steps), add --gradient_checkpointing, "
                    "or pass --auto_batch_size"
                ) from None
            drop_gradients(run.model)
            gc.collect()
            torch.cuda.empty_cache()
            state.micro_batch_size //= 2
            state.gradient_accumulation_steps *= 2
            run.say(f"step {step + 1}: out of memory; micro-batch now {state.micro_batch_size}, accumulation "
                    f"{state.gradient_accumulation_steps} (same tokens per step)")
            run.log({"event": "batch_size", "step": step, "micro_batch_size": state.micro_batch_size,
                     "gradient_accumulation_steps": state.gradient_accumulation_steps})


def report(run: Run, step: int, result: StepResult, speed: Throughput) -> None:
    """The log line, the metrics.jsonl row and the progress-bar numbers for the steps since the last report."""
    plan, state, accelerator = run.plan, run.state, run.accelerator
    length = plan.seq_len(step)
    tokens_per_second = speed.tokens / speed.seconds
    loss = speed.loss_sum / speed.good_steps
    row = {
        "event": "train", "step": state.step, "tokens": state.tokens,
        "epoch": round(state.tokens / len(run.data.train), 4), "seq_len": length,
        "loss": loss, "perplexity": math.exp(min(loss, 700)), **learning_rates(run.optimizers),
        "grad_norm": result.grad_norm, "tokens_per_second": tokens_per_second,
        "mfu": mfu(tokens_per_second / accelerator.num_processes, plan.flops_per_token[length], accelerator.device),
        "memory_mb": memory_mb(accelerator.device), "skipped_steps": state.bad_steps,
    }
    if result.aux_loss is not None:
        row["aux_loss"] = result.aux_loss
    if result.expert_load is not None:
        row["expert_load"] = [round(share, 4) for share in result.expert_load]
    run.log(row)
    run.last.update(loss=loss, tokens_per_second=tokens_per_second, mfu=row["mfu"])
    if run.bar is not None:
        run.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{row['lr']:.2e}", refresh=False)
    run.say(
        f"step {state.step}/{plan.total_steps} | loss {loss:.4f} | ppl {row['perplexity']:.1f} | lr {row['lr']:.2e} | "
        + (f"muon lr {row['muon_lr']:.2e} | " if "muon_lr" in row else "")
        + f"grad {result.grad_norm:.3f} | {tokens_per_second:,.0f} tok/s | "
        + (f"MFU {row['mfu']:.1%} | " if row["mfu"] is not None else "")
        + f"{row['memory_mb']:,.0f} MiB"
        + (f" | aux {result.aux_loss:.3f} | experts {row['expert_load']}" if "expert_load" in row else "")
    )


def validate(run: Run, val_windows: torch.Tensor) -> dict[str, Any]:
    """Validation loss now; writes best/ when it improves; counts evaluations without improvement."""
    state = run.state
    loss = evaluate(run.accelerator, run.model, val_windows, run.args.batch_size)
    improved = state.best_val_loss is None or loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.evals_without_improvement = loss, 0
    else:
        state.evals_without_improvement += 1
    row = {"event": "eval", "step": state.step, "tokens": state.tokens, "val_loss": loss,
           "val_perplexity": math.exp(min(loss, 700)), "best_val_loss": state.best_val_loss}
    run.log(row)
    run.last.update(val_loss=loss, best_val_loss=state.best_val_loss)
    if improved:
        run.save("best", "best validation loss", point_latest=False)
    return row


def train(run: Run, sampler: WindowSampler, val_windows: torch.Tensor, speed: Throughput) -> tuple[int, str, str]:
    """The loop, until the budget, early stopping, a stop signal or too many bad steps.

    Returns (exit code, why it ended, the message for an abnormal end)."""
    args, plan, state = run.args, run.plan, run.state
    guard = BadStepGuard(args.max_bad_steps, state.bad_steps)
    with StopSignals() as signals:
        while state.step < plan.total_steps:
            step = state.step
            log_now = (step + 1) % args.logging_steps == 0 or step + 1 == plan.total_steps
            started = time.perf_counter()
            result, windows_used, tokens = take_step(run, sampler, step, log_now, lambda: signals.requested)
            speed.add(tokens, time.perf_counter() - started, result)
            state.cursor += windows_used
            state.step += 1
            guard.record(result.applied)
            state.bad_steps = guard.total
            if result.applied:
                state.tokens += tokens
            run.bar.update(1)

            if not result.applied:
                run.log({"event": "skipped", "step": state.step, "loss": result.loss, "grad_norm": result.grad_norm,
                         "in_a_row": guard.in_a_row})
                run.say(f"step {state.step}: non-finite loss or gradients, update skipped "
                        f"({guard.in_a_row} in a row, {guard.total} in all)")
            if log_now and speed.good_steps:
                report(run, step, result, speed)
                speed.reset_window()
            if guard.failed:
                directory = run.save(f"step_{state.step}", "non-finite loss")
                return EXIT_DIVERGED, "non-finite loss", (
                    f"error: {guard.in_a_row} steps in a row had a non-finite loss or gradient (--max_bad_steps "
                    f"{args.max_bad_steps}); each update was skipped, so {directory} holds the last good weights. "
                    "Lower --learning_rate or --max_grad_norm (or use bf16 instead of fp16), then resume with: "
                    f"{run.resume_command()} --learning_rate <lower>")
            if result.stop_requested:
                directory = run.save(f"step_{state.step}", f"signal {signals.name or 'on another process'}")
                code = signals.exit_code if signals.requested else 128 + signal.SIGTERM
                return code, "signal", (f"stopped by {signals.name or 'a signal'} after step {state.step}; saved "
                                        f"{directory}. Resume with: {run.resume_command()}")
            if state.step >= plan.total_steps:
                break
            if args.eval_steps and state.step % args.eval_steps == 0:
                row = validate(run, val_windows)
                run.say(f"step {state.step}: val loss {row['val_loss']:.4f} (best {row['best_val_loss']:.4f})")
                if args.early_stopping_patience and state.evals_without_improvement >= args.early_stopping_patience:
                    return 0, "early stopping", ""
            if args.save_steps and state.step % args.save_steps == 0:
                run.save(f"step_{state.step}", "periodic")
    return 0, "budget", ""


def seconds_since_start() -> float:
    """Wall time since this process started: a time budget counts the imports and set-up too."""
    return time.time() - psutil.Process().create_time()


def probe_budget(run: Run, sampler: WindowSampler, val_windows: torch.Tensor) -> BudgetProbe:
    """Times real steps, one evaluation and one checkpoint save, then puts back the weights, optimizer and RNG
    as they were: the run that follows is the one `--max_steps <the decided count>` would run."""
    accelerator = run.accelerator
    model = accelerator.unwrap_model(run.model, keep_torch_compile=False)
    weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    optimizers = [copy.deepcopy(optimizer.state_dict()) for optimizer in run.optimizers]
    rng = capture_rng_state()
    # Steps run ~15 % slower for the first few (allocator, thread pools; with --compile, compilation first):
    # timing them would end a CPU run 20-30 % early.
    warmup_steps = 6 if run.args.compile else 5
    for step in range(warmup_steps):
        take_step(run, sampler, step, want_expert_load=False)
    timings: list[float] = []
    while len(timings) < 3 or (sum(timings) < 8.0 and len(timings) < 30):
        started = time.perf_counter()
        take_step(run, sampler, warmup_steps + len(timings), want_expert_load=False)
        timings.append(time.perf_counter() - started)
    started = time.perf_counter()
    evaluate(accelerator, run.model, val_windows, run.args.batch_size)
    evaluation = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="budget-probe-") as scratch:
        started = time.perf_counter()
        save_checkpoint(accelerator, run.model, run.optimizers, run.data.tokenizer, Path(scratch) / "probe",
                        run.state, run.run_info("time budget probe"))
        save = time.perf_counter() - started
    model.load_state_dict(weights)
    for optimizer, state in zip(run.optimizers, optimizers):
        optimizer.load_state_dict(state)
    restore_rng_state(rng)
    # Every process must take the same number of steps: the main process's measurement decides.
    measured = [sum(timings) / len(timings), evaluation, save]
    broadcast_object_list(measured)
    return BudgetProbe(*measured)


def fit_time_budget(run: Run, sampler: WindowSampler, val_windows: torch.Tensor) -> dict[str, Any]:
    """Fixes args.max_steps from the measured costs; returns the decision as run.json records it."""
    args = run.args
    budget = parse_duration(args.time_budget)
    probe = probe_budget(run, sampler, val_windows)
    elapsed = seconds_since_start()
    steps = steps_in_budget(budget, elapsed, probe, args.eval_steps, args.save_steps)
    if steps < 1:
        raise TrainingError(
            f"--time_budget {args.time_budget} is too short: {elapsed:.0f} s went on start-up and timing, and one "
            f"step takes {probe.step:.2f} s plus {probe.evaluation + 2 * probe.save:.1f} s for the final evaluation "
            f"and save; give a longer budget ({DURATION_FORMS}) or --max_steps"
        )
    args.max_steps = steps
    tokens_per_step = run.plan.tokens_per_step
    ends = time.time() + budget - elapsed
    decision = {"budget": args.time_budget, "budget_seconds": budget, "steps": steps,
                "seconds_per_step": round(probe.step, 4), "seconds_per_evaluation": round(probe.evaluation, 3),
                "seconds_per_save": round(probe.save, 3), "seconds_before_training": round(elapsed, 1),
                "tokens_per_second": round(tokens_per_step / probe.step, 1), "ends_at": time.strftime(
                    "%Y-%m-%dT%H:%M:%S", time.localtime(ends))}
    run.say(f"budget {args.time_budget} → {steps:,} steps of {tokens_per_step:,} tokens at "
            f"{tokens_per_step / probe.step:,.0f} tok/s; ends ≈ {time.strftime('%H:%M', time.localtime(ends))}")
    return decision


def dry_run(run: Run, sampler: WindowSampler, steps: int = 3) -> None:
    """Sizes and estimates, from a few real (timed) steps on the real data; writes nothing."""
    args, plan, accelerator = run.args, run.plan, run.accelerator
    counts = count_parameters(accelerator.unwrap_model(run.model))
    state_bytes = counts.total * 4 * 4  # fp32 weights, gradients and at most two moments (AdamW; Muon keeps one)
    train_tokens = len(run.data.train)
    print(f"model      {run.preset.model_name}: {counts.describe()}")
    print(f"batch      {args.batch_size} × {args.gradient_accumulation_steps} accumulation × "
          f"{accelerator.num_processes} process(es) × {args.sequence_length} tokens = "
          f"{plan.tokens_per_step:,} tokens/step")
    total_tokens = plan.total_steps * plan.tokens_per_step
    print(f"budget     {plan.total_steps:,} steps = {total_tokens:,} tokens "
          f"({total_tokens / max(1, train_tokens):.2f} epochs of {train_tokens:,} tokens; "
          f"{total_tokens / counts.total:.1f} tokens per parameter)"
          + (f", what fits in --time_budget {args.time_budget}" if run.budget_decision else ""))
    print(f"schedule   {plan.schedule.name}, peak {plan.schedule.peak_lr:g}, warmup {plan.schedule.warmup_steps}, "
          f"min ratio {plan.schedule.min_lr_ratio:g}; sequence lengths {plan.stages}")
    print(f"memory     weights + gradients + optimizer moments (fp32): {state_bytes / 2**20:,.0f} MiB")
    timings = []
    for step in range(steps + 1):
        started = time.perf_counter()
        take_step(run, sampler, step, want_expert_load=False)
        timings.append(time.perf_counter() - started)
    per_step = sum(timings[1:]) / steps
    tokens_per_second = plan.tokens_per_step / per_step
    utilisation = mfu(tokens_per_second / accelerator.num_processes, plan.flops_per_token[plan.seq_len(0)],
                      accelerator.device)
    print(f"measured   {per_step:.3f} s/step at sequence length {plan.seq_len(0)}, {tokens_per_second:,.0f} tokens/s"
          + (f", MFU {utilisation:.1%}" if utilisation else "")
          + f", peak memory {memory_mb(accelerator.device):,.0f} MiB "
          + ("(GPU allocated)" if accelerator.device.type == "cuda" else "(process RSS)"))
    print(f"estimate   {plan.total_steps * per_step / 3600:.2f} h for {plan.total_steps:,} steps "
          f"(from {steps} timed steps; the first, {timings[0]:.2f} s, is warm-up and not counted)")


def main() -> int:
    args = parse_args()
    if args.fp8:
        check_fp8_training()
    quiet_libraries()
    preset = load_preset(args.config)
    output_dir = Path(args.output_dir or f"checkpoints/pretrain/{preset.model_name}")
    args.output_dir = str(output_dir)
    # Before the accelerator exists, so rank 0 by the launcher's environment; a half-done swap is rare
    # enough that the other ranks of a multi-process resume are not made to wait for it.
    if not args.dry_run and os.environ.get("RANK", "0") == "0":
        for note in recover_interrupted_writes(output_dir):
            print(f"note: {note}")
    resume_dir = find_resume_checkpoint(args, output_dir)
    resumed_run = json.loads((resume_dir / "run.json").read_text(encoding="utf-8")) if resume_dir else None
    changed = resolve_settings(args, preset, resumed_run["args"] if resumed_run else None)

    accelerator = make_accelerator(args, output_dir)
    start_over = not args.dry_run and check_output_dir(output_dir, resume_dir is not None, args.overwrite_output_dir)
    data = load_data(args.data_path)
    if resume_dir:
        check_resume_compatible(resume_dir, resumed_run, preset, data)
    attn = resolve_attention(args.attn)
    if not resume_dir and preset.vocab_size != len(data.tokenizer):
        accelerator.print(f"note: {args.config} sets vocab_size {preset.vocab_size:,}; the model takes the "
                          f"{len(data.tokenizer):,} tokens of the data's tokenizer ({data.path / TOKENIZER_DIR})")

    # Model: fresh from the preset (vocabulary from the tokenizer), or the resumed checkpoint's weights.
    if resume_dir:
        model = AutoModelForCausalLM.from_pretrained(resume_dir, attn_implementation=attn, dtype=torch.float32)
    else:
        model = build_model(preset, data.tokenizer, attn_implementation=attn, seed=args.seed)
    set_generation_defaults(model, data.tokenizer)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(accelerator.device).train()
    if args.fp8:
        converted = convert_to_fp8_training(model)
        accelerator.print(f"fp8: {converted} linear layers train with float8 matmuls (torchao)")
    plan = make_plan(args, len(data.train), accelerator, model)
    optimizers = build_optimizers(model, args.optimizer, args.learning_rate, args.weight_decay,
                                  (args.adam_beta1, args.adam_beta2), args.adam_epsilon, args.muon_learning_rate,
                                  args.muon_momentum)
    if args.compile:
        model = torch.compile(model)
    model, *optimizers = accelerator.prepare(model, *optimizers)

    # Where the run stands: step, tokens, data cursor, optimizer moments and RNG, exactly as saved.
    state = TrainState(micro_batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps)
    if resume_dir:
        state, optimizer_saved, rng = read_training_state(resume_dir, accelerator.process_index)
        if optimizer_saved is not None:
            load_optimizer_state(accelerator, model, optimizers, optimizer_saved)
        else:
            accelerator.print("note: the checkpoint holds no optimizer state (DeepSpeed); AdamW moments restart")
        if rng is not None:
            restore_rng_state(rng)
        else:
            accelerator.print(f"note: {resume_dir} holds no RNG state for process {accelerator.process_index}")
        # Keep sizes --auto_batch_size chose unless the batch per update itself was changed by flags.
        rows_per_update = state.micro_batch_size * state.gradient_accumulation_steps
        if rows_per_update != args.batch_size * args.gradient_accumulation_steps:
            state.micro_batch_size = args.batch_size
            state.gradient_accumulation_steps = args.gradient_accumulation_steps
    sampler = WindowSampler(data.train, args.seed, args.sampling)
    val_windows = evaluation_windows(data.val, args.sequence_length,
                                     args.eval_batches * args.batch_size * accelerator.num_processes)
    run = Run(args, preset, data, plan, accelerator, model, optimizers, state, output_dir)
    if args.time_budget and args.max_steps is None:
        run.budget_decision = fit_time_budget(run, sampler, val_windows)
        run.plan = plan = make_plan(args, len(data.train), accelerator, model)
    elif resumed_run:
        run.budget_decision = resumed_run.get("time_budget")

    if args.dry_run:
        dry_run(run, sampler)
        return 0

    if accelerator.is_main_process:
        if start_over:
            run.say(f"starting over in {output_dir}: removed the previous run's {', '.join(clear_output_dir(output_dir))}")
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume_dir and (output_dir / "metrics.jsonl").is_file():
            truncate_metrics(run, output_dir / "metrics.jsonl", state.step)
    accelerator.wait_for_everyone()
    if args.report_to != "none":
        scalars = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(f"pretrain-{preset.model_name}", config=scalars)
    counts = count_parameters(accelerator.unwrap_model(model))
    summary = StageSummary("pretrain", preset=args.config, data=str(data.path), output_dir=str(output_dir),
                           parameters=counts.total, non_embedding_parameters=counts.non_embedding,
                           device=str(accelerator.device), processes=accelerator.num_processes,
                           distributed=accelerator.distributed_type.value,
                           precision=accelerator.mixed_precision, attention=attn)
    run.say(f"pretrain {preset.model_name}: {counts.describe()}; {plan.tokens_per_step:,} tokens/step × "
            f"{plan.total_steps:,} steps on {accelerator.num_processes} × {accelerator.device} "
            f"({accelerator.distributed_type.value}, precision {accelerator.mixed_precision}, {attn})")
    if resume_dir:
        run.say(f"resumed from {resume_dir} at step {state.step} ({state.tokens:,} tokens)")
        for change in changed:
            run.say(f"note: changed on resume, so this is not an exact continuation: {change}")
        if resume_dir.name == "final" and state.step >= plan.total_steps:
            run.say(f"{resume_dir} already completed its {plan.total_steps} steps; raise --max_steps "
                    "(or --max_tokens / --num_epochs) to train further")
            return 0

    speed = Throughput()
    run.bar = progress(total=plan.total_steps, initial=state.step, desc="pretrain", unit="step",
                       disable=not accelerator.is_main_process)
    exit_code, stopped_by, message = train(run, sampler, val_windows, speed)
    run.bar.close()
    run.bar = None
    if exit_code:
        run.say(message, error=True)
        return exit_code

    final_eval = validate(run, val_windows)
    final_dir = run.save("final", stopped_by)
    accelerator.end_training()
    if accelerator.is_main_process:
        tokens_per_second = speed.total_tokens / speed.total_seconds if speed.total_seconds else 0.0
        utilisation = mfu(tokens_per_second / accelerator.num_processes,
                          plan.flops_per_token[args.sequence_length], accelerator.device)
        summary.add(
            steps=state.step, tokens=state.tokens, stopped_by=stopped_by,
            train_seconds=round(speed.total_seconds, 1), tokens_per_second=round(tokens_per_second, 1),
            mfu=round(utilisation, 4) if utilisation else None, final_train_loss=run.last.get("loss"),
            final_val_loss=final_eval["val_loss"], best_val_loss=state.best_val_loss, skipped_steps=state.bad_steps,
            final_checkpoint=str(final_dir), peak_memory_mb=round(memory_mb(accelerator.device), 1),
        )
        summary.finish(output_dir)
    return 0


if __name__ == "__main__":
    run_main(main)
