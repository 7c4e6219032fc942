"""Chat datasets for SFT and DPO: reading files, detecting their format, normalising them to message lists.

Every SFT record becomes a list of `{"role", "content"}` messages (roles `system`, `user`, `assistant`);
every preference record becomes a `PreferencePair` of message lists. The chat template then renders
them, and its `{% generation %}` blocks mark the assistant tokens the loss is computed on, so one code
path serves every input format and every template.

SFT formats (detected from the first record's fields):
  prompt/response   {"prompt", "response"}                       (JSON list or JSONL)
  alpaca            {"instruction", "input", "output"}           ("input" may be empty or absent)
  messages          {"messages": [{"role", "content"}, ...]}     (role names mapped, see utils.messages.ROLE_NAMES)
  sharegpt          {"conversations": [{"from", "value"}, ...]}
  prompt/completion {"prompt", "completion"}                     (trl's format; strings or message lists)
Preference formats:
  explicit          {"prompt", "chosen", "rejected"}             (strings or message lists)
  implicit          {"chosen", "rejected"}                       (Anthropic HH dialogues, or message lists
                                                                  sharing their first turns)
"""

from __future__ import annotations

import io
import json
import os
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.files import read_bytes, read_json, read_text, reading
from utils.messages import Message, MessageError, parse_role

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Located = tuple[str, dict[str, Any]]  # ("data/sft.jsonl line 3", record)

BUILTIN_SFT = "builtin:python-docs-sft"
BUILTIN_DPO = "builtin:python-docs-dpo"
SFT_FORMATS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "prompt_response": ("prompt", "response"),
}
PREFERENCE_FORMATS = {"explicit": ("prompt", "chosen", "rejected"), "implicit": ("chosen", "rejected")}
OVERLONG_POLICIES = ("truncate", "drop")
HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class ChatDataError(ValueError):
    """A dataset is missing, unreadable or in an unknown shape; the message names file, record and field."""


@dataclass
class DatasetStats:
    """What loading and preparing a dataset kept and removed, and why."""

    source: str
    format: str = ""
    records: int = 0
    kept: int = 0
    skipped_empty: int = 0
    dropped_identical: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    mixed_in: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe_empty(self, max_length: int | None = None) -> str:
        """Why nothing is left: the counts of every reason an example was removed."""
        reasons = [f"{self.records} records read"]
        if self.skipped_empty:
            reasons.append(f"{self.skipped_empty} with an empty response")
        if self.dropped_identical:
            reasons.append(f"{self.dropped_identical} with chosen == rejected")
        if self.dropped_overlong:
            reasons.append(f"{self.dropped_overlong} longer than --max_length {max_length}")
        return f"dataset {self.source} is empty after preparation: " + ", ".join(reasons)


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]

    def as_record(self) -> dict[str, list[Message]]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int] = field(repr=False)


# ---------------------------------------------------------------- reading records


def _read_json(path: Path) -> list[Located]:
    data = read_json(path, "dataset")
    if not isinstance(data, list):
        raise ChatDataError(f"{path}: expected a JSON list of records at the top level, got {type(data).__name__}")
    return [(f"{path} record {i}", record) for i, record in enumerate(data, 1)]


def _read_jsonl(path: Path) -> list[Located]:
    records = []
    for number, line in enumerate(read_text(path, "dataset").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path} line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise ChatDataError(f"{path} line {number}: invalid JSON at column {err.colno}: {err.msg}") from None
    return records


def _read_parquet(path: Path) -> list[Located]:
    import pyarrow.parquet as pq

    # pyarrow reads parquet from a seekable file: a .gz is decompressed into memory first.
    source = io.BytesIO(read_bytes(path, "dataset")) if path.suffix == ".gz" else path
    with reading(path, "dataset"):
        rows = pq.read_table(source).to_pylist()
    return [(f"{path} row {i}", row) for i, row in enumerate(rows, 1)]


def _read_hub(name: str) -> list[Located]:
    import datasets

    try:
        rows = datasets.load_dataset(name, split="train")
    except Exception as err:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise ChatDataError(
            f"{name!r} is not a local file, and loading it as a Hugging Face dataset id failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Offline, pass a local "
            f".json/.jsonl/.parquet file or a built-in set ({BUILTIN_SFT}, {BUILTIN_DPO})"
        ) from None
    return [(f"{name} row {i}", row) for i, row in enumerate(rows, 1)]


READERS: dict[str, Callable[[Path], list[Located]]] = {
    ".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet,
}


