"""SFT and preference data: every format parses, HH prompts are extracted, replies alone carry the loss, bad
input is named."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from utils.chat_data import (
    BUILTIN_DPO,
    BUILTIN_SFT,
    ChatDataError,
    DatasetStats,
    PreferencePair,
    builtin_preferences,
    builtin_sft,
    filter_preferences_by_length,
    load_preference_dataset,
    load_sft_dataset,
    mix_in,
    repetition_loop,
    split_eval,
    split_hh_pair,
    tokenize_conversation,
    tokenize_sft,
)
from utils.templates import TEMPLATES, apply_template

ROOT = Path(__file__).resolve().parents[1]
Q1, A1, Q2, A2 = "What does json.dumps do?", "Serialize obj to a JSON str.", "And json.loads?", "Deserialize s."
SYSTEM = "Be brief."
ONE_TURN = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]
TWO_TURNS = [{"role": "system", "content": SYSTEM}, *ONE_TURN,
             {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]

# format name -> (records as a user writes them, the conversation they mean)
SFT_CASES = {
    "prompt_response": ([{"prompt": Q1, "response": A1}], ONE_TURN),
    "alpaca": ([{"instruction": "Answer briefly.", "input": Q1, "output": A1}],
               [{"role": "user", "content": f"Answer briefly.\n\n{Q1}"}, ONE_TURN[1]]),
    "messages": ([{"messages": [{"role": "system", "content": SYSTEM}, {"role": "Human", "content": Q1},
                                {"role": "gpt", "content": A1}, {"role": "prompter", "content": Q2},
                                {"role": "bot", "content": A2}]}], TWO_TURNS),
    "sharegpt": ([{"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": Q1},
                                     {"from": "ai", "value": A1}, {"from": "user", "value": Q2},
                                     {"from": "assistant", "value": A2}]}], TWO_TURNS),
    "prompt_completion": ([{"prompt": [{"role": "user", "content": Q1}],
                            "completion": [{"role": "assistant", "content": A1}]}], ONE_TURN),
}
END_OF_REPLY = {"chatml": "<|im_end|>", "instruct": "</s>", "chat": "</s>"}


def write(path: Path, records, as_jsonl: bool = False) -> str:
    text = "".join(json.dumps(r) + "\n" for r in records) if as_jsonl else json.dumps(records)
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("fmt", list(SFT_CASES))
def test_every_sft_format_parses_to_the_same_conversation(tmp_path, fmt):
    records, expected = SFT_CASES[fmt]
    for name, as_jsonl in (("data.json", False), ("data.jsonl", True)):
        conversations, stats = load_sft_dataset(write(tmp_path / name, records, as_jsonl))
        assert stats.format == fmt
        assert conversations == [expected]


def test_compressed_and_parquet_files_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"prompt": Q1, "response": A1}, {"prompt": Q2, "response": A2}]
    with gzip.open(tmp_path / "data.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "data.parquet")
    with gzip.open(tmp_path / "data.parquet.gz", "wb") as handle:
        handle.write((tmp_path / "data.parquet").read_bytes())
    for name in ("data.jsonl.gz", "data.parquet", "data.parquet.gz"):
        conversations, _ = load_sft_dataset(str(tmp_path / name))
        assert [c[1]["content"] for c in conversations] == [A1, A2]


def test_hh_dialogue_prefix_is_the_prompt():
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit."
    pair = split_hh_pair(shared + "\n\nAssistant: An apple.", shared + "\n\nAssistant: A car.", "record 1")
    assert pair.prompt == [{"role": "user", "content": "Hi there"},
                           {"role": "assistant", "content": "Hello! How can I help?"},
                           {"role": "user", "content": "Name a fruit."}]
    assert pair.chosen == [{"role": "assistant", "content": "An apple."}]
    assert pair.rejected == [{"role": "assistant", "content": "A car."}]


def test_preference_formats_parse(tmp_path):
    prompt, good, bad = "Name a fruit.", "An apple.", "A car."
    expected = PreferencePair([{"role": "user", "content": prompt}], [{"role": "assistant", "content": good}],
                              [{"role": "assistant", "content": bad}])
    as_messages = {"prompt": expected.prompt, "chosen": expected.chosen, "rejected": expected.rejected}
    cases = {
        "strings": [{"prompt": prompt, "chosen": good, "rejected": bad}],
        "messages": [as_messages],
        "hh": [{"chosen": f"\n\nHuman: {prompt}\n\nAssistant: {good}",
                "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {bad}"}],
        "implicit messages": [{"chosen": expected.prompt + expected.chosen,
                               "rejected": expected.prompt + expected.rejected}],
    }
    for i, (name, records) in enumerate(cases.items()):
        pairs, stats = load_preference_dataset(write(tmp_path / f"{i}.jsonl", records, as_jsonl=True))
        assert pairs == [expected], name


def test_identical_and_empty_pairs_are_dropped_and_counted(tmp_path):
    hh = "\n\nHuman: Name a fruit.\n\nAssistant:"
    records = [
        {"chosen": hh + " An apple.", "rejected": hh + " A car."},
        {"chosen": hh + " Same.", "rejected": hh + " Same."},
        {"chosen": hh + " A pear.", "rejected": hh},
    ]
    pairs, stats = load_preference_dataset(write(tmp_path / "hh.jsonl", records, as_jsonl=True))
    assert len(pairs) == 1
    assert (stats.records, stats.dropped_identical, stats.skipped_empty, stats.kept) == (3, 1, 1, 1)


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("fmt", list(SFT_CASES))
def test_only_reply_tokens_carry_the_loss(tokenizer, tmp_path, template, fmt):
    apply_template(tokenizer, template)
    records, _ = SFT_CASES[fmt]
    (messages,), _ = load_sft_dataset(write(tmp_path / "data.json", records))
    example = tokenize_conversation(tokenizer, messages)
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != -100]
    assert [label for label in example.labels if label != -100] == trained
    lead = " " if template == "chat" else ""
    replies = [lead + m["content"] + END_OF_REPLY[template] for m in messages if m["role"] == "assistant"]
    assert tokenizer.decode(trained) == "".join(replies)
    assert tokenizer.decode(example.input_ids).count(Q1) == 1  # the prompt is in the input, just not in the loss


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_dpo_prompt_is_a_token_prefix_of_prompt_plus_reply(tokenizer, template):
    """trl marks the completion as what follows the rendered prompt, so the prompt must render as a prefix."""
    apply_template(tokenizer, template)
    prompt = TWO_TURNS[:-1]
    reply = [{"role": "assistant", "content": A2}]
    prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                               add_generation_prompt=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)["input_ids"]
    assert full_ids[:len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(full_ids[len(prompt_ids):]).strip().startswith(A2)


def test_overlong_examples_follow_the_stated_policy(tokenizer):
    apply_template(tokenizer, "chatml")
    long_reply = [{"role": "user", "content": Q1}, {"role": "assistant", "content": "word " * 200}]
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": A1}]
    stats = DatasetStats("test")
    kept = tokenize_sft(tokenizer, [ONE_TURN, long_reply, long_prompt], 64, "truncate", stats)
    assert len(kept) == 2 and all(len(e.input_ids) <= 64 for e in kept)
    assert (stats.truncated, stats.dropped_overlong) == (1, 1)  # a prompt filling max_length leaves no reply
    stats = DatasetStats("test")
    assert len(tokenize_sft(tokenizer, [ONE_TURN, long_reply], 64, "drop", stats)) == 1
    assert stats.dropped_overlong == 1
    pairs = [PreferencePair(long_prompt[:1], ONE_TURN[1:], [{"role": "assistant", "content": "No."}]),
             PreferencePair(ONE_TURN[:1], long_reply[1:], ONE_TURN[1:])]
    stats = DatasetStats("test")
    assert filter_preferences_by_length(tokenizer, pairs, 64, "truncate", stats) == pairs[1:]
    assert (stats.truncated, stats.dropped_overlong) == (1, 1)


def test_bad_records_are_named_with_the_fields_found(tmp_path):
    path = write(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x", "answer": "y"}], True)
    with pytest.raises(ChatDataError, match=r"a.jsonl line 2: missing field\(s\) \['output'\].*fields found: "
                                            r"\['answer', 'instruction'\]"):
        load_sft_dataset(path)
    path = write(tmp_path / "b.json", [{"question": "x", "answer": "y"}])
    with pytest.raises(ChatDataError, match=r"b.json record 1: not a known SFT format; fields found: "
                                            r"\['answer', 'question'\]"):
        load_sft_dataset(path)
    path = write(tmp_path / "c.json", [{"messages": [{"role": "narrator", "content": "x"}]}])
    with pytest.raises(ChatDataError, match=r"record 1 field 'messages'\[0\]: unknown role 'narrator'; known roles"):
        load_sft_dataset(path)
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(ChatDataError, match=r"d.jsonl line 2: invalid JSON"):
        load_sft_dataset(str(tmp_path / "d.jsonl"))
    path = write(tmp_path / "e.json", [{"prompt": "x", "chosen": "y"}])
    with pytest.raises(ChatDataError, match=r"record 1: not a known preference format; fields found"):
        load_preference_dataset(path)
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        load_sft_dataset(str(tmp_path / "missing.json"))


def test_empty_responses_are_skipped_and_an_empty_dataset_says_why(tmp_path):
    records = [{"prompt": Q1, "response": A1}, {"prompt": Q2, "response": "  "}, {"prompt": Q2, "response": None}]
    conversations, stats = load_sft_dataset(write(tmp_path / "a.json", records))
    assert len(conversations) == 1 and stats.skipped_empty == 2
    with pytest.raises(ChatDataError, match=r"empty after preparation: 2 records read, 2 with an empty response"):
        load_sft_dataset(write(tmp_path / "b.json", records[1:]))


def test_builtin_sets_are_deterministic_and_answer_from_the_docs():
    first, again = builtin_sft(seed=3), builtin_sft(seed=3)
    assert first == again and len(first) > 1000
    dumps = next(c for c in first if "`json.dumps`" in c[0]["content"] or "`json.dumps(" in c[0]["content"])
    assert dumps[1]["content"].startswith("Serialize ``obj`` to a JSON formatted ``str``")
    pairs = builtin_preferences(seed=3)
    assert all(p.chosen != p.rejected for p in pairs)
    # The rejected reply is the chosen one collapsing into a loop of its first words.
    assert all(p.rejected[0]["content"] == repetition_loop(p.chosen[0]["content"]) for p in pairs)
    long_reply = " ".join(f"w{i}" for i in range(20))
    assert repetition_loop(long_reply) == " ".join(([f"w{i}" for i in range(6)] * 4)[:20])
    assert repetition_loop("Split the extension from a pathname.") == "Split the Split the Split the"
    assert repetition_loop("Close.") == "Close. Close. Close. Close."
    assert [p.prompt for p in pairs[:50]] == [c[:1] for c in first[:50]]
    assert load_sft_dataset(BUILTIN_SFT, max_samples=10, seed=1)[0] == load_sft_dataset(BUILTIN_SFT, 10, 1)[0]
    assert len(load_preference_dataset(BUILTIN_DPO, max_samples=7)[0]) == 7


def test_mix_and_split_are_deterministic_and_sized():
    domain, general = [("d", i) for i in range(70)], [("g", i) for i in range(100)]
    mixed, added = mix_in(domain, general, 0.3, seed=0)
    assert added == 30 and len(mixed) == 100 and mixed == mix_in(domain, general, 0.3, seed=0)[0]
    assert sum(1 for kind, _ in mixed if kind == "g") == 30
    train, held = split_eval(list(range(100)), 0.05, 200, seed=1)
    assert len(held) == 5 and not set(train) & set(held) and (train, held) == split_eval(list(range(100)), 0.05, 200, 1)
    assert split_eval(list(range(100)), 0.0, 200, 1) == (list(range(100)), [])


def test_sample_datasets_cover_every_format(tmp_path):
    subprocess.run([sys.executable, "scripts/create_sample_datasets.py", "--output_dir", str(tmp_path),
                    "--num_examples", "5"], cwd=ROOT, check=True, capture_output=True,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    formats = {load_sft_dataset(str(p))[1].format for p in tmp_path.glob("sft_*")}
    assert formats == set(SFT_CASES)
    preference = {load_preference_dataset(str(p))[1].format for p in tmp_path.glob("dpo_*")}
    assert preference == {"explicit", "implicit"}
    pretrain = {p.name for p in tmp_path.glob("pretrain.*")}
    assert pretrain == {"pretrain.txt", "pretrain.json", "pretrain.jsonl", "pretrain.parquet", "pretrain.jsonl.gz"}
    rows = [json.loads(line) for line in (tmp_path / "pretrain.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(row["text"].strip() for row in rows)
