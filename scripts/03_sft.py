#!/usr/bin/env python
"""Stage 03: supervised fine-tuning on chat data, with the loss on the assistant replies only.

LoRA by default (peft; `--full` trains every weight), trl's SFTTrainer, any supported dataset format
(see utils/chat_data.py) rendered with the chosen chat template. Writes `<output_dir>/final/` (adapter
or model, tokenizer carrying the template, template.json, run.json), `latest`, `metrics.jsonl`,
`summary.json`, and for a LoRA run (unless `--no-merge`) a plain Hugging Face model in
`<output_dir>/merged/`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from utils.chat_data import BUILTIN_SFT, load_sft_dataset, mix_in, split_eval, tokenize_sft
from utils.checkpoint import CheckpointError
from utils.cli import StageSummary, quiet_libraries, run_main
from utils.finetune import (
    RESIZED_BASE,
    HelpFormatter,
    SFTSettings,
    StageLogger,
    add_template_tokens,
    add_training_flags,
    build_sft_trainer,
    choose_template,
    config_default,
    effective_max_length,
    is_adapter,
    load_base_model,
    load_settings,
    prepare_output,
    resized_base_of,
    resolve_start,
    run_record,
    save_outputs,
    save_resized_base,
    trainable_parameters,
)
from utils.layout import fine_tuning_output_dir
from utils.model import resolve_precision
from utils.templates import apply_template
from utils.tokenizer import load_tokenizer
from utils.trackers import check_trackers

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "config" / "sft.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    config = config_default(DEFAULT_CONFIG, SFTSettings)
    parser.add_argument("--model_path", default="checkpoints/pretrain/tiny",
                        help="pretrained (or merged) checkpoint directory, a stage dir with a `latest` pointer, any "
                             "Hugging Face causal-LM directory with its tokenizer, or a Hub model id (owner/name)")
    parser.add_argument("--dataset_path", default=BUILTIN_SFT,
                        help=f"a .json/.jsonl/.parquet file (optionally .gz), a hub dataset id, or {BUILTIN_SFT}")
    parser.add_argument("--output_dir", help="stage directory; default checkpoints/sft/<preset of --model_path>")
    parser.add_argument("--config_path", default=str(DEFAULT_CONFIG),
                        help="settings file; every flag left unset takes its value from here")
    parser.add_argument("--mix_dataset", help="general-purpose SFT data to interleave into --dataset_path")
    parser.add_argument("--mix_ratio", type=float,
                        help=f"share of the final training set taken from --mix_dataset {config('mix_ratio')}")
    parser.add_argument("--packing", action="store_true", default=None,
                        help="pack several examples into each --max_length sequence (attention stays within "
                             f"each example) {config('packing')}")
    add_training_flags(parser, config)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    quiet_libraries()
    settings = load_settings(SFTSettings, args.config_path, args)
    model_dir, hub_id = resolve_start(args.model_path)
    if is_adapter(model_dir):
        raise CheckpointError(
            f"--model_path {model_dir} is a LoRA adapter; fine-tune a full model: its base, or the merged "
            "model 03_sft.py writes to <output_dir>/merged (unless --no-merge)"
        )
    if args.output_dir:
        stage_dir = Path(args.output_dir)
    else:
        stage_dir = fine_tuning_output_dir("sft", Path(hub_id.split("/")[-1]) if hub_id else model_dir)
    trackers = check_trackers(args.report_to, stage_dir)
    resume_from = prepare_output(stage_dir, args.resume)
    summary = StageSummary("sft", model=hub_id or str(model_dir), dataset=args.dataset_path,
                           output_dir=str(stage_dir), mode="full" if args.full else "lora")

    conversations, stats = load_sft_dataset(args.dataset_path, args.max_samples, settings.seed)
    if args.mix_dataset:
        general, _ = load_sft_dataset(args.mix_dataset, seed=settings.seed)
        conversations, stats.mixed_in = mix_in(conversations, general, settings.mix_ratio, settings.seed)

    base_dir, source = model_dir, model_dir
    resized = resized_base_of(stage_dir, source) if resume_from is not None and not args.full else None
    if resized is not None:
        base_dir = stage_dir / RESIZED_BASE  # the resized start the interrupted run trained its adapter on
    tokenizer = load_tokenizer(base_dir)
    template = choose_template(tokenizer, args.prompt_template, settings.prompt_template)
    model = load_base_model(base_dir, args.attn, args.load_in_4bit)
    added = add_template_tokens(tokenizer, model, template) if resized is None else resized
    if added and resized is None:
        print(f"sft: added {', '.join(tokenizer.convert_ids_to_tokens(added))} to the vocabulary "
              f"({len(tokenizer)} tokens); their embedding rows train with the model")
        if not args.full:
            base_dir = stage_dir / RESIZED_BASE
            save_resized_base(model, tokenizer, base_dir, source, added)
    loss_on = apply_template(tokenizer, template)
    if loss_on == "all":
        print(f"note: the chat template of {source} marks no assistant replies ({{% generation %}} blocks) and trl "
              "has no training version of it, so the loss covers every token of each conversation")
    summary.add(template=template, loss_on="assistant replies" if loss_on == "assistant" else "all tokens",
                added_tokens=tokenizer.convert_ids_to_tokens(added))
    max_length = effective_max_length(settings.max_length, model)
    examples = tokenize_sft(tokenizer, conversations, max_length, settings.overlong_policy, stats)
    train, held_out = split_eval(examples, settings.eval_fraction, settings.max_eval_samples, settings.seed)
    summary.add(data=stats.as_dict(), max_length=max_length, train_examples=len(train), eval_examples=len(held_out))
    print(f"sft: {len(train)} training / {len(held_out)} held-out examples from {args.dataset_path} "
          f"({stats.format}); skipped {stats.skipped_empty} empty, truncated {stats.truncated}, "
          f"dropped {stats.dropped_overlong} over {max_length} tokens")

    logger = StageLogger("sft", stage_dir / "metrics.jsonl")
    trainer = build_sft_trainer(
        model, tokenizer, train, held_out, settings, stage_dir / "training_state", logger,
        full=args.full, max_length=max_length, precision=resolve_precision(args.mixed_precision),
        gradient_checkpointing=args.gradient_checkpointing, report_to=trackers, new_token_ids=added,
    )
    summary.add(parameters=trainable_parameters(trainer.model))
    if held_out and resume_from is None:
        summary.add(eval_loss_before=round(trainer.evaluate()["eval_loss"], 4))
    result = trainer.train(resume_from_checkpoint=resume_from)
    final_eval = {"eval_loss": round(trainer.evaluate()["eval_loss"], 4)} if held_out else {}
    if held_out:
        summary.add(eval_loss_after=final_eval["eval_loss"])

    run_info = run_record("sft", args, settings, model_dir, stats, trainer, result, final_eval=final_eval,
                          template=template, hub_model=hub_id)
    written = save_outputs(trainer, tokenizer, stage_dir, template, run_info, base_dir, args.merge)
    summary.add(steps=trainer.state.global_step, train_loss=round(result.training_loss, 4),
                train_seconds=round(result.metrics["train_runtime"], 1),
                resumed_from=resume_from, **written)
    summary.finish(stage_dir)
    return 0


if __name__ == "__main__":
    run_main(main)
