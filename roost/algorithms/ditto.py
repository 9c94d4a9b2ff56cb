"""Ditto: a FedAvg global model plus a regularised personal model per client.

Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021 (arXiv 2012.04221).

Global model: exactly FedAvg (:func:`~roost.algorithms.fedavg.fedavg_update` from ``w^t``,
``w_k`` returned with weight ``n_k``, or 1 with ``weighted=False``;
:class:`~roost.algorithms.fedavg.FedAvgStrategy` by composition).

Personal model: client k keeps ``v_k`` (client state ``"personal"``), set to ``w^t`` on
the client's first task. Every time the client is selected it first runs
``personal_epochs`` epochs of the shared local SGD (same batch size, learning rate,
momentum and weight decay as the global update) on::

    v ← v − η (∇F_k(v) + λ (v − w^t))

(λ = ``lam``; λ = 0 trains ``v_k`` on the local loss alone), keeps the result, and — if the
data has per-client test splits — reports ``trained_personal_loss`` and
``trained_personal_accuracy`` of ``v_k`` on the client's own test split (averaged over the
round's clients by the engine as ``client_trained_personal_*``). Then it trains the global
copy from ``w^t``.

Evaluation: the official metric (``personal_eval=all``, the default) is measured by the
engine at every evaluation: every client's personal model on its own test split, correct
predictions summed over all clients' test examples (``personal_accuracy``; also
``personal_loss``, example-weighted), with clients never selected yet at the initial model
``w^0`` — as the official code's ``test()``, whose personal models all start at ``w^0``.
It needs per-client test splits (``partition=natural`` on data that has them); it costs
one evaluation pass over every client's test split per evaluation, so ``personal_eval=off``
leaves it out on very many clients.

Minibatch order: both passes draw their shuffles from the same task generator state, so
the global update is bit-identical to FedAvg's for the same task seed, and with
``personal_epochs == local_epochs`` the two models see the same minibatches in the same
order — as in the official code (github.com/litian96/ditto
``flearn/trainers_MTL/ditto.py``), which takes one personal and one global step on each
batch. A model that draws from the global RNG (dropout) consumes it in the personal pass
first, so only its global update's dropout masks differ from FedAvg's.

Differences from the official code: it initialises every ``v_k`` to the initial global
model ``w^0``, here ``v_k`` starts from the ``w^t`` of the client's first selection (no
state exists before it); it averages the global updates uniformly (``weighted=False``
here). ALGORITHMS.md 4.7; λ grid {0.01, 0.1, 1, 2}, λ = 1 the common choice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

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
from roost.algorithms.fedavg import FedAvg, FedAvgConfig, fedavg_update
from roost.algorithms.fedprox import proximal_correction
from roost.algorithms.local_sgd import local_sgd
from roost.data.base import ClientData
from roost.evaluation import evaluate
from roost.params import FlatModel
from roost.registry import check

__all__ = ["Ditto", "DittoConfig"]


@dataclass(frozen=True)
class DittoConfig(FedAvgConfig):
    """lam: λ >= 0, pull of the personal model towards w^t; personal_epochs: epochs of
    personal-model training per task (local_epochs is the global model's); personal_eval:
    ``all`` measures every client's personal model at each evaluation (the official
    metric), ``off`` skips it."""

    lam: float = 1.0
    personal_epochs: int = 1
    personal_eval: Literal["all", "off"] = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.lam >= 0 and math.isfinite(self.lam), "lam", self.lam, "must be a number >= 0")
        check(self.personal_epochs >= 1, "personal_epochs", self.personal_epochs, "must be >= 1")


@register_algorithm("ditto")
class Ditto(Algorithm):
    """Ditto (Li et al. 2021): FedAvg global model, λ-regularised personal model per client."""

    Config = DittoConfig
    config: DittoConfig
    uses_client_test_data = True

    def __init__(self, config: DittoConfig) -> None:
        super().__init__(config)
        self.fedavg = FedAvg(config)
        self.personal_config = dataclasses.replace(config, local_epochs=config.personal_epochs)

    def make_strategy(self) -> Strategy:
        return self.fedavg.make_strategy()

    def client_state_spec(self, num_params: int) -> dict[str, int]:
        return {"personal": num_params}

    def work_examples(self, num_examples: int, settings: Mapping[str, Any] | None = None) -> int:
        s = settings or {}
        epochs = s.get("local_epochs", self.config.local_epochs)
        return num_examples * (
            int(epochs) + int(s.get("personal_epochs", self.config.personal_epochs))
        )

    def evaluates_personal_models(self) -> bool:
        return self.config.personal_eval == "all"

    def personal_params(self, state: Tensors) -> torch.Tensor:
        return state["personal"]

    def update(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> UpdateOutput:
        cfg = self.task_config(ctx)
        w_global = payload.params

        # (1) the personal model, from v_k (w^t on the client's first task).
        model.load_(state["personal"] if state is not None else w_global)
        correction = None
        if cfg.lam != 0:
            correction = proximal_correction(w_global, cfg.lam, model.scratch("ditto_proximal"))
        shuffle_state = ctx.generator.get_state()
        local_sgd(ctx, model, data, self.personal_config, correction)
        metrics: dict[str, float] = {}
        if ctx.test_data is not None and len(ctx.test_data) > 0:
            loss, acc = evaluate(model.module, ctx.test_data)
            metrics = {"trained_personal_loss": loss, "trained_personal_accuracy": acc}
        personal = model.scratch("ditto_personal")
        personal.copy_(model.params)

        # (2) the global model, FedAvg from w^t with the same shuffles.
        ctx.generator.set_state(shuffle_state)
        model.load_(w_global)
        out = fedavg_update(ctx, model, data, cfg, cfg.weighted)
        return UpdateOutput(out.result, {"personal": personal}, {**out.metrics, **metrics})
