"""The pretraining sweep's parts: its search space, the Optuna study in SQLite, and the tables it reports."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.trial import TrialState

from utils.config import ModelPreset

STUDY_VERSION = 1
INTERRUPTED = "interrupted (its sweep process ended); queued again with the same settings"
KINDS = ("float", "int", "categorical")
# Settings 02_pretrain takes that a search may vary (its flag names).
SEARCHABLE = ("learning_rate", "muon_learning_rate", "warmup_steps", "weight_decay", "gradient_accumulation_steps",
              "batch_size", "lr_scheduler", "optimizer", "decay_fraction", "min_lr_ratio", "muon_momentum",
              "adam_beta2", "max_grad_norm")


class SweepError(ValueError):
    pass


def default_space(preset: ModelPreset) -> dict[str, dict[str, Any]]:
    """Around the preset's own settings: learning rates over a decade each way, warm-up, decay, schedule."""
    training = preset.training
    space: dict[str, dict[str, Any]] = {
        "learning_rate": {"type": "float", "low": training.learning_rate / 10, "high": training.learning_rate * 10,
                          "log": True},
        "warmup_steps": {"type": "int", "low": 0, "high": max(10, 2 * training.warmup_steps)},
        "weight_decay": {"type": "float", "low": 0.0, "high": 0.2},
        "lr_scheduler": {"type": "categorical", "choices": ["cosine", "wsd"]},
    }
    if training.optimizer == "muon":
        space["muon_learning_rate"] = {"type": "float", "low": training.muon_learning_rate / 4,
                                       "high": training.muon_learning_rate * 4, "log": True}
    return space


def parse_space(given: Any, preset: ModelPreset) -> dict[str, dict[str, Any]]:
    """The search space (a --space JSON, or the default), checked once; errors name the setting."""
    if given is None:
        return default_space(preset)
    if not isinstance(given, dict) or not given:
        raise SweepError("--space: expected a non-empty JSON object {setting: {type, low, high | choices}}")
    for name, spec in given.items():
        where = f"--space: {name!r}"
        if name not in SEARCHABLE:
            raise SweepError(f"{where} is not a setting the sweep can vary; choose from {', '.join(SEARCHABLE)}")
        if not isinstance(spec, dict) or spec.get("type") not in KINDS:
            raise SweepError(f"{where} needs a 'type' of {', '.join(KINDS)}")
        if spec["type"] == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                raise SweepError(f"{where} (categorical) needs a non-empty 'choices' list")
            continue
        low, high = spec.get("low"), spec.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
            raise SweepError(f"{where} ({spec['type']}) needs numbers 'low' <= 'high', got {low!r} and {high!r}")
        if spec.get("log") and low <= 0:
            raise SweepError(f"{where}: a log scale needs 'low' > 0, got {low}")
    return given


def sample_settings(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    settings = {}
    for name, spec in space.items():
        if spec["type"] == "categorical":
            settings[name] = trial.suggest_categorical(name, spec["choices"])
        elif spec["type"] == "int":
            settings[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
        else:
            settings[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                                 log=bool(spec.get("log")))
    return settings


def _identity(preset_name: str, space: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    return {"version": STUDY_VERSION, "preset": preset_name, "space": space, "data_path": str(args.data_path),
            "budget": args.time_budget or f"{args.max_steps} steps"}


def preset_settings(preset: ModelPreset, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The preset's own values of the searched settings that lie inside the space: the study's first trial,
    so that every sweep measures its best against the preset at the same budget."""
    values = {}
    for name, spec in space.items():
        value = getattr(preset.training, name, None)
        inside = (value in spec["choices"]) if spec["type"] == "categorical" else (
            value is not None and spec["low"] <= value <= spec["high"])
        if inside:
            values[name] = value
    return values


def open_study(output_dir: Path, preset: ModelPreset, space: dict[str, Any], args: argparse.Namespace) -> optuna.Study:
    """Creates the study (its first trial: the preset's settings), or resumes it when the storage holds this
    same study (same version, preset, space, data and budget); anything else is refused without touching
    the file. Trials left running by a sweep process that is gone are marked failed and queued again."""
    preset_name = preset.model_name
    storage = f"sqlite:///{(output_dir / 'study.db').resolve()}"
    identity = _identity(preset_name, space, args)
    name = f"pretrain-{preset_name}"
    existing = ([s.study_name for s in optuna.get_all_study_summaries(storage)]
                if (output_dir / "study.db").exists() else [])
    if existing and name not in existing:
        raise SweepError(f"{output_dir / 'study.db'} holds another study ({', '.join(existing)}), not {name}; "
                         "choose another --output_dir")
    # TPE needs a few observations before its model means anything; until then it samples at random.
    sampler = optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=max(2, min(10, args.trials // 3)))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    saved = study.user_attrs.get("identity")
    if saved is None:
        study.set_user_attr("identity", identity)
        study.enqueue_trial(preset_settings(preset, space))
    elif saved != identity:
        changed = [key for key in identity if saved.get(key) != identity[key]]
        raise SweepError(f"{output_dir / 'study.db'} was written by a different sweep (its {', '.join(changed)} "
                         "differ); rerun with the same settings to resume it, or choose another --output_dir")
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if pid is None or not psutil.pid_exists(pid):
            study._storage.set_trial_user_attr(trial._trial_id, "failure", INTERRUPTED)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            study.enqueue_trial(trial.params, skip_if_exists=False)
            print(f"note: trial {trial.number} was interrupted; it runs again with the same settings")
    return study


def finished_trials(study: optuna.Study) -> int:
    """Trials that count towards --trials: complete, pruned or failed, but not those cut off by an interruption."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(t.user_attrs.get("failure") != INTERRUPTED for t in study.get_trials(deepcopy=False, states=states))


def study_tables(study: optuna.Study) -> tuple[list[dict[str, Any]], dict[str, float], dict[str, Any] | None]:
    """(every trial as a row, each setting's importance, the best trial or None)."""
    trials = [{
        "number": t.number, "state": t.state.name, "val_loss": t.value, "settings": t.params,
        "seconds": t.user_attrs.get("seconds"), "failure": t.user_attrs.get("failure"),
        "intermediate": {str(step): value for step, value in sorted(t.intermediate_values.items())},
    } for t in study.get_trials(deepcopy=False)]
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    importance: dict[str, float] = {}
    if len(complete) >= 2 and any(len({str(t.params.get(k)) for t in complete}) > 1 for k in complete[0].params):
        importance = {k: round(v, 4) for k, v in optuna.importance.get_param_importances(study).items()}
    best = None
    if complete:
        trial = study.best_trial
        best = {"number": trial.number, "val_loss": trial.value, "settings": trial.params}
    return trials, importance, best


def plot_history(trials: list[dict[str, Any]], path: Path) -> Path | None:
    """Each finished trial's validation loss in order, and the best so far (Optuna's optimisation history)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [(t["number"], t["val_loss"]) for t in trials if t["state"] == "COMPLETE" and t["val_loss"] is not None]
    if not done:
        return None
    best, running = [], float("inf")
    for _, loss in done:
        running = min(running, loss)
        best.append(running)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([n for n, _ in done], [loss for _, loss in done], "o", label="trial")
    axis.plot([n for n, _ in done], best, "-", drawstyle="steps-post", label="best so far")
    axis.set_xlabel("trial")
    axis.set_ylabel("validation loss")
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)
    return path
