"""Evaluation that equals lm-evaluation-harness: its WikiText pages and word/byte counts, the harness backend's
generated task YAMLs, the missing-extra message, results in the harness's JSON shape, and BLEU/ROUGE."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import yaml

from utils.eval_data import EvalDataError, load_references, load_wikitext
from utils.evaluation import reference_scores, text_stats
from utils.lm_eval_backend import LocalTasks, McSource, boolq_docs, mc_docs, wikitext_docs, write_tasks

# Leading " \n" before the first heading, a section heading, a non-ASCII letter, a double space, a final "\n".
RAW = " \n = A = \n \n Hi thére . \n \n = = Sub = = \n \n = B = \n x  y\n"
# By hand, lm-eval's rules: pages start at " = A = " and " = B = " (the whitespace-only " " before the first
# heading is dropped, a section heading starts no page, the "\n" between pages belongs to neither):
PAGE_A = " = A = \n \n Hi thére . \n \n = = Sub = = \n "
PAGE_B = " = B = \n x  y\n"
# re.split(r"\s+", page): "", "=", "A", "=", "Hi", "thére", ".", "=", "=", "Sub", "=", "=", ""  → 13 words
#                          "", "=", "B", "=", "x", "y", ""                                    →  7 words
WORDS = 13 + 7
# UTF-8 bytes: page A has 7 + 3 + 12 + 3 + 13 + 2 = 40 characters, "é" takes 2 bytes → 41; page B 7 + 1 + 5 + 1.
BYTES = 41 + 14


@pytest.fixture()
def raw_file(tmp_path) -> Path:
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(RAW.encode("utf-8"))
    return path


def function_loader():
    """A YAML loader that reads the harness's `!function module.name` tag as a plain string."""
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    return Loader


def test_pages_and_counts_follow_the_harness_wikitext_rules(raw_file):
    pages, info = load_wikitext(str(raw_file))
    assert pages == [PAGE_A, PAGE_B] and info.records == 2
    assert len(PAGE_A) == 40 and len(PAGE_B) == 14
    stats = text_stats(pages)
    assert (stats.words, stats.bytes) == (WORDS, BYTES)


def test_evaluate_scores_the_harness_pages_with_bos_as_prefix(raw_file, micro_checkpoint, tokenizer, tmp_path,
                                                              run_stage):
    out = tmp_path / "out"
    code, _, stderr = run_stage("05_evaluate.py", [
        "--model_path", str(micro_checkpoint), "--output_dir", str(out), "--tasks", "wikitext",
        "--wikitext_path", str(raw_file), "--context_length", "32"])
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    assert (metrics["wikitext.words"], metrics["wikitext.bytes"], metrics["wikitext.documents"]) == (WORDS, BYTES, 2)
    assert results["settings"]["prefix_token_id"] == tokenizer.bos_token_id != tokenizer.eos_token_id
    nll = metrics["wikitext.loss"] * metrics["wikitext.tokens"]
    assert metrics["wikitext.word_perplexity"] == pytest.approx(math.exp(nll / WORDS), rel=1e-9)
    assert metrics["wikitext.bits_per_byte"] == pytest.approx(nll / math.log(2) / BYTES, rel=1e-9)
    # The harness's results shape, beside results.json.
    harness = json.loads((out / "results_lm_eval.json").read_text())
    row = harness["results"]["wikitext"]
    assert row["alias"] == "wikitext" and row["word_perplexity,none"] == metrics["wikitext.word_perplexity"]
    assert row["bits_per_byte,none"] == metrics["wikitext.bits_per_byte"]
    assert row["byte_perplexity,none"] == pytest.approx(math.exp(nll / BYTES))
    assert harness["versions"]["wikitext"] == 2.0 and harness["n-shot"]["wikitext"] == 0
    assert harness["higher_is_better"]["wikitext"]["word_perplexity"] is False
    assert harness["n-samples"]["wikitext"] == {"original": 2, "effective": 2}
    assert harness["config"]["prefix_token_id"] == tokenizer.bos_token_id
    assert harness["configs"]["wikitext"]["output_type"] == "loglikelihood_rolling"


