"""The server half of asynchronous methods: results one by one, with their staleness.

A synchronous :class:`~roost.algorithms.base.Strategy` is stepped by the engine at the end
of each round with the round's aggregated results. An :class:`AsyncStrategy` instead
*accepts* every result as it is delivered, in virtual-time order, together with an
:class:`Arrival` that says how stale it is, and *decides* when the server steps
(FedAsync: on every arrival; FedBuff: every K arrivals). The engine then calls
:meth:`AsyncStrategy.server_step`; each step is one record of ``metrics.jsonl`` and
``rounds`` counts them.

Dispatching follows one rule for every asynchronous method (FedBuff's and W3's): at the
start, ``concurrency`` clients are selected with the engine's round-1 generator (as a
synchronous round 1 would be); after every arrival or dropout the engine dispatches one
idle, available client from the current model version, chosen by
:meth:`AsyncStrategy.select_idle` with the j-th refill's generator
``default_rng([seed, 6, j])``. So at most ``concurrency`` tasks are in flight.

Staleness convention (ALGORITHMS.md §1): a result computed from version ``o`` that
arrives when the server is at version ``v`` has staleness ``τ = v - o``; a result that
arrives before any other step has ``τ = 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from roost.algorithms.base import Contribution, Strategy
from roost.registry import check

__all__ = ["Arrival", "AsyncStrategy", "check_concurrency"]


def check_concurrency(value: int | None) -> None:
    """Validate a config's ``concurrency`` field (None: the run's clients_per_round)."""
    check(value is None or value >= 1, "concurrency", value, "must be >= 1 or none")


@dataclass(frozen=True, slots=True)
class Arrival:
    """What the server knows about one delivered result.

    ``compute_s`` is the device's virtual compute time for the task (the system model's),
    ``num_examples`` the client's examples and ``work_examples`` the examples it
    processed (epochs included).
    """

    client_id: int
    start_version: int
    version: int
    dispatched_s: float
    arrived_s: float
    compute_s: float
    num_examples: int
    work_examples: int

    @property
    def staleness(self) -> int:
        """``τ = version at arrival - version the task started from`` (>= 0)."""
        return self.version - self.start_version


class AsyncStrategy(Strategy):
    """Server half of an asynchronous method; subclasses implement :meth:`accept` and
    :meth:`server_step`.

    ``concurrency`` is the cap on tasks in flight (None: the run's ``clients_per_round``).
    :meth:`arrivals_until_step` and :attr:`arrivals_per_step` tell the engine how many
    more arrivals the run needs (so that it computes ahead only tasks that will be
    delivered); None means "not known in advance", and the engine then computes each task
    when it arrives.
    """

    concurrency: int | None = None
    arrivals_per_step: int | None = None

    def accept(self, arrival: Arrival, contribution: Contribution) -> bool:
        """Take one delivered result; return True when the server should step now."""
        raise NotImplementedError

    def server_step(self, step: int) -> dict[str, float]:
        """Apply what was accepted since the last step (the version goes up by one);
        return the server metrics of step number ``step`` (from 1)."""
        raise NotImplementedError

    def arrivals_until_step(self) -> int | None:
        """How many more arrivals make the next step (None: unknown)."""
        return None

    def select_idle(
        self, refill: int, idle: Sequence[int] | np.ndarray, rng: np.random.Generator
    ) -> int:
        """The client of the ``refill``-th dispatch (from 1) among the sorted ids ``idle``
        (clients neither in flight nor offline): W3's ``idle[rng.integers(len(idle))]``.
        ``idle`` supports ``len`` and ``idle[k]`` in O(log N) (the engine's pool) or is an
        array; ``np.asarray(idle)`` gives the ids in O(N). ``rng`` is, or stands for,
        ``default_rng([seed, 6, refill])``."""
        return int(idle[int(rng.integers(len(idle)))])

    def step(self, round: int, contributions: Sequence[Contribution]) -> dict[str, float]:
        raise TypeError(
            f"{type(self).__name__} is asynchronous: the engine calls accept() for each "
            "result and server_step() when it asks to step, never step()"
        )

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict()
