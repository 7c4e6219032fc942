"""Reading the files a stage is given, with one error path: a file that cannot be read is named, with why.

Every stage reads user files (data, presets, checkpoints, results) through these helpers or inside
`reading(path)`, so a truncated download, a non-UTF-8 file or a half-written JSON file ends the stage with
`error: cannot read <file>: <cause>` instead of a traceback or a decoder message that names no file.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class UnreadableFileError(ValueError):
    pass


# Exceptions that mean "these bytes are not what the file should hold", whoever raised them.
_FORMAT_ERRORS = (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError, zlib.error)
_FORMAT_ERROR_MODULES = ("pyarrow", "safetensors")
NEWLINE = b"\n"


def is_format_error(err: BaseException) -> bool:
    return isinstance(err, _FORMAT_ERRORS) or type(err).__module__.split(".")[0] in _FORMAT_ERROR_MODULES


def describe_cause(err: BaseException, data: bytes | None = None) -> str:
    """The cause in words; with the file's bytes, a decoding error also gets its line."""
    if isinstance(err, UnicodeDecodeError):
        where = f"line {data.count(NEWLINE, 0, err.start) + 1}, " if data is not None else ""
        return f"not UTF-8 text ({where}byte {err.start}: 0x{err.object[err.start]:02x})"
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
    if isinstance(err, (EOFError, zlib.error, gzip.BadGzipFile)):
        return f"truncated or corrupt gzip data ({err})"
    if isinstance(err, FileNotFoundError):
        return "it does not exist"
    if isinstance(err, IsADirectoryError):
        return "it is a directory, not a file"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    module = type(err).__module__.split(".")[0]
    kind = {"pyarrow": "not a readable Parquet file", "safetensors": "truncated or corrupt safetensors file"}
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{kind[module]} ({first_line})" if module in kind else first_line


def unreadable(path: str | Path, err: BaseException, what: str = "", data: bytes | None = None) -> UnreadableFileError:
    label = f"{what} {path}" if what else str(path)
    return UnreadableFileError(f"cannot read {label}: {describe_cause(err, data)}")


@contextlib.contextmanager
def reading(path: str | Path, what: str = "") -> Iterator[None]:
    """Turns a low-level failure while reading `path` into one error naming it; the stage's own errors pass."""
    try:
        yield
    except UnreadableFileError:
        raise
    except Exception as err:
        if not is_format_error(err):
            raise
        raise unreadable(path, err, what) from None


def read_bytes(path: str | Path, what: str = "") -> bytes:
    """The file's bytes; a .gz file is decompressed."""
    path = Path(path)
    with reading(path, what):
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()


def decode_text(data: bytes, path: str | Path, what: str = "") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise unreadable(path, err, what, data) from None


def read_text(path: str | Path, what: str = "") -> str:
    """UTF-8 text of a file (.gz decompressed); a decoding error names the file and the line."""
    return decode_text(read_bytes(path, what), path, what)


def read_json(path: str | Path, what: str = "") -> Any:
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise unreadable(path, err, what) from None
