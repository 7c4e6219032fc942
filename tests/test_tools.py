"""Operational tools behind make targets: checkpoint listing/cleanup/archive/backup, env check, presets, monitor."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def fake_stage(root: Path, steps: list[int], latest: str, preset: str = "tiny") -> Path:
    """A pretrain stage dir whose step dirs are real HF-style dirs (config.json + run.json)."""
    stage = root / "checkpoints" / "pretrain" / preset
    for step in steps:
        path = stage / f"step_{step}"
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")
        (path / "run.json").write_text(json.dumps({"step": step, "metrics": {"loss": 10.0 / step}}))
    (stage / "final").mkdir()
    (stage / "final" / "config.json").write_text("{}")
    (stage / "latest").write_text(latest + "\n")
    return stage


def test_cleanup_keeps_newest_of_each_run_and_what_latest_points_at(tmp_path):
    stage = fake_stage(tmp_path, [100, 200, 300, 400, 500], latest="step_100")
    other = fake_stage(tmp_path, [1000, 2000, 3000], latest="final", preset="small")
    result = run("checkpoints.py", "cleanup", "--stage", "pretrain", "--keep", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in stage.iterdir() if p.is_dir()) == ["final", "step_100", "step_400", "step_500"]
    assert sorted(p.name for p in other.iterdir() if p.is_dir()) == ["final", "step_2000", "step_3000"]


def test_list_shows_step_loss_and_latest(tmp_path):
    fake_stage(tmp_path, [100, 200], latest="step_200")
    out = run("checkpoints.py", "list", cwd=tmp_path).stdout
    line = next(line for line in out.splitlines() if "step_200" in line)
    assert "200" in line and "0.0500" in line and "<- latest" in line


def test_archive_and_backup_write_readable_archives(tmp_path):
    fake_stage(tmp_path, [100], latest="step_100")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "tiny.json").write_text("{}")
    assert run("checkpoints.py", "archive", "checkpoints/pretrain/tiny/latest", cwd=tmp_path).returncode == 0
    assert run("checkpoints.py", "backup", cwd=tmp_path).returncode == 0
    archives = sorted((tmp_path / "backups").glob("*.tar.gz"))
    assert len(archives) == 2
    backup = next(a for a in archives if a.name.startswith("backup-"))
    with tarfile.open(backup) as tar:
        names = tar.getnames()
    assert "config/tiny.json" in names and "checkpoints/pretrain/tiny/step_100/run.json" in names


def test_archive_of_missing_checkpoint_is_a_clear_error(tmp_path):
    result = run("checkpoints.py", "archive", "nowhere/step_1", cwd=tmp_path)
    assert result.returncode == 2 and "checkpoint not found: nowhere/step_1" in result.stderr


def test_check_env_and_presets_and_monitor_run():
    env = run("check_env.py", "--json")
    info = json.loads(env.stdout)
    assert info["packages"]["transformers"] and "cuda_available" in info
    table = run("show_presets.py").stdout
    tiny = next(line for line in table.splitlines() if line.startswith("| tiny |"))
    assert "6.82 M" in tiny and "4.72 M" in tiny
    monitor = run("monitor.py", "--interval", "0.1", "--count", "1")
    assert monitor.returncode == 0 and ("CPU" in monitor.stdout or "GPU" in monitor.stdout)


def test_every_make_target_in_help_expands_to_a_command():
    """`make -n` of each listed target prints its commands: no target is silently a no-op."""
    listed = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    targets = [line.split()[0] for line in listed.splitlines() if line.startswith("  ")]
    assert {"pipeline", "pretrain-tiny", "resume-pretrain-tiny", "serve-api", "test-pipeline"} <= set(targets)
    for target in [*targets, "pretrain-small", "pretrain-base", "pretrain-tiny-moe", "resume-pretrain-base"]:
        dry = subprocess.run(["make", "--no-print-directory", "-n", target, "CKPT=checkpoints/x", "PROMPTS=p.json"],
                             cwd=ROOT, capture_output=True, text=True)
        assert dry.returncode == 0 and "Nothing to be done" not in dry.stdout + dry.stderr, (target, dry)
        assert dry.stdout.strip(), target
