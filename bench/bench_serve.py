#!/usr/bin/env python
"""Benchmark of stage 06 (serving) for the tiny preset on this machine.

1. Batch-1 greedy decode tokens/s and time to first token of `utils.generation.generate` against plain
   `model.generate()` with the same settings, alternated round by round in one process. Both are timed
   the same way: first token to last token (transformers' side through a streamer's timestamps).
2. The API under 1, 4 and 8 concurrent streaming clients (`/v1/completions`, loopback only, a bounded
   number of requests): aggregate generated tokens/s and time to first token per request.

Model: `checkpoints/pretrain/tiny/final` when it exists, else an untrained tiny-preset model (the speed
does not depend on the weights) with a processed-data tokenizer of the preset's vocabulary, or one
trained here on the built-in corpus. Writes bench/results/serve_cpu.json (machine, config, numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from transformers.generation.streamers import BaseStreamer

from utils.config import load_preset
from utils.corpus import builtin_documents
from utils.decoding import GenerationSettings
from utils.files import atomic_write_json
from utils.generation import generate
from utils.loading import load_for_inference
from utils.model import build_model
from utils.tokenizer import load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]

PROMPT = "The Python language reference describes the syntax and core semantics of the language. It is terse,"
TARGET_DECODE_SPEEDUP = 1.2
TARGET_CONCURRENCY_GAIN = 2.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="config/tiny.json")
    parser.add_argument("--model_path", default="checkpoints/pretrain/tiny/final",
                        help="trained checkpoint to use when it exists")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens per batch-1 decode run")
    parser.add_argument("--rounds", type=int, default=7, help="alternated rounds of ours vs model.generate()")
    parser.add_argument("--clients", default="1,4,8", help="concurrent API clients to measure")
    parser.add_argument("--requests_per_client", type=int, default=3)
    parser.add_argument("--api_new_tokens", type=int, default=96, help="max_tokens per API request")
    parser.add_argument("--output", default="bench/results/serve_cpu.json")
    return parser.parse_args()


def tiny_checkpoint(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """A checkpoint directory of the tiny preset (the server process loads it from disk)."""
    if Path(args.model_path, "config.json").is_file():
        return Path(args.model_path), f"trained checkpoint {args.model_path}"
    preset = load_preset(args.preset)
    found = sorted(p.parent for p in ROOT.glob("data/processed/*/tokenizer/tokenizer.json"))
    usable = [p for p in found if len(load_tokenizer(p)) == preset.vocab_size]
    if usable:
        tokenizer, source = load_tokenizer(usable[0]), f"tokenizer {usable[0]}"
    else:
        tokenizer = train_tokenizer(builtin_documents(), preset.vocab_size, work / "tokenizer")
        source = "tokenizer trained on the built-in corpus"
    model = build_model(preset, tokenizer, seed=0)
    path = work / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, f"untrained {args.preset} model, {source}"


class TimingStreamer(BaseStreamer):
    """Timestamps of each token transformers' generate() emits (the first `put` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def decode_comparison(loaded, new_tokens: int, rounds: int) -> dict:
    model, tok = loaded.model, loaded.tokenizer
    ids = tok(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0)
    ours, theirs, ttft_ours, ttft_theirs, lengths = [], [], [], [], set()
    generate(model, tok, PROMPT, settings.replace(max_new_tokens=8))  # warm-up both paths
    model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    for _ in range(rounds):
        result = generate(model, tok, PROMPT, settings)
        lengths.add(len(result.tokens))
        ours.append(result.timings["decode_tokens_per_second"])
        ttft_ours.append(result.timings["time_to_first_token_seconds"])
        streamer = TimingStreamer()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=len(result.tokens), min_new_tokens=len(result.tokens),
                                 do_sample=False, pad_token_id=tok.pad_token_id, streamer=streamer)
        generated = out.shape[1] - ids.shape[1]
        first, last = streamer.times[1], streamer.times[-1]
        theirs.append((generated - 1) / (last - first))
        ttft_theirs.append(first - start)
    speedups = [a / b for a, b in zip(ours, theirs)]
    return {
        "prompt_tokens": ids.shape[1],
        "generated_tokens": sorted(lengths),
        "rounds": rounds,
        "ours_decode_tokens_per_second": round(statistics.median(ours), 1),
        "generate_decode_tokens_per_second": round(statistics.median(theirs), 1),
        "speedup_median": round(statistics.median(speedups), 3),
        "speedup_per_round": [round(s, 3) for s in speedups],
        "ours_time_to_first_token_ms": round(statistics.median(ttft_ours) * 1000, 2),
        "generate_time_to_first_token_ms": round(statistics.median(ttft_theirs) * 1000, 2),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: Path, max_batch_size: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "scripts/06_serve.py", "--mode", "api", "--model_path", str(checkpoint), "--port",
           str(port), "--max_batch_size", str(max_batch_size), "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the API server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("the API server did not come up within 180 s")


def one_request(http: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """Time to the first streamed text and the completion tokens of one streaming request."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first if first is not None else time.perf_counter() - start, tokens


def api_load(url: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    ttfts: list[float] = []
    tokens: list[int] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(timeout=300) as http:
            for r in range(requests_per_client):
                ttft, n = one_request(http, url, f"{PROMPT} (client {index}, request {r})", max_tokens)
                with lock:
                    ttfts.append(ttft)
                    tokens.append(n)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(tokens),
        "generated_tokens": sum(tokens),
        "wall_seconds": round(wall, 2),
        "aggregate_tokens_per_second": round(sum(tokens) / wall, 1),
        "time_to_first_token_ms_median": round(statistics.median(ttfts) * 1000, 1),
        "time_to_first_token_ms_max": round(max(ttfts) * 1000, 1),
    }


def main() -> None:
    args = parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, model_source = tiny_checkpoint(args, Path(tmp))
        loaded = load_for_inference(checkpoint, "cpu")
        print(f"model: {model_source}", flush=True)
        decode = decode_comparison(loaded, args.new_tokens, args.rounds)
        print(f"batch-1 decode: ours {decode['ours_decode_tokens_per_second']} tok/s, model.generate() "
              f"{decode['generate_decode_tokens_per_second']} tok/s, speedup {decode['speedup_median']}x", flush=True)
        del loaded
        proc, url = start_server(checkpoint, max_batch_size=max(clients))
        try:
            one_request(httpx.Client(timeout=300), url, PROMPT, 8)  # warm-up
            api = []
            for n in clients:
                api.append(api_load(url, n, args.requests_per_client, args.api_new_tokens))
                print(f"API, {n} streaming client(s): {api[-1]['aggregate_tokens_per_second']} tok/s aggregate, "
                      f"TTFT median {api[-1]['time_to_first_token_ms_median']} ms", flush=True)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    by_clients = {row["clients"]: row["aggregate_tokens_per_second"] for row in api}
    gain = by_clients[max(clients)] / by_clients[min(clients)] if min(clients) == 1 else None
    result = {
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {
            "model": model_source, "preset": args.preset, "dtype": "float32", "device": "cpu",
            "new_tokens": args.new_tokens, "rounds": args.rounds, "clients": clients,
            "requests_per_client": args.requests_per_client, "api_new_tokens": args.api_new_tokens,
            "server_max_batch_size": max(clients), "decoding": "greedy",
        },
        "batch1_decode": decode,
        "api": api,
        "targets": {
            "decode_speedup_vs_generate": {"target": TARGET_DECODE_SPEEDUP, "measured": decode["speedup_median"],
                                           "met": decode["speedup_median"] >= TARGET_DECODE_SPEEDUP},
            f"aggregate_{max(clients)}_clients_vs_1": {
                "target": TARGET_CONCURRENCY_GAIN, "measured": round(gain, 2) if gain else None,
                "met": bool(gain and gain >= TARGET_CONCURRENCY_GAIN)},
        },
    }
    output = ROOT / args.output
    atomic_write_json(output, result)
    print(f"{max(clients)} clients vs 1: {gain and round(gain, 2)}x aggregate throughput; wrote {output}")


if __name__ == "__main__":
    main()
