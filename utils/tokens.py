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

from utils.cli import SUMMARY
from utils.files import CHECKSUMS, read_json

META = "meta.json"
TOKENIZER_DIR = "tokenizer"


class DataFormatError(ValueError):
    pass


def _owned_files(output_dir: Path) -> set[str]:
    """The files an earlier run of this stage wrote there: those its meta.json lists, and the ones beside it."""
    try:
        listed = json.loads((output_dir / META).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return set(listed) | {META, CHECKSUMS, SUMMARY}


def check_replaceable(output_dir: Path, inputs: list[str], overwrite: bool) -> list[str]:
    """The names a data run with --overwrite will replace; refuses every output path where replacing the
    directory as a whole (it is written as one, atomically) would lose what another program put there."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--output_dir {output_dir} is a file, not a directory")
    for source in inputs:
        if Path(source).exists() and Path(source).resolve().is_relative_to(output_dir.resolve()):
            raise ValueError(f"input {source} lies inside --output_dir {output_dir}, which this stage replaces "
                             "as a whole; choose another --output_dir")
    existing = sorted(output_dir.iterdir()) if output_dir.is_dir() else []
    if not existing:
        return []
    if not overwrite:
        raise FileExistsError(f"output dir {output_dir} exists; pass --overwrite to replace it")
    owned = _owned_files(output_dir)
    foreign = [str(p.relative_to(output_dir)) for p in sorted(output_dir.rglob("*"))
               if p.is_file() and str(p.relative_to(output_dir)) not in owned]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"--overwrite replaces {output_dir} as a whole, but it holds files this stage did "
                              f"not write ({shown}); move them out or choose another --output_dir")
    return [p.name + ("/" if p.is_dir() else "") for p in existing]


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
    meta = read_json(path, "data description")
    if not isinstance(meta, dict):
        raise DataFormatError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


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
