"""Promotion gates (config/gates.json): thresholds, regressions against the previous stage, missing and
non-finite metrics, the shipped config, and the exit code and message of `05_evaluate.py --gates`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from utils.config import ConfigError
from utils.layout import STAGES
from utils.results import StageGates, check_gates, comparison_rows, flatten_metrics, load_gates

ROOT = Path(__file__).resolve().parents[1]


def failed(checks) -> list[str]:
    return [c.message for c in checks if c.status == "failed"]


def test_thresholds_pass_and_fail_with_the_metric_and_threshold_named():
    gates = StageGates(max={"val.perplexity": 100}, min={"boolq.accuracy": 0.5})
    assert failed(check_gates({"val.perplexity": 80.0, "boolq.accuracy": 0.55}, gates, None)) == []
    assert failed(check_gates({"val.perplexity": 120.0, "boolq.accuracy": 0.4}, gates, None)) == [
        "val.perplexity = 120 > max 100", "boolq.accuracy = 0.4 < min 0.5"]


def test_regression_is_measured_in_the_metrics_good_direction():
    gates = StageGates(previous="pretrain", max_regression_pct={"val.perplexity": 10, "boolq.accuracy": 10})
    baseline = {"val.perplexity": 100.0, "boolq.accuracy": 0.60}
    ok = check_gates({"val.perplexity": 109.0, "boolq.accuracy": 0.70}, gates, baseline)
    assert failed(ok) == [] and [round(c.value, 1) for c in ok] == [9.0, -16.7]
    worse = failed(check_gates({"val.perplexity": 115.0, "boolq.accuracy": 0.50}, gates, baseline))
    assert worse == [
        "val.perplexity regressed +15.0 % vs pretrain (100 -> 115); over max_regression_pct 10",
        "boolq.accuracy regressed +16.7 % vs pretrain (0.6 -> 0.5); over max_regression_pct 10",
    ]


def test_perplexity_against_a_uniform_guess_scales_with_the_vocabulary():
    gates = StageGates(max_vs_uniform={"val.perplexity": 0.5})
    assert failed(check_gates({"val.perplexity": 250.0}, gates, None, vocab_size=512)) == []
    assert failed(check_gates({"val.perplexity": 300.0}, gates, None, vocab_size=512)) == [
        "val.perplexity = 300 > max_vs_uniform 0.5 x vocabulary 512 = 256"]
    assert failed(check_gates({"val.perplexity": 300.0}, gates, None, vocab_size=8192)) == []


def test_unmeasured_metrics_are_skipped_unless_required_and_nan_always_fails():
    gates = StageGates(required=["val.perplexity"], max={"val.perplexity": 100, "wikitext.bits_per_byte": 2.0},
                       max_regression_pct={"boolq.accuracy": 5})
    checks = check_gates({}, gates, None)
    assert [c.status for c in checks] == ["failed", "skipped", "skipped"]
    assert checks[0].message == "val.perplexity: required but not measured (max 100)"
    # A NaN metric is stored as null in results.json (see flatten_metrics) and fails its gate.
    metrics = flatten_metrics({"val": {"metrics": {"perplexity": float("nan")}}})
    assert metrics == {"val.perplexity": None}
    assert failed(check_gates(metrics, gates, None)) == ["val.perplexity is not finite (NaN or inf); max 100"]


def test_shipped_gates_config_covers_every_stage():
    for stage in STAGES:
        gates = load_gates(ROOT / "config" / "gates.json", stage)
        assert "val.perplexity" in gates.required
        assert gates.previous == {"pretrain": None, "sft": "pretrain", "dpo": "sft"}[stage]


def test_gates_config_errors_name_the_stage_and_field(tmp_path):
    path = tmp_path / "gates.json"
    path.write_text(json.dumps({"pretrain": {"max": {"val.perplexity": "low"}}}))
    with pytest.raises(ConfigError, match=r"stage 'pretrain': 'max.val.perplexity' must be a number"):
        load_gates(path, "pretrain")
    with pytest.raises(ConfigError, match="no gates for stage 'sft'; stages with gates: pretrain"):
        load_gates(path, "sft")
    path.write_text(json.dumps({"sft": {"max_regression_pct": {"boolq.samples": 5}}}))
    with pytest.raises(ConfigError, match="cannot tell whether higher or lower is better"):
        load_gates(path, "sft")
    path.write_text(json.dumps({"sft": {"max_vs_uniform": {"wikitext.word_perplexity": 0.5}}}))
    with pytest.raises(ConfigError, match="only token perplexities compare with the vocabulary size"):
        load_gates(path, "sft")


def test_comparison_marks_better_and_worse_by_direction():
    old = {"metrics": {"val.perplexity": 50.0, "boolq.accuracy": 0.6, "boolq.samples": 100}}
    new = {"metrics": {"val.perplexity": 40.0, "boolq.accuracy": 0.5, "boolq.samples": 100, "mc.x.accuracy": 0.3}}
    rows = {r[0]: r for r in comparison_rows(new, old)}
    assert rows["val.perplexity"] == ("val.perplexity", "50", "40", "-10 (-20.0 %)", "better")
    assert rows["boolq.accuracy"][4] == "worse" and rows["boolq.samples"][4] == ""
    assert rows["mc.x.accuracy"][1:] == ("n/a", "0.3", "", "")


def test_gates_on_existing_results_exit_3_naming_the_failure(tmp_path):
    """The baseline is found beside the results (evaluation_results/<previous stage>-<preset>/)."""
    pretrain = tmp_path / "pretrain-tiny" / "results.json"
    sft = tmp_path / "sft-tiny" / "results.json"
    for path, perplexity in ((pretrain, 40.0), (sft, 110.0)):
        path.parent.mkdir()
        path.write_text(json.dumps({"stage": path.parent.name[:-5], "preset": "tiny", "checkpoint": {"vocab_size": 512},
                                    "metrics": {"val.perplexity": perplexity}}))
    result = subprocess.run(
        [sys.executable, "scripts/05_evaluate.py", "--results", str(sft), "--gates", "sft", "--compare", str(pretrain)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 3
    assert "| val.perplexity " in result.stdout and "+70 (+175.0 %)" in result.stdout  # the comparison table
    assert result.stderr.strip().splitlines()[-1] == (
        "gate failed for stage sft: val.perplexity regressed +175.0 % vs pretrain (40 -> 110); over "
        "max_regression_pct 150 (thresholds in config/gates.json; `make pipeline FORCE=1` or run_pipeline.py "
        "--force carries on past it)"
    )
