"""Checkpoint directories: their completeness, the `latest` pointer, adapters' bases, and loading any stage's output.

A checkpoint is a Hugging Face model directory (or a peft adapter directory) plus `checksums.json`
(sha256 of every file, written last inside the temporary directory), `run.json` and, for training
stages, `training_state/`. Directories are written under a temporary name and renamed into place; the
stage's `latest` file is rewritten (atomically) only after that rename.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from utils.files import atomic_write_text, checksum_problem, read_json, reading
from utils.layout import LATEST

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ADAPTER_CONFIG = "adapter_config.json"
# run.json key of an adapter: its base checkpoint relative to the adapter directory.
ADAPTER_BASE_KEY = "adapter_base_relative"


class CheckpointError(ValueError):
    pass


def update_latest(stage_dir: str | Path, name: str) -> None:
    atomic_write_text(Path(stage_dir, LATEST), name + "\n")


def resolve_checkpoint(path: str | Path) -> Path:
    """Follows `latest`: `<dir>/latest`, or a stage dir holding a `latest` file, to the directory it names."""
    path = Path(path)
    if path.name == LATEST and not path.is_dir():
        stage_dir = path.parent
    elif (path / LATEST).is_file() and not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        stage_dir = path
    else:
        return path
    pointer = stage_dir / LATEST
    if not pointer.is_file():
        raise CheckpointError(f"no complete checkpoint in {stage_dir}: the '{LATEST}' pointer file is missing")
    return stage_dir / pointer.read_text(encoding="utf-8").strip()


def verify_checkpoint(path: str | Path) -> None:
    """Checks every file listed in `checksums.json` exists and matches; names the first one that does not."""
    problem = checksum_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {problem}")


def describe_missing(path: Path) -> str | None:
    """Why `path` is not a loadable model checkpoint, or None when it is."""
    if not path.is_dir():
        return f"{path} does not exist or is not a directory"
    if (path / ADAPTER_CONFIG).is_file():
        weights = ["adapter_model.safetensors"]
    else:
        weights = ["config.json", "model.safetensors"]
        if not (path / "model.safetensors").is_file() and (path / "model.safetensors.index.json").is_file():
            weights = ["config.json"]
    missing = [name for name in weights + ["tokenizer.json"] if not (path / name).is_file()]
    if missing:
        return f"{path} is not a checkpoint: missing {', '.join(missing)}"
    return None


def check_readable(path: Path) -> None:
    """Reads every JSON file and safetensors header a loader will open, so a damaged one is named with its cause
    (transformers would fail on it with a message that names no file, or with a traceback)."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.json")):
        read_json(file, "checkpoint file")
    for file in sorted(path.glob("*.safetensors")):
        with reading(file, "checkpoint weights"), safe_open(file, "pt") as handle:
            handle.keys()


def adapter_base_path(adapter_dir: Path) -> Path:
    """The base model of a peft adapter.

    `base_model_name_or_path` is absolute (what peft and transformers resolve from any directory); run.json's
    `adapter_base_relative` names the same base relative to the adapter, for a checkpoints tree that moved.
    Adapters written before that hold a path relative to the adapter, tried from the cwd, then from the adapter.
    """
    base = read_json(adapter_dir / ADAPTER_CONFIG, "checkpoint file")["base_model_name_or_path"]
    candidates = [Path(base)] if Path(base).is_absolute() else [Path(base), adapter_dir / base]
    run_file = adapter_dir / "run.json"
    relative = read_json(run_file, "checkpoint file").get(ADAPTER_BASE_KEY) if run_file.is_file() else None
    if relative:
        candidates.append(adapter_dir / relative)
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise CheckpointError(
        f"adapter {adapter_dir} names base model {base!r}, which is not found (tried {tried}); put the base "
        f"checkpoint back, or set base_model_name_or_path in {adapter_dir / ADAPTER_CONFIG} to where it is now"
    )


def load_model(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a pretrain, merged or DPO model, or a LoRA adapter on its base, with its tokenizer; eval mode.

    torch and transformers are imported here, not at module level, so data-only stages start fast.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from utils.tokenizer import load_tokenizer

    dtype = dtype or torch.float32
    path = resolve_checkpoint(path)
    problem = describe_missing(path)
    if problem:
        raise CheckpointError(problem)
    check_readable(path)
    tokenizer = load_tokenizer(path)
    if (path / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(adapter_base_path(path), dtype=dtype)
        model = PeftModel.from_pretrained(base, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval(), tokenizer
