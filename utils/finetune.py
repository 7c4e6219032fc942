"""What 03_sft and 04_dpo share: settings files, input checkpoints, LoRA, trl trainers, logging and saving.

Both stages train with trl (SFTTrainer, DPOTrainer) on a Hugging Face model loaded from a pipeline
checkpoint, log every trainer log to `metrics.jsonl` with a progress bar, and write their result as a
checkpoint directory (`final/`, and for LoRA unless `--no-merge` also `merged/`) plus a `latest` pointer in the
stage directory.
The trainer's own resumable checkpoints (weights, optimizer, scheduler, RNG, data position) live in
`<stage dir>/training_state/`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from utils.chat_data import OVERLONG_POLICIES, PreferencePair, TokenizedExample
from utils.checkpoint import (
    ADAPTER_BASE_KEY,
    ADAPTER_CONFIG,
    CheckpointError,
    adapter_base_path,
    check_readable,
    describe_missing,
    resolve_checkpoint,
    update_latest,
)
from utils.cli import git_commit, progress
from utils.config import ConfigError, from_dict, load_json
from utils.files import (
    UnreadableFileError,
    atomic_directory,
    atomic_write_json,
    read_json,
    recover_interrupted_writes,
    sha256_file,
)
from utils.gpu import check_4bit_loading, load_4bit_for_training
from utils.layout import FINAL, MERGED, STATE_DIR
from utils.metrics import MetricsLogger, memory_mb
from utils.model import resolve_attention
from utils.model_card import write_model_card
from utils.templates import NATIVE, TEMPLATES, inference_template, native_chat_template, save_template_name
from utils.tokenizer import CHAT_TOKENS, save_tokenizer
from utils.trackers import CHOICES as TRACKER_CHOICES

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESIZED_BASE = "base"  # a LoRA run that added tokens: the starting model with its embeddings resized
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# safetensors only: pickled .bin weights are never fetched or loaded
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
DPO_STOP_METRICS = {"eval_loss": False, "eval_rewards/accuracies": True}  # metric -> greater is better
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft")  # trl 1.16's


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))

    def validate(self, source: str) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ConfigError(f"{source}: LoRA fields 'r' and 'alpha' must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{source}: LoRA field 'dropout' must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError(f"{source}: LoRA field 'target_modules' must name at least one module")


@dataclass(frozen=True)
class TrainSettings:
    """Settings 03_sft and 04_dpo share; `config/sft.json` / `config/dpo.json` set them, flags override."""

    prompt_template: str = "chatml"
    max_length: int = 512
    overlong_policy: str = "truncate"
    learning_rate: float = 2e-4
    full_learning_rate: float = 2e-5
    num_train_epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.05
    max_eval_samples: int = 200
    eval_steps: int = 50
    save_steps: int = 50
    logging_steps: int = 10
    early_stopping_patience: int = 0
    seed: int = 42
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self, source: str) -> None:
        if self.prompt_template is not None and self.prompt_template not in TEMPLATES:
            raise ConfigError(
                f"{source}: unknown prompt template {self.prompt_template!r}; valid templates: {', '.join(TEMPLATES)}"
            )
        if self.overlong_policy not in OVERLONG_POLICIES:
            raise ConfigError(f"{source}: field 'overlong_policy' must be one of {OVERLONG_POLICIES}")
        positive = ["max_length", "learning_rate", "full_learning_rate", "batch_size", "gradient_accumulation_steps",
                    "eval_steps", "save_steps", "logging_steps", "max_eval_samples"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{source}: field '{name}' must be positive, got {getattr(self, name)!r}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError(f"{source}: set a positive 'max_steps' or 'num_train_epochs'")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"{source}: field 'eval_fraction' must be in [0, 1), got {self.eval_fraction}")
        if self.early_stopping_patience < 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{source}: 'early_stopping_patience' must be >= 0 and 'warmup_ratio' in [0, 1)")
        self.lora.validate(source)

    def lr(self, full: bool) -> float:
        return self.full_learning_rate if full else self.learning_rate


@dataclass(frozen=True)
class SFTSettings(TrainSettings):
    packing: bool = False
    mix_ratio: float = 0.3


@dataclass(frozen=True)
class DPOSettings(TrainSettings):
    prompt_template: str | None = None  # None: the template the input checkpoint was fine-tuned with
    learning_rate: float = 5e-7
    full_learning_rate: float = 5e-7
    beta: float = 0.1
    loss_type: str = "sigmoid"
    early_stopping_metric: str = "eval_loss"

    @property
    def loss_types(self) -> list[str]:
        return [name.strip() for name in self.loss_type.split(",") if name.strip()]

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.beta <= 0:
            raise ConfigError(f"{source}: field 'beta' must be positive, got {self.beta}")
        unknown = [name for name in self.loss_types if name not in DPO_LOSS_TYPES]
        if unknown or not self.loss_types:
            raise ConfigError(
                f"{source}: field 'loss_type' must be one of {', '.join(DPO_LOSS_TYPES)}, or several joined by "
                f"commas (summed with equal weights, e.g. sigmoid,sft); got {self.loss_type!r}"
            )
        if self.early_stopping_metric not in DPO_STOP_METRICS:
            raise ConfigError(f"{source}: field 'early_stopping_metric' must be one of {list(DPO_STOP_METRICS)}")


# ---------------------------------------------------------------- settings and flags


LORA_FLAGS = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_target_modules": "target_modules"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults; flags whose default lives in the config file say so in their own help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def config_default(config_path: str | Path, settings_cls: type) -> Callable[[str], str]:
    """`(config: VALUE)` for a field of the default config file, for --help (the class default if unreadable)."""
    try:
        values = dataclasses.asdict(from_dict(settings_cls, load_json(config_path), str(config_path)))
    except (ConfigError, UnreadableFileError):
        values = dataclasses.asdict(settings_cls())

    def show(key: str) -> str:
        value = values["lora"][key[5:]] if key.startswith("lora.") else values[key]
        if value is None:
            return "(config: unset, so the input checkpoint's template.json)"
        return f"(config: {','.join(value) if isinstance(value, list) else value})"

    return show


def add_training_flags(parser: argparse.ArgumentParser, config: Callable[[str], str]) -> None:
    """Flags every fine-tuning stage has; one left unset keeps the config file's value (`config` shows it)."""
    add = parser.add_argument
    add("--prompt_template", choices=list(TEMPLATES), help=f"chat template {config('prompt_template')}")
    add("--max_length", type=int, help=f"max tokens per example, capped at the model's context {config('max_length')}")
    add("--overlong_policy", choices=OVERLONG_POLICIES,
        help="examples longer than --max_length: truncate (keep the start; dropped if no reply token is left) or "
             f"drop; counted either way {config('overlong_policy')}")
    add("--learning_rate", type=float,
        help=f"peak learning rate {config('learning_rate')}; with --full {config('full_learning_rate')}")
    add("--num_train_epochs", type=float, help=f"passes over the training set {config('num_train_epochs')}")
    add("--max_steps", type=int, help=f"optimizer steps; overrides epochs when > 0 {config('max_steps')}")
    add("--batch_size", type=int, help=f"examples per device per micro-batch {config('batch_size')}")
    add("--gradient_accumulation_steps", type=int,
        help=f"micro-batches per optimizer step {config('gradient_accumulation_steps')}")
    add("--warmup_ratio", type=float, help=f"share of the steps with linear warm-up {config('warmup_ratio')}")
    add("--lr_scheduler_type", help=f"transformers scheduler: cosine, linear, ... {config('lr_scheduler_type')}")
    add("--weight_decay", type=float, help=f"AdamW weight decay {config('weight_decay')}")
    add("--eval_fraction", type=float, help=f"share of examples held out, 0 = none {config('eval_fraction')}")
    add("--max_eval_samples", type=int, help=f"cap on held-out examples {config('max_eval_samples')}")
    add("--eval_steps", type=int, help=f"evaluate every N steps {config('eval_steps')}")
    add("--save_steps", type=int, help=f"save a resumable checkpoint every N steps {config('save_steps')}")
    add("--logging_steps", type=int, help=f"log to metrics.jsonl every N steps {config('logging_steps')}")
    add("--early_stopping_patience", type=int,
        help="stop after N evaluations without improvement, keeping the best; 0 = off "
             f"{config('early_stopping_patience')}")
    add("--seed", type=int, help=f"seed of data order, splits, sampling and LoRA init {config('seed')}")
    add("--lora_r", type=int, help=f"LoRA rank {config('lora.r')}")
    add("--lora_alpha", type=int, help=f"LoRA alpha {config('lora.alpha')}")
    add("--lora_dropout", type=float, help=f"LoRA dropout {config('lora.dropout')}")
    add("--lora_target_modules", type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
        help=f"comma-separated names of the linear layers to adapt {config('lora.target_modules')}")
    add("--full", action="store_true", help="fine-tune all weights instead of a LoRA adapter")
    add("--load_in_4bit", action="store_true",
        help="QLoRA: load the model's linear layers in 4-bit NF4 (bitsandbytes, double quantization, bf16 compute, "
             "gradient checkpointing) and train a LoRA adapter on them; a CUDA GPU only")
    add("--merge", action=argparse.BooleanOptionalAction,
        help="LoRA runs also write merged/: the adapter folded into its base, a plain transformers model every "
             "tool loads as it is (llama.cpp's converter, export_gguf.py, vLLM); on by default except with "
             "--load_in_4bit; --no-merge writes the adapter only. --full writes a full model to final/ either way")
    add("--max_samples", type=int, help="use at most N examples of the dataset (sampled with --seed)")
    add("--resume", action="store_true", help=f"continue from the last checkpoint in <output_dir>/{STATE_DIR}/")
    add("--mixed_precision", default="auto", choices=("auto", "no", "fp16", "bf16"),
        help="auto = bf16 on GPUs that support it, fp16 on older GPUs; on a CPU, bf16 where its bf16 matrix "
             "products are fast (AVX-512 BF16, AMX), else fp32")
    add("--attn", default="auto", choices=("auto", "sdpa", "flash_attention_2", "eager"),
        help="attention implementation; auto = flash-attn 2 when installed on a recent GPU, else SDPA")
    add("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    add("--report_to", default="none",
        help=f"experiment tracker: {', '.join(TRACKER_CHOICES)}, or several joined by commas; each needs its "
             "package (pip install tensorboard / wandb / trackio / mlflow); wandb runs offline without "
             "WANDB_API_KEY; TensorBoard events go to <output_dir>/runs/")


