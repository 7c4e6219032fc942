#!/usr/bin/env python
"""Stage 01: raw text → cleaned, deduplicated documents → trained tokenizer → train.bin / val.bin + meta.json.

Two streaming passes, so memory does not grow with the corpus (except the MinHash index):
  1. read → normalise → clean → language → exact and near dedup → split; workers clean batches of documents,
     the main process dedups them in input order and appends the kept ones to a temporary file per split;
  2. train the tokenizer on the training side (or reuse one), then workers tokenise byte ranges of those files
     and the main process appends the ids, in order, to the .bin files.
Everything is written into a temporary directory that is renamed into place at the end, so an interrupted run
leaves nothing that looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import multiprocessing
import shutil
import statistics
import time
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np

from utils.cli import StageSummary, progress, run_main
from utils.config import load_preset
from utils.contamination import BUILTIN_EVALS, FORMATS, ContaminationCheck, describe, load_eval_sets
from utils.corpus import BUILTIN_NAME, python_version
from utils.data import (
    TXT_SPLITS,
    CleanedDocument,
    CleaningSettings,
    DataError,
    ReadStats,
    check_text_like,
    clean_documents,
    expand_inputs,
    is_validation,
    load_filter_models,
    read_documents,
)
from utils.dedup import Deduplicator
from utils.files import atomic_directory, recover_interrupted_writes, sha256_file
from utils.tokenizer import encode_documents, load_tokenizer, tokenizer_sha256, train_tokenizer
from utils.tokens import META, TOKENIZER_DIR, TokenFileWriter, check_replaceable, token_dtype

FILTER_STEPS = ("code", "too_short", "too_long", "language", "exact_duplicate", "near_duplicate", "contamination")
STEP_FLAGS = {
    "code": "--drop_code/--code_threshold", "too_short": "--min_length", "too_long": "--max_length",
    "language": "--language/--language_threshold", "exact_duplicate": "(exact dedup)",
    "near_duplicate": "--use_minhash/--minhash_threshold", "contamination": "--decontaminate remove",
}
CLEAN_BATCH = 256  # documents per worker task: language ID and MinHash are vectorised over a batch
TOKENIZE_CHUNK_BYTES = 1 << 16  # of cleaned text per worker task
SPLITS = ("train", "val")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io_group = parser.add_argument_group("input and output")
    io_group.add_argument("--input_path", action="append", default=None,
                          help=f"file, directory, hub dataset id or {BUILTIN_NAME} (default); repeatable")
    io_group.add_argument("--text_field", default=None, help="JSON/parquet field holding the text (auto-detected)")
    io_group.add_argument("--txt_split", choices=TXT_SPLITS, default="blank_line",
                          help=".txt documents: one per blank-line-separated block, or one per file")
    io_group.add_argument("--dataset_config", default=None, help="hub dataset configuration name")
    io_group.add_argument("--split", default="train", help="hub dataset split (streamed)")
    io_group.add_argument("--output_dir", default=None, help="default: data/processed/<name>")
    io_group.add_argument("--name", default=None, help="dataset name for the default output dir")
    io_group.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    io_group.add_argument("--max_documents", type=int, default=0, help="read at most this many documents (0 = all)")
    io_group.add_argument("--strict", action="store_true", help="fail on the first malformed JSON line")
    io_group.add_argument("--validate_only", action="store_true",
                          help="read and report (formats, fields, counts, lengths, languages, duplicates); "
                               "write nothing")
    clean = parser.add_argument_group("cleaning and filtering (each step reports kept/removed)")
    clean.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                       help="NFC, strip control characters, normalise whitespace")
    clean.add_argument("--remove_urls", action=argparse.BooleanOptionalAction, default=True,
                       help="remove http(s)://, ftp:// and www. URLs from the text")
    clean.add_argument("--drop_code", action=argparse.BooleanOptionalAction, default=True,
                       help="drop documents whose lines are mostly source code")
    clean.add_argument("--code_threshold", type=float, default=0.5,
                       help="share of code-like lines that drops a document")
    clean.add_argument("--min_length", type=int, default=50, help="minimum document length in characters")
    clean.add_argument("--max_length", type=int, default=0, help="maximum document length in characters (0 = none)")
    clean.add_argument("--language", default="en", help="keep this language only ('' or 'none' to disable)")
    clean.add_argument("--language_threshold", type=float, default=0.5, help="minimum language probability")
    clean.add_argument("--use_minhash", action=argparse.BooleanOptionalAction, default=True,
                       help="near-duplicate removal with MinHash LSH")
    clean.add_argument("--minhash_threshold", type=float, default=0.8, help="Jaccard similarity of near duplicates")
    clean.add_argument("--num_perm", type=int, default=128, help="MinHash permutations")
    clean.add_argument("--shingle_size", type=int, default=5, help="words per MinHash shingle")
    contamination = parser.add_argument_group("train/eval contamination (n-gram overlap with evaluation sets)")
    contamination.add_argument("--decontaminate_against", action="append", default=[], metavar="PATH",
                               help=f"an evaluation set to check the training documents against: {FORMATS}; "
                                    f"or {BUILTIN_EVALS} (what the pipeline scores by default); repeatable")
    contamination.add_argument("--decontaminate", choices=("report", "remove"), default="report",
                               help="report the overlap in meta.json, or also remove the overlapping training "
                                    "documents (counted under the filter 'contamination')")
    contamination.add_argument("--decontaminate_ngram", type=int, default=13,
                               help="words per n-gram (13, as in GPT-3 and lm-evaluation-harness)")
    split = parser.add_argument_group("split and tokenizer")
    split.add_argument("--val_fraction", type=float, default=0.05, help="share of documents held out for validation")
    split.add_argument("--seed", type=int, default=1234, help="seed of the train/validation split")
    split.add_argument("--config", default=None, help="preset whose vocab_size is the default (e.g. config/tiny.json)")
    split.add_argument("--vocab_size", type=int, default=None,
                       help="BPE vocabulary size (default 32768, or the preset's)")
    split.add_argument("--tokenizer_sample_bytes", type=int, default=200_000_000,
                       help="train the tokenizer on at most this many bytes of training text (0 = all)")
    split.add_argument("--tokenizer_path", default=None, help="reuse this Hugging Face tokenizer instead of training")
    split.add_argument("--num_proc", type=int, default=max(1, min(4, multiprocessing.cpu_count())),
                       help="worker processes for cleaning and tokenisation")
    args = parser.parse_args()
    if args.language and args.language.lower() == "none":
        args.language = ""
    if not 0 <= args.val_fraction < 1:
        parser.error("--val_fraction must be in [0, 1)")
    if args.num_proc < 1:
        parser.error("--num_proc must be >= 1")
    return args


def cleaning_settings(args: argparse.Namespace) -> CleaningSettings:
    return CleaningSettings(
        normalize=args.normalize, remove_urls=args.remove_urls, drop_code=args.drop_code,
        code_threshold=args.code_threshold, min_length=args.min_length, max_length=args.max_length,
        language=args.language or None, language_threshold=args.language_threshold,
        use_minhash=args.use_minhash, num_perm=args.num_perm, shingle_size=args.shingle_size,
    )


def default_name(inputs: list[str]) -> str:
    first = inputs[0]
    if first.startswith("builtin:"):
        return first.split(":", 1)[1]
    stem = Path(first).name.split(".")[0] if Path(first).exists() else first.replace("/", "__")
    return stem or "dataset"


def batched(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def parallel_map(function, batches, num_proc: int):
    """Ordered map over a stream of batches, in worker processes when num_proc > 1."""
    if num_proc == 1:
        yield from map(function, batches)
        return
    with multiprocessing.get_context("fork").Pool(num_proc) as pool:
        yield from pool.imap(function, batches)


class FilterReport:
    """Per-step counts: how many documents each filter removed, in pipeline order."""

    def __init__(self, settings: CleaningSettings, removes_contaminated: bool = False):
        self.enabled = {
            "code": settings.drop_code, "too_short": settings.min_length > 0, "too_long": settings.max_length > 0,
            "language": bool(settings.language), "exact_duplicate": True, "near_duplicate": settings.use_minhash,
            "contamination": removes_contaminated,
        }
        self.removed: Counter = Counter()
        self.languages: Counter = Counter()
        self.lengths: list[int] = []
        self.kept = 0

    def record(self, document: CleanedDocument, removed_by: str | None) -> None:
        if document.language:
            self.languages[document.language] += 1
        if removed_by:
            self.removed[removed_by] += 1
        else:
            self.kept += 1
            self.lengths.append(len(document.text))

    def steps(self, total: int) -> list[dict]:
        rows, remaining = [], total
        for step in FILTER_STEPS:
            removed = self.removed[step]
            remaining -= removed
            rows.append({"step": step, "enabled": self.enabled[step], "removed": removed, "kept": remaining})
        return rows

    def check_not_empty(self, stats: ReadStats, inputs: list[str]) -> None:
        if self.kept:
            return
        total = stats.records
        if not total:
            empty = ", ".join(spec for spec in inputs if not stats.records_by_input[spec])
            raise DataError(f"no documents in {empty} (empty files, or no records with text)")
        worst = max(FILTER_STEPS, key=lambda s: self.removed[s])
        raise DataError(
            f"every document was removed: filter '{worst}' removed {self.removed[worst]} of {total} "
            f"(loosen {STEP_FLAGS[worst]}); removed per filter: {dict(self.removed)}"
        )

    def length_distribution(self) -> dict:
        if not self.lengths:
            return {}
        ordered = sorted(self.lengths)
        quantile = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
        return {
            "min": ordered[0], "p10": quantile(0.1), "median": int(statistics.median(ordered)),
            "p90": quantile(0.9), "max": ordered[-1], "mean": round(statistics.fmean(ordered), 1),
        }


@contextlib.contextmanager
def paused_garbage_collection():
    """The dedup index grows to millions of small sets that no reference cycle involves; the garbage
    collector's full passes would re-scan all of them, again and again as it grows."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def cleaned_file(directory: Path, split: str) -> Path:
    """Pass 1's output for one split: one JSON string (a kept document) per line."""
    return directory / f"{split}.documents.tmp"


