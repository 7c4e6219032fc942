#!/usr/bin/env python3
"""The prepared GPU check: about 8 minutes on one H100/H200, from a fresh copy of the repository.

    bench/gpu_check.sh OUT_DIR [--dry-run] [--no-install] [--parts a,b] [--budget SECONDS]

Parts, in this order, each with its own time limit (time a part leaves unused passes to the next):
  install         make install: .venv with the pinned requirements (on a GPU machine pip takes torch's CUDA build)
  extras          flash-attn from a prebuilt wheel only (never a source build; else skipped and recorded), torchao
                  and bitsandbytes; each must import afterwards, or it is removed again
  gpu_tests       pytest -m gpu tests/test_gpu_path.py
  pipeline_smoke  scripts/run_pipeline.py (micro profile on the small preset, pretraining for a time budget, SFT,
                  DPO, evaluation and gates), then one answer from 06_serve.py's API on the GPU
  decode          bench_serve.py's batch-1 decode measurement (ours against model.generate()), and batch 8
  pretrain_bench  bench_pretrain.py's GPU part (small and base at their preset micro-batch and sequence length,
                  bf16, with and without torch.compile) once per attention kernel: sdpa, and flash-attn 2 if installed

Writes OUT_DIR/gpu_check.json (machine, versions, each part's figures, pass/fail, seconds and limit), rewritten
after every part, OUT_DIR/gpu_check.log (every command's output) and OUT_DIR/gpu_tests.xml (pytest's report).
Exit status 0 when every part that ran passed. `--dry-run` (or DRY_RUN=1) installs and runs nothing: it checks
the environment, prints the plan and writes the JSON skeleton, every part marked "skipped".

Only the standard library at the top level: the orchestrator runs before .venv exists. `--worker NAME` runs one
measurement inside the venv's Python and prints its result as a `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Seconds per part; they add up to the 8-minute budget.
PARTS = {"install": 90, "extras": 30, "gpu_tests": 120, "pipeline_smoke": 150, "decode": 30, "pretrain_bench": 60}
FLASH_ATTN_VERSION = os.environ.get("FLASH_ATTN_VERSION", "2.8.3")
FLASH_ATTN_WHEELS = "https://github.com/Dao-AILab/flash-attention/releases/download/v{version}/{name}"
RESULT = "RESULT "
MIN_PART_SECONDS = 5
SERVE_SECONDS = 30  # of pipeline_smoke's limit, kept for starting the server and its one answer
SMOKE_PRESET, SMOKE_PRETRAIN_BUDGET = "small", "30s"
PACKAGES = ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "tokenizers", "flash-attn", "torchao",
            "bitsandbytes")


# ---------------------------------------------------------------- running commands


@dataclass
class Completed:
    returncode: int | None
    lines: list[str]
    seconds: float
    timed_out: bool

    def results(self) -> list[Any]:
        return [json.loads(line[len(RESULT):]) for line in self.lines if line.startswith(RESULT)]

    def tail(self, count: int = 15) -> str:
        return "\n".join(self.lines[-count:])


@dataclass
class Context:
    out_dir: Path
    work_dir: Path
    log: Any
    python: str
    install: bool
    deadline: float = 0.0
    versions: dict[str, Any] = field(default_factory=dict)

    def say(self, message: str) -> None:
        print(message, flush=True)
        self.log.write(message + "\n")
        self.log.flush()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, command: list[str], limit: float, env: dict[str, str] | None = None) -> Completed:
        """Runs `command` in the repository with its output going to the log; past `limit` seconds its whole
        process group is stopped (the pytest and pipeline parts start processes of their own)."""
        self.say(f"$ {' '.join(command)}   (limit {limit:.0f} s)")
        started = time.monotonic()
        try:
            proc = subprocess.Popen(command, cwd=ROOT, env={**base_env(), **(env or {})}, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        except OSError as err:  # no venv yet (a failed install): the part fails, the check goes on
            self.say(f"  -> could not start: {err}")
            return Completed(None, [str(err)], 0.0, False)
        lines: list[str] = []

        def read() -> None:
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                self.log.write(line)
                self.log.flush()  # so that the log of a check killed from outside goes up to that moment

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(proc)
        reader.join(timeout=10)
        seconds = round(time.monotonic() - started, 1)
        self.say(f"  -> exit {proc.returncode}{' (time limit reached)' if timed_out else ''} after {seconds} s")
        return Completed(None if timed_out else proc.returncode, lines, seconds, timed_out)

    def worker(self, name: str, limit: float, *args: str) -> Completed:
        return self.run([self.python, str(Path(__file__)), "--worker", name, *args], limit)


def base_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def stop_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the environment


def nvidia_smi() -> dict[str, str] | None:
    """The first GPU as the driver reports it, or None where there is no NVIDIA driver."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode or not rows:
        return None
    name, memory, driver, capability = (part.strip() for part in rows[0].split(","))
    return {"name": name, "memory": memory, "driver": driver, "compute_capability": capability,
            "count": str(len(rows))}


