#!/usr/bin/env python
"""Evaluation parity: our WikiText-2 and BoolQ numbers against an independent straightforward computation on
the same checkpoint and, when given a Python that has lm-evaluation-harness, against the harness itself.

  python bench/bench_eval_parity.py --model_path checkpoints/pretrain/tiny \
      --wikitext_path ../shared/data/wikitext-2-raw/wiki.test.raw --boolq_path ../shared/data/boolq/dev.jsonl \
      [--lm_eval_python /work/lmeval-venv/bin/python]

The straightforward computation shares nothing with utils/evaluation.py but the model: it rebuilds the
harness's disjoint rolling windows and BoolQ continuations in plain loops, one unbatched forward pass per
window or choice. The harness runs as `python -m lm_eval --model hf` on the checkpoint directory as it is,
with its own defaults (prefix token, tokenisation), on the raw files themselves, never on anything this
project has split or converted: a generated task YAML `include`s the harness's own `wikitext` and `boolq`
task definitions (their prompts, detokenizer, process_results and metrics) and replaces only where the data
comes from: `dataset_path: text` (`sample_by: document`) on the raw WikiText file, cut into pages by the
rule that built the harness's `EleutherAI/wikitext_document_level` data set (re-implemented in the generated
module, not imported from utils/), and `dataset_path: json` on the BoolQ JSONL. Writes
bench/results/eval_parity.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from utils.checkpoint import load_model, resolve_checkpoint
from utils.eval_data import detokenize_wikitext, load_boolq, load_wikitext
from utils.evaluation import (
    LMScore,
    model_context_length,
    perplexity_metrics,
    score_multiple_choice,
    sliding_window_score,
    text_stats,
)
from utils.results import environment_info

ROOT = Path(__file__).resolve().parents[1]

CPU = torch.device("cpu")

# The harness's own task definitions with only their data source replaced by the raw local files.
TASKS_YAML = {
    "wikitext_rawfile.yaml": """include: {wikitext_yaml}
task: wikitext_rawfile
dataset_path: text
dataset_name: null
dataset_kwargs:
  data_files:
    test: {wikitext_path}
  sample_by: document
training_split: null
validation_split: null
test_split: test
process_docs: !function rawfile_docs.wikitext_pages
""",
    "boolq_rawfile.yaml": """include: {boolq_yaml}
task: boolq_rawfile
tag: []
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {boolq_path}
training_split: null
validation_split: validation
process_docs: !function rawfile_docs.boolq_docs
""",
    "rawfile_docs.py": """from datasets import Dataset


