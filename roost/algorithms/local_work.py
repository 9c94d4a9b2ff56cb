"""Heterogeneous local work, as the baselines' papers ran it (per-task settings chosen by
the server each round through :meth:`~roost.algorithms.base.Strategy.configure_tasks`).

* FedProx (Li et al. 2020, §5.2): "systems heterogeneity": in each round a fraction
  ``x`` of the selected devices (0, 50% or 90% in the paper) are stragglers and run a
  number of local epochs drawn uniformly from ``{1, ..., E}`` instead of ``E``;
* FedNova (Wang et al. 2020, §6): every client draws its local epochs per round uniformly
  from ``{E_min, ..., E_max}`` (the paper: 2 to 5).

Both draw from the round's own stream, so a run is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["random_epochs", "straggler_count", "stragglers"]


def straggler_count(fraction: float, cohort: int) -> int:
    """How many of a cohort of ``cohort`` devices are stragglers: ``round(fraction ·
    cohort)`` (Python's round, half to even: 0.5 x 5 gives 2)."""
    return round(fraction * cohort)


def stragglers(
    clients: Sequence[int], rng: np.random.Generator, fraction: float, epochs: int
) -> dict[int, dict[str, Any]]:
    """``round(fraction · |clients|)`` clients (drawn without replacement), each with
    ``local_epochs`` uniform in ``1..epochs``; the others keep the config's epochs."""
    count = straggler_count(fraction, len(clients))
    if count == 0:
        return {}
    chosen = rng.choice(len(clients), size=count, replace=False)
    draws = rng.integers(1, epochs + 1, size=count)
    return {int(clients[i]): {"local_epochs": int(e)} for i, e in zip(chosen, draws, strict=True)}


def random_epochs(
    clients: Sequence[int], rng: np.random.Generator, low: int, high: int
) -> dict[int, dict[str, Any]]:
    """Every client's ``local_epochs`` uniform in ``low..high``, in the clients' order."""
    draws = rng.integers(low, high + 1, size=len(clients))
    return {int(c): {"local_epochs": int(e)} for c, e in zip(clients, draws, strict=True)}
