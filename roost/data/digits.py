"""scikit-learn's 8x8 digits (1,797 images, 10 classes): the smallest real image set.

Reads either ``sklearn.datasets.load_digits()`` (ships inside scikit-learn, no download;
``pip install 'roost[data]'``) or, with ``path``, the same data from scikit-learn's own
``digits.csv.gz`` file, which needs no scikit-learn: a gzip CSV without header, one image per
row, 64 pixel values 0..16 (8x8, row-major) then the label 0..9.

Pixels are scaled to [0, 1] (divided by 16), float32, shaped (n, 1, 8, 8). The held-out split
is drawn with ``np.random.default_rng([seed, 6])`` (purpose 6 = train/test split). The data
has no natural clients (writer ids are not included), so it is partitioned synthetically.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from roost.data.arrays import CentralData, split_train_test, subset
from roost.data.base import ClientData, DatasetInfo
from roost.registry import check

__all__ = ["DigitsConfig", "load_digits_data", "read_digits_csv"]


@dataclass(frozen=True)
class DigitsConfig:
    """path: a ``digits.csv.gz`` to read instead of asking scikit-learn (None = sklearn).
    test_fraction: share of examples held out (0 = no test split). stratify: hold out the
    same share of every class."""

    path: str | None = None
    test_fraction: float = 0.2
    stratify: bool = True

    def __post_init__(self) -> None:
        check(
            self.path is None or Path(self.path).is_file(),
            "path",
            self.path,
            "no such file; expected scikit-learn's digits.csv.gz (64 pixels 0..16 + label a row)",
        )
        check(0 <= self.test_fraction < 1, "test_fraction", self.test_fraction, "must be in [0, 1)")


def read_digits_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``digits.csv.gz`` (or plain .csv): returns pixels (n, 64) in 0..16 and labels (n,)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", ndmin=2)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a digits CSV (64 pixel columns + label): {e}") from None
    if table.shape[1] != 65 or len(table) == 0:
        raise ValueError(
            f"{path}: expected rows of 65 columns (64 pixels 0..16, then the label), "
            f"got shape {table.shape}"
        )
    pixels, labels = table[:, :64], table[:, 64]
    if pixels.min() < 0 or pixels.max() > 16 or not np.all(labels == np.round(labels)):
        raise ValueError(f"{path}: pixels must lie in 0..16 and labels be integers")
    return pixels, labels.astype(np.int64)


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "data=digits needs scikit-learn: pip install 'roost[data]' "
            "(or set data.path to scikit-learn's digits.csv.gz)"
        ) from None
    bunch = load_digits()
    return np.asarray(bunch.data), np.asarray(bunch.target, dtype=np.int64)


def load_digits_data(cfg: DigitsConfig, seed: int) -> CentralData:
    """The digits as one train split and (unless ``test_fraction`` is 0) one test split."""
    pixels, labels = read_digits_csv(cfg.path) if cfg.path else _sklearn_digits()
    x = torch.from_numpy((pixels / 16.0).astype(np.float32).reshape(-1, 1, 8, 8))
    full = ClientData(x, torch.from_numpy(labels))
    info = DatasetInfo((1, 8, 8), int(labels.max()) + 1)
    if cfg.test_fraction == 0:
        return CentralData(full, None, info)
    rng = np.random.default_rng([seed, 6])
    train_idx, test_idx = split_train_test(labels, cfg.test_fraction, rng, cfg.stratify)
    return CentralData(subset(full, train_idx), subset(full, test_idx), info)
