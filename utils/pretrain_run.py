"""One pretraining run: its data, its plan (steps, schedule, sequence lengths), the loop, and the time-budget probe.

02_pretrain builds the pieces from the resolved settings and calls `train`; everything the loop needs to report,
validate, checkpoint and stop lives in `Run`. The generic parts (optimizers, the LR schedule, the window
sampler, one optimizer step, training state, checkpoint saving) are in utils/training.py.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from utils.checkpoint import CheckpointError, update_latest
from utils.cli import git_commit
from utils.config import ModelPreset
from utils.files import atomic_write_text, read_json, sha256_file
from utils.layout import BEST
from utils.metrics import MetricsLogger, has_torn_tail, memory_mb, mfu, read_metrics
from utils.pretrain_settings import PretrainSettings
from utils.templates import stop_token_ids
from utils.tokenizer import load_tokenizer
from utils.tokens import META, TOKENIZER_DIR, open_tokens, read_meta
from utils.training import (
    DURATION_FORMS,
    BadStepGuard,
    BudgetProbe,
    LRSchedule,
    StepResult,
    StopSignals,
    TrainingError,
    TrainState,
    WindowSampler,
    capture_rng_state,
    drop_gradients,
    evaluate,
    flops_per_token,
    learning_rates,
    load_optimizer_state,
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
    steps_in_epochs,
)

EXIT_DIVERGED = 3
MIN_REFIT_STEPS = 10  # steps timed at the least before the step count is fitted again


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


def make_plan(settings: PretrainSettings, train_tokens: int, accelerator: Accelerator, model: torch.nn.Module) -> Plan:
    num_processes = accelerator.num_processes
    tokens_per_step = (settings.batch_size * settings.gradient_accumulation_steps * num_processes
                       * settings.sequence_length)
    if settings.max_steps is None and settings.time_budget is not None:
        # Until the budget is measured: a plan for timing steps only (warmup LR, final sequence length).
        return Plan(tokens_per_step, 1, [(settings.sequence_length, 1.0)],
                    LRSchedule("constant", settings.learning_rate, settings.warmup_steps, 1),
                    {settings.sequence_length: flops_per_token(model, settings.sequence_length)})
    if settings.max_steps is not None:
        total = settings.max_steps
    elif settings.max_tokens is not None:
        total = math.ceil(settings.max_tokens / tokens_per_step)
    else:
        total = math.ceil(settings.num_epochs * train_tokens / tokens_per_step)
    warmup = settings.warmup_steps
    if warmup >= total:
        warmup = max(0, total // 10)
        accelerator.print(f"note: --warmup_steps {settings.warmup_steps} >= {total} total steps; "
                          f"warming up for {warmup} steps")
    stages = parse_seq_len_schedule(settings.seq_len_schedule, settings.sequence_length)
    schedule = LRSchedule(settings.lr_scheduler, settings.learning_rate, warmup, total, settings.min_lr_ratio,
                          settings.decay_fraction)
    return Plan(tokens_per_step, total, stages, schedule,
                {length: flops_per_token(model, length) for length, _ in stages})


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
    saved_vocab = read_json(checkpoint / "config.json", "checkpoint file")["vocab_size"]
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


def restore_state(resume_dir: Path | None, settings: PretrainSettings, accelerator: Accelerator,
                  model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> TrainState:
    """Where the run stands: a fresh state, or the checkpoint's step, tokens, data cursor, optimizer moments and
    RNG, exactly as saved."""
    state = TrainState(micro_batch_size=settings.batch_size,
                       gradient_accumulation_steps=settings.gradient_accumulation_steps)
    if resume_dir is None:
        return state
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
    if rows_per_update != settings.batch_size * settings.gradient_accumulation_steps:
        state.micro_batch_size = settings.batch_size
        state.gradient_accumulation_steps = settings.gradient_accumulation_steps
    return state


class Run:
    """The live objects of one training run, and the ways it reports and saves what it has done."""

    def __init__(self, settings: PretrainSettings, preset: ModelPreset, data: Data, plan: Plan,
                 accelerator: Accelerator, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                 state: TrainState, output_dir: Path):
        self.settings, self.preset, self.data, self.plan = settings, preset, data, plan
        self.accelerator, self.model, self.optimizers = accelerator, model, optimizers
        self.state, self.output_dir = state, output_dir
        self.metrics = MetricsLogger(output_dir / "metrics.jsonl",
                                     enabled=accelerator.is_main_process and not settings.dry_run)
        self.last: dict[str, Any] = {}
        self.bar = None
        self.budget_decision: dict[str, Any] | None = None
        self.budget_probe: BudgetProbe | None = None  # set only in the process that fitted the budget
        # What the run's steps (since the budget was last fitted), evaluations and saves took: refit_time_budget.
        self.step_seconds: list[float] = []
        self.evaluation_seconds: list[float] = []
        self.save_seconds: list[float] = []

    def say(self, message: str, error: bool = False) -> None:
        if not self.accelerator.is_main_process:
            return
        if self.bar is not None and not error:
            self.bar.write(message)
        else:
            print(message, file=sys.stderr if error else sys.stdout, flush=True)

    def log(self, row: dict[str, Any]) -> None:
        self.metrics.log(row)
        if self.accelerator.log_with:
            numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(numeric, step=row["step"])

    def run_info(self, reason: str) -> dict[str, Any]:
        return {
            "stage": "pretrain",
            "reason": reason,
            "step": self.state.step,
            "tokens": self.state.tokens,
            "preset": dataclasses.asdict(self.preset),
            "args": dataclasses.asdict(self.settings),
            "command": sys.argv,
            "data": {
                "path": str(self.data.path),
                "meta_sha256": sha256_file(self.data.path / META),
                "tokenizer_sha256": self.data.meta.get("tokenizer_sha256"),
                "vocab_size": len(self.data.tokenizer),
            },
            "world_size": self.accelerator.num_processes,
            "precision": self.accelerator.mixed_precision,
            "time_budget": self.budget_decision,
            "git_commit": git_commit(),
            "metrics": self.last,
        }

    def save(self, name: str, reason: str, point_latest: bool = True) -> Path:
        """Writes `<output_dir>/<name>/`; then (main process) moves `latest` to it and prunes old step dirs."""
        directory = self.output_dir / name
        started = time.perf_counter()
        save_checkpoint(self.accelerator, self.model, self.optimizers, self.data.tokenizer, directory, self.state,
                        self.run_info(reason))
        self.save_seconds.append(time.perf_counter() - started)
        if self.accelerator.is_main_process and point_latest:
            update_latest(self.output_dir, name)
            prune_checkpoints(self.output_dir, self.settings.save_total_limit, {directory})
        self.accelerator.wait_for_everyone()
        return directory


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
    settings, plan, state, accelerator = run.settings, run.plan, run.state, run.accelerator
    length = plan.seq_len(step)
    while True:
        rows = plan.rows(step, state.micro_batch_size, settings.sequence_length)
        count = rows * state.gradient_accumulation_steps * accelerator.num_processes
        starts = rank_micro_batches(sampler.starts(state.cursor, count, length), state.gradient_accumulation_steps,
                                    accelerator.num_processes, accelerator.process_index)
        batches = [sampler.gather(micro, length) for micro in starts]
        try:
            result = optimizer_step(
                accelerator, run.model, run.optimizers, batches, plan.schedule.factor(step), settings.max_grad_norm,
                run.preset.router_aux_loss_coef, run.preset.experts_per_token, want_expert_load, stop_requested,
            )
            return result, count, count * length
        except torch.OutOfMemoryError:
            if not settings.auto_batch_size or state.micro_batch_size == 1:
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
        "mfu": mfu(tokens_per_second / accelerator.num_processes, plan.flops_per_token[length], accelerator.device,
                   accelerator.mixed_precision),
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
    started = time.perf_counter()
    loss = evaluate(run.accelerator, run.model, val_windows, run.settings.batch_size)
    run.evaluation_seconds.append(time.perf_counter() - started)
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
        run.save(BEST, "best validation loss", point_latest=False)
    return row


def train(run: Run, sampler: WindowSampler, val_windows: torch.Tensor, speed: Throughput) -> tuple[int, str, str]:
    """The loop, until the budget, early stopping, a stop signal or too many bad steps.

    Returns (exit code, why it ended, the message for an abnormal end)."""
    settings, state = run.settings, run.state
    guard = BadStepGuard(settings.max_bad_steps, state.bad_steps)
    with StopSignals() as signals:
        while state.step < run.plan.total_steps:
            step = state.step
            log_now = (step + 1) % settings.logging_steps == 0 or step + 1 == run.plan.total_steps
            started = time.perf_counter()
            result, windows_used, tokens = take_step(run, sampler, step, log_now, lambda: signals.requested)
            seconds = time.perf_counter() - started
            speed.add(tokens, seconds, result)
            if run.budget_probe is not None:
                run.step_seconds.append(seconds)
            state.cursor += windows_used
            state.step += 1
            guard.record(result.applied)
            state.bad_steps = guard.total
            if result.applied:
                state.tokens += tokens
            run.bar.update(1)
            if run.budget_probe is not None and state.step == run.budget_decision["refit_at_step"]:
                refit_time_budget(run)

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
                    f"{settings.max_bad_steps}); each update was skipped, so {directory} holds the last good weights. "
                    "Lower --learning_rate or --max_grad_norm (or use bf16 instead of fp16), then resume with: "
                    f"{run.settings.resume_command()} --learning_rate <lower>")
            if result.stop_requested:
                directory = run.save(f"step_{state.step}", f"signal {signals.name or 'on another process'}")
                code = signals.exit_code if signals.requested else 128 + signal.SIGTERM
                return code, "signal", (f"stopped by {signals.name or 'a signal'} after step {state.step}; saved "
                                        f"{directory}. Resume with: {run.settings.resume_command()}")
            if state.step >= run.plan.total_steps:
                break
            if settings.eval_steps and state.step % settings.eval_steps == 0:
                row = validate(run, val_windows)
                run.say(f"step {state.step}: val loss {row['val_loss']:.4f} (best {row['best_val_loss']:.4f})")
                if (settings.early_stopping_patience
                        and state.evals_without_improvement >= settings.early_stopping_patience):
                    return 0, "early stopping", ""
            if settings.save_steps and state.step % settings.save_steps == 0:
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
    warmup_steps = 6 if run.settings.compile else 5
    for step in range(warmup_steps):
        take_step(run, sampler, step, want_expert_load=False)
    timings: list[float] = []
    while len(timings) < 3 or (sum(timings) < 8.0 and len(timings) < 30):
        started = time.perf_counter()
        take_step(run, sampler, warmup_steps + len(timings), want_expert_load=False)
        timings.append(time.perf_counter() - started)
    if run.settings.compile:
        # The first evaluation compiles the no-grad graphs: timing it would charge every evaluation of the run
        # with that compilation (4.2 s instead of 0.003 s for the micro model).
        evaluate(accelerator, run.model, val_windows, run.settings.batch_size)
    started = time.perf_counter()
    evaluate(accelerator, run.model, val_windows, run.settings.batch_size)
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


def steps_that_fit(run: Run, probe: BudgetProbe, elapsed: float, steps_done: int = 0) -> tuple[int, int]:
    """(steps the run takes, steps the budget fits) in all, from `steps_done` on: --max_epochs caps the first."""
    settings = run.settings
    fitted = steps_done + steps_in_budget(parse_duration(settings.time_budget), elapsed, probe, settings.eval_steps,
                                          settings.save_steps)
    if settings.max_epochs is None:
        return fitted, fitted
    return min(fitted, steps_in_epochs(settings.max_epochs, len(run.data.train), run.plan.tokens_per_step)), fitted


def ends_at(run: Run, elapsed: float, steps: int, fitted: int, steps_done: int = 0) -> float:
    """When the run should end: the budget's end, earlier in proportion when --max_epochs cuts the steps."""
    left = parse_duration(run.settings.time_budget) - elapsed
    return time.time() + left * (steps - steps_done) / max(1, fitted - steps_done)


