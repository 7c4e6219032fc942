"""The whole chain, for real: run_pipeline.py's micro profile (what `make test-pipeline` runs) from the built-in
corpus to a served chat model; then a re-run that skips what is done, and a failing stage that stops the chain."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from utils.checkpoint import resolve_checkpoint, verify_checkpoint
from utils.tokens import META, TOKENIZER_DIR

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "sft", "dpo")


def pipeline(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/run_pipeline.py", "--profile", "micro", "--work_dir", str(work),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=540)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("pipeline")
    result = pipeline(work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work, result


def test_every_stage_leaves_complete_outputs(run):
    work, result = run
    data = work / "data" / "processed" / "python-docs-micro"
    for name in ("train.bin", "val.bin", META, f"{TOKENIZER_DIR}/tokenizer.json"):
        assert (data / name).is_file(), name
    for stage in STAGES:
        checkpoint = resolve_checkpoint(work / "checkpoints" / stage / "micro")
        verify_checkpoint(checkpoint)
        results = json.loads((work / "evaluation_results" / f"{stage}-micro" / "results.json").read_text())
        perplexity = results["metrics"]["val.perplexity"]
        assert math.isfinite(perplexity) and perplexity < 512, (stage, perplexity)
    assert "all gates passed" in result.stdout
    dpo = json.loads((work / "checkpoints" / "dpo" / "micro" / "summary.json").read_text())
    # Policy == reference before DPO (every reward 0); after it, held-out chosen replies gained on the reference.
    assert dpo["eval_before"]["rewards/accuracies"] == 0.0
    assert dpo["eval_after"]["rewards/accuracies"] > 0.0 and dpo["eval_after"]["rewards/chosen"] > 0.0
    report = (work / "reports" / "report.md").read_text()
    assert all(stage in report for stage in STAGES)
    summary = json.loads((work / "reports" / "pipeline_summary.json").read_text())
    assert list(summary["steps"])[0] == "prepare" and list(summary["steps"])[-1] == "report"
    assert "make serve CKPT=" in result.stdout


def test_the_final_model_answers_a_chat_request_over_http(run):
    work, _ = run
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "scripts/06_serve.py", "--model_path",
                               str(work / "checkpoints" / "dpo" / "micro"), "--mode", "api", "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server not healthy after 90 s"
                time.sleep(0.3)
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "What does a list do?"}], "max_tokens": 12})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] > 0
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_rerun_skips_finished_steps_and_a_failing_stage_stops_the_chain(run):
    work, _ = run
    again = pipeline(work)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("up to date, skipped") == 11, again.stdout

    failed = pipeline(work, "--sft_dataset", str(work / "missing.jsonl"))
    assert failed.returncode == 2
    assert "=== pretrain: up to date, skipped" in failed.stdout
    assert "missing.jsonl" in failed.stderr + failed.stdout
    assert "pipeline stopped: step 'sft' failed (exit 2)" in failed.stderr
    state = json.loads((work / "checkpoints" / "pipeline_state.json").read_text())
    assert state["sft"]["status"] == "failed (2)"


def test_the_cpu_profile_compiles_where_inductor_can_and_runs_eager_where_it_cannot(monkeypatch, capsys):
    # make pipeline's pretraining compiles on a CPU (~1.2x the bf16 step), but a laptop without g++ must still run
    # the chain: there it trains eager and says why.
    import importlib.util

    import torch

    import utils.model

    spec = importlib.util.spec_from_file_location("run_pipeline_flags", ROOT / "scripts" / "run_pipeline.py")
    runner = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, runner)  # dataclasses look their module up while it executes
    spec.loader.exec_module(runner)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(utils.model, "cxx_compiler_available", lambda: True)
    assert runner.compile_flags(runner.PROFILES["cpu-tiny"]) == ["--compile"]
    assert runner.compile_flags(runner.PROFILES["micro"]) == []
    monkeypatch.setattr(utils.model, "cxx_compiler_available", lambda: False)
    assert runner.compile_flags(runner.PROFILES["cpu-tiny"]) == []
    assert "without --compile" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(utils.model, "cxx_compiler_available", lambda: True)
    assert runner.compile_flags(runner.PROFILES["cpu-tiny"]) == []