def test_multiple_choice_results_in_the_harness_shape(micro_checkpoint, tmp_path, run_stage):
    boolq = tmp_path / "boolq.jsonl"
    records = [{"question": f"is {w} a word", "passage": f"{w} is a word.", "answer": i % 2 == 0}
               for i, w in enumerate(["apple", "river", "stone"])]
    boolq.write_text("".join(json.dumps(r) + "\n" for r in records))
    mc = tmp_path / "mine.jsonl"
    mc.write_text(json.dumps({"context": "A tuple is", "choices": ["immutable", "a loop"], "answer": 0}) + "\n")
    out = tmp_path / "out"
    code, _, stderr = run_stage("05_evaluate.py", [
        "--model_path", str(micro_checkpoint), "--output_dir", str(out), "--tasks", "boolq,mc",
        "--boolq_path", str(boolq), "--mc_path", str(mc), "--context_length", "32"])
    assert code == 0, stderr
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    harness = json.loads((out / "results_lm_eval.json").read_text())
    assert harness["results"]["boolq"]["acc,none"] == metrics["boolq.accuracy"]
    assert harness["results"]["boolq"]["acc_norm,none"] == metrics["boolq.accuracy_norm"]
    assert harness["results"]["boolq"]["acc_stderr,none"] == pytest.approx(metrics["boolq.accuracy_stderr"])
    assert harness["results"]["mc_mine"]["acc,none"] == metrics["mc.mine.accuracy"]
    assert harness["results"]["mc_mine"]["acc_stderr,none"] == "N/A"  # one question: no standard error
    assert harness["n-samples"]["boolq"] == {"original": 3, "effective": 3}
    assert set(harness) >= {"results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config"}


def test_generated_task_yamls_are_valid_and_name_the_local_files(raw_file, tmp_path):
    boolq = tmp_path / "dev.jsonl"
    boolq.write_text("".join(json.dumps({"question": "is it", "passage": "It is.", "answer": a}) + "\n"
                             for a in (True, False, True)))
    mc = tmp_path / "mine.jsonl"
    mc.write_text(json.dumps({"ctx": "2 + 2 =", "endings": ["3", "4"], "gold": "4"}) + "\n")
    fields = {"context": "ctx", "choices": "endings", "answer": "gold"}
    directory = tmp_path / "tasks"
    names = write_tasks(directory, LocalTasks(wikitext=str(raw_file), wikitext_limit=1, boolq=str(boolq),
                                              boolq_limit=2, mc=[McSource("mine", str(mc), fields, " ", None)]))
    assert names == ["wikitext", "boolq", "mc_mine"]
    configs = {n: yaml.load((directory / f"{n}.yaml").read_text(), Loader=function_loader()) for n in names}
    wiki = configs["wikitext"]
    assert wiki["dataset_path"] == "text" and wiki["dataset_kwargs"]["sample_by"] == "document"
    assert wiki["dataset_kwargs"]["data_files"]["test"] == str(raw_file.resolve())
    assert wiki["output_type"] == "loglikelihood_rolling" and wiki["test_split"] == "test"
    assert wiki["doc_to_target"] == "!function local_tasks.wikitext_detokenizer"
    assert wiki["process_results"] == "!function local_tasks.process_results"
    assert [m["metric"] for m in wiki["metric_list"]] == ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    assert configs["boolq"]["dataset_path"] == "json"
    assert configs["boolq"]["dataset_kwargs"]["data_files"]["validation"] == str(boolq.resolve())
    assert configs["boolq"]["doc_to_text"] == "{{passage}}\nQuestion: {{question}}?\nAnswer:"
    assert configs["boolq"]["doc_to_choice"] == ["no", "yes"]
    assert configs["mc_mine"]["dataset_kwargs"]["data_files"]["test"] == str(mc.resolve())
    # Every `!function` the YAMLs name is defined in the generated module (lm_eval's own two are imported).
    module = ast.parse((directory / "local_tasks.py").read_text())
    defined = {node.name for node in module.body if isinstance(node, ast.FunctionDef)}
    defined |= {a.name for node in module.body if isinstance(node, ast.ImportFrom) for a in node.names}
    named = {v.split(".")[-1] for c in configs.values() for v in c.values()
             if isinstance(v, str) and v.startswith("!function")}
    assert named <= defined and {"wikitext_detokenizer", "process_results"} <= defined

    # What the harness's data loaders make of those files, through the generated process_docs.
    from datasets import load_dataset

    raw = load_dataset("text", data_files={"test": str(raw_file)}, sample_by="document", split="test",
                       cache_dir=str(tmp_path / "cache"))
    assert wikitext_docs(raw, None)["page"] == [PAGE_A, PAGE_B]
    assert wikitext_docs(raw, 1)["page"] == [PAGE_A]
    questions = load_dataset("json", data_files={"validation": str(boolq)}, split="validation",
                             cache_dir=str(tmp_path / "cache"))
    assert boolq_docs(questions, 2)["label"] == [1, 0]
    choices = load_dataset("json", data_files={"test": str(mc)}, split="test", cache_dir=str(tmp_path / "cache"))
    assert mc_docs(choices, fields, str(mc), None)[0] == {"context": "2 + 2 =", "choices": ["3", "4"], "answer": 1}


