"""GPU-only training features: FP8 matmuls for pretraining (torchao) and 4-bit QLoRA weights for fine-tuning
(bitsandbytes). Each is checked before any work starts, so a machine that cannot run it gets one clear message
instead of a kernel error minutes later."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn
from transformers import BitsAndBytesConfig, PreTrainedModel

# FP8 tensor cores arrived with Ada (8.9) and Hopper (9.0); torchao's float8 matmuls need them.
FP8_MIN_CAPABILITY = (8, 9)


class GPUFeatureError(ValueError):
    """A GPU-only feature was asked for where it cannot run; the message names the flag and the way out."""


def check_fp8_training(device: torch.device | None = None) -> None:
    """Raises unless `--fp8` can run on `device` (default: the first CUDA GPU, if any)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise GPUFeatureError(
            f"--fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper or "
            f"later), but this run is on {device.type}; drop --fp8 to train in bf16, the default on a GPU"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise GPUFeatureError(
            f"--fp8 needs a GPU with FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper or later); "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}; drop --fp8 to train in "
            "bf16, the default on a GPU"
        )
    if importlib.util.find_spec("torchao") is None:
        raise GPUFeatureError(
            "--fp8 trains through torchao's float8 recipe, and torchao is not installed: pip install torchao "
            "(or make install-gpu)"
        )


def _fp8_eligible(module: nn.Module, name: str) -> bool:
    # FP8 matmuls need both dimensions divisible by 16. The output head stays in bf16: it is tied to the input
    # embedding, and its logits are where low precision hurts the loss most.
    return (isinstance(module, nn.Linear) and name != "lm_head"
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_to_fp8_training(model: nn.Module) -> int:
    """Swaps the model's eligible linear layers for torchao's Float8Linear (weights stay fp32 parameters, so
    checkpoints stay plain Hugging Face ones); returns how many were swapped."""
    check_fp8_training(next(model.parameters()).device)
    from torchao.float8 import Float8Linear, convert_to_float8_training

    convert_to_float8_training(model, module_filter_fn=_fp8_eligible)
    return sum(isinstance(module, Float8Linear) for module in model.modules())


def check_4bit_loading() -> None:
    """Raises unless `--load_in_4bit` can run here: a CUDA GPU with bf16, and bitsandbytes installed."""
    if not torch.cuda.is_available():
        raise GPUFeatureError(
            "--load_in_4bit needs a CUDA GPU: bitsandbytes' NF4 kernels run on CUDA only, and no GPU is visible "
            "here; drop --load_in_4bit to fine-tune the full-precision model with LoRA"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise GPUFeatureError(
            "--load_in_4bit quantizes the weights through bitsandbytes, which is not installed: "
            "pip install bitsandbytes (or make install-gpu)"
        )
    if not torch.cuda.is_bf16_supported():
        raise GPUFeatureError(
            f"--load_in_4bit computes in bf16, which {torch.cuda.get_device_name()} does not support (compute "
            "capability 8.0 or newer is needed); drop --load_in_4bit"
        )


def nf4_quantization_config() -> BitsAndBytesConfig:
    """QLoRA's recipe: NF4 weights, the quantization constants quantized again (double quantization), bf16 compute."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_4bit_for_training(directory: str | Path, attn_implementation: str) -> PreTrainedModel:
    """A checkpoint's linear layers in NF4 on the current GPU, made ready for LoRA training on top of them."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    check_4bit_loading()
    model = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=nf4_quantization_config(), dtype=torch.bfloat16,
        attn_implementation=attn_implementation, device_map={"": torch.cuda.current_device()},
    )
    # Gradient checkpointing is part of the recipe: the activations, not the 4-bit weights, then dominate memory.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})
