"""FedDyn: federated learning with dynamic regularisation.

Acar, Zhao, Matas, Mattina, Whatmough, Saligrama, "Federated Learning Based on Dynamic
Regularization", ICLR 2021 (arXiv 2111.04263).

Client k keeps ``∇_k`` (client state ``"grad"``; zero before its first task). From the
server model ``θ^{t−1}`` it runs the shared local SGD on the dynamically regularised loss::

    L_k(θ) − ⟨∇_k, θ⟩ + (α/2) ||θ − θ^{t−1}||²
    g ← ∇L_k(θ) + λ θ − ∇_k + α (θ − θ^{t−1})          (the gradient correction)

reaching ``θ_k``, then updates its state and returns ``θ_k`` with weight 1::

    ∇_k ← ∇_k − α (θ_k − θ^{t−1})

The server keeps ``h`` (zero at the start). Over the round's counted clients P_t, with N
the total number of clients::

    h   ← h − α (1/N) Σ_{k∈P_t} (θ_k − θ^{t−1})  =  h − α (|P_t|/N) (mean_{P_t} θ_k − θ^{t−1})
    θ^t = mean_{P_t} θ_k − (1/α) h

This is ALGORITHMS.md 4.6, the convention of the official code
(github.com/alpemreacar/FedDyn ``utils_general.py`` / ``utils_methods.py``): a squared
norm in the local loss (PFLlib's unsquared norm is not followed), the server's sum over
P_t divided by N (all clients). The official code keeps ``−∇_k/α`` per client and sets
``θ^t = mean θ_k + mean_{all k}(−∇_k/α)``, which is the same recursion.

Evaluation (``evaluate``): the official code reports the test accuracy of the mean of
the round's client models, ``mean_{P_t} θ_k`` (its ``avg_model``), not of the "cloud"
model ``θ^t`` that clients train from; ``evaluate=client_mean`` (the default) does the
same, and ``evaluate=cloud`` measures ``θ^t`` instead. Before the first round, and after a
round without clients, the last mean (initially ``θ^0``) is measured.

Not reproduced from the official code: its per-client ``α_k = α · mean_j(n_j) / n_k``
(identical to this rule when all clients hold the same number of examples) and its
gradient-norm clipping at 10. The paper's α grid is {0.1, 0.01, 0.001}; 0.01 is the default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

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
from roost.data.base import ClientData
from roost.params import FlatModel
from roost.registry import check

__all__ = ["FedDyn", "FedDynConfig", "FedDynStrategy"]


@dataclass(frozen=True)
class FedDynConfig(ClientOptimConfig):
    """alpha: dynamic-regularisation coefficient α > 0 (paper grid 0.1, 0.01, 0.001).
    evaluate: which model the central evaluation measures: ``client_mean`` (the mean of
    the round's client models, as the official code reports) or ``cloud`` (θ^t)."""

    alpha: float = 0.01
    evaluate: Literal["client_mean", "cloud"] = "client_mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = self.alpha > 0 and math.isfinite(self.alpha)
        check(ok, "alpha", self.alpha, "must be a number > 0")


class FedDynStrategy(Strategy):
    """``h ← h − α (|P|/N)(mean θ_k − θ)``, ``θ ← mean θ_k − h/α``; ``h`` and the last
    client mean (what ``evaluate=client_mean`` measures) are checkpointed."""

    def __init__(self, alpha: float, evaluate: str = "client_mean") -> None:
        super().__init__()
        self.alpha = alpha
        self.evaluate = evaluate
        self.h = torch.empty(0)
        self.client_mean = torch.empty(0)

    def initialize(self, params: torch.Tensor, num_clients: int = 0) -> None:
        super().initialize(params, num_clients)
        self.h = torch.zeros_like(self.params)
        self.client_mean = self.params.clone()

    @property
    def eval_params(self) -> torch.Tensor:
        return self.client_mean if self.evaluate == "client_mean" else self.params

    def step(self, round: int, contributions: Sequence[Contribution]) -> dict[str, float]:
        total = combine(contributions)
        if total is None:
            return {}
        n = self.num_clients
        if n < total.count:
            raise ValueError(
                f"FedDyn needs the total number of clients N >= |P_t| = {total.count} "
                f"(got N = {n}); pass it to Strategy.initialize"
            )
        mean = total.mean("params")
        drift = mean - self.params
        self.h = self.h - (self.alpha * total.count / n) * drift
        self.client_mean = mean
        new = mean - self.h / self.alpha
        update_norm = float(torch.linalg.vector_norm(new - self.params))
        self.params = new
        self.version += 1
        return {"update_norm": update_norm, "h_norm": float(torch.linalg.vector_norm(self.h))}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["h"] = self.h.clone()
        state["client_mean"] = self.client_mean.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.h = state["h"].clone()
        self.client_mean = state["client_mean"].clone()


@register_algorithm("feddyn")
class FedDyn(Algorithm):
    """FedDyn (Acar et al. 2021): local loss with a dynamic linear + proximal regulariser."""

    Config = FedDynConfig
    config: FedDynConfig

    def make_strategy(self) -> Strategy:
        return FedDynStrategy(self.config.alpha, self.config.evaluate)

    def client_state_spec(self, num_params: int) -> dict[str, int]:
        return {"grad": num_params}

    def update(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> UpdateOutput:
        anchor = payload.params
        alpha = self.config.alpha
        grad_k = state["grad"] if state is not None else None
        diff = model.scratch("feddyn_diff")

        def correction(params: torch.Tensor, grads: torch.Tensor) -> None:
            torch.sub(params, anchor, out=diff)
            grads.add_(diff, alpha=alpha)
            if grad_k is not None:
                grads.sub_(grad_k)

        res = local_sgd(ctx, model, data, self.task_config(ctx), correction)

        # ∇_k ← ∇_k − α (θ_k − θ^{t−1}), into a resident buffer (the store copies it).
        torch.sub(model.params, anchor, out=diff)
        new_grad = model.scratch("feddyn_grad")
        if grad_k is None:
            torch.mul(diff, -alpha, out=new_grad)
        else:
            torch.sub(grad_k, diff, alpha=alpha, out=new_grad)
        return UpdateOutput(
            ClientResult({"params": model.params}, 1.0),
            {"grad": new_grad},
            {"train_loss": res.mean_loss, "local_steps": float(res.steps)},
        )
