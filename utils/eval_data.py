"""Evaluation sets from local files, or from the dataset hub when a `hub[:id[:config[:split]]]` spec is given.

Read here: WikiText-style raw text (split into pages as lm-evaluation-harness's `wikitext` task has them),
BoolQ (original and SuperGLUE JSONL), generic multiple-choice JSONL with a field mapping, and smoke-test
prompts (optionally with reference answers). A bad record is named by file,
line and field, with the format that was expected.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.checkpoint import ADAPTER_CONFIG, CheckpointError, adapter_base_path, resolve_checkpoint
from utils.files import read_json, read_text, sha256_file
from utils.messages import MessageError, validate_messages


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: the answer is the index of the right choice."""

    context: str
    choices: tuple[str, ...]
    answer: int
    source: str = field(default="", compare=False)


HUB = "hub"
WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")  # the id "wikitext" moved there
BOOLQ_HUB = ("google/boolq", None, "validation")
MC_FIELDS = ("context", "choices", "answer")
# A top-level WikiText heading line: " = Title = " (sections are " = = Title = = ").
ARTICLE_HEADING = re.compile(r" = [^=].* = ")
BOOLQ_FORMATS = (
    "BoolQ JSONL: one object per line, {question, passage, answer: true/false} (original) "
    "or {question, passage, label: 0/1} (SuperGLUE)"
)


class EvalDataError(ValueError):
    pass


class SourceUnavailable(RuntimeError):
    """A hub dataset could not be reached (offline): the task is skipped with this note, not failed."""


@dataclass(frozen=True)
class SourceInfo:
    """What was read: the file or hub id, the sha256 of its bytes (or of the hub text), its record count."""

    name: str
    sha256: str
    records: int

    def as_dict(self, used: int) -> dict[str, Any]:
        return {"source": self.name, "sha256": self.sha256, "records": self.records, "used": used}


def is_hub(spec: str) -> bool:
    return spec == HUB or spec.startswith(HUB + ":")


def _hub_rows(spec: str, default: tuple[str, str | None, str]) -> tuple[list[dict[str, Any]], str]:
    """Rows of `hub[:id[:config[:split]]]` (missing parts from `default`) and the id they came from."""
    parts = spec.split(":")[1:]
    dataset, config, split = [p or d for p, d in zip(parts + [None] * 3, default)]
    name = f"{HUB}:{dataset}" + (f":{config}" if config else "") + f":{split}"
    try:
        from datasets import load_dataset

        rows = list(load_dataset(dataset, config, split=split))
    except Exception as err:  # noqa: BLE001 - any hub failure (offline, unknown id) means: not available here
        raise SourceUnavailable(f"{name} could not be loaded ({type(err).__name__}: {err})") from None
    return rows, name


def _check_limit(limit: int | None, available: int, what: str, source: str) -> int:
    if limit is None:
        return available
    if limit < 1:
        raise EvalDataError(f"{what} must be >= 1, got {limit}")
    if limit > available:
        raise EvalDataError(f"{what} {limit} is larger than the {available} records in {source}")
    return limit


def split_articles(text: str) -> list[str]:
    """WikiText raw text → one string per article, each starting at its ` = Title = ` line.

    The articles concatenate back to `text` exactly (anything before the first heading stays with the
    first article), so words and bytes are counted on the same text that is scored.
    """
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if ARTICLE_HEADING.fullmatch(line)]
    if not starts:
        return [text] if text.strip() else []
    bounds = [0] + starts[1:] + [len(lines)]
    articles = ["\n".join(lines[a:b]) for a, b in zip(bounds, bounds[1:])]
    # Re-attach the newline that `split` consumed between articles.
    return [a + "\n" for a in articles[:-1]] + articles[-1:]


def wikitext_pages(text: str) -> list[str]:
    """WikiText raw text → its pages, exactly as lm-evaluation-harness's `wikitext` task reads them.

    The harness's documents (the `EleutherAI/wikitext_document_level` data set) are made from the raw file
    this way: split at "\n"; a line whose stripped text, with "= = =" and "= =" closed up, starts with "= "
    and ends with " =" (a top-level ` = Title = ` heading) starts a new page; the lines of a page are joined
    with "\n" again, and a page that is only whitespace (the " \n" before the first heading) is dropped.
    So, unlike `split_articles`, the newline between two pages belongs to neither, and the last page keeps
    the file's final newline. Words and bytes are counted on these pages (see `utils.evaluation.text_stats`).
    """
    pages: list[str] = []
    lines: list[str] = []
    for line in text.split("\n"):
        closed = line.replace("= = =", "===").replace("= =", "==").strip()
        if closed.startswith("= ") and closed.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    page = "\n".join(lines)
    if page.strip():
        pages.append(page)
    return pages


