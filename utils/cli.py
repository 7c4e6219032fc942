"""What every stage script shares at its edges: clean error exits, end-of-stage summaries, progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from utils.files import atomic_write_json

# Errors caused by the user's input; they end the stage with a message, not a traceback.
# PIPELINE_DEBUG=1 shows the traceback anyway.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError)
SUMMARY = "summary.json"


def run_main(main: Callable[[], int | None]) -> None:
    """Runs a stage's main(): exit 0 on success, 2 with a one-paragraph message on bad input, 130 on Ctrl-C."""
    try:
        code = main()
    except USER_ERRORS as err:
        if os.environ.get("PIPELINE_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def quiet_libraries() -> None:
    """Library progress bars (dataset maps, weight loading) would interleave with the stage's own output,
    and trl 1.16 still calls a name transformers deprecated: a warning nobody running a stage can act on."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    from transformers.utils import logging

    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def progress(iterable: Any = None, total: int | None = None, desc: str = "", **kwargs: Any) -> tqdm:
    """A tqdm bar with ETA on a terminal; on a pipe (CI) a plain line every ~30 s instead of redraws."""
    interactive = sys.stderr.isatty()
    return tqdm(
        iterable, total=total, desc=desc, dynamic_ncols=True,
        mininterval=0.2 if interactive else 30.0, ascii=not interactive, **kwargs,
    )


class StageSummary:
    """Collects a stage's key facts; prints them at the end and writes the same as `summary.json`."""

    def __init__(self, stage: str, **facts: Any):
        self.started = time.time()
        self.facts: dict[str, Any] = {"stage": stage, **facts}

    def add(self, **facts: Any) -> None:
        self.facts.update(facts)

    def finish(self, output_dir: str | Path, filename: str = SUMMARY) -> dict[str, Any]:
        self.facts["seconds"] = round(time.time() - self.started, 2)
        atomic_write_json(Path(output_dir, filename), self.facts)
        width = max(len(k) for k in self.facts)
        print(f"\n== {self.facts['stage']} summary ==")
        for key, value in self.facts.items():
            if key != "stage":
                shown = json.dumps(value, default=str) if isinstance(value, (dict, list)) else value
                print(f"  {key:<{width}}  {shown}")
        return self.facts


def git_commit() -> str | None:
    """The checkout's commit, which run.json and results record as the code version; None outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
