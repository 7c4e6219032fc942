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
import dataclasses
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from utils.cli import StageSummary, progress, quiet_libraries, run_main
from utils.config import OPTIMIZERS, SCHEDULES, load_preset
from utils.files import read_json, recover_interrupted_writes
from utils.gpu import check_fp8_training, convert_to_fp8_training
from utils.layout import FINAL, stage_dir
from utils.metrics import memory_mb, mfu
from utils.model import ATTN_CHOICES, PRECISION_CHOICES, build_model, count_parameters, resolve_attention
from utils.pretrain_run import (
    Run,
    Throughput,
    check_resume_compatible,
    fit_time_budget,
    load_data,
    make_plan,
    restore_state,
    set_generation_defaults,
    take_step,
    train,
    truncate_metrics,
    validate,
)
from utils.pretrain_settings import (
    apply_settings_file,
    find_resume_checkpoint,
    make_accelerator,
    resolve_settings,
)
from utils.tokens import TOKENIZER_DIR
from utils.trackers import CHOICES as TRACKER_CHOICES
from utils.training import (
    DURATION_FORMS,
    SAMPLING,
    WindowSampler,
    build_optimizers,
    check_output_dir,
    clear_output_dir,
    evaluation_windows,
    keep_freed_memory,
)


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
    budget.add_argument("--max_epochs", type=float, default=None,
                        help="with --time_budget: never more than this many passes over train.bin, however many "
                             "steps the budget would fit (the run then ends early)")
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
                       help="auto (default) = bf16 on a GPU that supports it (fp16 on older ones); "
                            "on a CPU, bf16 where its bf16 matrix products are fast (AVX-512 BF16, AMX), else fp32")
    speed.add_argument("--attn", choices=ATTN_CHOICES, default=None,
                       help="attention kernel; auto (default) = flash_attention_2 when installed and usable; "
                            "transformers' eager attention on a CPU in bf16 at sequences up to 512; else sdpa")
    speed.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model, one decoder layer compiled "
                       "and reused by the others (accelerate's regional compilation)")
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
    monitor.add_argument("--report_to", default="none",
                         help=f"also log through accelerate's trackers: {', '.join(TRACKER_CHOICES)}, or several "
                              "joined by commas (each needs its package; wandb runs offline without an API key)")
    monitor.add_argument("--max_bad_steps", type=int, default=None,
                         help="stop after N non-finite steps in a row (each one skips its update), 0 = never (5)")
    monitor.add_argument("--seed", type=int, default=None, help="model init and data order (42)")
    monitor.add_argument("--dry_run", action="store_true",
                         help="build model and data, print sizes and estimates from a few timed steps, write nothing")
    flags = parser.parse_args()
    if flags.settings:
        apply_settings_file(parser, flags)
    return flags


def dry_run(run: Run, sampler: WindowSampler, steps: int = 3) -> None:
    """Sizes and estimates, from a few real (timed) steps on the real data; writes nothing."""
    settings, plan, accelerator = run.settings, run.plan, run.accelerator
    counts = count_parameters(accelerator.unwrap_model(run.model, keep_torch_compile=False))
    state_bytes = counts.total * 4 * 4  # fp32 weights, gradients and at most two moments (AdamW; Muon keeps one)
    train_tokens = len(run.data.train)
    print(f"model      {run.preset.model_name}: {counts.describe()}")
    print(f"batch      {settings.batch_size} × {settings.gradient_accumulation_steps} accumulation × "
          f"{accelerator.num_processes} process(es) × {settings.sequence_length} tokens = "
          f"{plan.tokens_per_step:,} tokens/step")
    total_tokens = plan.total_steps * plan.tokens_per_step
    print(f"budget     {plan.total_steps:,} steps = {total_tokens:,} tokens "
          f"({total_tokens / max(1, train_tokens):.2f} epochs of {train_tokens:,} tokens; "
          f"{total_tokens / counts.total:.1f} tokens per parameter)"
          + (f", what fits in --time_budget {settings.time_budget}" if run.budget_decision else ""))
    print(f"schedule   {plan.schedule.name}, peak {plan.schedule.peak_lr:g}, warmup {plan.schedule.warmup_steps}, "
          f"min ratio {plan.schedule.min_lr_ratio:g}; sequence lengths {plan.stages}")
    print(f"memory     weights + gradients + optimizer moments (fp32): {state_bytes / 2**20:,.0f} MiB")
    if run.budget_decision:
        decision = run.budget_decision
        print(f"probe      {decision['seconds_per_step']:.3f} s/step, {decision['seconds_per_evaluation']:.3f} s per "
              f"evaluation, {decision['seconds_per_save']:.2f} s per save, {decision['seconds_before_training']:.0f} s "
              "of start-up")
    timings = []
    for step in range(steps + 1):
        started = time.perf_counter()
        take_step(run, sampler, step, want_expert_load=False)
        timings.append(time.perf_counter() - started)
    per_step = sum(timings[1:]) / steps
    tokens_per_second = plan.tokens_per_step / per_step
    utilisation = mfu(tokens_per_second / accelerator.num_processes, plan.flops_per_token[plan.seq_len(0)],
                      accelerator.device, accelerator.mixed_precision)
    print(f"measured   {per_step:.3f} s/step at sequence length {plan.seq_len(0)}, {tokens_per_second:,.0f} tokens/s"
          + (f", MFU {utilisation:.1%}" if utilisation else "")
          + f", peak memory {memory_mb(accelerator.device):,.0f} MiB "
          + ("(GPU allocated)" if accelerator.device.type == "cuda" else "(process RSS)"))
    print(f"estimate   {plan.total_steps * per_step / 3600:.2f} h for {plan.total_steps:,} steps "
          f"(from {steps} timed steps; the first, {timings[0]:.2f} s, is warm-up and not counted)")


