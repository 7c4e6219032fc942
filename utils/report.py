"""Markdown reports: one evaluation's `report.md`, and the whole run's report with PNG plots (matplotlib, Agg).

The run report gathers what the stages left on disk: `data/processed/*/meta.json` (+ summary.json),
`checkpoints/<stage>/<preset>/summary.json` and `metrics.jsonl`, `evaluation_results/**/results.json`, and
the sweeps' `runs/sweep/*/trials.json`.
Anything missing is left out with a line saying so; nothing here trains or evaluates.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.files import read_json
from utils.layout import STAGES
from utils.metrics import read_metrics
from utils.results import RESULTS_FILE, environment_info, load_results

SPEED_KEYS = ("prefill_tokens_per_second", "decode_tokens_per_second", "time_to_first_token_seconds", "peak_memory_mb")
HEADLINE_METRICS = (
    "perplexity", "token_perplexity", "word_perplexity", "bits_per_byte", "token_accuracy", "accuracy",
    "accuracy_norm", "majority_baseline", "samples", *SPEED_KEYS,
)
# Evaluation metrics shown as bars in the run report, in this order, when at least one run has them.
BAR_METRICS = (
    ("val.perplexity", "val.bin perplexity (lower is better)"),
    ("wikitext.word_perplexity", "WikiText-2 word perplexity (lower is better)"),
    ("wikitext.bits_per_byte", "WikiText-2 bits per byte (lower is better)"),
    ("boolq.accuracy", "BoolQ accuracy (higher is better)"),
)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 1e6 else f"{value:.3e}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _task_rows(name: str, task: dict[str, Any]) -> list[list[Any]]:
    metrics = task.get("metrics", {})
    if "accuracy" in metrics:
        acc = f"{fmt(metrics['accuracy'])} ± {fmt(metrics['accuracy_stderr'], 2)}"
        rows = [[name, "accuracy", acc], [name, "majority-class baseline", metrics["majority_baseline"]]]
        if name != "boolq":
            rows.append([name, "accuracy (length-normalised)",
                         f"{fmt(metrics['accuracy_norm'])} ± {fmt(metrics['accuracy_norm_stderr'], 2)}"])
        rows.append([name, "samples (truncated on the left)", f"{metrics['samples']} ({metrics['truncated']})"])
        return rows
    return [[name, key.replace("_", " "), value] for key, value in metrics.items()]


def results_markdown(results: dict[str, Any]) -> str:
    """One evaluation as Markdown: metrics, skipped tasks, gates, generations, hashes and settings."""
    checkpoint, env = results["checkpoint"], results["environment"]
    out = [
        f"# Evaluation of `{checkpoint['path']}`",
        "",
        f"Stage **{results['stage']}**, preset **{results['preset']}**, {results['created']}, on "
        f"{env.get('device')} ({env.get('dtype')}), {fmt(results['seconds'].get('total'))} s in total.",
        "",
        "## Metrics",
        "",
    ]
    rows = []
    for name, task in results["tasks"].items():
        if name == "mc" and "skipped" not in task:
            for sub, subtask in task.items():
                rows += _task_rows(f"mc/{sub}", subtask)
        elif "metrics" in task:
            rows += _task_rows(name, task)
    out += [table(["task", "metric", "value"], rows) if rows else "No metric was measured.", ""]
    skipped = {name: task["skipped"] for name, task in results["tasks"].items() if "skipped" in task}
    if skipped:
        out += ["## Skipped", ""] + [f"- **{name}**: {note}" for name, note in skipped.items()] + [""]
    if "gates" in results:
        out += gates_markdown(results["gates"])
    samples = results["tasks"].get("generate", {}).get("samples", [])
    if samples:
        settings = results["tasks"]["generate"]["settings"]
        out += ["## Smoke-test generations", "", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
        for sample in samples:
            prompt = sample["prompt"] if isinstance(sample["prompt"], str) else json.dumps(sample["prompt"])
            out += [f"**Prompt:** `{prompt}` ({sample['finish_reason']}, {sample['generated_tokens']} tokens)", "",
                    "```text", sample["text"].replace("```", "'''"), "```", ""]
    sources = table(["what", "source", "sha256", "records used / available"], _source_rows(results))
    about = table(["checkpoint", "value"], [[k, v] for k, v in checkpoint.items()])
    out += ["## Data and model", "", sources, "", about, ""]
    out += ["## Environment", "", table(["", ""], [[k, v] for k, v in env.items()]), ""]
    out += ["## Settings", "", "```json", json.dumps(results["settings"], indent=1, default=str), "```", ""]
    return "\n".join(out)


def _source_rows(results: dict[str, Any]) -> list[list[Any]]:
    rows = []
    tasks = results["tasks"]
    for name, task in tasks.items():
        entries = task.items() if name == "mc" and "skipped" not in task else [(name, task)]
        for label, entry in entries:
            if isinstance(entry, dict) and "source" in entry:
                rows.append([label, entry["source"], (entry.get("sha256") or "n/a")[:16],
                             f"{fmt(entry.get('used'))} / {fmt(entry.get('records'))}"])
    return rows


def gates_markdown(gates: dict[str, Any]) -> list[str]:
    verdict = "passed" if gates["passed"] else "**FAILED**"
    out = [f"## Promotion gates: {gates['stage']} ({verdict})", "",
           f"Thresholds from `{gates['config']}`; regression baseline: `{gates.get('baseline') or 'none'}`.", ""]
    out += [table(["status", "check"], [[c["status"], c["message"]] for c in gates["checks"]]), ""]
    return out


# --------------------------------------------------------------------------- the run report


@dataclass
class StageRun:
    """One training stage's outputs: `checkpoints/<stage>/<preset>/`."""

    stage: str
    preset: str
    directory: Path
    summary: dict[str, Any] | None
    metrics: list[dict[str, Any]]