def refit_step(plan: Plan) -> int | None:
    """Where the step count is first fitted again from the run's own speed: halfway through the full-rate phase, late
    enough to time a few hundred steps past the first ones, early enough that a count half the first (wsd's
    default 20 % decay) still starts its decay after it. None where any learning rate or sequence length already
    taken depends on the count (cosine, linear, a sequence length curriculum)."""
    start, end = plan.schedule.warmup_steps, plan.schedule.decay_start
    if len(plan.stages) > 1 or end - start < 2 * MIN_REFIT_STEPS:
        return None
    return (start + end) // 2


def fewest_steps_decaying_after(schedule: LRSchedule, step: int, steps: int) -> int:
    """`steps`, or more where the schedule laid out over them would have started decaying before `step`: a run that
    has found itself slower than planned cannot take back the full-rate steps it has taken."""
    while dataclasses.replace(schedule, total_steps=steps).decay_start < step:
        steps += 1
    return steps


def fit_time_budget(run: Run, sampler: WindowSampler, val_windows: torch.Tensor) -> None:
    """Fixes settings.max_steps from the measured costs and lays the plan out over them; the decision, as run.json
    records it, goes to run.budget_decision."""
    settings = run.settings
    probe = probe_budget(run, sampler, val_windows)
    elapsed = seconds_since_start()
    steps, fitted = steps_that_fit(run, probe, elapsed)
    if fitted < 1:
        raise TrainingError(
            f"--time_budget {settings.time_budget} is too short: {elapsed:.0f} s went on start-up and timing, and one "
            f"step takes {probe.step:.2f} s plus {probe.evaluation + 2 * probe.save:.1f} s for the final evaluation "
            f"and save; give a longer budget ({DURATION_FORMS}) or --max_steps"
        )
    settings.max_steps = steps
    run.plan = make_plan(settings, len(run.data.train), run.accelerator, run.model)
    run.budget_probe = probe
    tokens_per_step = run.plan.tokens_per_step
    ends = ends_at(run, elapsed, steps, fitted)
    run.budget_decision = {
        "budget": settings.time_budget, "budget_seconds": parse_duration(settings.time_budget), "steps": steps,
        "steps_in_budget": fitted, "seconds_per_step": round(probe.step, 4),
        "seconds_per_evaluation": round(probe.evaluation, 3), "seconds_per_save": round(probe.save, 3),
        "seconds_before_training": round(elapsed, 1), "tokens_per_second": round(tokens_per_step / probe.step, 1),
        "refit_at_step": refit_step(run.plan), "ends_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ends))}
    capped = "" if steps == fitted else (f" ({settings.max_epochs:g} epochs of {len(run.data.train):,} tokens: "
                                          f"--max_epochs; the budget fits {fitted:,})")
    run.say(f"budget {settings.time_budget} → {steps:,} steps of {tokens_per_step:,} tokens at "
            f"{tokens_per_step / probe.step:,.0f} tok/s{capped}; ends ≈ {time.strftime('%H:%M', time.localtime(ends))}")


def refit_time_budget(run: Run) -> None:
    """Fits the step count again from what this run's steps since the last fit (the later half of them),
    evaluations and saves took: the probe's few steps ran 12-16 % slower than the rest in one bf16 CPU session and
    4-6 % faster in another, and its one save costs several times a later one. Only the steps still to come change:
    the learning rate has stayed at its peak so far, as a run of the new count would have it.

    The first fit, halfway through the full-rate phase, sets when the decay begins; the run fits once more there,
    from the steps since: a spell of slow steps before the first fit (the CPU's speed drifts for minutes at a time)
    ended a ten-minute run 111 s early."""
    settings, plan, decision = run.settings, run.plan, run.budget_decision
    done = run.state.step
    timed = run.step_seconds[len(run.step_seconds) // 2:]
    probed = run.budget_probe
    measured = [fmean(timed), fmean(run.evaluation_seconds) if run.evaluation_seconds else probed.evaluation,
                fmean(run.save_seconds) if run.save_seconds else probed.save, seconds_since_start()]
    broadcast_object_list(measured)  # every process must take the same number of steps
    *costs, elapsed = measured
    probe = BudgetProbe(*costs)
    steps, fitted = steps_that_fit(run, probe, elapsed, done)
    steps = fewest_steps_decaying_after(plan.schedule, done, steps)
    before = settings.max_steps
    settings.max_steps = steps
    run.plan = make_plan(settings, len(run.data.train), run.accelerator, run.model)
    run.bar.total = steps
    run.bar.refresh()
    ends = ends_at(run, elapsed, steps, fitted, done)
    tokens_per_second = plan.tokens_per_step / probe.step
    decision.update(steps=steps, steps_in_budget=fitted, ends_at=time.strftime("%Y-%m-%dT%H:%M:%S",
                                                                                time.localtime(ends)))
    refits = decision.setdefault("refits", [])
    refits.append({"at_step": done, "steps_before": before, "seconds_per_step": round(probe.step, 4),
                   "seconds_per_evaluation": round(probe.evaluation, 3), "seconds_per_save": round(probe.save, 3),
                   "tokens_per_second": round(tokens_per_second, 1), "steps_timed": len(timed),
                   "seconds_elapsed": round(elapsed, 1)})
    decay_start = run.plan.schedule.decay_start
    again = len(refits) == 1 and decay_start - done >= 2 * MIN_REFIT_STEPS
    decision["refit_at_step"] = decay_start if again else None
    run.step_seconds.clear()
    if not again:
        run.budget_probe = None
    probe_speed = plan.tokens_per_step / probed.step
    run.say(f"budget {settings.time_budget} re-fitted at step {done:,} from the last {len(timed):,} steps "
            f"({tokens_per_second:,.0f} tok/s, the probe timed {probe_speed:,.0f}): {before:,} → {steps:,} steps; "
            f"ends ≈ {time.strftime('%H:%M', time.localtime(ends))}")
