#!/usr/bin/env python
"""Prints the environment the pipeline runs in: Python, torch and CUDA, the GPU, and every library version."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys

PACKAGES = ["torch", "transformers", "accelerate", "peft", "trl", "datasets", "tokenizers", "sentencepiece",
            "datasketch", "fastapi", "uvicorn", "flash-attn", "wandb"]


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "gpus": [],
        "packages": {name: version(name) for name in PACKAGES},
    }
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        info["gpus"].append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                             "capability": f"{props.major}.{props.minor}",
                             "bf16": torch.cuda.is_bf16_supported()})
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"python        {info['python']} on {info['platform']} ({info['cpu_count']} CPUs)")
    cuda = f"yes (CUDA {info['cuda_version']})" if info["cuda_available"] else "no (CPU only: fp32 training)"
    print(f"CUDA          {cuda}")
    for gpu in info["gpus"]:
        print(f"GPU           {gpu['name']}, {gpu['memory_gib']} GiB, compute {gpu['capability']}, bf16={gpu['bf16']}")
    for name, found in info["packages"].items():
        shown = found or ("not installed (optional: make install-gpu)" if name in ("flash-attn", "wandb")
                          else "MISSING")
        print(f"{name:<13} {shown}")
    missing = [n for n, v in info["packages"].items() if v is None and n not in ("flash-attn", "wandb")]
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
