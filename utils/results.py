"""Evaluation results files: their flat metric names, what they record about the checkpoint and the
environment, side-by-side comparison, and promotion gates.

`results.json` keeps every task's details under `tasks`, and a flat `metrics` map (`boolq.accuracy`,
`wikitext.word_perplexity`, `val.perplexity`, …) that comparisons and gates read. A metric that came out
NaN or infinite is stored as null, so the file stays strict JSON and a gate on it fails.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from utils.checkpoint import ADAPTER_CONFIG, adapter_base_path
from utils.cli import git_commit
from utils.config import ConfigError, from_dict, load_json
from utils.files import CHECKSUMS, read_json, sha256_file
from utils.loading import LoadedModel
from utils.model import count_parameters
from utils.tokenizer import tokenizer_sha256

RESULTS_FILE = "results.json"
# Metric name endings whose value improves downwards / upwards; anything else (counts, sizes) is neutral.
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "loss", "seconds", "memory_mb")
HIGHER_IS_BETTER = ("accuracy", "accuracy_norm", "tokens_per_second")


class ResultsError(ValueError):
    pass


def direction(metric: str) -> int:
    """-1 when lower is better, +1 when higher is better, 0 for counts and other neutral numbers."""
    last = metric.rsplit(".", 1)[-1]
    if last.endswith(LOWER_IS_BETTER):
        return -1
    if last.endswith(HIGHER_IS_BETTER):
        return 1
    return 0


def finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def flatten_metrics(tasks: dict[str, dict[str, Any]]) -> dict[str, float | int | None]:
    """`{"boolq": {"metrics": {"accuracy": 0.6}}}` → `{"boolq.accuracy": 0.6}`; nested task groups joined by dots."""
    flat: dict[str, float | int | None] = {}
    for name, task in tasks.items():
        if "metrics" in task:
            for key, value in task["metrics"].items():
                flat[f"{name}.{key}"] = finite_or_none(value)
        else:
            group = {sub: t for sub, t in task.items() if isinstance(t, dict) and "metrics" in t}
            for sub, value in flatten_metrics(group).items():
                flat[f"{name}.{sub}"] = value
    return flat


def load_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise ResultsError(f"{path} does not exist: expected a results.json written by scripts/05_evaluate.py")
    data = read_json(path, "results file")
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise ResultsError(f"{path} is not an evaluation results file: the 'metrics' object is missing")
    return data


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"
    return str(value)


def comparison_rows(new: dict[str, Any], old: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(metric, old, new, delta, verdict) for every metric in either file; verdict: better / worse / blank."""
    rows = []
    for metric in sorted(set(new["metrics"]) | set(old["metrics"])):
        a, b = old["metrics"].get(metric), new["metrics"].get(metric)
        delta, verdict = "", ""
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            diff = b - a
            delta = f"{diff:+.4g}" + (f" ({diff / abs(a) * 100:+.1f} %)" if a else "")
            sign = direction(metric) * diff
            verdict = "better" if sign > 0 else "worse" if sign < 0 else ""
        rows.append((metric, _fmt(a), _fmt(b), delta, verdict))
    return rows


def comparison_table(new: dict[str, Any], old: dict[str, Any], new_name: str, old_name: str) -> str:
    """A Markdown table, readable as plain text too, of two results side by side with deltas."""
    header = ("metric", old_name, new_name, "delta", "")
    rows = [header] + comparison_rows(new, old)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


@dataclass(frozen=True)
class StageGates:
    """Thresholds a stage's evaluation must meet; metric names are the flat `results.json` names."""

    description: str = ""
    previous: str | None = None
    required: list[str] = field(default_factory=list)
    max: dict[str, float] = field(default_factory=dict)
    min: dict[str, float] = field(default_factory=dict)
    # Token perplexity at most this fraction of the vocabulary size, the perplexity of a uniform guess:
    # one threshold that means the same for a 512-token micro model and a 32k-token base model.
    max_vs_uniform: dict[str, float] = field(default_factory=dict)
    max_regression_pct: dict[str, float] = field(default_factory=dict)

    def validate(self, source: str) -> None:
        for metric in self.max_vs_uniform:
            if not metric.endswith("perplexity") or metric.endswith("word_perplexity"):
                raise ConfigError(f"{source}: 'max_vs_uniform.{metric}': only token perplexities compare with the "
                                  "vocabulary size (val.perplexity, wikitext.token_perplexity)")
        for rule in ("max", "min", "max_vs_uniform", "max_regression_pct"):
            for metric, value in getattr(self, rule).items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{source}: '{rule}.{metric}' must be a number, got {value!r}")
        for metric in self.max_regression_pct:
            if direction(metric) == 0:
                raise ConfigError(
                    f"{source}: 'max_regression_pct.{metric}': cannot tell whether higher or lower is better "
                    f"for this metric (known endings: {', '.join(LOWER_IS_BETTER + HIGHER_IS_BETTER)})"
                )


def load_gates(path: str | Path, stage: str) -> StageGates:
    data = load_json(path)
    stages = sorted(k for k in data if not k.startswith("_"))
    if stage not in stages:
        raise ConfigError(f"{path}: no gates for stage '{stage}'; stages with gates: {', '.join(stages)}")
    return from_dict(StageGates, data[stage], f"{path}: stage '{stage}'")


