"""Typed configs: one dataclass per config kind, validated once, errors name the file and field."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from utils.files import read_json

T = TypeVar("T")

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "linear", "wsd", "constant")


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the file and the field."""


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Checks one JSON value against a dataclass field annotation; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
        origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
        return from_dict(annotation, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item_type,) = typing.get_args(annotation)[:1] or (Any,)
        return [_check_type(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is Any:
        return value
    expected = {float: (int, float), int: (int,), bool: (bool,), str: (str,)}.get(annotation)
    if expected is None:
        return value
    if isinstance(value, bool) and annotation is not bool or not isinstance(value, expected):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return float(value) if annotation is float else value


def from_dict(cls: type[T], data: dict[str, Any], source: str) -> T:
    """Builds dataclass `cls` from `data`, rejecting unknown keys and wrong types by name."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; known fields: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check_type(data[name], hints[name], f"{source}: field '{name}'")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required field '{name}'")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate:
        validate(source)
    return obj


def load_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = read_json(path, "config file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def load_config(cls: type[T], path: str | Path) -> T:
    """Loads and validates a JSON config file into dataclass `cls`."""
    return from_dict(cls, load_json(path), str(path))


def _require_positive(obj: Any, names: list[str], source: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None or value <= 0:
            raise ConfigError(f"{source}: field '{name}' must be positive, got {value!r}")


@dataclass(frozen=True)
class TrainingDefaults:
    """A preset's tuned pretraining defaults for one 24 GB GPU; script flags override them."""

    batch_size: int
    gradient_accumulation_steps: int
    sequence_length: int
    learning_rate: float
    warmup_steps: int = 0
    max_steps: int = 1000
    weight_decay: float = 0.1
    optimizer: str = "adamw"
    # Muon's own peak learning rate for the hidden matrices; learning_rate stays AdamW's for the rest.
    muon_learning_rate: float = 0.02
    lr_scheduler: str = "cosine"

    def validate(self, source: str) -> None:
        _require_positive(
            self,
            ["batch_size", "gradient_accumulation_steps", "sequence_length", "learning_rate", "max_steps",
             "muon_learning_rate"],
            source,
        )
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError(f"{source}: fields 'warmup_steps' and 'weight_decay' must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{source}: field 'optimizer' must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_scheduler not in SCHEDULES:
            raise ConfigError(f"{source}: field 'lr_scheduler' must be one of {SCHEDULES}, got {self.lr_scheduler!r}")


@dataclass(frozen=True)
class ModelPreset:
    """A Llama-style decoder (or Mixtral-style MoE when n_experts > 0) and its training defaults."""

    model_name: str
    n_layer: int
    d_model: int
    n_head: int
    d_ff: int
    vocab_size: int
    sequence_length: int
    training: TrainingDefaults
    n_kv_head: int | None = None
    dropout: float = 0.0
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    n_experts: int = 0
    experts_per_token: int = 0
    router_aux_loss_coef: float = 0.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    # RMSNorm on each head's queries and keys (the Qwen3 class: Llama plus q/k norms).
    qk_norm: bool = False
    # Attention and MLP output projections start at zero, so every block starts as the identity.
    zero_init_projections: bool = False

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def validate(self, source: str) -> None:
        _require_positive(self, ["n_layer", "d_model", "n_head", "d_ff", "vocab_size", "sequence_length"], source)
        if self.n_kv_head is not None and self.n_kv_head <= 0:
            raise ConfigError(f"{source}: field 'n_kv_head' must be positive, got {self.n_kv_head}")
        if self.d_model % self.n_head:
            raise ConfigError(
                f"{source}: field 'd_model' ({self.d_model}) must be divisible by 'n_head' ({self.n_head})"
            )
        if self.n_head % self.kv_heads:
            raise ConfigError(
                f"{source}: field 'n_head' ({self.n_head}) must be divisible by 'n_kv_head' ({self.kv_heads})"
            )
        if (self.d_model // self.n_head) % 2:
            raise ConfigError(f"{source}: head size d_model/n_head must be even for RoPE, "
                              f"got {self.d_model // self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{source}: field 'dropout' must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0:
            raise ConfigError(f"{source}: field 'rope_theta' must be positive, got {self.rope_theta}")
        if self.n_experts < 0:
            raise ConfigError(f"{source}: field 'n_experts' must be >= 0, got {self.n_experts}")
        if self.is_moe and not 1 <= self.experts_per_token <= self.n_experts:
            raise ConfigError(
                f"{source}: field 'experts_per_token' must be in [1, n_experts={self.n_experts}], "
                f"got {self.experts_per_token}"
            )
        if self.is_moe and self.qk_norm:
            raise ConfigError(
                f"{source}: field 'qk_norm' is not available for MoE presets (n_experts > 0): the Mixtral class "
                "has no per-head q/k norm"
            )


def load_preset(path: str | Path) -> ModelPreset:
    """Loads a preset JSON (`config/tiny.json` …) and validates it once."""
    return load_config(ModelPreset, path)
