"""Loading a checkpoint for inference: `load_for_inference` and the `LoadedModel` it returns.

Any checkpoint `utils.checkpoint` resolves loads: pretrain, merged, DPO, or a LoRA adapter on its base (merged
in memory for decode speed). Generation, serving, evaluation and the report use what this returns: the model
in eval mode, its tokenizer, and the fine-tuning template it is prompted with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from utils.checkpoint import load_model, resolve_checkpoint
from utils.layout import display_name
from utils.model import default_device, inference_dtype
from utils.templates import TEMPLATE_FILE, load_template_name


@dataclass
class LoadedModel:
    """A model ready for generation, and what serving needs to know about its checkpoint."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    template: str | None  # the fine-tuning template; None for a base checkpoint (plain completion)
    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return display_name(self.path)


def load_for_inference(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> LoadedModel:
    """Loads a pretrain, merged or adapter checkpoint (LoRA merged into its base for speed), device/dtype auto."""
    resolved = resolve_checkpoint(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or inference_dtype(device)
    model, tokenizer = load_model(resolved, device, dtype)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    template = load_template_name(resolved) if Path(resolved, TEMPLATE_FILE).is_file() else None
    return LoadedModel(model.eval(), tokenizer, Path(resolved), template, device, dtype)