def filter_documents(args, inputs: list[str], settings: CleaningSettings, stats: ReadStats, cleaned_dir: Path | None,
                     contamination: ContaminationCheck | None = None):
    """Pass 1. Writes kept documents to one file per split in `cleaned_dir` (None = validate only)."""
    remove_contaminated = contamination is not None and args.decontaminate == "remove"
    report = FilterReport(settings, remove_contaminated)
    dedup = Deduplicator(settings.num_perm, args.minhash_threshold, near=settings.use_minhash)
    raw = read_documents(inputs, stats, args.text_field, args.txt_split, args.strict, args.dataset_config, args.split)
    if args.max_documents:
        raw = itertools.islice(raw, args.max_documents)
    load_filter_models(settings)
    batches = parallel_map(partial(clean_documents, settings=settings), batched(raw, CLEAN_BATCH), args.num_proc)
    split_counts = Counter()
    with contextlib.ExitStack() as files, paused_garbage_collection():
        sinks = {
            split: files.enter_context(open(cleaned_file(cleaned_dir, split), "w", encoding="utf-8", buffering=1 << 20))
            for split in SPLITS
        } if cleaned_dir else {}

        def keep(document: CleanedDocument, split: str) -> None:
            report.record(document, None)
            split_counts[split] += 1
            if sinks:
                sinks[split].write(json.dumps(document.text) + "\n")

        pending: list[CleanedDocument] = []  # training documents waiting for the contamination check

        def check_pending() -> None:
            overlapping = contamination.check([d.text for d in pending], [d.sha256[:12] for d in pending])
            for document, overlaps in zip(pending, overlapping):
                if overlaps and remove_contaminated:
                    report.record(document, "contamination")
                else:
                    keep(document, "train")
            pending.clear()

        for document in progress(itertools.chain.from_iterable(batches), desc="filter", unit="doc"):
            removed_by = document.removed_by or dedup.duplicate_kind(document.sha256, document.minhash)
            if removed_by:
                report.record(document, removed_by)
                continue
            split = "val" if is_validation(document.sha256, args.seed, args.val_fraction) else "train"
            if contamination is None or split == "val":
                keep(document, split)
                continue
            pending.append(document)
            if len(pending) == CLEAN_BATCH:
                check_pending()
        if pending:
            check_pending()
    check_text_like(stats, inputs)
    report.check_not_empty(stats, inputs)
    return report, split_counts


