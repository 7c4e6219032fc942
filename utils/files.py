"""Reading and writing files: one error path for reading, atomic writes, checksums, and the repair of
what a killed writer left behind.

Every stage reads user files (data, presets, checkpoints, results) through these helpers or inside
`reading(path)`, so a truncated download, a non-UTF-8 file or a half-written JSON file ends the stage with
`error: cannot read <file>: <cause>` instead of a traceback or a decoder message that names no file.

Every file a stage writes goes through a temporary name in the same directory and a rename, so a reader
never sees half of it; a directory (a checkpoint, a processed data dir) is written whole under
`.tmp-<name>-<pid>`, gets `checksums.json` (sha256 of every file) last, and is then renamed into place.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

CHECKSUMS = "checksums.json"


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


def read_jsonl(path: str | Path, what: str = "") -> list[tuple[int, Any]]:
    """(line number, value) of every non-blank line; a bad line is named by file, line and column."""
    records = []
    for number, line in enumerate(read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            label = f"{what} {path}" if what else str(path)
            raise UnreadableFileError(f"cannot read {label}: invalid JSON at line {number}, column {err.colno}: "
                                      f"{err.msg}") from None
    return records


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes via a temporary file in the same directory and renames it, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_checksums(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {str(p.relative_to(directory)): sha256_file(p) for p in files}
    atomic_write_json(directory / CHECKSUMS, sums)


def checksum_problem(directory: str | Path) -> str | None:
    """Why `directory` is not a complete atomic write (a file missing or not matching `checksums.json`), or None."""
    directory = Path(directory)
    manifest = directory / CHECKSUMS
    if not manifest.is_file():
        return f"{directory} is not complete: {CHECKSUMS} is missing (partial or foreign write)"
    for name, expected in read_json(manifest, "checksum file").items():
        file = directory / name
        if not file.is_file():
            return f"{directory} is incomplete: {name} is missing"
        if sha256_file(file) != expected:
            return f"{directory} is corrupted: {name} does not match its sha256 in {CHECKSUMS}"
    return None


def _writer_gone(name: str) -> bool:
    """Whether the process whose PID ends a temporary's name is dead (so the file is debris, not in use).

    Our own PID counts as gone: this is called before the stage writes anything, so a match is an earlier
    process that had the same PID (a container restart reuses low PIDs)."""
    pid = name.rsplit("-", 1)[-1]
    return pid.isdigit() and (int(pid) == os.getpid() or not psutil.pid_exists(int(pid)))


def _is_complete(directory: Path) -> bool:
    try:
        return checksum_problem(directory) is None
    except (OSError, ValueError):
        return False


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def recover_interrupted_writes(directory: str | Path, only: str | None = None) -> list[str]:
    """Repairs what killed writers left in `directory`; returns one line per action, for the stage to print.

    A kill between atomic_directory's two renames leaves `.old-<name>-PID` (the previous copy) and
    `.tmp-<name>-PID` with no `<name>`: the swap is finished when the new copy is complete (every checksum
    matches), else rolled back. Temporaries of dead writers are removed. `only` limits this to one name.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    notes = []
    for old in sorted(directory.glob(".old-*")):
        name, _, pid = old.name.removeprefix(".old-").rpartition("-")
        if not name or (only and name != only) or not _writer_gone(old.name):
            continue
        final, new = directory / name, directory / f".tmp-{name}-{pid}"
        if final.exists():
            _remove(old)
            notes.append(f"removed {old}: the previous {name}/ left behind by a finished swap")
        elif new.is_dir() and _is_complete(new):
            os.replace(new, final)
            _remove(old)
            notes.append(f"finished an interrupted swap in {directory}: the new {name}/ was complete, "
                         f"so it took its place and the previous copy was removed")
        else:
            os.replace(old, final)
            notes.append(f"rolled back an interrupted swap in {directory}: the new {name}/ was incomplete, "
                         f"so the previous {name}/ is back")
    for stale in sorted({*directory.glob(".*.tmp-*"), *directory.glob(".tmp-*")}):
        owner = stale.name.removeprefix(".tmp-").rpartition("-")[0] if stale.name.startswith(".tmp-") else None
        if (only and owner != only) or not _writer_gone(stale.name):
            continue
        _remove(stale)
        notes.append(f"removed {stale}: a temporary left by a process that no longer runs")
    return notes


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling directory; on success checksums it and renames it to `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_writes(final.parent, only=final.name)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        write_checksums(tmp)
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