@dataclass
class RunCollection:
    datasets: list[tuple[Path, dict[str, Any], dict[str, Any] | None]] = field(default_factory=list)
    stages: list[StageRun] = field(default_factory=list)
    evaluations: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    sweeps: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any] | None:
    return read_json(path, "run file") if path.is_file() else None


def collect_run(data_dir: Path, checkpoints_dir: Path, results_dir: Path,
                sweeps_dir: Path | None = None) -> RunCollection:
    """Everything the pipeline stages wrote, found by the layout in docs/design.md, and the sweeps
    (scripts/sweep.py)."""
    run = RunCollection()
    if sweeps_dir is not None:
        run.sweeps = [(path.parent, _read_json(path)) for path in sorted(sweeps_dir.glob("*/trials.json"))]
    for meta_path in sorted(data_dir.glob("*/meta.json")):
        run.datasets.append((meta_path.parent, _read_json(meta_path), _read_json(meta_path.parent / "summary.json")))
    for stage in STAGES:
        for directory in sorted(p for p in (checkpoints_dir / stage).glob("*") if p.is_dir()):
            summary = _read_json(directory / "summary.json")
            metrics = read_metrics(directory / "metrics.jsonl")
            if summary is not None or metrics:
                run.stages.append(StageRun(stage, directory.name, directory, summary, metrics))
    evaluations = [(path, load_results(path)) for path in results_dir.rglob(RESULTS_FILE)]
    run.evaluations = sorted(evaluations, key=_pipeline_order)
    if not run.datasets:
        run.notes.append(f"no processed data set under {data_dir} (make prepare)")
    if not run.stages:
        run.notes.append(f"no training stage output under {checkpoints_dir}/{{{','.join(STAGES)}}}/")
    if not run.evaluations:
        run.notes.append(f"no evaluation results under {results_dir} (make evaluate)")
    return run


def _pipeline_order(evaluation: tuple[Path, dict[str, Any]]) -> tuple[int, str, str]:
    """pretrain, sft, dpo (then anything else), as the pipeline runs them."""
    path, results = evaluation
    stage = results.get("stage")
    return (STAGES.index(stage) if stage in STAGES else len(STAGES), str(results.get("preset")), str(path))


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(row.get("step", i))
            ys.append(value)
    return xs, ys