# lm-evaluation-harness's `wikitext` task scores each article after undoing WikiText's tokenisation
# (" @-@ " → "-", " , " → ", " …) while counting words and bytes on the original article. The same rules,
# in the same order: (pattern, replacement, is_regex).
DETOKENIZE_RULES: tuple[tuple[str, str, bool], ...] = (
    ("s '", "s'", False),
    (r"/' [0-9]/", r"/'[0-9]/", True),
    (" @-@ ", "-", False),
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    (" : ", ": ", False),
    (" ; ", "; ", False),
    (" . ", ". ", False),
    (" ! ", "! ", False),
    (" ? ", "? ", False),
    (" , ", ", ", False),
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    ("= = = =", "====", False),
    ("= = =", "===", False),
    ("= =", "==", False),
    (" \u00b0 ", "\u00b0", False),
    (" \n", "\n", False),
    ("\n ", "\n", False),
    (" N ", " 1 ", False),
    (" 's", "'s", False),
)


def detokenize_wikitext(text: str) -> str:
    for pattern, replacement, is_regex in DETOKENIZE_RULES:
        text = re.sub(pattern, replacement, text) if is_regex else text.replace(pattern, replacement)
    return text


def _read_text_file(path: Path, flag: str) -> str:
    if not path.is_file():
        raise EvalDataError(f"{flag}: {path} does not exist or is not a file")
    text = read_text(path, flag)
    first = text.lstrip()[:1]
    if first in "{[" and first:
        raise EvalDataError(
            f"{flag}: {path} looks like JSON, but a raw text file is expected (such as WikiText-2's wiki.test.raw)"
        )
    if not text.strip():
        raise EvalDataError(f"{flag}: {path} is empty")
    return text


def load_wikitext(spec: str, limit: int | None = None) -> tuple[list[str], SourceInfo]:
    """Pages of a raw WikiText file (or the hub's `wikitext-2-raw-v1` test split), the first `limit` of them,
    split as lm-evaluation-harness's `wikitext` task splits them (`wikitext_pages`)."""
    if is_hub(spec):
        rows, name = _hub_rows(spec, WIKITEXT_HUB)
        text = "".join(row["text"] for row in rows)
        info = SourceInfo(name, hashlib.sha256(text.encode("utf-8")).hexdigest(), 0)
    else:
        path = Path(spec)
        text = _read_text_file(path, "--wikitext_path")
        info = SourceInfo(str(path), sha256_file(path), 0)
    pages = wikitext_pages(text)
    info = SourceInfo(info.name, info.sha256, len(pages))
    return pages[:_check_limit(limit, len(pages), "--wikitext_limit", info.name)], info


