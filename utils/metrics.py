"""Machine-readable logs (`metrics.jsonl`), throughput, MFU and memory figures shared by every stage."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import psutil
import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, without sparsity.
GPU_BF16_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165.2e12,
    "RTX 3090": 71e12,
    "L4": 121e12,
}
# Matmul peaks of the 2-core development CPUs, measured with 2 threads: fp32 160-170 GFLOP/s on the first; bf16
# 840-940 GFLOP/s on an AMD EPYC with AVX-512 BF16 (fp32 210-215 there). Override with CPU_PEAK_FLOPS and
# CPU_BF16_PEAK_FLOPS for another machine.
CPU_FP32_PEAK_FLOPS = 165e9
CPU_BF16_PEAK_FLOPS = 900e9


def peak_flops(device: torch.device, precision: str = "no") -> float | None:
    """Peak FLOP/s that MFU is measured against: the GPU's bf16 peak, or the CPU's measured peak for the
    precision it trains in (bf16 autocast, or fp32)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_BF16_PEAK_FLOPS.items():
            if key in name:
                return flops
        return None
    if precision == "bf16":
        return float(os.environ.get("CPU_BF16_PEAK_FLOPS", CPU_BF16_PEAK_FLOPS))
    return float(os.environ.get("CPU_PEAK_FLOPS", CPU_FP32_PEAK_FLOPS))


def training_flops_per_token(matmul_params: int, n_layer: int, d_model: int, seq_len: int) -> float:
    """6·N for the weight matmuls (forward + backward) plus causal attention scores (PaLM, appendix B)."""
    return 6 * matmul_params + 6 * n_layer * d_model * seq_len


def mfu(tokens_per_second: float, flops_per_token: float, device: torch.device,
        precision: str = "no") -> float | None:
    peak = peak_flops(device, precision)
    return tokens_per_second * flops_per_token / peak if peak else None


def memory_mb(device: torch.device) -> float:
    """GPU memory allocated at peak, or this process's resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


class MetricsLogger:
    """Appends one JSON object per line to `metrics.jsonl`, flushed at once so a crash loses nothing."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, default=float) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics log. An unfinished last line (a writer killed mid-line, or one still writing) is
    left out; any other line that is not JSON is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{path}, line {number}: not a JSON record ({err.msg}, column {err.colno})") from None
    return rows


def has_torn_tail(path: str | Path) -> bool:
    """Whether the log ends in the middle of a line (its writer died mid-write)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"
