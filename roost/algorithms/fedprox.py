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
``{1, ..., E}`` (:mod:`roost.algorithms.local_work`), and their partial work is kept.
The paper's FedAvg baseline instead drops the devices that cannot finish ``E`` epochs
(§5.2: "FedAvg simply drops devices that fail to perform E epochs"): that is
``straggler_work = "drop"``, run with ``μ = 0``. In synchronous rounds the dropped
stragglers are removed from the selected cohort before dispatch (their work would be
thrown away, so it is never computed, and never charged to the round's time): the cohort
is drawn as usual, then ``round(x · K)`` of its ``K`` clients are drawn without
replacement from the same selection stream and dropped. Each step's record counts them
as ``stragglers_dropped``. Under the same seed the dropped set is not partial mode's
straggler set (that one is drawn from the round's task stream); both are uniform draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from roost.algorithms.base import (
    Algorithm,
    ClientContext,
    Contribution,
    Payload,
    Strategy,
    Tensors,
    UpdateOutput,
    register_algorithm,
)
from roost.algorithms.fedavg import FedAvg, FedAvgConfig, FedAvgStrategy, fedavg_update
from roost.algorithms.local_sgd import GradCorrection
from roost.algorithms.local_work import straggler_count, stragglers
from roost.data.base import ClientData
from roost.params import FlatModel
from roost.registry import check

__all__ = [
    "DropStragglersStrategy",
    "FedProx",
    "FedProxConfig",
    "FedProxStrategy",
    "proximal_correction",
    "proximal_term",
]


@dataclass(frozen=True)
class FedProxConfig(FedAvgConfig):
    """mu: proximal coefficient μ >= 0 (paper grid 0.001, 0.01, 0.1, 1; 0 = FedAvg).
    stragglers: fraction of each round's devices that run a random 1..E epochs (the
    paper's 0, 0.5 and 0.9; 0 = none).
    straggler_work: what becomes of a straggler's work: ``partial`` (FedProx: its 1..E
    epochs are aggregated) or ``drop`` (the paper's FedAvg baseline, with mu=0: the
    straggler is dropped from the round and never computed)."""

    mu: float = 0.01
    stragglers: float = 0.0
    straggler_work: Literal["partial", "drop"] = "partial"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.mu >= 0 and math.isfinite(self.mu), "mu", self.mu, "must be a number >= 0")
        check(0 <= self.stragglers <= 1, "stragglers", self.stragglers, "must be in [0, 1]")
        check(
            self.straggler_work in ("partial", "drop"),
            "straggler_work",
            self.straggler_work,
            "must be 'partial' (FedProx keeps their work) or 'drop' (FedAvg's baseline)",
        )


class FedProxStrategy(FedAvgStrategy):
    """FedAvg's server; draws the round's stragglers and keeps their partial work."""

    def __init__(self, fraction: float, epochs: int) -> None:
        super().__init__()
        self.fraction, self.epochs = fraction, epochs

    def configure_tasks(
        self, round: int, clients: Sequence[int], rng: np.random.Generator
    ) -> dict[int, dict[str, Any]]:
        return stragglers(clients, rng, self.fraction, self.epochs)


class DropStragglersStrategy(FedAvgStrategy):
    """FedAvg's server that drops the round's stragglers (the FedProx paper's FedAvg
    baseline): the selected cohort minus ``round(fraction · K)`` of its clients, drawn
    without replacement from the selection's stream after the cohort."""

    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction
        self.dropped = 0

    def select(
        self, round: int, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> list[int]:
        cohort = super().select(round, candidates, k, rng)
        count = straggler_count(self.fraction, len(cohort))
        drop = set(rng.choice(len(cohort), size=count, replace=False).tolist()) if count else ()
        self.dropped = count
        return [c for i, c in enumerate(cohort) if i not in drop]

    def step(self, round: int, contributions: Sequence[Contribution]) -> dict[str, float]:
        return {**super().step(round, contributions), "stragglers_dropped": float(self.dropped)}


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
        if self.config.stragglers and self.config.straggler_work == "drop":
            return DropStragglersStrategy(self.config.stragglers)
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
