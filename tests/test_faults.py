"""What a killed writer leaves behind, and what an overwrite may remove: nothing the stage did not write."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from utils.checkpoint import verify_checkpoint
from utils.files import atomic_directory, recover_interrupted_writes
from utils.metrics import has_torn_tail, read_metrics
from utils.tokens import META, check_replaceable, read_meta
from utils.training import check_output_dir

ROOT = Path(__file__).resolve().parents[1]

# A writer that replaces `final` and is killed (SIGKILL, no cleanup) between atomic_directory's two renames.
KILLED_MID_SWAP = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from utils.files import atomic_directory
    real_replace = os.replace
    def replace(src, dst):
        if Path(src).name.startswith(".tmp-final-"):  # the new copy's rename, after the old one's
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    os.replace = replace
    with atomic_directory(Path({final!r})) as tmp:
        (tmp / "weights.bin").write_text("new")
""")


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def kill_mid_swap(final: Path) -> int:
    process = subprocess.run([sys.executable, "-c", KILLED_MID_SWAP.format(root=str(ROOT), final=str(final))],
                             capture_output=True, text=True, timeout=60)
    assert process.returncode == -9, process.stderr
    return next(int(p.name.rsplit("-", 1)[1]) for p in final.parent.glob(".old-*"))


def write_old_final(final: Path) -> None:
    with atomic_directory(final) as tmp:
        (tmp / "weights.bin").write_text("old")


def test_a_swap_killed_between_its_renames_is_finished_when_the_new_copy_is_complete(tmp_path):
    final = tmp_path / "final"
    write_old_final(final)
    pid = kill_mid_swap(final)
    assert (not final.exists() and (tmp_path / f".old-final-{pid}").is_dir()
            and (tmp_path / f".tmp-final-{pid}").is_dir())
    notes = recover_interrupted_writes(tmp_path)
    assert len(notes) == 1 and "finished an interrupted swap" in notes[0]
    verify_checkpoint(final)
    assert (final / "weights.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_a_swap_killed_with_an_incomplete_new_copy_is_rolled_back(tmp_path):
    final = tmp_path / "final"
    write_old_final(final)
    pid = kill_mid_swap(final)
    (tmp_path / f".tmp-final-{pid}" / "weights.bin").unlink()
    notes = recover_interrupted_writes(tmp_path)
    assert "rolled back an interrupted swap" in notes[0] and "incomplete" in notes[0]
    assert (final / "weights.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_dead_writers_temporaries_are_removed_and_live_ones_kept(tmp_path):
    gone = dead_pid()
    (tmp_path / f".tmp-step_4-{gone}").mkdir()
    (tmp_path / f".latest.tmp-{gone}").write_text("step_4\n")
    (tmp_path / "final").mkdir()
    (tmp_path / f".old-final-{gone}").mkdir()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive:
        (tmp_path / f".tmp-step_8-{alive.pid}").mkdir()
        (tmp_path / "notes.tmp-1").write_text("a user's file, not a temporary of ours")
        notes = recover_interrupted_writes(tmp_path)
        alive.kill()
    assert len(notes) == 3 and all(str(gone) in note for note in notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".tmp-step_8-{alive.pid}", "final", "notes.tmp-1"]


def test_a_torn_last_metrics_line_is_dropped_and_any_other_bad_line_is_named(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo')
    assert has_torn_tail(log) and read_metrics(log) == [{"step": 1, "loss": 5.0}]
    log.write_text('{"step": 1, "lo\n{"step": 2, "loss": 4.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 1: not a JSON record"):
        read_metrics(log)


def test_a_run_killed_before_its_first_checkpoint_starts_again_without_overwrite(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / ".tmp-step_4-123").mkdir()
    assert check_output_dir(tmp_path, resuming=False, overwrite=False) is True
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        check_output_dir(tmp_path, resuming=False, overwrite=False)


def previous_data_run(out: Path) -> None:
    """What an earlier 01_prepare_data run left: the files its meta.json lists, and its summary."""
    out.mkdir()
    (out / "train.bin").write_bytes(b"\0" * 8)
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    (out / META).write_text(json.dumps({"files": {"train.bin": "…", "tokenizer/tokenizer.json": "…"}}))
    (out / "summary.json").write_text("{}")


def test_data_overwrite_refuses_paths_where_replacing_the_directory_would_lose_data(tmp_path):
    out = tmp_path / "out"
    previous_data_run(out)
    assert check_replaceable(out, [], overwrite=True) == ["meta.json", "summary.json", "tokenizer/", "train.bin"]
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        check_replaceable(out, [], overwrite=False)
    (out / "tokenizer" / "notes.txt").write_text("the user's own file")
    with pytest.raises(FileExistsError, match=r"did not write \(tokenizer/notes.txt\)"):
        check_replaceable(out, [], overwrite=True)
    with pytest.raises(ValueError, match="lies inside --output_dir"):
        check_replaceable(out, [str(out / "tokenizer" / "notes.txt")], overwrite=True)
    with pytest.raises(FileExistsError, match="is a file, not a directory"):
        check_replaceable(out / "train.bin", [], overwrite=True)


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/01_prepare_data.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_prepare_overwrite_keeps_the_users_files_and_says_what_it_replaced(tmp_path, tokenizer_dir):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": f"Document {i} is about rivers, boats and mills. " * 8}) + "\n"
                              for i in range(20)))
    out = tmp_path / "out"
    previous_data_run(out)
    (out / "notes.txt").write_text("the user's own file")
    flags = ["--input_path", str(source), "--output_dir", str(out), "--tokenizer_path", str(tokenizer_dir),
             "--language", "none", "--overwrite", "--vocab_size", "999"]
    refused = run_prepare(*flags)
    assert refused.returncode == 2 and "notes.txt" in refused.stderr and "Traceback" not in refused.stderr
    assert (out / "notes.txt").read_text() == "the user's own file" and (out / "train.bin").is_file()

    (out / "notes.txt").unlink()
    replaced = run_prepare(*flags)
    assert replaced.returncode == 0, replaced.stderr
    assert "replaced the previous run's meta.json, summary.json, tokenizer/, train.bin" in replaced.stdout
    assert len(read_meta(out)["files"]) > 2
    assert "--vocab_size 999 is not used: the vocabulary is --tokenizer_path's" in replaced.stdout
