"""W1 data against an independent re-implementation of WORKLOADS.md's "W1's random streams".

The reference functions below are written straight from that table (not from roost's code):
every implementation of W1 must produce bit-identical clients and test set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from roost.data import W1Dataset, build_dataset


def reference_sizes(seed: int, clients: int) -> list[int]:
    raw = np.random.default_rng([seed, 0]).lognormal(mean=np.log(50), sigma=0.5, size=clients)
    return [int(v) for v in np.clip(raw, 10, 200)]


def reference_prototypes(seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 1]).standard_normal((10, 28, 28)).astype(np.float32)


def reference_client(seed: int, i: int, n_i: int) -> tuple[np.ndarray, np.ndarray]:
    proto = reference_prototypes(seed)
    rng = np.random.default_rng([seed, 2, i])
    mix = rng.dirichlet(0.5 * np.ones(10))
    y = rng.choice(10, size=n_i, p=mix)
    x = proto[y] + rng.standard_normal((n_i, 28, 28))
    return x.astype(np.float32).reshape(n_i, 1, 28, 28), y


def reference_test(seed: int) -> tuple[np.ndarray, np.ndarray]:
    proto = reference_prototypes(seed)
    rng = np.random.default_rng([seed, 3])
    y = rng.integers(0, 10, 2000)
    x = proto[y] + rng.standard_normal((2000, 28, 28))
    return x.astype(np.float32).reshape(2000, 1, 28, 28), y


@pytest.fixture(scope="module")
def w1() -> W1Dataset:
    return W1Dataset(1000, seed=0)


def test_sizes_follow_the_rule(w1: W1Dataset) -> None:
    sizes = [w1.num_examples(i) for i in range(1000)]
    assert sizes == reference_sizes(0, 1000)
    assert min(sizes) >= 10 and max(sizes) <= 200
    # Pinned for seed 0 with numpy's PCG64 streams: 1000 clients hold 54,423 examples
    # (about 1000 * 50 * exp(0.5**2 / 2) = 56,657 before clipping and truncation).
    assert sum(sizes) == 54423


@pytest.mark.parametrize("client", [0, 1, 17, 999])
def test_client_data_is_bit_identical(w1: W1Dataset, client: int) -> None:
    n = reference_sizes(0, 1000)[client]
    x_ref, y_ref = reference_client(0, client, n)
    data = w1.client_data(client)
    assert data.x.dtype == torch.float32 and data.y.dtype == torch.int64
    assert tuple(data.x.shape) == (n, 1, 28, 28)
    assert np.array_equal(data.y.numpy(), y_ref)
    assert np.array_equal(data.x.numpy(), x_ref)


def test_test_set_is_bit_identical_and_cached(w1: W1Dataset) -> None:
    x_ref, y_ref = reference_test(0)
    test = w1.test_data()
    assert tuple(test.x.shape) == (2000, 1, 28, 28)
    assert np.array_equal(test.y.numpy(), y_ref)
    assert np.array_equal(test.x.numpy(), x_ref)
    assert w1.test_data() is test


def test_clients_are_order_independent_and_not_cached() -> None:
    a = W1Dataset(50, seed=3)
    b = W1Dataset(50, seed=3)
    for i in (40, 2, 11):
        a.client_data(i)
    first, second = a.client_data(7), b.client_data(7)
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)
    assert a.client_data(7).x is not first.x  # regenerated on every call
    x_ref, _ = reference_client(3, 7, reference_sizes(3, 50)[7])
    assert np.array_equal(first.x.numpy(), x_ref)


def test_label_mix_is_skewed(w1: W1Dataset) -> None:
    # Dirichlet(0.5) over 10 classes: a client's most common label holds on average about
    # 40% of its examples (0.418 for these 100), far from the 10% of a uniform mix.
    top = [
        np.bincount(w1.client_data(i).y.numpy(), minlength=10).max() / w1.num_examples(i)
        for i in range(100)
    ]
    assert 0.3 < float(np.mean(top)) < 0.6


def test_registry_entry_defaults_to_1000_clients() -> None:
    ds = build_dataset("w1", {}, "auto", {}, None, seed=0)
    assert ds.num_clients == 1000
    assert ds.info.input_shape == (1, 28, 28) and ds.info.num_classes == 10
    small = build_dataset("w1", {}, "natural", {}, 10, seed=0)
    assert [small.num_examples(i) for i in range(10)] == reference_sizes(0, 10)
    with pytest.raises(IndexError):
        small.client_data(10)
