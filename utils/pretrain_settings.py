"""The settings of a pretraining run, resolved once: flag > resumed run.json > preset's training block > default.

`PretrainSettings` holds every setting of 02_pretrain under its flag name; the field's `source` says where an
unset one comes from. A resume keeps what the checkpoint's run used unless a flag changes it, and reports
each change that makes it an inexact continuation. The accelerator is built from the resolved settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, TorchDynamoPlugin

from utils.checkpoint import CheckpointError, resolve_checkpoint, verify_checkpoint
from utils.config import ModelPreset
from utils.files import read_json
from utils.layout import LATEST, TRACKER_DIR, stage_dir
from utils.model import cxx_compiler_available, resolve_precision, share_cpu_bf16_answer
from utils.trackers import check_trackers
from utils.training import DURATION_FORMS, TrainingError, parse_duration

PRESET, DEFAULT, BUDGET_KIND, PROCESS = "preset", "default", "budget", "process"


def _from(source: str, default: Any = None) -> Any:
    return field(default=default, metadata={"source": source})


@dataclass
class PretrainSettings:
    """Every setting of one pretraining run, by flag name."""

    config: str = _from(PROCESS)
    data_path: str = _from(PROCESS)
    output_dir: str = _from(PROCESS)
    # The preset's `training` block.
    batch_size: int = _from(PRESET)
    gradient_accumulation_steps: int = _from(PRESET)
    sequence_length: int = _from(PRESET)
    learning_rate: float = _from(PRESET)
    warmup_steps: int = _from(PRESET)
    weight_decay: float = _from(PRESET)
    optimizer: str = _from(PRESET)
    muon_learning_rate: float = _from(PRESET)
    lr_scheduler: str = _from(PRESET)
    # One budget; a time budget fixes max_steps once the run has timed its steps.
    max_steps: int | None = _from(BUDGET_KIND)
    max_tokens: int | None = _from(BUDGET_KIND)
    num_epochs: float | None = _from(BUDGET_KIND)
    time_budget: str | None = _from(BUDGET_KIND)
    # A ceiling on what a time budget buys: past a few passes over a small corpus, more steps fit it better and
    # generalise worse.
    max_epochs: float | None = _from(PROCESS)
    # Built-in defaults.
    muon_momentum: float = _from(DEFAULT, 0.95)
    min_lr_ratio: float = _from(DEFAULT, 0.1)
    decay_fraction: float = _from(DEFAULT, 0.2)
    adam_beta1: float = _from(DEFAULT, 0.9)
    adam_beta2: float = _from(DEFAULT, 0.95)
    adam_epsilon: float = _from(DEFAULT, 1e-8)
    max_grad_norm: float = _from(DEFAULT, 1.0)
    seed: int = _from(DEFAULT, 42)
    sampling: str = _from(DEFAULT, "strided")
    seq_len_schedule: str | None = _from(DEFAULT)
    eval_steps: int = _from(DEFAULT, 500)
    eval_batches: int = _from(DEFAULT, 20)
    save_steps: int = _from(DEFAULT, 1000)
    save_total_limit: int = _from(DEFAULT, 3)
    logging_steps: int = _from(DEFAULT, 50)
    early_stopping_patience: int = _from(DEFAULT, 0)
    max_bad_steps: int = _from(DEFAULT, 5)
    mixed_precision: str = _from(DEFAULT, "auto")
    attn: str = _from(DEFAULT, "auto")
    # This process only: never taken from a resumed run.
    overwrite_output_dir: bool = _from(PROCESS, False)
    resume_from_checkpoint: str | None = _from(PROCESS)
    settings: str | None = _from(PROCESS)
    auto_batch_size: bool = _from(PROCESS, False)
    gradient_checkpointing: bool = _from(PROCESS, False)
    compile: bool = _from(PROCESS, False)
    fp8: bool = _from(PROCESS, False)
    report_to: str = _from(PROCESS, "none")
    dry_run: bool = _from(PROCESS, False)

    def check(self, preset: ModelPreset) -> None:
        """Each value in its range; the error names the flag."""
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        positive = ["batch_size", "gradient_accumulation_steps", "sequence_length", "learning_rate", "eval_batches",
                    "muon_learning_rate", "logging_steps"]
        positive += [n for n in ("max_steps", "max_tokens", "num_epochs", "max_epochs") if getattr(self, n) is not None]
        if self.max_epochs is not None and self.time_budget is None:
            raise TrainingError("--max_epochs caps what --time_budget buys; without a time budget give the length "
                                "itself (--num_epochs, --max_tokens or --max_steps)")
        for name in positive:
            if getattr(self, name) <= 0:
                raise TrainingError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm", "eval_steps", "save_steps", "save_total_limit",
                     "early_stopping_patience", "max_bad_steps"):
            if getattr(self, name) < 0:
                raise TrainingError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise TrainingError(f"--muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.sequence_length > preset.sequence_length:
            raise TrainingError(
                f"--sequence_length {self.sequence_length} exceeds the preset's sequence_length "
                f"{preset.sequence_length} ({self.config}), the model's maximum position"
            )

    def resume_command(self) -> str:
        return (f"python scripts/02_pretrain.py --config {self.config} --data_path {self.data_path} "
                f"--output_dir {self.output_dir} --resume_from_checkpoint latest")


def names(*sources: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(PretrainSettings) if f.metadata["source"] in sources)


PRESET_SETTINGS = names(PRESET)
BUDGET = names(BUDGET_KIND)
RESUMABLE = names(PRESET, DEFAULT)  # what a resume takes from the checkpoint's run.json unless a flag is given
# Settings that change the numbers a run computes: a resume that changes one is not an exact continuation.
EXACT_SETTINGS = PRESET_SETTINGS + BUDGET + (
    "muon_momentum", "min_lr_ratio", "decay_fraction", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "seed", "sampling", "seq_len_schedule", "mixed_precision", "fp8",
)


def apply_settings_file(parser: argparse.ArgumentParser, flags: argparse.Namespace) -> None:
    """Fills the flags not given from --settings (e.g. a sweep's best.json); each value is checked as its flag
    would check it."""
    values = read_json(flags.settings, "--settings")
    if not isinstance(values, dict):
        raise TrainingError(f"--settings {flags.settings}: expected a JSON object of flag names and values")
    actions = {action.dest: action for action in parser._actions}
    for name, value in values.items():
        if name not in RESUMABLE:
            raise TrainingError(f"--settings {flags.settings}: {name!r} is not a setting it can hold; "
                                f"allowed: {', '.join(sorted(RESUMABLE))}")
        if getattr(flags, name) is not None:
            continue
        action = actions[name]
        try:
            value = action.type(value) if action.type and value is not None else value
        except (TypeError, ValueError):
            raise TrainingError(f"--settings {flags.settings}: {name} {value!r} is not a valid "
                                f"{action.type.__name__}") from None
        if action.choices and value not in action.choices:
            raise TrainingError(f"--settings {flags.settings}: {name} {value!r} is not one of "
                                f"{', '.join(map(str, action.choices))}")
        setattr(flags, name, value)


def find_resume_checkpoint(resume_from: str | None, output_dir: Path) -> Path | None:
    """The checkpoint to resume from, verified complete (every file present, every sha256 matching)."""
    if not resume_from:
        return None
    if resume_from == LATEST:
        if not (output_dir / LATEST).is_file():
            raise CheckpointError(
                f"nothing to resume in {output_dir}: it has no '{LATEST}' pointer (no complete checkpoint was "
                "written); start without --resume_from_checkpoint"
            )
        path = resolve_checkpoint(output_dir / LATEST)
    else:
        path = resolve_checkpoint(Path(resume_from))
    if not path.is_dir():
        raise CheckpointError(f"checkpoint to resume {path} does not exist")
    verify_checkpoint(path)
    if not (path / "run.json").is_file():
        raise CheckpointError(f"checkpoint {path} has no run.json: it was not written by this stage")
    return path


def resolve_settings(flags: argparse.Namespace, preset: ModelPreset,
                     resumed: dict[str, Any] | None) -> tuple[PretrainSettings, list[str]]:
    """The run's settings from the flags (None = not given), the resumed run's settings and the preset; and
    the settings a resume changed."""
    given = {name for name in (*RESUMABLE, *BUDGET) if getattr(flags, name) is not None}
    if "time_budget" in given and given & {"max_steps", "max_tokens", "num_epochs"}:
        other = next(n for n in BUDGET if n in given and n != "time_budget")
        raise TrainingError(f"--time_budget cannot be combined with --{other}: give one budget (--time_budget "
                            f"takes {DURATION_FORMS})")
    previous = resumed or {}
    values = {name: getattr(flags, name) for name in names(PROCESS, BUDGET_KIND)}
    values["output_dir"] = str(flags.output_dir or stage_dir("pretrain", preset.model_name))
    for f in dataclasses.fields(PretrainSettings):
        name = f.name
        if f.metadata["source"] not in (PRESET, DEFAULT) or name in given:
            values.setdefault(name, getattr(flags, name))
        elif name in previous:
            values[name] = previous[name]
        elif f.metadata["source"] == PRESET:
            values[name] = getattr(preset.training, name)
        else:
            values[name] = f.default
    if not given & set(BUDGET):
        values.update({name: previous.get(name) for name in BUDGET})
        if all(values[name] is None for name in BUDGET):
            values["max_steps"] = preset.training.max_steps
    elif "time_budget" in given and previous.get("time_budget"):
        # The step count was fixed when the run started; the same budget continues that schedule exactly.
        if values["time_budget"] != previous["time_budget"]:
            raise TrainingError(
                f"--time_budget {values['time_budget']}: the resumed run fixed its step count at the start "
                f"({previous['max_steps']} steps for --time_budget {previous['time_budget']}); resume with the "
                "same budget, or pass --max_steps to change the length"
            )
        values["max_steps"] = previous["max_steps"]
    settings = PretrainSettings(**values)
    settings.check(preset)
    saved_optimizer = previous.get("optimizer", "adamw") if resumed is not None else settings.optimizer
    if saved_optimizer != settings.optimizer:
        raise TrainingError(
            f"--optimizer {settings.optimizer}: the checkpoint holds {saved_optimizer}'s state; resume with "
            f"--optimizer {saved_optimizer}, or start a new run from its weights"
        )
    changed = [f"{name} {previous[name]} → {getattr(settings, name)}"
               for name in EXACT_SETTINGS if name in previous and previous[name] != getattr(settings, name)]
    return settings, changed


def make_accelerator(settings: PretrainSettings, output_dir: Path) -> Accelerator:
    """The accelerator for these settings: precision, accumulation, tracker; DeepSpeed told the batch layout."""
    log_with = check_trackers(settings.report_to, output_dir) or None
    # Several processes without a GPU (torchrun, `accelerate launch --multi_gpu` on a CPU machine): DDP over gloo.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Tracker files under runs/, where 03/04's trainer puts its TensorBoard events too.
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / TRACKER_DIR))
    # --compile: `prepare` compiles one decoder layer and reuses it for the others (regional compilation), in
    # the order DDP, FSDP and DeepSpeed each need. A cold tiny-preset start on a CPU: ~13 s, against ~19 s for
    # the whole model.
    if settings.compile and not cxx_compiler_available():
        raise TrainingError("--compile: torch.compile's inductor needs a C++ compiler (g++, or the one $CXX names) "
                            "and none was found; install one (e.g. apt install g++) or leave out --compile")
    dynamo = TorchDynamoPlugin(backend="inductor", use_regional_compilation=True) if settings.compile else None
    if cpu_processes:
        share_cpu_bf16_answer()
        if settings.compile:
            # Every rank would start its own pool of compile workers on cores the ranks already fill, and at
            # exit inductor waits up to 300 s for a pool to stop. Two of ~12 compiled two-process test runs hung
            # for the test's 300 s, most likely there; PyTorch's distributed inductor tests compile in-process
            # against the same hangs at exit.
            from torch._inductor import config as inductor_config

            inductor_config.compile_threads = 1
    accelerator = Accelerator(
        cpu=cpu_processes, mixed_precision=resolve_precision(settings.mixed_precision), log_with=log_with,
        project_config=project, gradient_accumulation_steps=settings.gradient_accumulation_steps,
        dynamo_plugin=dynamo,
    )
    if settings.optimizer == "muon":
        check_muon_supported(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if settings.auto_batch_size:
            raise TrainingError("--auto_batch_size is not supported under DeepSpeed (its engine fixes the "
                                "accumulation); set --batch_size and --gradient_accumulation_steps instead")
        deepspeed = accelerator.state.deepspeed_plugin.deepspeed_config
        deepspeed["train_micro_batch_size_per_gpu"] = settings.batch_size
        deepspeed["gradient_accumulation_steps"] = settings.gradient_accumulation_steps
        deepspeed["gradient_clipping"] = settings.max_grad_norm
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