def cleaned_texts(path: Path):
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


def line_ranges(path: Path, chunk_bytes: int):
    """(path, start, end) byte ranges of about `chunk_bytes` that end at line ends, in file order."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        start = 0
        while start < size:
            handle.seek(min(start + chunk_bytes, size))
            handle.readline()
            yield path, start, handle.tell()
            start = handle.tell()


_worker_tokenizer = None  # set before the pool forks, so workers inherit it instead of loading it again


def _encode_range(job: tuple[Path, int, int]) -> tuple[Path, np.ndarray, int]:
    """The documents in one byte range of a cleaned file as one array of ids, each document followed by EOS.
    Workers read their own ranges, so the main process only writes what comes back."""
    path, start, end = job
    with open(path, "rb") as handle:
        handle.seek(start)
        texts = [json.loads(line) for line in handle.read(end - start).splitlines()]
    eos = [_worker_tokenizer.eos_token_id]
    encoded = encode_documents(_worker_tokenizer, texts)
    return path, np.fromiter(itertools.chain.from_iterable(ids + eos for ids in encoded), dtype=np.int64), len(texts)


def tokenize_splits(cleaned_dir: Path, tokenizer, out_dir: Path, dtype, num_proc: int, total: int):
    """Pass 2: ordered parallel tokenisation streamed into `train.bin` and `val.bin`."""
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    writers = {cleaned_file(cleaned_dir, split): TokenFileWriter(out_dir / f"{split}.bin", dtype) for split in SPLITS}
    jobs = itertools.chain.from_iterable(line_ranges(path, TOKENIZE_CHUNK_BYTES) for path in writers)
    try:
        bar = progress(total=total, desc="tokenize", unit="doc")
        for path, ids, documents in parallel_map(_encode_range, jobs, num_proc):
            writers[path].write_documents(ids, documents)
            bar.update(documents)
        bar.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.close()
    return {split: writers[cleaned_file(cleaned_dir, split)] for split in SPLITS}


def rebalance_empty_validation(cleaned_dir: Path, split_counts: Counter) -> bool:
    """A tiny corpus can hash no document into validation; then the last training document moves there."""
    if split_counts["val"] or split_counts["train"] < 2:
        return False
    train, val = cleaned_file(cleaned_dir, "train"), cleaned_file(cleaned_dir, "val")
    lines = train.read_text(encoding="utf-8").splitlines(keepends=True)
    train.write_text("".join(lines[:-1]), encoding="utf-8")
    val.write_text(lines[-1], encoding="utf-8")
    split_counts["train"] -= 1
    split_counts["val"] += 1
    return True


def prepare_tokenizer(args, cleaned_dir: Path, tokenizer_dir: Path, vocab_size: int):
    if args.tokenizer_path:
        tokenizer = load_tokenizer(args.tokenizer_path)
        if (args.vocab_size or args.config) and vocab_size != len(tokenizer):
            source = (f"--vocab_size {args.vocab_size}" if args.vocab_size
                      else f"{args.config}'s vocab_size {vocab_size}")
            print(f"note: {source} is not used: the vocabulary is --tokenizer_path's {len(tokenizer):,} tokens")
        shutil.copytree(args.tokenizer_path, tokenizer_dir)
        return tokenizer
    print(f"training a {vocab_size}-token SentencePiece BPE tokenizer …", flush=True)
    return train_tokenizer(
        cleaned_texts(cleaned_file(cleaned_dir, "train")), vocab_size, tokenizer_dir, args.tokenizer_sample_bytes,
        num_threads=args.num_proc,
    )


class PhaseTimer:
    """Wall seconds of each phase, for the summary: where a long run spends its time."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self.last, 2)
        self.last = now


