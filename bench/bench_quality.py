#!/usr/bin/env python
"""Benchmark of model quality at an equal wall-clock budget: validation bits per byte of each recipe.

Every recipe pretrains the tiny preset for the same `--minutes` with `02_pretrain.py --time_budget`, at the
CPU batch of `make pipeline` (8 × 256), on one training corpus: the built-in corpus plus, when
../shared/data is present, WikiText-2 (test and valid) and the TinyStories head. A held-out part of each
corpus (never trained on; for WikiText-2, a sixth of valid's articles) is scored with rolling windows: bits
per byte = total NLL / ln 2 / UTF-8 bytes, which does not depend on the tokenizer. Runs go in rounds (recipe
order reversed every other round), so machine drift shows as spread between repeats. Writes
bench/results/quality.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from utils.config import load_preset
from utils.corpus import builtin_documents
from utils.eval_data import split_articles
from utils.evaluation import sliding_window_score
from utils.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from run_pipeline import PROFILES, compile_flags  # noqa: E402  (scripts/ is not a package)

RESULTS = ROOT / "bench" / "results"
SHARED = ROOT.parent / "shared" / "data"
# The batch `make pipeline` trains at on a CPU; evaluation and checkpoints only at the end. The warm-up and
# AdamW rate are the cpu-tiny profile's (scripts/run_pipeline.py) from before Muon; "defaults" sets today's.
RECIPE_FLAGS = ("--learning_rate", "--min_lr_ratio", "--warmup_steps")
CPU_BATCH = ["--batch_size", "8", "--gradient_accumulation_steps", "1", "--sequence_length", "256",
             "--eval_steps", "0", "--save_steps", "0", "--logging_steps", "50", "--eval_batches", "8",
             "--learning_rate", "2e-3", "--warmup_steps", "50"]


def pipeline_recipe_flags() -> list[str]:
    """The learning-rate, decay and warm-up flags of make pipeline's pretraining (scripts/run_pipeline.py), and
    its --compile where this machine has what compilation needs."""
    profile = PROFILES["cpu-tiny"]
    pairs = zip(profile.pretrain[::2], profile.pretrain[1::2])
    return [item for name, value in pairs if name in RECIPE_FLAGS for item in (name, value)] + compile_flags(profile)


PIPELINE_FLAGS = pipeline_recipe_flags()


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A preset (changes to config/tiny.json) and 02_pretrain flags."""

    preset: dict
    flags: list[str]
    about: str


RECIPES = {
    # The recipe before this benchmark existed: Llama with SwiGLU width 688, AdamW, cosine (make pipeline's flags).
    "adamw-cosine": Recipe(
        {"d_ff": 688, "qk_norm": False, "zero_init_projections": False, "training": {"optimizer": "adamw"}},
        ["--optimizer", "adamw", "--lr_scheduler", "cosine"], "Llama, d_ff 688, AdamW 2e-3, cosine"),
    # config/tiny.json as it stands, with make pipeline's rates and warm-up (taken from the cpu-tiny profile, so
    # the two cannot drift apart). These flags come after CPU_BATCH's, so they win.
    "defaults": Recipe({}, PIPELINE_FLAGS,
                       "config/tiny.json as committed, make pipeline's flags (AdamW part 1.2e-2, warm-up 10, "
                       "decay to 0, --compile where a C++ compiler is found)"),
    "adamw-768": Recipe(
        {"qk_norm": False, "zero_init_projections": False},
        ["--optimizer", "adamw", "--lr_scheduler", "cosine"], "Llama, d_ff 768, AdamW 2e-3, cosine"),
    "muon-cosine": Recipe(
        {"qk_norm": False, "zero_init_projections": False}, ["--optimizer", "muon", "--lr_scheduler", "cosine"],
        "Llama, d_ff 768, Muon, cosine"),
    "muon-wsd": Recipe(
        {"qk_norm": False, "zero_init_projections": False}, ["--optimizer", "muon", "--lr_scheduler", "wsd"],
        "Llama, d_ff 768, Muon, WSD"),
    "muon-wsd-qknorm": Recipe(
        {"qk_norm": True, "zero_init_projections": False}, ["--optimizer", "muon", "--lr_scheduler", "wsd"],
        "Qwen3 (QK-norm), d_ff 768, Muon, WSD"),
    "muon-wsd-zero": Recipe(
        {"qk_norm": False, "zero_init_projections": True}, ["--optimizer", "muon", "--lr_scheduler", "wsd"],
        "Llama, d_ff 768, zero-init projections, Muon, WSD"),
    "muon-wsd-decay40": Recipe(
        {"qk_norm": False, "zero_init_projections": False},
        ["--optimizer", "muon", "--lr_scheduler", "wsd", "--decay_fraction", "0.4"],
        "Llama, d_ff 768, Muon, WSD decaying over the last 40 %"),
    "muon-wsd-batch16": Recipe(
        {"qk_norm": False, "zero_init_projections": False},
        ["--optimizer", "muon", "--lr_scheduler", "wsd", "--batch_size", "16"],
        "Llama, d_ff 768, Muon, WSD, 16 × 256 tokens per step"),
    "defaults-decay40": Recipe({}, [*PIPELINE_FLAGS, "--decay_fraction", "0.4"],
                               "defaults, decaying over the last 40 %"),
    "defaults-batch16": Recipe({}, [*PIPELINE_FLAGS, "--batch_size", "16"],
                               "defaults at 16 × 256 tokens per step"),
    "defaults-lower-lr": Recipe({}, [*PIPELINE_FLAGS, "--muon_learning_rate", "0.015", "--learning_rate",
                                     "8e-3"], "defaults at 3/4 of both learning rates"),
    "defaults-higher-lr": Recipe({}, [*PIPELINE_FLAGS, "--muon_learning_rate", "0.03", "--learning_rate",
                                      "1.6e-2"], "defaults at 1.5× Muon's and 4/3 AdamW's learning rate"),
    "defaults-wd02": Recipe({}, [*PIPELINE_FLAGS, "--weight_decay", "0.2"],
                            "defaults with weight decay 0.2 on the matrices"),
    "defaults-untied": Recipe({"tie_word_embeddings": False}, PIPELINE_FLAGS, "defaults with untied embeddings"),
    "defaults-adamw6e-3": Recipe({}, [*PIPELINE_FLAGS, "--learning_rate", "6e-3"],
                                 "defaults with the AdamW part (embeddings, norms) at 6e-3"),
    "muon-wsd-untied": Recipe(
        {"tie_word_embeddings": False}, ["--optimizer", "muon", "--lr_scheduler", "wsd"],
        "defaults with untied embeddings"),
}


