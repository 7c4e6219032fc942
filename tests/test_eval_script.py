"""scripts/05_evaluate.py end to end on a real micro checkpoint: results.json, report.md, comparison, and the
clear refusals (exit 2, nothing written) for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from utils.checkpoint import update_latest
from utils.files import sha256_file
from utils.metrics import MetricsLogger

ROOT = Path(__file__).resolve().parents[1]
WIKI = (
    " \n = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor . He had a guest "
    "@-@ starring role on the television series The Bill in 2000 . \n \n = Du Fu = \n \n Du Fu ( 712 – 770 ) was a "
    "prominent Chinese poet of the Tang dynasty . \n"
)


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/05_evaluate.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, micro_checkpoint, processed_dir) -> dict[str, Path]:
    """A pretrain stage dir holding the micro checkpoint (whose run.json names the processed data), and data files."""
    root = tmp_path_factory.mktemp("eval_inputs")
    stage_dir = root / "checkpoints" / "pretrain" / "micro"
    shutil.copytree(micro_checkpoint, stage_dir / "final")
    (stage_dir / "final" / "run.json").write_text(json.dumps({"args": {"data_path": str(processed_dir)}}))
    update_latest(stage_dir, "final")
    (root / "wiki.test.raw").write_text(WIKI, encoding="utf-8")
    boolq = [{"question": f"is {w} a word", "passage": f"{w.title()} is a word in a sentence.", "answer": i % 3 != 0}
             for i, w in enumerate(["apple", "river", "stone", "cloud", "piano", "candle"])]
    (root / "boolq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in boolq), encoding="utf-8")
    mc = [{"ctx": "A tuple is", "endings": ["immutable", "a loop"], "gold": 0},
          {"ctx": "json.dumps returns", "endings": ["a float", "a string", "a socket"], "gold": "a string"}]
    (root / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc), encoding="utf-8")
    (root / "prompts.json").write_text(json.dumps(["The json module", [{"role": "user", "content": "Hi"}]]))
    return {"root": root, "stage_dir": stage_dir, "checkpoint": stage_dir / "final"}


@pytest.fixture(scope="module")
def evaluated(inputs) -> tuple[subprocess.CompletedProcess, Path]:
    """Every task, and the pretrain gate, which an untrained model must fail."""
    out = inputs["root"] / "evaluation_results" / "pretrain-micro"
    result = evaluate(
        "--model_path", str(inputs["stage_dir"]), "--output_dir", str(out), "--gates", "pretrain",
        "--wikitext_path", str(inputs["root"] / "wiki.test.raw"), "--boolq_path", str(inputs["root"] / "boolq.jsonl"),
        "--mc_path", str(inputs["root"] / "mine.jsonl"), "--mc_fields", "context=ctx,choices=endings,answer=gold",
        "--prompts_path", str(inputs["root"] / "prompts.json"), "--max_new_tokens", "4",
        "--context_length", "64", "--speed_new_tokens", "4", "--speed_repeats", "1",
    )
    return result, out


def test_evaluation_writes_every_metric_with_hashes_and_counts(evaluated, inputs, processed_dir):
    result, out = evaluated
    assert result.returncode == 3, result.stderr  # the gate's verdict; the evaluation itself completed
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    assert (results["stage"], results["preset"]) == ("pretrain", "micro")
    assert results["checkpoint"]["weights_sha256"] == sha256_file(inputs["checkpoint"] / "model.safetensors")
    assert results["settings"]["context_length"] == 64 and results["settings"]["stride"] == 64
    wikitext = results["tasks"]["wikitext"]
    assert wikitext["sha256"] == sha256_file(inputs["root"] / "wiki.test.raw") and wikitext["used"] == 2
    # lm-eval's pages drop the leading " \n" and the "\n" between the two pages (3 bytes); its word count,
    # re.split(r"\s+", page), has an empty word at the start and the end of each page (4 more words).
    assert metrics["wikitext.words"] == len(WIKI.split()) + 4 and metrics["wikitext.bytes"] == len(WIKI.encode()) - 3
    assert metrics["wikitext.word_perplexity"] > metrics["wikitext.token_perplexity"] > 1
    assert 0 < metrics["wikitext.bits_per_byte"] < 20
    # The run's own held-out data, found through the checkpoint's run.json.
    assert results["tasks"]["val"]["source"] == str(processed_dir)
    assert metrics["val.tokens"] == json.loads((processed_dir / "meta.json").read_text())["val_tokens"] - 1
    assert 0 <= metrics["val.token_accuracy"] <= 1
    assert metrics["boolq.samples"] == 6 and metrics["boolq.majority_baseline"] == pytest.approx(4 / 6)
    assert metrics["mc.mine.samples"] == 2 and 0 <= metrics["mc.mine.accuracy_norm"] <= 1
    samples = results["tasks"]["generate"]["samples"]
    assert len(samples) == 2 and all(s["generated_tokens"] <= 4 for s in samples)
    assert results["tasks"]["generate"]["settings"]["max_new_tokens"] == 4
    for key in ("prefill_tokens_per_second", "decode_tokens_per_second", "time_to_first_token_seconds",
                "peak_memory_mb"):
        assert metrics[f"speed.{key}"] > 0
    report = (out / "report.md").read_text()
    assert "| boolq | accuracy |" in report and "## Smoke-test generations" in report
    assert json.loads((out / "summary.json").read_text())["stage"] == "evaluate"


def test_an_untrained_model_fails_the_pretrain_gate_by_name(evaluated):
    result, out = evaluated
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("gate failed for stage pretrain: val.perplexity = ")
    assert "> max_vs_uniform 0.5 x vocabulary 512 = 256" in message and "config/gates.json" in message
    gates = json.loads((out / "results.json").read_text())["gates"]
    assert gates["passed"] is False
    assert {"metric": "val.perplexity", "rule": "max_vs_uniform", "status": "failed"}.items() <= next(
        c for c in gates["checks"] if c["metric"] == "val.perplexity").items()
    assert "Promotion gates: pretrain (**FAILED**)" in (out / "report.md").read_text()


def test_run_report_renders_the_run_with_plots(evaluated, inputs, processed_dir):
    """07_report over a run layout: processed data, a stage's summary and metrics.jsonl, the evaluation."""
    root = inputs["root"]
    shutil.copytree(processed_dir, root / "data" / "processed" / "micro", dirs_exist_ok=True)
    logger = MetricsLogger(inputs["stage_dir"] / "metrics.jsonl")
    for step in range(1, 41):
        logger.log({"step": step, "loss": 6.0 / step ** 0.3, "lr": 1e-3 * min(1, step / 10), "tokens_per_second": 9e2})
        if step % 10 == 0:
            logger.log({"step": step, "val_loss": 6.2 / step ** 0.3})
    (inputs["stage_dir"] / "summary.json").write_text(json.dumps({"stage": "pretrain", "steps": 40, "seconds": 12.5}))
    result = subprocess.run([sys.executable, "scripts/07_report.py", "--root", str(root)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = (root / "reports" / "report.md").read_text()
    for png in ("loss", "learning_rate", "evaluation"):
        assert f"](plots/{png}.png)" in report
        assert (root / "reports" / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| pretrain | micro | 40 |" in report  # the stage table, from summary.json and metrics.jsonl
    assert "| val.perplexity |" in report and "pretrain/micro" in report
    assert "gate" in report.lower() and "FAILED" in report
    assert "| train |" in report and "| val |" in report  # data statistics from meta.json


@pytest.mark.parametrize("case", ["not_a_checkpoint", "boolq_format"])
def test_bad_input_is_refused_with_a_clear_message_and_no_results(inputs, tmp_path, case, run_stage):
    bad_boolq = tmp_path / "bad.jsonl"
    bad_boolq.write_text(json.dumps({"question": "q", "title": "t", "answer": True}) + "\n")
    args, message = {
        "not_a_checkpoint": (["--model_path", str(tmp_path)], "is not a checkpoint: missing config.json"),
        "boolq_format": (["--model_path", str(inputs["checkpoint"]), "--boolq_path", str(bad_boolq)],
                         "bad.jsonl, line 1: field 'passage' is missing"),
    }[case]
    code, _, stderr = run_stage("05_evaluate.py", [*args, "--output_dir", str(tmp_path / "out")])
    assert code == 2, code
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()
