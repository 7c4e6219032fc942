"""Where the stages put their checkpoints, and which checkpoint is "the model" when none is named.

`checkpoints/<stage>/<preset>/` holds a training stage's outputs: `step_<N>/`, `best/` and `final/`
checkpoints, `merged/` (the standalone model of a LoRA stage), `training_state/`, `metrics.jsonl`,
`summary.json` and the `latest` pointer, a one-line file naming the newest complete checkpoint; it is
rewritten only after that checkpoint is complete. This module is the one place that knows those names.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

CHECKPOINTS_DIR = Path("checkpoints")
STAGES = ("pretrain", "sft", "dpo")  # pipeline order
LATEST = "latest"
FINAL = "final"
BEST = "best"
MERGED = "merged"
STATE_DIR = "training_state"
STEP_PREFIX = "step_"
TRACKER_DIR = "runs"  # --report_to: TensorBoard events and other trackers' local files


def stage_dir(stage: str, preset: str, root: Path = CHECKPOINTS_DIR) -> Path:
    """`checkpoints/<stage>/<preset>`: a stage's default output directory."""
    return Path(root, stage, preset)


def checkpoint_steps(stage_output: Path) -> Iterator[tuple[int, Path]]:
    """(N, path) of every `step_<N>/` in a stage's output directory."""
    for path in stage_output.glob(f"{STEP_PREFIX}*"):
        suffix = path.name.removeprefix(STEP_PREFIX)
        if path.is_dir() and suffix.isdigit():
            yield int(suffix), path


def fine_tuning_output_dir(stage: str, model_dir: Path) -> Path:
    """`checkpoints/<stage>/<preset>` for a stage that reads `model_dir`: the preset of a `checkpoints/<stage>/
    <preset>/` input, else the name of the input's run directory."""
    parts = model_dir.resolve().parts
    for i, part in enumerate(parts[:-1]):
        if part in STAGES and i > 0 and parts[i - 1] == CHECKPOINTS_DIR.name:
            return stage_dir(stage, parts[i + 1])
    inside_stage = model_dir.name in (FINAL, MERGED) or model_dir.name.startswith(STEP_PREFIX)
    return stage_dir(stage, model_dir.resolve().parent.name if inside_stage else model_dir.name)


def stage_and_preset(path: str | Path) -> tuple[str, str] | None:
    """(stage, preset) of a path inside `.../<stage>/<preset>/`, the innermost such pair; None outside one."""
    parts = Path(path).resolve().parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in STAGES:
            return parts[i], parts[i + 1]
    return None


def display_name(path: str | Path) -> str:
    """`dpo/tiny/final` for a checkpoint under a `checkpoints/` tree, else the directory's name."""
    parts = Path(path).resolve().parts
    if CHECKPOINTS_DIR.name in parts[:-1]:
        return "/".join(parts[len(parts) - parts[::-1].index(CHECKPOINTS_DIR.name):])
    return Path(path).name or Path(path).resolve().name


def default_model(preset: str | None = None, root: Path = CHECKPOINTS_DIR) -> Path:
    """The model 05_evaluate and 06_serve take when none is named: the furthest stage (dpo, then sft, then
    pretrain) that has a complete checkpoint (a `latest` pointer), for `preset` or, without one, for the
    preset whose `latest` was written last. Returns the stage directory; its `latest` names the checkpoint."""
    for stage in reversed(STAGES):
        pattern = f"{preset}/{LATEST}" if preset else f"*/{LATEST}"
        pointers = [p for p in Path(root, stage).glob(pattern) if p.is_file()]
        if pointers:
            return max(pointers, key=lambda p: p.stat().st_mtime).parent
    where = f"{root}/{{{','.join(reversed(STAGES))}}}/{preset or '<preset>'}"
    raise FileNotFoundError(
        f"no complete checkpoint (a '{LATEST}' pointer) in {where}: train one first "
        f"(make pretrain-{preset or 'tiny'}) or pass --model_path"
    )
