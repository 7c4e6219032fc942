#!/usr/bin/env python
"""Evaluation parity: our WikiText-2 and BoolQ numbers against an independent straightforward computation on
the same checkpoint and, when given a Python that has lm-evaluation-harness, against the harness itself.

  python bench/bench_eval_parity.py --model_path checkpoints/pretrain/tiny \
      --wikitext_path ../shared/data/wikitext-2-raw/wiki.test.raw --boolq_path ../shared/data/boolq/dev.jsonl \
      [--lm_eval_python .venv-lmeval/bin/python]

The straightforward computation shares nothing with utils/evaluation.py but the model: it rebuilds the
harness's disjoint rolling windows and BoolQ continuations in plain loops, one unbatched forward pass per
window or choice. The harness runs as `python -m lm_eval --model hf` on the checkpoint directory as it is,
with local copies of the same articles and questions (its `wikitext` and `boolq` task definitions, read
from files instead of the hub). Writes bench/results/eval_parity.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from utils.checkpoint import load_model, resolve_checkpoint  # noqa: E402
from utils.eval_data import detokenize_wikitext, load_boolq, load_wikitext  # noqa: E402
from utils.evaluation import (  # noqa: E402
    model_context_length,
    perplexity_metrics,
    score_multiple_choice,
    sliding_window_score,
    text_stats,
)
from utils.results import environment_info  # noqa: E402

CPU = torch.device("cpu")

# Local stand-ins for the harness's `wikitext` and `boolq` tasks: same output types, prompts and metrics;
# documents come from a JSONL written by this script.
TASKS_YAML = {
    "wikitext_local.yaml": """task: wikitext_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {wikitext_jsonl}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: !function parity_tasks.doc_to_target
