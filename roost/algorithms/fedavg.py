"""FedAvg: federated averaging.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017 (arXiv 1602.05629).

Client k starts from the global model ``w^t`` and runs ``E`` epochs of minibatch SGD
(batch ``B``, :func:`~roost.algorithms.local_sgd.local_sgd`), giving ``w_k``. It returns
``w_k`` with weight ``n_k`` (its number of examples; 1 with ``weighted=False``). Server::

    w^{t+1} = Σ_{k∈S_t} n_k w_k / Σ_{k∈S_t} n_k

``weighted=False`` gives the uniform mean ``(1/|S_t|) Σ w_k`` instead. Weights follow
Flower's ``strategy/fedavg.py`` (``num_examples``).

The client rule (:func:`fedavg_update`), the server strategy (:class:`FedAvgStrategy`) and
:func:`combine` are reused by composition by FedProx and the FedOpt family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
from roost.algorithms.local_sgd import GradCorrection, local_sgd
from roost.data.base import ClientData
from roost.params import FlatModel
from roost.registry import check

__all__ = ["FedAvg", "FedAvgConfig", "FedAvgStrategy", "combine", "fedavg_update"]


@dataclass(frozen=True)
class FedAvgConfig(ClientOptimConfig):
    """weighted: weight each client by its number of examples (False: uniform mean)."""

    weighted: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.weighted, bool), "weighted", self.weighted, "expected true or false")


def combine(contributions: Sequence[Contribution]) -> Contribution | None:
    """One contribution holding all of ``contributions``; None when no weight was folded.

    The engine hands a ``"sum"`` strategy exactly one contribution; several partial sums
    are merged (into a new object, so the caller's are left untouched).
    """
    if len(contributions) == 1:
        total = contributions[0]
    else:
        total = Contribution()
        for c in contributions:
            total.merge(c)
    if total.count == 0 or total.weight <= 0:
        return None
    return total


def fedavg_update(
    ctx: ClientContext,
    model: FlatModel,
    data: ClientData,
    cfg: ClientOptimConfig,
    weighted: bool = True,
    correction: GradCorrection | None = None,
) -> UpdateOutput:
    """Train the resident model in place and return its parameters (aliased, not copied)."""
    res = local_sgd(ctx, model, data, cfg, correction)
    weight = float(ctx.num_examples) if weighted else 1.0
    return UpdateOutput(
        ClientResult({"params": model.params}, weight),
        None,
        {"train_loss": res.mean_loss, "local_steps": float(res.steps)},
    )


class FedAvgStrategy(Strategy):
    """``params ← Σ w_k x_k / Σ w_k`` over the folded ``"params"`` tensors.

    A round in which no client contributed leaves the model and its version unchanged.
    """

    def step(self, round: int, contributions: Sequence[Contribution]) -> dict[str, float]:
        total = combine(contributions)
        if total is None:
            return {}
        new = total.mean("params")
        update_norm = float(torch.linalg.vector_norm(new - self.params))
        self.params = new
        self.version += 1
        return {"update_norm": update_norm}


@register_algorithm("fedavg")
class FedAvg(Algorithm):
    """Federated averaging (McMahan et al. 2017): local SGD, example-weighted model mean."""

    Config = FedAvgConfig
    config: FedAvgConfig

    def make_strategy(self) -> Strategy:
        return FedAvgStrategy()

    def update(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> UpdateOutput:
        return fedavg_update(ctx, model, data, self.task_config(ctx), self.config.weighted)
