"""SCAFFOLD: local SGD corrected by control variates (option II).

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning", ICML 2020 (arXiv 1910.06378).

The server keeps the model ``x`` and a control variate ``c``; client k keeps its own
control ``c_k`` (client state ``"control"``; zero before the client's first task), and
``c`` reaches it in the payload's extras (``"control"``). From ``y = x`` the client runs
its ``K`` local steps (``K`` = the steps actually taken: ``E · ceil(n_k / B)``) of::

    y ← y − η_l (g_k(y) − c_k + c)

(the shared local loop with the correction ``g += c − c_k``, the difference computed
once per task), then, with option II of the paper::

    c_k⁺ = c_k − c + (x − y) / (K η_l)
    Δy   = y − x,    Δc = c_k⁺ − c_k

It keeps ``c_k⁺`` and returns ``Δy`` and ``Δc`` with weight 1. Over the round's counted
clients S, with N the total number of clients and η_g = ``server_lr``::

    x ← x + η_g (1/|S|) Σ_S Δy
    c ← c + (|S|/N) (1/|S|) Σ_S Δc

This is the paper's Algorithm 1 and ALGORITHMS.md 4.5. Flower's ``baselines/niid_bench``
weights both means by ``n_k`` instead; here they are uniform, as in the paper. A client
uploads two models (``Δy``, ``Δc``) and downloads two (``x``, ``c``).

Local optimiser. Option II reads ``(x − y)/(K η_l)`` as the mean corrected gradient
along the local path, which holds for plain SGD only, so ``momentum`` must be 0 (a
:class:`~roost.registry.ConfigError` otherwise). Flower's niid_bench runs momentum 0.9
and adds ``−η_l (c − c_k)`` outside the momentum buffer; that variant is not offered.
Weight decay is allowed: ``g_k`` is then the gradient of the L2-regularised loss, which
``c_k`` estimates consistently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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

__all__ = ["Scaffold", "ScaffoldConfig", "ScaffoldStrategy"]


@dataclass(frozen=True)
class ScaffoldConfig(ClientOptimConfig):
    """server_lr: global step size η_g (> 0; 1 = the paper's default).

    ``momentum`` must be 0: option II assumes plain local SGD (see the module docstring).
    """

    server_lr: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.server_lr > 0 and math.isfinite(self.server_lr),
            "server_lr",
            self.server_lr,
            "must be a number > 0",
        )
        check(
            self.momentum == 0,
            "momentum",
            self.momentum,
            "must be 0 for scaffold (option II control variates assume plain SGD)",
        )


class ScaffoldStrategy(Strategy):
    """``x ← x + η_g mean(Δy)``, ``c ← c + (|S|/N) mean(Δc)``; sends ``c`` as an extra."""

    def __init__(self, server_lr: float = 1.0) -> None:
        super().__init__()
        self.server_lr = server_lr
        self.control = torch.empty(0)

    def initialize(self, params: torch.Tensor, num_clients: int = 0) -> None:
        super().initialize(params, num_clients)
        self.control = torch.zeros_like(self.params)

    def payload(self, round: int) -> Payload:
        return Payload(self.params, self.version, {"control": self.control})

    def step(self, round: int, contributions: Sequence[Contribution]) -> dict[str, float]:
        total = combine(contributions)
        if total is None:
            return {}
        n = self.num_clients
        if n < total.count:
            raise ValueError(
                f"SCAFFOLD needs the total number of clients N >= |S| = {total.count} "
                f"(got N = {n}); pass it to Strategy.initialize"
            )
        update = total.mean("delta")
        if self.server_lr != 1.0:
            update.mul_(self.server_lr)
        control_update = total.mean("control_delta").mul_(total.count / n)
        # New tensors, never in place: a payload already sent may still hold x and c.
        self.params = self.params + update
        self.control = self.control + control_update
        self.version += 1
        return {
            "update_norm": float(torch.linalg.vector_norm(update)),
            "control_norm": float(torch.linalg.vector_norm(self.control)),
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["control"] = self.control.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.control = state["control"].clone()


@register_algorithm("scaffold")
class Scaffold(Algorithm):
    """SCAFFOLD (Karimireddy et al. 2020): control-variate-corrected local SGD, option II."""

    Config = ScaffoldConfig
    config: ScaffoldConfig

    def make_strategy(self) -> Strategy:
        return ScaffoldStrategy(self.config.server_lr)

    def client_state_spec(self, num_params: int) -> dict[str, int]:
        return {"control": num_params}

    def upload_nbytes(self, num_params: int, version: int = 0) -> int:
        return 2 * 4 * num_params

    def update(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> UpdateOutput:
        x = payload.params
        c = payload.extras["control"]
        c_k = state["control"] if state is not None else None

        # c − c_k, once per task, in a resident buffer (reused for Δc after training).
        shift = model.scratch("scaffold_shift")
        if c_k is None:
            shift.copy_(c)
        else:
            torch.sub(c, c_k, out=shift)

        def correction(params: torch.Tensor, grads: torch.Tensor) -> None:
            grads.add_(shift)

        cfg = self.task_config(ctx)
        res = local_sgd(ctx, model, data, cfg, correction)

        # Δy = y − x into the gradient buffer (free after training); y stays in place.
        delta = torch.sub(model.params, x, out=model.grads)
        # Δc = c_k⁺ − c_k = (x − y)/(K η_l) − c;  c_k⁺ = c_k + Δc.
        control_delta = shift
        new_control = model.scratch("scaffold_control")
        if res.steps > 0:
            torch.mul(delta, -1.0 / (res.steps * cfg.lr), out=control_delta)
            control_delta.sub_(c)
        else:  # no data, no step: nothing learnt, the control stays
            control_delta.zero_()
        if c_k is None:
            new_control.copy_(control_delta)
        else:
            torch.add(c_k, control_delta, out=new_control)
        return UpdateOutput(
            ClientResult({"delta": delta, "control_delta": control_delta}, 1.0),
            {"control": new_control},
            {"train_loss": res.mean_loss, "local_steps": float(res.steps)},
        )