process_results: !function parity_tasks.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "boolq_local.yaml": """task: boolq_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {boolq_jsonl}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{passage}}}}\\nQuestion: {{{{question}}}}?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["no", "yes"]
metric_list:
  - metric: acc
""",
    "parity_tasks.py": """import sys
sys.path.insert(0, {root!r})
from utils.eval_data import detokenize_wikitext


def doc_to_target(doc):
    return detokenize_wikitext(doc["page"])


def process_results(doc, results):
    (loglikelihood,) = results
    words, size = len(doc["page"].split()), len(doc["page"].encode("utf-8"))
    return {{"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}}
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


def run_lm_eval(python: str, checkpoint: Path, articles: list[str], items, prefix: int, batch_size: int,
                work: Path) -> tuple[dict, dict, float]:
    wikitext_jsonl, boolq_jsonl = work / "wikitext.jsonl", work / "boolq.jsonl"
    wikitext_jsonl.write_text("".join(json.dumps({"page": a}) + "\n" for a in articles), encoding="utf-8")
    boolq_jsonl.write_text("".join(json.dumps({
        "passage": i.context.split("\nQuestion: ")[0],
        "question": i.context.split("\nQuestion: ")[1].removesuffix("?\nAnswer:"),
        "label": i.answer}) + "\n" for i in items), encoding="utf-8")
    tasks_dir = work / "tasks"
    tasks_dir.mkdir()
    for name, text in TASKS_YAML.items():
        (tasks_dir / name).write_text(text.format(wikitext_jsonl=wikitext_jsonl, boolq_jsonl=boolq_jsonl,
                                                  root=str(ROOT)), encoding="utf-8")
    command = [python, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={checkpoint},dtype=float32,prefix_token_id={prefix}",
               "--tasks", "wikitext_local,boolq_local", "--include_path", str(tasks_dir), "--device", "cpu",
               "--batch_size", str(batch_size), "--output_path", str(work / "out"), "--log_samples"]
    print("lm-evaluation-harness:", " ".join(command))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    results_file = max((work / "out").rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    results = json.loads(results_file.read_text())["results"]
    samples = {}
    for task in ("wikitext_local", "boolq_local"):
        sample_file = next((work / "out").rglob(f"samples_{task}_*.jsonl"))
        samples[task] = [json.loads(line) for line in sample_file.read_text().splitlines()]
    return results, samples, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="checkpoint dir (or a stage dir with a `latest` pointer)")
    parser.add_argument("--wikitext_path", required=True, help="raw WikiText-2 test file")
    parser.add_argument("--wikitext_limit", type=int, default=None, help="first N articles (default: all 62)")
    parser.add_argument("--boolq_path", required=True, help="BoolQ JSONL")
    parser.add_argument("--boolq_limit", type=int, default=300, help="first N questions (default: 300)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lm_eval_python", default=None,
                        help="a Python with lm-evaluation-harness installed (lm_eval on PyPI); omitted: not compared")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "eval_parity.json"))
    args = parser.parse_args()

    checkpoint = resolve_checkpoint(args.model_path)
    model, tokenizer = load_model(checkpoint, CPU, torch.float32)
    context = model_context_length(model)
    prefix = tokenizer.eos_token_id
    articles, _ = load_wikitext(args.wikitext_path, args.wikitext_limit)
    items, _ = load_boolq(args.boolq_path, args.boolq_limit)
    scored_text = [detokenize_wikitext(a) for a in articles]
    doc_ids = [tokenizer.encode(t, add_special_tokens=False) for t in scored_text]

    started = time.perf_counter()
    per_doc_ours = [sliding_window_score(model, [ids], prefix, context, context, args.batch_size, CPU).nll
                    for ids in doc_ids]
    ours_wiki = perplexity_metrics(sliding_window_score(model, doc_ids, prefix, context, context, args.batch_size, CPU),
                                   text_stats(articles))
    ours_boolq = score_multiple_choice(model, tokenizer, items, prefix, context, args.batch_size, CPU)
    ours_seconds = time.perf_counter() - started

    started = time.perf_counter()
    per_doc_plain = [straightforward_rolling_nll(model, ids, prefix, context) for ids in doc_ids]
    plain_hits, plain_lls = 0, []
    for item in items:
        scores = [straightforward_choice_loglik(model, tokenizer, item.context, " " + c, context) for c in item.choices]
        plain_lls.append(scores)
        plain_hits += int(scores[1] > scores[0]) == item.answer
    plain_seconds = time.perf_counter() - started
    words, size = text_stats(articles).words, text_stats(articles).bytes
    plain_nll = sum(per_doc_plain)
    report: dict = {
        "checkpoint": str(checkpoint),
        "context_length": context,
        "articles": len(articles),
        "boolq_questions": len(items),
        "environment": environment_info(CPU, torch.float32),
        "ours": {"word_perplexity": ours_wiki["word_perplexity"], "bits_per_byte": ours_wiki["bits_per_byte"],
                 "boolq_accuracy": ours_boolq["accuracy"], "seconds": round(ours_seconds, 1)},
        "straightforward": {"word_perplexity": math.exp(plain_nll / words),
                            "bits_per_byte": plain_nll / (math.log(2) * size),
                            "boolq_accuracy": plain_hits / len(items), "seconds": round(plain_seconds, 1)},
        "max_relative_difference_per_article_nll": max(relative(a, b) for a, b in zip(per_doc_ours, per_doc_plain)),
    }
    detok_mismatch = None
    if args.lm_eval_python:
        check = subprocess.run([args.lm_eval_python, "-c", (
            "import json,sys; from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer as d; "
            "print(json.dumps([d({'page': a}) for a in json.load(sys.stdin)]))")],
            input=json.dumps(articles), capture_output=True, text=True, check=True)
        detok_mismatch = sum(a != b for a, b in zip(json.loads(check.stdout), scored_text))
        with tempfile.TemporaryDirectory() as tmp:
            results, samples, seconds = run_lm_eval(args.lm_eval_python, checkpoint, articles, items, prefix,
                                                    args.batch_size, Path(tmp))
        by_doc = sorted(samples["wikitext_local"], key=lambda s: s["doc_id"])
        harness_doc_ll = [first_number(s["resps"]) for s in by_doc]
        report["lm_eval"] = {
            "word_perplexity": results["wikitext_local"]["word_perplexity,none"],
            "bits_per_byte": results["wikitext_local"]["bits_per_byte,none"],
            "boolq_accuracy": results["boolq_local"]["acc,none"],
            "seconds": round(seconds, 1),
            "detokenizer_mismatched_articles": detok_mismatch,
            "max_relative_difference_per_article_nll": max(
                relative(-float(h), o) for h, o in zip(harness_doc_ll, per_doc_ours)),
        }
    for name in ("straightforward", "lm_eval"):
        if name in report:
            report[f"ours_vs_{name}_relative_difference"] = {
                key: relative(report["ours"][key], report[name][key])
                for key in ("word_perplexity", "bits_per_byte", "boolq_accuracy")
            }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "environment"}, indent=2))


if __name__ == "__main__":
    main()
