#!/usr/bin/env python
"""Hyper-parameter sweep of pretraining: Optuna's TPE sampler over 02_pretrain settings, each trial a short
real `02_pretrain.py` run, its median pruner on the validation loss the trial logs as it goes.

    python scripts/sweep.py --config config/tiny.json --data_path data/processed/python-docs-tiny \\
        --trials 20 --time_budget 2m

The study lives in `<output_dir>/study.db` (Optuna's SQLite storage): run the same command again and an
interrupted sweep resumes where it stopped (finished trials are kept; a trial cut off mid-run is tried again
with the same settings). Two processes with the same command share the study and run trials at once.
Outputs in `<output_dir>`: `trials.json` (every trial: settings, validation loss, seconds, state, failure
reason; trial 0 runs the preset's own settings, the baseline the others are measured against),
`importance.json` (Optuna's fANOVA importance of each setting), `history.png` (the optimisation
history, shown by the run report) and `best.json`, which `02_pretrain.py --settings best.json` takes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna

from utils.cli import run_main
from utils.config import load_preset
from utils.files import (
    atomic_write_json,
    read_json,
)
from utils.metrics import read_metrics
from utils.sweep import (
    INTERRUPTED,
    SweepError,
    finished_trials,
    open_study,
    parse_space,
    plot_history,
    sample_settings,
    study_tables,
)

ROOT = Path(__file__).resolve().parents[1]
POLL_SECONDS = 0.5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="model preset JSON (config/tiny.json …)")
    parser.add_argument("--data_path", required=True, help="processed data dir from stage 01")
    parser.add_argument("--output_dir", default=None, help="default: runs/sweep/<preset model_name>")
    parser.add_argument("--trials", type=int, default=20, help="trials in the study (finished, pruned or failed)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--time_budget", default=None, help="each trial's --time_budget (45s, 2m, 1.5h)")
    budget.add_argument("--max_steps", type=int, default=None, help="each trial's --max_steps instead")
    parser.add_argument("--space", default=None,
                        help="JSON search space replacing the default one: {setting: {type: float|int|categorical, "
                             "low, high, log, choices}}; settings are 02_pretrain flag names")
    parser.add_argument("--eval_steps", type=int, default=25,
                        help="trials validate every N steps, the values the pruner compares")
    parser.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    parser.add_argument("--trial_args", default="",
                        help="extra 02_pretrain flags for every trial, e.g. '--eval_batches 4'")
    args = parser.parse_args()
    if args.trials < 1:
        parser.error("--trials must be >= 1")
    if args.time_budget is None and args.max_steps is None:
        args.time_budget = "2m"
    return args


def trial_command(args: argparse.Namespace, settings: dict[str, Any], trial_dir: Path) -> list[str]:
    settings_file = trial_dir / "settings.json"
    atomic_write_json(settings_file, settings)
    budget = ["--time_budget", args.time_budget] if args.time_budget else ["--max_steps", str(args.max_steps)]
    return [sys.executable, str(ROOT / "scripts" / "02_pretrain.py"), "--config", args.config, "--data_path",
            args.data_path, "--output_dir", str(trial_dir / "run"), "--overwrite_output_dir", "--settings",
            str(settings_file), *budget, "--eval_steps", str(args.eval_steps), "--save_steps", "0",
            "--logging_steps", str(args.eval_steps), *args.trial_args.split()]


def run_trial(trial, args: argparse.Namespace, space: dict[str, Any], output_dir: Path) -> float:
    """One 02_pretrain run; reports each validation loss to the pruner and stops the run when it prunes."""
    settings = sample_settings(trial, space)
    trial_dir = output_dir / "trials" / f"{trial.number:03d}"
    trial_dir.mkdir(parents=True, exist_ok=True)
    trial.set_user_attr("pid", os.getpid())
    log = open(trial_dir / "log.txt", "w", encoding="utf-8")
    started = time.time()
    process = subprocess.Popen(trial_command(args, settings, trial_dir), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    reported: set[int] = set()
    try:
        while True:
            finished = process.poll() is not None
            for row in read_metrics(trial_dir / "run" / "metrics.jsonl"):
                if row.get("event") == "eval" and row["step"] not in reported:
                    reported.add(row["step"])
                    trial.report(row["val_loss"], row["step"])
                    if trial.should_prune():
                        process.kill()
                        trial.set_user_attr("seconds", round(time.time() - started, 1))
                        raise optuna.TrialPruned(f"pruned at step {row['step']} (val loss {row['val_loss']:.4f})")
            if finished:
                break
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        # The sweep is stopping (Ctrl-C, kill): this trial did not fail, so it runs again on resume. (A sweep
        # killed outright leaves it running; open_study finds it by its dead pid.)
        trial.set_user_attr("failure", INTERRUPTED)
        trial.study.enqueue_trial(trial.params)
        raise
    finally:
        if process.poll() is None:  # the sweep itself is stopping: take its running trial with it
            process.kill()
        process.wait()
        log.close()
    trial.set_user_attr("seconds", round(time.time() - started, 1))
    if process.returncode != 0:
        lines = (trial_dir / "log.txt").read_text(encoding="utf-8", errors="replace").strip().splitlines()
        reason = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "")
        trial.set_user_attr("failure", f"exit {process.returncode}: {reason[:300]}")
        raise SweepError(f"trial {trial.number} failed (exit {process.returncode}): {reason[:300]}")
    evals = [row for row in read_metrics(trial_dir / "run" / "metrics.jsonl") if row.get("event") == "eval"]
    if not evals:
        raise SweepError(f"trial {trial.number} logged no validation loss")
    return evals[-1]["val_loss"]


def write_outputs(study, output_dir: Path, space: dict[str, Any]) -> dict[str, Any] | None:
    trials, importance, best = study_tables(study)
    atomic_write_json(output_dir / "trials.json", {"study": study.study_name, "space": space, "trials": trials})
    atomic_write_json(output_dir / "importance.json", importance)
    plot_history(trials, output_dir / "history.png")
    if best is not None:
        atomic_write_json(output_dir / "best.json", best["settings"])
    return best


def print_table(study) -> None:
    trials, importance, best = study_tables(study)
    names = sorted({name for trial in trials for name in trial["settings"]})
    print("\n| trial | state | val loss | seconds | " + " | ".join(names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    for trial in trials:
        loss = f"{trial['val_loss']:.4f}" if trial["val_loss"] is not None else "-"
        values = [trial["settings"].get(name, "") for name in names]
        shown = " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values)
        print(f"| {trial['number']} | {trial['state'].lower()} | {loss} | {trial['seconds'] or '-'} | {shown} |")
        if trial.get("failure"):
            print(f"|   | failure: {trial['failure']} |")
    if importance:
        print("importance: " + ", ".join(f"{name} {value:.2f}" for name, value in importance.items()))
    if best is not None:
        print(f"best: trial {best['number']}, val loss {best['val_loss']:.4f}: {json.dumps(best['settings'])}")


def main() -> int:
    args = parse_args()
    # `kill <pid>` stops the sweep as Ctrl-C does, so the running trial is stopped too and queued again.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    preset = load_preset(args.config)
    output_dir = Path(args.output_dir or f"runs/sweep/{preset.model_name}")
    space = parse_space(read_json(args.space, "--space") if args.space else None, preset)
    output_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(output_dir, preset, space, args)
    remaining = args.trials - finished_trials(study)
    print(f"sweep {study.study_name}: {finished_trials(study)} trials finished, {max(0, remaining)} to run, "
          f"storage {output_dir / 'study.db'}")

    def stop_when_done(study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
        if finished_trials(study) >= args.trials:  # another process may be running trials of this study too
            study.stop()

    if remaining > 0:
        study.optimize(lambda trial: run_trial(trial, args, space, output_dir), n_trials=remaining,
                       catch=(SweepError,), callbacks=[stop_when_done], show_progress_bar=sys.stderr.isatty())
    write_outputs(study, output_dir, space)
    print_table(study)
    print(f"\nwrote {output_dir / 'trials.json'}, importance.json, history.png"
          + (", best.json (02_pretrain.py --settings)" if (output_dir / "best.json").is_file() else ""))
    return 0


if __name__ == "__main__":
    run_main(main)