def load_settings(cls: type, config_path: str | Path, args: argparse.Namespace):
    """The config file's settings with every flag that was given applied on top, validated once."""
    data = load_json(config_path)
    settings = from_dict(cls, data, str(config_path))
    names = {f.name for f in dataclasses.fields(cls)} - {"lora", "full_learning_rate"}
    changes = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if getattr(args, "learning_rate", None) is not None:
        changes["full_learning_rate"] = args.learning_rate
    lora = {key: getattr(args, flag) for flag, key in LORA_FLAGS.items() if getattr(args, flag, None) is not None}
    updated = dataclasses.replace(settings, **changes, lora=dataclasses.replace(settings.lora, **lora))
    updated.validate(f"{config_path} with command-line flags")
    check_4bit_flags(args)
    if getattr(args, "merge", False) is None:
        # a 4-bit base has no full-precision weights to fold the adapter into
        args.merge = not getattr(args, "load_in_4bit", False)
    return updated


def check_4bit_flags(args: argparse.Namespace) -> None:
    """`--load_in_4bit` trains a LoRA adapter on frozen 4-bit weights, on a CUDA GPU with bitsandbytes."""
    if not getattr(args, "load_in_4bit", False):
        return
    if getattr(args, "full", False):
        raise ConfigError(
            "--load_in_4bit cannot be combined with --full: 4-bit weights are frozen quantized constants and cannot "
            "be fully fine-tuned; drop --full to train a LoRA adapter on the 4-bit model (QLoRA), or drop "
            "--load_in_4bit to train every weight in full precision"
        )
    if getattr(args, "merge", False):
        raise ConfigError(
            "--load_in_4bit cannot be combined with --merge: folding the adapter into 4-bit weights would round it "
            "away; drop --merge (with --load_in_4bit the default is --no-merge: final/ holds the adapter on its "
            "full-precision base, which 05_evaluate and 06_serve load and merge in memory)"
        )
    check_4bit_loading()


