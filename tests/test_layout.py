"""The checkpoint layout's one rule for "the model" when none is named, which 05_evaluate and 06_serve share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from utils.checkpoint import update_latest
from utils.layout import default_model, display_name, stage_and_preset


def complete(root: Path, stage: str, preset: str, age: float = 0.0) -> Path:
    """A stage dir whose `latest` names final/; `age` seconds in the past."""
    directory = root / stage / preset
    (directory / "final").mkdir(parents=True)
    update_latest(directory, "final")
    stamp = os.path.getmtime(directory / "latest") - age
    os.utime(directory / "latest", (stamp, stamp))
    return directory


def test_the_furthest_stage_wins_over_a_newer_earlier_stage(tmp_path):
    complete(tmp_path, "sft", "tiny", age=100)
    complete(tmp_path, "pretrain", "tiny")
    assert default_model("tiny", tmp_path) == tmp_path / "sft" / "tiny"
    complete(tmp_path, "dpo", "tiny", age=200)
    assert default_model(None, tmp_path) == tmp_path / "dpo" / "tiny"


def test_without_a_preset_the_preset_trained_last_is_taken(tmp_path):
    complete(tmp_path, "pretrain", "tiny", age=100)
    complete(tmp_path, "pretrain", "small")
    assert default_model(None, tmp_path) == tmp_path / "pretrain" / "small"
    assert default_model("tiny", tmp_path) == tmp_path / "pretrain" / "tiny"


def test_a_stage_dir_without_a_latest_pointer_does_not_count(tmp_path):
    (tmp_path / "dpo" / "tiny" / ".tmp-final-123").mkdir(parents=True)
    complete(tmp_path, "pretrain", "tiny")
    assert default_model("tiny", tmp_path) == tmp_path / "pretrain" / "tiny"


def test_no_checkpoint_names_where_it_looked_and_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dpo,sft,pretrain\}/small.*make pretrain-small"):
        default_model("small", tmp_path)


def test_05_and_06_take_the_same_default(tmp_path, run_stage, monkeypatch):
    """Both stages fail on the (empty) checkpoint the rule picked, so both looked at the same place: the further
    stage, of another preset than the pretraining."""
    monkeypatch.chdir(tmp_path)
    complete(tmp_path / "checkpoints", "pretrain", "tiny")
    picked = complete(tmp_path / "checkpoints", "sft", "small", age=50)
    code, _, evaluate_err = run_stage("05_evaluate.py", ["--tasks", "val"])
    assert code != 0 and str(Path("checkpoints/sft/small/final")) in evaluate_err
    (tmp_path / "p.json").write_text('["Hello"]')
    code, _, serve_err = run_stage("06_serve.py", ["--mode", "batch", "--prompts_file", "p.json",
                                                   "--output_file", "a.json"])
    assert code != 0 and str(Path("checkpoints/sft/small/final")) in serve_err
    assert picked == tmp_path / "checkpoints" / "sft" / "small"


def test_stage_preset_and_display_name_of_a_checkpoint_path(tmp_path):
    path = tmp_path / "checkpoints" / "dpo" / "tiny" / "merged"
    assert stage_and_preset(path) == ("dpo", "tiny")
    assert stage_and_preset(tmp_path / "elsewhere" / "model") is None
    assert display_name(path) == "dpo/tiny/merged"
    assert display_name(tmp_path / "elsewhere" / "model") == "model"