def main() -> int:
    flags = parse_args()
    if flags.fp8:
        check_fp8_training()
    quiet_libraries()
    preset = load_preset(flags.config)
    output_dir = Path(flags.output_dir or stage_dir("pretrain", preset.model_name))
    # Before the accelerator exists, so rank 0 by the launcher's environment; a half-done swap is rare
    # enough that the other ranks of a multi-process resume are not made to wait for it.
    if not flags.dry_run and os.environ.get("RANK", "0") == "0":
        for note in recover_interrupted_writes(output_dir):
            print(f"note: {note}")
    resume_dir = find_resume_checkpoint(flags.resume_from_checkpoint, output_dir)
    resumed_run = read_json(resume_dir / "run.json", "checkpoint file") if resume_dir else None
    settings, changed = resolve_settings(flags, preset, resumed_run["args"] if resumed_run else None)

    accelerator = make_accelerator(settings, output_dir)
    # `--mixed_precision auto` resolves per machine: a resume on another CPU or GPU may train in another one.
    saved_precision = resumed_run.get("precision") if resumed_run else None
    if saved_precision not in (None, accelerator.mixed_precision):
        changed.append(f"precision {saved_precision} → {accelerator.mixed_precision}")
    start_over = not settings.dry_run and check_output_dir(output_dir, resume_dir is not None,
                                                           settings.overwrite_output_dir)
    data = load_data(settings.data_path)
    if resume_dir:
        check_resume_compatible(resume_dir, resumed_run, preset, data)
    attn = resolve_attention(settings.attn, accelerator.device.type, accelerator.mixed_precision,
                             settings.sequence_length)
    if not resume_dir and preset.vocab_size != len(data.tokenizer):
        accelerator.print(f"note: {settings.config} sets vocab_size {preset.vocab_size:,}; the model takes the "
                          f"{len(data.tokenizer):,} tokens of the data's tokenizer ({data.path / TOKENIZER_DIR})")

    # Model: fresh from the preset (vocabulary from the tokenizer), or the resumed checkpoint's weights.
    if resume_dir:
        model = AutoModelForCausalLM.from_pretrained(resume_dir, attn_implementation=attn, dtype=torch.float32)
    else:
        model = build_model(preset, data.tokenizer, attn_implementation=attn, seed=settings.seed)
    set_generation_defaults(model, data.tokenizer)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(accelerator.device).train()
    keep_freed_memory(accelerator.device)
    if settings.fp8:
        converted = convert_to_fp8_training(model)
        accelerator.print(f"fp8: {converted} linear layers train with float8 matmuls (torchao)")
    plan = make_plan(settings, len(data.train), accelerator, model)
    optimizers = build_optimizers(model, settings.optimizer, settings.learning_rate, settings.weight_decay,
                                  (settings.adam_beta1, settings.adam_beta2), settings.adam_epsilon,
                                  settings.muon_learning_rate, settings.muon_momentum)
    model, *optimizers = accelerator.prepare(model, *optimizers)
    state = restore_state(resume_dir, settings, accelerator, model, optimizers)
    sampler = WindowSampler(data.train, settings.seed, settings.sampling)
    val_windows = evaluation_windows(data.val, settings.sequence_length,
                                     settings.eval_batches * settings.batch_size * accelerator.num_processes)
    run = Run(settings, preset, data, plan, accelerator, model, optimizers, state, output_dir)
    if settings.time_budget and settings.max_steps is None:
        fit_time_budget(run, sampler, val_windows)
        plan = run.plan
    elif resumed_run:
        run.budget_decision = resumed_run.get("time_budget")

    if settings.dry_run:
        dry_run(run, sampler)
        return 0

    if accelerator.is_main_process:
        if start_over:
            run.say(f"starting over in {output_dir}: "
                    f"removed the previous run's {', '.join(clear_output_dir(output_dir))}")
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume_dir and (output_dir / "metrics.jsonl").is_file():
            truncate_metrics(run, output_dir / "metrics.jsonl", state.step)
    accelerator.wait_for_everyone()
    if accelerator.log_with:
        scalars = {k: v for k, v in dataclasses.asdict(settings).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(f"pretrain-{preset.model_name}", config=scalars)
    counts = count_parameters(accelerator.unwrap_model(model, keep_torch_compile=False))
    summary = StageSummary("pretrain", preset=settings.config, data=str(data.path), output_dir=str(output_dir),
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
        if resume_dir.name == FINAL and state.step >= plan.total_steps:
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
    final_dir = run.save(FINAL, stopped_by)
    accelerator.end_training()
    if accelerator.is_main_process:
        tokens_per_second = speed.total_tokens / speed.total_seconds if speed.total_seconds else 0.0
        utilisation = mfu(tokens_per_second / accelerator.num_processes,
                          plan.flops_per_token[settings.sequence_length], accelerator.device,
                          accelerator.mixed_precision)
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
