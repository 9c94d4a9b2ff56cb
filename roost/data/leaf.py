"""LEAF JSON shards, one user = one client: numeric features (FEMNIST) or raw text (Sent140).

Each file is LEAF's standard JSON::

    {"users": ["f3313_11", ...], "num_samples": [155, ...],
     "user_data": {"f3313_11": {"x": [[784 floats], ...], "y": [55, ...]}, ...}}

**Files.** ``path`` is either a folder with ``train/`` and ``test/`` subfolders of ``*.json``
files (LEAF's own layout), or one folder of ``*.json`` files whose names say the split
(``..._train_...``, ``..._test_...``). Files are read in name order; a user's examples from
several files are concatenated. A folder holding only one split (only train files, only test
files, or ``*.json`` files whose names say neither, like the staged Sent140 file) has each
user's examples divided: of a user's ``n`` examples, ``max(1, floor(test_fraction * n))``
(none when ``n == 1`` or ``test_fraction == 0``) form the user's test split, drawn with
``np.random.default_rng([seed, 6, user_number])``; both splits keep file order.

**Features** (``features``). ``numeric``: every ``x`` entry is a list of numbers; 784 values
become 28x28 images shaped (1, 28, 28), other lengths stay flat vectors (d,).
``bag_of_words`` and ``token_ids`` read text (rows such as Sent140's ``[tweet_id, date,
"NO_QUERY", user, text, "training"]``, or plain strings; :mod:`roost.data.leaf_text` gives
the rules for the text field, words and vocabulary): a float32 vector of word counts, shaped
``(len(vocab) + 1,)``, or ``seq_len`` int64 word ids (0 = padding), shaped ``(seq_len,)`` with
``DatasetInfo.vocab_size = len(vocab) + 2``. The vocabulary, at most ``vocab_size`` words,
comes from the train split only. ``auto`` (the default) means numeric when the entries are
numbers and bag_of_words when they are text; every file must hold the same kind. Bag of words
takes ``4 * (len(vocab) + 1)`` bytes per example (64 MB for Sent140's 16,025 tweets at
the default ``vocab_size``).

Labels are integers >= 0. The natural key of an example is its user, numbered in order of
first appearance in the train files, so ``partition=natural`` gives one client per user (the
default). Each client's test split holds the same user's test examples; the central test
split holds every test example.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from roost.data.arrays import CentralData
from roost.data.base import ClientData, DatasetInfo
from roost.data.leaf_text import encode_texts, record_kind, record_texts
from roost.registry import check

__all__ = [
    "LeafConfig",
    "leaf_files",
    "load_leaf_data",
    "read_leaf_file",
    "split_users",
    "user_test_count",
]

Features = Literal["auto", "numeric", "bag_of_words", "token_ids"]
_Kind = Literal["numeric", "text"]
_TextMode = Literal["bag_of_words", "token_ids"]
_IMAGE_SIDE = 28
_FOLDER_HELP = (
    "expected a LEAF folder with train/ and test/ subfolders of *.json, "
    "or *.json files (named *_train_* and *_test_*, or one split to divide)"
)


@dataclass(frozen=True)
class LeafConfig:
    """path: LEAF data folder (see module docstring). num_classes: 0 = largest label + 1
    (set it when a subset of shards may miss the last classes, e.g. 62 for FEMNIST).
    features: auto, numeric, bag_of_words or token_ids. vocab_size: most frequent train
    words kept (text only). seq_len: word ids per text (token_ids). text_field: index of the
    text in a row (none = the last string field, not counting a final "training").
    test_fraction: each user's held-out share when the folder holds only one split."""

    path: str = ""
    num_classes: int = 0
    features: Features = "auto"
    vocab_size: int = 1000
    seq_len: int = 25
    text_field: int | None = None
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        check(bool(self.path) and Path(self.path).is_dir(), "path", self.path, _FOLDER_HELP)
        check(self.num_classes >= 0, "num_classes", self.num_classes, "must be >= 0")
        check(self.vocab_size >= 1, "vocab_size", self.vocab_size, "must be >= 1")
        check(self.seq_len >= 1, "seq_len", self.seq_len, "must be >= 1")
        check(
            self.text_field is None or self.text_field >= 0,
            "text_field",
            self.text_field,
            "must be a field index >= 0, or none for the last text field",
        )
        check(0 <= self.test_fraction < 1, "test_fraction", self.test_fraction, "must be in [0, 1)")