# ---------------------------------------------------------------- input checkpoints and outputs


def resolve_input(path: str | Path) -> Path:
    """The checkpoint directory `path` names (following `latest`); an error says what is missing otherwise."""
    directory = resolve_checkpoint(path)
    problem = describe_missing(directory)
    if problem:
        raise CheckpointError(f"--model_path: {problem}")
    return directory


def is_adapter(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).is_file()


def download_model(hub_id: str) -> Path:
    """A Hugging Face Hub model's files in the local cache (fetched when online); one error paragraph otherwise."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, allow_patterns=HUB_FILES))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, gated, network: all the same advice
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"--model_path {hub_id!r} is not a local directory, and the Hugging Face Hub model of that name could "
            f"not be fetched ({type(err).__name__}: {cause}). "
            + ("HF_HUB_OFFLINE is set, so only models already in the local Hugging Face cache are found. "
               if offline else "")
            + "Pass a local checkpoint directory (a pipeline checkpoint, or any directory save_pretrained wrote with "
              "its tokenizer), or check the id and the network (gated models also need `hf auth login`)."
        ) from None


def resolve_start(spec: str | Path) -> tuple[Path, str | None]:
    """What 03_sft starts from: a pipeline checkpoint (following `latest`), any local Hugging Face causal-LM
    directory with safetensors weights and its tokenizer, or a Hub model id (`owner/name`, fetched into the
    cache). Returns the local directory and the Hub id (None for a local path)."""
    spec = str(spec)
    if not Path(spec).exists() and HUB_ID.fullmatch(spec):
        return resolve_input(download_model(spec)), spec
    return resolve_input(spec), None


def prepare_output(stage_dir: Path, resume: bool) -> str | None:
    """For --resume the trainer checkpoint to continue from; otherwise clears the previous run's state and log."""
    from transformers.trainer_utils import get_last_checkpoint

    for note in recover_interrupted_writes(stage_dir):
        print(f"note: {note}")
    state_dir = stage_dir / STATE_DIR
    if resume:
        last = get_last_checkpoint(state_dir) if state_dir.is_dir() else None
        if last is None:
            raise CheckpointError(f"--resume: no training checkpoint in {state_dir} (saved every --save_steps steps)")
        return last
    shutil.rmtree(state_dir, ignore_errors=True)
    (stage_dir / "metrics.jsonl").unlink(missing_ok=True)
    return None


