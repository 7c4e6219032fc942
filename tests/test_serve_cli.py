"""`06_serve.py` interactive (driven through a pseudo-terminal), batch mode, and its refusals."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from presets import micro_preset

from utils.decoding import GenerationSettings
from utils.generation import generate
from utils.loading import load_for_inference
from utils.model import build_model
from utils.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TERM": "dumb", "PYTHONIOENCODING": "utf-8", "SERVE_API_KEY": ""}
GREEDY = ["--temperature", "0", "--repetition_penalty", "1.0"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/06_serve.py", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)


class Terminal:
    """The script on a pseudo-terminal, as a user at a keyboard runs it (Ctrl-C is a real SIGINT)."""

    def __init__(self, *args: str):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes the script
            os.chdir(ROOT)
            # a user's terminal delivers Ctrl-C even when pytest runs in a background job, which ignores SIGINT
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(sys.executable, [sys.executable, "scripts/06_serve.py", *args], ENV)
        self.output = ""

    def read_until(self, marker: str, timeout: float = 90) -> str:
        """Everything printed up to and including the next `marker`."""
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                raise TimeoutError(f"never saw {marker!r}; got:\n{self.output[-2000:]}")
            try:
                chunk = os.read(self.fd, 1 << 16)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise EOFError(f"terminal closed before {marker!r}; got:\n{self.output[-2000:]}")
            self.output += chunk.decode("utf-8", errors="replace")
        head, _, self.output = self.output.partition(marker)
        return head + marker

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def close(self) -> int:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            if not select.select([self.fd], [], [], 0.05)[0]:
                continue
            try:
                os.read(self.fd, 1 << 16)  # drain so the child never blocks on a full terminal
            except OSError:
                time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        return -9


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """A micro model with larger initial weights: its untrained replies depend visibly on the context
    (the default one answers every chat prompt with the same newlines, which could not show history)."""
    tok = load_tokenizer(tokenizer_dir)
    path = tmp_path_factory.mktemp("chat_ckpt")
    build_model(micro_preset(len(tok), initializer_range=0.1), tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def local(micro_checkpoint):
    return load_for_inference(micro_checkpoint, "cpu")


@pytest.fixture(scope="module")
def chat_local(chat_checkpoint):
    return load_for_inference(chat_checkpoint, "cpu")


def tty_text(text: str) -> str:
    return text.replace("\n", "\r\n")  # the terminal's output processing


def test_interactive_chat_and_completion_through_a_terminal(chat_checkpoint, chat_local):
    """Chat: history kept, /reset clears it, Ctrl-C stops a reply not the chat. Base model: plain completion."""
    model, tok = chat_local.model, chat_local.tokenizer
    settings = GenerationSettings(max_new_tokens=12)
    first = generate(model, tok, [{"role": "user", "content": "Hello"}], settings, "chatml").text
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "Hello"}]
    second = generate(model, tok, history, settings, "chatml").text
    assert second != first  # otherwise this test could not tell history from no history
    completion = generate(model, tok, "The for statement", settings).text

    common = ["--model_path", str(chat_checkpoint), "--max_new_tokens", "12", "--device", "cpu", *GREEDY]
    chat, base = Terminal(*common, "--template", "chatml"), Terminal(*common)  # both start at once
    try:
        chat.read_until("you> ")
        chat.send("Hello\n")
        assert tty_text(first) in chat.read_until("you> ")
        chat.send("Hello\n")
        assert tty_text(second) in chat.read_until("you> ")  # answered with the first turn in context
        chat.send("/reset\n")
        assert "conversation cleared" in chat.read_until("you> ")
        chat.send("Hello\n")
        assert tty_text(first) in chat.read_until("you> ")  # history gone: the first answer again
        chat.send("/help\n")
        assert "/system <text>" in chat.read_until("you> ")
        chat.send("/max 100\n")
        chat.read_until("you> ")
        chat.send("Tell me everything\n")
        chat.read_until("bot> ")
        chat.send("\x03")  # Ctrl-C during the reply (or, if it already ended, at the prompt)
        stopped = chat.read_until("you> ")
        assert "[stopped]" in stopped or "Ctrl-C stops a reply" in stopped
        chat.send("/temp 0.5\n")
        assert "temperature 0.5" in chat.read_until("you> ")  # the chat is still alive
        chat.send("/quit\n")

        assert "plain completion" in base.read_until("prompt> ")
        base.send("The for statement\n")
        assert tty_text(completion) in base.read_until("prompt> ")
        base.send("/quit\n")
    finally:
        codes = chat.close(), base.close()
    assert codes == (0, 0)


def test_batch_mode_writes_every_output(micro_checkpoint, local, tmp_path):
    messages = [{"role": "user", "content": "What is a dict?"}]
    prompts = ["The quick brown fox", {"id": "chat-1", "messages": messages, "max_new_tokens": 8},
               {"prompt": "def main():", "temperature": 0.9, "seed": 3}]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "results" / "out.json"
    run = run_script("--model_path", str(micro_checkpoint), "--mode", "batch", "--prompts_file",
                     str(tmp_path / "prompts.json"), "--output_file", str(out), "--max_new_tokens", "16",
                     "--device", "cpu", "--max_batch_size", "2", *GREEDY)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    assert [r["id"] for r in rows] == [0, "chat-1", 2]
    base = GenerationSettings(max_new_tokens=16, top_k=50, top_p=0.9)
    want = [
        generate(local.model, local.tokenizer, "The quick brown fox", base).text,
        generate(local.model, local.tokenizer, messages, base.replace(max_new_tokens=8)).text,
        generate(local.model, local.tokenizer, "def main():", base.replace(temperature=0.9, seed=3)).text,
    ]
    assert [r["text"] for r in rows] == want
    assert rows[1]["messages"] == messages and rows[1]["tokens"] <= 8
    assert all(r["finish_reason"] in ("stop", "length") and r["timings"]["total_seconds"] > 0 for r in rows)
    summary = json.loads((out.parent / "out.summary.json").read_text())
    assert summary["prompts"] == 3 and summary["generated_tokens"] == sum(r["tokens"] for r in rows)
    assert len((out.parent / "out.metrics.jsonl").read_text().splitlines()) == 3
    assert "06_serve (batch) summary" in run.stdout


def test_batch_mode_bad_prompt_names_file_item_and_field(micro_checkpoint, tmp_path, run_stage):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["ok", {"prompt": "x", "temprature": 0.5}]))
    code, _, stderr = run_stage("06_serve.py", ["--model_path", str(micro_checkpoint), "--mode", "batch",
                                                "--prompts_file", str(prompts), "--output_file",
                                                str(tmp_path / "out.json")])
    assert code == 2
    assert f"{prompts}, item 1" in stderr and "temprature" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "out.json").exists()


def test_public_bind_needs_an_api_key(monkeypatch):
    from utils.server import API_KEY_ENV, api_key_for

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert api_key_for("127.0.0.1", None) is None and api_key_for("localhost", "k") == "k"
    with pytest.raises(ValueError, match=r"--host 0\.0\.0\.0 .*--api_key \(or SERVE_API_KEY\)"):
        api_key_for("0.0.0.0", None)
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key_for("0.0.0.0", None) == "from-env"
