"""CIFAR-10 and CIFAR-100 in their "python version" pickle batches (Krizhevsky, 2009).

Format: every batch file is a pickled dict (written by Python 2's cPickle, so read with
``encoding="bytes"``: the keys are bytes). ``b"data"`` is a numpy uint8 array of shape
(rows, 3072): each row is one 32x32 colour image, 1024 red values, then 1024 green, then
1024 blue, each plane in row-major order, so byte ``c * 1024 + r * 32 + k`` is channel
``c``, pixel row ``r``, column ``k``. The labels are a list of ``rows`` ints.

- CIFAR-10 (``cifar-10-batches-py/``): ``data_batch_1`` .. ``data_batch_5`` (10,000 images
  each, the train split, read in that order), ``test_batch`` (10,000), labels under
  ``b"labels"`` (0..9). ``batches.meta`` holds the class names; it is not needed.
- CIFAR-100 (``cifar-100-python/``): ``train`` (50,000) and ``test`` (10,000), labels under
  ``b"fine_labels"`` (0..99) and ``b"coarse_labels"`` (0..19, the superclasses); ``labels``
  picks one. ``meta`` holds the class names; it is not needed.

Which of the two a folder holds is told by its files; ``path`` may also be the folder the
archive was extracted in, holding ``cifar-10-batches-py/`` or ``cifar-100-python/``.
Images are float32 shaped (n, 3, 32, 32), scaled to [0, 1]; with ``normalize`` each channel
then has the train split's mean subtracted and is divided by its standard deviation (both
computed exactly from the train bytes, applied to train and test alike). Labels are int64.
The data has no natural clients; it is partitioned synthetically.

Unpickling an untrusted file can run any code it names, so the batches are read with
:class:`CifarUnpickler`, which rebuilds numpy arrays and nothing else: any other global a
file asks for (``os.system``, ``builtins.eval``, ...) is refused with
:class:`UnsafePickleError` before anything of it runs.
"""

from __future__ import annotations

import codecs
import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from roost.data.arrays import CentralData
from roost.data.base import ClientData, DatasetInfo
from roost.registry import check

__all__ = [
    "CIFAR10_DIR",
    "CIFAR10_FILES",
    "CIFAR100_DIR",
    "CIFAR100_FILES",
    "CifarConfig",
    "CifarUnpickler",
    "UnsafePickleError",
    "find_cifar_folder",
    "load_cifar_data",
    "read_cifar_batch",
    "safe_load_pickle",
]

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FILES = (*CIFAR10_TRAIN, "test_batch")
CIFAR100_FILES = ("train", "test")
PIXELS = 32 * 32
ROW_BYTES = 3 * PIXELS  # 3072
IMAGE_SHAPE = (3, 32, 32)
EXPECTED = (
    f"a CIFAR-10 folder ({CIFAR10_DIR}: data_batch_1 .. data_batch_5 and test_batch) or a "
    f"CIFAR-100 folder ({CIFAR100_DIR}: train and test), or a folder holding one of them"
)


@dataclass(frozen=True)
class CifarConfig:
    """path: a CIFAR-10 or CIFAR-100 python-version folder (``~`` allowed). labels: CIFAR-100's
    ``fine`` (100 classes) or ``coarse`` (20 superclasses); ignored for CIFAR-10. normalize:
    per-channel mean/std of the train split (default false: pixels stay in [0, 1])."""

    path: str = ""
    labels: Literal["fine", "coarse"] = "fine"
    normalize: bool = False

    def __post_init__(self) -> None:
        check(
            bool(self.path) and Path(self.path).expanduser().is_dir(),
            "path",
            self.path,
            f"no such folder; expected {EXPECTED}",
        )


class UnsafePickleError(ValueError):
    """A pickle asked for a global outside the few that rebuild a numpy array."""


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 pickles (protocol < 3) use it for bytes, latin-1 only."""
    if codecs.lookup(encoding).name != "iso8859-1" or errors != "strict":
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} (only latin-1)")
    return codecs.encode(text, "latin1")


_NUMPY_HELPERS = (("multiarray", "_reconstruct"), ("numeric", "_frombuffer"))
"""The module functions numpy's ``ndarray.__reduce__`` names (``_frombuffer`` for protocol 5)."""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    packages = ("numpy._core", "numpy.core")  # numpy 2's name first: numpy.core is its alias
    for module, name in _NUMPY_HELPERS:
        found = None
        for package in packages:
            try:
                found = getattr(importlib.import_module(f"{package}.{module}"), name, None)
            except ImportError:
                continue
            if found is not None:
                break
        if found is not None:  # a file may spell either name, whichever numpy wrote it
            allowed.update({(f"{package}.{module}", name): found for package in packages})
    return allowed


