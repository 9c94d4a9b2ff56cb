"""FedBuff: buffered asynchronous aggregation.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba, "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS 2022 (arXiv 2106.06639).

Client k downloads ``x`` (version ``o``), runs local SGD (``E`` epochs, batch ``B``) to
``y`` and uploads ``Δ_k = y - x``. The server, at version ``v``, accepts it with staleness
``τ_k = v - o`` into a buffer and steps when the buffer holds ``K`` deltas::

    Δ̄ = Σ_{k in buffer} s(τ_k) Δ_k
    x ← x + η_g Δ̄ / K,    v ← v + 1,    buffer emptied

with ``s(τ) = 1 / sqrt(1 + τ)`` by default (the paper's; the polynomial staleness function
with ``a = 0.5``, :mod:`roost.algorithms.staleness`) and server learning rate ``η_g``.
With ``server_momentum = β > 0`` the buffered mean feeds server SGD with momentum (the
paper's "server optimizer" option): ``m ← β m + Δ̄ / K``, ``x ← x + η_g m``.
The paper writes ``Δ = x - y`` and ``x ← x - η_g Δ̄ / K``: the same step. At most
``concurrency`` clients train at once (default: the run's ``clients_per_round``).
The buffer sums in float32, as the paper's and FLSim's do (at most ``K`` terms).

FLSim's variant divides the weight by its value at an expected staleness ``τ̄``
(``avg_staleness`` there; ALGORITHMS.md §4.9), so that a result of staleness ``τ̄`` weighs
1: ``staleness_normalize_at = τ̄`` gives ``s(τ) / s(τ̄)`` (None, the default: the paper's
``s(τ)``). FLGo's and Plato's variants use no staleness weight (``staleness=constant``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

__all__ = ["FedBuff", "FedBuffConfig", "FedBuffStrategy", "delta_update"]


@dataclass(frozen=True)
class FedBuffConfig(ClientOptimConfig):
    """buffer_size: K, deltas per server step (paper and FLGo: 10).
    concurrency: clients training at once (None: the run's clients_per_round).
    server_lr: η_g. server_momentum: β of server SGD with momentum (0: plain steps).
    staleness: constant, polynomial or hinge weight s(τ); staleness_a, staleness_b its
    parameters (polynomial with a = 0.5 is the paper's 1/sqrt(1 + τ)).
    staleness_normalize_at: τ̄ of FLSim's s(τ) / s(τ̄) (None: no normalisation)."""

    buffer_size: int = 10
    concurrency: int | None = None
    server_lr: float = 1.0
    server_momentum: float = 0.0
    staleness: StalenessKind = "polynomial"
    staleness_a: float = 0.5
    staleness_b: float = 4.0
    staleness_normalize_at: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.buffer_size >= 1, "buffer_size", self.buffer_size, "must be >= 1")
        check(
            self.staleness_normalize_at is None
            or (self.staleness_normalize_at >= 0 and math.isfinite(self.staleness_normalize_at)),
            "staleness_normalize_at",
            self.staleness_normalize_at,
            "must be a staleness >= 0 (FLSim's avg_staleness) or none",
        )
        check_concurrency(self.concurrency)
        check(
            self.server_lr > 0 and math.isfinite(self.server_lr),
            "server_lr",
            self.server_lr,
            "must be a number > 0",
        )
        check_staleness(self.staleness, self.staleness_a, self.staleness_b)
        check(
            0 <= self.server_momentum < 1,
            "server_momentum",
            self.server_momentum,
            "must be in [0, 1)",
        )


def delta_update(
    ctx: ClientContext,
    model: FlatModel,
    data: ClientData,
    payload: Payload,
    cfg: ClientOptimConfig,
    mu: float = 0.0,
) -> UpdateOutput:
    """Local SGD from the payload ``w`` (on ``F_k(v) + (μ/2)||v − w||²`` when ``μ > 0``,
    TEASQ-Fed's device objective); the result is ``Δ = v − w`` with weight 1."""
    res = local_sgd(ctx, model, data, cfg, proximal_term(payload.params, mu, model))
    delta = model.params - payload.params
    return UpdateOutput(
        ClientResult({"delta": delta}, 1.0),
        None,
        {"train_loss": res.mean_loss, "local_steps": float(res.steps)},
    )


class FedBuffStrategy(AsyncStrategy):
    """The buffer and the step of the module docstring."""

    def __init__(self, cfg: FedBuffConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.concurrency = cfg.concurrency
        self.arrivals_per_step = cfg.buffer_size
        self.buffer: torch.Tensor | None = None
        self.momentum: torch.Tensor | None = None
        self.buffered = 0
        self._staleness: list[int] = []

    def accept(self, arrival: Arrival, contribution: Contribution) -> bool:
        c = self.cfg
        weight = staleness_weight(c.staleness, arrival.staleness, c.staleness_a, c.staleness_b)
        if c.staleness_normalize_at is not None:
            weight /= staleness_weight(
                c.staleness, c.staleness_normalize_at, c.staleness_a, c.staleness_b
            )
        delta = contribution.mean("delta", copy=False)  # this one result's Δ, float32
        if self.buffer is None:
            self.buffer = torch.zeros_like(delta)
        self.buffer.add_(delta, alpha=weight)
        self.buffered += 1
        self._staleness.append(arrival.staleness)
        return self.buffered >= c.buffer_size

    def arrivals_until_step(self) -> int:
        return self.cfg.buffer_size - self.buffered

    def server_step(self, step: int) -> dict[str, float]:
        assert self.buffer is not None
        c = self.cfg
        mean = self.buffer / c.buffer_size
        if c.server_momentum:
            self.momentum = (
                mean if self.momentum is None else self.momentum * c.server_momentum + mean
            )
            mean = self.momentum
        update = mean * c.server_lr if c.server_lr != 1 else mean
        self.params = self.params + update
        self.version += 1
        self.buffer, self.buffered, self._staleness = None, 0, []
        return {"update_norm": float(torch.linalg.vector_norm(update))}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "buffer": self.buffer,
            "buffered": self.buffered,
            "momentum": self.momentum,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        buffer = state.get("buffer")
        # float32 (a checkpoint written before the buffer was float32 holds float64)
        self.buffer = None if buffer is None else buffer.to(torch.float32, copy=True)
        self.buffered = int(state.get("buffered", 0))
        momentum = state.get("momentum")
        self.momentum = None if momentum is None else momentum.clone()


@register_algorithm("fedbuff")
class FedBuff(Algorithm):
    """FedBuff (Nguyen et al. 2022): local SGD deltas, buffered staleness-weighted steps."""

    Config = FedBuffConfig
    config: FedBuffConfig

    def make_strategy(self) -> Strategy:
        return FedBuffStrategy(self.config)

    def update(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> UpdateOutput:
        return delta_update(ctx, model, data, payload, self.task_config(ctx))