@dataclass(frozen=True)
class GateCheck:
    metric: str
    rule: str
    threshold: float | None
    value: float | None
    status: str  # passed, failed, skipped
    message: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _threshold_check(metric: str, rule: str, threshold: float, metrics: dict[str, Any], required: bool,
                     limit: float | None = None, label: str | None = None) -> GateCheck:
    """`max`-like rules pass when the value is <= `limit` (default: the threshold), `min` when >= it."""
    limit = threshold if limit is None else limit
    label = label or f"{rule} {threshold}"
    if metric not in metrics:
        status = "failed" if required else "skipped"
        note = "required but not measured" if required else "not measured in this evaluation"
        return GateCheck(metric, rule, threshold, None, status, f"{metric}: {note} ({label})")
    value = metrics[metric]
    if value is None:
        return GateCheck(metric, rule, threshold, None, "failed", f"{metric} is not finite (NaN or inf); {label}")
    upper = rule != "min"
    ok = value <= limit if upper else value >= limit
    sign = ("<=" if ok else ">") if upper else (">=" if ok else "<")
    status = "passed" if ok else "failed"
    return GateCheck(metric, rule, threshold, value, status, f"{metric} = {_fmt(value)} {sign} {label}")


def _regression_check(metric: str, limit: float, metrics: dict[str, Any], baseline: dict[str, Any] | None,
                      previous: str) -> GateCheck:
    rule = "max_regression_pct"
    old = (baseline or {}).get(metric)
    new = metrics.get(metric)
    if baseline is None or old is None or metric not in metrics:
        why = "no baseline results" if baseline is None else "not measured in both evaluations"
        message = f"{metric}: regression vs {previous} not checked ({why})"
        return GateCheck(metric, rule, limit, None, "skipped", message)
    if new is None:
        return GateCheck(metric, rule, limit, None, "failed", f"{metric} is not finite (NaN or inf)")
    if old == 0:
        return GateCheck(metric, rule, limit, None, "skipped", f"{metric}: baseline is 0, no relative change")
    regression = -direction(metric) * (new - old) / abs(old) * 100
    ok = regression <= limit
    return GateCheck(
        metric, rule, limit, regression, "passed" if ok else "failed",
        f"{metric} regressed {regression:+.1f} % vs {previous} ({_fmt(old)} -> {_fmt(new)}); "
        f"{'within' if ok else 'over'} max_regression_pct {limit}",
    )


def _uniform_check(metric: str, fraction: float, metrics: dict[str, Any], vocab_size: int | None,
                   required: bool) -> GateCheck:
    if vocab_size is None:
        return GateCheck(metric, "max_vs_uniform", fraction, None, "failed" if required else "skipped",
                         f"{metric}: vocabulary size unknown, max_vs_uniform {fraction} not checked")
    limit = fraction * vocab_size
    label = f"max_vs_uniform {fraction} x vocabulary {vocab_size} = {_fmt(limit)}"
    return _threshold_check(metric, "max_vs_uniform", fraction, metrics, required, limit, label)


def check_gates(metrics: dict[str, Any], gates: StageGates, baseline: dict[str, Any] | None,
                vocab_size: int | None = None) -> list[GateCheck]:
    """Every threshold of `gates` applied to `metrics`; `baseline` is the previous stage's flat metrics."""
    checks = []
    for metric in gates.required:
        if not any(metric in rule for rule in (gates.max, gates.min, gates.max_vs_uniform)):
            present = metric in metrics
            checks.append(GateCheck(metric, "required", None, metrics.get(metric), "passed" if present else "failed",
                                    f"{metric}: {'measured' if present else 'required but not measured'}"))
    for rule in ("max", "min"):
        for metric, threshold in getattr(gates, rule).items():
            checks.append(_threshold_check(metric, rule, threshold, metrics, metric in gates.required))
    for metric, fraction in gates.max_vs_uniform.items():
        checks.append(_uniform_check(metric, fraction, metrics, vocab_size, metric in gates.required))
    for metric, limit in gates.max_regression_pct.items():
        checks.append(_regression_check(metric, limit, metrics, baseline, gates.previous or "baseline"))
    return checks


def weights_sha256(directory: Path, filename: str) -> str | None:
    """sha256 of a weights file, from the checkpoint's checksums.json when it has one (no re-hashing)."""
    sums_file = directory / CHECKSUMS
    if sums_file.is_file():
        known = read_json(sums_file, "checkpoint file").get(filename)
        if known:
            return known
    return sha256_file(directory / filename) if (directory / filename).is_file() else None


def checkpoint_info(loaded: LoadedModel) -> dict[str, Any]:
    """What was evaluated: path, kind, weights and tokenizer hashes, architecture and size."""
    path = loaded.path
    adapter = (path / ADAPTER_CONFIG).is_file()
    weights = "adapter_model.safetensors" if adapter else "model.safetensors"
    count = count_parameters(loaded.model)
    info: dict[str, Any] = {
        "path": str(path),
        "kind": "lora_adapter" if adapter else "model",
        "weights_sha256": weights_sha256(path, weights),
        "tokenizer_sha256": tokenizer_sha256(path),
        "architecture": (loaded.model.config.architectures or [type(loaded.model).__name__])[0],
        "parameters": count.total,
        "non_embedding_parameters": count.non_embedding,
        "context_length": int(loaded.model.config.max_position_embeddings),
        "vocab_size": len(loaded.tokenizer),
        "chat_template": loaded.template,
    }
    if adapter:
        base = adapter_base_path(path)
        info.update(base_model=str(base), base_weights_sha256=weights_sha256(base, "model.safetensors"))
    return info


def environment_info(device: torch.device | None = None, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Versions, hardware and code version, so a number can be traced to what produced it."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": git_commit(),
    }
    for package in ("accelerate", "peft", "trl", "datasets"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if device is not None:
        info["device"] = str(device)
    if dtype is not None:
        info["dtype"] = str(dtype).removeprefix("torch.")
    return info
