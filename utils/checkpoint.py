"""Checkpoint directories: atomic writes, checksums, the `latest` pointer, and loading any stage's output.

A checkpoint is a Hugging Face model directory (or a peft adapter directory) plus `checksums.json`
(sha256 of every file, written last inside the temporary directory), `run.json` and, for training
stages, `training_state/`. Directories are written under a temporary name and renamed into place; the
stage's `latest` file is rewritten (atomically) only after that rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from utils.files import read_json, reading

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CHECKSUMS = "checksums.json"
LATEST = "latest"
ADAPTER_CONFIG = "adapter_config.json"
# run.json key of an adapter: its base checkpoint relative to the adapter directory.
ADAPTER_BASE_KEY = "adapter_base_relative"


class CheckpointError(ValueError):
    pass


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes via a temporary file in the same directory and renames it, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_checksums(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {str(p.relative_to(directory)): sha256_file(p) for p in files}
    atomic_write_json(directory / CHECKSUMS, sums)


def _writer_gone(name: str) -> bool:
    """Whether the process whose PID ends a temporary's name is dead (so the file is debris, not in use).

    Our own PID counts as gone: this is called before the stage writes anything, so a match is an earlier
    process that had the same PID (a container restart reuses low PIDs)."""
    pid = name.rsplit("-", 1)[-1]
    return pid.isdigit() and (int(pid) == os.getpid() or not psutil.pid_exists(int(pid)))


def _is_complete(directory: Path) -> bool:
    try:
        verify_checkpoint(directory)
    except (CheckpointError, OSError, ValueError):
        return False
    return True


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def recover_interrupted_writes(directory: str | Path, only: str | None = None) -> list[str]:
    """Repairs what killed writers left in `directory`; returns one line per action, for the stage to print.

    A kill between atomic_directory's two renames leaves `.old-<name>-PID` (the previous copy) and
    `.tmp-<name>-PID` with no `<name>`: the swap is finished when the new copy is complete (every checksum
    matches), else rolled back. Temporaries of dead writers are removed. `only` limits this to one name.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    notes = []
    for old in sorted(directory.glob(".old-*")):
        name, _, pid = old.name.removeprefix(".old-").rpartition("-")
        if not name or (only and name != only) or not _writer_gone(old.name):
            continue
        final, new = directory / name, directory / f".tmp-{name}-{pid}"
        if final.exists():
            _remove(old)
            notes.append(f"removed {old}: the previous {name}/ left behind by a finished swap")
        elif new.is_dir() and _is_complete(new):
            os.replace(new, final)
            _remove(old)
            notes.append(f"finished an interrupted swap in {directory}: the new {name}/ was complete, "
                         f"so it took its place and the previous copy was removed")
        else:
            os.replace(old, final)
            notes.append(f"rolled back an interrupted swap in {directory}: the new {name}/ was incomplete, "
                         f"so the previous {name}/ is back")
    for stale in sorted({*directory.glob(".*.tmp-*"), *directory.glob(".tmp-*")}):
        owner = stale.name.removeprefix(".tmp-").rpartition("-")[0] if stale.name.startswith(".tmp-") else None
        if (only and owner != only) or not _writer_gone(stale.name):
            continue
        _remove(stale)
        notes.append(f"removed {stale}: a temporary left by a process that no longer runs")
    return notes


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling directory; on success checksums it and renames it to `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_writes(final.parent, only=final.name)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        write_checksums(tmp)
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def update_latest(stage_dir: str | Path, name: str) -> None:
    atomic_write_text(Path(stage_dir, LATEST), name + "\n")


def resolve_checkpoint(path: str | Path) -> Path:
    """Follows `latest`: `<dir>/latest`, or a stage dir holding a `latest` file, to the directory it names."""
    path = Path(path)
    if path.name == LATEST and not path.is_dir():
        stage_dir = path.parent
    elif (path / LATEST).is_file() and not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        stage_dir = path
    else:
        return path
    pointer = stage_dir / LATEST
    if not pointer.is_file():
        raise CheckpointError(f"no complete checkpoint in {stage_dir}: the '{LATEST}' pointer file is missing")
    return stage_dir / pointer.read_text(encoding="utf-8").strip()


def verify_checkpoint(path: str | Path) -> None:
    """Checks every file listed in `checksums.json` exists and matches; names the first one that does not."""
    path = Path(path)
    manifest = path / CHECKSUMS
    if not manifest.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {CHECKSUMS} is missing (partial or foreign write)")
    for name, expected in json.loads(manifest.read_text(encoding="utf-8")).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if sha256_file(file) != expected:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} does not match its sha256 in {CHECKSUMS}")


def describe_missing(path: Path) -> str | None:
    """Why `path` is not a loadable model checkpoint, or None when it is."""
    if not path.is_dir():
        return f"{path} does not exist or is not a directory"
    if (path / ADAPTER_CONFIG).is_file():
        weights = ["adapter_model.safetensors"]
    else:
        weights = ["config.json", "model.safetensors"]
        if not (path / "model.safetensors").is_file() and (path / "model.safetensors.index.json").is_file():
            weights = ["config.json"]
    missing = [name for name in weights + ["tokenizer.json"] if not (path / name).is_file()]
    if missing:
        return f"{path} is not a checkpoint: missing {', '.join(missing)}"
    return None


def check_readable(path: Path) -> None:
    """Reads every JSON file and safetensors header a loader will open, so a damaged one is named with its cause
    (transformers would fail on it with a message that names no file, or with a traceback)."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.json")):
        read_json(file, "checkpoint file")
    for file in sorted(path.glob("*.safetensors")):
        with reading(file, "checkpoint weights"), safe_open(file, "pt") as handle:
            handle.keys()


def adapter_base_path(adapter_dir: Path) -> Path:
    """The base model of a peft adapter.

    `base_model_name_or_path` is absolute (what peft and transformers resolve from any directory); run.json's
    `adapter_base_relative` names the same base relative to the adapter, for a checkpoints tree that moved.
    Adapters written before that hold a path relative to the adapter, tried from the cwd, then from the adapter.
    """
    base = read_json(adapter_dir / ADAPTER_CONFIG, "checkpoint file")["base_model_name_or_path"]
    candidates = [Path(base)] if Path(base).is_absolute() else [Path(base), adapter_dir / base]
    run_file = adapter_dir / "run.json"
    relative = read_json(run_file, "checkpoint file").get(ADAPTER_BASE_KEY) if run_file.is_file() else None
    if relative:
        candidates.append(adapter_dir / relative)
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise CheckpointError(
        f"adapter {adapter_dir} names base model {base!r}, which is not found (tried {tried}); put the base "
        f"checkpoint back, or set base_model_name_or_path in {adapter_dir / ADAPTER_CONFIG} to where it is now"
    )


def load_model(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a pretrain, merged or DPO model, or a LoRA adapter on its base, with its tokenizer; eval mode.

    torch and transformers are imported here, not at module level, so data-only stages start fast.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from utils.tokenizer import load_tokenizer

    dtype = dtype or torch.float32
    path = resolve_checkpoint(path)
    problem = describe_missing(path)
    if problem:
        raise CheckpointError(problem)
    check_readable(path)
    tokenizer = load_tokenizer(path)
    if (path / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(adapter_base_path(path), dtype=dtype)
        model = PeftModel.from_pretrained(base, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval(), tokenizer


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
