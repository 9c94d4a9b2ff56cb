"""W1's synthetic image data, generated per client exactly as WORKLOADS.md specifies.

Every draw comes from its own numpy stream keyed by ``(seed, purpose, ...)``, so any process
can generate any client alone, in O(n_i), independent of call order:

- client sizes, ``default_rng([seed, 0])``:
  ``int(clip(lognormal(mean=log(50), sigma=0.5, size=clients), 10, 200))``
- class prototypes, ``default_rng([seed, 1])``: ``standard_normal((10, 28, 28))`` as float32
- client i, ``default_rng([seed, 2, i])``: ``mix = dirichlet(0.5 * ones(10))``,
  ``y = choice(10, size=n_i, p=mix)``, ``x = proto[y] + standard_normal((n_i, 28, 28))``
- test set, ``default_rng([seed, 3])``: ``y = integers(0, 10, 2000)``,
  ``x = proto[y] + standard_normal((2000, 28, 28))``

``proto[y]`` is float32 and the noise float64, so the sum is float64; it is cast to float32
after the addition. Images are returned shaped (n, 1, 28, 28) float32, labels int64.

``total_examples`` (W2's scaling rule, not part of W1) rescales the drawn sizes so that
they sum to exactly that many examples: ``n_i' = floor(n_i T / Σ n)``, and the remainder
goes one each to the clients with the largest fractional parts (ties: lower id). With many
clients some hold no examples; they take part but contribute no training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from roost.data.base import ClientData, DatasetInfo, FederatedDataset

__all__ = ["W1_CLIENTS", "W1_TEST_SIZE", "W1DataConfig", "W1Dataset"]

W1_CLIENTS = 1000
W1_TEST_SIZE = 2000
_CLASSES = 10
_SIDE = 28


@dataclass(frozen=True)
class W1DataConfig:
    """total_examples: 0 keeps WORKLOADS.md's sizes; T > 0 rescales them to sum to T (so
    that 1,000 or 100,000 clients hold the same data, as W2 asks). size_sigma: the
    lognormal sigma of the sizes (W1: 0.5; the scheduling benchmark uses 1.0). The seed
    and the number of clients come from the run."""

    total_examples: int = 0
    size_sigma: float = 0.5

    def __post_init__(self) -> None:
        from roost.registry import check

        check(self.total_examples >= 0, "total_examples", self.total_examples, "must be >= 0")
        check(self.size_sigma >= 0, "size_sigma", self.size_sigma, "must be >= 0")


def rescale_sizes(sizes: np.ndarray, total: int) -> np.ndarray:
    """Sizes proportional to ``sizes`` summing to exactly ``total`` (largest remainders)."""
    exact = sizes.astype(np.float64) * total / sizes.sum()
    out = np.floor(exact).astype(np.int64)
    short = total - int(out.sum())
    if short > 0:
        order = np.lexsort((np.arange(len(sizes)), -(exact - out)))
        out[order[:short]] += 1
    return out


def _as_client_data(x: np.ndarray, y: np.ndarray) -> ClientData:
    images = torch.from_numpy(x.astype(np.float32).reshape(len(y), 1, _SIDE, _SIDE))
    return ClientData(images, torch.from_numpy(y.astype(np.int64)))


class W1Dataset(FederatedDataset):
    """The W1 workload's clients (default 1000) and its 2,000-example test set.

    Sizes and prototypes are drawn at construction (O(clients)); a client's examples are
    regenerated on every call and never cached; the test set is generated once and kept.
    """

    info = DatasetInfo((1, _SIDE, _SIDE), _CLASSES)

    def __init__(
        self,
        num_clients: int = W1_CLIENTS,
        seed: int = 0,
        total_examples: int = 0,
        size_sigma: float = 0.5,
    ) -> None:
        if num_clients < 1:
            raise ValueError(f"W1 needs at least one client, got {num_clients}")
        self.num_clients = num_clients
        self.seed = seed
        sizes = np.random.default_rng([seed, 0]).lognormal(
            mean=np.log(50), sigma=size_sigma, size=num_clients
        )
        self.sizes = np.clip(sizes, 10, 200).astype(np.int64)
        if total_examples:
            self.sizes = rescale_sizes(self.sizes, total_examples)
        self.prototypes = (
            np.random.default_rng([seed, 1])
            .standard_normal((_CLASSES, _SIDE, _SIDE))
            .astype(np.float32)
        )
        self._test: ClientData | None = None

    def num_examples(self, client_id: int) -> int:
        self.check_client(client_id)
        return int(self.sizes[client_id])

    def client_data(self, client_id: int) -> ClientData:
        self.check_client(client_id)
        n = int(self.sizes[client_id])
        rng = np.random.default_rng([self.seed, 2, client_id])
        mix = rng.dirichlet(0.5 * np.ones(_CLASSES))
        y = rng.choice(_CLASSES, size=n, p=mix)
        x = self.prototypes[y] + rng.standard_normal((n, _SIDE, _SIDE))
        return _as_client_data(x, y)

    def test_data(self) -> ClientData:
        if self._test is None:
            rng = np.random.default_rng([self.seed, 3])
            y = rng.integers(0, _CLASSES, W1_TEST_SIZE)
            x = self.prototypes[y] + rng.standard_normal((W1_TEST_SIZE, _SIDE, _SIDE))
            self._test = _as_client_data(x, y)
        return self._test
