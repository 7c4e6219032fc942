"""Evaluation data readers: WikiText articles, BoolQ in both formats, multiple-choice field mapping, prompts,
and the messages a user gets for files in the wrong format."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from utils.eval_data import (
    EvalDataError,
    SourceUnavailable,
    detokenize_wikitext,
    load_boolq,
    load_multiple_choice,
    load_prompts,
    load_wikitext,
    parse_field_map,
    split_articles,
    wikitext_pages,
)

WIKI = (
    " \n = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor . \n"
    " \n = = Career = = \n \n In 2006 , he starred in a 1 @,@ 000 @-@ seat theatre . \n"
    " = Du Fu = \n \n Du Fu ( 712 – 770 ) was a Chinese poet . \n"
)
SHARED_WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_articles_split_at_top_level_headings_and_rebuild_the_text():
    articles = split_articles(WIKI)
    assert len(articles) == 2
    assert articles[0].startswith(" \n = Robert Boulter = ") and "= = Career = =" in articles[0]
    assert articles[1].startswith(" = Du Fu = ")
    assert "".join(articles) == WIKI


def test_detokenizer_undoes_wikitext_tokenisation():
    raw = " In 2006 , he starred in a 1 @,@ 000 @-@ seat theatre ( London ) . \n = = Career = = \n"
    text = detokenize_wikitext(raw)
    assert text == " In 2006, he starred in a 1,000-seat theatre (London).\n== Career ==\n"


def test_wikitext_pages_are_the_harness_documents():
    # lm-eval's documents: the whitespace-only " \n" before the first heading is dropped, the "\n" between
    # two pages belongs to neither, section headings (" = = Career = = ") do not start a page.
    pages = wikitext_pages(WIKI)
    assert pages == [
        " = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor . \n \n"
        " = = Career = = \n \n In 2006 , he starred in a 1 @,@ 000 @-@ seat theatre . ",
        " = Du Fu = \n \n Du Fu ( 712 – 770 ) was a Chinese poet . \n",
    ]


@pytest.mark.skipif(not SHARED_WIKITEXT.is_file(), reason="the shared WikiText-2 copy is not on this machine")
def test_real_wikitext2_test_split_has_the_published_counts():
    pages, info = load_wikitext(str(SHARED_WIKITEXT))
    assert len(pages) == 62 and info.records == 62
    # The file's 241,211 whitespace words are all in the pages; the harness counts 124 more (an empty word
    # at the start and the end of each page, which start with " " and end with whitespace): 241,335.
    assert sum(len(a.split()) for a in pages) == 241_211
    assert sum(len(re.split(r"\s+", a)) for a in pages) == 241_335
    # 1,290,590 bytes in the file, less the 2 of the leading " \n" and the 61 newlines between pages.
    assert SHARED_WIKITEXT.stat().st_size == 1_290_590
    assert sum(len(a.encode("utf-8")) for a in pages) == 1_290_527


def test_wikitext_errors_name_the_problem(tmp_path):
    with pytest.raises(EvalDataError, match="does not exist"):
        load_wikitext(str(tmp_path / "missing.raw"))
    boolq_like = write_jsonl(tmp_path / "dev.jsonl", [{"question": "q", "passage": "p", "answer": True}])
    with pytest.raises(EvalDataError, match="looks like JSON, but a raw text file is expected"):
        load_wikitext(str(boolq_like))
    raw = tmp_path / "wiki.raw"
    raw.write_text(WIKI, encoding="utf-8")
    with pytest.raises(EvalDataError, match="limit 3 is larger than the 2 records"):
        load_wikitext(str(raw), limit=3)
    assert len(load_wikitext(str(raw), limit=1)[0]) == 1


def test_hub_source_offline_is_unavailable_not_an_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SourceUnavailable, match="hub:google/boolq:validation could not be loaded"):
        load_boolq("hub")


def test_boolq_reads_original_and_superglue_formats(tmp_path):
    record = {"question": "is it", "passage": "It is.", "answer": True, "title": "x"}
    original = write_jsonl(tmp_path / "a.jsonl", [record])
    superglue = write_jsonl(tmp_path / "b.jsonl", [{"question": "is it", "passage": "It is.", "label": 0, "idx": 7}])
    (item,), info = load_boolq(str(original))
    assert item.context == "It is.\nQuestion: is it?\nAnswer:" and item.choices == ("no", "yes") and item.answer == 1
    assert info.records == 1 and len(info.sha256) == 64
    assert load_boolq(str(superglue))[0][0].answer == 0


@pytest.mark.parametrize("record,message", [
    ({"question": "q", "answer": True}, r"line 2: field 'passage' is missing"),
    ({"question": "q", "passage": "p", "answer": "yes"}, r"line 2: field 'answer' must be true or false"),
    ({"question": "q", "passage": "p", "label": 2}, r"line 2: field 'label' must be 0 or 1"),
    ({"question": "q", "passage": "p"}, r"line 2: neither field 'answer' nor 'label'"),
    ("{not json", r"line 2: not valid JSON"),
])
def test_boolq_errors_name_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "dev.jsonl", [{"question": "q", "passage": "p", "answer": False}, record])
    with pytest.raises(EvalDataError, match=message):
        load_boolq(str(path))


def test_boolq_limit_larger_than_the_set_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "dev.jsonl", [{"question": "q", "passage": "p", "answer": False}] * 3)
    with pytest.raises(EvalDataError, match="--boolq_limit 4 is larger than the 3 records"):
        load_boolq(str(path), limit=4)


def test_multiple_choice_with_mapped_fields_and_answers_as_text(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"ctx": "2 + 2 =", "endings": ["3", "4"], "label": 1},
        {"ctx": "Sky is", "endings": ["blue", "green"], "label": "blue"},
    ])
    items, info = load_multiple_choice(path, parse_field_map("context=ctx,choices=endings,answer=label"))
    assert [(i.context, i.choices, i.answer) for i in items] == [
        ("2 + 2 =", ("3", "4"), 1), ("Sky is", ("blue", "green"), 0)]
    with pytest.raises(EvalDataError, match=r"line 1: field 'context' is missing .* --mc_fields context=NAME"):
        load_multiple_choice(path, parse_field_map(None))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "c", "choices": "a or b", "answer": 0}])
    with pytest.raises(EvalDataError, match=r"bad.jsonl, line 1: field 'choices' must be a list of at least 2"):
        load_multiple_choice(bad, parse_field_map(None))
    with pytest.raises(EvalDataError, match="not NAME=FIELD"):
        parse_field_map("question=ctx")


def test_multiple_choice_answer_out_of_range_is_named(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [{"context": "c", "choices": ["a", "b"], "answer": 2}])
    with pytest.raises(EvalDataError, match=r"mc.jsonl, line 1: field 'answer' must be a choice index 0..1"):
        load_multiple_choice(path, parse_field_map(None))


def test_prompts_file_forms(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["plain", {"prompt": "wrapped"}, [{"role": "user", "content": "chat"}]]))
    assert load_prompts(path) == ["plain", "wrapped", [{"role": "user", "content": "chat"}]]
    path.write_text(json.dumps({"prompt": "not a list"}))
    with pytest.raises(EvalDataError, match="must hold a JSON list of prompts"):
        load_prompts(path)
    path.write_text(json.dumps(["ok", 3]))
    with pytest.raises(EvalDataError, match="item 1 is not a prompt"):
        load_prompts(path)
