#!/usr/bin/env python
"""Prints every preset in config/ with its parameter counts, computed from the built model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from utils.config import ConfigError, load_preset
from utils.files import UnreadableFileError
from utils.model import build_model, count_parameters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("presets", nargs="*", help="preset files (default: every config/*.json with a model)")
    args = parser.parse_args()
    paths = args.presets or sorted(str(p) for p in Path("config").glob("*.json"))
    print("| preset | layers | d_model | heads (kv) | d_ff | experts | vocab | seq | params | non-embedding |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        try:
            preset = load_preset(path)
        except (ConfigError, UnreadableFileError):
            continue  # sft.json, gates.json … are not model presets
        with torch.device("meta"):
            counts = count_parameters(build_model(preset))
        experts = f"{preset.n_experts} (top-{preset.experts_per_token})" if preset.is_moe else "-"
        print(f"| {preset.model_name} | {preset.n_layer} | {preset.d_model} | {preset.n_head} ({preset.kv_heads}) | "
              f"{preset.d_ff} | {experts} | {preset.vocab_size} | {preset.sequence_length} | "
              f"{counts.total / 1e6:.2f} M | {counts.non_embedding / 1e6:.2f} M |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
