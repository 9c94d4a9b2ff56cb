"""Vanilla split learning: devices take turns training one shared, split model.

Gupta and Raskar, "Distributed learning of deep neural network over multiple agents",
J. Netw. Comput. Appl. 2018; Vepakomma et al., "Split learning for health" (SplitNN),
2018; the ``SL_`` baseline script of SplitFed's official code (ALGORITHMS.md §4.10). One
model ``[W^c; W^s]`` is cut after its ``cut``-th top-level layer; one device at a time
trains it through the server for ``E`` local epochs (per minibatch: device forward,
activations up, server forward and backward, gradient down, device backward, both parts
step; :func:`~roost.split.split_iteration`, ``micro_batches`` per minibatch), then hands
the device part to the next device, through the server (it uploads ``W^c``, the next
device downloads it). So each turn starts from the model the previous turn ended on::

    [W^c; W^s] <- the result of device k's turn,      k = the next device in turn

Every turn is one server step (a record; ``rounds`` counts turns) on the engine's
asynchronous loop with one task in flight. Devices take their turns in order of id,
cyclically, skipping those offline when their turn comes (the relay's round-robin).
In virtual time a turn is one device's split task alone on the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from roost.algorithms.asynchronous import Arrival, AsyncStrategy
from roost.algorithms.base import Contribution, Strategy, register_algorithm
from roost.algorithms.splitfed import SplitFed, SplitFedConfig

__all__ = ["VanillaSL", "VanillaSLConfig", "VanillaSLStrategy"]


@dataclass(frozen=True)
class VanillaSLConfig(SplitFedConfig):
    """cut, micro_batches and wire_dtype as SplitFed's; one device trains at a time."""

    AUTOMATIC: ClassVar[str] = "half of the model's"


class VanillaSLStrategy(AsyncStrategy):
    """The model of the last turn becomes the model (module docstring); turns go round
    the clients in order of id."""

    concurrency = 1
    arrivals_per_step = 1

    def __init__(self) -> None:
        super().__init__()
        self._pending: Contribution | None = None
        self.next_client = 0  # whose turn is next (the first online from it takes it)

    def _take_turn(self, ids: np.ndarray) -> int:
        """The first of the sorted ``ids`` at or after :attr:`next_client`, cyclically."""
        at = int(np.searchsorted(ids, self.next_client))
        client = int(ids[at % len(ids)])
        self.next_client = client + 1
        return client

    def select(
        self, round: int, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> list[int]:
        return [self._take_turn(np.asarray(candidates))] if len(candidates) else []

    def select_idle(
        self, refill: int, idle: Sequence[int] | np.ndarray, rng: np.random.Generator
    ) -> int:
        return self._take_turn(np.asarray(idle))

    def accept(self, arrival: Arrival, contribution: Contribution) -> bool:
        self._pending = contribution
        return True

    def arrivals_until_step(self) -> int:
        return 1

    def server_step(self, step: int) -> dict[str, float]:
        assert self._pending is not None
        new = self._pending.mean("params")
        self._pending = None
        update_norm = float((new - self.params).norm())
        self.params = new
        self.version += 1
        return {"update_norm": update_norm}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "next_client": self.next_client}

    def load_state_dict(self, state: Any) -> None:
        super().load_state_dict(state)
        self.next_client = int(state.get("next_client", 0))


@register_algorithm("vanilla_sl")
class VanillaSL(SplitFed):
    """Vanilla split learning (Gupta and Raskar 2018): devices in turn, one shared model."""

    Config = VanillaSLConfig
    config: VanillaSLConfig

    def make_strategy(self) -> Strategy:
        return VanillaSLStrategy()
