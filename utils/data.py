"""Raw text in: reading every supported input, and the per-document cleaning and dedup filters of stage 01."""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np

from utils.corpus import BUILTIN_NAME, builtin_documents
from utils.dedup import minhash_permutations, minhash_signatures, text_sha256, word_characters
from utils.files import read_bytes, reading
from utils.language import LanguageIdentifier

TEXT_SUFFIXES = (".txt", ".raw", ".json", ".jsonl", ".parquet")  # .raw: plain text, as WikiText ships
TEXT_FIELD_CANDIDATES = ("text", "content", "document", "body", "story", "article", "passage")
TXT_SPLITS = ("blank_line", "file")


class DataError(ValueError):
    pass


@dataclass
class ReadStats:
    """What reading the inputs met: counted so the summary says what was skipped and where."""

    records: int = 0
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    replaced_characters: int = 0
    non_string: int = 0
    formats: Counter = field(default_factory=Counter)
    fields: dict[str, list[str]] = field(default_factory=dict)
    records_by_input: Counter = field(default_factory=Counter)
    characters_by_input: Counter = field(default_factory=Counter)
    replaced_by_input: Counter = field(default_factory=Counter)

    def note_malformed(self, where: str, strict: bool) -> None:
        if strict:
            raise DataError(f"malformed record at {where} (--strict stops at the first one)")
        self.malformed += 1
        if len(self.malformed_examples) < 5:
            self.malformed_examples.append(where)

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "malformed_records": self.malformed,
            "first_malformed": self.malformed_examples,
            "non_utf8_characters_replaced": self.replaced_characters,
            "records_without_text": self.non_string,
            "formats": dict(self.formats),
            "text_fields": self.fields,
        }


# --------------------------------------------------------------------------- reading


def _format_of(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for suffix in TEXT_SUFFIXES:
        if name.endswith(suffix):
            return "txt" if suffix == ".raw" else suffix[1:]
    raise DataError(f"{path}: unsupported file type; expected one of {', '.join(TEXT_SUFFIXES)} (optionally .gz)")


def expand_inputs(specs: list[str]) -> list[str]:
    """Turns directories into their supported files (sorted); keeps files, `builtin:` names and hub ids."""
    expanded: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.name.lower().removesuffix(".gz").endswith(TEXT_SUFFIXES)
            )
            if not files:
                raise DataError(f"{path}: directory holds no {'/'.join(TEXT_SUFFIXES)} files")
            expanded.extend(str(p) for p in files)
        elif path.exists() or spec.startswith("builtin:"):
            expanded.append(spec)
        elif "/" in spec and not spec.startswith((".", "/")) and path.suffix == "":
            expanded.append(spec)  # a Hugging Face dataset id such as "Salesforce/wikitext"
        else:
            raise DataError(f"input not found: {spec} "
                            f"(expected a file, a directory, {BUILTIN_NAME} or a hub dataset id)")
    return expanded


def _open_text(path: Path, stats: ReadStats) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")

    def count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
        stats.replaced_characters += err.end - err.start
        stats.replaced_by_input[str(path)] += err.end - err.start
        return "\ufffd", err.end

    handler = f"count-replace-{id(stats)}-{path}"
    codecs.register_error(handler, count_and_replace)
    return io.TextIOWrapper(raw, encoding="utf-8", errors=handler, newline=None)


def pick_text_field(record: dict[str, Any], text_field: str | None, where: str) -> str:
    if text_field:
        if text_field not in record:
            raise DataError(f"{where}: no field {text_field!r}; fields found: {sorted(record)}")
        return text_field
    for name in TEXT_FIELD_CANDIDATES:
        if isinstance(record.get(name), str):
            return name
    strings = [k for k, v in record.items() if isinstance(v, str)]
    if len(strings) == 1:
        return strings[0]
    raise DataError(
        f"{where}: cannot tell which field holds the text; fields found: {sorted(record)}. Pass --text_field"
    )