def _jsonl_records(path: Path, flag: str) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise EvalDataError(f"{flag}: {path} does not exist or is not a file")
    for number, line in enumerate(read_text(path, flag).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalDataError(
                f"{path}, line {number}: not valid JSON ({err.msg}); expected one JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise EvalDataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _string_field(record: dict[str, Any], name: str, where: str, expected: str) -> str:
    if name not in record:
        raise EvalDataError(f"{where}: field '{name}' is missing; expected {expected}")
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise EvalDataError(f"{where}: field '{name}' must be a non-empty string, got {value!r}; expected {expected}")
    return value


def boolq_prompt(passage: str, question: str) -> str:
    return f"{passage}\nQuestion: {question}?\nAnswer:"


def boolq_item(record: dict[str, Any], where: str) -> ChoiceItem:
    """A BoolQ record as a two-choice question: ` no` (0) or ` yes` (1)."""
    question = _string_field(record, "question", where, BOOLQ_FORMATS)
    passage = _string_field(record, "passage", where, BOOLQ_FORMATS)
    if "answer" in record:
        answer = record["answer"]
        if not isinstance(answer, bool):
            raise EvalDataError(
                f"{where}: field 'answer' must be true or false, got {answer!r}; expected {BOOLQ_FORMATS}"
            )
    elif "label" in record:
        answer = record["label"]
        if answer not in (0, 1) or isinstance(answer, float):
            raise EvalDataError(f"{where}: field 'label' must be 0 or 1, got {answer!r}; expected {BOOLQ_FORMATS}")
    else:
        raise EvalDataError(f"{where}: neither field 'answer' nor 'label' is present; expected {BOOLQ_FORMATS}")
    return ChoiceItem(boolq_prompt(passage, question), ("no", "yes"), int(answer), source=where)


def load_boolq(spec: str, limit: int | None = None) -> tuple[list[ChoiceItem], SourceInfo]:
    if is_hub(spec):
        rows, name = _hub_rows(spec, BOOLQ_HUB)
        items = [boolq_item(row, f"{name}, row {i}") for i, row in enumerate(rows)]
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode("utf-8")).hexdigest()
        info = SourceInfo(name, digest, len(items))
    else:
        path = Path(spec)
        items = [boolq_item(record, f"{path}, line {n}") for n, record in _jsonl_records(path, "--boolq_path")]
        if not items:
            raise EvalDataError(f"--boolq_path: {path} holds no records; expected {BOOLQ_FORMATS}")
        info = SourceInfo(str(path), sha256_file(path), len(items))
    return items[:_check_limit(limit, len(items), "--boolq_limit", info.name)], info


def parse_field_map(text: str | None) -> dict[str, str]:
    """`context=ctx,choices=endings,answer=label` → which record field holds each part of a question."""
    mapping = {name: name for name in MC_FIELDS}
    if not text:
        return mapping
    for pair in text.split(","):
        ours, sep, theirs = (part.strip() for part in pair.partition("="))
        if not sep or ours not in MC_FIELDS or not theirs:
            raise EvalDataError(
                f"--mc_fields: {pair!r} is not NAME=FIELD with NAME one of {', '.join(MC_FIELDS)} "
                "(example: context=ctx,choices=endings,answer=label)"
            )
        mapping[ours] = theirs
    return mapping


def choice_item(record: dict[str, Any], fields: dict[str, str], where: str) -> ChoiceItem:
    expected = (
        f"{{{fields['context']}: text, {fields['choices']}: [at least 2 strings], "
        f"{fields['answer']}: index of the right choice (0-based) or its text}}"
    )
    for part in MC_FIELDS:
        if fields[part] not in record:
            raise EvalDataError(
                f"{where}: field '{fields[part]}' is missing (fields present: {', '.join(sorted(record))}); expected "
                f"{expected}; map other field names with --mc_fields {part}=NAME"
            )
    context = record[fields["context"]]
    if not isinstance(context, str):
        raise EvalDataError(
            f"{where}: field '{fields['context']}' must be a string, got {context!r}; expected {expected}"
        )
    choices = record[fields["choices"]]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise EvalDataError(
            f"{where}: field '{fields['choices']}' must be a list of at least 2 non-empty strings, got {choices!r}; "
            f"expected {expected}"
        )
    answer = record[fields["answer"]]
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    elif isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise EvalDataError(
            f"{where}: field '{fields['answer']}' must be a choice index 0..{len(choices) - 1} or one of the choices, "
            f"got {answer!r}; expected {expected}"
        )
    return ChoiceItem(context, tuple(choices), answer, source=where)


def load_multiple_choice(
    path: str | Path, fields: dict[str, str], limit: int | None = None
) -> tuple[list[ChoiceItem], SourceInfo]:
    path = Path(path)
    items = [choice_item(record, fields, f"{path}, line {n}") for n, record in _jsonl_records(path, "--mc_path")]
    if not items:
        raise EvalDataError(f"--mc_path: {path} holds no records")
    info = SourceInfo(str(path), sha256_file(path), len(items))
    return items[:_check_limit(limit, len(items), "--mc_limit", str(path))], info


def mc_task_name(path: str | Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).stem)


# Plain prompts that make sense to a base model (continued as text) and to a chat model (as a question).
DEFAULT_PROMPTS = [
    "The json module",
    "What does the function os.path.join do?",
    "A list comprehension",
]


