#!/usr/bin/env python
"""Benchmark of stage 01: MB/s of raw text through the whole stage (1 and 2 processes; also net of the
stage's fixed start-up cost) and through tokenisation alone, peak RSS of the stage, and the MinHash index's
memory per document; the same stage with the train/eval contamination check on (its slowdown).

Input: the public prose under ../shared/data when present (TinyStories, tiny shakespeare, WikiText-2 valid and
test, BoolQ passages, 6.1 MB of text), else the built-in corpus. MB are UTF-8 bytes of the documents' text.
Writes bench/results/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from utils.corpus import builtin_documents
from utils.data import CleaningSettings, ReadStats, clean_documents, read_documents
from utils.dedup import Deduplicator
from utils.tokenizer import encode_documents, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]

SHARED_TEXT = [
    "tinystories/tinystories_head.txt", "tinyshakespeare/input.txt", "wikitext-2-raw/wiki.valid.raw",
    "wikitext-2-raw/wiki.test.raw", "boolq/dev.jsonl",
]


def bench_inputs(work: Path) -> list[str]:
    shared = ROOT.parent / "shared" / "data"
    found = [str(shared / name) for name in SHARED_TEXT if (shared / name).is_file()]
    if found:
        return found
    path = work / "builtin.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in builtin_documents()), encoding="utf-8")
    return [str(path)]


def eval_sets() -> list[str]:
    """What the contamination check compares against: the shared WikiText-2 test and BoolQ dev, else the
    built-in eval sets."""
    shared = ROOT.parent / "shared" / "data"
    found = [str(shared / name) for name in ("wikitext-2-raw/wiki.test.raw", "boolq/dev.jsonl")
             if (shared / name).is_file()]
    return found or ["builtin-evals"]


def run_stage(inputs: list[str], out: Path, num_proc: int, extra: list[str]) -> dict:
    args = [sys.executable, "scripts/01_prepare_data.py", "--output_dir", str(out), "--overwrite",
            "--num_proc", str(num_proc), *extra]
    for path in inputs:
        args += ["--input_path", path]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        sys.exit(f"stage 01 failed:\n{done.stderr}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds": summary["seconds"], "phase_seconds": summary["phase_seconds"],
            "peak_rss_mib": round(max(peak_kib, before) / 1024, 1),
            "tokens": summary["train_tokens"] + summary["val_tokens"]}


def tokenisation_alone(inputs: list[str], tokenizer_dir: Path) -> float:
    tokenizer = load_tokenizer(tokenizer_dir)
    docs = list(read_documents(inputs, ReadStats()))
    start = time.perf_counter()
    for i in range(0, len(docs), 64):
        encode_documents(tokenizer, docs[i:i + 64])  # the call the stage makes
    return time.perf_counter() - start


def minhash_bytes_per_document(inputs: list[str], count: int = 2000) -> float:
    settings = CleaningSettings(language=None, drop_code=False, min_length=0)
    docs = clean_documents([d for _, d in zip(range(count), read_documents(inputs, ReadStats()))], settings)
    dedup = Deduplicator(settings.num_perm, threshold=0.8)
    tracemalloc.start()
    for doc in docs:
        dedup.duplicate_kind(doc.sha256, doc.minhash)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return size / len(docs)


def measure_round(inputs: list[str], work: Path, tokenizer_dir: Path) -> dict:
    """One round: the stage with 1 and 2 processes, its fixed cost, and tokenisation alone, back to back so
    that all four see the same machine load."""
    reuse = ["--tokenizer_path", str(tokenizer_dir)]
    one = run_stage(inputs, work / "p1", 1, reuse)
    two = run_stage(inputs, work / "p2", 2, reuse)
    against = [flag for spec in eval_sets() for flag in ("--decontaminate_against", spec)]
    checked = run_stage(inputs, work / "p2c", 2, [*reuse, *against])
    # The stage's fixed cost (imports, worker start-up, tokenizer load) on a few documents: what remains
    # is the streaming throughput a large corpus sees.
    fixed = run_stage(inputs, work / "fixed", 2, [*reuse, "--max_documents", "20", "--val_fraction", "0.5"])
    return {"one": one, "two": two, "checked": checked, "fixed": fixed["seconds"],
            "alone": tokenisation_alone(inputs, tokenizer_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="bench/results/prepare.json")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3, help="measurement rounds; medians are reported")
    args = parser.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = bench_inputs(work)
        raw_mb = sum(len(d.encode("utf-8")) for d in read_documents(inputs, ReadStats())) / 1e6
        trained = run_stage(inputs, work / "trained", 2, ["--vocab_size", str(args.vocab_size)])
        rounds = [measure_round(inputs, work, work / "trained" / "tokenizer") for _ in range(args.rounds)]
        one = statistics.median(r["one"]["seconds"] for r in rounds)
        two = statistics.median(r["two"]["seconds"] for r in rounds)
        checked = statistics.median(r["checked"]["seconds"] for r in rounds)
        fixed = statistics.median(r["fixed"] for r in rounds)
        alone = statistics.median(r["alone"] for r in rounds)
        result = {
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                        "python": platform.python_version()},
            "inputs": inputs, "raw_mb": round(raw_mb, 3), "vocab_size": args.vocab_size, "rounds": args.rounds,
            "stage_with_tokenizer_training_num_proc_2_mb_s": round(raw_mb / trained["seconds"], 3),
            "stage_num_proc_1_mb_s": round(raw_mb / one, 3),
            "stage_num_proc_2_mb_s": round(raw_mb / two, 3),
            "stage_num_proc_2_phase_seconds": rounds[-1]["two"]["phase_seconds"],
            "contamination_check_against": eval_sets(),
            "stage_num_proc_2_with_contamination_check_mb_s": round(raw_mb / checked, 3),
            "contamination_check_slowdown_per_round": [
                round(r["checked"]["seconds"] / r["two"]["seconds"] - 1, 3) for r in rounds],
            "contamination_check_slowdown": round(checked / two - 1, 3),
            "stage_fixed_seconds": fixed,
            "stage_num_proc_2_streaming_mb_s": round(raw_mb / (two - fixed), 3),
            "tokenisation_alone_1_process_mb_s": round(raw_mb / alone, 3),
            "stage_num_proc_2_vs_tokenisation_alone_per_round": [
                round(r["alone"] / r["two"]["seconds"], 3) for r in rounds],
            "peak_rss_mib": max(r[n]["peak_rss_mib"] for r in rounds for n in ("one", "two")),
            "minhash_index_bytes_per_document": round(minhash_bytes_per_document(inputs)),
            "tokens": rounds[-1]["two"]["tokens"],
        }
        for name in ("stage_num_proc_2_mb_s", "stage_num_proc_2_streaming_mb_s"):
            result[name.replace("_mb_s", "_vs_tokenisation_alone")] = round(
                result[name] / result["tokenisation_alone_1_process_mb_s"], 3)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
