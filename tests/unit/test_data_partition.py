"""Partitioners: coverage, label skew, determinism and natural keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from roost.data.mnist_idx import read_idx_labels
from roost.data.partition import (
    PARTITIONERS,
    DirichletConfig,
    IIDConfig,
    NaturalConfig,
    ShardsConfig,
    partition_rng,
)
from roost.registry import ConfigError

SHARED = (Path(__file__).parents[2] / "../shared/data").resolve()
MNIST_TRAIN_LABELS = SHARED / "mnist" / "train-labels-idx1-ubyte.gz"

SYNTHETIC = [("iid", IIDConfig()), ("dirichlet", DirichletConfig()), ("shards", ShardsConfig())]


def split(
    name: str,
    cfg: object,
    labels: np.ndarray,
    clients: int,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    return PARTITIONERS.get(name).factory(cfg, labels, clients, seed, groups)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    # 5,000 labels over 10 classes with unequal class sizes (class c has weight c + 1).
    weights = np.arange(1, 11) / np.arange(1, 11).sum()
    return np.random.default_rng(123).choice(10, size=5000, p=weights)


@pytest.fixture(scope="module")
def mnist_labels() -> np.ndarray:
    if not MNIST_TRAIN_LABELS.is_file():
        pytest.skip(f"{MNIST_TRAIN_LABELS} not present")
    return read_idx_labels(MNIST_TRAIN_LABELS).astype(np.int64)


def test_registry_names_and_config_errors() -> None:
    assert PARTITIONERS.names() == ["auto", "dirichlet", "iid", "natural", "shards"]
    assert PARTITIONERS.config("dirichlet", {"alpha": "0.1"}) == DirichletConfig(alpha=0.1)
    with pytest.raises(ConfigError) as e:
        PARTITIONERS.config("dirichlet", {"alpha": 0})
    assert e.value.key == "partition.alpha"
    with pytest.raises(ConfigError) as e:
        PARTITIONERS.config("iid", {"alpha": 1})
    assert e.value.key == "partition.alpha" and "no parameters" in str(e.value)
    with pytest.raises(ConfigError) as e:
        PARTITIONERS.config("shards", {"classes_per_client": 0})
    assert e.value.key == "partition.classes_per_client"


def test_stream_is_seed_and_purpose_5() -> None:
    assert partition_rng(7).random() == np.random.default_rng([7, 5]).random()


@pytest.mark.parametrize(("name", "cfg"), SYNTHETIC)
def test_every_example_assigned_exactly_once(name: str, cfg: object, labels: np.ndarray) -> None:
    parts = split(name, cfg, labels, 50)
    assert len(parts) == 50
    assert all(p.dtype == np.int64 and len(p) > 0 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # ascending, no repeats
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


@pytest.mark.parametrize(("name", "cfg"), SYNTHETIC)
def test_deterministic_under_seed(name: str, cfg: object, labels: np.ndarray) -> None:
    a, b = split(name, cfg, labels, 20, seed=1), split(name, cfg, labels, 20, seed=1)
    c = split(name, cfg, labels, 20, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_sizes_differ_by_at_most_one(labels: np.ndarray) -> None:
    sizes = [len(p) for p in split("iid", IIDConfig(), labels, 7)]
    assert sorted(set(sizes)) == [714, 715]  # 5000 = 2 * 715 + 5 * 714


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_give_at_most_k_labels(k: int, labels: np.ndarray) -> None:
    parts = split("shards", ShardsConfig(classes_per_client=k), labels, 40)
    assert max(len(np.unique(labels[p])) for p in parts) <= k
    # shards are about n / (clients * k) examples each, so clients are about n / clients
    sizes = np.array([len(p) for p in parts])
    assert abs(sizes.mean() - 125) < 1e-9 and sizes.min() > 0.6 * 125


def test_shards_on_mnist_match_mcmahan(mnist_labels: np.ndarray) -> None:
    # McMahan et al.: 60,000 MNIST train labels, 100 clients of 2 shards of ~300 each.
    parts = split("shards", ShardsConfig(2), mnist_labels, 100)
    assert max(len(np.unique(mnist_labels[p])) for p in parts) == 2
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 60000 and min(sizes) >= 550 and max(sizes) <= 650


def test_shards_need_enough_shards_for_all_labels(labels: np.ndarray) -> None:
    with pytest.raises(ConfigError) as e:
        split("shards", ShardsConfig(2), labels, 4)  # 8 shards for 10 labels
    assert e.value.key == "clients"


def mean_label_tv(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    glob = np.bincount(labels, minlength=10) / len(labels)
    return float(
        np.mean(
            [
                0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - glob).sum()
                for p in parts
            ]
        )
    )


def test_dirichlet_small_alpha_is_more_skewed(mnist_labels: np.ndarray) -> None:
    # Measured on MNIST's 60,000 train labels, 100 clients, seeds 0..2: mean TV distance is
    # 0.71-0.72 at alpha=0.1, 0.46 at 0.5, 0.12 at 10 and 0.04 at 100 (iid would be ~0.03).
    tv = {
        a: mean_label_tv(
            split("dirichlet", DirichletConfig(alpha=a), mnist_labels, 100), mnist_labels
        )
        for a in (0.1, 100.0)
    }
    assert tv[0.1] > 0.6
    assert tv[100.0] < 0.1
    iid_tv = mean_label_tv(split("iid", IIDConfig(), mnist_labels, 100), mnist_labels)
    assert iid_tv < tv[100.0] * 1.5


def test_dirichlet_skew_on_synthetic_labels(labels: np.ndarray) -> None:
    small = mean_label_tv(split("dirichlet", DirichletConfig(alpha=0.1), labels, 20), labels)
    large = mean_label_tv(split("dirichlet", DirichletConfig(alpha=100.0), labels, 20), labels)
    assert small > 3 * large


def test_dirichlet_min_size(labels: np.ndarray) -> None:
    # alpha=0.05 over 200 clients leaves many clients empty before the min_size top-up.
    parts = split("dirichlet", DirichletConfig(alpha=0.05, min_size=10), labels, 200)
    assert min(len(p) for p in parts) >= 10
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    with pytest.raises(ConfigError) as e:
        split("dirichlet", DirichletConfig(min_size=30), labels, 200)  # 6,000 > 5,000
    assert e.value.key == "partition.min_size"


def test_too_many_clients(labels: np.ndarray) -> None:
    with pytest.raises(ConfigError) as e:
        split("iid", IIDConfig(), labels[:10], 11)
    assert e.value.key == "clients"


def test_natural_groups_in_order_of_first_appearance() -> None:
    groups = np.array(["b", "a", "b", "c", "a", "b"])
    labels = np.zeros(6, dtype=np.int64)
    parts = split("natural", NaturalConfig(), labels, 3, groups=groups)
    assert [p.tolist() for p in parts] == [[0, 2, 5], [1, 4], [3]]
    assert all(p.dtype == np.int64 for p in parts)
    first_two = split("natural", NaturalConfig(), labels, 2, groups=groups)
    assert [p.tolist() for p in first_two] == [[0, 2, 5], [1, 4]]
    int_groups = np.array([7, 7, 3, 9, 3])
    parts = split("natural", NaturalConfig(), labels[:5], 3, groups=int_groups)
    assert [p.tolist() for p in parts] == [[0, 1], [2, 4], [3]]


def test_natural_errors() -> None:
    labels = np.zeros(4, dtype=np.int64)
    with pytest.raises(ConfigError) as e:
        split("natural", NaturalConfig(), labels, 2, groups=None)
    assert e.value.key == "partition"
    assert all(name in str(e.value) for name in ("iid", "dirichlet", "shards"))
    with pytest.raises(ConfigError) as e:
        split("natural", NaturalConfig(), labels, 3, groups=np.array([0, 0, 1, 1]))
    assert e.value.key == "clients" and "at most 2" in str(e.value)
