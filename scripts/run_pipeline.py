#!/usr/bin/env python
"""The whole chain in one command: prepare → pretrain → sft → dpo, each evaluated and gated, then the report.

Each step runs its stage script as a subprocess. A step's stamp is the hash of its command, the stamp of the
step before it and the content of its local input files; a re-run skips every step whose stamp is unchanged
and whose output is complete, and an interrupted pretraining resumes from its latest checkpoint. A failing
step (or a failing promotion gate, unless --force) stops the chain with the command to resume.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from utils.cli import run_main
from utils.files import atomic_write_json, read_json, sha256_file
from utils.layout import CHECKPOINTS_DIR, LATEST, STAGES, stage_dir

ROOT = Path(__file__).resolve().parents[1]

# Beside the checkpoints it describes: deleting checkpoints/ forgets the finished steps too.
STATE_FILE = CHECKPOINTS_DIR / "pipeline_state.json"


@dataclass
class Profile:
    """Budgets of one kind of run; everything else comes from the presets and the stage defaults."""

    preset: str
    pretrain: list[str]
    sft: list[str]
    dpo: list[str]
    evaluate: list[str] = field(default_factory=list)
    prepare: list[str] = field(default_factory=list)
    # Pretrain with --compile when training on a CPU that has the C++ compiler inductor needs (compile_flags).
    compile_on_cpu: bool = False


PROFILES = {
    # One 2-core CPU, ~20 minutes in all: the tiny preset's recipe, pretrained for a time budget at CPU-sized
    # batches. bench/bench_quality.py measures it at these batch flags (its CPU_BATCH: change them together)
    # and takes these rates and warm-up for its "defaults" recipe. At most 2 passes over the built-in corpus
    # (548k tokens): a host that fits 3.7 in the budget scored 3.464 WikiText-2 bits per byte, 2 scored 3.318.
    "cpu-tiny": Profile(
        preset="tiny",
        pretrain=["--time_budget", "13m", "--max_epochs", "2", "--batch_size", "8", "--gradient_accumulation_steps",
                  "1", "--sequence_length", "256", "--learning_rate", "1.2e-2", "--min_lr_ratio", "0",
                  "--warmup_steps", "10",
                  "--eval_steps", "200", "--save_steps", "200", "--logging_steps", "50"],
        sft=["--max_steps", "100", "--batch_size", "8", "--gradient_accumulation_steps", "1",
             "--max_eval_samples", "64"],
        # A LoRA adapter this small moves too little at DPO's usual 5e-7; DPO plus the chosen replies' NLL (RPO)
        # at 2e-4 ranks 0.98 of 128 held-out built-in pairs right after these 60 steps; at 5e-4 the model drifts
        # further from the SFT one on text DPO never saw (WikiText-2 3.445 bits per byte against 3.411), and a
        # higher beta leaves a stray word-piece after its sentences (docs/04_dpo.md).
        dpo=["--max_steps", "60", "--batch_size", "4", "--gradient_accumulation_steps", "1",
             "--max_eval_samples", "32", "--learning_rate", "2e-4", "--loss_type", "sigmoid,sft"],
        # Compiled, the bf16 step runs ~1.2x faster (eager 4,300 against 5,300 tok/s in the bench's runs) for
        # ~15 s of compilation; in fp32, 1.04x.
        compile_on_cpu=True,
    ),
    # One 24 GB GPU: the preset's own training defaults and the stages' full defaults.
    "full": Profile(preset="small", pretrain=[], sft=[], dpo=[]),
    # Functional check of the chain in a few minutes: micro model, micro budgets, a slice of the corpus.
    "micro": Profile(
        preset="micro",
        prepare=["--vocab_size", "512", "--max_documents", "120"],
        pretrain=["--max_steps", "30", "--batch_size", "4", "--sequence_length", "64", "--eval_steps", "15",
                  "--save_steps", "15", "--logging_steps", "5", "--warmup_steps", "3"],
        sft=["--max_steps", "8", "--batch_size", "4", "--max_samples", "64", "--max_eval_samples", "8"],
        dpo=["--max_steps", "4", "--batch_size", "2", "--max_samples", "16", "--max_eval_samples", "4",
             "--learning_rate", "5e-3", "--loss_type", "sigmoid,sft"],
        evaluate=["--tasks", "val,generate", "--max_new_tokens", "16"],
    ),
}


@dataclass
class Step:
    name: str
    command: list[str]
    output: Path
    local_inputs: list[str] = field(default_factory=list)
    resumable: bool = False
    is_gate: bool = False


def input_fingerprint(specs: list[str]) -> list[str]:
    """Content hashes of the local input files (hub ids and built-in names hash as themselves)."""
    prints = []
    for spec in specs:
        path = Path(spec)
        if path.is_file():
            prints.append(sha256_file(path))
        elif path.is_dir():
            prints.extend(sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file())
        else:
            prints.append(spec)
    return prints


def stamp(step: Step, previous: str) -> str:
    payload = json.dumps([step.command, previous, input_fingerprint(step.local_inputs)])
    return hashlib.sha256(payload.encode()).hexdigest()


def complete(step: Step) -> bool:
    """A step's output is complete when its stage finished writing (summary or latest pointer present)."""
    if step.is_gate:
        return True
    for marker in ("summary.json", LATEST, "results.json", "report.md", "meta.json"):
        if (step.output / marker).is_file():
            return True
    return False