def _numeric_keys(rows: list[dict[str, Any]], predicate) -> list[str]:
    keys = {key for row in rows for key, value in row.items()
            if predicate(key) and isinstance(value, (int, float)) and not isinstance(value, bool)}
    # The same series gets the same colour in every panel: training loss first, the rest by name.
    return sorted(keys, key=lambda k: (k not in ("loss", "lr", "learning_rate"), k))


def _is_loss(key: str) -> bool:
    """Training and validation losses; not running bests or the MoE router's auxiliary loss."""
    return "loss" in key and not key.startswith("best") and "aux" not in key


def _is_lr(key: str) -> bool:
    return key in ("lr", "muon_lr", "learning_rate")


def plot_curves(stages: list[StageRun], predicate, ylabel: str, path: Path, log_y: bool = False) -> Path | None:
    """One panel per stage with every metrics.jsonl column that `predicate` accepts, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = [(s, _numeric_keys(s.metrics, predicate)) for s in stages]
    panels = [(s, keys) for s, keys in panels if keys]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (stage, keys) in zip(axes[0], panels):
        for key in keys:
            xs, ys = _series(stage.metrics, key)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set_title(f"{stage.stage} / {stage.preset}")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log_y and all(v > 0 for k in keys for v in _series(stage.metrics, k)[1]):
            ax.set_yscale("log")
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _eval_label(path: Path, results: dict[str, Any]) -> str:
    return f"{results.get('stage', '?')}/{results.get('preset', path.parent.name)}"


def plot_eval_bars(evaluations: list[tuple[Path, dict[str, Any]]], path: Path) -> Path | None:
    """One bar panel per headline metric, a bar per evaluation; BoolQ with error bars and its baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(m, title) for m, title in BAR_METRICS
             if any(isinstance(r["metrics"].get(m), (int, float)) for _, r in evaluations)]
    if not shown:
        return None
    columns = min(2, len(shown))
    rows = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    labels = [_eval_label(p, r) for p, r in evaluations]
    for ax, (metric, title) in zip(axes.flat, shown):
        values = [r["metrics"].get(metric) for _, r in evaluations]
        heights = [v if isinstance(v, (int, float)) else 0 for v in values]
        errors = None
        if metric.endswith("accuracy"):
            errors = [r["metrics"].get(metric + "_stderr") or 0 for _, r in evaluations]
        bars = ax.bar(range(len(labels)), heights, yerr=errors, capsize=4, color="#4878a8")
        for bar, value in zip(bars, values):
            ax.annotate(fmt(value, 3), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        if metric == "boolq.accuracy":
            baselines = [r["metrics"].get("boolq.majority_baseline") for _, r in evaluations]
            baseline = next((b for b in baselines if b is not None), None)
            if baseline is not None:
                ax.axhline(baseline, color="#c44e52", linestyle="--", linewidth=1,
                           label=f"majority class {baseline:.3f}")
                ax.legend(fontsize=8)
            ax.set_ylim(0, 1)
        else:
            ax.set_ylim(0, max(heights) * 1.15 or 1)  # room for the value labels
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _dataset_section(run: RunCollection) -> list[str]:
    out = ["## Data", ""]
    if not run.datasets:
        return out + ["No processed data set found.", ""]
    for directory, meta, summary in run.datasets:
        source = meta.get("source", {})
        out += [f"### `{directory}`", "",
                f"Sources: {', '.join(map(str, source.get('inputs', []))) or 'n/a'}; "
                f"vocabulary {fmt(meta.get('vocab_size'))}"
                f" ({meta.get('dtype')}); tokenizer sha256 `{str(meta.get('tokenizer_sha256', 'n/a'))[:16]}`.", ""]
        out += [table(["split", "documents", "tokens"], [
            ["train", meta.get("train_documents"), meta.get("train_tokens")],
            ["val", meta.get("val_documents"), meta.get("val_tokens")],
        ]), ""]
        filters = meta.get("filters") or []
        if filters:
            out += ["Filters, in order:", "", table(["step", "enabled", "kept", "removed"], [
                [f.get("step"), f.get("enabled"), f.get("kept"), f.get("removed")] for f in filters]), ""]
        out += _contamination_table(meta.get("contamination"))
        files = meta.get("files") or {}
        if files:
            out += [table(["file", "sha256 (first 16)"], [[k, v[:16]] for k, v in files.items()]), ""]
        if summary and "seconds" in summary:
            out += [f"Prepared in {fmt(summary['seconds'])} s.", ""]
    return out


def _contamination_table(card: dict[str, Any] | None) -> list[str]:
    if not card:
        return ["Contamination: not checked (01_prepare_data.py --decontaminate_against).", ""]
    rows = [[r["eval_set"], r["items"], r["checked_items"], r["contaminated_items"],
             f"{r['share']:.1%}" if r["share"] is not None else "n/a", r["training_documents"]]
            for r in card["eval_sets"]]
    return [f"Contamination ({card['ngram']}-gram overlap with the training documents; mode `{card['mode']}`):", "",
            table(["eval set", "items", "checkable", "overlapping", "share", "training docs"], rows), ""]


def _stage_rows(run: RunCollection) -> list[list[Any]]:
    rows = []
    for s in run.stages:
        summary = s.summary or {}
        with_loss = [row for row in s.metrics if isinstance(row.get("loss"), (int, float))]
        last = with_loss[-1] if with_loss else (s.metrics[-1] if s.metrics else {})
        rows.append([s.stage, s.preset, summary.get("steps", last.get("step")), last.get("loss"),
                     summary.get("seconds"), str(s.directory)])
    return rows


def _effect_rows(run: RunCollection) -> list[list[Any]]:
    """Each stage's own held-out measure before and after it trained: pretraining's validation loss at its
    first and last evaluation, SFT's held-out reply loss, DPO's held-out loss, reward accuracy and margin."""
    rows = []
    for s in run.stages:
        summary = s.summary or {}
        if s.stage == "pretrain":
            evals = [row["val_loss"] for row in s.metrics if row.get("event") == "eval"]
            if evals:
                rows.append([s.stage, "validation loss (first → final evaluation)", evals[0], evals[-1]])
        elif "eval_loss_before" in summary:
            rows.append([s.stage, "held-out reply loss", summary["eval_loss_before"], summary.get("eval_loss_after")])
        elif "eval_before" in summary:
            before, after = summary["eval_before"], summary.get("eval_after", {})
            for key, label in (("loss", "held-out DPO loss"), ("rewards/accuracies", "held-out reward accuracy"),
                               ("rewards/margins", "held-out reward margin")):
                rows.append([s.stage, label, before.get(key), after.get(key)])
    return rows


def _summary_facts(run: RunCollection) -> list[str]:
    out = []
    for s in run.stages:
        if not s.summary:
            continue
        facts = [[k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else v]
                 for k, v in s.summary.items() if k != "stage"]
        out += [f"### {s.stage} / {s.preset}", "", table(["", ""], facts), ""]
    return out


def _evaluation_section(run: RunCollection, bars: Path | None, out_dir: Path) -> list[str]:
    out = ["## Evaluation", ""]
    if not run.evaluations:
        return out + ["No evaluation results found.", ""]
    if bars:
        out += [f"![evaluation metrics]({bars.relative_to(out_dir)})", ""]
    metrics = sorted({m for _, r in run.evaluations for m in r["metrics"] if _is_headline(m)})
    header = ["metric"] + [_eval_label(p, r) for p, r in run.evaluations]
    rows = [[m] + [r["metrics"].get(m) for _, r in run.evaluations] for m in metrics]
    out += [table(header, rows), ""]
    for path, results in run.evaluations:
        if "gates" in results:
            out += [f"Gates of `{path}`: " + ("passed" if results["gates"]["passed"] else "**FAILED**: " + "; ".join(
                c["message"] for c in results["gates"]["checks"] if c["status"] == "failed")), ""]
        samples = results.get("tasks", {}).get("generate", {}).get("samples", [])
        if samples:
            first = samples[0]
            prompt = first["prompt"] if isinstance(first["prompt"], str) else json.dumps(first["prompt"])
            out += [f"Sample from {_eval_label(path, results)} for `{prompt}`:", "", "```text",
                    first["text"].replace("```", "'''"), "```", ""]
        out += [f"Details: `{path.parent / 'report.md'}`.", ""]
    return out


def _is_headline(metric: str) -> bool:
    """The numbers a reader compares across stages (the rest is in each evaluation's own report.md)."""
    return metric.rsplit(".", 1)[-1] in HEADLINE_METRICS


def render_run_report(run: RunCollection, out_dir: Path, title: str = "Training run report") -> tuple[str, list[Path]]:
    """The run card as Markdown, and the PNG plots it links (written under `out_dir/plots/`)."""
    plots_dir = out_dir / "plots"
    loss_png = plot_curves(run.stages, _is_loss, "loss", plots_dir / "loss.png", log_y=True)
    lr_png = plot_curves(run.stages, _is_lr, "learning rate", plots_dir / "learning_rate.png")
    bars_png = plot_eval_bars(run.evaluations, plots_dir / "evaluation.png")
    env = environment_info()
    out = [f"# {title}", "", f"Code version `{env.get('git_commit') or 'unknown'}`.", ""]
    if run.notes:
        out += ["Not found:", ""] + [f"- {note}" for note in run.notes] + [""]
    out += _dataset_section(run)
    out += ["## Training", ""]
    if run.stages:
        out += [table(["stage", "preset", "steps", "last loss", "seconds", "directory"], _stage_rows(run)), ""]
        effects = _effect_rows(run)
        if effects:
            out += ["What each stage changed, on its own held-out data:", "",
                    table(["stage", "measure", "before", "after"], effects), ""]
        for png, what in ((loss_png, "loss curves"), (lr_png, "learning-rate schedules")):
            if png:
                out += [f"![{what}]({png.relative_to(out_dir)})", ""]
        out += _summary_facts(run)
    else:
        out += ["No training stage output found.", ""]
    out += _evaluation_section(run, bars_png, out_dir)
    out += _sweep_section(run, plots_dir, out_dir)
    out += ["## Timings", "", table(["step", "seconds"], _timing_rows(run)), ""]
    out += ["## Environment (at report time)", "", table(["", ""], [[k, v] for k, v in env.items()]), ""]
    return "\n".join(out), [p for p in (loss_png, lr_png, bars_png) if p]


def _sweep_section(run: RunCollection, plots_dir: Path, out_dir: Path) -> list[str]:
    """Each sweep's trials and best settings, with its optimisation history plot copied beside the others."""
    if not run.sweeps:
        return []
    out = ["## Hyper-parameter sweeps", ""]
    for directory, sweep in run.sweeps:
        trials = sweep["trials"]
        states = Counter(t["state"].lower() for t in trials)
        out += [f"### `{directory}` ({sweep['study']})", "",
                f"{len(trials)} trials: " + ", ".join(f"{n} {state}" for state, n in sorted(states.items())) + ".", ""]
        done = sorted((t for t in trials if t["val_loss"] is not None), key=lambda t: t["val_loss"])
        if done:
            names = sorted(done[0]["settings"])
            out += ["Best trials:", "", table(["trial", "val loss", "seconds", *names], [
                [t["number"], t["val_loss"], t["seconds"], *[t["settings"].get(n) for n in names]]
                for t in done[:5]]), ""]
        history = directory / "history.png"
        if history.is_file():
            copy = plots_dir / f"sweep-{directory.name}.png"
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(history, copy)
            out += [f"![optimisation history]({copy.relative_to(out_dir)})", ""]
    return out


def _timing_rows(run: RunCollection) -> list[list[Any]]:
    rows = [[f"prepare {d.name}", (s or {}).get("seconds")] for d, _, s in run.datasets]
    rows += [[f"{s.stage} {s.preset}", (s.summary or {}).get("seconds")] for s in run.stages]
    rows += [[f"evaluate {_eval_label(p, r)}", r.get("seconds", {}).get("total")] for p, r in run.evaluations]
    return rows
