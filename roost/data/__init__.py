"""Data sets and partitioners, registered by name for ``data=NAME`` and ``partition=NAME``.

A data loader's factory takes ``(config, clients, seed)`` and returns either a ready
:class:`FederatedDataset` (data generated per client, such as ``w1``) or a
:class:`CentralData` (one train/test set, with optional natural client keys) that
:func:`build_dataset` then splits with a partitioner. ``partition=auto`` means ``natural``
when the data has natural clients (LEAF users, speakers) and ``iid`` otherwise.

Seeded random streams, all ``np.random.default_rng([seed, purpose, ...])``: W1 uses purposes
0 to 4 (see :mod:`roost.data.synthetic_w1`), partitioners 5, train/test splits 6.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from roost.data.arrays import ArrayFederatedDataset, CentralData, subset
from roost.data.base import ClientData, DatasetInfo, FederatedDataset
from roost.data.cifar import CifarConfig, load_cifar_data
from roost.data.digits import DigitsConfig, load_digits_data
from roost.data.leaf import LeafConfig, load_leaf_data
from roost.data.mnist_idx import MnistConfig, load_mnist_data
from roost.data.partition import PARTITIONERS, SYNTHETIC, natural_keys, resolve_auto
from roost.data.synthetic_w1 import W1_CLIENTS, W1DataConfig, W1Dataset
from roost.data.text import TextConfig, load_text_data
from roost.registry import ConfigError, Registry, check

__all__ = [
    "AUTO",
    "DATA",
    "NATURAL_CLIENTS",
    "PARTITIONERS",
    "ArrayFederatedDataset",
    "CentralData",
    "CifarConfig",
    "ClientData",
    "DataLoader",
    "DatasetInfo",
    "DigitsConfig",
    "FederatedDataset",
    "LeafConfig",
    "MnistConfig",
    "TextConfig",
    "W1DataConfig",
    "W1Dataset",
    "build_dataset",
    "partition_data",
]

DataLoader = Callable[[Any, int | None, int], FederatedDataset | CentralData]

DATA: Registry[DataLoader] = Registry("data")

AUTO = "auto"
"""Partition name meaning natural when the data has natural clients, else iid."""

NATURAL_CLIENTS = "natural_clients"
"""Tag of a data loader whose data comes in natural clients (writers, speakers, or data
generated per client): selecting it on top of a preset gives ``partition=natural`` with
every natural client unless the user sets ``partition`` or ``clients`` too."""


@DATA.register("w1", W1DataConfig, tags=[NATURAL_CLIENTS])
def _w1(cfg: W1DataConfig, clients: int | None, seed: int) -> W1Dataset:
    """W1's synthetic 28x28 images, generated per client (1000 clients unless set)."""
    n = W1_CLIENTS if clients is None else clients
    return W1Dataset(n, seed, cfg.total_examples, cfg.size_sigma)


@DATA.register("digits", DigitsConfig)
def _digits(cfg: DigitsConfig, clients: int | None, seed: int) -> CentralData:
    """scikit-learn's 1,797 8x8 digits (or data.path=digits.csv.gz)."""
    return load_digits_data(cfg, seed)


@DATA.register("mnist", MnistConfig)
def _mnist(cfg: MnistConfig, clients: int | None, seed: int) -> CentralData:
    """MNIST-style IDX files from the folder data.path."""
    return load_mnist_data(cfg, seed)


@DATA.register("cifar", CifarConfig)
def _cifar(cfg: CifarConfig, clients: int | None, seed: int) -> CentralData:
    """CIFAR-10 or CIFAR-100 python-version batches from the folder data.path."""
    return load_cifar_data(cfg)


@DATA.register("leaf", LeafConfig, tags=[NATURAL_CLIENTS])
def _leaf(cfg: LeafConfig, clients: int | None, seed: int) -> CentralData:
    """LEAF JSON shards (e.g. FEMNIST) from data.path; one user = one client."""
    return load_leaf_data(cfg, seed)


@DATA.register("text", TextConfig, tags=[NATURAL_CLIENTS])
def _text(cfg: TextConfig, clients: int | None, seed: int) -> CentralData:
    """A play as plain text (Tiny Shakespeare), one speaker = one client, next-char windows."""
    return load_text_data(cfg, seed)


def partition_data(
    data: CentralData,
    partition_name: str,
    partition_params: Mapping[str, Any],
    clients: int | None,
    seed: int,
) -> ArrayFederatedDataset:
    """Split ``data.train`` among clients with the named partitioner.

    With the ``natural`` partition each client also gets its own test split: the test
    examples carrying its natural key. ``clients=None`` means every natural client.
    """
    PARTITIONERS.config(partition_name, partition_params)  # auto takes no parameters
    name = resolve_auto(data.groups) if partition_name == AUTO else partition_name
    cfg = PARTITIONERS.config(name, partition_params)
    if name == "natural" and data.groups is None:
        raise ConfigError(
            "partition", name, f"this data has no natural client key; use {SYNTHETIC}"
        )
    if clients is None:
        if data.groups is None or name != "natural":
            why = (
                " (auto chose iid: this data has no natural clients)"
                if name != partition_name
                else ""
            )
            raise ConfigError("clients", None, f"set clients=N for partition={name}{why}")
        clients = len(natural_keys(data.groups)[0])
    labels = data.train.y.numpy()
    parts = PARTITIONERS.get(name).factory(cfg, labels, clients, seed, data.groups)
    client_tests = None
    if name == "natural" and data.test_groups is not None and data.groups is not None:
        keys, members = natural_keys(data.test_groups)
        by_key = dict(zip(keys.tolist(), members, strict=True))
        empty = np.zeros(0, dtype=np.int64)
        client_tests = [by_key.get(data.groups[p[0]].item(), empty) for p in parts]
    test = data.test
    if test is not None and data.central_test is not None:
        test = subset(test, data.central_test)
    return ArrayFederatedDataset(data.train, parts, data.info, test, client_tests, data.test)


def build_dataset(
    data_name: str,
    data_params: Mapping[str, Any],
    partition_name: str,
    partition_params: Mapping[str, Any],
    clients: int | None,
    seed: int,
) -> FederatedDataset:
    """Load ``data=data_name`` and split it with ``partition=partition_name``.

    Configs are validated before any data is read: unknown names, unknown keys and bad
    values raise :class:`ConfigError` naming the key (``data.path``, ``partition.alpha``).
    """
    data_cfg = DATA.config(data_name, data_params)
    PARTITIONERS.config(partition_name, partition_params)
    check(clients is None or clients >= 1, "clients", clients, "must be >= 1")
    loaded = DATA.get(data_name).factory(data_cfg, clients, seed)
    if isinstance(loaded, FederatedDataset):
        if partition_name not in ("natural", AUTO):
            raise ConfigError(
                "partition",
                partition_name,
                f"data={data_name} is generated per client; use partition=natural",
            )
        return loaded
    return partition_data(loaded, partition_name, partition_params, clients, seed)
