"""The API server as users run it: a real `06_serve.py --mode api` uvicorn process on a loopback port.

Two servers start once for the module (in parallel): an open one, and one that requires an API key.
Expected outputs are computed in this process with the same checkpoint and `utils.generation`, so every
check compares real text, not just shapes. The few tests that must reach into the scheduler (to slow it
down, break it, or read its counters at once) run the app in this process instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from utils.decoding import BatchDecoder, GenerationSettings, SequenceState
from utils.generation import encode_prompt, generate
from utils.loading import load_for_inference
from utils.scheduler import Scheduler
from utils.server import ServerSettings, Service, create_app

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-123"
SERVED = "micro"  # the open server's --served_model_name; the keyed one serves the default name
PAGE_ORIGIN = "http://page.example:3000"  # the keyed server's --cors_origins
CAP = 48
BODY_LIMIT = 20_000
REQUEST_TIMEOUT = 1.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "scripts/06_serve.py", "--model_path", str(checkpoint), "--mode", "api",
           "--port", str(port), "--max_new_tokens_cap", str(CAP), "--max_body_bytes", str(BODY_LIMIT),
           "--max_batch_size", "4", "--device", "cpu", *extra]
    env = {**os.environ, "SERVE_API_KEY": ""}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server at {url} not healthy after {timeout} s")


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM, as a process manager stops the server; all at once, then a kill for any that hangs."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def servers(micro_checkpoint):
    limits = ("--request_timeout", str(REQUEST_TIMEOUT), "--max_connections", "64", "--timeout_keep_alive", "5")
    procs = {"open": start_server(micro_checkpoint, *limits, "--served_model_name", SERVED),
             "keyed": start_server(micro_checkpoint, "--api_key", API_KEY, "--cors_origins", PAGE_ORIGIN)}
    try:
        for proc, url in procs.values():
            wait_healthy(proc, url)
        yield {name: url for name, (_, url) in procs.items()}
    finally:
        stop([proc for proc, _ in procs.values()])


@pytest.fixture(scope="module")
def server(servers) -> str:
    return servers["open"]


@pytest.fixture(scope="module")
def local(micro_checkpoint):
    return load_for_inference(micro_checkpoint, "cpu")


def expected_text(local, prompt, template=None, **settings) -> str:
    return generate(local.model, local.tokenizer, prompt, GenerationSettings(**settings), template).text


def sse_payloads(response: httpx.Response) -> list:
    """Parses a server-sent-event body strictly: every event is one `data:` line, the last is [DONE]."""
    events = [e for e in response.text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events[:3]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def test_readme_curl_against_real_server(server, local):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    body = '{"prompt": "What is machine learning?", "max_new_tokens": 20, "temperature": 0, "template": "chatml"}'
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "60", "-X", "POST", f"{server}/generate", "-H", "Content-Type: application/json",
         "-d", body], capture_output=True, text=True, timeout=90, check=True,
    )
    data = json.loads(out.stdout)
    assert set(data) >= {"text", "tokens", "finish_reason", "timings", "prompt_tokens"}
    assert data["text"] == expected_text(local, "What is machine learning?", "chatml", max_new_tokens=20)
    assert 1 <= data["tokens"] <= 20 and data["finish_reason"] in ("stop", "length")
    assert data["timings"]["total_seconds"] >= data["timings"]["time_to_first_token_seconds"] > 0


def test_health_models_docs_and_page(server):
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["model"]
    models = httpx.get(f"{server}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == health["model"]
    assert httpx.get(f"{server}/docs").status_code == 200
    schema = httpx.get(f"{server}/openapi.json").json()
    assert {"/generate", "/v1/chat/completions", "/v1/completions"} <= set(schema["paths"])
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "://" not in page.text and " src=" not in page.text  # self-contained: no CDN, no external files


def test_generate_stream_sse_matches_non_stream(server, local):
    request = {"prompt": "Lists and tuples", "max_new_tokens": 30, "temperature": 0.8, "seed": 4, "top_k": 40}
    whole = httpx.post(f"{server}/generate", json=request, timeout=60).json()
    with httpx.stream("POST", f"{server}/generate", json={**request, "stream": True}, timeout=60) as response:
        response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(response)
    assert "".join(e["delta"] for e in events) == whole["text"]
    assert events[-1]["finish_reason"] == whole["finish_reason"] and events[-1]["text"] == whole["text"]
    assert len(events) > 2
    settings = {k: request[k] for k in ("max_new_tokens", "temperature", "seed", "top_k")}
    assert whole["text"] == expected_text(local, "Lists and tuples", **settings)


def test_openai_client_chat_and_completions(server, local):
    from openai import OpenAI

    # Closed at the end, so no idle keep-alive connection delays the server's shutdown.
    with OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=60, max_retries=0) as client:
        check_openai_routes(client, server, local)


def check_openai_routes(client, server: str, local) -> None:
    assert [m.id for m in client.models.list().data] == [httpx.get(f"{server}/health").json()["model"]]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    chat = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=25, temperature=0)
    want = expected_text(local, messages, max_new_tokens=25)
    assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 25 and chat.choices[0].finish_reason in ("stop", "length")

    stream = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=25, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    completion = client.completions.create(model=SERVED, prompt="The for statement", max_tokens=15, temperature=0)
    assert completion.choices[0].text == expected_text(local, "The for statement", max_new_tokens=15)
    streamed = client.completions.create(model=SERVED, prompt="The for statement", max_tokens=15, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text


@pytest.mark.parametrize("path, body, field", [
    ("/generate", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/generate", {"max_new_tokens": 5}, "prompt"),
    ("/generate", {"prompt": "x", "max_new_token": 5}, "max_new_token"),
    ("/generate", {"prompt": "x", "template": "alpaca"}, "template"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
])
def test_validation_errors_are_400_naming_the_field(server, path, body, field):
    response = httpx.post(f"{server}{path}", json=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_limits_context_window_cap_and_body_size(server):
    long_prompt = "word " * 150
    response = httpx.post(f"{server}/generate", json={"prompt": long_prompt, "max_new_tokens": 10}, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "context_length_exceeded")
    assert "+ max_new_tokens (10)" in error["message"] and "context window of 128 tokens" in error["message"]

    capped = httpx.post(f"{server}/generate", json={"prompt": "Hi", "max_new_tokens": 100, "temperature": 0},
                        timeout=60).json()
    assert capped["tokens"] <= CAP and (capped["finish_reason"] == "stop" or capped["tokens"] == CAP)

    huge = {"prompt": "x" * (BODY_LIMIT + 10)}
    assert httpx.post(f"{server}/generate", json=huge, timeout=30).status_code == 413
    chunked = httpx.post(f"{server}/generate", content=iter([json.dumps(huge).encode()]), timeout=30,
                         headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and "limit" in chunked.json()["error"]["message"]


def test_concurrent_clients_all_get_their_own_correct_answer(server, local):
    """8 clients at once (batch size 4: some queue), mixed streaming/non-streaming, greedy and seeded."""
    jobs = []
    for i in range(8):
        prompt = f"Example {i}: the {['list', 'dict', 'set', 'tuple'][i % 4]} type"
        settings = {"max_new_tokens": 12 + 3 * i, "temperature": 0.0 if i % 2 else 0.9, "seed": i}
        jobs.append((prompt, settings, i % 3 == 0))
    results: dict[int, str] = {}

    def client(index: int) -> None:
        prompt, settings, stream = jobs[index]
        body = {"prompt": prompt, **settings, "stream": stream}
        with httpx.Client(timeout=120) as http:
            if stream:
                with http.stream("POST", f"{server}/generate", json=body) as response:
                    response.read()
                results[index] = "".join(e["delta"] for e in sse_payloads(response))
            else:
                results[index] = http.post(f"{server}/generate", json=body).json()["text"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert sorted(results) == list(range(len(jobs)))
    for i, (prompt, settings, _) in enumerate(jobs):
        assert results[i] == expected_text(local, prompt, **settings), f"client {i}"
    assert httpx.get(f"{server}/health").json()["active"] == 0


def test_api_key_required_on_every_route_but_health(servers):
    keyed = servers["keyed"]
    assert httpx.get(f"{keyed}/health").status_code == 200
    for method, path in [("GET", "/v1/models"), ("POST", "/generate"), ("POST", "/v1/chat/completions"),
                         ("GET", "/docs"), ("GET", "/openapi.json")]:
        response = httpx.request(method, f"{keyed}{path}", json={"prompt": "x"}, timeout=30)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        wrong = httpx.request(method, f"{keyed}{path}", json={"prompt": "x"}, timeout=30,
                              headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401, path
    ok = httpx.post(f"{keyed}/generate", json={"prompt": "x", "max_new_tokens": 3}, timeout=30,
                    headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and ok.json()["tokens"] <= 3

    from openai import AuthenticationError, OpenAI

    with OpenAI(base_url=f"{keyed}/v1", api_key="wrong", max_retries=0, timeout=30) as client:
        with pytest.raises(AuthenticationError):
            client.models.list()
    with OpenAI(base_url=f"{keyed}/v1", api_key=API_KEY, max_retries=0, timeout=30) as client:
        assert client.models.list().data


# --------------------------------------------------------------------------- robustness: bad input, hang-ups, failures

CHAT = '"messages": [{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize("path, raw, status, param", [
    ("/generate", f'{{"prompt": "x", "seed": {2**70}}}', 400, "seed"),
    ("/generate", f'{{"prompt": "x", "temperature": 1, "seed": {-2**70}}}', 400, "seed"),
    ("/v1/chat/completions", f'{{{CHAT}, "seed": {2**70}}}', 400, "seed"),
    ("/generate", '{"prompt": "x\\ud800y"}', 400, "prompt"),
    ("/v1/completions", '{"prompt": ["\\ud800"]}', 400, "prompt"),
    ("/v1/chat/completions",
     '{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "text", '
     '"text": "\\ud800"}]}]}', 400, "messages.1.content"),
    ("/generate", '{"prompt": "x", "temperature": 1, "repetition_penalty": 5e-324}', 400, "repetition_penalty"),
    ("/generate", '{"prompt": "x", "stop": ""}', 400, "stop.0"),
    ("/v1/chat/completions", f'{{{CHAT}, "stop": ["a", ""]}}', 400, "stop.1"),
    ("/v1/completions", '{"prompt": []}', 400, "prompt"),
    ("/v1/completions", '{"prompt": ["a", []]}', 400, "prompt"),
    ("/v1/completions", '{"prompt": [1, true]}', 400, "prompt"),
    ("/generate", '{"prompt": "x", "stream": 0}', 400, "stream"),
    ("/v1/chat/completions", f'{{{CHAT}, "stream": 1}}', 400, "stream"),
    ("/v1/chat/completions", f'{{{CHAT}, "top_k": false}}', 400, "top_k"),
    ("/generate", '{"prompt": "x", "max_new_tokens": true}', 400, "max_new_tokens"),
    ("/generate", '{"prompt": "x",', 400, None),
    ("/generate", '[{"prompt": "x"}]', 400, None),
    ("/v1/chat/completions", '"hi"', 400, None),
    ("/v1/completions", '', 400, None),
])
def test_bad_requests_get_openai_errors_naming_the_param(server, path, raw, status, param):
    """Never a 500 for what a client sent: a raw body (lone surrogates stay JSON escapes) gets a 4xx error object."""
    response = httpx.post(f"{server}{path}", content=raw.encode(), headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and (param is None or param in error["message"])


def test_schema_states_the_limits_and_cold_sampling_is_greedy(server, local):
    schemas = httpx.get(f"{server}/openapi.json").json()["components"]["schemas"]
    fields, completion = schemas["GenerateRequest"]["properties"], schemas["CompletionRequest"]["properties"]
    seed = next(s for s in fields["seed"]["anyOf"] if s["type"] == "integer")
    assert seed["minimum"] == -(2**63) and seed["maximum"] == pytest.approx(2**63 - 1)  # FastAPI writes floats
    assert {"minLength": 1, "type": "string"} in fields["stop"]["anyOf"]
    prompt_forms = [s.get("items", s) for s in completion["prompt"]["anyOf"]]
    assert {"type": "string"} in prompt_forms and {"type": "integer"} in prompt_forms  # text and token ids
    assert "1e-05" in fields["temperature"]["description"]
    # 5e-324 would overflow the logits to NaN: below the documented threshold sampling is greedy.
    body = {"prompt": "Lists and tuples", "max_new_tokens": 12, "temperature": 5e-324}
    response = httpx.post(f"{server}/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["text"] == expected_text(local, "Lists and tuples", max_new_tokens=12)


def test_unexpected_failures_are_openai_shaped_json(local, monkeypatch):
    def broken(*_) -> list[int]:
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(Service, "encode", broken)
    with TestClient(create_app(local, ServerSettings(model_id="micro")), raise_server_exceptions=False) as client:
        failed = client.post("/generate", json={"prompt": "x"})
        missing = client.get("/no/such/route")
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found"


@contextmanager
def in_process(app: FastAPI) -> Iterator[int]:
    """`app` served by uvicorn on a thread of this process (its port), so a test can watch its scheduler."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive())
        assert server.started, "the in-process server did not start"
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition never held")
        time.sleep(0.005)


