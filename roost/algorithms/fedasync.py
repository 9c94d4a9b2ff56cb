"""FedAsync: asynchronous federated optimisation with staleness-weighted mixing.

Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", 2019 (arXiv 1903.03934).

Client k receives ``x_o`` (version ``o``) and approximately minimises the regularised
objective ``f_k(x) + (ρ/2)||x - x_o||²`` with local SGD (``E`` epochs, batch ``B``), giving
``x_new``. The server, at version ``v`` when it arrives (staleness ``τ = v - o``), mixes
it in at once::

    α_v = α · s(τ)
    x ← (1 - α_v) x + α_v x_new,    v ← v + 1

with a staleness function ``s`` (:mod:`roost.algorithms.staleness`: constant, polynomial
``(τ + 1)^(-a)``, hinge). Every arrival is one server step. At most ``concurrency``
clients train at once (default: the run's ``clients_per_round``).

Defaults: α = 0.6 and ρ = 0.005 (FLGo's ``fedasync.py``; the paper's grid has α in
{0.6, 0.9}, ρ about 0.005-0.01), polynomial staleness with a = 0.5 (the paper's
FedAsync+Poly). Paper-faithfulness of the defaults: not verified (ALGORITHMS.md §4.8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from roost.algorithms.asynchronous import Arrival, AsyncStrategy, check_concurrency
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
from roost.algorithms.fedprox import proximal_term
from roost.algorithms.local_sgd import local_sgd
from roost.algorithms.staleness import StalenessKind, check_staleness, staleness_weight
from roost.data.base import ClientData
from roost.params import FlatModel
from roost.registry import check

__all__ = ["FedAsync", "FedAsyncConfig", "FedAsyncStrategy"]


@dataclass(frozen=True)
class FedAsyncConfig(ClientOptimConfig):
    """alpha: mixing weight α in (0, 1]. rho: the regulariser ρ >= 0 of the local
    objective (0: plain local SGD). concurrency: clients training at once (None: the
    run's clients_per_round). staleness: constant, polynomial or hinge s(τ), with
    staleness_a and staleness_b its parameters."""

    alpha: float = 0.6
    rho: float = 0.005
    concurrency: int | None = None
    staleness: StalenessKind = "polynomial"
    staleness_a: float = 0.5
    staleness_b: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.alpha <= 1, "alpha", self.alpha, "must be in (0, 1]")
        check(self.rho >= 0 and math.isfinite(self.rho), "rho", self.rho, "must be >= 0")
        check_concurrency(self.concurrency)
        check_staleness(self.staleness, self.staleness_a, self.staleness_b)


class FedAsyncStrategy(AsyncStrategy):
    """Mixes every arriving model into the global one (module docstring)."""

    arrivals_per_step = 1

    def __init__(self, cfg: FedAsyncConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.concurrency = cfg.concurrency
        self._pending: tuple[Arrival, torch.Tensor] | None = None

    def mixing_weight(self, arrival: Arrival) -> float:
        """``α · s(τ)``."""
        c = self.cfg
        return c.alpha * staleness_weight(
            c.staleness, arrival.staleness, c.staleness_a, c.staleness_b
        )

    def accept(self, arrival: Arrival, contribution: Contribution) -> bool:
        self._pending = (arrival, contribution.mean("params"))
        return True

    def arrivals_until_step(self) -> int:
        return 1

    def server_step(self, step: int) -> dict[str, float]:
        assert self._pending is not None
        arrival, new = self._pending
        self._pending = None
        a = self.mixing_weight(arrival)
        mixed = torch.lerp(self.params, new, a) if a < 1 else new
        update_norm = float(torch.linalg.vector_norm(mixed - self.params))
        self.params = mixed
        self.version += 1
        return {"update_norm": update_norm, "mixing_weight": a}


@register_algorithm("fedasync")
class FedAsync(Algorithm):
    """FedAsync (Xie et al. 2019): regularised local SGD, staleness-weighted mixing."""

    Config = FedAsyncConfig
    config: FedAsyncConfig

    def make_strategy(self) -> Strategy:
        return FedAsyncStrategy(self.config)

    def update(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> UpdateOutput:
        cfg = self.task_config(ctx)
        res = local_sgd(ctx, model, data, cfg, proximal_term(payload.params, cfg.rho, model))
        return UpdateOutput(
            ClientResult({"params": model.params}, 1.0),
            None,
            {"train_loss": res.mean_loss, "local_steps": float(res.steps)},
        )