def pretrain_budget(flags: list[str], time_budget: str | None) -> list[str]:
    """The profile's pretraining flags, with its budget replaced by `--time_budget` when one is given."""
    if not time_budget:
        return flags
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in ("--time_budget", "--max_steps", "--max_tokens", "--num_epochs"):
            skip = True
        else:
            kept.append(flag)
    return [*kept, "--time_budget", time_budget]


def compile_flags(profile: Profile) -> list[str]:
    """`--compile` for a profile that compiles on a CPU, when this machine trains on its CPU (no CUDA or MPS device:
    compilation is measured there only) and inductor finds a C++ compiler."""
    if not profile.compile_on_cpu:
        return []
    import torch  # here, not at the top: the other profiles start without torch and transformers

    from utils.model import cxx_compiler_available

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return []
    if not cxx_compiler_available():
        print("note: pretraining without --compile: torch.compile needs a C++ compiler (g++, or $CXX) and none "
              "was found; in bf16 the compiled step runs ~1.2x faster", flush=True)
        return []
    return ["--compile"]


def build_steps(args: argparse.Namespace, profile: Profile) -> list[Step]:
    work = Path(args.work_dir)
    model = args.model or profile.preset
    python = [sys.executable]
    data = work / "data" / "processed" / f"{Path(args.raw_dataset.replace('builtin:', '')).name.split('.')[0]}-{model}"
    ckpt = {stage: work / stage_dir(stage, model) for stage in STAGES}
    evals = {stage: work / "evaluation_results" / f"{stage}-{model}" for stage in ckpt}
    steps = [
        Step("prepare", python + ["scripts/01_prepare_data.py", "--input_path", args.raw_dataset, "--output_dir",
                                  str(data), "--config", f"config/{model}.json", "--overwrite", *profile.prepare],
             data, [args.raw_dataset]),
        Step("pretrain", python + ["scripts/02_pretrain.py", "--config", f"config/{model}.json", "--data_path",
                                   str(data), "--output_dir", str(ckpt["pretrain"]),
                                   *pretrain_budget(profile.pretrain, args.time_budget), *compile_flags(profile)],
             ckpt["pretrain"], resumable=True),
        # --merge: every fine-tuning stage also leaves a standalone model (merged/) that other tools take as it is.
        Step("sft", python + ["scripts/03_sft.py", "--model_path", str(ckpt["pretrain"]), "--dataset_path",
                              args.sft_dataset, "--output_dir", str(ckpt["sft"]), "--merge", *profile.sft],
             ckpt["sft"], [args.sft_dataset]),
        Step("dpo", python + ["scripts/04_dpo.py", "--model_path", str(ckpt["sft"]), "--dataset_path",
                              args.dpo_dataset, "--output_dir", str(ckpt["dpo"]), "--merge", *profile.dpo],
             ckpt["dpo"], [args.dpo_dataset]),
    ]
    evaluated: list[Step] = []
    previous_results = None
    for step in steps:
        evaluated.append(step)
        if step.name == "prepare":
            continue
        results = evals[step.name] / "results.json"
        evaluate = python + ["scripts/05_evaluate.py", "--model_path", str(step.output), "--output_dir",
                             str(evals[step.name]), "--data_path", str(data), *args.eval_args, *profile.evaluate]
        evaluated.append(Step(f"evaluate-{step.name}", evaluate, evals[step.name]))
        gate = python + ["scripts/05_evaluate.py", "--gates", step.name, "--from_results", str(results)]
        if previous_results:
            gate += ["--baseline", str(previous_results)]
        evaluated.append(Step(f"gates-{step.name}", gate, evals[step.name], is_gate=True))
        previous_results = results
    evaluated.append(Step("report", python + ["scripts/07_report.py", "--output_dir", str(work / "reports"),
                                              "--root", str(work)], work / "reports"))
    return evaluated


