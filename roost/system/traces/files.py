"""Finding and reading trace files: the shared data folder, per-file caching, one-line errors.

**Where the files are.** A source's file (or folder) is ``system.<kind>_path`` when that is
set, else a fixed path under the data folder: ``system.data_dir`` if set, else the
environment variable ``ROOST_SHARED_DATA``, else ``/work/shared/data`` (the project
machines' staging folder, described in its ``PROVENANCE.md``). No trace file ships with
the package. A missing file raises :class:`TraceFileMissing`, which names the file, what it
holds and how to point Roost at it.

**Formats.** JSON files are parsed with :mod:`json`. FedScale's traces are pickled dicts;
they are read by an unpickler that builds only plain containers and numbers (a pickle naming
any class or function is refused), so a trace file cannot run code. A malformed file
raises :class:`TraceFormatError`, whose message starts with the file's path and says what
was wrong.

**Caching.** Each loader caches its parsed, normalised result per (path, modification
time, size) for the life of the process, so building many systems from one file parses it
once; cached arrays are read-only.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "DEFAULT_DATA_DIR",
    "ENV_VAR",
    "FileKey",
    "TraceFileMissing",
    "TraceFormatError",
    "cached_per_file",
    "data_dir",
    "file_key",
    "finite_number",
    "frozen",
    "read_json",
    "read_mapping",
]

ENV_VAR = "ROOST_SHARED_DATA"
DEFAULT_DATA_DIR = Path("/work/shared/data")

FileKey = tuple[str, int, int]
R = TypeVar("R")


class TraceFormatError(ValueError):
    """A trace file is malformed; ``str(err)`` is ``"<path>: <what was wrong>"``."""

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {what}")


class TraceFileMissing(FileNotFoundError):
    """A trace file or folder a source needs does not exist; the message names it."""

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = str(path)
        super().__init__(
            f"system=trace needs {path} ({what}); set system.data_dir, the {ENV_VAR} "
            "environment variable, or the source's system.*_path "
            "(docs/system-traces.md lists every file)"
        )


def data_dir(configured: str | None, needed_for: str) -> Path:
    """The data folder: ``configured``, else ``$ROOST_SHARED_DATA``, else
    ``/work/shared/data``; :class:`TraceFileMissing` when the chosen folder is absent."""
    if configured:
        chosen = Path(configured).expanduser()
    elif os.environ.get(ENV_VAR):
        chosen = Path(os.environ[ENV_VAR]).expanduser()
    else:
        chosen = DEFAULT_DATA_DIR
    if not chosen.is_dir():
        raise TraceFileMissing(chosen, f"the shared data folder, for {needed_for}")
    return chosen


def file_key(path: str | Path, what: str) -> FileKey:
    """``(resolved path, mtime_ns, size)``: the cache key of a file or folder."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError:
        raise TraceFileMissing(p, what) from None
    return (str(p.resolve()), st.st_mtime_ns, st.st_size)


def cached_per_file(fn: Callable[..., R]) -> Callable[..., R]:
    """Cache ``fn(key, *args)`` for a :func:`file_key` ``key`` (at most 32 results)."""
    return functools.lru_cache(maxsize=32)(fn)


def frozen(a: np.ndarray) -> np.ndarray:
    """``a``, made read-only (so that a cached array cannot be changed by a caller)."""
    a.setflags(write=False)
    return a


def read_json(path: str | Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TraceFormatError(path, f"not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise TraceFormatError(path, "not a UTF-8 text file") from None


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings and numbers only; refuses every global."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refers to {module}.{name}; only plain dicts, lists and numbers are read"
        )


def read_mapping(path: str | Path) -> Any:
    """A JSON file (name ending ``.json``) or a pickle of plain containers (anything else,
    FedScale's format)."""
    if str(path).endswith(".json"):
        return read_json(path)
    data = Path(path).read_bytes()
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as e:
        raise TraceFormatError(path, f"not a pickle of plain dicts and lists ({e})") from None


def finite_number(path: str | Path, value: Any, where: str, positive: bool = False) -> float:
    """``value`` as a float; :class:`TraceFormatError` naming ``where`` unless it is a
    finite number (and > 0 when ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TraceFormatError(path, f"{where}: expected a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or (positive and x <= 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise TraceFormatError(path, f"{where}: expected {need}, got {value!r}")
    return x