def leaf_files(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """The (train, test) JSON files of a LEAF folder, each sorted by name.

    ``train/`` and ``test/`` subfolders come first; otherwise the folder's own ``*.json``
    files, split by ``_train_`` and ``_test_`` in their names (all of them are one split when
    no name says). A lone split is returned as train, with no test files.
    """
    folder = Path(folder)
    train, test = (
        sorted((folder / sub).glob("*.json")) if (folder / sub).is_dir() else []
        for sub in ("train", "test")
    )
    if not train and not test:
        files = sorted(folder.glob("*.json"))
        train = [f for f in files if "_train_" in f.name]
        test = [f for f in files if "_test_" in f.name]
        if not train and not test:
            train = files
    if not train:
        train, test = test, []
    if not train:
        raise FileNotFoundError(f"{folder}: no LEAF JSON files; {_FOLDER_HELP}")
    return train, test


def _labels(where: str, raw: Any) -> np.ndarray:
    try:
        y = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        y = None
    if y is None or y.ndim != 1 or (len(y) and (np.any(y != np.round(y)) or y.min() < 0)):
        raise ValueError(f"{where}: y must be a list of integer labels >= 0")
    return y.astype(np.int64)


def _records(path: Path) -> list[tuple[str, list[Any], np.ndarray]]:
    """One LEAF file's users as ``(user, x as parsed, y int64)``, in file order."""
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
        where, record = f"{path}: user {user!r}", user_data[user]
        if not isinstance(record, dict) or not isinstance(record.get("x"), list):
            raise ValueError(f"{where}: expected {{'x': [...], 'y': [...]}} in user_data")
        y = _labels(where, record.get("y"))
        if isinstance(counts, list) and i < len(counts) and counts[i] != len(y):
            raise ValueError(f"{path}: user {user!r} has num_samples {counts[i]} but {len(y)} y")
        out.append((str(user), record["x"], y))
    return out


def _numeric(where: str, x: list[Any], n: int) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: x must be lists of numbers for data.features=numeric (raw-text LEAF "
            "sets such as Sent140 need data.features=bag_of_words or token_ids)"
        ) from None
    if arr.ndim != 2 or len(arr) != n:
        raise ValueError(
            f"{where}: expected x as n feature lists and y as n labels, got x shape "
            f"{arr.shape} and {n} labels"
        )
    return arr


def read_leaf_file(path: str | Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """One numeric LEAF file as ``[(user, x (n, d) float32, y (n,) int64), ...]``."""
    path = Path(path)
    return [(u, _numeric(f"{path}: user {u!r}", x, len(y)), y) for u, x, y in _records(path)]


@dataclass
class _Examples:
    """x: float32 (n, d) features or an object array of n texts; keys: user numbers."""

    x: np.ndarray
    y: np.ndarray
    keys: np.ndarray

    def take(self, index: np.ndarray) -> _Examples:
        return _Examples(self.x[index], self.y[index], self.keys[index])


class _Collector:
    """Concatenates users' examples across files, numbering users by first appearance;
    checks that every user holds the kind (and numeric width) of the first one."""

    def __init__(self, cfg: LeafConfig, user_ids: dict[str, int], like: _Collector | None = None):
        self.cfg, self.user_ids = cfg, user_ids
        self.kind: _Kind | None = like.kind if like else None
        self.first: str = like.first if like else ""
        self.width: int | None = like.width if like else None
        self.parts: list[_Examples] = []

    def _kind(self, where: str, x: list[Any]) -> _Kind:
        features = self.cfg.features
        kind: _Kind = "numeric" if features == "numeric" else "text"
        if features == "auto":
            kind = record_kind(where, x)
        if self.kind is None:
            self.kind, self.first = kind, where
        elif kind != self.kind:
            raise ValueError(
                f"{where}: x holds {kind} rows but {self.first} holds {self.kind} rows; "
                "a LEAF set holds one kind"
            )
        return kind

    def add_file(self, path: Path) -> None:
        for user, x, y in _records(path):
            if len(y) == 0:
                continue
            where = f"{path}: user {user!r}"
            if self._kind(where, x) == "numeric":
                block = _numeric(where, x, len(y))
                if self.width is None:
                    self.width = block.shape[1]
                elif block.shape[1] != self.width:
                    raise ValueError(f"{where} has {block.shape[1]} features, others {self.width}")
            else:
                if len(x) != len(y):
                    raise ValueError(f"{where}: x has {len(x)} entries but y has {len(y)} labels")
                block = np.empty(len(y), dtype=object)
                block[:] = record_texts(where, x, self.cfg.text_field)
            uid = self.user_ids.setdefault(user, len(self.user_ids))
            self.parts.append(_Examples(block, y, np.full(len(y), uid, dtype=np.int64)))

    def examples(self) -> _Examples | None:
        if not self.parts:
            return None
        return _Examples(
            np.concatenate([p.x for p in self.parts]),
            np.concatenate([p.y for p in self.parts]),
            np.concatenate([p.keys for p in self.parts]),
        )


def user_test_count(n: int, test_fraction: float) -> int:
    """Held-out examples of a user with ``n`` when the folder holds one split:
    ``max(1, floor(test_fraction * n))``, or 0 when ``n < 2`` or ``test_fraction == 0``."""
    if n < 2 or test_fraction <= 0:
        return 0
    return min(n - 1, max(1, math.floor(test_fraction * n + 1e-9)))


def split_users(keys: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) example indices, each ascending: user ``u``'s
    :func:`user_test_count` test examples are drawn by ``default_rng([seed, 6, u])``."""
    held_out = np.zeros(len(keys), dtype=bool)
    order = np.argsort(keys, kind="stable")
    users, starts = np.unique(keys[order], return_index=True)
    for user, members in zip(users.tolist(), np.split(order, starts[1:]), strict=True):
        k = user_test_count(len(members), test_fraction)
        if k:
            rng = np.random.default_rng([seed, 6, user])
            held_out[members[rng.permutation(len(members))[:k]]] = True
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


def _inputs(
    cfg: LeafConfig, kind: _Kind, train: _Examples, test: _Examples | None
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Model inputs of train and test, and the number of token ids (0 unless token_ids)."""
    if kind == "text":
        mode: _TextMode = "token_ids" if cfg.features == "token_ids" else "bag_of_words"
        return encode_texts(
            f"{cfg.path}: the train texts",
            mode,
            train.x.tolist(),
            None if test is None else test.x.tolist(),
            cfg.vocab_size,
            cfg.seq_len,
        )

    def shaped(x: np.ndarray) -> np.ndarray:
        side = _IMAGE_SIDE
        return x.reshape(-1, 1, side, side) if x.shape[1] == side * side else x

    return shaped(train.x), None if test is None else shaped(test.x), 0


def load_leaf_data(cfg: LeafConfig, seed: int) -> CentralData:
    """Read every file of ``cfg.path`` (``seed`` only draws the split of a lone split)."""
    train_files, test_files = leaf_files(cfg.path)
    user_ids: dict[str, int] = {}
    train_part = _Collector(cfg, user_ids)
    for f in train_files:
        train_part.add_file(f)
    train = train_part.examples()
    if train is None or train_part.kind is None:
        raise ValueError(f"{cfg.path}: the LEAF train files hold no examples")
    test_part = _Collector(cfg, user_ids, like=train_part)
    for f in test_files:
        test_part.add_file(f)
    test = test_part.examples()
    if not test_files and cfg.test_fraction > 0:
        train_idx, test_idx = split_users(train.keys, cfg.test_fraction, seed)
        train, test = train.take(train_idx), train.take(test_idx) if len(test_idx) else None
    largest = int(train.y.max()) if test is None else int(max(train.y.max(), test.y.max()))
    if cfg.num_classes and largest >= cfg.num_classes:
        raise ValueError(
            f"{cfg.path}: label {largest} found but data.num_classes={cfg.num_classes}"
        )
    x_train, x_test, token_count = _inputs(cfg, train_part.kind, train, test)
    info = DatasetInfo(tuple(x_train.shape[1:]), cfg.num_classes or largest + 1, token_count)
    train_data = ClientData(torch.from_numpy(x_train), torch.from_numpy(train.y))
    if test is None or x_test is None:
        return CentralData(train_data, None, info, groups=train.keys)
    test_data = ClientData(torch.from_numpy(x_test), torch.from_numpy(test.y))
    return CentralData(train_data, test_data, info, groups=train.keys, test_groups=test.keys)
