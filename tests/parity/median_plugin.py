"""A test plugin: FedAvg clients with a coordinate-wise median server (Yin et al., ICML
2018), a rule that is not a sum, so the runtime must hand the strategy one result per
client. Loaded with ``imports=<this file>`` by the server and by every worker."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from roost.algorithms.base import Contribution, Strategy, register_algorithm
from roost.algorithms.fedavg import FedAvg


class MedianStrategy(Strategy):
    """``w ← median_k(w_k)`` coordinate-wise over the round's clients."""

    aggregation = "per_client"

    def step(self, round: int, contributions: Sequence[Contribution]) -> dict[str, float]:
        if not contributions:
            return {}
        models = torch.stack([c.mean("params") for c in contributions])
        self.params = models.median(dim=0).values
        self.version += 1
        return {"clients_in_median": float(len(contributions))}


@register_algorithm("test_median")
class Median(FedAvg):
    def make_strategy(self) -> Strategy:
        return MedianStrategy()
