"""SplitFed v2: one server-side model trained over the devices in turn, device parts
averaged each round.

Thapa, Arachchige, Camtepe, Sun, "SplitFed: When Federated Learning Meets Split
Learning", AAAI 2022; the official ``SFLV2_ResNet_HAM10000.py``; ALGORITHMS.md §4.10.
The model ``[W^c; W^s]`` is cut after its ``cut``-th top-level layer. A round draws
``m = clients_per_round`` devices in random order; each starts from the round's device
part ``W^c`` and the server part *as the previous device left it*, trains both for its
``E`` local epochs through the server (SplitFed v1's client procedure), and the server
keeps the new ``W^s``; when all ``m`` are done the fed server averages their device
parts::

    W^s <- W^s_k                       after each device k, in the round's order
    W^c <- Σ_k ω_k W^c_k / Σ_k ω_k     after the round's m devices (ω_k = n_k, or 1)

As in the official code, one device trains at a time (its loop over clients is
sequential): every device's turn is one server step of the engine's asynchronous loop
with one task in flight, and ``rounds`` counts turns (``m`` turns make a SplitFed
round; the model a turn evaluates mixes the round's starting ``W^c`` with the latest
``W^s`` until the round's last turn averages the device parts).

Against SplitFed v1 (every replica from the same ``W^s``, both parts averaged), the order
matters: with two devices, v2's second device trains against the server part the first
left (tests/unit/test_algorithms_splitfed_v2.py computes both by hand).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from roost.algorithms.asynchronous import Arrival, AsyncStrategy
from roost.algorithms.base import Contribution, Strategy, register_algorithm
from roost.algorithms.splitfed import SplitFed, SplitFedConfig
from roost.split import cut_module, num_cut_points

__all__ = ["SplitFedV2", "SplitFedV2Config", "SplitFedV2Strategy"]


@dataclass(frozen=True)
class SplitFedV2Config(SplitFedConfig):
    """cut, micro_batches, wire_dtype and weighted as SplitFed v1's (weighted: average
    the device parts by examples; False: the official code's plain mean)."""


class SplitFedV2Strategy(AsyncStrategy):
    """Module docstring. ``device_index``: the device part's entries in the model's flat
    vector. A round has the run's ``clients_per_round`` devices."""

    concurrency = 1
    arrivals_per_step = 1

    def __init__(self, device_index: torch.Tensor) -> None:
        super().__init__()
        self.device_index = device_index
        self.round_device = torch.empty(0)  # W^c of the round's start
        self.device_sum: torch.Tensor | None = None
        self.device_weight = 0.0
        self.trained: list[int] = []  # the round's devices so far, in order
        self._pending: tuple[Arrival, Contribution] | None = None

    def initialize(self, params: torch.Tensor, num_clients: int = 0) -> None:
        super().initialize(params, num_clients)
        self.round_device = self.params[self.device_index].clone()

    def select(
        self, round: int, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> list[int]:
        return super().select(round, candidates, 1, rng)

    def select_idle(
        self, refill: int, idle: Sequence[int] | np.ndarray, rng: np.random.Generator
    ) -> int:
        """A device of the round not trained yet, uniformly (the round's random order)."""
        ids = np.asarray(idle)
        fresh = ids[~np.isin(ids, self.trained)] if self.trained else ids
        pool = fresh if len(fresh) else ids
        return int(pool[int(rng.integers(len(pool)))])

    def accept(self, arrival: Arrival, contribution: Contribution) -> bool:
        self._pending = (arrival, contribution)
        return True

    def arrivals_until_step(self) -> int:
        return 1

    def server_step(self, step: int) -> dict[str, float]:
        assert self._pending is not None
        arrival, contribution = self._pending
        self._pending = None
        new = contribution.mean("params")
        weight = contribution.weight
        index = self.device_index
        device = new[index].to(torch.float64) * weight
        self.device_sum = device if self.device_sum is None else self.device_sum + device
        self.device_weight += weight
        self.trained.append(arrival.client_id)
        params = new.clone()  # the server part as this device left it
        ended = len(self.trained) >= max(1, self.clients_per_round)
        if ended:
            assert self.device_sum is not None
            self.round_device = (self.device_sum / self.device_weight).to(params.dtype)
            self.device_sum, self.device_weight, self.trained = None, 0.0, []
        params[index] = self.round_device
        update_norm = float((params - self.params).norm())
        self.params = params
        self.version += 1
        return {"update_norm": update_norm, "round_ended": float(ended)}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "round_device": self.round_device,
            "device_sum": self.device_sum,
            "device_weight": self.device_weight,
            "trained": list(self.trained),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.round_device = state["round_device"].clone()
        total = state.get("device_sum")
        self.device_sum = None if total is None else total.clone()
        self.device_weight = float(state.get("device_weight", 0.0))
        self.trained = [int(c) for c in state.get("trained", [])]


@register_algorithm("splitfed_v2")
class SplitFedV2(SplitFed):
    """SplitFed v2 (Thapa et al. 2022): one server part trained over the devices in
    random order, device parts averaged each round."""

    Config = SplitFedV2Config
    config: SplitFedV2Config

    def __init__(self, config: SplitFedV2Config) -> None:
        super().__init__(config)
        self._device_index: torch.Tensor | None = None

    def bind_model(self, module: nn.Module) -> None:
        """Learn which entries of the flat model are the device part's."""
        cut = self.config.cut or (num_cut_points(module) + 1) // 2
        self._device_index = cut_module(module, cut).layout.device_index

    def make_strategy(self) -> Strategy:
        if self._device_index is None:
            raise RuntimeError("SplitFedV2.bind_model(module) must come before make_strategy")
        return SplitFedV2Strategy(self._device_index)