def load_base_model(directory: Path, attn: str = "auto", load_in_4bit: bool = False) -> PreTrainedModel:
    """A full (non-adapter) checkpoint in fp32 for training (the trainer's autocast handles bf16/fp16), or with
    `load_in_4bit` its linear layers in NF4 on the GPU for QLoRA."""
    check_readable(directory)
    if load_in_4bit:
        return load_4bit_for_training(directory, resolve_attention(attn))
    return AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation=resolve_attention(attn)
    )


def load_adapter_for_training(adapter_dir: Path, attn: str = "auto", load_in_4bit: bool = False):
    """A LoRA checkpoint on its base (in NF4 with `load_in_4bit`) with the adapter trainable, to train it on."""
    from peft import PeftModel

    check_readable(adapter_dir)
    base_dir = adapter_base_path(adapter_dir)
    return PeftModel.from_pretrained(load_base_model(base_dir, attn, load_in_4bit), adapter_dir, is_trainable=True)


def effective_max_length(requested: int, model: PreTrainedModel) -> int:
    """Examples cannot be longer than the positions the model was trained for."""
    return min(requested, model.config.get_text_config().max_position_embeddings)


def _module_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None) if module is not None else None


def lora_config(settings: LoraSettings, model: PreTrainedModel, new_token_ids: list[int] | None = None):
    """peft LoraConfig on the target modules this model has (MoE experts, for one, have no gate/up/down_proj).

    The default target list names the Llama-style projections; a model with none of them (GPT-2's c_attn/c_fc,
    say) gets peft's `all-linear` instead. With `new_token_ids` (tokens 03_sft added, e.g. ChatML's) the input
    embeddings (and the output layer, when not tied to them) train in full and are saved in the adapter
    (peft's modules_to_save), so the new rows are learnt and the adapter and merged model agree."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
               if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output}
    targets: list[str] | str = [name for name in settings.target_modules if name in present]
    if not targets:
        if list(settings.target_modules) != DEFAULT_TARGET_MODULES:
            raise ConfigError(
                f"none of the LoRA target modules {settings.target_modules} exist in this model; "
                f"its linear layers are: {sorted(present)}"
            )
        targets = "all-linear"
        print(f"note: this {model.config.model_type} model has none of the default LoRA targets "
              f"({','.join(DEFAULT_TARGET_MODULES)}); adapting all its linear layers ({','.join(sorted(present))})")
    # peft's trainable_token_indices would train just the new rows, but trl 1.16's fused LM head reads
    # `lm_head.bias`, which peft's token wrapper lacks; whole-matrix copies (modules_to_save) work with it
    modules_to_save, tied = None, False
    if new_token_ids:
        modules_to_save = [_module_name(model, model.get_input_embeddings())]
        tied = output is not None and output.weight is model.get_input_embeddings().weight
        if output is not None and not tied:
            modules_to_save.append(_module_name(model, output))
    return LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=targets, bias="none", task_type="CAUSAL_LM", modules_to_save=modules_to_save,
        ensure_weight_tying=tied,
    )


# ---------------------------------------------------------------- chat templates of foreign models


def choose_template(tokenizer: PreTrainedTokenizerBase, requested: str | None, configured: str) -> str:
    """The template 03_sft trains with: `--prompt_template` when given; else the tokenizer's own chat template
    when it has one that is not ours (a foreign model keeps its format: `native`); else the config's."""
    own = native_chat_template(tokenizer)
    if requested is None and own is not None:
        return NATIVE
    if requested is not None and own is not None:
        print(f"note: --prompt_template {requested} replaces the model's own chat template")
    return requested or configured