def held_out_split(documents: list[str], every: int) -> tuple[list[str], list[str]]:
    """Every `every`-th document is held out; the rest is training text."""
    train = [d for i, d in enumerate(documents) if i % every]
    held = [d for i, d in enumerate(documents) if not i % every]
    return train, held


def corpora() -> dict[str, tuple[list[str], list[str]]]:
    """name → (training documents, held-out documents)."""
    sets = {"builtin": held_out_split(list(builtin_documents()), 20)}
    wikitext = SHARED / "wikitext-2-raw" / "wiki.valid.raw"
    if wikitext.is_file():
        train, held = held_out_split(split_articles(wikitext.read_text(encoding="utf-8")), 6)
        # The rest of the corpus trains too: shared/data has no train split, and valid's 5/6 alone (~250k tokens)
        # is repeated 4-5 times in a 10-minute bf16 run. No model of this bench is scored on the test split.
        test = wikitext.with_name("wiki.test.raw")
        if test.is_file():
            train += split_articles(test.read_text(encoding="utf-8"))
        sets["wikitext2-valid"] = (train, held)
    stories = SHARED / "tinystories" / "tinystories_head.txt"
    if stories.is_file():
        blocks = [b.strip() for b in stories.read_text(encoding="utf-8").split("\n\n") if b.strip()]
        # Whole stories of ~4 paragraphs: hold out contiguous groups so no story is split across the two sides.
        groups = ["\n\n".join(blocks[i:i + 4]) for i in range(0, len(blocks), 4)]
        sets["tinystories"] = held_out_split(groups, 10)
    return sets


def run(command: list[str], log: Path) -> None:
    with log.open("w") as handle:
        code = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
    if code:
        sys.exit(f"error: {' '.join(command[:3])} … failed (exit {code}); see {log}")


def prepare(work: Path, sets: dict[str, tuple[list[str], list[str]]]) -> Path:
    """One processed data dir (tokenizer trained on the training side only), reused by every recipe."""
    data = work / "data"
    if (data / "meta.json").is_file():
        return data
    source = work / "train.jsonl"
    with source.open("w", encoding="utf-8") as handle:
        for train, _ in sets.values():
            for document in train:
                handle.write(json.dumps({"text": document}) + "\n")
    run([sys.executable, "scripts/01_prepare_data.py", "--input_path", str(source), "--output_dir", str(data),
         "--config", "config/tiny.json", "--overwrite", "--val_fraction", "0.02"], work / "prepare.log")
    return data


