"""Train/eval contamination: crafted overlap is found (and removed on request), disjoint text is not flagged,
the table lands in meta.json and the run report, and 05 warns beside a score whose eval set overlapped."""

from __future__ import annotations

import json
import shutil

import pytest

from utils.contamination import ContaminationCheck, ContaminationError, EvalSet, load_eval_sets
from utils.files import sha256_file
from utils.report import collect_run, render_run_report
from utils.tokens import read_meta

PASSAGE = ("The lighthouse keeper counted forty seven ships passing the northern reef during the long winter "
           "storms of that year")
WIKI = f""" = Northern Reef = 

 {PASSAGE} , and wrote each name in the harbour book . 

 = Quiet Valley = 

 Farmers in the quiet valley grow barley and rye on terraces cut into the southern slopes above the river . 
"""


def disjoint_documents(count: int) -> list[str]:
    words = "amber basil cedar dune ember fjord grove heath inlet juniper knoll larch meadow nettle orchard".split()
    return [" ".join(f"{words[(i * 3 + j) % len(words)]}{i}" for j in range(60)) for i in range(count)]


def test_an_item_sharing_thirteen_words_is_found_and_disjoint_text_is_not():
    items = [f"Notes: {PASSAGE}, as told.", "Too short to check here.", " ".join(disjoint_documents(1))]
    check = ContaminationCheck([EvalSet("crafted", None, items)], n=13)
    training = ["In the archive: THE lighthouse keeper, counted forty-seven ships passing the northern reef "
                "during the long winter storms; nothing else.", *disjoint_documents(30)[1:]]
    assert check.check(training, [f"doc{i}" for i in range(len(training))]) == [True] + [False] * 29
    [row] = check.report()
    assert row["contaminated_items"] == 1 and row["checked_items"] == 2 and row["too_short_items"] == 1
    assert row["training_documents"] == 1 and row["examples"][0]["document"] == "doc0"
    assert ContaminationCheck([EvalSet("crafted", None, items)], n=25).check(training[:1], ["d"]) == [False]


def test_eval_files_of_every_format_load_and_bad_specs_name_the_formats(tmp_path):
    (tmp_path / "wiki.raw").write_text(WIKI)
    (tmp_path / "boolq.jsonl").write_text(json.dumps({"question": "is it", "passage": PASSAGE, "answer": True}) + "\n")
    (tmp_path / "prompts.json").write_text(json.dumps(["Tell me about the reef.", {"prompt": PASSAGE}]))
    sets = load_eval_sets([str(tmp_path / n) for n in ("wiki.raw", "boolq.jsonl", "prompts.json")] + ["builtin-evals"])
    assert [len(s.items) for s in sets[:3]] == [2, 1, 2]
    assert sets[0].sha256 == sha256_file(tmp_path / "wiki.raw")
    assert {s.name for s in sets[3:]} == {"builtin-evals:generate-prompts", "builtin-evals:python-docs-sft",
                                         "builtin-evals:python-docs-dpo"}
    with pytest.raises(ContaminationError, match=r"missing.raw: no such file; expected .*WikiText raw"):
        load_eval_sets([str(tmp_path / "missing.raw")])
    (tmp_path / "evals.csv").write_text("a,b\n")
    with pytest.raises(ContaminationError, match=r"unknown format .csv"):
        load_eval_sets([str(tmp_path / "evals.csv")])


@pytest.fixture(scope="module")
def decontaminated(tmp_path_factory, tokenizer_dir):
    """A data run whose training text holds a WikiText article's passage, with --decontaminate remove."""
    root = tmp_path_factory.mktemp("decontaminate")
    (root / "wiki.raw").write_text(WIKI)
    docs = [f"A story about ships. {PASSAGE}, the keeper said." + " More words follow here." * 4]
    docs += [d + " The end of this document comes after enough words." for d in disjoint_documents(40)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root


def test_prepare_removes_the_overlapping_document_and_writes_the_data_card(decontaminated, tokenizer_dir, run_stage,
                                                                            tmp_path):
    out = tmp_path / "data"
    code, stdout, stderr = run_stage("01_prepare_data.py", [
        "--input_path", str(decontaminated / "docs.jsonl"), "--output_dir", str(out), "--language", "none",
        "--tokenizer_path", str(tokenizer_dir), "--decontaminate_against", str(decontaminated / "wiki.raw"),
        "--decontaminate", "remove", "--val_fraction", "0", "--num_proc", "1", "--min_length", "20"])
    assert code == 0, stderr
    assert "1 of 2 checkable items (50.0%" in stdout
    meta = read_meta(out)
    [row] = meta["contamination"]["eval_sets"]
    assert row["contaminated_items"] == 1 and row["training_documents"] == 1
    assert row["sha256"] == sha256_file(decontaminated / "wiki.raw")
    assert {f["step"]: f["removed"] for f in meta["filters"]}["contamination"] == 1
    assert meta["train_documents"] + meta["val_documents"] == 40

    report, _ = render_run_report(collect_run(tmp_path, tmp_path / "none", tmp_path / "none"), tmp_path / "report")
    assert "Contamination (13-gram overlap" in report and "| 1 | 50.0% | 1 |" in report


def test_evaluate_warns_beside_a_score_whose_eval_set_overlapped(decontaminated, micro_checkpoint, run_stage,
                                                                 tmp_path):
    wiki = decontaminated / "wiki.raw"
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"contamination": {"ngram": 13, "mode": "report", "eval_sets": [
        {"eval_set": str(wiki), "sha256": sha256_file(wiki), "items": 2, "checked_items": 2, "too_short_items": 0,
         "contaminated_items": 1, "share": 0.5, "training_documents": 1, "examples": []}]}}))
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(micro_checkpoint, checkpoint)
    (checkpoint / "run.json").write_text(json.dumps({"args": {"data_path": str(data)}}))
    code, stdout, stderr = run_stage("05_evaluate.py", [
        "--model_path", str(checkpoint), "--tasks", "wikitext", "--wikitext_path", str(wiki), "--device", "cpu",
        "--output_dir", str(tmp_path / "eval")])
    assert code == 0, stderr
    assert f"warning: [wikitext] 1 of 2 items (50.0%) of {wiki} share an n-gram" in stdout
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["tasks"]["wikitext"]["contamination"] == {"contaminated_items": 1, "checked_items": 2, "share": 0.5}
