"""Partitioners: split one data set's train examples among clients.

A partitioner is registered under ``partition=NAME`` with a frozen config and a factory
``(cfg, labels, num_clients, seed, groups) -> list of index arrays`` (int64, one per
client). ``labels`` holds one label per train example and ``groups`` one natural client key
per example (the LEAF writer, the speaker), or None when the data has none. Every example
goes to at most one client; ``iid``, ``dirichlet`` and ``shards`` assign every example.

All randomness comes from ``np.random.default_rng([seed, 5])`` (purpose 5 = partitioning),
so a partition depends only on the seed, the labels and the config, never on call order.
Each client's indices are returned in ascending order (the data set's own order).

``auto`` (the default) is ``natural`` when the data has natural keys and ``iid`` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from roost.registry import ConfigError, Registry, check

__all__ = [
    "PARTITIONERS",
    "AutoConfig",
    "DirichletConfig",
    "IIDConfig",
    "NaturalConfig",
    "Partitioner",
    "ShardsConfig",
    "natural_keys",
    "partition_rng",
    "resolve_auto",
]

Partitioner = Callable[[Any, np.ndarray, int, int, np.ndarray | None], list[np.ndarray]]

PARTITIONERS: Registry[Partitioner] = Registry("partition")

SYNTHETIC = "iid, dirichlet or shards"


def partition_rng(seed: int) -> np.random.Generator:
    """The partitioners' random stream: ``default_rng([seed, 5])``."""
    return np.random.default_rng([seed, 5])


def _check_clients(num_clients: int, n: int) -> None:
    check(num_clients >= 1, "clients", num_clients, "must be >= 1")
    check(
        num_clients <= n,
        "clients",
        num_clients,
        f"at most {n} clients: the data has {n} train examples",
    )


def _sorted(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(p).astype(np.int64, copy=False) for p in parts]


@dataclass(frozen=True)
class IIDConfig:
    """No parameters: examples are shuffled and dealt into equal-size clients."""


@dataclass(frozen=True)
class DirichletConfig:
    """Label skew: each label's examples are split among clients by Dirichlet(alpha) shares.

    Small ``alpha`` (0.1) gives each client few labels; large (100) approaches iid.
    ``min_size``: every client ends with at least this many examples.
    """

    alpha: float = 0.5
    min_size: int = 1

    def __post_init__(self) -> None:
        check(self.alpha > 0, "alpha", self.alpha, "must be > 0")
        check(self.min_size >= 0, "min_size", self.min_size, "must be >= 0")


@dataclass(frozen=True)
class ShardsConfig:
    """McMahan et al.'s pathological non-iid split: ``classes_per_client`` label shards each."""

    classes_per_client: int = 2

    def __post_init__(self) -> None:
        check(self.classes_per_client >= 1, "classes_per_client", self.classes_per_client, ">= 1")


@dataclass(frozen=True)
class NaturalConfig:
    """No parameters: one client per natural key (writer, speaker), in order of appearance."""


@PARTITIONERS.register("iid", IIDConfig)
def iid(
    cfg: IIDConfig, labels: np.ndarray, num_clients: int, seed: int, groups: np.ndarray | None
) -> list[np.ndarray]:
    """Shuffle all examples and deal them into clients whose sizes differ by at most one."""
    n = len(labels)
    _check_clients(num_clients, n)
    order = partition_rng(seed).permutation(n)
    return _sorted(np.array_split(order, num_clients))


@PARTITIONERS.register("dirichlet", DirichletConfig)
def dirichlet(
    cfg: DirichletConfig,
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    groups: np.ndarray | None,
) -> list[np.ndarray]:
    """Split each label's examples among clients in Dirichlet(alpha) proportions.

    For every label (in sorted order) draw shares ``p ~ Dirichlet(alpha * ones(clients))``
    and cut that label's shuffled examples at ``floor(cumsum(p) * count)`` (Hsu et al.,
    2019). Clients left below ``min_size`` then receive random examples moved from the
    currently largest client, so the draw is made once and always terminates.
    """
    n = len(labels)
    _check_clients(num_clients, n)
    check(
        cfg.min_size * num_clients <= n,
        "partition.min_size",
        cfg.min_size,
        f"{num_clients} clients of at least {cfg.min_size} need more than the {n} examples",
    )
    rng = partition_rng(seed)
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, cfg.alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for k, piece in enumerate(np.split(members, cuts)):
            buckets[k].append(piece)
    parts = [np.concatenate(b) for b in buckets]
    sizes = np.array([len(p) for p in parts])
    for small in np.flatnonzero(sizes < cfg.min_size).tolist():
        while sizes[small] < cfg.min_size:
            # the largest client always has more than min_size while some client has less
            donor = int(np.argmax(sizes))
            take = int(min(cfg.min_size - sizes[small], sizes[donor] - cfg.min_size))
            moved = np.zeros(sizes[donor], dtype=bool)
            moved[rng.choice(sizes[donor], size=take, replace=False)] = True
            parts[small] = np.concatenate([parts[small], parts[donor][moved]])
            parts[donor] = parts[donor][~moved]
            sizes[small] += take
            sizes[donor] -= take
    return _sorted(parts)