def resolve_vocab_size(args) -> int:
    if args.vocab_size:
        return args.vocab_size
    return load_preset(args.config).vocab_size if args.config else 32768


def contamination_check(args) -> ContaminationCheck | None:
    if not args.decontaminate_against:
        return None
    return ContaminationCheck(load_eval_sets(args.decontaminate_against), args.decontaminate_ngram)


def contamination_card(args, check: ContaminationCheck | None) -> dict | None:
    """meta.json's contamination table, printed as well."""
    if check is None:
        return None
    rows = check.report()
    print("\n".join(describe(rows, check.n)))
    return {"ngram": check.n, "mode": args.decontaminate, "eval_sets": rows}


def validation_report(args, inputs, settings) -> int:
    stats = ReadStats()
    check = contamination_check(args)
    report, split_counts = filter_documents(args, inputs, settings, stats, None, check)
    result = {
        "inputs": inputs, "read": stats.as_dict(), "filters": report.steps(stats.records),
        "kept_documents": report.kept, "split": dict(split_counts), "length_chars": report.length_distribution(),
        "languages": dict(report.languages.most_common(10)), "contamination": contamination_card(args, check),
    }
    print(json.dumps(result, indent=2))
    return 0


def main() -> int:
    args = parse_args()
    inputs = expand_inputs(args.input_path or [BUILTIN_NAME])
    settings = cleaning_settings(args)
    if args.validate_only:
        return validation_report(args, inputs, settings)
    output_dir = Path(args.output_dir or Path("data/processed") / (args.name or default_name(inputs)))
    for note in [*recover_interrupted_writes(output_dir.parent, only=output_dir.name),
                 *recover_interrupted_writes(output_dir)]:
        print(f"note: {note}")
    replaced = check_replaceable(output_dir, inputs, args.overwrite)
    vocab_size = resolve_vocab_size(args)
    check = contamination_check(args)
    summary = StageSummary("01_prepare_data", inputs=inputs, output_dir=str(output_dir))
    stats = ReadStats()
    with atomic_directory(output_dir) as tmp:
        phases = PhaseTimer()
        report, split_counts = filter_documents(args, inputs, settings, stats, tmp, check)
        phases.lap("filter")
        contamination = contamination_card(args, check)
        val_forced = rebalance_empty_validation(tmp, split_counts)
        tokenizer = prepare_tokenizer(args, tmp, tmp / TOKENIZER_DIR, vocab_size)
        phases.lap("tokenizer")
        dtype = token_dtype(len(tokenizer))
        writers = tokenize_splits(tmp, tokenizer, tmp, dtype, args.num_proc, sum(split_counts.values()))
        phases.lap("tokenize")
        for split in SPLITS:
            cleaned_file(tmp, split).unlink()
        meta = {
            "vocab_size": len(tokenizer),
            "dtype": dtype.name,
            "train_tokens": writers["train"].tokens, "val_tokens": writers["val"].tokens,
            "train_documents": writers["train"].documents, "val_documents": writers["val"].documents,
            "validation_forced": val_forced,
            "source": {"inputs": inputs, "text_field": args.text_field, "txt_split": args.txt_split,
                       "dataset_config": args.dataset_config, "split": args.split,
                       **({"python_version": python_version()} if BUILTIN_NAME in inputs else {})},
            "tokenizer_sha256": tokenizer_sha256(tmp / TOKENIZER_DIR),
            "tokenizer_source": args.tokenizer_path or "trained",
            "read": stats.as_dict(),
            "filters": report.steps(stats.records),
            "length_chars": report.length_distribution(),
            "languages": dict(report.languages.most_common(10)),
            "contamination": contamination,
            "settings": {k: v for k, v in vars(args).items() if k not in ("input_path",)},
            "files": {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    chars_per_token = sum(report.lengths) / max(1, meta["train_tokens"] + meta["val_tokens"])
    summary.add(
        documents_read=stats.records, documents_kept=report.kept,
        removed={k: v for k, v in report.removed.items() if v}, malformed_records=stats.malformed,
        train_documents=meta["train_documents"], val_documents=meta["val_documents"],
        train_tokens=meta["train_tokens"], val_tokens=meta["val_tokens"], vocab_size=meta["vocab_size"],
        characters_per_token=round(chars_per_token, 2), phase_seconds=phases.seconds,
    )
    summary.finish(output_dir)
    if replaced:
        print(f"replaced the previous run's {', '.join(replaced)} in {output_dir}")
    return 0


if __name__ == "__main__":
    run_main(main)
