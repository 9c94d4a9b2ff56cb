"""MNIST-style IDX files (MNIST, Fashion-MNIST, ...): images and labels as raw uint8 arrays.

Format (LeCun's IDX, big-endian): a 4-byte magic number, 2051 (``0x00000803``) for a 3-d
image array or 2049 (``0x00000801``) for a 1-d label array, then one 4-byte size per
dimension (``>IIII`` for images: magic, count, rows, cols; ``>II`` for labels: magic,
count), then exactly ``prod(sizes)`` bytes of uint8 data. Files may be gzip-compressed.

From a folder ``path`` the loader reads

- ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (the train split),
- ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (the test split),

each also accepted with a ``.gz`` suffix and in the dotted spelling
(``train-images.idx3-ubyte``). Pixels are scaled to [0, 1] float32, shaped (n, 1, rows, cols).

When only one of the two splits has images (for instance ``/work/shared/data/mnist``, which
holds the t10k images and labels but only the *labels* of the train split), that split is
divided into train and test with ``test_fraction`` (stratified by label, drawn from
``np.random.default_rng([seed, 6])``), and the lone train labels are ignored. MNIST has no
natural clients; it is partitioned synthetically.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from roost.data.arrays import CentralData, split_train_test, subset
from roost.data.base import ClientData, DatasetInfo
from roost.registry import check

__all__ = [
    "IMAGES_MAGIC",
    "LABELS_MAGIC",
    "MnistConfig",
    "find_idx_file",
    "load_mnist_data",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
]

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_NDIM = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class MnistConfig:
    """path: folder of IDX files. test_fraction: share held out when only one split is there."""

    path: str = ""
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        check(
            bool(self.path) and Path(self.path).is_dir(),
            "path",
            self.path,
            "expected a folder holding MNIST IDX files "
            "(train-images-idx3-ubyte[.gz], t10k-images-idx3-ubyte[.gz], and their labels)",
        )
        check(0 <= self.test_fraction < 1, "test_fraction", self.test_fraction, "must be in [0, 1)")


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read one uint8 IDX file (plain or gzip) whose magic number must be ``magic``."""
    path = Path(path)
    what = "images (magic 2051)" if magic == IMAGES_MAGIC else "labels (magic 2049)"
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such IDX file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: broken gzip stream in IDX file: {e}") from None
    ndim = _NDIM[magic]
    header = 4 * (1 + ndim)
    if len(raw) >= 4:
        found = struct.unpack(">I", raw[:4])[0]
        if found != magic:
            raise ValueError(f"{path}: magic number {found}, expected {magic} for IDX {what}")
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header of {what}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise ValueError(
            f"{path}: {len(raw)} bytes, expected {expected} "
            f"(header {header} + data {'x'.join(map(str, dims))} uint8)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_images(path: str | Path) -> np.ndarray:
    """Images of an IDX3 file as uint8 (n, rows, cols)."""
    return read_idx(path, IMAGES_MAGIC)


def read_idx_labels(path: str | Path) -> np.ndarray:
    """Labels of an IDX1 file as uint8 (n,)."""
    return read_idx(path, LABELS_MAGIC)


def find_idx_file(folder: Path, split: str, kind: str) -> Path | None:
    """The file for ``split`` (train or t10k) and ``kind`` (images or labels), if present."""
    idx = "idx3" if kind == "images" else "idx1"
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            candidate = folder / f"{split}-{kind}{sep}{idx}-ubyte{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _read_split(folder: Path, split: str) -> ClientData | None:
    images_file = find_idx_file(folder, split, "images")
    if images_file is None:
        return None
    labels_file = find_idx_file(folder, split, "labels")
    if labels_file is None:
        raise FileNotFoundError(
            f"{folder}: found {images_file.name} but not {split}-labels-idx1-ubyte[.gz]"
        )
    images, labels = read_idx_images(images_file), read_idx_labels(labels_file)
    if len(images) != len(labels):
        raise ValueError(
            f"{images_file} holds {len(images)} images but {labels_file} {len(labels)} labels"
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return ClientData(x, torch.from_numpy(labels.astype(np.int64)))


def load_mnist_data(cfg: MnistConfig, seed: int) -> CentralData:
    """Read the IDX files of ``cfg.path``; see the module docstring for the split rules."""
    folder = Path(cfg.path)
    train, test = _read_split(folder, "train"), _read_split(folder, "t10k")
    if train is None and test is None:
        raise FileNotFoundError(
            f"{folder}: no IDX images; expected train-images-idx3-ubyte[.gz] and/or "
            "t10k-images-idx3-ubyte[.gz] with their label files"
        )
    if train is None or test is None:
        whole = train if train is not None else test
        assert whole is not None
        train, test = whole, None
        if cfg.test_fraction > 0:
            rng = np.random.default_rng([seed, 6])
            labels = whole.y.numpy()
            train_idx, test_idx = split_train_test(labels, cfg.test_fraction, rng)
            train, test = subset(whole, train_idx), subset(whole, test_idx)
    if test is not None and test.x.shape[1:] != train.x.shape[1:]:
        raise ValueError(
            f"{folder}: train images are {tuple(train.x.shape[2:])} but t10k images "
            f"{tuple(test.x.shape[2:])}"
        )
    labels_seen = train.y if test is None else torch.cat([train.y, test.y])
    info = DatasetInfo(tuple(train.x.shape[1:]), int(labels_seen.max()) + 1)
    return CentralData(train, test, info)