def _looks_like_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec)) and not Path(spec).suffix


def read_records(spec: str) -> list[Located]:
    """Records of a local .json/.jsonl/.parquet file (optionally .gz), or of a Hugging Face dataset id."""
    path = Path(spec)
    suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if path.is_file():
        reader = READERS.get(suffix)
        if reader is None:
            raise ChatDataError(f"{path}: unsupported file type {suffix!r}; expected one of {sorted(READERS)} (or .gz)")
        records = reader(path)
    elif path.is_dir():
        raise ChatDataError(f"{spec} is a directory; pass a .json/.jsonl/.parquet file (optionally .gz)")
    elif _looks_like_hub_id(spec):
        records = _read_hub(spec)
    else:
        raise FileNotFoundError(f"dataset file not found: {spec}")
    for where, record in records:
        if not isinstance(record, dict):
            raise ChatDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return records


# ---------------------------------------------------------------- messages


def map_role(name: Any, where: str) -> str:
    """A dataset's role name (any spelling in `ROLE_NAMES`) as one of the roles."""
    try:
        return parse_role(name, where, aliases=True)
    except MessageError as err:
        raise ChatDataError(str(err)) from None


def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ChatDataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _message_list(turns: Any, where: str, role_key: str = "role", content_key: str = "content") -> list[Message]:
    if not isinstance(turns, list):
        raise ChatDataError(f"{where}: expected a list of messages, got {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        here = f"{where}[{i}]"
        if not isinstance(turn, dict):
            raise ChatDataError(f"{here}: expected an object with '{role_key}' and '{content_key}'")
        other = ("from", "value") if role_key == "role" else ("role", "content")
        keys = other if other[0] in turn and role_key not in turn else (role_key, content_key)
        missing = [k for k in keys if k not in turn]
        if missing:
            raise ChatDataError(f"{here}: missing field(s) {missing}; fields found: {sorted(turn)}")
        messages.append({"role": map_role(turn[keys[0]], here), "content": _text(turn, keys[1], here)})
    return messages


def parse_hh_dialogue(text: str) -> list[Message]:
    """`\\n\\nHuman: … \\n\\nAssistant: …` turns as messages (text before the first marker is a system turn)."""
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = HH_MARKER.split(text)
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": HH_ROLES[speaker], "content": content.strip()})
    return messages


def _is_hh(text: str) -> bool:
    return bool(HH_MARKER.search(text)) or text.startswith(("Human:", "Assistant:"))


def _has_empty_response(messages: list[Message]) -> bool:
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    return not replies or any(not r.strip() for r in replies)


# ---------------------------------------------------------------- SFT


def detect_sft_format(record: dict[str, Any], where: str) -> str:
    for name, required in SFT_FORMATS.items():
        if all(key in record for key in required):
            return name
    expected = "; ".join(f"{name}: {list(required)}" for name, required in SFT_FORMATS.items())
    raise ChatDataError(f"{where}: not a known SFT format; fields found: {sorted(record)}; expected one of: {expected}")


def _sft_messages(fmt: str, record: dict[str, Any], where: str) -> list[Message]:
    missing = [key for key in SFT_FORMATS[fmt] if key not in record]
    if missing:
        raise ChatDataError(
            f"{where}: missing field(s) {missing} (format '{fmt}', detected from the first record); "
            f"fields found: {sorted(record)}"
        )
    if fmt == "messages":
        return _message_list(record["messages"], f"{where} field 'messages'")
    if fmt == "sharegpt":
        return _message_list(record["conversations"], f"{where} field 'conversations'", "from", "value")
    system = [{"role": "system", "content": _text(record, "system", where)}] if record.get("system") else []
    if fmt == "alpaca":
        instruction = _text(record, "instruction", where)
        extra = _text(record, "input", where) if "input" in record else ""
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        reply = {"role": "assistant", "content": _text(record, "output", where)}
        return system + [{"role": "user", "content": prompt}, reply]
    answer_key = "completion" if fmt == "prompt_completion" else "response"
    if isinstance(record["prompt"], list) or isinstance(record[answer_key], list):
        prompt = _as_messages(record["prompt"], "user", f"{where} field 'prompt'")
        return system + prompt + _as_messages(record[answer_key], "assistant", f"{where} field '{answer_key}'")
    return system + [
        {"role": "user", "content": _text(record, "prompt", where)},
        {"role": "assistant", "content": _text(record, answer_key, where)},
    ]


def parse_sft_records(records: list[Located], source: str) -> tuple[list[list[Message]], DatasetStats]:
    """Normalises SFT records to message lists; records with an empty (or no) response are skipped and counted."""
    stats = DatasetStats(source=source, records=len(records))
    if not records:
        raise ChatDataError(f"dataset {source} holds no records")
    stats.format = detect_sft_format(records[0][1], records[0][0])
    conversations = []
    for where, record in records:
        messages = _sft_messages(stats.format, record, where)
        if _has_empty_response(messages):
            stats.skipped_empty += 1
            continue
        conversations.append(messages)
    stats.kept = len(conversations)
    return conversations, stats


# ---------------------------------------------------------------- preferences


def _as_messages(value: Any, role: str, where: str) -> list[Message]:
    """A string as one message of `role` (an HH dialogue string as its turns), or a message list as is."""
    if isinstance(value, list):
        return _message_list(value, where)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ChatDataError(f"{where}: expected a string or a list of messages, got {type(value).__name__}")
    if role == "user" and _is_hh(value):
        messages = parse_hh_dialogue(value)
        opened_reply = messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]
        return messages[:-1] if opened_reply else messages
    return [{"role": role, "content": value}]