class _FieldPicker:
    """Detects the text field on the first record of a file, then uses it for the rest."""

    def __init__(self, text_field: str | None, path: Path, stats: ReadStats):
        self.text_field, self.path, self.stats = text_field, path, stats
        self.chosen: str | None = None

    def text(self, record: Any, where: str) -> str | None:
        if isinstance(record, str):
            return record
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object or a string, got {type(record).__name__}")
        if self.chosen is None:
            self.chosen = pick_text_field(record, self.text_field, where)
            self.stats.fields[str(self.path)] = sorted(record)
        value = record.get(self.chosen)
        if not isinstance(value, str):
            self.stats.non_string += 1
            return None
        return value


def _read_txt(path: Path, txt_split: str, stats: ReadStats) -> Iterator[str]:
    with _open_text(path, stats) as handle:
        if txt_split == "file":
            yield handle.read()
            return
        block: list[str] = []
        for line in handle:
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block)
                block = []
        if block:
            yield "".join(block)


def _read_jsonl(path: Path, picker: _FieldPicker, stats: ReadStats, strict: bool) -> Iterator[str | None]:
    with _open_text(path, stats) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                stats.note_malformed(f"{path}:{number} ({err.msg})", strict)
                continue
            yield picker.text(record, f"{path}:{number}")


def _read_json(path: Path, picker: _FieldPicker, stats: ReadStats) -> Iterator[str | None]:
    with _open_text(path, stats) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of records (or an object holding one list)")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for index, record in enumerate(data):
        yield picker.text(record, f"{path}: record {index}")


def _read_parquet(path: Path, picker: _FieldPicker) -> Iterator[str | None]:
    import pyarrow.parquet as pq

    source = io.BytesIO(read_bytes(path)) if path.name.lower().endswith(".gz") else path
    parquet = pq.ParquetFile(source)
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield picker.text(record, f"{path}: row {row}")
            row += 1


def _read_hub(spec: str, config: str | None, split: str, text_field: str | None,
              stats: ReadStats) -> Iterator[str | None]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(spec, config, split=split, streaming=True)
    except Exception as err:  # noqa: BLE001 - the hub client raises many types; all mean "cannot load"
        raise DataError(f"cannot load hub dataset {spec!r} (config {config}, split {split}): {err}") from None
    picker = _FieldPicker(text_field, Path(spec), stats)
    for index, record in enumerate(dataset):
        yield picker.text(record, f"{spec}: record {index}")


def read_documents(
    specs: list[str],
    stats: ReadStats,
    text_field: str | None = None,
    txt_split: str = "blank_line",
    strict: bool = False,
    dataset_config: str | None = None,
    split: str = "train",
) -> Iterator[str]:
    """Streams raw documents from every input in order, counting what it reads and skips in `stats`."""
    for spec in specs:
        if spec == BUILTIN_NAME:
            stats.formats["builtin"] += 1
            documents: Iterator[str | None] = builtin_documents()
        elif spec.startswith("builtin:"):
            raise DataError(f"unknown built-in corpus {spec!r}; available: {BUILTIN_NAME}")
        elif not Path(spec).exists():
            stats.formats["hub"] += 1
            documents = _read_hub(spec, dataset_config, split, text_field, stats)
        else:
            path = Path(spec)
            kind = _format_of(path)
            stats.formats[kind] += 1
            picker = _FieldPicker(text_field, path, stats)
            documents = {
                "txt": partial(_read_txt, path, txt_split, stats),
                "jsonl": partial(_read_jsonl, path, picker, stats, strict),
                "json": partial(_read_json, path, picker, stats),
                "parquet": partial(_read_parquet, path, picker),
            }[kind]()
        with reading(spec, "input"):
            for text in documents:
                if text is not None:
                    stats.records += 1
                    stats.records_by_input[spec] += 1
                    stats.characters_by_input[spec] += len(text)
                    yield text


def check_text_like(stats: ReadStats, specs: list[str]) -> None:
    """Refuses inputs that are mostly bytes that are not UTF-8: binary files given as text."""
    for spec in specs:
        replaced, read = stats.replaced_by_input[spec], stats.characters_by_input[spec]
        if read and replaced > 0.1 * read:
            raise DataError(
                f"input {spec} does not look like text: {replaced:,} of its {read:,} characters are bytes that are "
                "not UTF-8 (a binary file, or text in another encoding: convert it to UTF-8 first)"
            )