def _shards_per_label(counts: np.ndarray, total: int) -> np.ndarray:
    """Give each label a number of shards close to ``total * count / n`` (at least one each,
    at most ``count``), summing to ``total`` (largest-remainder rounding)."""
    quota = total * counts / counts.sum()
    alloc = np.clip(np.floor(quota).astype(np.int64), 1, counts)
    while alloc.sum() < total:
        room = np.where(alloc < counts, quota - alloc, -np.inf)
        alloc[int(np.argmax(room))] += 1
    while alloc.sum() > total:
        excess = np.where(alloc > 1, quota - alloc, np.inf)
        alloc[int(np.argmin(excess))] -= 1
    return alloc


@PARTITIONERS.register("shards", ShardsConfig)
def shards(
    cfg: ShardsConfig, labels: np.ndarray, num_clients: int, seed: int, groups: np.ndarray | None
) -> list[np.ndarray]:
    """Sort by label, cut into ``clients * k`` shards, give each client ``k`` random shards.

    This is the split of McMahan et al. (2017) with one refinement: shards never straddle
    two labels (each label is cut into a number of shards proportional to its size), so a
    client holds at most ``k = classes_per_client`` distinct labels, exactly as intended.
    This needs ``clients * k`` to be at least the number of labels.
    """
    n = len(labels)
    _check_clients(num_clients, n)
    k = cfg.classes_per_client
    total = num_clients * k
    values, counts = np.unique(labels, return_counts=True)
    if total < len(values) or total > n:
        raise ConfigError(
            "clients",
            num_clients,
            f"partition=shards needs {len(values)} <= clients * classes_per_client <= {n} "
            f"(labels and examples in the data); got {num_clients} * {k} = {total}",
        )
    rng = partition_rng(seed)
    alloc = _shards_per_label(counts, total)
    pieces: list[np.ndarray] = []
    for label, m in zip(values, alloc, strict=True):
        members = rng.permutation(np.flatnonzero(labels == label))
        pieces.extend(np.array_split(members, int(m)))
    order = rng.permutation(total)
    return _sorted(
        [np.concatenate([pieces[s] for s in order[c * k : (c + 1) * k]]) for c in range(total // k)]
    )


def natural_keys(groups: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Distinct keys of ``groups`` in order of first appearance, and each key's indices."""
    keys, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    members = np.argsort(inverse.reshape(-1), kind="stable")
    bounds = np.cumsum(np.bincount(inverse.reshape(-1), minlength=len(keys)))[:-1]
    by_key = np.split(members.astype(np.int64), bounds)
    return keys[order], [by_key[i] for i in order]


@PARTITIONERS.register("natural", NaturalConfig)
def natural(
    cfg: NaturalConfig, labels: np.ndarray, num_clients: int, seed: int, groups: np.ndarray | None
) -> list[np.ndarray]:
    """One client per natural key, in order of first appearance; the first ``clients`` keys."""
    if groups is None:
        raise ConfigError(
            "partition", "natural", f"this data has no natural client key; use {SYNTHETIC}"
        )
    if len(groups) != len(labels):
        raise ValueError(f"groups has {len(groups)} keys but there are {len(labels)} labels")
    _, parts = natural_keys(groups)
    check(num_clients >= 1, "clients", num_clients, "must be >= 1")
    check(
        num_clients <= len(parts),
        "clients",
        num_clients,
        f"partition=natural gives at most {len(parts)} clients for this data "
        f"(its number of natural keys)",
    )
    return parts[:num_clients]


@dataclass(frozen=True)
class AutoConfig:
    """No parameters: ``natural`` when the data has natural clients, else ``iid``."""


def resolve_auto(groups: np.ndarray | None) -> str:
    """The partitioner ``auto`` stands for: natural with natural keys, else iid."""
    return "natural" if groups is not None else "iid"


@PARTITIONERS.register("auto", AutoConfig)
def auto(
    cfg: AutoConfig, labels: np.ndarray, num_clients: int, seed: int, groups: np.ndarray | None
) -> list[np.ndarray]:
    """natural when the data has natural clients (writers, speakers), else iid."""
    if groups is not None:
        return natural(NaturalConfig(), labels, num_clients, seed, groups)
    return iid(IIDConfig(), labels, num_clients, seed, groups)