def test_non_streaming_request_is_cancelled_when_its_client_hangs_up(local, monkeypatch):
    original = BatchDecoder.step

    def slow_step(self: BatchDecoder) -> None:  # a model this small finishes before a client can hang up
        time.sleep(0.01)
        original(self)

    monkeypatch.setattr(BatchDecoder, "step", slow_step)
    app = create_app(local, ServerSettings(model_id="micro", max_new_tokens_cap=100))
    scheduler = app.state.service.scheduler
    body = json.dumps({"prompt": "Hello", "max_new_tokens": 100, "temperature": 0}).encode()
    with in_process(app) as port:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: scheduler.stats()["active"] == 1)
        wait_until(lambda: scheduler.stats()["cancelled"] == 1)
        assert scheduler.stats()["generated_tokens"] < 50
        after = httpx.post(f"http://127.0.0.1:{port}/generate", json={"prompt": "x", "max_new_tokens": 2}, timeout=30)
        assert after.status_code == 200


def test_slow_body_gets_408_and_others_are_still_served(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n" + b'{"prompt":')
        started = time.monotonic()
        assert httpx.get(f"{server}/health", timeout=5).status_code == 200
        sock.settimeout(REQUEST_TIMEOUT + 5)
        reply = b""
        while chunk := sock.recv(1 << 16):  # until the server closes the connection
            reply += chunk
        waited = time.monotonic() - started
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and waited < REQUEST_TIMEOUT + 2, (head, waited)
    assert json.loads(payload)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("where", ["sampling", "forward"])
def test_a_failing_sequence_fails_alone_and_its_batch_goes_on(local, monkeypatch, where):
    prompts = ["Lists and tuples", "BOOM: this one breaks", "The for statement", "What is a dict?"]
    bad = encode_prompt(local.tokenizer, prompts[1])

    def breaks(seq: SequenceState) -> bool:  # a few tokens in, so the failure lands mid-batch
        return seq.prompt_ids == bad and len(seq.generated) >= 3

    if where == "sampling":  # one row of the batch fails (e.g. NaN probabilities)
        accept = SequenceState.accept

        def failing_accept(self: SequenceState, logits: torch.Tensor) -> int | None:
            if breaks(self):
                raise RuntimeError("injected failure")
            return accept(self, logits)

        monkeypatch.setattr(SequenceState, "accept", failing_accept)
    else:  # the batched forward step fails while the bad sequence is in it
        step = BatchDecoder.step

        def failing_step(self: BatchDecoder) -> None:
            if any(breaks(s) for s in self.sequences):
                raise RuntimeError("injected failure")
            step(self)

        monkeypatch.setattr(BatchDecoder, "step", failing_step)
    scheduler = Scheduler(local, max_batch_size=4, max_queue=8)
    settings = GenerationSettings(max_new_tokens=30)
    events = {p: queue.Queue() for p in prompts}
    for prompt in prompts:  # all queued before the thread starts: they share one batch
        ids = encode_prompt(local.tokenizer, prompt)
        scheduler.submit(scheduler.decoder.new_sequence(ids, settings, events[prompt].put))
    scheduler.start()
    try:
        finals = {}
        for prompt in prompts:
            while (event := events[prompt].get(timeout=60)).result is None and event.error is None:
                pass
            finals[prompt] = event
    finally:
        scheduler.stop()  # joins the thread, so its counters are final
    stats = scheduler.stats()
    assert "injected failure" in finals[prompts[1]].error
    for prompt in (prompts[0], prompts[2], prompts[3]):
        assert finals[prompt].error is None
        assert finals[prompt].result.text == expected_text(local, prompt, max_new_tokens=30), prompt
    assert (stats["failed"], stats["completed"], stats["active"]) == (1, 3, 0)


def test_served_model_name_flag_and_default(servers, micro_checkpoint):
    assert httpx.get(f"{servers['open']}/v1/models/{SERVED}").json()["id"] == SERVED
    keyed = httpx.get(f"{servers['keyed']}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert keyed["data"][0]["id"] == micro_checkpoint.name  # outside checkpoints/: the directory's name
    other = httpx.post(f"{servers['open']}/v1/completions", json={"model": "gpt-4", "prompt": "x"}, timeout=30)
    assert other.status_code == 404 and other.json()["error"]["message"] == "The model `gpt-4` does not exist."


def test_cors_preflight_passes_the_key_check_only_with_the_flag(servers):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{servers['keyed']}/v1/chat/completions", headers={"Origin": PAGE_ORIGIN, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == PAGE_ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    stranger = httpx.options(f"{servers['keyed']}/v1/chat/completions",
                             headers={"Origin": "http://evil.example", **preflight})
    assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers
    # The page can read why a keyless call was refused; the key is still required.
    refused = httpx.get(f"{servers['keyed']}/v1/models", headers={"Origin": PAGE_ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == PAGE_ORIGIN
    # Without --cors_origins: no CORS headers, and a preflight is just an OPTIONS request.
    plain = httpx.options(f"{servers['open']}/v1/chat/completions", headers={"Origin": PAGE_ORIGIN, **preflight})
    assert plain.status_code == 405 and not any(h.startswith("access-control-") for h in plain.headers)


def test_models_and_health_give_the_context_the_page_fits_to(server):
    card = httpx.get(f"{server}/v1/models").json()["data"][0]
    assert (card["context_length"], card["max_tokens_cap"]) == (128, CAP)
    assert httpx.get(f"{server}/health").json()["context_length"] == 128


# --------------------------------------------------------------------------- the chat page in Chromium


class DevTools:
    """Drives headless Chromium over the DevTools protocol on a pipe (fds 3/4): no websocket client needed."""

    def __init__(self, executable: str, profile: str):
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4; copies above 10 cannot collide with those.
        high_r, high_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w))

        def wire_fds() -> None:
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen([executable, *flags], preexec_fn=wire_fds, pass_fds=(3, 4),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (to_chrome_r, from_chrome_w, high_r, high_w):
            os.close(fd)
        self.next_id = 0
        self.buffer = b""

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.from_chrome], [], [], remaining)[0]:
                raise TimeoutError(f"no DevTools reply to {method}")
            chunk = os.read(self.from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk

    def evaluate(self, session: str, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.to_chrome)
        os.close(self.from_chrome)


def chromium_executable() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


def wait_for(devtools: DevTools, session: str, expression: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = devtools.evaluate(session, expression)
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"page never satisfied: {expression}")


STATE = ("JSON.stringify({state: document.getElementById('status').dataset.state, "
         "chunks: +document.getElementById('status').dataset.chunks, "
         "replies: [...document.querySelectorAll('.assistant')].map(e => e.textContent)})")


def test_chat_page_streams_replies_in_headless_chromium(servers, local):
    executable = chromium_executable()
    if executable is None:
        pytest.skip("headless-browser test needs Debian's `chromium` package (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        devtools = DevTools(executable, profile)
        try:
            # The keyed server: the page must also carry the API key on its calls.
            target = devtools.call("Target.createTarget", {"url": f"{servers['keyed']}/"})["targetId"]
            session = devtools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            wait_for(devtools, session, "document.readyState === 'complete' && "
                                        "document.getElementById('key_label')?.hidden === false")
            devtools.evaluate(session, f"""(() => {{
                const key = document.getElementById('api_key');
                key.value = {json.dumps(API_KEY)}; key.dispatchEvent(new Event('change'));
                document.getElementById('temperature').value = '0';
                document.getElementById('max_tokens').value = '24';
            }})()""")
            model = httpx.get(f"{servers['keyed']}/health").json()["model"]
            wait_for(devtools, session, f"document.getElementById('model').textContent === {json.dumps(model)}")
            history = []
            for turn, text in enumerate(["Hello there", "And then?"]):
                devtools.evaluate(session, f"""(() => {{
                    document.getElementById('input').value = {json.dumps(text)};
                    document.getElementById('form').requestSubmit();
                }})()""")
                wait_for(devtools, session, f"document.querySelectorAll('.assistant').length === {turn + 1}")
                done = f"(() => {{ const s = {STATE}; return JSON.parse(s).state === 'done' ? s : null; }})()"
                state = json.loads(wait_for(devtools, session, done))
                history.append({"role": "user", "content": text})
                want = expected_text(local, history, max_new_tokens=24)
                assert state["replies"][turn] == want
                assert state["chunks"] > 1  # the reply arrived as a stream of pieces
                history.append({"role": "assistant", "content": want})
            # What the page sends fits the context: the oldest turns go first, then max_tokens shrinks.
            fitted = devtools.evaluate(session, """(() => {
                const history = [];
                for (let i = 0; i < 6; i++) history.push({role: "user", content: "u".repeat(40)},
                                                         {role: "assistant", content: "a".repeat(40)});
                const limits = {contextLength: 128, maxTokensCap: 48, bytesPerToken: 2};
                const kept = fitRequest("", history, "hi", 150, limits);
                const alone = fitRequest("", [], "x".repeat(200), 150, limits);
                return {sent: kept.messages.length, dropped: kept.dropped, max: kept.maxTokens,
                        last: kept.messages.at(-1).content, total: estimateTokens(kept.messages, 2) + kept.maxTokens,
                        alone: alone.maxTokens};
            })()""")
            assert fitted == {"sent": 3, "dropped": 5, "max": 48, "last": "hi", "total": 121, "alone": 12}
            # A message too long for the context even alone: the page shows the server's own message.
            devtools.evaluate(session, """(() => {
                document.getElementById('input').value = 'word '.repeat(150);
                document.getElementById('form').requestSubmit();
            })()""")
            shown = wait_for(devtools, session, "document.getElementById('status').dataset.state === 'error' && "
                                                "document.querySelectorAll('.assistant')[2].textContent")
            assert "exceeds the model's context window of 128 tokens" in shown
        finally:
            devtools.close()
