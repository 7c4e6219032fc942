#!/usr/bin/env python
"""Exports a pretrain or merged checkpoint as one GGUF file (llama.cpp, Ollama, LM Studio) plus an Ollama Modelfile.

The tensors, hyper-parameters, SentencePiece vocabulary and (for fine-tuned checkpoints) the chat template go
into the file under llama.cpp's names, through the `gguf` package; see utils/gguf_export.py for what follows
llama.cpp's own converter. `<output stem>.Modelfile` beside it: `ollama create NAME -f <that file>`.
"""

from __future__ import annotations

import argparse

from utils.cli import run_main
from utils.gguf_export import OUTTYPES, export_gguf


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", required=True,
                        help="a pretrain checkpoint or a fine-tuning stage's merged/ (or a stage dir with `latest`); "
                             "a LoRA adapter is refused: export the merged/ next to it")
    parser.add_argument("--output", required=True, help="the .gguf file to write (replaced if it exists)")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f16",
                        help="weight type of the matrices: f32 (exact), f16 (the default), q8_0 (8-bit blocks of "
                             "32; a matrix whose rows do not split into blocks stays f16); norms stay f32")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    result = export_gguf(args.model_path, args.output, args.outtype)
    print(f"wrote {result.path} ({result.size_bytes / 2**20:.1f} MiB, arch {result.architecture}, {result.outtype}, "
          f"{result.tensors} tensors, chat template {result.template or 'none: plain completion'})")
    print(f"wrote {result.modelfile}: ollama create <name> -f {result.modelfile}")
    return 0


if __name__ == "__main__":
    run_main(main)