def load_prompts(path: str | Path | None) -> list[str | list[dict[str, str]]]:
    """Smoke-test prompts: a JSON list of strings, of {"prompt": ...}, or of message lists ([{role, content}])."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"--prompts_path: {path} does not exist or is not a file")
    data = read_json(path, "--prompts_path")
    expected = 'a JSON list of prompts: "text", {"prompt": "text"} or [{"role": "user", "content": "text"}, ...]'
    if not isinstance(data, list) or not data:
        raise EvalDataError(f"--prompts_path: {path} must hold {expected}")
    prompts = []
    for i, item in enumerate(data):
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            item = item["prompt"]
        if isinstance(item, list):
            try:
                item = validate_messages(item, f"--prompts_path: {path}, item {i}: messages")
            except MessageError as err:
                raise EvalDataError(str(err)) from None
        elif not isinstance(item, str):
            raise EvalDataError(f"--prompts_path: {path}, item {i} is not a prompt; expected {expected}")
        prompts.append(item)
    return prompts


def load_references(path: str | Path | None) -> list[list[str]] | None:
    """Reference answers of the prompts file: `{"prompt": ..., "reference": "text"}` (or `"references":
    ["text", ...]`) per prompt. None when no prompt has one; every prompt needs one when any has."""
    if path is None:
        return None
    data = read_json(Path(path), "--prompts_path")
    found = [isinstance(item, dict) and ("reference" in item or "references" in item) for item in data]
    if not any(found):
        return None
    expected = '{"prompt": "text", "reference": "text"} or {"prompt": "text", "references": ["text", ...]}'
    references = []
    for i, item in enumerate(data):
        if not found[i]:
            raise EvalDataError(f"--prompts_path: {path}, item {i} has no 'reference' while other prompts have one; "
                                f"give every prompt a reference ({expected}) or none")
        value = item.get("references", item.get("reference"))
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not value or not all(isinstance(r, str) for r in value):
            raise EvalDataError(f"--prompts_path: {path}, item {i}: field 'reference(s)' must be a string or a "
                                f"non-empty list of strings, got {value!r}; expected {expected}")
        references.append(value)
    if len({len(r) for r in references}) > 1:
        raise EvalDataError(f"--prompts_path: {path}: every prompt needs the same number of references (BLEU "
                            "is computed over reference streams)")
    return references


def data_path_from_run(checkpoint: Path) -> Path | None:
    """The processed data dir a checkpoint was trained on, from its `run.json` (or its base model's)."""
    for directory in _run_lineage(checkpoint):
        run_file = directory / "run.json"
        if not run_file.is_file():
            continue
        run = read_json(run_file, "run record")
        args = run.get("args") or {}
        value = args.get("data_path") or run.get("data_path")
        if value:
            return Path(value)
    return None


def training_contamination(checkpoint: Path) -> tuple[Path, list[dict[str, Any]]] | None:
    """The contamination table of the data the checkpoint was trained on (its meta.json), when it has one."""
    data_dir = data_path_from_run(checkpoint)
    meta_file = data_dir / "meta.json" if data_dir else None
    if meta_file is None or not meta_file.is_file():
        return None
    card = read_json(meta_file, "data description").get("contamination")
    return (meta_file, card["eval_sets"]) if card else None


def contamination_of(task: dict[str, Any], rows: list[dict[str, Any]], default_set: str | None) -> dict | None:
    """The row for the eval set a task scored (same file sha256, or the built-in set it used), if it overlaps."""
    for row in rows:
        same = row.get("sha256") and row["sha256"] == task.get("sha256")
        if (same or (default_set and row["eval_set"] == default_set)) and row["contaminated_items"]:
            return row
    return None


def _run_lineage(checkpoint: Path) -> Iterator[Path]:
    """The checkpoint, then the checkpoints it was trained from (adapter base, `model_path` arguments)."""
    seen: set[Path] = set()
    current: Path | None = checkpoint
    while current is not None and current.resolve() not in seen:
        seen.add(current.resolve())
        yield current
        current = _parent_checkpoint(current)


def _parent_checkpoint(checkpoint: Path) -> Path | None:
    if (checkpoint / ADAPTER_CONFIG).is_file():
        try:
            return adapter_base_path(checkpoint)
        except CheckpointError:
            return None
    run_file = checkpoint / "run.json"
    if not run_file.is_file():
        return None
    run = read_json(run_file, "run record")
    args = run.get("args") or {}
    for value in (run.get("base_model"), args.get("model_path"), args.get("base_model")):
        if isinstance(value, str) and Path(value).exists():
            try:
                return resolve_checkpoint(value)
            except CheckpointError:
                return None
    return None