def add_template_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, template: str) -> list[int]:
    """Makes the tokenizer and model able to express `template`: ChatML's `<|im_start|>`/`<|im_end|>` are added
    as special tokens when missing (the embeddings resized to match), a missing pad token becomes EOS, and
    generation also stops at `<|im_end|>`. Returns the ids of the added tokens."""
    vocab = tokenizer.get_vocab()
    if template in ("instruct", "chat") and tokenizer.eos_token is None:
        raise ConfigError(f"the {template!r} template ends each reply with the EOS token, and this tokenizer has "
                          "none; use --prompt_template chatml (its tokens are added to the vocabulary)")
    missing = [token for token in CHAT_TOKENS if token not in vocab] if template == "chatml" else []
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    added = [tokenizer.convert_tokens_to_ids(token) for token in missing]
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or CHAT_TOKENS[1]
    if template == "chatml":
        end = tokenizer.convert_tokens_to_ids(CHAT_TOKENS[1])
        current = model.generation_config.eos_token_id
        current = [] if current is None else [current] if isinstance(current, int) else list(current)
        model.generation_config.eos_token_id = sorted({*current, end, *([tokenizer.eos_token_id]
                                                                        if tokenizer.eos_token_id is not None else [])})
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return added


def resized_base_of(stage_dir: Path, source: Path) -> list[int] | None:
    """The token ids `<stage_dir>/base/` added to `source`, when that resized base was made from `source`."""
    run_file = stage_dir / RESIZED_BASE / "run.json"
    if not run_file.is_file():
        return None
    info = read_json(run_file, "checkpoint file")
    if info.get("resized_from") != str(source.resolve()):
        return None
    return list(info.get("added_token_ids") or [])