def preset_file(work: Path, name: str, recipe: Recipe) -> Path:
    preset = json.loads((ROOT / "config" / "tiny.json").read_text())
    for key, value in recipe.preset.items():
        preset[key] = {**preset[key], **value} if isinstance(value, dict) else value
    path = work / f"preset-{name}.json"
    path.write_text(json.dumps(preset, indent=2))
    load_preset(path)
    return path


def utf8_bytes(documents: list[str]) -> int:
    return sum(len(d.encode("utf-8")) for d in documents)


@torch.no_grad()
def bits_per_byte(checkpoint: Path, documents: list[str]) -> float:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(checkpoint)
    ids = [tokenizer.encode(d, add_special_tokens=False) for d in documents]
    score = sliding_window_score(model, ids, tokenizer.eos_token_id, 256, 128, 16, torch.device("cpu"),
                                 desc="held-out")
    return score.nll / (math.log(2) * utf8_bytes(documents))


def train_and_score(work: Path, data: Path, name: str, recipe: Recipe, minutes: float, repeat: int,
                    sets: dict[str, tuple[list[str], list[str]]]) -> dict:
    output = work / f"{name}-{repeat}"
    started = time.time()
    run([sys.executable, "scripts/02_pretrain.py", "--config", str(preset_file(work, name, recipe)),
         "--data_path", str(data), "--output_dir", str(output), "--overwrite_output_dir",
         "--time_budget", f"{minutes * 60:g}s", *CPU_BATCH, *recipe.flags], work / f"{name}-{repeat}.log")
    wall = time.time() - started
    summary = json.loads((output / "summary.json").read_text())
    row = {"recipe": name, "repeat": repeat, "wall_seconds": round(wall, 1), "steps": summary["steps"],
           "tokens": summary["tokens"], "tokens_per_second": summary["tokens_per_second"],
           "val_loss": summary["final_val_loss"],
           "bits_per_byte": {corpus: round(bits_per_byte(output / "final", held), 4)
                             for corpus, (_, held) in sets.items()}}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], names: list[str], corpus_names: list[str]) -> tuple[dict, str]:
    summary, lines = {}, []
    header = f"{'recipe':18s}" + "".join(f"{c:>26s}" for c in corpus_names) + f"{'steps':>8s}"
    lines.append(header)
    for name in names:
        mine = [r for r in rows if r["recipe"] == name]
        summary[name] = {"about": RECIPES[name].about, "runs": len(mine),
                         "steps_median": statistics.median(r["steps"] for r in mine), "bits_per_byte": {}}
        cells = ""
        for corpus in corpus_names:
            values = [r["bits_per_byte"][corpus] for r in mine]
            median = statistics.median(values)
            summary[name]["bits_per_byte"][corpus] = {"median": median, "min": min(values), "max": max(values)}
            cells += f"{median:>14.4f} [{min(values):.3f}–{max(values):.3f}]"
        lines.append(f"{name:18s}{cells}{summary[name]['steps_median']:>8.0f}")
    return summary, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of each training run")
    parser.add_argument("--recipes", default="adamw-cosine,defaults",
                        help=f"comma-separated, first = the baseline; known: {','.join(RECIPES)}")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each recipe (rounds)")
    parser.add_argument("--work_dir", default="runs/bench_quality", help="data, checkpoints and logs of the runs")
    parser.add_argument("--output", default=str(RESULTS / "quality.json"))
    args = parser.parse_args()
    names = args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"error: --recipes: unknown {unknown}; known: {', '.join(RECIPES)}")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sets = corpora()
    data = prepare(work, sets)
    rows = []
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            rows.append(train_and_score(work, data, name, RECIPES[name], args.minutes, repeat, sets))
    summary, text = table(rows, names, list(sets))
    baseline = summary[names[0]]["bits_per_byte"]
    for name in names[1:]:
        summary[name]["change_vs_baseline"] = {
            corpus: round(values["median"] / baseline[corpus]["median"] - 1.0, 4)
            for corpus, values in summary[name]["bits_per_byte"].items()}
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "config": {"minutes": args.minutes, "repeats": args.repeats, "batch": CPU_BATCH,
                   "training_bytes": {c: utf8_bytes(t) for c, (t, _) in sets.items()},
                   "held_out_documents": {c: len(h) for c, (_, h) in sets.items()},
                   "held_out_bytes": {c: utf8_bytes(h) for c, (_, h) in sets.items()}},
        "summary": summary, "runs": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    for name in names[1:]:
        changes = ", ".join(f"{c} {v:+.1%}" for c, v in summary[name]["change_vs_baseline"].items())
        print(f"{name} vs {names[0]}: {changes}")


if __name__ == "__main__":
    main()
