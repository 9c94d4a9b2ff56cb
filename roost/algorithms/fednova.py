"""FedNova: normalised averaging of local updates.

Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020 (arXiv 2007.07481).

Client k runs ``τ_k`` steps of the shared local SGD (momentum ρ = ``momentum``) from
``w^t`` to ``w_k``; ``τ_k`` differs across clients when their example counts (or epochs)
do. Its update is normalised by the number of effective steps::

    a_k = [τ_k − ρ (1 − ρ^{τ_k}) / (1 − ρ)] / (1 − ρ)      (a_k = τ_k when ρ = 0)
    d_k = (w^t − w_k) / a_k

``a_k = Σ_{i=1..τ_k} (1 − ρ^i)/(1 − ρ)`` is the official code's running normaliser
(github.com/JYWa/FedNova ``distoptim/FedNova.py``). The client returns tensor ``d`` = d_k,
scalar ``a`` = a_k, weight ``n_k``. With ``p_k = n_k / Σ_{j∈S_t} n_j`` the server does::

    τ_eff   = Σ p_k a_k
    w^{t+1} = w^t − η_g τ_eff Σ p_k d_k

(η_g = ``server_lr``, 1 by default), as in Flower's ``baselines/niid_bench`` FedNova
strategy. With ρ = 0 and equal τ_k this is exactly FedAvg. The paper's optional proximal
term (FedProx + FedNova) is not implemented here.

``local_epochs_max`` runs the paper's heterogeneous setting: each client's epochs are
drawn per round uniformly from ``local_epochs..local_epochs_max``
(:mod:`roost.algorithms.local_work`; the paper used 2 to 5).
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
    ClientOptimConfig,
    ClientResult,
    Contribution,
    Payload,
    Strategy,
    Tensors,
    UpdateOutput,
    register_algorithm,
)
from roost.algorithms.fedavg import combine
from roost.algorithms.local_sgd import local_sgd
from roost.algorithms.local_work import random_epochs
from roost.data.base import ClientData
from roost.params import FlatModel
from roost.registry import check

__all__ = ["FedNova", "FedNovaConfig", "FedNovaStrategy", "fednova_normalizer"]


@dataclass(frozen=True)
class FedNovaConfig(ClientOptimConfig):
    """server_lr: global learning rate η_g (> 0; 1 = the paper's default).
    local_epochs_max: draw each client's epochs per round from local_epochs..this
    (None: every client runs local_epochs)."""

    server_lr: float = 1.0
    local_epochs_max: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.server_lr > 0 and math.isfinite(self.server_lr),
            "server_lr",
            self.server_lr,
            "must be a number > 0",
        )
        check(
            self.local_epochs_max is None or self.local_epochs_max >= self.local_epochs,
            "local_epochs_max",
            self.local_epochs_max,
            f"must be >= local_epochs ({self.local_epochs}) or none",
        )


def fednova_normalizer(steps: int, rho: float) -> float:
    """``a = [τ − ρ(1 − ρ^τ)/(1 − ρ)] / (1 − ρ)`` for τ = ``steps`` (τ itself when ρ = 0)."""
    if rho == 0:
        return float(steps)
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


class FedNovaStrategy(Strategy):
    """``w ← w − η_g τ_eff Σ p_k d_k`` with ``τ_eff = Σ p_k a_k`` (p_k = n_k / Σ n)."""

    def __init__(self, server_lr: float = 1.0, epochs: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.server_lr = server_lr
        self.epochs = epochs

    def configure_tasks(
        self, round: int, clients: Sequence[int], rng: np.random.Generator
    ) -> dict[int, dict[str, Any]]:
        """Each client's epochs drawn uniformly from ``epochs`` (when set)."""
        if self.epochs is None:
            return {}
        return random_epochs(clients, rng, *self.epochs)

    def step(self, round: int, contributions: Sequence[Contribution]) -> dict[str, float]:
        total = combine(contributions)
        if total is None:
            return {}
        tau_eff = total.scalar_mean("a")
        update = total.mean("d").mul_(self.server_lr * tau_eff)
        self.params = self.params - update
        self.version += 1
        return {"tau_eff": tau_eff, "update_norm": float(torch.linalg.vector_norm(update))}


@register_algorithm("fednova")
class FedNova(Algorithm):
    """FedNova (Wang et al. 2020): step-normalised local updates, rescaled by τ_eff."""

    Config = FedNovaConfig
    config: FedNovaConfig
    compressible = False

    def make_strategy(self) -> Strategy:
        c = self.config
        epochs = None if c.local_epochs_max is None else (c.local_epochs, c.local_epochs_max)
        return FedNovaStrategy(c.server_lr, epochs)

    def update(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> UpdateOutput:
        w_global = payload.params
        res = local_sgd(ctx, model, data, self.task_config(ctx))
        a = fednova_normalizer(res.steps, self.config.momentum)
        # d_k = (w^t − w_k) / a_k, written into the gradient buffer (free after training)
        # so the task allocates nothing and the trained weights stay in place.
        d = torch.sub(w_global, model.params, out=model.grads)
        if a > 0:
            d.div_(a)
        else:
            d.zero_()
        return UpdateOutput(
            ClientResult({"d": d}, float(ctx.num_examples), {"a": a}),
            None,
            {"train_loss": res.mean_loss, "local_steps": float(res.steps)},
        )
