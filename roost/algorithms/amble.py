"""AMBLE: adaptive mini-batch, local epochs and learning rate per device, synchronous.

Park, Yoon, Yeo, Oh (Ajou University thesis, dcollection 000000031174; a journal version
is believed to be JPDC 2022). Only the abstract was reachable: AMBLE "adaptively adjusts
the local mini-batch and local epoch size for heterogeneous devices", synchronously,
"to increase computation during the waiting time caused by stragglers", and "scales the
local learning rate". No equations or code are public; the rule below is ALGORITHMS.md
§2.3's **inferred** one, every choice a parameter. Paper-faithfulness: **not verified**.

The server learns, from every delivered result, device k's rate ``r_k`` (examples per
second of compute: the task's work over its compute time) and its transfer time ``c_k``
(the rest of the task's duration), both as exponential moving averages with weight
``rate_smoothing``, and its number of examples ``n_k``. For a round's devices whose rate
is known, with the base settings ``(B0, E0, η0)`` of the config::

    T       = max_k  E0 n_k / r_k + c_k          (the straggler's round time)
    budget_k = r_k (T - c_k)                      (examples k can process meanwhile)
    B_k     = clip(round(B0 r_k / r_min), B0, batch_max)
    E_k     = clip(floor(budget_k / n_k), E0, epochs_max)
    η_k     = η0 sqrt(B_k / B0)  (lr_scaling=sqrt, the default; linear: η0 B_k / B0, Goyal
                                  et al. 2017, diverged on FEMNIST's CNN: docs/experiments.md)

so that no device is predicted to finish after ``T`` and faster devices train more while
the straggler finishes. Devices not seen yet train with the base settings. The server is
FedAvg's: ``w = Σ n_k w_k / Σ n_k`` (``weight_by=work``: weights ``n_k E_k``). On
identical devices holding equal data every ``(B_k, E_k, η_k) = (B0, E0, η0)``: FedAvg.
The "serverless parameter server" of the abstract is an implementation detail of the
authors' system (an event-driven aggregator), which the engine's round barrier already is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from roost.algorithms.asynchronous import Arrival
from roost.algorithms.base import (
    Algorithm,
    ClientContext,
    Payload,
    Strategy,
    Tensors,
    UpdateOutput,
    register_algorithm,
)
from roost.algorithms.fedavg import FedAvgConfig, FedAvgStrategy, fedavg_update
from roost.data.base import ClientData
from roost.params import FlatModel
from roost.registry import check

__all__ = ["AMBLE", "AMBLEConfig", "AMBLEStrategy", "amble_settings"]


@dataclass(frozen=True)
class AMBLEConfig(FedAvgConfig):
    """batch_size, local_epochs, lr: the base settings B0, E0, η0. batch_max and
    epochs_max: the largest B_k and E_k. lr_scaling: linear, sqrt or none.
    rate_smoothing: EMA weight of a new measurement (1: the last one only). weight_by:
    examples (FedAvg's n_k) or work (n_k E_k)."""

    batch_max: int = 64
    epochs_max: int = 10
    lr_scaling: Literal["linear", "sqrt", "none"] = "sqrt"
    rate_smoothing: float = 0.5
    weight_by: Literal["examples", "work"] = "examples"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.batch_max >= self.batch_size,
            "batch_max",
            self.batch_max,
            f"must be >= batch_size ({self.batch_size})",
        )
        check(
            self.epochs_max >= self.local_epochs,
            "epochs_max",
            self.epochs_max,
            f"must be >= local_epochs ({self.local_epochs})",
        )
        check(
            self.lr_scaling in ("linear", "sqrt", "none"),
            "lr_scaling",
            self.lr_scaling,
            "must be linear, sqrt or none",
        )
        check(
            0 < self.rate_smoothing <= 1, "rate_smoothing", self.rate_smoothing, "must be in (0, 1]"
        )
        check(
            self.weight_by in ("examples", "work"),
            "weight_by",
            self.weight_by,
            "must be examples or work",
        )


def amble_settings(
    cfg: AMBLEConfig,
    rates: Mapping[int, float],
    comm: Mapping[int, float],
    sizes: Mapping[int, int],
) -> tuple[dict[int, dict[str, Any]], float]:
    """The module docstring's rule for the devices in ``rates`` (all three mappings share
    their keys); returns each device's settings and the round time ``T`` they target."""
    if not rates:
        return {}, 0.0
    e0, b0, lr0 = cfg.local_epochs, cfg.batch_size, cfg.lr
    t_round = max(e0 * sizes[k] / rates[k] + comm[k] for k in rates)
    r_min = min(rates.values())
    out: dict[int, dict[str, Any]] = {}
    for k, r in rates.items():
        budget = r * (t_round - comm[k])
        batch = int(min(max(round(b0 * r / r_min), b0), cfg.batch_max))
        epochs = int(min(max(math.floor(budget / sizes[k] + 1e-9), e0), cfg.epochs_max))
        scale = {"linear": batch / b0, "sqrt": math.sqrt(batch / b0), "none": 1.0}[cfg.lr_scaling]
        out[k] = {"batch_size": batch, "local_epochs": epochs, "lr": lr0 * scale}
    return out, t_round


class AMBLEStrategy(FedAvgStrategy):
    """FedAvg's step; learns device rates and configures each round's tasks."""

    def __init__(self, cfg: AMBLEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.rates: dict[int, float] = {}
        self.comm: dict[int, float] = {}
        self.sizes: dict[int, int] = {}
        self.target_s = 0.0

    def observe(self, arrivals: Sequence[Arrival]) -> None:
        w = self.cfg.rate_smoothing
        for a in arrivals:
            if a.compute_s <= 0:
                continue
            rate = a.work_examples / a.compute_s
            comm = (a.arrived_s - a.dispatched_s) - a.compute_s
            k = a.client_id
            self.rates[k] = rate if k not in self.rates else (1 - w) * self.rates[k] + w * rate
            self.comm[k] = comm if k not in self.comm else (1 - w) * self.comm[k] + w * comm
            self.sizes[k] = a.num_examples

    def configure_tasks(
        self, round: int, clients: Sequence[int], rng: np.random.Generator
    ) -> dict[int, dict[str, Any]]:
        known = [c for c in clients if c in self.rates]
        settings, self.target_s = amble_settings(
            self.cfg,
            {c: self.rates[c] for c in known},
            {c: self.comm[c] for c in known},
            {c: self.sizes[c] for c in known},
        )
        return settings

    def state_dict(self) -> dict[str, Any]:
        learned = [[k, self.rates[k], self.comm[k], self.sizes[k]] for k in sorted(self.rates)]
        return {**super().state_dict(), "learned": learned}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.rates, self.comm, self.sizes = {}, {}, {}
        for k, rate, comm, size in state.get("learned", []):
            self.rates[int(k)], self.comm[int(k)], self.sizes[int(k)] = rate, comm, int(size)


@register_algorithm("amble")
class AMBLE(Algorithm):
    """AMBLE [inferred rule]: per-device B, E and lr from measured speeds; FedAvg server."""

    Config = AMBLEConfig
    config: AMBLEConfig

    def make_strategy(self) -> Strategy:
        return AMBLEStrategy(self.config)

    def update(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> UpdateOutput:
        cfg = self.task_config(ctx)
        out = fedavg_update(ctx, model, data, cfg, cfg.weighted)
        if self.config.weight_by == "work":
            out.result.weight *= cfg.local_epochs
        return out
