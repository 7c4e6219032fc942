#!/usr/bin/env python
"""Writes small example datasets in every input format the pipeline reads, from the built-in offline corpus.

Pretraining text (01_prepare_data): .txt (documents separated by blank lines), .json, .jsonl, .parquet,
.jsonl.gz with a "text" field. SFT (03_sft): prompt/response, Alpaca, messages, ShareGPT and trl
prompt/completion records. Preferences (04_dpo): prompt/chosen/rejected and Anthropic HH {chosen, rejected}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from utils.chat_data import builtin_preferences, builtin_qa
from utils.cli import run_main
from utils.corpus import builtin_documents
from utils.files import atomic_write_text

SYSTEM = "You answer questions about the Python standard library."


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    """By suffix: .json (one list), .jsonl, .jsonl.gz, .parquet."""
    if path.name.endswith(".jsonl.gz"):
        def write(tmp: Path) -> None:
            with gzip.open(tmp, "wt", encoding="utf-8") as handle:
                handle.write(jsonl(records))
        write_atomic(path, write)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        write_atomic(path, lambda tmp: pq.write_table(pa.Table.from_pylist(records), tmp))
    elif path.suffix == ".jsonl":
        atomic_write_text(path, jsonl(records))
    else:
        atomic_write_text(path, json.dumps(records, indent=1, ensure_ascii=False) + "\n")


def sft_files(qa: list[tuple[str, str, str]]) -> dict[str, list[dict[str, Any]]]:
    def messages(q: str, a: str, user: str = "user", assistant: str = "assistant") -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM}, {"role": user, "content": q}, {"role": assistant, "content": a}]

    return {
        "sft_prompt_response.json": [{"prompt": q, "response": a} for _, q, a in qa],
        "sft_prompt_response.jsonl": [{"prompt": q, "response": a} for _, q, a in qa],
        "sft_alpaca.json": [
            {"instruction": "Answer the question about Python.", "input": q, "output": a} if i % 2 else
            {"instruction": q, "input": "", "output": a}
            for i, (_, q, a) in enumerate(qa)
        ],
        "sft_messages.jsonl": [
            {"messages": messages(q, a, *(("human", "gpt") if i % 2 else ("user", "assistant")))}
            for i, (_, q, a) in enumerate(qa)
        ],
        "sft_sharegpt.json": [
            {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for _, q, a in qa
        ],
        "sft_prompt_completion.jsonl": [
            {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for _, q, a in qa
        ],
    }


def preference_files(count: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    pairs = builtin_preferences(seed)[:count]

    def text(pair, reply) -> str:
        return f"\n\nHuman: {pair.prompt[0]['content']}\n\nAssistant: {reply[0]['content']}"

    return {
        "dpo_prompt_chosen_rejected.jsonl": [
            {"prompt": p.prompt[0]["content"], "chosen": p.chosen[0]["content"], "rejected": p.rejected[0]["content"]}
            for p in pairs
        ],
        "dpo_hh.jsonl": [{"chosen": text(p, p.chosen), "rejected": text(p, p.rejected)} for p in pairs],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="data/sample", help="where the files go")
    parser.add_argument("--num_examples", type=int, default=40, help="records per file")
    parser.add_argument("--seed", type=int, default=0, help="picks and phrases the built-in examples")
    args = parser.parse_args()
    if args.num_examples <= 0:
        raise ValueError(f"--num_examples must be positive, got {args.num_examples}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    documents = list(builtin_documents(limit=args.num_examples))
    atomic_write_text(out / "pretrain.txt", "\n\n".join(d.replace("\n\n", "\n") for d in documents) + "\n")
    files: dict[str, list[dict[str, Any]]] = {
        name: [{"text": d} for d in documents]
        for name in ("pretrain.json", "pretrain.jsonl", "pretrain.parquet", "pretrain.jsonl.gz")
    }
    files.update(sft_files(builtin_qa(args.seed)[:args.num_examples]))
    files.update(preference_files(args.num_examples, args.seed))
    for name, records in files.items():
        write_records(out / name, records)
    print(f"wrote {len(files) + 1} files with {args.num_examples} records each to {out}/:")
    for name in ["pretrain.txt", *files]:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    run_main(main)
