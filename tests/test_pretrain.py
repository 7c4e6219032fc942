"""Stage 02 end to end: real subprocess runs of scripts/02_pretrain.py on the micro preset and corpus."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from utils.checkpoint import CheckpointError, verify_checkpoint
from utils.files import write_checksums
from utils.metrics import read_metrics
from utils.tokenizer import load_tokenizer, tokenizer_sha256
from utils.tokens import META, TOKENIZER_DIR
from utils.training import BudgetProbe

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "scripts/02_pretrain.py"
# 8 steps of 4 × 64 tokens, checkpoint and evaluation at step 4, a log row every step.
RUN_A = ["--max_steps", "8", "--save_steps", "4", "--eval_steps", "4", "--eval_batches", "2", "--logging_steps", "1",
         "--batch_size", "4"]


def pretrain(*args: str, timeout: int = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def train_losses(output_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(output_dir / "metrics.jsonl") if row["event"] == "train"}


def deterministic_rows(output_dir: Path) -> list[dict]:
    timing = ("time", "tokens_per_second", "mfu", "memory_mb")
    return [{k: v for k, v in row.items() if k not in timing} for row in read_metrics(output_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, micro_config, processed_dir) -> Path:
    output_dir = tmp_path_factory.mktemp("run_a") / "out"
    result = pretrain("--config", str(micro_config), "--data_path", str(processed_dir), "--output_dir", str(output_dir),
                      *RUN_A)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_run_writes_the_checkpoint_contract_and_final_generates(run_a, processed_dir):
    assert (run_a / "latest").read_text().strip() == "final"
    for name in ("step_4", "best", "final"):
        verify_checkpoint(run_a / name)
        assert (run_a / name / "training_state" / "optimizer.pt").is_file()
    run = json.loads((run_a / "final" / "run.json").read_text())
    assert run["step"] == 8 and run["args"]["data_path"] == str(processed_dir) and run["preset"]["n_layer"] == 2
    assert run["data"]["tokenizer_sha256"] == json.loads((processed_dir / META).read_text())["tokenizer_sha256"]
    rows = read_metrics(run_a / "metrics.jsonl")
    train = [r for r in rows if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    for key in ("tokens", "loss", "perplexity", "lr", "grad_norm", "tokens_per_second", "mfu", "memory_mb"):
        assert all(r[key] is not None for r in train), key
    assert [r["step"] for r in rows if r["event"] == "eval"] == [4, 8]
    summary = json.loads((run_a / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["final_val_loss"] > 0

    model = AutoModelForCausalLM.from_pretrained(run_a / "final")
    tokenizer = load_tokenizer(run_a / "final")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    prompt = tokenizer("The list type", return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]


def test_resume_latest_continues_exactly(run_a, micro_config, processed_dir, tmp_path):
    # The output dir as a run killed after step 4 would leave it: rows logged after the checkpoint, a last row
    # torn mid-write, and step_4 caught between the two renames of a re-save (old copy aside, new one not
    # yet in place), by a process that is gone.
    output_dir = tmp_path / "stopped"
    output_dir.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    shutil.copytree(run_a / "step_4", output_dir / f".old-step_4-{pid}")
    shutil.copytree(run_a / "step_4", output_dir / f".tmp-step_4-{pid}")
    (output_dir / "latest").write_text("step_4\n")
    (output_dir / f".latest.tmp-{pid}").write_text("step_")
    shutil.copy(run_a / "metrics.jsonl", output_dir / "metrics.jsonl")
    with open(output_dir / "metrics.jsonl", "a") as log:
        log.write('{"step": 9, "event": "tra')
    result = pretrain("--config", str(micro_config), "--data_path", str(processed_dir), "--output_dir", str(output_dir),
                      "--resume_from_checkpoint", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished an interrupted swap" in result.stdout and "dropped the unfinished last line" in result.stdout
    assert "resumed from" in result.stdout
    assert not [p.name for p in output_dir.iterdir() if p.name.startswith(".")]
    # Same losses, learning rates, gradient norms and validation losses, each step logged once.
    assert deterministic_rows(output_dir) == deterministic_rows(run_a)
    assert (output_dir / "latest").read_text().strip() == "final"


def run_a_on_two_processes(micro_config: Path, processed_dir: Path, output_dir: Path, *flags: str) -> None:
    """RUN_A at the same global batch as DDP over two processes (2 rows each)."""
    # accelerate 1.15 starts a single process for `launch --cpu --num_processes 2` (CPU multi-process needs
    # mpirun); `--multi_gpu` starts two through torchrun, and the script runs DDP over gloo without a GPU.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    args = [a if a != "4" or i != RUN_A.index("--batch_size") + 1 else "2" for i, a in enumerate(RUN_A)]
    result = subprocess.run(
        [*launcher, SCRIPT, "--config", str(micro_config), "--data_path", str(processed_dir),
         "--output_dir", str(output_dir), *args, *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((output_dir / "summary.json").read_text())["processes"] == 2


def test_two_process_ddp_matches_one_process_at_equal_global_batch(run_a, micro_config, processed_dir, tmp_path):
    run_a_on_two_processes(micro_config, processed_dir, tmp_path / "ddp")
    single, ddp = train_losses(run_a), train_losses(tmp_path / "ddp")
    assert sorted(ddp) == sorted(single)
    for step in single:
        assert ddp[step] == pytest.approx(single[step], rel=1e-4), step


def test_sigterm_writes_a_complete_emergency_checkpoint(micro_config, processed_dir, tmp_path):
    output_dir = tmp_path / "interrupted"
    command = [sys.executable, SCRIPT, "--config", str(micro_config), "--data_path", str(processed_dir),
               "--output_dir", str(output_dir), "--max_steps", "100000", "--logging_steps", "1", "--eval_steps", "0",
               "--save_steps", "0"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while len(train_losses(output_dir)) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "--resume_from_checkpoint latest" in stderr
    saved = (output_dir / "latest").read_text().strip()
    verify_checkpoint(output_dir / saved)
    step = int(saved.removeprefix("step_"))
    assert step >= 2 and max(train_losses(output_dir)) == step
    state = torch.load(output_dir / saved / "training_state" / "state.pt", weights_only=True)
    assert state["step"] == step and state["cursor"] == 4 * step


def test_non_finite_losses_skip_updates_then_stop_with_the_last_good_state(micro_config, processed_dir, tmp_path):
    # A learning rate of 1e38 makes step 1's update push the weights to ~1e38; every later forward overflows.
    output_dir = tmp_path / "diverged"
    result = pretrain("--config", str(micro_config), "--data_path", str(processed_dir), "--output_dir", str(output_dir),
                      "--max_steps", "50", "--learning_rate", "1e38", "--warmup_steps", "0", "--lr_scheduler",
                      "constant", "--max_bad_steps", "3", "--logging_steps", "1", "--eval_steps", "0")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "non-finite" in result.stderr and "--max_bad_steps 3" in result.stderr
    rows = read_metrics(output_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if r["event"] == "skipped"] == [2, 3, 4]
    assert (output_dir / "latest").read_text().strip() == "step_4"
    state = torch.load(output_dir / "step_4" / "training_state" / "state.pt", weights_only=True)
    assert state["bad_steps"] == 3 and state["tokens"] == 4 * 64  # only step 1's tokens were trained on


def test_corrupted_or_partial_checkpoints_are_named(run_a, micro_config, processed_dir, tmp_path):
    partial = tmp_path / "partial" / "step_4"
    shutil.copytree(run_a / "step_4", partial)
    (partial / "training_state" / "optimizer.pt").unlink()
    result = pretrain("--config", str(micro_config), "--data_path", str(processed_dir),
                      "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", str(partial))
    assert result.returncode == 2
    assert "training_state/optimizer.pt is missing" in result.stderr and str(partial) in result.stderr

    corrupted = tmp_path / "corrupted" / "step_4"
    shutil.copytree(run_a / "step_4", corrupted)
    with open(corrupted / "model.safetensors", "r+b") as handle:
        handle.seek(-8, os.SEEK_END)
        handle.write(b"\x00" * 8)
    with pytest.raises(CheckpointError, match="model.safetensors does not match its sha256"):
        verify_checkpoint(corrupted)


def test_resuming_with_another_tokenizer_is_a_clear_error(run_a, micro_config, processed_dir, tmp_path):
    # The same data with one more token in its tokenizer: ids would no longer mean what the model learned.
    other = tmp_path / "other_data"
    shutil.copytree(processed_dir, other)
    tokenizer = load_tokenizer(other / TOKENIZER_DIR)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other / TOKENIZER_DIR)
    meta = json.loads((other / META).read_text())
    meta.update(vocab_size=len(tokenizer), tokenizer_sha256=tokenizer_sha256(other / TOKENIZER_DIR))
    (other / META).write_text(json.dumps(meta))
    result = pretrain("--config", str(micro_config), "--data_path", str(other), "--output_dir", str(tmp_path / "out"),
                      "--resume_from_checkpoint", str(run_a / "step_4"))
    assert result.returncode == 2
    assert "tokenizer mismatch" in result.stderr and f"{len(tokenizer)} tokens" in result.stderr


def test_dry_run_reports_sizes_and_estimates_and_writes_nothing(micro_config, processed_dir, tmp_path, run_stage):
    output_dir = tmp_path / "never"
    preset = json.loads(micro_config.read_text())
    other_vocab = tmp_path / "micro_32k.json"
    other_vocab.write_text(json.dumps({**preset, "vocab_size": 32768}))
    code, stdout, stderr = run_stage("02_pretrain.py", [
        "--config", str(other_vocab), "--data_path", str(processed_dir), "--output_dir", str(output_dir),
        "--dry_run", "--max_tokens", "100000", "--seq_len_schedule", "32:0.5,64:1.0"])
    assert code == 0, stderr[-3000:]
    assert f"sets vocab_size 32,768; the model takes the {preset['vocab_size']:,} tokens" in stdout
    assert "without embeddings" in stdout and "256 tokens/step" in stdout
    assert "391 steps" in stdout  # ceil(100000 / 256)
    assert "s/step" in stdout and "estimate" in stdout
    assert not output_dir.exists()


def test_time_budget_fixes_the_steps_ends_in_time_and_trains_as_that_many_steps_would(micro_config, processed_dir,
                                                                                       tmp_path, run_stage):
    budget = 14
    common = ["--config", str(micro_config), "--data_path", str(processed_dir), "--eval_steps", "10",
              "--save_steps", "10", "--logging_steps", "5", "--eval_batches", "2", "--batch_size", "4",
              "--save_total_limit", "0"]
    started = time.time()
    result = pretrain(*common, "--output_dir", str(tmp_path / "budget"), "--time_budget", f"{budget}s")
    elapsed = time.time() - started
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "budget" / "final" / "run.json").read_text())
    decision = run["time_budget"]
    steps = decision["steps"]
    assert f"budget {budget}s → {steps:,} steps of 256 tokens" in result.stdout and "ends ≈" in result.stdout
    assert run["args"]["max_steps"] == steps == run["step"] and steps > 10
    assert elapsed < budget + 3, f"{elapsed:.1f} s for a {budget} s budget"
    # The timing steps were undone: the run is exactly the one --max_steps <decided> trains. (The runs below
    # measure no budget, so they run in-process: the budget counts from the process start.)
    code, _, stderr = run_stage("02_pretrain.py", [*common, "--output_dir", str(tmp_path / "fixed"),
                                                   "--max_steps", str(steps)])
    assert code == 0, stderr[-3000:]
    assert deterministic_rows(tmp_path / "budget") == deterministic_rows(tmp_path / "fixed")
    # Stopped after step 10 and resumed with the same budget: the step count fixed at the start is kept.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(tmp_path / "budget" / "step_10", stopped / "step_10")
    (stopped / "latest").write_text("step_10\n")
    shutil.copy(tmp_path / "budget" / "metrics.jsonl", stopped / "metrics.jsonl")
    code, stdout, stderr = run_stage("02_pretrain.py", [*common, "--output_dir", str(stopped), "--time_budget",
                                                        f"{budget}s", "--resume_from_checkpoint", "latest"])
    assert code == 0, stderr[-3000:]
    assert f"budget {budget}s →" not in stdout
    assert deterministic_rows(stopped) == deterministic_rows(tmp_path / "budget")
    code, _, stderr = run_stage("02_pretrain.py", [*common, "--output_dir", str(stopped), "--time_budget", "30s",
                                                   "--resume_from_checkpoint", str(stopped / "step_10")])
    assert code == 2 and "fixed its step count at the start" in stderr


def test_a_time_budget_is_fitted_again_from_the_runs_own_speed(micro_config, processed_dir, tmp_path, run_stage,
                                                               monkeypatch):
    # The probe times the run's first steps, which can be slower than the rest (bf16 on a CPU: by 12-16 % over
    # ~150 steps), and a run sized by them alone ends early. Here the probe sees steps 3× slower than they are;
    # the run must fit its count again from its own speed, use its budget, and still train exactly as a
    # `--max_steps <final count>` run would. (In-process, the budget counts from the test's start.)
    import utils.pretrain_run as pretrain_run

    budget = 12
    started = time.time()
    monkeypatch.setattr(pretrain_run, "seconds_since_start", lambda: time.time() - started)
    measure = pretrain_run.probe_budget

    def slow_start_probe(run, *args: object) -> BudgetProbe:
        probe = measure(run, *args)
        # 3× slower, at a speed whose rounding to 0.1 (run.json) then to 1 disagrees with rounding it to 1: an odd
        # N plus 0.46 tok/s (N.5 rounds half to even, up to N + 1).
        speed = int(run.plan.tokens_per_step / (6 * probe.step)) * 2 + 1.46
        return dataclasses.replace(probe, step=run.plan.tokens_per_step / speed)

    monkeypatch.setattr(pretrain_run, "probe_budget", slow_start_probe)
    common = ["--config", str(micro_config), "--data_path", str(processed_dir), "--lr_scheduler", "wsd",
              "--eval_steps", "50", "--save_steps", "50", "--logging_steps", "5", "--eval_batches", "2",
              "--batch_size", "4", "--save_total_limit", "0"]
    code, stdout, stderr = run_stage("02_pretrain.py", [*common, "--output_dir", str(tmp_path / "budget"),
                                                        "--time_budget", f"{budget}s"])
    elapsed = time.time() - started
    assert code == 0, stderr[-3000:]
    run = json.loads((tmp_path / "budget" / "final" / "run.json").read_text())
    decision = run["time_budget"]
    assert 0.7 * budget < elapsed < budget + 2, f"{elapsed:.1f} s for a {budget} s budget"
    first, last = decision["refits"][0], decision["refits"][-1]
    assert f"re-fitted at step {first['at_step']:,}" in stdout
    probe_speed = stdout.split(" tok/s")[0].rsplit(" at ", 1)[1]  # "budget 12s → N steps of T tokens at S tok/s"
    assert f"the probe timed {probe_speed})" in stdout  # one figure, not re-rounded from run.json's
    assert decision["steps"] > 1.5 * first["steps_before"] and run["step"] == decision["steps"]
    monkeypatch.undo()
    code, _, stderr = run_stage("02_pretrain.py", [*common, "--output_dir", str(tmp_path / "fixed"),
                                                   "--max_steps", str(decision["steps"])])
    assert code == 0, stderr[-3000:]
    assert deterministic_rows(tmp_path / "budget") == deterministic_rows(tmp_path / "fixed")
    # A checkpoint written after the last re-fit holds the final count, and resumes exactly.
    after = next(step for step in range(50, decision["steps"], 50) if step > last["at_step"])
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(tmp_path / "budget" / f"step_{after}", stopped / f"step_{after}")
    (stopped / "latest").write_text(f"step_{after}\n")
    shutil.copy(tmp_path / "budget" / "metrics.jsonl", stopped / "metrics.jsonl")
    code, stdout, stderr = run_stage("02_pretrain.py", [*common, "--output_dir", str(stopped), "--time_budget",
                                                        f"{budget}s", "--resume_from_checkpoint", "latest"])
    assert code == 0, stderr[-3000:]
    assert "re-fitted" not in stdout
    assert deterministic_rows(stopped) == deterministic_rows(tmp_path / "budget")


def test_a_slow_spell_before_the_first_refit_does_not_end_the_run_early(micro_config, processed_dir, tmp_path,
                                                                        run_stage, monkeypatch):
    # The CPU's speed drifts for minutes at a time: in one ten-minute bench run every step until the first re-fit
    # ran slow, the re-fit sized the run by them, and training ended 111 s early. Here the steps run 3× slower until
    # the first re-fit and at full speed after it; the fit where the decay begins must use the time that frees.
    import utils.pretrain_run as pretrain_run

    budget = 12
    started = time.time()
    monkeypatch.setattr(pretrain_run, "seconds_since_start", lambda: time.time() - started)
    step = pretrain_run.take_step

    def slow_until_refitted(run, *args, **kwargs):
        begun = time.perf_counter()
        result = step(run, *args, **kwargs)
        if not (run.budget_decision or {}).get("refits"):
            time.sleep(2 * (time.perf_counter() - begun))
        return result

    monkeypatch.setattr(pretrain_run, "take_step", slow_until_refitted)
    code, stdout, stderr = run_stage("02_pretrain.py", [
        "--config", str(micro_config), "--data_path", str(processed_dir), "--lr_scheduler", "wsd", "--eval_steps",
        "0", "--save_steps", "0", "--logging_steps", "5", "--eval_batches", "2", "--batch_size", "4",
        "--output_dir", str(tmp_path / "budget"), "--time_budget", f"{budget}s"])
    elapsed = time.time() - started
    assert code == 0, stderr[-3000:]
    assert 0.8 * budget < elapsed < budget + 2, f"{elapsed:.1f} s for a {budget} s budget"
    decision = json.loads((tmp_path / "budget" / "final" / "run.json").read_text())["time_budget"]
    first, last = decision["refits"]
    assert last["at_step"] > first["at_step"] and decision["steps"] > 1.5 * last["steps_before"], decision


def test_a_resume_in_another_precision_says_it_is_not_exact(run_a, micro_config, processed_dir, tmp_path):
    # `--mixed_precision auto` resolves per machine, so a checkpoint moved to another host may resume in another
    # precision; the resume must say so, as it does for any other changed setting.
    output_dir = tmp_path / "moved"
    output_dir.mkdir()
    shutil.copytree(run_a / "step_4", output_dir / "step_4")
    (output_dir / "latest").write_text("step_4\n")
    run = json.loads((output_dir / "step_4" / "run.json").read_text())
    here = run["precision"]
    run["precision"] = "bf16" if here == "no" else "no"
    (output_dir / "step_4" / "run.json").write_text(json.dumps(run))
    write_checksums(output_dir / "step_4")
    result = pretrain("--config", str(micro_config), "--data_path", str(processed_dir), "--output_dir", str(output_dir),
                      "--resume_from_checkpoint", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"note: changed on resume, so this is not an exact continuation: precision {run['precision']} → {here}"
            in result.stdout)


def test_muon_resumes_exactly(micro_config, processed_dir, tmp_path):
    common = ["--config", str(micro_config), "--data_path", str(processed_dir), "--optimizer", "muon",
              "--lr_scheduler", "wsd", *RUN_A]
    straight = tmp_path / "straight"
    result = pretrain(*common, "--output_dir", str(straight))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "muon lr" in result.stdout
    rows = read_metrics(straight / "metrics.jsonl")
    assert all(r["muon_lr"] > r["lr"] for r in rows if r["event"] == "train")
    # Stopped after step 4 (with the rows it logged after that checkpoint), then resumed: Muon's momentum too.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(straight / "step_4", stopped / "step_4")
    (stopped / "latest").write_text("step_4\n")
    shutil.copy(straight / "metrics.jsonl", stopped / "metrics.jsonl")
    resumed = pretrain(*common, "--output_dir", str(stopped), "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert deterministic_rows(stopped) == deterministic_rows(straight)


def test_compiled_ddp_run_trains_like_the_eager_one_and_saves_a_plain_checkpoint(run_a, micro_config,
                                                                                processed_dir, tmp_path):
    """--compile (accelerate's regional compilation) under DDP on a CPU: the one-process eager run's losses up to
    the fused kernels' rounding, and weights saved under the model's own names (no compiled wrapper's prefix).
    Unwrapping the compiled DDP model for the parameter count once returned the DDP wrapper, and the run died."""
    out = tmp_path / "compiled"
    run_a_on_two_processes(micro_config, processed_dir, out, "--compile")
    compiled, eager = train_losses(out), train_losses(run_a)
    assert compiled.keys() == eager.keys()
    assert all(compiled[step] == pytest.approx(eager[step], rel=1e-4) for step in eager), (compiled, eager)
    _, loading = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--time_budget", "ten minutes"],
         "--time_budget 'ten minutes' is not a duration; use a number with s, m or h"),
        (["--time_budget", "10m", "--max_steps", "5"], "--time_budget cannot be combined with --max_steps"),
        (["--time_budget", "1s"], "--time_budget 1s is too short"),
        (["--optimizer", "muon", "--config", "config/tiny-moe.json"], "torch.optim.Muon updates 2-D matrices only"),
        (["--max_epochs", "2"], "--max_epochs caps what --time_budget buys"),
    ],
)
def test_bad_budgets_and_optimizers_are_one_line_errors(flags, message, micro_config, processed_dir, tmp_path,
                                                        run_stage):
    config = [] if "--config" in flags else ["--config", str(micro_config)]
    code, _, stderr = run_stage(SCRIPT.removeprefix("scripts/"), [*config, *flags, "--data_path", str(processed_dir),
                                                                  "--output_dir", str(tmp_path / "out")])
    assert code == 2, f"{code}\n{stderr[-3000:]}"
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in stderr
    if "--time_budget" in flags and "1s" not in flags:
        assert "45s, 10m, 1.5h" in errors[0]
    assert not (tmp_path / "out" / "final").exists()


def test_dry_run_with_a_time_budget_says_what_fits_and_writes_nothing(micro_config, processed_dir, tmp_path,
                                                                     run_stage):
    output_dir = tmp_path / "never"
    code, stdout, stderr = run_stage("02_pretrain.py", ["--config", str(micro_config), "--data_path",
                                                        str(processed_dir), "--output_dir", str(output_dir),
                                                        "--dry_run", "--time_budget", "2h"])
    assert code == 0, stderr[-3000:]
    assert "budget 2h →" in stdout and "what fits in --time_budget 2h" in stdout
    assert "tokens per parameter" in stdout and "s per evaluation" in stdout
    assert not output_dir.exists()
    # A ceiling of 0.01 passes over train.bin: far fewer steps than 2 hours fit, and the line says why.
    code, stdout, stderr = run_stage("02_pretrain.py", ["--config", str(micro_config), "--data_path",
                                                        str(processed_dir), "--output_dir", str(output_dir),
                                                        "--dry_run", "--time_budget", "2h", "--max_epochs", "0.01"])
    assert code == 0, stderr[-3000:]
    train_tokens = json.loads((processed_dir / META).read_text())["train_tokens"]
    steps = int(0.01 * train_tokens / 256)  # the micro preset's 4 × 64 tokens a step
    assert f"budget 2h → {steps:,} steps of 256 tokens" in stdout
    assert f"(0.01 epochs of {train_tokens:,} tokens: --max_epochs; the budget fits" in stdout
    assert not output_dir.exists()


def test_compile_without_a_cxx_compiler_is_a_clear_error(micro_config, processed_dir, tmp_path):
    # Inductor builds its CPU kernels with g++ (or $CXX); without one the run died in the first step's compilation.
    result = pretrain("--config", str(micro_config), "--data_path", str(processed_dir), "--output_dir",
                      str(tmp_path / "never"), "--compile", "--max_steps", "2",
                      env={"CXX": str(tmp_path / "no-such-compiler")})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: --compile" in result.stderr and "C++ compiler" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "never" / "final").exists()


def test_compiled_budget_probe_does_not_charge_evaluations_with_their_compilation(micro_config, processed_dir,
                                                                                  tmp_path):
    # The first evaluation compiles the no-grad graphs (seconds); timed, it made each of a 10-minute run's
    # evaluations cost 4.2 s instead of milliseconds, and the budget bought a third of the steps.
    result = pretrain("--config", str(micro_config), "--data_path", str(processed_dir), "--output_dir",
                      str(tmp_path / "never"), "--dry_run", "--compile", "--time_budget", "10m", "--eval_batches", "2",
                      timeout=300, env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})  # compiles cold
    assert result.returncode == 0, result.stderr[-3000:]
    probe = next(line for line in result.stdout.splitlines() if line.startswith("probe"))
    seconds_per_evaluation = float(probe.split(" s per evaluation")[0].split()[-1])
    assert seconds_per_evaluation < 1.0, probe
