"""The run report's collection and plots (the end-to-end render is in test_eval_script.py)."""

from __future__ import annotations

import json

from utils.metrics import MetricsLogger
from utils.report import collect_run, render_run_report


def test_an_empty_run_renders_with_what_is_missing(tmp_path):
    run = collect_run(tmp_path / "data", tmp_path / "checkpoints", tmp_path / "evaluation_results")
    markdown, plots = render_run_report(run, tmp_path / "reports")
    assert plots == []
    assert "no processed data set under" in markdown and "(make evaluate)" in markdown
    assert "No training stage output found." in markdown


def test_every_stage_gets_its_own_loss_and_learning_rate_panel(tmp_path):
    """Pretraining logs `lr`, the trainer-based stages `learning_rate`; non-finite values are left out."""
    for stage, lr_key in (("pretrain", "lr"), ("sft", "learning_rate"), ("dpo", "learning_rate")):
        logger = MetricsLogger(tmp_path / "checkpoints" / stage / "tiny" / "metrics.jsonl")
        for step in range(1, 6):
            logger.log({"step": step, "loss": float("nan") if step == 3 else 1.0 / step, lr_key: 1e-3})
    (tmp_path / "checkpoints" / "sft" / "tiny" / "summary.json").write_text(json.dumps({"stage": "sft", "seconds": 3}))
    run = collect_run(tmp_path / "data", tmp_path / "checkpoints", tmp_path / "evaluation_results")
    assert [(s.stage, len(s.metrics)) for s in run.stages] == [("pretrain", 5), ("sft", 5), ("dpo", 5)]
    markdown, plots = render_run_report(run, tmp_path / "reports")
    assert [p.name for p in plots] == ["loss.png", "learning_rate.png"]
    assert "| sft | tiny | 5 | 0.2 | 3 |" in markdown
    assert all(p.stat().st_size > 10_000 for p in plots)


def test_the_report_shows_what_each_stage_changed_side_by_side(tmp_path):
    root = tmp_path / "checkpoints"
    logger = MetricsLogger(root / "pretrain" / "tiny" / "metrics.jsonl")
    logger.log({"event": "eval", "step": 200, "val_loss": 6.5})
    logger.log({"event": "eval", "step": 800, "val_loss": 4.25})
    (root / "sft" / "tiny").mkdir(parents=True)
    (root / "sft" / "tiny" / "summary.json").write_text(json.dumps(
        {"stage": "sft", "eval_loss_before": 5.97, "eval_loss_after": 4.95}))
    (root / "dpo" / "tiny").mkdir(parents=True)
    (root / "dpo" / "tiny" / "summary.json").write_text(json.dumps({
        "stage": "dpo", "eval_before": {"loss": 0.6931, "rewards/accuracies": 0.0, "rewards/margins": 0.0},
        "eval_after": {"loss": 0.41, "rewards/accuracies": 0.84, "rewards/margins": 0.9}}))
    markdown, _ = render_run_report(collect_run(tmp_path / "data", root, tmp_path / "evaluation_results"),
                                    tmp_path / "reports")
    assert "| pretrain | validation loss (first → final evaluation) | 6.5 | 4.25 |" in markdown
    assert "| sft | held-out reply loss | 5.97 | 4.95 |" in markdown
    assert "| dpo | held-out reward accuracy | 0 | 0.84 |" in markdown
    assert "| dpo | held-out reward margin | 0 | 0.9 |" in markdown