def environment(python: str) -> dict[str, Any]:
    """What the plan depends on: tools, disk, the driver's GPU, and what the venv's Python sees (if it exists)."""
    found: dict[str, Any] = {
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "orchestrator_python": platform.python_version(),
        "make": shutil.which("make") is not None, "disk_free_gib": round(shutil.disk_usage(ROOT).free / 2**30, 1),
        "gpu": nvidia_smi(), "venv_python": python if Path(python).exists() else None,
    }
    if found["venv_python"]:
        try:
            done = subprocess.run([python, str(Path(__file__)), "--worker", "versions"], cwd=ROOT, env=base_env(),
                                  capture_output=True, text=True, timeout=120)
            found["versions"] = next((json.loads(line[len(RESULT):]) for line in done.stdout.splitlines()
                                      if line.startswith(RESULT)), None)
        except subprocess.TimeoutExpired:
            found["versions"] = None
    found["problems"] = [problem for problem, present in (
        ("make is not installed (the install part runs `make install`)", not found["make"]),
        (f"python3 is {found['orchestrator_python']}; make install needs 3.11 or newer (numpy 2.4)",
         sys.version_info < (3, 11)),
        (f"{found['disk_free_gib']} GiB free; the venv with torch's CUDA build needs about 15",
         found["disk_free_gib"] < 15),
        ("no NVIDIA GPU: nvidia-smi is missing or lists none", found["gpu"] is None),
    ) if present]
    return found


def has_cuda(env: dict[str, Any]) -> bool:
    versions = env.get("versions")
    if versions:
        return bool(versions.get("cuda_available"))
    return env["gpu"] is not None


# ---------------------------------------------------------------- the parts


def part_install(ctx: Context, limit: float) -> dict[str, Any]:
    if not ctx.install:
        return {"skipped": f"--no-install: using {ctx.python} as it is"}
    done = ctx.run(["make", "install"], limit)
    return {"passed": done.returncode == 0, **({} if done.returncode == 0 else {"error": done.tail()})}


def flash_attn_wheel_url(versions: dict[str, Any]) -> str | None:
    """The prebuilt wheel flash-attn publishes for this torch, CUDA major, Python and C++ ABI (its setup.py's
    own lookup), or None where torch has no CUDA."""
    if not versions.get("torch_cuda"):
        return None
    torch_minor = ".".join(versions["torch"].split("+")[0].split(".")[:2])
    tag = "cp" + "".join(versions["python"].split(".")[:2])
    name = (f"flash_attn-{FLASH_ATTN_VERSION}+cu{versions['torch_cuda'].split('.')[0]}torch{torch_minor}"
            f"cxx11abi{str(versions['cxx11_abi']).upper()}-{tag}-{tag}-linux_x86_64.whl")
    return FLASH_ATTN_WHEELS.format(version=FLASH_ATTN_VERSION, name=name)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def url_exists(url: str) -> bool:
    """A HEAD request that does not follow the redirect to the download itself: a redirect means the file is there."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, method="HEAD"), timeout=15) as response:
            return response.status == 200
    except urllib.error.HTTPError as err:
        return err.code in (301, 302, 303, 307, 308)
    except (urllib.error.URLError, OSError):
        return False


def imports(ctx: Context, module: str) -> bool:
    return ctx.run([ctx.python, "-c", f"import {module}"], 60).returncode == 0


def part_extras(ctx: Context, limit: float) -> dict[str, Any]:
    started = time.monotonic()
    ctx.versions = versions(ctx, limit)
    if not ctx.versions:
        return {"passed": False, "error": f"{ctx.python} cannot report its versions (see the log)"}
    result: dict[str, Any] = {"flash_attn": install_flash_attn(ctx, started + limit)}
    pip = [ctx.python, "-m", "pip", "install", "--only-binary=:all:"]
    for package, module in (("torchao", "torchao.float8"), ("bitsandbytes", "bitsandbytes")):
        if ctx.versions.get(package):
            result[package] = ctx.versions[package]
        elif not ctx.install:
            result[package] = {"skipped": "not installed (--no-install)"}
        else:
            # Pinned beside the installed torch, so that pip cannot swap it for another build.
            done = ctx.run([*pip, package, f"torch=={ctx.versions['torch']}"], started + limit - time.monotonic())
            result[package] = "installed" if done.returncode == 0 else {"skipped": f"pip failed: {done.tail(3)}"}
        if result[package] == "installed" and not imports(ctx, module):
            ctx.run([ctx.python, "-m", "pip", "uninstall", "-y", package], 60)
            result[package] = {"skipped": f"installed but `import {module}` failed with torch "
                                          f"{ctx.versions['torch']}; removed again"}
    ctx.versions = versions(ctx, 60) or ctx.versions
    result["passed"] = True
    return result


def install_flash_attn(ctx: Context, deadline: float) -> Any:
    if ctx.versions.get("flash-attn"):
        return ctx.versions["flash-attn"]
    if not ctx.install:
        return {"skipped": "not installed (--no-install)"}
    # Any index that holds a binary wheel first; then the wheel flash-attn publishes for this torch/CUDA/Python.
    done = ctx.run([ctx.python, "-m", "pip", "install", "--only-binary=:all:", "--no-deps", "flash-attn"],
                   min(60.0, deadline - time.monotonic()))
    source = "a binary wheel on the package index"
    if done.returncode != 0:
        url = flash_attn_wheel_url(ctx.versions)
        if url is None or not url_exists(url):
            return {"skipped": f"no prebuilt wheel for torch {ctx.versions['torch']}, CUDA "
                               f"{ctx.versions.get('torch_cuda')}, Python {ctx.versions['python']} "
                               f"(looked on the index and for {url}); no source build"}
        done = ctx.run([ctx.python, "-m", "pip", "install", "--no-deps", url], deadline - time.monotonic())
        source = url
        if done.returncode != 0:
            return {"skipped": f"pip could not install {url}: {done.tail(3)}"}
    if not imports(ctx, "flash_attn"):
        # A broken flash_attn still makes `--attn auto` choose it: remove it.
        ctx.run([ctx.python, "-m", "pip", "uninstall", "-y", "flash-attn"], 60)
        return {"skipped": f"installed from {source} but `import flash_attn` failed; removed again"}
    return f"installed from {source}"


def versions(ctx: Context, limit: float) -> dict[str, Any] | None:
    found = ctx.worker("versions", limit).results()
    return found[0] if found else None


def part_gpu_tests(ctx: Context, limit: float) -> dict[str, Any]:
    report = ctx.out_dir / "gpu_tests.xml"
    report.unlink(missing_ok=True)  # pytest writes it at the end: a run cut short must not show an older one
    done = ctx.run([ctx.python, "-m", "pytest", "-m", "gpu", "tests/test_gpu_path.py", "-q", "-rA",
                    "-p", "no:cacheprovider", f"--junitxml={report}"], limit)
    tests = junit_outcomes(report) if report.is_file() else {}
    counts = {outcome: sum(1 for v in tests.values() if v.split(":")[0] == outcome)
              for outcome in ("passed", "failed", "skipped")}
    result: dict[str, Any] = {"passed": done.returncode == 0 and counts["passed"] > 0, "counts": counts,
                              "tests": tests}
    if done.timed_out:
        result["error"] = f"time limit of {limit:.0f} s reached"
    return result


def junit_outcomes(path: Path) -> dict[str, str]:
    outcomes = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if problem is None:
            outcomes[case.get("name")] = "passed"
        else:
            kind = "skipped" if problem.tag == "skipped" else "failed"
            outcomes[case.get("name")] = f"{kind}: {(problem.get('message') or '')[:300]}"
    return outcomes


def part_pipeline_smoke(ctx: Context, limit: float) -> dict[str, Any]:
    work = ctx.work_dir / "pipeline"
    done = ctx.run([ctx.python, "scripts/run_pipeline.py", "--profile", "micro", "--model", SMOKE_PRESET, "--work_dir",
                    str(work), "--time_budget", SMOKE_PRETRAIN_BUDGET, "--force"], limit - SERVE_SECONDS)
    result: dict[str, Any] = {"pipeline_exit": done.returncode,
                              "gates_failed": [line.split(":")[0].removeprefix("=== ") for line in done.lines
                                               if "gate failed, continuing" in line]}
    wanted = {"pretrain": ("steps", "tokens_per_second", "mfu", "final_val_loss", "peak_memory_mb", "train_seconds"),
              "sft": ("steps", "train_loss", "eval_loss_before", "eval_loss_after", "train_seconds"),
              "dpo": ("steps", "train_loss", "train_seconds")}
    for stage, keys in wanted.items():
        summary = work / "checkpoints" / stage / SMOKE_PRESET / "summary.json"
        if summary.is_file():
            facts = json.loads(summary.read_text())
            result[stage] = {key: facts.get(key) for key in keys}
    timings = work / "reports" / "pipeline_summary.json"
    if timings.is_file():
        result["step_seconds"] = json.loads(timings.read_text()).get("steps")
    if done.returncode != 0:
        result.update(passed=False, error=done.tail())
        return result
    result["served"] = serve_one_answer(ctx, work / "checkpoints" / "dpo" / SMOKE_PRESET, limit - done.seconds)
    result["passed"] = result["served"].get("status") == 200 and isinstance(result["served"].get("answer"), str)
    return result


def serve_one_answer(ctx: Context, checkpoint: Path, limit: float) -> dict[str, Any]:
    """06_serve.py's API on the GPU (loopback), one greedy chat completion, then SIGTERM as a process manager sends."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [ctx.python, "scripts/06_serve.py", "--model_path", str(checkpoint), "--mode", "api", "--port",
               str(port), "--device", "cuda", "--max_new_tokens_cap", "64"]
    ctx.say(f"$ {' '.join(command)}")
    log = ctx.out_dir / "gpu_check.log"
    with open(log, "a") as server_log:
        proc = subprocess.Popen(command, cwd=ROOT, env={**base_env(), "SERVE_API_KEY": ""}, stdout=server_log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()
    try:
        while time.monotonic() - started < max(limit - 5, 5):
            if proc.poll() is not None:
                return {"error": f"the server exited with {proc.returncode} (see the log)"}
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    health = json.loads(response.read())
                break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        else:
            return {"error": f"not healthy within {limit:.0f} s"}
        body = {"messages": [{"role": "user", "content": "What does json.dumps do?"}], "max_tokens": 32,
                "temperature": 0}
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        asked = time.monotonic()
        with urllib.request.urlopen(request, timeout=max(limit - (asked - started), 5)) as response:
            reply = json.loads(response.read())
        choice = reply["choices"][0]
        return {"status": response.status, "model": health.get("model"), "answer": choice["message"]["content"],
                "finish_reason": choice["finish_reason"], "usage": reply.get("usage"),
                "seconds_to_healthy": round(asked - started, 1), "answer_seconds": round(time.monotonic() - asked, 2)}
    except (urllib.error.URLError, OSError, KeyError, ValueError) as err:
        return {"error": f"request failed: {err}"}
    finally:
        stop_group(proc)


def part_decode(ctx: Context, limit: float) -> dict[str, Any]:
    done = ctx.worker("decode", limit, "--work_dir", str(ctx.work_dir / "decode"))
    found = done.results()
    if not found:
        return {"passed": False, "error": f"time limit of {limit:.0f} s reached" if done.timed_out else done.tail()}
    return {"passed": done.returncode == 0, **found[0]}


def part_pretrain_bench(ctx: Context, limit: float) -> dict[str, Any]:
    kernels = ["sdpa"] + (["flash_attention_2"] if ctx.versions.get("flash-attn") else [])
    runs: list[dict[str, Any]] = []
    incomplete = []
    for index, kernel in enumerate(kernels):
        # An equal share of what is left for each kernel; rows print as they finish, so a cut run keeps them.
        share = ctx.left() / (len(kernels) - index)
        done = ctx.worker("pretrain_bench", share, "--attn", kernel)
        rows = [{"attn": kernel, **json.loads(line)} for line in done.lines if line.startswith('{"preset"')]
        runs.extend(rows)
        if done.returncode != 0 or len(rows) < 4:
            incomplete.append(f"{kernel}: {len(rows)} of 4 rows"
                              + (f" in its {share:.0f} s" if done.timed_out else f", exit {done.returncode}"))
    result: dict[str, Any] = {"passed": not incomplete, "runs": runs}
    if "flash_attention_2" not in kernels:
        result["flash_attention_2"] = "skipped: flash-attn is not installed"
    if incomplete:
        result["incomplete"] = incomplete
    return result


PART_FUNCTIONS = {"install": part_install, "extras": part_extras, "gpu_tests": part_gpu_tests,
                  "pipeline_smoke": part_pipeline_smoke, "decode": part_decode, "pretrain_bench": part_pretrain_bench}
PLAN = {
    "install": "make install (.venv, requirements.txt)",
    "extras": "flash-attn from a prebuilt wheel only; torchao, bitsandbytes (binary wheels)",
    "gpu_tests": "pytest -m gpu tests/test_gpu_path.py",
    "pipeline_smoke": "run_pipeline.py --profile micro --model small --time_budget 30s --force; one API answer",
    "decode": "decode tokens/s at batch 1 (bench_serve) and batch 8, small preset, bf16",
    "pretrain_bench": "bench_pretrain.py GPU part: small, base × compile off/on × sdpa, flash-attn 2",
}


# ---------------------------------------------------------------- workers (inside the venv)


def worker_versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    found = {"python": platform.python_version(), "torch_cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available(), "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
             **{name: installed(name) for name in PACKAGES}}
    found["torch"] = torch.__version__
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        found.update(gpu=properties.name, compute_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                     gpu_memory_gib=round(properties.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                     bf16=torch.cuda.is_bf16_supported())
    return found


def worker_pretrain_bench(attn: str, steps: int, warmup: int) -> None:
    """bench_pretrain.py's own GPU benchmark with the attention kernel fixed (it asks for "auto", which would give
    flash-attn 2 whenever it is installed); it prints one JSON row per configuration as it finishes."""
    from unittest import mock

    from bench import bench_pretrain

    with mock.patch.object(bench_pretrain, "resolve_attention", lambda _choice: attn):
        bench_pretrain.bench_gpu(steps, warmup)


def worker_decode(work_dir: Path, new_tokens: int, rounds: int) -> dict[str, Any]:
    """bench_serve.py's batch-1 comparison on the GPU, and 8 greedy streams decoded together, on an untrained model
    of the small preset (speed does not depend on the weights) with its full vocabulary."""
    import torch

    from bench import bench_serve
    from utils.decoding import GenerationSettings
    from utils.generation import generate_batch
    from utils.loading import load_for_inference

    work_dir.mkdir(parents=True, exist_ok=True)
    setup = argparse.Namespace(preset=str(ROOT / "config" / "small.json"), model_path=str(work_dir / "none"))
    checkpoint, source = bench_serve.tiny_checkpoint(setup, work_dir)
    loaded = load_for_inference(checkpoint, "cuda")
    # bench_serve builds model.generate()'s input ids on the CPU, where it measures; here they must follow the model.
    hf_generate = loaded.model.generate
    loaded.model.generate = lambda ids, **kwargs: hf_generate(ids.to(loaded.device), **kwargs)
    batch1 = bench_serve.decode_comparison(loaded, new_tokens, rounds)
    prompts = [f"{bench_serve.PROMPT} ({index})" for index in range(8)]
    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0)
    generate_batch(loaded.model, loaded.tokenizer, prompts, settings.replace(max_new_tokens=8))  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    results = generate_batch(loaded.model, loaded.tokenizer, prompts, settings, max_batch_size=8)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = sum(len(result.tokens) for result in results)
    return {"model": source, "dtype": str(loaded.dtype).removeprefix("torch."), "device": torch.cuda.get_device_name(),
            "batch1": batch1, "batch8": {"streams": 8, "generated_tokens": tokens, "seconds": round(seconds, 3),
                                         "aggregate_tokens_per_second": round(tokens / seconds, 1),
                                         "per_stream_tokens_per_second": round(tokens / seconds / 8, 1)}}


def run_worker(args: argparse.Namespace) -> int:
    if args.worker == "versions":
        print(RESULT + json.dumps(worker_versions()), flush=True)
    elif args.worker == "pretrain_bench":
        worker_pretrain_bench(args.attn, args.steps, args.warmup)
    else:
        print(RESULT + json.dumps(worker_decode(Path(args.work_dir), args.new_tokens, args.rounds)), flush=True)
    return 0


# ---------------------------------------------------------------- the orchestrator


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", help="where gpu_check.json, gpu_check.log and gpu_tests.xml go")
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN", "") not in ("", "0"),
                        help="check the environment, print the plan, write the JSON skeleton; install and run "
                             "nothing (also DRY_RUN=1)")
    parser.add_argument("--no-install", action="store_true",
                        default=os.environ.get("SKIP_INSTALL", "") not in ("", "0"),
                        help="use the Python in $PYTHON (default .venv/bin/python) as it is: no make install, no "
                             "pip (also SKIP_INSTALL=1)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the parts run, their limits scaled to fit (default: their own, "
                             f"{sum(PARTS.values())} s for all)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch dir of the pipeline and decode")
    parser.add_argument("--worker", choices=("versions", "pretrain_bench", "decode"), help=argparse.SUPPRESS)
    parser.add_argument("--attn", default="sdpa", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--new_tokens", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--work_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is None and not args.out_dir:
        parser.error("give OUT_DIR: bench/gpu_check.sh OUT_DIR [--dry-run]")
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    args.parts = parts
    return args


def skeleton(args: argparse.Namespace, env: dict[str, Any], limits: dict[str, float], reason: str) -> dict[str, Any]:
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dry_run": args.dry_run,
        "budget_s": round(sum(limits.values())),
        "machine": {key: env[key] for key in ("platform", "cpu_count", "disk_free_gib", "gpu")},
        "versions": env.get("versions"), "problems": env["problems"],
        "parts": {name: {"limit_s": round(limits[name]), "skipped": reason} for name in args.parts},
        "passed": None,
    }


def write(report: dict[str, Any], out_dir: Path) -> None:
    path = out_dir / "gpu_check.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def orchestrate(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    python = os.environ.get("PYTHON") or str(ROOT / ".venv" / "bin" / "python")
    scale = args.budget / sum(PARTS[name] for name in args.parts) if args.budget else 1.0
    limits = {name: PARTS[name] * scale for name in args.parts}
    env = environment(python)
    cuda = has_cuda(env)
    reason = "no CUDA" if not cuda else "dry run"
    report = skeleton(args, env, limits, reason)
    print(f"GPU: {env['gpu'] or 'none (no nvidia-smi, or it found no GPU)'}; venv Python: "
          f"{env['venv_python'] or 'not yet created'}; torch: {(env.get('versions') or {}).get('torch')}; "
          f"disk free: {env['disk_free_gib']} GiB")
    for problem in env["problems"]:
        print(f"  problem: {problem}")
    print(f"plan ({sum(limits.values()):.0f} s in all; a part's unused time passes to the next):")
    for name in args.parts:
        print(f"  {name:<15} {limits[name]:>4.0f} s  {PLAN[name]}")
    if args.dry_run or not cuda:
        write(report, out_dir)
        print(f"wrote {out_dir / 'gpu_check.json'} (every part skipped: {reason})")
        if not args.dry_run:
            print("error: no CUDA GPU is visible here, so there is nothing to check; --dry-run only shows the plan",
                  file=sys.stderr)
        return 0 if args.dry_run else 1

    work_dir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    with open(out_dir / "gpu_check.log", "w") as log:
        ctx = Context(out_dir, work_dir, log, python, install=not args.no_install)
        started = time.monotonic()
        ctx.deadline = started
        for name in args.parts:
            ctx.deadline += limits[name]
            if name not in ("install", "extras") and not ctx.versions:
                ctx.versions = versions(ctx, 60) or {}
            limit = ctx.left()
            ctx.say(f"\n=== {name} (limit {limit:.0f} s)")
            if limit < MIN_PART_SECONDS:
                report["parts"][name] = {"limit_s": round(limit), "skipped": "no time left in the budget"}
            else:
                part_started = time.monotonic()
                result = PART_FUNCTIONS[name](ctx, limit)
                report["parts"][name] = {"limit_s": round(limit), "seconds": round(time.monotonic() - part_started, 1),
                                         **result}
            report["versions"] = ctx.versions or report["versions"]
            write(report, out_dir)
            ctx.say(f"=== {name}: " + json.dumps({k: v for k, v in report["parts"][name].items()
                                                   if k in ("passed", "skipped", "error", "seconds")}))
        ran = [part for part in report["parts"].values() if "skipped" not in part]
        report["passed"] = bool(ran) and all(part.get("passed") for part in ran)
        report["seconds"] = round(time.monotonic() - started, 1)
        write(report, out_dir)
        ctx.say(f"\n{'PASSED' if report['passed'] else 'FAILED'} in {report['seconds']} s; "
                f"wrote {out_dir / 'gpu_check.json'}")
    if not args.keep_work:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0 if report["passed"] else 1


def main() -> int:
    args = parse_args()
    return run_worker(args) if args.worker else orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