def run_step(step: Step, state: dict, digest: str, resume: bool) -> float:
    command = step.command + (["--resume_from_checkpoint", "latest"] if resume else [])
    if step.resumable and not resume and step.output.exists():
        command.append("--overwrite_output_dir")
    print(f"\n=== {step.name}: {shlex.join(command)}", flush=True)
    state[step.name] = {"stamp": digest, "status": "started"}
    started = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = subprocess.run(command, cwd=ROOT, env=env).returncode
    seconds = round(time.time() - started, 1)
    state[step.name].update(status="done" if code == 0 else f"failed ({code})", seconds=seconds)
    if code:
        raise StepFailed(step, code)
    return seconds


class StepFailed(Exception):
    def __init__(self, step: Step, code: int):
        super().__init__(step.name)
        self.step, self.code = step, code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu-tiny")
    parser.add_argument("--model", default=None, help="preset name (default: the profile's)")
    parser.add_argument("--raw_dataset", default="builtin:python-docs")
    parser.add_argument("--sft_dataset", default="builtin:python-docs-sft")
    parser.add_argument("--dpo_dataset", default="builtin:python-docs-dpo")
    parser.add_argument("--work_dir", default=".", help="root for data/, checkpoints/, evaluation_results/, reports/")
    parser.add_argument("--eval_args", default="", help="extra flags for 05_evaluate.py, e.g. '--wikitext_path …'")
    parser.add_argument("--time_budget", default=None,
                        help="pretraining wall-clock budget (45s, 10m, 1.5h), replacing the profile's (make TIME=…)")
    parser.add_argument("--force", action="store_true", help="carry on past failed promotion gates")
    parser.add_argument("--rerun", action="store_true", help="run every step even if its outputs are up to date")
    args = parser.parse_args()
    args.eval_args = shlex.split(args.eval_args)
    profile = PROFILES[args.profile]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / STATE_FILE
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state = read_json(state_path, "pipeline state") if state_path.is_file() else {}
    previous, timings, started = "", {}, time.time()
    for step in build_steps(args, profile):
        digest = stamp(step, previous)
        previous = digest
        recorded = state.get(step.name, {})
        # Once a step has run, its outputs are new: every later step runs on them too.
        up_to_date = not timings and recorded.get("stamp") == digest and recorded.get("status") == "done"
        if not args.rerun and up_to_date and complete(step):
            print(f"=== {step.name}: up to date, skipped")
            continue
        resume = step.resumable and recorded.get("stamp") == digest and (step.output / LATEST).is_file()
        try:
            timings[step.name] = run_step(step, state, digest, resume)
        except StepFailed as failed:
            atomic_write_json(state_path, state)
            if failed.step.is_gate and args.force:
                print(f"=== {step.name}: gate failed, continuing because --force (FORCE=1)")
                state[step.name]["status"] = "done"
                atomic_write_json(state_path, state)
                continue
            hint = "make pipeline FORCE=1 to carry on past the gate" if failed.step.is_gate else (
                "fix the cause and run `make pipeline` again: finished steps are skipped"
                + (", pretraining resumes from its latest checkpoint" if failed.step.resumable else ""))
            print(f"\npipeline stopped: step '{failed.step.name}' failed (exit {failed.code}). {hint}.",
                  file=sys.stderr)
            return failed.code
        atomic_write_json(state_path, state)
    total = round(time.time() - started, 1)
    summary = {"profile": args.profile, "seconds": total, "steps": timings}
    atomic_write_json(work / "reports" / "pipeline_summary.json", summary)
    print(f"\npipeline finished in {total:.0f} s; step times: {json.dumps(timings)}")
    final = work / stage_dir("dpo", args.model or profile.preset)
    print(f"chat with the result:  make serve CKPT={final}   (or: python scripts/06_serve.py --model_path {final})")
    return 0


if __name__ == "__main__":
    run_main(main)
