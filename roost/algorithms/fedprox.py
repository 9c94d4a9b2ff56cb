"""FedProx: FedAvg with a proximal term in the local objective.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020 (arXiv 1812.06127).

Client k approximately minimises ``h_k(w) = F_k(w) + (μ/2)||w − w^t||²`` from ``w^t`` with
the shared local SGD loop; the proximal term enters as a gradient correction::

    g ← ∇F_k(w) + λ w + μ (w − w^t)

With ``μ = 0`` the correction is not installed at all, so FedProx is bit-identical to
FedAvg. The server is FedAvg's (:class:`~roost.algorithms.fedavg.FedAvgStrategy`, held by
composition): ``w^{t+1} = Σ n_k w_k / Σ n_k`` (uniform with ``weighted=False``; the paper
samples devices ∝ n_k and then averages uniformly, Flower and PFLlib weight by ``n_k``).
``stragglers = x`` runs the paper's systems heterogeneity (§5.2): each round a fraction
``x`` of the selected devices run a number of local epochs drawn uniformly from
``{1, ..., E}`` (:mod:`roost.algorithms.local_work`), and their partial work is kept (the
paper's FedAvg baseline drops it instead: not built here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from roost.algorithms.base import (
    Algorithm,
    ClientContext,
    Payload,
    Strategy,
    Tensors,
    UpdateOutput,
    register_algorithm,
)
from roost.algorithms.fedavg import FedAvg, FedAvgConfig, FedAvgStrategy, fedavg_update
from roost.algorithms.local_sgd import GradCorrection
from roost.algorithms.local_work import stragglers
from roost.data.base import ClientData
from roost.params import FlatModel
from roost.registry import check

__all__ = ["FedProx", "FedProxConfig", "FedProxStrategy", "proximal_correction", "proximal_term"]


@dataclass(frozen=True)
class FedProxConfig(FedAvgConfig):
    """mu: proximal coefficient μ >= 0 (paper grid 0.001, 0.01, 0.1, 1; 0 = FedAvg).
    stragglers: fraction of each round's devices that run a random 1..E epochs (the
    paper's 0, 0.5 and 0.9; 0 = none)."""

    mu: float = 0.01
    stragglers: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.mu >= 0 and math.isfinite(self.mu), "mu", self.mu, "must be a number >= 0")
        check(0 <= self.stragglers <= 1, "stragglers", self.stragglers, "must be in [0, 1]")


class FedProxStrategy(FedAvgStrategy):
    """FedAvg's server; draws the round's stragglers (module docstring)."""

    def __init__(self, fraction: float, epochs: int) -> None:
        super().__init__()
        self.fraction, self.epochs = fraction, epochs

    def configure_tasks(
        self, round: int, clients: Sequence[int], rng: np.random.Generator
    ) -> dict[int, dict[str, Any]]:
        return stragglers(clients, rng, self.fraction, self.epochs)


def proximal_correction(anchor: torch.Tensor, mu: float, scratch: torch.Tensor) -> GradCorrection:
    """The gradient of ``(μ/2)||w − anchor||²``, added in place: ``g += μ (w − anchor)``.

    ``scratch`` (the model's resident buffer) holds ``w − anchor``; nothing is allocated.
    """

    def correction(params: torch.Tensor, grads: torch.Tensor) -> None:
        torch.sub(params, anchor, out=scratch)
        grads.add_(scratch, alpha=mu)

    return correction


def proximal_term(anchor: torch.Tensor, mu: float, model: FlatModel) -> GradCorrection | None:
    """:func:`proximal_correction` in the model's ``"proximal"`` scratch buffer, or None
    for ``μ = 0`` (nothing installed: plain local SGD, bit for bit)."""
    if mu == 0:
        return None
    return proximal_correction(anchor, mu, model.scratch("proximal"))


@register_algorithm("fedprox")
class FedProx(Algorithm):
    """FedProx (Li et al. 2020): local SGD on F_k + (μ/2)||w − w^t||², FedAvg server."""

    Config = FedProxConfig
    config: FedProxConfig

    def __init__(self, config: FedProxConfig) -> None:
        super().__init__(config)
        self.fedavg = FedAvg(config)

    def make_strategy(self) -> Strategy:
        if self.config.stragglers:
            return FedProxStrategy(self.config.stragglers, self.config.local_epochs)
        return self.fedavg.make_strategy()

    def update(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> UpdateOutput:
        cfg = self.task_config(ctx)
        correction = proximal_term(payload.params, cfg.mu, model)
        return fedavg_update(ctx, model, data, cfg, cfg.weighted, correction)
