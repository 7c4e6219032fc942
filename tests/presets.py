"""The micro preset of the tests: config/micro.json's model (2 layers, width 64), with a training block sized for
a 2-core CI machine, and copies of it with fields changed."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from utils.config import ModelPreset, load_preset

MICRO_JSON = Path(__file__).resolve().parents[1] / "config" / "micro.json"
# Shorter windows, smaller batches and fewer steps than config/micro.json's functional runs.
TEST_TRAINING = {"batch_size": 4, "sequence_length": 64, "warmup_steps": 2, "max_steps": 20}


def preset_with(preset: ModelPreset, **changes: Any) -> ModelPreset:
    """A copy of `preset` with fields replaced, validated again."""
    updated = dataclasses.replace(preset, **changes)
    updated.validate("preset override")
    return updated


def micro_preset(vocab_size: int = 512, **changes: Any) -> ModelPreset:
    preset = load_preset(MICRO_JSON)
    training = dataclasses.replace(preset.training, **TEST_TRAINING)
    return preset_with(preset, vocab_size=vocab_size, training=training, **changes)
