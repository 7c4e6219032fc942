#!/usr/bin/env python
"""Live resource view while a stage runs: GPU (via nvidia-smi) or CPU and memory, plus the newest
`metrics.jsonl` row of any run under checkpoints/. Ctrl-C to stop."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

GPU_QUERY = "name,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw"


def gpu_lines() -> list[str]:
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv,noheader"], capture_output=True, text=True,
        timeout=10,
    )
    return [f"GPU {i}: {line}" for i, line in enumerate(out.stdout.strip().splitlines())] or [out.stderr.strip()]


def cpu_lines() -> list[str]:
    memory = psutil.virtual_memory()
    per_cpu = psutil.cpu_percent(percpu=True)
    return [
        f"CPU  {sum(per_cpu) / len(per_cpu):5.1f} %  (per core: {', '.join(f'{c:.0f}' for c in per_cpu)})",
        f"RAM  {memory.used / 2**30:5.1f} / {memory.total / 2**30:.1f} GiB ({memory.percent:.0f} %)",
    ]


def newest_metrics(root: Path) -> str | None:
    files = sorted(root.rglob("metrics.jsonl"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not files:
        return None
    lines = files[-1].read_text(encoding="utf-8").strip().splitlines()
    if not lines:
        return None
    row = json.loads(lines[-1])
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "time"}
    return f"{files[-1]}: {shown}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    parser.add_argument("--count", type=int, default=0, help="stop after this many refreshes (0 = until Ctrl-C)")
    parser.add_argument("--root", default="checkpoints", help="where to look for metrics.jsonl")
    args = parser.parse_args()
    use_gpu = shutil.which("nvidia-smi") is not None
    psutil.cpu_percent(percpu=True)
    refreshes = 0
    try:
        while True:
            time.sleep(args.interval)
            lines = [time.strftime("%H:%M:%S")] + (gpu_lines() if use_gpu else cpu_lines())
            metrics = newest_metrics(Path(args.root))
            if metrics:
                lines.append(f"last metrics  {metrics}")
            print("\n".join(lines) + "\n", flush=True)
            refreshes += 1
            if args.count and refreshes >= args.count:
                return 0
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