def save_resized_base(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path,
                      source: Path, added: list[int]) -> None:
    """The starting model with its added token rows, before training: the base a LoRA adapter that trained those
    rows loads on (the original model lacks them). Written atomically, like every checkpoint."""
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp, None)
        atomic_write_json(tmp / "run.json", {
            "stage": "sft-base", "resized_from": str(source.resolve()), "added_token_ids": added,
            "added_tokens": tokenizer.convert_ids_to_tokens(added), "git_commit": git_commit(),
        })


def trainable_parameters(model: torch.nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------- trainers


def _common_arguments(
    settings: TrainSettings, output_dir: Path, full: bool, has_eval: bool, precision: str,
    gradient_checkpointing: bool, report_to: str | list[str], stop_metric: str, greater_is_better: bool,
) -> dict[str, Any]:
    if settings.early_stopping_patience and not has_eval:
        raise ConfigError("--early_stopping_patience needs held-out data: set --eval_fraction > 0")
    stopping = settings.early_stopping_patience > 0
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.lr(full),
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps,
        lr_scheduler_type=settings.lr_scheduler_type,
        warmup_steps=settings.warmup_ratio,  # a float < 1 is a ratio of all steps
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=settings.eval_steps,
        save_strategy="steps",
        # load_best_model_at_end needs a checkpoint at every evaluation
        save_steps=settings.eval_steps if stopping else settings.save_steps,
        save_total_limit=1,
        load_best_model_at_end=stopping,
        metric_for_best_model=stop_metric if stopping else None,
        greater_is_better=greater_is_better if stopping else None,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # Without it transformers refuses bf16 on a machine with no GPU.
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        activation_checkpointing=gradient_checkpointing,
        report_to=report_to or "none",
        run_name=output_dir.parent.name,
        project="mini-llm",  # trackio's project
        disable_tqdm=True,  # StageLogger draws the progress bar
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def _callbacks(settings: TrainSettings, logger: TrainerCallback) -> list[TrainerCallback]:
    from transformers import EarlyStoppingCallback

    callbacks = [logger]
    if settings.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience))
    return callbacks


def _quiet(trainer) -> None:
    """The trainer prints every log dict when tqdm is off; StageLogger already shows them. TensorBoard events go to
    `<stage dir>/runs/<date>_<host>/` (the trainer's default is inside training_state/, which a new run clears)."""
    from transformers.integrations.integration_utils import TensorBoardCallback, default_logdir
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and not os.environ.get("TENSORBOARD_LOGGING_DIR"):
            callback.logging_dir = str(Path(trainer.args.output_dir).parent / default_logdir())


