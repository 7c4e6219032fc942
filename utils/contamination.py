"""Train/eval contamination: which evaluation items share a word n-gram with the training documents.

The field's usual definition (GPT-3 paper, appendix C; lm-evaluation-harness's decontamination): lower-case
the text, keep the `\\w+` words (punctuation stripped), and call an eval item contaminated when any of its
n-grams (13 words by default) also occurs in a training document. Items shorter than n words cannot be
checked this way and are counted apart. The eval side's n-gram hashes (64-bit) are held in memory; the
training side streams through `check` a batch at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from utils.dedup import word_hashes, word_ngram_hashes
from utils.files import read_json, read_jsonl, read_text, sha256_file

BUILTIN_EVALS = "builtin-evals"
FORMATS = ("WikiText raw text (.raw/.txt), JSONL records (BoolQ, multiple-choice, prompts: .jsonl), "
           "a JSON list of prompts (.json)")
EXAMPLES_KEPT = 5


class ContaminationError(ValueError):
    pass


@dataclass
class EvalSet:
    name: str
    sha256: str | None
    items: list[str]


def _strings(value: Any) -> list[str]:
    """Every string inside a record: questions, passages, choices, message contents."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _read_eval_file(path: Path) -> list[str]:
    from utils.eval_data import split_articles

    suffix = path.suffix.lower()
    if suffix in (".raw", ".txt"):
        return split_articles(read_text(path, "eval set"))
    if suffix == ".jsonl":
        return [" ".join(_strings(record)) for _, record in read_jsonl(path, "eval set")]
    if suffix == ".json":
        data = read_json(path, "eval set")
        if not isinstance(data, list):
            raise ContaminationError(f"{path}: expected a JSON list of prompts or records")
        return [" ".join(_strings(item)) for item in data]
    raise ContaminationError(f"--decontaminate_against {path}: unknown format {suffix or '(no extension)'}; "
                             f"expected {FORMATS}, or {BUILTIN_EVALS}")


def builtin_eval_sets() -> list[EvalSet]:
    """What the pipeline scores without any eval file: 05's generation prompts, and the prompts and replies
    of the built-in SFT and DPO sets (their held-out parts give the SFT reply loss and DPO reward accuracy)."""
    from utils.chat_data import BUILTIN_DPO, BUILTIN_SFT, builtin_preferences, builtin_sft
    from utils.eval_data import DEFAULT_PROMPTS

    return [
        EvalSet(f"{BUILTIN_EVALS}:generate-prompts", None, list(DEFAULT_PROMPTS)),
        EvalSet(f"{BUILTIN_EVALS}:{BUILTIN_SFT.removeprefix('builtin:')}", None,
                [" ".join(_strings(messages)) for messages in builtin_sft()]),
        EvalSet(f"{BUILTIN_EVALS}:{BUILTIN_DPO.removeprefix('builtin:')}", None,
                [" ".join(_strings(pair.as_record())) for pair in builtin_preferences()]),
    ]


def load_eval_sets(specs: list[str]) -> list[EvalSet]:
    sets = []
    for spec in specs:
        if spec == BUILTIN_EVALS:
            sets += builtin_eval_sets()
            continue
        path = Path(spec)
        if not path.is_file():
            raise ContaminationError(f"--decontaminate_against {spec}: no such file; expected a file in one of "
                                     f"these formats: {FORMATS}, or {BUILTIN_EVALS}")
        sets.append(EvalSet(str(path), sha256_file(path), _read_eval_file(path)))
    return sets


@dataclass
class _SetResult:
    eval_set: EvalSet
    checkable: int
    hashes: np.ndarray  # sorted unique n-gram hashes of the set
    items: np.ndarray  # the items holding hashes[k] are items[starts[k]:starts[k + 1]]
    starts: np.ndarray
    matched: np.ndarray  # which of `hashes` a training document held
    documents: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


class ContaminationCheck:
    """Holds the eval sets' n-grams; `check` a batch of training documents, then `report`."""

    def __init__(self, eval_sets: list[EvalSet], n: int):
        if n < 1:
            raise ContaminationError(f"--decontaminate_ngram must be >= 1, got {n}")
        self.n = n
        self.results = [self._index(eval_set) for eval_set in eval_sets]

    def _index(self, eval_set: EvalSet) -> _SetResult:
        counts, hashed = word_hashes(eval_set.items) if eval_set.items else (np.zeros(0, np.int64), None)
        if hashed is None or not len(hashed):
            empty = np.zeros(0, np.int64)
            return _SetResult(eval_set, 0, empty.astype(np.uint64), empty, np.zeros(1, np.int64), empty.astype(bool))
        items, hashes = word_ngram_hashes(counts, hashed, self.n)
        order = np.argsort(hashes, kind="stable")
        hashes, items = hashes[order], items[order]
        unique, starts = np.unique(hashes, return_index=True)
        return _SetResult(eval_set, int((counts >= self.n).sum()), unique, items, np.append(starts, len(hashes)),
                          np.zeros(len(unique), dtype=bool))

    def check(self, texts: list[str], names: list[str]) -> list[bool]:
        """For each training document, whether it shares an n-gram with any eval set (recorded for the report)."""
        if not texts or not any(len(r.hashes) for r in self.results):
            return [False] * len(texts)
        counts, hashed = word_hashes(texts)
        documents, hashes = word_ngram_hashes(counts, hashed, self.n)
        overlapping = np.zeros(len(texts), dtype=bool)
        for result in self.results:
            if not len(result.hashes):
                continue
            # The eval side is sorted once in _index; a binary search per training n-gram beats np.isin, which
            # would sort both sides again for every batch.
            positions = np.minimum(np.searchsorted(result.hashes, hashes), len(result.hashes) - 1)
            hit = result.hashes[positions] == hashes
            if not hit.any():
                continue
            result.matched[positions[hit]] = True
            involved = np.unique(documents[hit])
            result.documents += len(involved)
            for index in involved[: max(0, EXAMPLES_KEPT - len(result.examples))]:
                result.examples.append({"document": names[index], "start": texts[index][:80]})
            overlapping[involved] = True
        return overlapping.tolist()

    def report(self) -> list[dict[str, Any]]:
        rows = []
        for r in self.results:
            contaminated = len(np.unique(r.items[np.repeat(r.matched, np.diff(r.starts))]))
            rows.append({
                "eval_set": r.eval_set.name, "sha256": r.eval_set.sha256, "items": len(r.eval_set.items),
                "checked_items": r.checkable, "too_short_items": len(r.eval_set.items) - r.checkable,
                "contaminated_items": contaminated,
                "share": round(contaminated / r.checkable, 4) if r.checkable else None,
                "training_documents": r.documents, "examples": r.examples,
            })
        return rows


def describe(rows: list[dict[str, Any]], n: int) -> list[str]:
    """The contamination table as printed lines."""
    lines = [f"contamination ({n}-gram overlap with the training documents):"]
    for row in rows:
        share = f"{row['share']:.1%}" if row["share"] is not None else "n/a"
        lines.append(f"  {row['eval_set']}: {row['contaminated_items']:,} of {row['checked_items']:,} checkable "
                     f"items ({share}; {row['too_short_items']:,} shorter than {n} words), "
                     f"{row['training_documents']:,} training documents")
    return lines
