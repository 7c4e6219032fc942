"""`--report_to` of 03_sft/04_dpo (and utils/trackers.py, which 02_pretrain shares): TensorBoard writes event files
under the stage directory, a tracker whose package is missing or an unknown name is one error before training."""

from __future__ import annotations

import importlib.util
import json

import pytest

from utils.chat_data import builtin_sft
from utils.trackers import TrackerError, check_trackers, parse_trackers


@pytest.fixture()
def sft_data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in builtin_sft(seed=2)[:8]))
    return path


def test_sft_report_to_tensorboard_writes_event_files(micro_checkpoint, sft_data, tmp_path, run_stage):
    pytest.importorskip("tensorboard")
    out = tmp_path / "sft"
    code, _, stderr = run_stage("03_sft.py", [
        "--model_path", str(micro_checkpoint), "--dataset_path", str(sft_data), "--output_dir", str(out),
        "--max_steps", "2", "--batch_size", "4", "--max_length", "64", "--eval_fraction", "0",
        "--logging_steps", "1", "--no-merge", "--report_to", "tensorboard",
    ])
    assert code == 0, stderr[-3000:]
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert "train/loss" in scalars


@pytest.mark.parametrize("script", ["03_sft.py", "04_dpo.py"])
def test_missing_tracker_package_is_one_error_before_training(script, micro_checkpoint, tmp_path, run_stage):
    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    out = tmp_path / "out"
    code, _, stderr = run_stage(script, ["--model_path", str(micro_checkpoint), "--output_dir", str(out),
                                         "--report_to", "mlflow"])
    assert code == 2, stderr
    assert stderr.startswith("error: --report_to mlflow: the package is not installed; install it with "
                             "`pip install mlflow`")
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()  # nothing was loaded or written


def test_unknown_tracker_names_the_choices(micro_checkpoint, tmp_path, run_stage):
    code, _, stderr = run_stage("03_sft.py", ["--model_path", str(micro_checkpoint), "--output_dir",
                                              str(tmp_path / "out"), "--report_to", "tensorbord"])
    assert code == 2
    assert ("error: --report_to: unknown tracker 'tensorbord'; "
            "choose none, tensorboard, wandb, trackio, mlflow") in stderr
    with pytest.raises(TrackerError, match="'none' cannot be combined"):
        parse_trackers("none,wandb")
    assert parse_trackers("none") == [] and parse_trackers("TensorBoard, tensorboard") == ["tensorboard"]


def test_wandb_defaults_to_offline_without_an_api_key(tmp_path, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(TrackerError, match="pip install wandb"):
            check_trackers("wandb", tmp_path)
        return
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    assert check_trackers("wandb", tmp_path) == ["wandb"]
    import os

    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(tmp_path.resolve())


def test_pretrain_report_to_tensorboard_writes_event_files(micro_config, processed_dir, tmp_path, run_stage):
    pytest.importorskip("tensorboard")
    out = tmp_path / "pretrain"
    code, _, stderr = run_stage("02_pretrain.py", [
        "--config", str(micro_config), "--data_path", str(processed_dir), "--output_dir", str(out),
        "--max_steps", "3", "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "0", "--eval_batches", "1",
        "--report_to", "tensorboard",
    ])
    assert code == 0, stderr[-3000:]
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in out.iterdir())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"loss", "lr", "val_loss"} <= set(scalars)


def test_pretrain_checks_the_tracker_before_training(micro_config, processed_dir, tmp_path, run_stage):
    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    out = tmp_path / "pretrain"
    code, _, stderr = run_stage("02_pretrain.py", ["--config", str(micro_config), "--data_path", str(processed_dir),
                                                   "--output_dir", str(out), "--report_to", "tensorboard,mlflow"])
    assert code == 2 and stderr.startswith("error: --report_to mlflow: the package is not installed")
    assert not out.exists()
