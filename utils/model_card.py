"""A checkpoint's model card, `README.md`: what it is, what it was trained on and how, how it ended, how to
load it. Written by the stages' save functions inside the checkpoint's temporary directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MODEL_CARD = "README.md"
PRETRAIN_SETTINGS = ("optimizer", "learning_rate", "lr_scheduler", "warmup_steps", "batch_size",
                     "gradient_accumulation_steps", "sequence_length", "weight_decay", "max_steps", "time_budget",
                     "seed", "mixed_precision")
STAGE_LABELS = {"sft": "supervised fine-tuning (03_sft.py)", "dpo": "DPO preference alignment (04_dpo.py)"}
FINETUNE_SETTINGS = ("prompt_template", "max_steps", "num_train_epochs", "batch_size", "gradient_accumulation_steps",
                     "max_length", "beta", "loss_type", "seed")


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> str:
    kept = [(key, value) for key, value in rows if value not in (None, "", [], {})]
    return "\n".join(["| | |", "|---|---|", *(f"| {key} | {_shown(value)} |" for key, value in kept)])


def _usage(location: Path, adapter: bool, template: str | None) -> str:
    loader = ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
              if adapter else "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n")
    model_class = "AutoPeftModelForCausalLM" if adapter else "AutoModelForCausalLM"
    lines = [loader + f'path = "{location}"  # this directory',
             "tokenizer = AutoTokenizer.from_pretrained(path)",
             f"model = {model_class}.from_pretrained(path)"]
    if template is None:
        lines += ['inputs = tokenizer("The json module", return_tensors="pt")  # plain completion: no BOS, no template',
                  "output = model.generate(**inputs, max_new_tokens=40, do_sample=False)",
                  "print(tokenizer.decode(output[0], skip_special_tokens=True))"]
    else:
        lines += ['messages = [{"role": "user", "content": "What does json.dumps do?"}]',
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
                  "                                       return_dict=True)",
                  "# generation_config.json stops at </s> and at <|im_end|>",
                  "output = model.generate(**inputs, max_new_tokens=60, do_sample=False)",
                  'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
    return "```python\n" + "\n".join(lines) + "\n```"


def write_model_card(
    directory: Path, location: Path, model: torch.nn.Module, run_info: dict[str, Any], template: str | None,
    base_model: Path | None = None,
) -> None:
    """`README.md` of a checkpoint: what it is, what it was trained on and how, how it ended, how to load it.

    Written into the checkpoint's temporary directory, so checksums.json covers it; `location` is where the
    checkpoint will be (the load snippet names it).
    """
    stage = run_info.get("stage", "unknown")
    adapter = base_model is not None
    config = model.config.get_text_config()
    parameters = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in parameters)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    preset = run_info.get("preset")
    preset = preset.get("model_name") if isinstance(preset, dict) else preset
    label = STAGE_LABELS.get(stage, stage)
    if adapter:
        what = f"A LoRA adapter from {label} on the base model {base_model}; peft loads the two together."
    elif run_info.get("merged_from"):
        what = f"The LoRA adapter from {label} merged into its base: a standalone transformers model."
    elif stage == "pretrain":
        what = "A base language model pretrained from scratch: it continues plain text and has no chat template."
    else:
        what = f"A fine-tune of every weight by {label}: a standalone transformers model."
    architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    model_rows = [
        ("architecture", f"{architecture} ({config.model_type})"),
        ("parameters", f"{total:,}" + (f" ({lora:,} of them the LoRA adapter)" if adapter else "")),
        ("layers / hidden / heads (kv heads) / feed-forward",
         f"{config.num_hidden_layers} / {config.hidden_size} / {config.num_attention_heads} "
         f"({getattr(config, 'num_key_value_heads', config.num_attention_heads)}) / "
         f"{getattr(config, 'intermediate_size', None) or '?'}"),
        ("context length", config.max_position_embeddings),
        ("vocabulary", f"{config.vocab_size} (SentencePiece BPE, tokenizer.model; no BOS or EOS is added)"
         if (directory / "tokenizer.model").is_file() else f"{config.vocab_size} (the base model's tokenizer)"),
        ("tied embeddings", getattr(config, "tie_word_embeddings", None)),
        ("chat template", f"{template} (template.json; the tokenizer's chat_template)" if template
         else "none: plain completion"),
    ]
    if stage == "pretrain":
        data = run_info.get("data", {})
        args = run_info.get("args", {})
        training_rows = [("stage", "pretrain (02_pretrain.py)"), ("preset", preset),
                         ("data", data.get("path")), ("tokenizer sha256", data.get("tokenizer_sha256")),
                         ("steps", run_info.get("step")), ("tokens", run_info.get("tokens")),
                         ("saved because", run_info.get("reason")),
                         *((name, args.get(name)) for name in PRETRAIN_SETTINGS)]
        metrics = run_info.get("metrics", {})
    else:
        dataset = run_info.get("dataset", {})
        settings = run_info.get("settings", {})
        full = run_info.get("args", {}).get("full")
        lora_settings = settings.get("lora", {})
        training_rows = [
            ("stage", STAGE_LABELS.get(stage, stage)), ("preset", preset),
            ("base model", run_info.get("base_model")),
            ("data", f"{dataset.get('source')} ({dataset.get('format')}, {dataset.get('kept')} examples kept)"),
            ("data sha256", run_info.get("dataset_sha256")), ("steps", run_info.get("global_step")),
            ("mode", "full fine-tune" if full else "LoRA" + (", merged" if run_info.get("merged_from") else "")),
            ("learning_rate", settings.get("full_learning_rate" if full else "learning_rate")),
            *((name, settings.get(name)) for name in FINETUNE_SETTINGS),
            *(() if full else (("LoRA r / alpha / dropout",
                                f"{lora_settings.get('r')} / {lora_settings.get('alpha')} / "
                                f"{lora_settings.get('dropout')}"),
                               ("LoRA target modules", lora_settings.get("target_modules")))),
        ]
        metrics = {**run_info.get("metrics", {}), **run_info.get("final_eval", {})}
    metric_rows = [(key, value) for key, value in metrics.items() if isinstance(value, (int, float))]
    tags = ", ".join(dict.fromkeys(["mini-llm", stage, *(["lora"] if adapter else [])]))
    text = "\n\n".join([
        f"---\nlibrary_name: {'peft' if adapter else 'transformers'}\npipeline_tag: text-generation\n"
        f"tags: [{tags}]\n---",
        f"# {preset or 'mini-llm'} · {stage}",
        f"{what} Written by the mini-LLM pipeline (git commit {run_info.get('git_commit') or 'unknown'}).",
        "## Model", _table(model_rows),
        "## Training", _table(training_rows),
        "## Final metrics of the run", _table(metric_rows) if metric_rows else "none recorded",
        "## Usage", _usage(location, adapter, template),
        "`run.json` holds every setting of the run, `checksums.json` the sha256 of every file.",
    ])
    (directory / MODEL_CARD).write_text(text + "\n", encoding="utf-8")
