"""The processed-data format: flat token files (`train.bin`, `val.bin`) described by `meta.json`.

Documents are concatenated, each followed by EOS; ids are uint16 when the vocabulary fits, else uint32.
`meta.json` is written last, after the .bin files are complete and renamed into place, so a `meta.json`
always describes complete files (and names their sha256).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

META = "meta.json"
TOKENIZER_DIR = "tokenizer"


class DataFormatError(ValueError):
    pass


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class TokenFileWriter:
    """Streams token arrays into `<name>.bin` through a temporary file; `close()` renames it into place."""

    def __init__(self, path: str | Path, dtype: np.dtype):
        self.path = Path(path)
        self.dtype = dtype
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.handle = open(self.tmp, "wb")
        self.tokens = 0
        self.documents = 0

    def write_documents(self, ids: list[int] | np.ndarray, documents: int = 1) -> None:
        """Appends the ids of `documents` whole documents (each already ending in EOS)."""
        array = np.asarray(ids, dtype=self.dtype)
        self.handle.write(array.tobytes())
        self.tokens += len(array)
        self.documents += documents

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir, META)
    if not path.is_file():
        raise DataFormatError(
            f"{data_dir} is not a processed data directory: {META} is missing "
            "(run scripts/01_prepare_data.py, or `make prepare`, first)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def open_tokens(data_dir: str | Path, split: str) -> np.memmap:
    """Memory-maps `<split>.bin` with the dtype and length recorded in `meta.json`."""
    meta = read_meta(data_dir)
    path = Path(data_dir, f"{split}.bin")
    dtype = np.dtype(meta["dtype"])
    expected = meta[f"{split}_tokens"]
    if not path.is_file():
        raise DataFormatError(f"{path} is missing although {META} lists it")
    actual = path.stat().st_size // dtype.itemsize
    if actual != expected:
        raise DataFormatError(f"{path} holds {actual} tokens but {META} says {expected}: the file is incomplete")
    return np.memmap(path, dtype=dtype, mode="r", shape=(expected,))