# --------------------------------------------------------------------------- cleaning

URL_RE = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"')\]]+", re.IGNORECASE)
CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
SPACE_RE = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+$", re.MULTILINE)
UNICODE_SPACE_RE = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
BLANK_LINES_RE = re.compile(r"\n{3,}")
CODE_LINE_RE = re.compile(
    r"^\s*(?:>>>|\.\.\.|def |class |import |from \S+ import|return\b|if .*:$|for .*:$|while .*:$|[{}();]\s*$|#include|"
    r"\w+\s*=\s*\S+\s*$|\w+\(.*\)\s*$)"
)


def normalize_text(text: str) -> str:
    """NFC, control characters removed, odd spaces made plain, trailing spaces and blank-line runs trimmed."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = CONTROL_RE.sub("", text)
    text = UNICODE_SPACE_RE.sub(" ", text)
    text = SPACE_RE.sub("", text)
    if "\n\n\n" in text:  # the checks before the regexes skip most documents for a fraction of the cost
        text = BLANK_LINES_RE.sub("\n\n", text)
    return text.strip()


def remove_urls(text: str) -> str:
    if "://" in text or "www." in text.lower():
        return URL_RE.sub("", text)
    return text


def code_fraction(text: str) -> float:
    """Share of non-blank lines that look like source code rather than prose."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return 0.0
    return sum(bool(CODE_LINE_RE.match(line)) for line in lines) / len(lines)


@dataclass(frozen=True)
class CleaningSettings:
    normalize: bool = True
    remove_urls: bool = True
    drop_code: bool = True
    code_threshold: float = 0.5
    min_length: int = 50
    max_length: int = 0
    language: str | None = "en"
    language_threshold: float = 0.5
    use_minhash: bool = True
    num_perm: int = 128
    shingle_size: int = 5


@dataclass
class CleanedDocument:
    """One document after the per-document filters."""

    text: str
    removed_by: str | None = None
    language: str | None = None
    sha256: str = ""
    minhash: np.ndarray | None = None


def _length_or_code_rejection(text: str, settings: CleaningSettings) -> str | None:
    if settings.drop_code and code_fraction(text) > settings.code_threshold:
        return "code"
    if len(text) < settings.min_length:
        return "too_short"
    if settings.max_length and len(text) > settings.max_length:
        return "too_long"
    return None


@lru_cache(maxsize=1)
def language_identifier() -> LanguageIdentifier:
    return LanguageIdentifier()


def load_filter_models(settings: CleaningSettings) -> None:
    """Loads what the filters need once, before worker processes fork and share it."""
    if settings.language:
        language_identifier()
    if settings.use_minhash:
        minhash_permutations(settings.num_perm)
        word_characters()


def _identify_languages(documents: list[CleanedDocument], settings: CleaningSettings) -> None:
    for document, (language, probability) in zip(
        documents, language_identifier().classify([d.text for d in documents])
    ):
        document.language = language
        if language != settings.language or probability < settings.language_threshold:
            document.removed_by = "language"


def clean_documents(texts: list[str], settings: CleaningSettings) -> list[CleanedDocument]:
    """Applies the per-document steps in order to a batch (one worker task); the first step that rejects a
    document names itself in its `removed_by`. Survivors get their sha256 and MinHash signature."""
    documents = []
    for text in texts:
        if settings.normalize:
            text = normalize_text(text)
        if settings.remove_urls:
            text = remove_urls(text)
        documents.append(CleanedDocument(text, _length_or_code_rejection(text, settings)))
    if settings.language:
        _identify_languages([d for d in documents if not d.removed_by], settings)
    kept = [d for d in documents if not d.removed_by]
    for document in kept:
        document.sha256 = text_sha256(document.text)
    if settings.use_minhash and kept:
        signatures = minhash_signatures([d.text for d in kept], settings.num_perm, settings.shingle_size)
        for document, signature in zip(kept, signatures):
            document.minhash = signature
    return documents


def is_validation(document_sha256: str, seed: int, val_fraction: float) -> bool:
    """A seeded, order-independent split by document: the same document always lands on the same side."""
    digest = hashlib.sha256(f"{seed}:{document_sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction
