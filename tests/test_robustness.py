"""Standing fault and fuzz checks (`make test-robustness`; not in `make test`: together they take minutes).

- a kill -9 loop over a micro pretraining: kills at random moments and in the middle of checkpoint saves,
  each followed by a resume; the finished run must log exactly what an uninterrupted run logs, end with
  the same weights, and leave no debris;
- schemathesis against a live server on a micro model, a bounded number of generated requests with a fixed
  seed: no answer may be a 5xx.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from utils.metrics import read_metrics

pytestmark = pytest.mark.robustness

ROOT = Path(__file__).resolve().parents[1]
KILLS = 6
RUN = ["--max_steps", "150", "--save_steps", "5", "--eval_steps", "10", "--eval_batches", "2", "--logging_steps", "1",
       "--batch_size", "4", "--save_total_limit", "2"]


def pretrain_command(config: Path, data: Path, output_dir: Path) -> list[str]:
    command = [sys.executable, "scripts/02_pretrain.py", "--config", str(config), "--data_path", str(data),
               "--output_dir", str(output_dir), *RUN]
    if (output_dir / "latest").is_file():
        command += ["--resume_from_checkpoint", "latest"]
    return command


def deterministic_rows(output_dir: Path) -> list[dict]:
    timing = ("time", "tokens_per_second", "mfu", "memory_mb")
    return [{k: v for k, v in row.items() if k not in timing} for row in read_metrics(output_dir / "metrics.jsonl")]


def saving(output_dir: Path) -> bool:
    return any(output_dir.glob(".tmp-*")) or any(output_dir.glob(".old-*"))


def run_until_killed(command: list[str], output_dir: Path, during_save: bool, rng: random.Random) -> str | None:
    """Starts the run and SIGKILLs it mid-save or after a random delay; says which, None when it finished first."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + (60 if during_save else rng.uniform(5.0, 10.0))
    moment = "at random"
    while process.poll() is None and time.time() < deadline:
        if during_save and saving(output_dir):
            moment = "mid-save"
            break
        time.sleep(0.005 if during_save else 0.05)
    if process.poll() is not None:
        assert process.returncode == 0, process.stderr.read().decode()[-3000:]
        return None
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    return moment


def test_kill_9_at_random_moments_and_mid_save_then_resume_matches_an_uninterrupted_run(tmp_path, processed_dir,
                                                                                       micro_config):
    config = micro_config
    reference = tmp_path / "reference"
    subprocess.run(pretrain_command(config, processed_dir, reference), cwd=ROOT, check=True, capture_output=True)

    output_dir = tmp_path / "killed"
    rng = random.Random(13)
    kills: list[str] = []
    while len(kills) < KILLS:
        moment = run_until_killed(pretrain_command(config, processed_dir, output_dir), output_dir,
                                  during_save=len(kills) % 2 == 1, rng=rng)
        if moment is None:
            break
        kills.append(moment)
    print(f"kills: {kills}")
    assert len(kills) >= 5 and kills.count("mid-save") >= 2
    finish = subprocess.run(pretrain_command(config, processed_dir, output_dir), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr[-3000:]

    assert deterministic_rows(output_dir) == deterministic_rows(reference)
    assert (output_dir / "latest").read_text().strip() == "final"
    expected, got = (load_file(reference / "final" / "model.safetensors"),
                     load_file(output_dir / "final" / "model.safetensors"))
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)
    assert not [p.name for p in output_dir.iterdir() if p.name.startswith(".")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def live_server(micro_checkpoint, tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "scripts/06_serve.py", "--model_path", str(micro_checkpoint), "--mode", "api", "--device",
         "cpu", "--port", str(port), "--max_new_tokens_cap", "16"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.3)
    yield f"http://127.0.0.1:{port}", tmp_path / "server.log"
    process.terminate()
    process.wait(timeout=30)
    log.close()


def test_generated_requests_never_get_a_5xx(live_server, tmp_path):
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if schemathesis is None:
        pytest.skip("schemathesis is not installed: `make test-robustness` installs requirements-robustness.txt")
    url, server_log = live_server
    report = tmp_path / "junit.xml"
    result = subprocess.run(
        [schemathesis, "run", f"{url}/openapi.json", "--checks", "not_a_server_error", "--max-examples",
         os.environ.get("FUZZ_EXAMPLES", "60"), "--seed", "1", "--report", "junit", "--report-junit-path", str(report),
         "--request-timeout", "30", "--workers", "1", "--no-color"],
        capture_output=True, text=True, timeout=1800,
    )
    print(result.stdout[-4000:])
    assert result.returncode == 0, result.stdout[-6000:] + server_log.read_text()[-3000:]
