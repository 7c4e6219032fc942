#!/usr/bin/env python
"""Checkpoint management: list, archive, clean up old steps, disk usage, and dated backups."""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import tarfile
from pathlib import Path

from utils.checkpoint import resolve_checkpoint
from utils.cli import run_main
from utils.files import read_json
from utils.layout import CHECKPOINTS_DIR, LATEST, STAGES, STEP_PREFIX, checkpoint_steps


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Every directory that holds a model or an adapter, below `root`."""
    found = {p.parent for pattern in ("config.json", "adapter_config.json") for p in root.rglob(pattern)}
    return sorted(p for p in found if not any(part.startswith(".") for part in p.parts))


def describe(path: Path) -> dict:
    run = read_json(path / "run.json", "checkpoint file") if (path / "run.json").is_file() else {}
    metrics = run.get("metrics", {}) if isinstance(run.get("metrics"), dict) else {}
    loss = next((metrics[k] for k in ("val_loss", "eval_loss", "loss", "train_loss") if k in metrics), None)
    step = run.get("step", metrics.get("step"))
    if step is None and path.name.removeprefix(STEP_PREFIX).isdigit():
        step = int(path.name.removeprefix(STEP_PREFIX))
    modified = dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    return {"path": str(path), "step": step, "loss": loss, "size": directory_size(path), "date": modified}


def list_checkpoints(root: Path) -> int:
    rows = [describe(p) for p in checkpoint_dirs(root)] if root.is_dir() else []
    if not rows:
        print(f"no checkpoints under {root}")
        return 0
    latest = {resolve_checkpoint(p.parent / LATEST) for p in root.rglob(LATEST) if p.is_file()}
    print(f"{'checkpoint':<52} {'step':>7} {'loss':>8} {'size':>10}  date")
    for row in rows:
        loss = f"{row['loss']:.4f}" if isinstance(row["loss"], (int, float)) else "-"
        mark = "  <- latest" if Path(row["path"]) in latest else ""
        print(f"{row['path']:<52} {row['step'] if row['step'] is not None else '-':>7} {loss:>8} "
              f"{human(row['size']):>10}  {row['date']}{mark}")
    return 0


def archive(checkpoint: Path, output_dir: Path) -> int:
    checkpoint = resolve_checkpoint(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = "_".join(checkpoint.parts[-3:]).replace("/", "_")
    target = output_dir / f"{name}-{stamp}.tar.gz"
    tmp = target.with_name(target.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(checkpoint, arcname=checkpoint.name)
    tmp.rename(target)
    print(f"archived {checkpoint} -> {target} ({human(target.stat().st_size)})")
    return 0


def cleanup(stage_dir: Path, keep: int) -> int:
    """In each run dir (one per preset) deletes all but the newest `keep` step_N dirs; never final/, best/,
    or what `latest` points at."""
    if not stage_dir.is_dir():
        raise FileNotFoundError(f"no such stage directory: {stage_dir}")
    protected = set()
    for pointer in stage_dir.rglob(LATEST):
        if pointer.is_file():
            protected.add(resolve_checkpoint(pointer).resolve())
    steps, doomed = [], []
    for run_dir in sorted({path.parent for path in stage_dir.rglob(f"{STEP_PREFIX}*")}):
        run_steps = [path for _, path in sorted(checkpoint_steps(run_dir))]
        steps += run_steps
        doomed += [p for p in run_steps[:max(0, len(run_steps) - keep)] if p.resolve() not in protected]
    freed = 0
    for path in doomed:
        freed += directory_size(path)
        shutil.rmtree(path)
        print(f"removed {path}")
    print(f"kept {len(steps) - len(doomed)} step checkpoints in {stage_dir}, freed {human(freed)}")
    return 0


def disk_usage(paths: list[Path]) -> int:
    for root in paths:
        if not root.exists():
            print(f"{str(root):<40} (absent)")
            continue
        print(f"{str(root):<40} {human(directory_size(root)):>10}")
        for child in sorted(p for p in root.iterdir() if p.is_dir()):
            print(f"  {str(child):<38} {human(directory_size(child)):>10}")
    return 0


def backup(checkpoints: list[Path], output_dir: Path) -> int:
    """Configs plus the chosen checkpoints (default: every stage's latest) in one dated archive."""
    if not checkpoints:
        checkpoints = [resolve_checkpoint(p) for p in CHECKPOINTS_DIR.glob(f"*/*/{LATEST}") if p.is_file()]
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"backup-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.tar.gz"
    tmp = target.with_name(target.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add("config", arcname="config")
        for path in checkpoints:
            tar.add(resolve_checkpoint(path), arcname=str(resolve_checkpoint(path)))
    tmp.rename(target)
    print(f"backup written: {target} ({human(target.stat().st_size)}); {len(checkpoints)} checkpoint(s) + config/")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every checkpoint with step, loss, size and date")
    listing.add_argument("--root", default=str(CHECKPOINTS_DIR))
    archiving = commands.add_parser("archive", help="a checkpoint into a .tar.gz")
    archiving.add_argument("checkpoint")
    archiving.add_argument("--output_dir", default="backups")
    cleaning = commands.add_parser("cleanup", help="keep only the newest KEEP step_N checkpoints of a stage")
    cleaning.add_argument("--stage", choices=STAGES, required=True)
    cleaning.add_argument("--keep", type=int, default=3)
    cleaning.add_argument("--root", default=str(CHECKPOINTS_DIR))
    usage = commands.add_parser("disk-usage", help="sizes of data/ and checkpoints/")
    usage.add_argument("paths", nargs="*", default=["data", str(CHECKPOINTS_DIR)])
    backing = commands.add_parser("backup", help="config/ plus chosen checkpoints into a dated archive")
    backing.add_argument("checkpoints", nargs="*")
    backing.add_argument("--output_dir", default="backups")
    args = parser.parse_args()
    if args.command == "list":
        return list_checkpoints(Path(args.root))
    if args.command == "archive":
        return archive(Path(args.checkpoint), Path(args.output_dir))
    if args.command == "cleanup":
        if args.keep < 0:
            parser.error("--keep must be >= 0")
        return cleanup(Path(args.root) / args.stage, args.keep)
    if args.command == "disk-usage":
        return disk_usage([Path(p) for p in args.paths])
    return backup([Path(p) for p in args.checkpoints], Path(args.output_dir))


if __name__ == "__main__":
    run_main(main)
