"""The pretraining sweep on the micro preset: trials run, a failed trial is recorded and the sweep goes on,
an interrupted sweep resumes without repeating finished trials, and 02_pretrain takes the best settings."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from presets import micro_preset

from utils.report import collect_run, render_run_report
from utils.sweep import SweepError, open_study, parse_space

ROOT = Path(__file__).resolve().parents[1]
# Trial 0 is the preset's learning rate (0.003), which trains; with seed 0 the sampler then picks 1e38, which
# diverges: that trial fails after two non-finite steps.
SPACE = {"learning_rate": {"type": "categorical", "choices": [0.003, 1e38]},
         "warmup_steps": {"type": "int", "low": 0, "high": 3}}
TRIAL_ARGS = "--batch_size 4 --sequence_length 64 --eval_batches 2 --max_bad_steps 2 --lr_scheduler constant"


def sweep_command(config: Path, data: Path, out: Path, space: Path, trials: int) -> list[str]:
    return [sys.executable, "scripts/sweep.py", "--config", str(config), "--data_path", str(data), "--output_dir",
            str(out), "--trials", str(trials), "--max_steps", "6", "--eval_steps", "3", "--space", str(space),
            "--seed", "0", "--trial_args", TRIAL_ARGS]


def test_sweep_runs_records_failures_resumes_after_a_kill_and_writes_settings_02_takes(processed_dir, tmp_path,
                                                                                      run_stage, micro_config):
    config = micro_config
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    out = tmp_path / "sweep"

    # Killed (with its running trial) once the second trial has started.
    process = subprocess.Popen(sweep_command(config, processed_dir, out, space, 2), cwd=ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (out / "trials" / "001" / "settings.json").is_file() and time.time() < deadline:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = optuna.load_study(study_name="pretrain-micro", storage=f"sqlite:///{out / 'study.db'}").trials

    resumed = subprocess.run(sweep_command(config, processed_dir, out, space, 2), cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trial 1 was interrupted; it runs again with the same settings" in resumed.stdout
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert trials[0]["settings"] == before[0].params and trials[0]["state"] == before[0].state.name == "COMPLETE"
    assert trials[0]["settings"]["learning_rate"] == 0.003  # the preset's own setting comes first
    assert len(trials) == 3 and trials[2]["settings"] == trials[1]["settings"]
    assert [t["state"] for t in trials] == ["COMPLETE", "FAIL", "FAIL"] and "interrupted" in trials[1]["failure"]
    assert trials[2]["settings"]["learning_rate"] == 1e38 and "exit 3: error: 2 steps in a row" in trials[2]["failure"]
    assert (out / "history.png").is_file() and "| trial | state | val loss |" in resumed.stdout
    run = collect_run(tmp_path / "none", tmp_path / "none", tmp_path / "none", sweeps_dir=tmp_path)
    report, _ = render_run_report(run, tmp_path / "report")
    assert "## Hyper-parameter sweeps" in report and "3 trials:" in report and "sweep-sweep.png" in report

    best = json.loads((out / "best.json").read_text())
    assert best["learning_rate"] == 0.003
    code, stdout, stderr = run_stage("02_pretrain.py", [
        "--config", str(config), "--data_path", str(processed_dir), "--output_dir", str(tmp_path / "never"),
        "--settings", str(out / "best.json"), "--dry_run", "--max_steps", "10", "--lr_scheduler", "cosine"])
    assert code == 0, stderr
    assert "peak 0.003" in stdout and f"warmup {best['warmup_steps']}" in stdout


def test_bad_spaces_name_the_setting():
    preset = micro_preset()
    for space, message in [
        ({}, "non-empty JSON object"),
        ({"learning_rat": {"type": "float", "low": 1e-4, "high": 1e-2}}, "'learning_rat' is not a setting"),
        ({"learning_rate": {"type": "float", "low": 1e-2, "high": 1e-4}}, "'learning_rate' .* 'low' <= 'high'"),
        ({"learning_rate": {"type": "float", "low": 0, "high": 1e-2, "log": True}}, "log scale needs 'low' > 0"),
        ({"lr_scheduler": {"type": "categorical", "choices": []}}, "non-empty 'choices'"),
        ({"warmup_steps": {"type": "uniform"}}, "needs a 'type' of float, int, categorical"),
    ]:
        with pytest.raises(SweepError, match=message):
            parse_space(space, preset)
    assert set(parse_space(None, micro_preset())) >= {"learning_rate", "warmup_steps", "lr_scheduler"}


def test_a_storage_of_another_study_or_settings_is_refused_untouched(tmp_path):
    args = argparse.Namespace(data_path="data/x", time_budget="2m", max_steps=None, seed=0, trials=3)
    optuna.create_study(study_name="something-else", storage=f"sqlite:///{tmp_path / 'study.db'}")
    before = (tmp_path / "study.db").read_bytes()
    with pytest.raises(SweepError, match="holds another study .something-else"):
        open_study(tmp_path, micro_preset(), SPACE, args)
    assert (tmp_path / "study.db").read_bytes() == before

    other = tmp_path / "other"
    other.mkdir()
    study = open_study(other, micro_preset(), SPACE, args)
    first = study.trials[0]
    assert first.state.name == "WAITING" and first.system_attrs["fixed_params"] == {
        "learning_rate": 0.003, "warmup_steps": 2}
    with pytest.raises(SweepError, match="its space differ"):
        open_study(other, micro_preset(), {**SPACE, "weight_decay": {"type": "float", "low": 0, "high": 0.1}}, args)
