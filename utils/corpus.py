"""The built-in offline corpus `builtin:python-docs`: the documentation that ships with Python itself.

Real English prose, present on every machine with no network: the reference-manual topics of
`pydoc_data` and the docstrings of the standard library's public modules, classes and functions. Only
the stdlib is read (never site-packages), in sorted order, so the same Python gives the same corpus.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import pkgutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

BUILTIN_NAME = "builtin:python-docs"
# Modules with side effects on import (a browser, a GUI, printing) or that only exist on other platforms.
SKIPPED_MODULES = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "ensurepip", "pydoc_data",
    "msilib", "winreg", "winsound", "msvcrt", "_winapi", "nt", "lib2to3", "xxlimited", "xxsubtype",
}


@dataclass(frozen=True)
class DocEntry:
    """One documented object: `json.dumps`, `pathlib.Path`, the `for` statement topic …"""

    name: str
    kind: str  # "topic", "module", "class", "function", "method"
    signature: str
    text: str
    module: str = ""


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def _import_quietly(name: str):
    with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()),
          contextlib.redirect_stderr(io.StringIO())):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - any failure to import just leaves the module out
            return None


class _Elided:
    def __repr__(self) -> str:
        return "..."


def _is_plain_default(value) -> bool:
    """A literal that reads the same on every machine. Others are elided: `environ=os.environ` would print the
    user's whole environment (tokens and keys included) into the corpus, `executable=sys.executable` a path."""
    if value is None or isinstance(value, (bool, int, float, bytes)):
        return True
    return isinstance(value, str) and not os.path.isabs(value)


def _signature(obj) -> str:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    parameters = [
        p if p.default is p.empty or _is_plain_default(p.default) else p.replace(default=_Elided())
        for p in signature.parameters.values()
    ]
    return str(signature.replace(parameters=parameters))


def _module_entries(module_name: str) -> Iterator[DocEntry]:
    module = _import_quietly(module_name)
    if module is None:
        return
    doc = inspect.getdoc(module)
    if doc:
        yield DocEntry(module_name, "module", "", doc, module_name)
    for attr in sorted(vars(module)):
        if attr.startswith("_"):
            continue
        obj = getattr(module, attr)
        if getattr(obj, "__module__", None) != module_name:
            continue
        kind = "class" if inspect.isclass(obj) else "function" if inspect.isroutine(obj) else None
        doc = inspect.getdoc(obj) if kind else None
        if doc and len(doc) >= 40:
            yield DocEntry(f"{module_name}.{attr}", kind, _signature(obj), doc, module_name)
        if kind == "class":
            yield from _method_entries(module_name, attr, obj)


def _method_entries(module_name: str, class_name: str, cls: type) -> Iterator[DocEntry]:
    for attr in sorted(vars(cls)):
        method = vars(cls)[attr]
        if attr.startswith("_") or not (inspect.isroutine(method) or isinstance(method, property)):
            continue
        doc = method.__doc__ and inspect.cleandoc(method.__doc__)
        if doc and len(doc) >= 40:
            target = method.fget if isinstance(method, property) else method
            signature = _signature(target) if target else ""
            yield DocEntry(f"{module_name}.{class_name}.{attr}", "method", signature, doc, module_name)


def _stdlib_module_names() -> list[str]:
    """Public stdlib modules and the public submodules of stdlib packages (tests excluded)."""
    names = set()
    for name in sys.stdlib_module_names:
        if name.startswith("_") or name in SKIPPED_MODULES:
            continue
        names.add(name)
        module = _import_quietly(name)
        for info in pkgutil.walk_packages(getattr(module, "__path__", []) or [], prefix=name + "."):
            parts = info.name.split(".")
            if not any(p.startswith("_") or p in ("test", "tests", "idle_test") for p in parts):
                names.add(info.name)
    return sorted(names)


@lru_cache(maxsize=1)
def doc_entries() -> tuple[DocEntry, ...]:
    """Every entry of the corpus: reference topics first, then modules in sorted order."""
    from pydoc_data.topics import topics

    entries = [DocEntry(name, "topic", "", text.strip(), name) for name, text in sorted(topics.items()) if text.strip()]
    for name in _stdlib_module_names():
        entries.extend(_module_entries(name))
    return tuple(entries)


def builtin_documents(limit: int | None = None) -> Iterator[str]:
    """Documents of the corpus: one per reference topic, one per module (its docstring and its members')."""
    count = 0
    current_module, parts = None, []
    for entry in doc_entries():
        module = entry.name if entry.kind in ("topic", "module") else entry.module
        if module != current_module and parts:
            yield "\n\n".join(parts)
            count += 1
            if limit is not None and count >= limit:
                return
            parts = []
        current_module = module
        heading = f"{entry.name}{entry.signature}" if entry.kind != "topic" else ""
        parts.append(f"{heading}\n{entry.text}" if heading else entry.text)
    if parts and (limit is None or count < limit):
        yield "\n\n".join(parts)