def split_hh_pair(chosen: str, rejected: str, where: str) -> PreferencePair:
    """Anthropic HH: the shared prefix up to its last `\\n\\nAssistant:` is the prompt; the rest are the replies."""
    marker = "\n\nAssistant:"
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(marker)
    if cut < 0:
        raise ChatDataError(
            f"{where}: 'chosen' and 'rejected' share no '\\n\\nHuman: … \\n\\nAssistant:' prefix, so the prompt "
            "cannot be extracted; add a 'prompt' field"
        )
    end = cut + len(marker)
    prompt = parse_hh_dialogue(chosen[:end])[:-1]  # drops the empty assistant turn the marker opens
    return PreferencePair(prompt, parse_hh_dialogue(marker + chosen[end:]), parse_hh_dialogue(marker + rejected[end:]))


def _split_message_pair(chosen: list[Message], rejected: list[Message], where: str) -> PreferencePair:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    if not shared:
        raise ChatDataError(f"{where}: 'chosen' and 'rejected' share no prompt turns; add a 'prompt' field")
    return PreferencePair(chosen[:shared], chosen[shared:], rejected[shared:])


def detect_preference_format(record: dict[str, Any], where: str) -> str:
    for name, required in PREFERENCE_FORMATS.items():
        if all(key in record for key in required):
            return name
    raise ChatDataError(
        f"{where}: not a known preference format; fields found: {sorted(record)}; expected "
        "{'prompt', 'chosen', 'rejected'} or Anthropic HH style {'chosen', 'rejected'}"
    )


def _preference_pair(fmt: str, record: dict[str, Any], where: str) -> PreferencePair:
    missing = [key for key in PREFERENCE_FORMATS[fmt] if key not in record]
    if missing:
        raise ChatDataError(
            f"{where}: missing field(s) {missing} (format '{fmt}', detected from the first record); "
            f"fields found: {sorted(record)}"
        )
    if fmt == "explicit":
        return PreferencePair(
            _as_messages(record["prompt"], "user", f"{where} field 'prompt'"),
            _as_messages(record["chosen"], "assistant", f"{where} field 'chosen'"),
            _as_messages(record["rejected"], "assistant", f"{where} field 'rejected'"),
        )
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        return split_hh_pair(chosen, rejected, where)
    return _split_message_pair(
        _message_list(chosen, f"{where} field 'chosen'"), _message_list(rejected, f"{where} field 'rejected'"), where
    )


def parse_preference_records(records: list[Located], source: str) -> tuple[list[PreferencePair], DatasetStats]:
    """Normalises preference records; pairs with an empty reply or with chosen == rejected are dropped and counted."""
    stats = DatasetStats(source=source, records=len(records))
    if not records:
        raise ChatDataError(f"dataset {source} holds no records")
    stats.format = detect_preference_format(records[0][1], records[0][0])
    pairs = []
    for where, record in records:
        pair = _preference_pair(stats.format, record, where)
        if not pair.prompt or _has_empty_response(pair.chosen) or _has_empty_response(pair.rejected):
            stats.skipped_empty += 1
        elif pair.chosen == pair.rejected:
            stats.dropped_identical += 1
        else:
            pairs.append(pair)
    stats.kept = len(pairs)
    return pairs, stats