def build_sft_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: list[TokenizedExample],
    held_out: list[TokenizedExample],
    settings: SFTSettings,
    output_dir: Path,
    logger: TrainerCallback,
    *,
    full: bool = False,
    max_length: int,
    precision: str = "no",
    gradient_checkpointing: bool = False,
    report_to: str | list[str] = "none",
    new_token_ids: list[int] | None = None,
):
    """trl's SFTTrainer on pre-tokenized examples whose labels already mask everything but the replies;
    `new_token_ids`: tokens added to the vocabulary, whose rows a LoRA run also trains."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    def as_dataset(examples: list[TokenizedExample]) -> Dataset:
        return Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})

    config = SFTConfig(
        **_common_arguments(settings, output_dir, full, bool(held_out), precision, gradient_checkpointing,
                            report_to, "eval_loss", False),
        max_length=max_length,
        packing=settings.packing,
        packing_strategy="bfd",
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=as_dataset(train),
        eval_dataset=as_dataset(held_out) if held_out else None,
        processing_class=tokenizer,
        peft_config=None if full else lora_config(settings.lora, model, new_token_ids),
        callbacks=_callbacks(settings, logger),
    )
    _quiet(trainer)
    return trainer


def build_dpo_trainer(
    model,
    tokenizer: PreTrainedTokenizerBase,
    train: list[PreferencePair],
    held_out: list[PreferencePair],
    settings: DPOSettings,
    output_dir: Path,
    logger: TrainerCallback,
    *,
    full: bool = False,
    max_length: int,
    precision: str = "no",
    gradient_checkpointing: bool = False,
    report_to: str | list[str] = "none",
):
    """trl's DPOTrainer. References: a LoRA adapter being continued is compared with a frozen copy of its own
    starting weights (the SFT policy, a few MB); a fresh adapter with the model with adapters disabled; full
    fine-tuning with a frozen copy of the starting model."""
    from accelerate.utils import is_peft_model
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    def as_dataset(pairs: list[PreferencePair]) -> Dataset:
        return Dataset.from_list([pair.as_record() for pair in pairs])

    config = DPOConfig(
        **_common_arguments(settings, output_dir, full, bool(held_out), precision, gradient_checkpointing,
                            report_to, settings.early_stopping_metric,
                            DPO_STOP_METRICS[settings.early_stopping_metric]),
        max_length=max_length,
        beta=settings.beta,
        loss_type=settings.loss_types,
    )
    ref_model = None
    if full:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=as_dataset(train),
        eval_dataset=as_dataset(held_out) if held_out else None,
        processing_class=tokenizer,
        peft_config=None if full or is_peft_model(model) else lora_config(settings.lora, model),
        callbacks=_callbacks(settings, logger),
    )
    _quiet(trainer)
    return trainer


# ---------------------------------------------------------------- logging


RENAMED = {"learning_rate": "lr", "num_tokens": "tokens"}


class StageLogger(TrainerCallback):
    """Turns the trainer's logs into `metrics.jsonl` rows and a progress bar with ETA."""

    def __init__(self, stage: str, metrics_path: Path, device: torch.device | None = None):
        self.stage = stage
        self.metrics = MetricsLogger(metrics_path)
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.bar = None
        self.last_time, self.last_tokens = time.time(), 0.0
        self.rows: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = progress(total=state.max_steps, initial=state.global_step, desc=self.stage, unit="step")
        self.last_time = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "train_runtime" in logs:  # the end-of-training summary goes to summary.json instead
            return
        event = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        row: dict[str, Any] = {"event": event, "stage": self.stage, "step": state.global_step,
                               "epoch": round(state.epoch or 0.0, 4)}
        row.update({RENAMED.get(key, key): value for key, value in logs.items() if key != "epoch"})
        if event == "train":
            now, tokens = time.time(), float(logs.get("num_tokens", 0.0))
            if tokens > self.last_tokens and now > self.last_time:
                row["tokens_per_second"] = round((tokens - self.last_tokens) / (now - self.last_time), 1)
            self.last_time, self.last_tokens = now, tokens
            row["memory_mb"] = round(memory_mb(self.device), 1)
        self.metrics.log(row)
        self.rows.append(row)
        if self.bar is not None:
            shown = {k: v for k, v in row.items() if k in ("loss", "eval_loss", "rewards/accuracies",
                                                             "eval_rewards/accuracies", "rewards/margins")}
            self.bar.write(f"[{self.stage}] step {state.global_step} " + " ".join(
                f"{k}={v:.4g}" for k, v in shown.items() if isinstance(v, (int, float))))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def last(self, event: str, key: str) -> float | None:
        values = [row[key] for row in self.rows if row["event"] == event and key in row]
        return values[-1] if values else None


