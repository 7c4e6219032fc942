"""Builds transformers models from presets, and the device / precision / attention choices around them."""

from __future__ import annotations

import importlib.util
import timeit
from dataclasses import dataclass

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3Config,
)

from utils.config import ModelPreset

ATTN_CHOICES = ("auto", "sdpa", "flash_attention_2", "eager")
PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")
# A CPU trains in bf16 when its bf16 matrix products run at least this much faster than fp32 ones. CPUs with
# bf16 units (AVX-512 BF16, AMX) run them ~5x faster; CPUs without emulate them up to ~100x slower.
CPU_BF16_MIN_SPEEDUP = 1.5
# Training on a CPU in bf16, SDPA's fused CPU kernel is slower than transformers' eager attention (two matmuls and
# an fp32 softmax) up to this sequence length: the tiny preset's step ran 1.13x faster at 256, 1.09x at 512 and
# 0.76x at 1,024 (in fp32, 0.96x at 256).
CPU_BF16_EAGER_MAX_LENGTH = 512


def model_config(preset: ModelPreset, tokenizer: PreTrainedTokenizerBase | None = None) -> PretrainedConfig:
    """The transformers config for `preset`; the vocabulary and special ids come from the tokenizer."""
    vocab_size = len(tokenizer) if tokenizer is not None else preset.vocab_size
    special = {}
    if tokenizer is not None:
        special = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    common = dict(
        vocab_size=vocab_size,
        hidden_size=preset.d_model,
        intermediate_size=preset.d_ff,
        num_hidden_layers=preset.n_layer,
        num_attention_heads=preset.n_head,
        num_key_value_heads=preset.kv_heads,
        max_position_embeddings=preset.sequence_length,
        attention_dropout=preset.dropout,
        rms_norm_eps=preset.rms_norm_eps,
        initializer_range=preset.initializer_range,
        tie_word_embeddings=preset.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta},
        **special,
    )
    if preset.is_moe:
        return MixtralConfig(
            num_local_experts=preset.n_experts,
            num_experts_per_tok=preset.experts_per_token,
            router_aux_loss_coef=preset.router_aux_loss_coef,
            output_router_logits=True,
            **common,
        )
    if preset.qk_norm:
        # Qwen3 is Llama plus an RMSNorm on each head's queries and keys: transformers, vLLM and llama.cpp's
        # converter all know the class.
        return Qwen3Config(head_dim=preset.d_model // preset.n_head, attention_bias=False, use_sliding_window=False,
                           **common)
    return LlamaConfig(mlp_bias=False, attention_bias=False, **common)


# The projections that write into the residual stream: attention output and MLP down (dense or expert bank).
RESIDUAL_OUTPUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight", "mlp.experts.down_proj")


@torch.no_grad()
def zero_residual_outputs(model: PreTrainedModel) -> None:
    """Zero-initialises every block's output projections, so each block starts as the identity."""
    for name, parameter in model.named_parameters():
        if name.endswith(RESIDUAL_OUTPUTS):
            parameter.zero_()


def build_model(
    preset: ModelPreset,
    tokenizer: PreTrainedTokenizerBase | None = None,
    attn_implementation: str = "sdpa",
    seed: int | None = None,
) -> PreTrainedModel:
    """A freshly initialised causal LM for `preset` (Llama, Qwen3 with qk_norm, Mixtral for MoE), in fp32."""
    if seed is not None:
        torch.manual_seed(seed)
    config = model_config(preset, tokenizer)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    if preset.zero_init_projections:
        zero_residual_outputs(model)
    return model


@dataclass(frozen=True)
class ParameterCount:
    total: int
    embedding: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    def describe(self) -> str:
        return f"{self.total / 1e6:.2f} M parameters ({self.non_embedding / 1e6:.2f} M without embeddings)"


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    """Unique parameters (tied weights counted once); embedding = input embeddings plus an untied LM head."""
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    embedding_params = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight}
    head = model.get_output_embeddings()
    if head is not None:
        embedding_params[id(head.weight)] = head.weight
    return ParameterCount(total=total, embedding=sum(p.numel() for p in embedding_params.values()))


def cxx_compiler_available() -> bool:
    """Whether inductor (torch.compile's backend) finds the C++ compiler it builds its CPU kernels with: g++
    (or $CXX) on Linux, clang++ on macOS. A laptop may have none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - any failure of the lookup means inductor could not compile either
        return False
    return True


def flash_attention_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_attention(choice: str, device_type: str | None = None, precision: str = "no",
                      sequence_length: int = 0) -> str:
    """`auto` picks flash-attn 2 when installed and usable on this GPU; transformers' eager attention for training
    on a CPU in bf16 at sequences up to CPU_BF16_EAGER_MAX_LENGTH; else PyTorch SDPA."""
    if choice not in ATTN_CHOICES:
        raise ValueError(f"--attn must be one of {ATTN_CHOICES}, got {choice!r}")
    if choice == "flash_attention_2" and not flash_attention_available():
        raise ValueError("--attn flash_attention_2 needs a CUDA GPU and the flash-attn package (make install-gpu)")
    if choice != "auto":
        return choice
    if flash_attention_available() and torch.cuda.get_device_capability()[0] >= 8:
        return "flash_attention_2"
    if device_type == "cpu" and precision == "bf16" and 0 < sequence_length <= CPU_BF16_EAGER_MAX_LENGTH:
        return "eager"
    return "sdpa"


def resolve_precision(choice: str) -> str:
    """`auto` = bf16 on a GPU that supports it, fp16 on an older GPU, fp32 ("no") on Apple's MPS; on a CPU, bf16
    where its bf16 matrix products are fast, else fp32."""
    if choice not in PRECISION_CHOICES:
        raise ValueError(f"--mixed_precision must be one of {PRECISION_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if torch.backends.mps.is_available():
        return "no"
    return "bf16" if cpu_bf16_is_fast() else "no"


_cpu_bf16_fast: list[bool] = []  # this process's answer, once timed or taken from the main process


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU multiplies bf16 matrices at least CPU_BF16_MIN_SPEEDUP times faster than fp32 ones. Timed
    once per process on a product of the tiny preset's size (~1 ms in fp32): torch's checks of the instruction sets
    are private and x86-only, and what matters is the speed oneDNN gets from them."""
    def best_seconds(dtype: torch.dtype) -> float:
        left, right = torch.randn(256, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        left @ right  # the first product also picks and prepares the kernel
        return min(timeit.repeat(lambda: left @ right, number=1, repeat=3))

    if not _cpu_bf16_fast:
        _cpu_bf16_fast.append(best_seconds(torch.float32) >= CPU_BF16_MIN_SPEEDUP * best_seconds(torch.bfloat16))
    return _cpu_bf16_fast[0]


def share_cpu_bf16_answer() -> None:
    """Several CPU processes of one run take the main process's answer: each timing its own, while the others load
    the same cores, could pick another precision (and Muon iteration), and the processes would train apart."""
    answer = [cpu_bf16_is_fast() if PartialState(cpu=True).is_main_process else None]
    broadcast_object_list(answer)
    _cpu_bf16_fast[:] = answer


def inference_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (half precision is far slower there), bf16/fp16 on GPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
