"""LEAF JSON shards (FEMNIST and other LEAF sets with numeric features), one user = one client.

Each file is LEAF's standard JSON::

    {"users": ["f3313_11", ...], "num_samples": [155, ...],
     "user_data": {"f3313_11": {"x": [[784 floats], ...], "y": [55, ...]}, ...}}

``path`` is either a folder with ``train/`` and ``test/`` subfolders of ``*.json`` files (LEAF's
own layout), or one folder of ``*.json`` files whose names say the split (``..._train_...``,
``..._test_...``). Files are read in name order; a user's examples from several files are
concatenated. Features of 784 values become 28x28 images shaped (1, 28, 28); other lengths
stay flat vectors (d,). Features must be numbers: Sent140's raw tweets are not read here.

The natural key of an example is its user, numbered in order of first appearance in the
train files, so ``partition=natural`` gives one client per user (the default). Each client's
test split holds the same user's examples from the test files; the central test split holds
every test example.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from roost.data.arrays import CentralData
from roost.data.base import ClientData, DatasetInfo
from roost.registry import check

__all__ = ["LeafConfig", "leaf_files", "load_leaf_data", "read_leaf_file"]

_IMAGE_SIDE = 28


@dataclass(frozen=True)
class LeafConfig:
    """path: LEAF data folder (see module docstring). num_classes: 0 = largest label + 1
    (set it when a subset of shards may miss the last classes, e.g. 62 for FEMNIST)."""

    path: str = ""
    num_classes: int = 0

    def __post_init__(self) -> None:
        check(
            bool(self.path) and Path(self.path).is_dir(),
            "path",
            self.path,
            "expected a LEAF folder with train/ and test/ subfolders of *.json "
            "(or *_train_*.json and *_test_*.json files)",
        )
        check(self.num_classes >= 0, "num_classes", self.num_classes, "must be >= 0")


def leaf_files(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """The (train, test) JSON files of a LEAF folder, each sorted by name."""
    folder = Path(folder)
    if (folder / "train").is_dir():
        train = sorted((folder / "train").glob("*.json"))
        test = sorted((folder / "test").glob("*.json")) if (folder / "test").is_dir() else []
    else:
        files = sorted(folder.glob("*.json"))
        train = [f for f in files if "_train_" in f.name]
        test = [f for f in files if "_test_" in f.name]
    if not train:
        raise FileNotFoundError(
            f"{folder}: no LEAF train files; expected train/*.json or *_train_*.json"
        )
    return train, test


def _user_arrays(path: Path, user: str, record: Any) -> tuple[np.ndarray, np.ndarray]:
    where = f"{path}: user {user!r}"
    if not isinstance(record, dict) or "x" not in record or "y" not in record:
        raise ValueError(f"{where}: expected {{'x': [...], 'y': [...]}} in user_data")
    try:
        x = np.asarray(record["x"], dtype=np.float32)
        y_raw = np.asarray(record["y"], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: x must be lists of numbers and y integers (raw-text LEAF sets such "
            "as Sent140 are not supported)"
        ) from None
    if x.ndim != 2 or y_raw.ndim != 1 or len(x) != len(y_raw):
        raise ValueError(
            f"{where}: expected x as n feature lists and y as n labels, got x shape "
            f"{x.shape} and {len(y_raw)} labels"
        )
    if len(y_raw) and (np.any(y_raw != np.round(y_raw)) or y_raw.min() < 0):
        raise ValueError(f"{where}: labels must be integers >= 0")
    return x, y_raw.astype(np.int64)


def read_leaf_file(path: str | Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """One LEAF JSON file as ``[(user, x (n, d) float32, y (n,) int64), ...]`` in file order."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("users"), list):
        raise ValueError(f"{path}: expected a LEAF object with 'users' and 'user_data'")
    user_data = doc.get("user_data")
    if not isinstance(user_data, dict):
        raise ValueError(f"{path}: expected a LEAF object with 'users' and 'user_data'")
    counts = doc.get("num_samples")
    out = []
    for i, user in enumerate(doc["users"]):
        if user not in user_data:
            raise ValueError(f"{path}: user {user!r} is listed in 'users' but has no user_data")
        x, y = _user_arrays(path, user, user_data[user])
        if isinstance(counts, list) and i < len(counts) and counts[i] != len(y):
            raise ValueError(f"{path}: user {user!r} has num_samples {counts[i]} but {len(y)} y")
        out.append((str(user), x, y))
    return out


class _Collector:
    """Concatenates users' examples across files, numbering users by first appearance."""

    def __init__(self, user_ids: dict[str, int]) -> None:
        self.user_ids = user_ids
        self.xs: list[np.ndarray] = []
        self.ys: list[np.ndarray] = []
        self.keys: list[np.ndarray] = []
        self.width: int | None = None

    def add_file(self, path: Path) -> None:
        for user, x, y in read_leaf_file(path):
            if len(y) == 0:
                continue
            if self.width is None:
                self.width = x.shape[1]
            elif x.shape[1] != self.width:
                raise ValueError(
                    f"{path}: user {user!r} has {x.shape[1]} features, others {self.width}"
                )
            uid = self.user_ids.setdefault(user, len(self.user_ids))
            self.xs.append(x)
            self.ys.append(y)
            self.keys.append(np.full(len(y), uid, dtype=np.int64))

    def data(self) -> tuple[ClientData, np.ndarray] | None:
        if not self.xs:
            return None
        x = np.concatenate(self.xs)
        if x.shape[1] == _IMAGE_SIDE * _IMAGE_SIDE:
            x = x.reshape(-1, 1, _IMAGE_SIDE, _IMAGE_SIDE)
        data = ClientData(torch.from_numpy(x), torch.from_numpy(np.concatenate(self.ys)))
        return data, np.concatenate(self.keys)


def load_leaf_data(cfg: LeafConfig, seed: int) -> CentralData:
    """Read every train and test file of ``cfg.path`` (``seed`` is unused: no randomness)."""
    train_files, test_files = leaf_files(cfg.path)
    user_ids: dict[str, int] = {}
    train_part = _Collector(user_ids)
    for f in train_files:
        train_part.add_file(f)
    train = train_part.data()
    if train is None:
        raise ValueError(f"{cfg.path}: the LEAF train files hold no examples")
    test_part = _Collector(user_ids)
    test_part.width = train_part.width
    for f in test_files:
        test_part.add_file(f)
    test = test_part.data()
    largest = int(train[0].y.max()) if test is None else int(max(train[0].y.max(), test[0].y.max()))
    if cfg.num_classes and largest >= cfg.num_classes:
        raise ValueError(
            f"{cfg.path}: label {largest} found but data.num_classes={cfg.num_classes}"
        )
    info = DatasetInfo(tuple(train[0].x.shape[1:]), cfg.num_classes or largest + 1)
    return CentralData(
        train[0],
        None if test is None else test[0],
        info,
        groups=train[1],
        test_groups=None if test is None else test[1],
    )