# ---------------------------------------------------------------- saving


def save_checkpoint(
    model, tokenizer: PreTrainedTokenizerBase, directory: Path, template: str, run_info: dict[str, Any],
    base_model: Path | None = None,
) -> None:
    """Writes a checkpoint atomically: the adapter or the full model, the tokenizer with the template's
    inference form as its chat template, `template.json`, `run.json`, `README.md`, `checksums.json`.

    An adapter names its base by absolute path, which peft and transformers resolve from any working
    directory, and run.json adds the path relative to the adapter for when the checkpoints tree moves
    (adapter_base_path tries both)."""
    base = base_model.resolve() if base_model is not None else None
    if base is not None:
        run_info = {**run_info, ADAPTER_BASE_KEY: os.path.relpath(base, directory.resolve())}
    with atomic_directory(directory) as tmp:
        if base is not None:
            model.save_pretrained(tmp, selected_adapters=["default"])
            config = json.loads((tmp / ADAPTER_CONFIG).read_text(encoding="utf-8"))
            config["base_model_name_or_path"] = str(base)
            atomic_write_json(tmp / ADAPTER_CONFIG, config)
        else:
            model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp, inference_template(tokenizer, template))
        save_template_name(tmp, template)
        atomic_write_json(tmp / "run.json", run_info)
        write_model_card(tmp, directory.resolve(), model, run_info, template, base)


def _preset_name(model_dir: Path) -> str | None:
    """The preset a checkpoint descends from, as its run.json records it (pretrain: the preset itself)."""
    run_file = model_dir / "run.json"
    if not run_file.is_file():
        return None
    preset = read_json(run_file, "checkpoint file").get("preset")
    return preset.get("model_name") if isinstance(preset, dict) else preset


def run_record(stage: str, args: argparse.Namespace, settings: Any, model_dir: Path, stats: Any, trainer: Any,
               result: Any, **extra: Any) -> dict[str, Any]:
    """run.json of a fine-tuning stage: what ran, from which model, on what data, with which code, how it ended."""
    dataset = Path(args.dataset_path)
    return {
        "stage": stage, "args": vars(args), "settings": dataclasses.asdict(settings), "base_model": str(model_dir),
        "preset": _preset_name(model_dir), **extra, "dataset": stats.as_dict(),
        "dataset_sha256": sha256_file(dataset) if dataset.is_file() else None,
        "git_commit": git_commit(), "metrics": result.metrics, "global_step": trainer.state.global_step,
    }


def save_outputs(
    trainer, tokenizer: PreTrainedTokenizerBase, stage_dir: Path, template: str, run_info: dict[str, Any],
    base_model: Path | None, merge: bool,
) -> dict[str, str]:
    """`final/` (adapter or full model) and the `latest` pointer; with `merge`, `merged/` next to it."""
    from accelerate.utils import is_peft_model

    model = trainer.accelerator.unwrap_model(trainer.model)
    peft = is_peft_model(model)
    save_checkpoint(model, tokenizer, stage_dir / FINAL, template, run_info, base_model if peft else None)
    update_latest(stage_dir, FINAL)
    written = {"final": str(stage_dir / FINAL)}
    if merge and peft:
        for name in [n for n in model.peft_config if n != "default"]:
            model.delete_adapter(name)
        merged = model.merge_and_unload(adapter_names=["default"])
        save_checkpoint(merged, tokenizer, stage_dir / MERGED, template, {**run_info, "merged_from": FINAL})
        written["merged"] = str(stage_dir / MERGED)
    return written