ALLOWED_GLOBALS = _allowed_globals()
"""(module, name) -> object: all a CIFAR batch (or a numpy uint8 array pickled with
protocols 0 to 5, by numpy 1 or 2, in Python 2 or 3) asks for; everything else is refused.
(An overridden ``find_class`` sees names as written: CIFAR's own files, from Python 2 and
numpy 1, name ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype``.)"""


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds dicts, lists, ints, bytes, strings and numpy arrays only."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{module}.{name}") from None


def safe_load_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` with :class:`CifarUnpickler` (``encoding="bytes"``, as CIFAR needs).

    A refused global raises :class:`UnsafePickleError`; a truncated or corrupt file raises
    ValueError. Both name the file.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            return CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such CIFAR batch file") from None
    except UnsafePickleError as e:
        raise UnsafePickleError(
            f"{path}: refused to load the global {e} from this pickle: a CIFAR batch holds "
            "only a numpy uint8 array, lists, ints and bytes, so the file is not a CIFAR "
            "batch (and may be hostile); nothing it names was run"
        ) from None
    except Exception as e:  # whatever a broken stream makes pickle or numpy raise
        raise ValueError(
            f"{path}: not a readable CIFAR batch pickle (truncated or corrupt?): "
            f"{type(e).__name__}: {e}"
        ) from None


def _entry(batch: dict[Any, Any], key: bytes) -> Any:
    """``batch[key]``, also under the str key of a file re-pickled by Python 3."""
    if key in batch:
        return batch[key]
    return batch.get(key.decode())


def _keys(batch: dict[Any, Any]) -> str:
    return ", ".join(sorted(repr(k) for k in batch)) or "none"


def read_cifar_batch(
    path: str | Path, label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: its uint8 rows (n, 3072) and its labels (n,) as int64, checked to be
    in ``0 .. num_classes - 1``. Errors name the file and what was wrong."""
    path = Path(path)
    batch = safe_load_pickle(path)
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: holds a {type(batch).__name__}, expected a dict (a CIFAR batch)")
    data = _entry(batch, b"data")
    if data is None:
        raise ValueError(f"{path}: no b'data' entry (keys: {_keys(batch)})")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        what = (
            f"a {data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else f"a {type(data).__name__}"
        )
        raise ValueError(f"{path}: b'data' is {what}, expected a 2-d uint8 array")
    if data.shape[1] != ROW_BYTES:
        raise ValueError(
            f"{path}: b'data' has {data.shape[1]} columns, expected {ROW_BYTES} "
            "(a 32x32 image a row: 1024 red, 1024 green, then 1024 blue values)"
        )
    raw_labels = _entry(batch, label_key)
    if raw_labels is None:
        raise ValueError(f"{path}: no {label_key!r} entry (keys: {_keys(batch)})")
    try:
        labels = np.asarray(raw_labels)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {label_key!r} is not a list of ints: {e}") from None
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(
            f"{path}: {label_key!r} is {labels.dtype} of shape {labels.shape}, "
            "expected a list of ints"
        )
    if len(labels) != len(data):
        raise ValueError(
            f"{path}: b'data' has {len(data)} rows but {label_key!r} {len(labels)} labels"
        )
    labels = labels.astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(
            f"{path}: {label_key!r}[{int(bad[0])}] is {int(labels[bad[0]])}, "
            f"expected 0..{num_classes - 1}"
        )
    return data, labels


def _layout(folder: Path) -> str | None:
    has10 = any((folder / n).is_file() for n in (*CIFAR10_FILES, "batches.meta"))
    has100 = any((folder / n).is_file() for n in CIFAR100_FILES)
    if has10 and has100:
        raise ValueError(
            f"{folder}: holds files of both CIFAR-10 (data_batch_*, test_batch) and "
            "CIFAR-100 (train, test); point data.path at a folder with one of them"
        )
    return "cifar10" if has10 else "cifar100" if has100 else None


def find_cifar_folder(path: str | Path) -> tuple[Path, str]:
    """The batch folder at or just under ``path``, and ``"cifar10"`` or ``"cifar100"``."""
    folder = Path(path).expanduser()
    kind = _layout(folder)
    if kind is not None:
        return folder, kind
    inner = [folder / d for d in (CIFAR10_DIR, CIFAR100_DIR) if (folder / d).is_dir()]
    if len(inner) > 1:
        raise ValueError(
            f"{folder}: holds both {CIFAR10_DIR}/ and {CIFAR100_DIR}/; "
            "point data.path at one of them"
        )
    if inner and (kind := _layout(inner[0])) is not None:
        return inner[0], kind
    raise FileNotFoundError(f"{folder}: no CIFAR batch files; expected {EXPECTED}")


def _require(folder: Path, names: tuple[str, ...], what: str) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: {what} folder without {', '.join(missing)}; "
            f"expected {' and '.join([', '.join(names[:-1]), names[-1]])}"
        )


def _channel_stats(batches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) standard deviation of the pixels in [0, 1] units,
    exact: from each channel's histogram of byte values."""
    mean, std = np.zeros(3), np.ones(3)
    values = np.arange(256, dtype=np.float64) / 255.0
    for c in range(3):
        hist = np.zeros(256, dtype=np.float64)
        for data in batches:
            hist += np.bincount(data[:, c * PIXELS : (c + 1) * PIXELS].ravel(), minlength=256)
        total = hist.sum()
        if total == 0:
            continue
        m = float(hist @ values / total)
        var = float(hist @ (values - m) ** 2 / total)
        mean[c] = m
        std[c] = var**0.5 if var > 0 else 1.0  # a constant channel is only centred
    return mean, std


def _to_images(
    batches: list[np.ndarray], stats: tuple[np.ndarray, np.ndarray] | None
) -> torch.Tensor:
    """float32 (n, 3, 32, 32) in [0, 1] (or normalised), filled batch by batch."""
    n = sum(len(b) for b in batches)
    out = np.empty((n, *IMAGE_SHAPE), dtype=np.float32)
    start = 0
    for data in batches:
        view = out[start : start + len(data)]
        np.divide(data.reshape(-1, *IMAGE_SHAPE), 255, out=view, dtype=np.float32)
        start += len(data)
    if stats is not None:
        for c in range(3):
            out[:, c] -= np.float32(stats[0][c])
            out[:, c] /= np.float32(stats[1][c])
    return torch.from_numpy(out)


def load_cifar_data(cfg: CifarConfig) -> CentralData:
    """Read the CIFAR-10 or CIFAR-100 batches of ``cfg.path`` (see the module docstring)."""
    folder, kind = find_cifar_folder(cfg.path)
    if kind == "cifar10":
        _require(folder, CIFAR10_FILES, "CIFAR-10")
        train_files, test_files = list(CIFAR10_TRAIN), ["test_batch"]
        label_key, num_classes = b"labels", 10
    else:
        _require(folder, CIFAR100_FILES, "CIFAR-100")
        train_files, test_files = ["train"], ["test"]
        label_key = b"fine_labels" if cfg.labels == "fine" else b"coarse_labels"
        num_classes = 100 if cfg.labels == "fine" else 20

    def read(names: list[str]) -> tuple[list[np.ndarray], torch.Tensor]:
        parts = [read_cifar_batch(folder / n, label_key, num_classes) for n in names]
        labels = np.concatenate([y for _, y in parts])
        return [x for x, _ in parts], torch.from_numpy(labels)

    train_rows, train_y = read(train_files)
    test_rows, test_y = read(test_files)
    if not len(train_y):
        raise ValueError(f"{folder}: the train split ({', '.join(train_files)}) has no images")
    stats = _channel_stats(train_rows) if cfg.normalize else None
    train = ClientData(_to_images(train_rows, stats), train_y)
    del train_rows
    test = ClientData(_to_images(test_rows, stats), test_y) if len(test_y) else None
    return CentralData(train, test, DatasetInfo(IMAGE_SHAPE, num_classes))