# ---------------------------------------------------------------- built-in offline sets


QUESTIONS = {
    "function": ["What does `{name}` do?", "What is the function `{name}{signature}` for?",
                 "Explain the function `{name}`.", "Describe what `{name}` does."],
    "method": ["What does the method `{name}` do?", "Explain `{name}{signature}`.", "What is `{name}` for?"],
    "class": ["What is `{name}`?", "What does the class `{name}` represent?", "Describe the class `{name}`."],
    "module": ["What is the `{name}` module for?", "Describe the Python module `{name}`.",
               "What does the `{name}` module provide?"],
    "topic": ["Explain {title} in Python.", "What does the Python reference say about {title}?"],
}


def _summary(entry) -> str | None:
    """The first prose paragraph of an entry's documentation, reflowed to one line (30-500 characters)."""
    paragraphs = [p for p in re.split(r"\n\s*\n", entry.text) if p.strip()]
    if entry.kind == "topic":
        paragraphs = paragraphs[1:]  # the first one is the title and its underline
    short = entry.name.rsplit(".", 1)[-1]
    for paragraph in paragraphs[:2]:
        text = " ".join(line.strip() for line in paragraph.splitlines())
        if text.startswith(f"{short}(") or text.startswith(entry.name + "("):
            continue  # a C function's signature line, not prose
        return text if 30 <= len(text) <= 500 else None
    return None


def _question(entry, rng: random.Random) -> str:
    template = rng.choice(QUESTIONS[entry.kind])
    if entry.kind == "topic":
        title = entry.text.split("\n", 1)[0].strip()
        title = title[0].lower() + title[1:] if title[:4] == "The " else title
        return template.format(title=title)
    signature = entry.signature if len(entry.signature) <= 60 else "(…)"
    return template.format(name=entry.name, signature=signature)


def builtin_qa(seed: int = 0) -> list[tuple[str, str, str]]:
    """(kind, question, answer) about documented stdlib objects, answered by their documentation; deterministic."""
    from utils.corpus import doc_entries

    rng = random.Random(seed)
    seen, rows = set(), []
    for entry in doc_entries():
        answer = _summary(entry)
        if answer is None or answer in seen:  # inherited docstrings repeat; keep each answer once
            continue
        seen.add(answer)
        rows.append((entry.kind, _question(entry, rng), answer))
    rng.shuffle(rows)
    return rows


def builtin_sft(seed: int = 0) -> list[list[Message]]:
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for _, q, a in builtin_qa(seed)]