def test_lm_eval_backend_without_the_extra_is_one_clear_error(micro_checkpoint, tmp_path, run_stage):
    try:
        import lm_eval  # noqa: F401
        pytest.skip("lm_eval is installed here; this test is for the default install without the extra")
    except ImportError:
        pass
    out = tmp_path / "out"
    code, stdout, stderr = run_stage("05_evaluate.py", ["--model_path", str(micro_checkpoint), "--output_dir",
                                                        str(out), "--backend", "lm-eval"])
    assert code == 2, code
    assert "Traceback" not in stderr and stderr.strip().count("\n") == 0
    assert stderr.startswith("error: --backend lm-eval needs lm-evaluation-harness, which is not installed")
    assert "pip install -r requirements-eval.txt" in stderr and "lm_eval==0.4.13" in stderr
    assert "--backend ours" in stderr and not out.exists()
    code, _, stderr = run_stage("05_evaluate.py", ["--model_path", str(micro_checkpoint), "--output_dir", str(out),
                                                   "--lm_eval_tasks", "hellaswag"])
    assert code == 2 and "error: --lm_eval_tasks needs --backend lm-eval" in stderr


def test_bleu_and_rouge_equal_sacrebleu_and_hand_counts():
    import sacrebleu

    predictions = ["the cat is on the mat", "a quick brown fox"]
    references = [["the cat sat on the mat"], ["a quick brown fox"]]
    scores = reference_scores(predictions, references)
    assert scores["exact_match"] == 0.5 and scores["samples"] == 2
    expected = sacrebleu.corpus_bleu(predictions, [["the cat sat on the mat", "a quick brown fox"]]).score
    assert scores["bleu"] == pytest.approx(expected) and 0 < scores["bleu"] < 100
    assert reference_scores(["a quick brown fox"], [["a quick brown fox"]])["bleu"] == pytest.approx(100)
    # ROUGE F1 by hand for the first pair (the second is a perfect 1.0): unigrams 5 of 6 shared; bigrams
    # "the cat", "on the", "the mat" are 3 of 5; the longest common subsequence "the cat on the mat" is 5 of 6.
    assert scores["rouge1"] == pytest.approx((5 / 6 + 1) / 2)
    assert scores["rouge2"] == pytest.approx((3 / 5 + 1) / 2)
    assert scores["rougeL"] == pytest.approx((5 / 6 + 1) / 2)


