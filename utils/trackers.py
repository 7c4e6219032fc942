"""Experiment trackers (`--report_to`) for 02_pretrain (accelerate's `log_with`) and 03_sft/04_dpo (the trainer's
`report_to`): which ones exist, whether the package behind each is installed, and their offline-friendly defaults.

Both libraries use the same names for the trackers offered here. `check_trackers` runs before any training
starts, so a missing package ends the stage with one message instead of a failure after the model is loaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

NONE = "none"
# tracker -> (pip package to install, the modules whose presence makes it usable: any one of them)
TRACKERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tensorboard": ("tensorboard", ("tensorboard", "tensorboardX")),
    "wandb": ("wandb", ("wandb",)),
    "trackio": ("trackio", ("trackio",)),
    "mlflow": ("mlflow", ("mlflow",)),
}
CHOICES = (NONE, *TRACKERS)


class TrackerError(ValueError):
    """A `--report_to` value names an unknown tracker or one whose package is not installed."""


def is_tracker_installed(name: str) -> bool:
    """Whether the package tracker `name` needs can be imported (found on the path; not imported here)."""
    _, modules = TRACKERS[name]
    return any(importlib.util.find_spec(module) is not None for module in modules)


def parse_trackers(spec: str | list[str] | None) -> list[str]:
    """`none`, one tracker name, or several joined by commas -> the list of names (empty for none)."""
    if spec is None:
        return []
    names = [n.strip().lower() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    unknown = [n for n in names if n not in CHOICES]
    if unknown:
        raise TrackerError(
            f"--report_to: unknown tracker {', '.join(map(repr, unknown))}; choose {', '.join(CHOICES)} "
            "(several may be joined by commas, e.g. tensorboard,wandb)"
        )
    if NONE in names and len(names) > 1:
        raise TrackerError("--report_to: 'none' cannot be combined with other trackers")
    return [n for n in dict.fromkeys(names) if n != NONE]


def check_trackers(spec: str | list[str] | None, output_dir: str | Path) -> list[str]:
    """Validates `--report_to` and prepares each tracker; returns the tracker names ([] for `none`).

    Raises TrackerError naming the pip package when a tracker's package is not installed. Defaults that keep
    a run local unless the user chose otherwise (environment variables already set win):
    - wandb runs offline when no WANDB_API_KEY is set, and writes under `output_dir` (WANDB_DIR);
    - mlflow records to `output_dir/mlruns` when no MLFLOW_TRACKING_URI is set.
    TensorBoard event files go where the caller's integration puts them (accelerate: its project_dir; the
    trainer: see utils/finetune.py); trackio keeps its own local store.
    """
    names = parse_trackers(spec)
    missing = [name for name in names if not is_tracker_installed(name)]
    if missing:
        packages = " ".join(TRACKERS[name][0] for name in missing)
        raise TrackerError(
            f"--report_to {','.join(missing)}: the package is not installed; install it with `pip install "
            f"{packages}`, or choose another tracker ({', '.join(CHOICES)})"
        )
    output_dir = Path(output_dir).resolve()
    if "wandb" in names:
        if not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(output_dir))
    if "mlflow" in names:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (output_dir / "mlruns").as_uri())
    return names
