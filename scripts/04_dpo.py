#!/usr/bin/env python
"""Stage 04: preference alignment with Direct Preference Optimization (trl's DPOTrainer).

Input: an SFT adapter (its training continues; the reference is a frozen copy of its starting weights
inside the same model, so the base weights are held once), or a full checkpoint (a fresh LoRA adapter,
reference = adapters disabled; with `--full` every weight trains against a frozen copy). Data: prompt /
chosen / rejected records or Anthropic HH dialogues (see utils/chat_data.py). Writes `<output_dir>/final/`,
`latest`, `metrics.jsonl` (loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies),
`summary.json`, and for a LoRA run (unless `--no-merge`) a plain Hugging Face model in
`<output_dir>/merged/`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from utils.chat_data import (
    BUILTIN_DPO,
    filter_preferences_by_length,
    load_preference_dataset,
    split_eval,
)
from utils.checkpoint import adapter_base_path
from utils.cli import StageSummary, quiet_libraries, run_main
from utils.finetune import (
    DPO_LOSS_TYPES,
    DPO_STOP_METRICS,
    DPOSettings,
    HelpFormatter,
    StageLogger,
    add_training_flags,
    build_dpo_trainer,
    config_default,
    effective_max_length,
    is_adapter,
    load_adapter_for_training,
    load_base_model,
    load_settings,
    prepare_output,
    resolve_input,
    run_record,
    save_outputs,
    trainable_parameters,
)
from utils.layout import fine_tuning_output_dir
from utils.model import resolve_precision
from utils.templates import apply_template, load_template_name
from utils.tokenizer import load_tokenizer
from utils.trackers import check_trackers

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "config" / "dpo.json"
REPORTED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    config = config_default(DEFAULT_CONFIG, DPOSettings)
    parser.add_argument("--model_path", default="checkpoints/sft/tiny",
                        help="SFT adapter or full checkpoint directory, or a stage dir with a `latest` pointer")
    parser.add_argument("--dataset_path", default=BUILTIN_DPO,
                        help=f"a .json/.jsonl/.parquet file (optionally .gz), a hub dataset id, or {BUILTIN_DPO}")
    parser.add_argument("--output_dir", help="stage directory; default checkpoints/dpo/<preset of --model_path>")
    parser.add_argument("--config_path", default=str(DEFAULT_CONFIG),
                        help="settings file; every flag left unset takes its value from here")
    parser.add_argument("--beta", type=float, help=f"strength of the pull towards the reference {config('beta')}")
    parser.add_argument("--loss_type", help=f"trl's DPO loss: {', '.join(DPO_LOSS_TYPES)}, or several joined by "
                                            f"commas, summed (sigmoid,sft: DPO plus the chosen replies' NLL) "
                                            f"{config('loss_type')}")
    parser.add_argument("--early_stopping_metric", choices=list(DPO_STOP_METRICS),
                        help=f"held-out metric --early_stopping_patience watches {config('early_stopping_metric')}")
    add_training_flags(parser, config)
    return parser.parse_args()


def reference_description(model_dir: Path, full: bool) -> str:
    if full:
        return "frozen copy of the starting model"
    if is_adapter(model_dir):
        return "frozen copy of the starting adapter on the shared base weights"
    return "the same model with its adapter disabled"


def main() -> int:
    args = parse_args()
    quiet_libraries()
    settings = load_settings(DPOSettings, args.config_path, args)
    model_dir = resolve_input(args.model_path)
    stage_dir = Path(args.output_dir) if args.output_dir else fine_tuning_output_dir("dpo", model_dir)
    trackers = check_trackers(args.report_to, stage_dir)
    resume_from = prepare_output(stage_dir, args.resume)
    template = settings.prompt_template or load_template_name(model_dir)
    if template != load_template_name(model_dir):
        print(f"dpo: warning: {model_dir} was fine-tuned with the {load_template_name(model_dir)!r} template, "
              f"DPO uses {template!r}")
    summary = StageSummary("dpo", model=str(model_dir), dataset=args.dataset_path, output_dir=str(stage_dir),
                           template=template, mode="full" if args.full else "lora",
                           reference=reference_description(model_dir, args.full),
                           beta=settings.beta, loss_type=settings.loss_type)

    pairs, stats = load_preference_dataset(args.dataset_path, args.max_samples, settings.seed)
    tokenizer = load_tokenizer(model_dir)
    apply_template(tokenizer, template)
    if is_adapter(model_dir):
        model, base = load_adapter_for_training(model_dir, args.attn, args.load_in_4bit), adapter_base_path(model_dir)
        if args.full:
            # peft froze the base weights under the adapter; full DPO trains every one of them.
            model, base = model.merge_and_unload().requires_grad_(True), None
    else:
        model, base = load_base_model(model_dir, args.attn, args.load_in_4bit), model_dir
    max_length = effective_max_length(settings.max_length, model)
    pairs = filter_preferences_by_length(tokenizer, pairs, max_length, settings.overlong_policy, stats)
    train, held_out = split_eval(pairs, settings.eval_fraction, settings.max_eval_samples, settings.seed)
    summary.add(data=stats.as_dict(), max_length=max_length, train_pairs=len(train), eval_pairs=len(held_out))
    print(f"dpo: {len(train)} training / {len(held_out)} held-out pairs from {args.dataset_path} ({stats.format}); "
          f"dropped {stats.dropped_identical} with chosen == rejected, {stats.skipped_empty} with an empty reply, "
          f"{stats.dropped_overlong} over {max_length} tokens; truncated {stats.truncated}")

    logger = StageLogger("dpo", stage_dir / "metrics.jsonl")
    trainer = build_dpo_trainer(
        model, tokenizer, train, held_out, settings, stage_dir / "training_state", logger,
        full=args.full, max_length=max_length, precision=resolve_precision(args.mixed_precision),
        gradient_checkpointing=args.gradient_checkpointing, report_to=trackers,
    )
    summary.add(parameters=trainable_parameters(trainer.model))
    if held_out and resume_from is None:
        before = trainer.evaluate()
        summary.add(eval_before={key: round(before[f"eval_{key}"], 4) for key in REPORTED})
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_logged = {key: logger.last("train", key) for key in REPORTED}
    summary.add(train_last_logged={k: round(v, 4) for k, v in train_logged.items() if v is not None})
    final_eval = {}
    if held_out:
        after = trainer.evaluate()
        summary.add(eval_after={key: round(after[f"eval_{key}"], 4) for key in REPORTED})
        final_eval = {f"eval_{key}": round(after[f"eval_{key}"], 4) for key in REPORTED}

    run_info = run_record("dpo", args, settings, model_dir, stats, trainer, result, template=template,
                          final_eval=final_eval)
    written = save_outputs(trainer, tokenizer, stage_dir, template, run_info, base, args.merge)
    summary.add(steps=trainer.state.global_step, train_loss=round(result.training_loss, 4),
                train_seconds=round(result.metrics["train_runtime"], 1), resumed_from=resume_from, **written)
    summary.finish(stage_dir)
    return 0


if __name__ == "__main__":
    run_main(main)