def test_generations_with_references_are_scored(micro_checkpoint, tmp_path, run_stage):
    import sacrebleu

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "The json module", "reference": "encodes and decodes JSON"},
                                   {"prompt": "A list", "references": ["is mutable"]}]))
    out = tmp_path / "out"
    code, _, stderr = run_stage("05_evaluate.py", [
        "--model_path", str(micro_checkpoint), "--output_dir", str(out), "--tasks", "generate",
        "--prompts_path", str(prompts), "--max_new_tokens", "4"])
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    samples = results["tasks"]["generate"]["samples"]
    assert [s["references"] for s in samples] == [["encodes and decodes JSON"], ["is mutable"]]
    texts = [s["text"] for s in samples]
    expected = sacrebleu.corpus_bleu(texts, [["encodes and decodes JSON", "is mutable"]]).score
    assert results["metrics"]["generate.bleu"] == pytest.approx(expected)
    assert {"generate.exact_match", "generate.rouge1", "generate.rouge2", "generate.rougeL"} <= set(results["metrics"])
    harness = json.loads((out / "results_lm_eval.json").read_text())
    assert harness["results"]["generate"]["bleu,none"] == pytest.approx(expected)


def test_references_must_be_given_for_every_prompt(tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["plain"]))
    assert load_references(prompts) is None
    prompts.write_text(json.dumps([{"prompt": "a", "reference": "b"}, "c"]))
    with pytest.raises(EvalDataError, match=r"item 1 has no 'reference' while other prompts have one"):
        load_references(prompts)
    prompts.write_text(json.dumps([{"prompt": "a", "reference": 3}]))
    with pytest.raises(EvalDataError, match=r"item 0: field 'reference\(s\)' must be a string"):
        load_references(prompts)


def test_both_backends_give_the_same_scores(raw_file, micro_checkpoint, tmp_path, run_stage):
    """Runs where the optional extra is installed (pip install -r requirements-eval.txt)."""
    pytest.importorskip("lm_eval")
    boolq = tmp_path / "boolq.jsonl"
    boolq.write_text("".join(json.dumps({"question": f"is {w} a word", "passage": f"{w} is a word.",
                                         "answer": i % 2 == 0}) + "\n" for i, w in enumerate(["apple", "river"])))
    mc = tmp_path / "mine.jsonl"
    mc.write_text(json.dumps({"ctx": "A tuple is", "endings": ["immutable", "a loop"], "gold": 0}) + "\n")
    common = ["--model_path", str(micro_checkpoint), "--tasks", "wikitext,boolq,mc,speed", "--context_length", "32",
              "--wikitext_path", str(raw_file), "--boolq_path", str(boolq), "--mc_path", str(mc),
              "--mc_fields", "context=ctx,choices=endings,answer=gold"]
    metrics = {}
    for backend in ("ours", "lm-eval"):
        code, _, stderr = run_stage("05_evaluate.py", [*common, "--backend", backend, "--output_dir",
                                                       str(tmp_path / backend)])
        assert code == 0, stderr
        metrics[backend] = json.loads((tmp_path / backend / "results.json").read_text())["metrics"]
    for key in ("wikitext.word_perplexity", "wikitext.byte_perplexity", "wikitext.bits_per_byte", "boolq.accuracy",
                "boolq.accuracy_norm", "mc.mine.accuracy", "mc.mine.accuracy_norm"):
        assert metrics["lm-eval"][key] == pytest.approx(metrics["ours"][key], rel=1e-6), key
    harness = json.loads((tmp_path / "lm-eval" / "results_lm_eval.json").read_text())
    assert harness["results"]["wikitext"]["bits_per_byte,none"] == metrics["lm-eval"]["wikitext.bits_per_byte"]
    assert "speed.decode_tokens_per_second" not in metrics["lm-eval"]
