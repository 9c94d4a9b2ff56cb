"""build_dataset (names, config errors, auto, clients) and ArrayFederatedDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from roost.data import (
    DATA,
    ArrayFederatedDataset,
    CentralData,
    ClientData,
    DatasetInfo,
    W1Dataset,
    build_dataset,
    partition_data,
)
from roost.registry import ConfigError

INFO = DatasetInfo((2,), 3)


def central(
    groups: np.ndarray | None = None,
    test_groups: np.ndarray | None = None,
    central_test: np.ndarray | None = None,
) -> CentralData:
    """12 train examples (x[i] = [i, -i], y = i % 3) and 6 test examples (x[j] = [100 + j, 0])."""
    x = torch.stack([torch.arange(12.0), -torch.arange(12.0)], dim=1)
    train = ClientData(x, torch.arange(12) % 3)
    test = ClientData(
        torch.stack([100 + torch.arange(6.0), torch.zeros(6)], 1), torch.arange(6) % 3
    )
    return CentralData(train, test, INFO, groups, test_groups, central_test)


def test_registered_names() -> None:
    assert DATA.names() == ["cifar", "digits", "leaf", "mnist", "text", "w1"]


def test_unknown_names_and_keys() -> None:
    with pytest.raises(ConfigError) as e:
        build_dataset("imagenet", {}, "iid", {}, 10, 0)
    assert e.value.key == "data" and "digits" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_dataset("w1", {"clients": 5}, "auto", {}, None, 0)
    assert e.value.key == "data.clients" and "allowed: size_sigma, total_examples" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_dataset("w1", {}, "random", {}, None, 0)
    assert e.value.key == "partition" and "auto" in str(e.value) and "shards" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_dataset("w1", {}, "dirichlet", {"beta": 1}, None, 0)
    assert e.value.key == "partition.beta" and "alpha" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_dataset("w1", {}, "natural", {}, 0, 0)
    assert e.value.key == "clients"


def test_w1_needs_natural_partition() -> None:
    with pytest.raises(ConfigError) as e:
        build_dataset("w1", {}, "iid", {}, 10, 0)
    assert e.value.key == "partition" and e.value.value == "iid"
    assert str(e.value) == "partition=iid: data=w1 is generated per client; use partition=natural"
    assert isinstance(build_dataset("w1", {}, "natural", {}, 10, 0), W1Dataset)


def test_auto_is_iid_without_groups() -> None:
    ds = partition_data(central(), "auto", {}, 4, seed=0)
    assert ds.num_clients == 4 and [ds.num_examples(i) for i in range(4)] == [3, 3, 3, 3]
    assert ds.client_test_data(0) is None
    with pytest.raises(ConfigError) as e:
        partition_data(central(), "auto", {}, None, seed=0)
    assert e.value.key == "clients" and "partition=iid" in str(e.value)
    with pytest.raises(ConfigError) as e:
        partition_data(central(), "shards", {}, None, seed=0)
    assert str(e.value) == "clients=None: set clients=N for partition=shards"
    with pytest.raises(ConfigError) as e:
        partition_data(central(), "natural", {}, 2, seed=0)
    assert e.value.key == "partition" and "iid, dirichlet or shards" in str(e.value)


def test_natural_with_client_tests_and_central_cap() -> None:
    groups = np.array([5, 5, 2, 2, 2, 9, 9, 9, 9, 5, 2, 9])
    test_groups = np.array([9, 2, 2, 7, 9, 9])  # key 7 has no train examples, 5 no test
    data = central(groups, test_groups, central_test=np.array([0, 3]))
    ds = partition_data(data, "auto", {}, None, seed=0)
    assert ds.num_clients == 3  # keys 5, 2, 9 in order of first appearance
    assert [ds.client_data(i).x[:, 0].tolist() for i in range(3)] == [
        [0, 1, 9],
        [2, 3, 4, 10],
        [5, 6, 7, 8, 11],
    ]
    assert ds.client_test_data(0) is None  # key 5 has no test examples
    tests = [ds.client_test_data(i) for i in (1, 2)]
    assert [t.x[:, 0].tolist() for t in tests if t is not None] == [[101, 102], [100, 104, 105]]
    central_test = ds.test_data()
    assert central_test is not None and central_test.x[:, 0].tolist() == [100, 103]
    two = partition_data(data, "natural", {}, 2, seed=0)
    assert two.num_clients == 2 and two.num_examples(1) == 4


def test_array_dataset_materialises_on_demand() -> None:
    data = central()
    ds = ArrayFederatedDataset(data.train, [np.array([3, 1]), np.array([0])], INFO, data.test)
    assert ds.num_clients == 2 and ds.num_examples(0) == 2
    first = ds.client_data(0)
    assert first.x[:, 0].tolist() == [3, 1] and first.y.tolist() == [0, 1]
    first.x.zero_()  # a copy: the dataset is unchanged
    assert ds.client_data(0).x[:, 0].tolist() == [3, 1]
    assert ds.test_data() is data.test and ds.client_test_data(1) is None
    with pytest.raises(IndexError):
        ds.client_data(2)
    with pytest.raises(ValueError, match=r"outside 0\.\.11"):
        ArrayFederatedDataset(data.train, [np.array([12])], INFO, None)
    with pytest.raises(ValueError, match="client_tests has 1 entries for 2 clients"):
        ArrayFederatedDataset(
            data.train,
            [np.array([0]), np.array([1])],
            INFO,
            data.test,
            client_tests=[np.array([0])],
        )
    with pytest.raises(ValueError, match="groups has 3 keys but train has 12"):
        CentralData(data.train, None, INFO, groups=np.zeros(3))


def test_natural_without_groups_and_no_clients() -> None:
    with pytest.raises(ConfigError) as e:
        partition_data(central(), "natural", {}, None, seed=0)
    assert e.value.key == "partition" and "iid, dirichlet or shards" in str(e.value)
    with pytest.raises(ConfigError) as e:
        partition_data(central(), "auto", {"alpha": 1}, 2, seed=0)
    assert e.value.key == "partition.alpha" and "no parameters" in str(e.value)