def wikitext_pages(dataset):
    # The rule of the EleutherAI/wikitext_document_level builder: split at "\\n"; a line that, with
    # "= = =" and "= =" closed up and stripped, starts with "= " and ends with " =" starts a new page;
    # a page's lines are joined with "\\n"; whitespace-only pages are dropped.
    pages, lines = [], []
    for line in "".join(dataset["text"]).split("\\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            if "\\n".join(lines).strip():
                pages.append("\\n".join(lines))
            lines = []
        lines.append(line)
    if "\\n".join(lines).strip():
        pages.append("\\n".join(lines))
    return Dataset.from_list([{{"page": page}} for page in pages[:{wikitext_limit}]])


def boolq_docs(dataset):
    # The original BoolQ release has `answer: true/false`; the harness's task reads SuperGLUE's `label`.
    dataset = dataset.select(range(min({boolq_limit}, len(dataset))))
    return dataset.map(lambda doc: {{"label": int(doc["answer"])}}) if "label" not in dataset.column_names else dataset
""",
}


def straightforward_rolling_nll(model, ids: list[int], prefix: int, context: int) -> float:
    """Disjoint windows of `context` predictions; the first predicted from `prefix`, the last window full-length."""
    total, predicted, n = 0.0, 0, len(ids)
    while predicted < n:
        end = min(predicted + context, n)
        if predicted == 0:
            inputs, targets = [prefix] + ids[:end - 1], ids[:end]
        else:
            inputs, targets = ids[max(0, end - context - 1):end - 1], ids[predicted:end]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([inputs])).logits[0].float(), -1)
        rows = logprobs[len(inputs) - len(targets):]
        total -= float(rows.gather(1, torch.tensor(targets)[:, None]).sum())
        predicted = end
    return total


def straightforward_choice_loglik(model, tokenizer, context: str, continuation: str, max_length: int) -> float:
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    cont = whole[len(ctx):]
    sequence = (ctx + cont)[-(max_length + 1):]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([sequence[:-1]])).logits[0].float(), -1)
    return float(logprobs[-len(cont):].gather(1, torch.tensor(cont)[:, None]).sum())


def first_number(value) -> float:
    """The harness logs a response as nested lists (of strings in some versions)."""
    while isinstance(value, list):
        value = value[0]
    return float(value)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def run_lm_eval(python: str, checkpoint: Path, wikitext_path: Path, wikitext_limit: int | None, boolq_path: Path,
                boolq_limit: int, batch_size: int, work: Path) -> tuple[dict, dict, float, dict]:
    found = subprocess.run([python, "-c", "import json, lm_eval, pathlib; print(json.dumps(["
                            "lm_eval.__version__, str(pathlib.Path(lm_eval.__file__).parent / 'tasks')]))"],
                           capture_output=True, text=True, check=True)
    version, harness_tasks = json.loads(found.stdout)
    tasks_dir = work / "tasks"
    tasks_dir.mkdir()
    values = {"wikitext_yaml": json.dumps(str(Path(harness_tasks, "wikitext", "wikitext.yaml"))),
              "boolq_yaml": json.dumps(str(Path(harness_tasks, "super_glue", "boolq", "default.yaml"))),
              "wikitext_path": json.dumps(str(wikitext_path.resolve())),
              "boolq_path": json.dumps(str(boolq_path.resolve())),
              "wikitext_limit": wikitext_limit, "boolq_limit": boolq_limit}
    for name, text in TASKS_YAML.items():
        (tasks_dir / name).write_text(text.format(**values), encoding="utf-8")
    command = [python, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={checkpoint.resolve()},dtype=float32",
               "--tasks", "wikitext_rawfile,boolq_rawfile", "--include_path", str(tasks_dir), "--device", "cpu",
               "--batch_size", str(batch_size), "--output_path", str(work / "out"), "--log_samples"]
    print("lm-evaluation-harness:", " ".join(command))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=work)
    seconds = time.perf_counter() - started
    results_file = max((work / "out").rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    full = json.loads(results_file.read_text())
    samples = {}
    for task in ("wikitext_rawfile", "boolq_rawfile"):
        sample_file = next((work / "out").rglob(f"samples_{task}_*.jsonl"))
        samples[task] = [json.loads(line) for line in sample_file.read_text().splitlines()]
    about = {"version": version, "command": " ".join(command), "tasks": {n: t.format(**values) for n, t in
             TASKS_YAML.items() if n.endswith(".yaml")},
             "config": {k: full.get("config", {}).get(k) for k in ("model", "model_args", "batch_size", "device")},
             "prefix_token": "the harness's default (no prefix_token_id given)",
             "tokenizer_bos_token": full.get("tokenizer_bos_token"), "n-samples": full.get("n-samples")}
    return full["results"], samples, seconds, about


def significant(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="checkpoint dir (or a stage dir with a `latest` pointer)")
    parser.add_argument("--wikitext_path", required=True, help="raw WikiText-2 test file")
    parser.add_argument("--wikitext_limit", type=int, default=None, help="first N pages (default: all 62)")
    parser.add_argument("--boolq_path", required=True, help="BoolQ JSONL")
    parser.add_argument("--boolq_limit", type=int, default=None, help="first N questions (default: all)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lm_eval_python", default=None,
                        help="a Python with lm-evaluation-harness installed (lm_eval on PyPI); omitted: not compared")
    parser.add_argument("--straightforward", action=argparse.BooleanOptionalAction, default=True,
                        help="also the plain-loop computation (one unbatched pass per window or choice; slow)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "eval_parity.json"))
    args = parser.parse_args()

    checkpoint = resolve_checkpoint(args.model_path)
    model, tokenizer = load_model(checkpoint, CPU, torch.float32)
    context = model_context_length(model)
    prefix = tokenizer.bos_token_id  # the harness's default prefix token
    pages, wiki_info = load_wikitext(args.wikitext_path, args.wikitext_limit)
    items, boolq_info = load_boolq(args.boolq_path, args.boolq_limit)
    scored_text = [detokenize_wikitext(a) for a in pages]
    doc_ids = [tokenizer.encode(t, add_special_tokens=False) for t in scored_text]

    started = time.perf_counter()
    per_doc_scores = [sliding_window_score(model, [ids], prefix, context, context, args.batch_size, CPU)
                      for ids in doc_ids]
    total = LMScore()
    for score in per_doc_scores:
        total.add(score)
    per_doc_ours = [score.nll for score in per_doc_scores]
    ours_wiki = perplexity_metrics(total, text_stats(pages))
    ours_choice_lls: list[list[float]] = []
    ours_boolq = score_multiple_choice(model, tokenizer, items, prefix, context, args.batch_size, CPU,
                                       scores_out=ours_choice_lls)
    ours_seconds = time.perf_counter() - started

    if args.straightforward:
        started = time.perf_counter()
        per_doc_plain = [straightforward_rolling_nll(model, ids, prefix, context) for ids in doc_ids]
        plain_hits = 0
        for item in items:
            scores = [straightforward_choice_loglik(model, tokenizer, item.context, " " + c, context)
                      for c in item.choices]
            plain_hits += int(scores[1] > scores[0]) == item.answer
        plain_seconds = time.perf_counter() - started
    # Counted here by the harness's rule, written out, not through utils.evaluation.text_stats.
    words = sum(len(re.split(r"\s+", page)) for page in pages)
    size = sum(len(page.encode("utf-8")) for page in pages)
    report: dict = {
        "what": "WikiText-2 word perplexity / bits per byte and BoolQ accuracy: scripts/05_evaluate.py's evaluator "
                "(utils/evaluation.py) vs a plain-loop computation vs lm-evaluation-harness on the raw files",
        "machine": environment_info(CPU, torch.float32),
        "config": {
            "checkpoint": str(checkpoint), "context_length": context, "prefix_token_id": prefix,
            "dtype": "float32", "device": "cpu", "batch_size": args.batch_size,
            "wikitext": {**wiki_info.as_dict(used=len(pages)), "detokenized": True},
            "boolq": boolq_info.as_dict(used=len(items)),
        },
        "counts": {"pages": len(pages), "scored_tokens": total.tokens, "words": words, "bytes": size},
        "boolq_majority_baseline": ours_boolq["majority_baseline"],
        "ours": {"word_perplexity": ours_wiki["word_perplexity"], "byte_perplexity": ours_wiki["byte_perplexity"],
                 "bits_per_byte": ours_wiki["bits_per_byte"], "words": ours_wiki["words"], "bytes": ours_wiki["bytes"],
                 "boolq_accuracy": ours_boolq["accuracy"], "seconds": round(ours_seconds, 1)},
        "max_relative_difference_per_page_nll": {},
    }
    if args.straightforward:
        plain_nll = sum(per_doc_plain)
        report["straightforward"] = {"word_perplexity": math.exp(plain_nll / words),
                                     "bits_per_byte": plain_nll / (math.log(2) * size),
                                     "boolq_accuracy": plain_hits / len(items), "seconds": round(plain_seconds, 1)}
        report["max_relative_difference_per_page_nll"]["ours_vs_straightforward"] = max(
            relative(a, b) for a, b in zip(per_doc_ours, per_doc_plain))
    if args.lm_eval_python:
        with tempfile.TemporaryDirectory() as tmp:
            results, samples, seconds, about = run_lm_eval(
                args.lm_eval_python, checkpoint, Path(args.wikitext_path), args.wikitext_limit,
                Path(args.boolq_path), args.boolq_limit if args.boolq_limit is not None else len(items),
                args.batch_size, Path(tmp))
        by_doc = sorted(samples["wikitext_rawfile"], key=lambda s: s["doc_id"])
        harness_pages = [s["doc"]["page"] for s in by_doc]
        harness_doc_ll = [first_number(s["resps"]) for s in by_doc]
        boolq_samples = sorted(samples["boolq_rawfile"], key=lambda s: s["doc_id"])
        report["lm_eval"] = {
            "word_perplexity": results["wikitext_rawfile"]["word_perplexity,none"],
            "byte_perplexity": results["wikitext_rawfile"]["byte_perplexity,none"],
            "bits_per_byte": results["wikitext_rawfile"]["bits_per_byte,none"],
            "boolq_accuracy": results["boolq_rawfile"]["acc,none"],
            "pages": len(harness_pages), "boolq_questions": len(boolq_samples),
            "pages_differing_from_ours": sum(a != b for a, b in zip(harness_pages, pages)) + abs(
                len(harness_pages) - len(pages)),
            "boolq_labels_differing_from_ours": sum(
                int(s["doc"]["label"]) != i.answer for s, i in zip(boolq_samples, items)),
            "boolq_choices_picked_differently": sum(
                (o[1] > o[0]) != (first_number(s["resps"][1]) > first_number(s["resps"][0]))
                for s, o in zip(boolq_samples, ours_choice_lls)),
            "boolq_max_abs_difference_choice_loglikelihood": max(
                abs(first_number(s["resps"][k]) - o[k])
                for s, o in zip(boolq_samples, ours_choice_lls) for k in (0, 1)),
            "seconds": round(seconds, 1),
            **about,
        }
        report["max_relative_difference_per_page_nll"]["ours_vs_lm_eval"] = max(
            relative(o, -h) for h, o in zip(harness_doc_ll, per_doc_ours))
    keys = ("word_perplexity", "bits_per_byte", "boolq_accuracy")
    for name in ("straightforward", "lm_eval"):
        if name in report:
            report[f"ours_vs_{name}"] = {
                "relative_difference": {key: relative(report["ours"][key], report[name][key]) for key in keys},
                "equal_to_4_significant_digits": all(
                    significant(report["ours"][key]) == significant(report[name][key]) for key in keys),
            }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