def repetition_loop(reply: str) -> str:
    """`reply` collapsing into a loop of its first words, at its own length in words (two loops at least)."""
    words = reply.split()
    head = max(2, min(6, len(words) // 3))
    length = max(len(words), 2 * head)
    return " ".join((words[:head] * length)[:length])


def builtin_preferences(seed: int = 0) -> list[PreferencePair]:
    """Chosen = the documentation of the object asked about; rejected = that reply collapsing into a loop of
    its first words, the failure a small model's greedy decoding falls into. The preference generalises to
    unseen questions, so DPO's held-out reward accuracy shows whether it learned it. (Rejecting another
    object's documentation instead asks for knowledge a 6 M model lacks: held-out accuracy stayed at 0.52-0.58
    on 128 pairs.)"""
    pairs = []
    for _, question, answer in builtin_qa(seed):
        rejected = repetition_loop(answer)
        if rejected != answer:
            pairs.append(PreferencePair(
                [{"role": "user", "content": question}],
                [{"role": "assistant", "content": answer}],
                [{"role": "assistant", "content": rejected}],
            ))
    return pairs


# ---------------------------------------------------------------- loading


def _subsample(items: list, max_samples: int | None, seed: int) -> list:
    if max_samples is None or max_samples >= len(items):
        return items
    if max_samples <= 0:
        raise ChatDataError(f"--max_samples must be positive, got {max_samples}")
    return random.Random(seed).sample(items, max_samples)


def load_sft_dataset(
    spec: str, max_samples: int | None = None, seed: int = 0
) -> tuple[list[list[Message]], DatasetStats]:
    """SFT conversations from a file, a hub id or `builtin:python-docs-sft`, with what was skipped and why."""
    return _load_examples(spec, BUILTIN_SFT, builtin_sft, parse_sft_records, "SFT", max_samples, seed)


def load_preference_dataset(
    spec: str, max_samples: int | None = None, seed: int = 0
) -> tuple[list[PreferencePair], DatasetStats]:
    """Preference pairs from a file, a hub id or `builtin:python-docs-dpo`, with what was dropped and why."""
    return _load_examples(spec, BUILTIN_DPO, builtin_preferences, parse_preference_records, "preference",
                          max_samples, seed)


def _load_examples(spec: str, builtin: str, make_builtin, parse, kind: str, max_samples: int | None,
                   seed: int) -> tuple[list, DatasetStats]:
    if spec == builtin:
        examples = make_builtin(seed)
        stats = DatasetStats(source=spec, format="builtin", records=len(examples), kept=len(examples))
    elif spec.startswith("builtin:"):
        raise ChatDataError(f"unknown built-in {kind} set {spec!r}; the built-in {kind} set is {builtin}")
    else:
        examples, stats = parse(read_records(spec), spec)
    examples = _subsample(examples, max_samples, seed)
    stats.kept = len(examples)
    if not examples:
        raise ChatDataError(stats.describe_empty())
    return examples, stats


def mix_in(domain: list, general: list, ratio: float, seed: int) -> tuple[list, int]:
    """Interleaves general examples into a domain set so they make up `ratio` of the result."""
    if not 0.0 < ratio < 1.0:
        raise ChatDataError(f"--mix_ratio must be between 0 and 1 (exclusive), got {ratio}")
    wanted = round(len(domain) * ratio / (1.0 - ratio))
    rng = random.Random(seed)
    chosen = rng.sample(general, min(wanted, len(general)))
    mixed = domain + chosen
    rng.shuffle(mixed)
    return mixed, len(chosen)


# ---------------------------------------------------------------- tokenization


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> TokenizedExample:
    """Token ids of a conversation in the tokenizer's chat template; labels are -100 outside assistant replies."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = list(out["input_ids"])
    labels = [token if in_reply else -100 for token, in_reply in zip(ids, out["assistant_masks"])]
    return TokenizedExample(ids, labels)


def check_overlong_policy(policy: str) -> None:
    if policy not in OVERLONG_POLICIES:
        raise ChatDataError(f"--overlong_policy must be one of {OVERLONG_POLICIES}, got {policy!r}")


def tokenize_sft(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Iterable[list[Message]],
    max_length: int,
    policy: str,
    stats: DatasetStats,
) -> list[TokenizedExample]:
    """Tokenizes with loss masks. Longer than `max_length`: `truncate` keeps the first `max_length` tokens (and
    drops the example if no reply token is left), `drop` drops it; both are counted in `stats`."""
    check_overlong_policy(policy)
    examples = []
    for messages in conversations:
        example = tokenize_conversation(tokenizer, messages)
        if len(example.input_ids) > max_length:
            example = TokenizedExample(example.input_ids[:max_length], example.labels[:max_length])
            if policy == "drop" or all(label == -100 for label in example.labels):
                stats.dropped_overlong += 1
                continue
            stats.truncated += 1
        examples.append(example)
    stats.kept = len(examples)
    if not examples:
        raise ChatDataError(stats.describe_empty(max_length))
    return examples


def _template_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message], prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=prompt)
    return list(out["input_ids"])


def filter_preferences_by_length(
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[PreferencePair],
    max_length: int,
    policy: str,
    stats: DatasetStats,
) -> list[PreferencePair]:
    """Applies the length policy to pairs rendered with the chat template: `truncate` keeps over-long pairs (the
    trainer cuts them at `max_length`) unless the prompt alone fills it, `drop` drops them; both counted."""
    check_overlong_policy(policy)
    kept = []
    for pair in pairs:
        prompt_len = len(_template_ids(tokenizer, pair.prompt, prompt=True))
        longest = max(len(_template_ids(tokenizer, pair.prompt + reply)) for reply in (pair.chosen, pair.rejected))
        if longest > max_length:
            if policy == "drop" or prompt_len >= max_length:
                stats.dropped_overlong += 1
                continue
            stats.truncated += 1
        kept.append(pair)
    stats.kept = len(kept)
    if not kept:
        raise ChatDataError(stats.describe_empty(max_length))
    return kept


def split_eval(items: list, fraction: float, max_eval: int, seed: int) -> tuple[list, list]:
    """A deterministic held-out split: `fraction` of the items (at least 1, at most `max_eval`), none if 0."""
    if not 0.0 <= fraction < 1.0:
        raise ChatDataError(f"--eval_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or len(items) < 2:
        return items, []
    count = min(max(1, round(len(items) * fraction)), max_eval, len(items) - 1)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]
