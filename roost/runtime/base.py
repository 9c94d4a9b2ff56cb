"""The runtime protocol: how the host computes batches of client tasks.

The engine decides *what* is computed (which client, from which model version, folded into
which group); a runtime decides *how*: sequentially in one process (``local``), across
long-lived worker processes (``workers``), or vectorised. A runtime never imports an
algorithm: it is handed an :class:`~roost.algorithms.base.Algorithm` object in a
:class:`Job` and calls its ``update``.

Tasks carry a ``group``: the runtime returns one :class:`Contribution` per group, each the
fold of its tasks' results in task order. A synchronous round is one group; an
asynchronous strategy that consumes results one by one uses one group per task; a buffered
one (FedBuff) a group per buffer. Grouping is what lets a runtime pre-reduce on the worker
without changing what the strategy sees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from roost.registry import Registry

if TYPE_CHECKING:
    from roost.algorithms.base import Algorithm, Contribution, Payload
    from roost.data.base import ClientData, FederatedDataset
    from roost.state import ClientStateStore

__all__ = ["RUNTIMES", "Job", "Outcome", "Runtime", "Task", "task_seed"]


def task_seed(seed: int, client_id: int, dispatch: int) -> int:
    """The seed of one task, from (run seed, client id, dispatch number) only (DESIGN.md)."""
    return int(np.random.SeedSequence([seed, 8, client_id, dispatch]).generate_state(1)[0])


@dataclass(frozen=True)
class Task:
    """One client task: train ``client_id`` from model ``version``; fold into ``group``."""

    client_id: int
    round: int
    version: int
    seed: int
    group: int = 0


@dataclass
class Outcome:
    """The result of :meth:`Runtime.execute`: a Contribution per group, per-task client
    metrics ``(client_id, metrics)`` in task order, and the runtime's own metrics for the
    round (e.g. predicted and actual makespan), recorded in metrics.jsonl."""

    contributions: list[Contribution]
    client_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    """What a runtime needs to compute tasks. ``build_module`` makes the architecture
    (its initial weights do not matter: every task loads a payload). ``config`` is the
    run's resolved config tree, from which a worker process rebuilds the same parts."""

    algorithm: Algorithm
    dataset: FederatedDataset
    build_module: Callable[[], nn.Module]
    state_store: ClientStateStore
    config: dict[str, Any] = field(default_factory=dict)


class Runtime:
    """Computes batches of client tasks. Implementations: ``local``; later ``workers``."""

    def start(self, job: Job) -> None:
        raise NotImplementedError

    def execute(
        self, tasks: Sequence[Task], payloads: Mapping[int, Payload], num_groups: int = 1
    ) -> Outcome:
        raise NotImplementedError

    def evaluate(self, params: torch.Tensor, data: ClientData) -> tuple[float, float]:
        """Mean loss and accuracy of the model with flat ``params`` on ``data``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release processes and memory; safe to call twice."""

    def abort(self) -> None:
        """Stop at once after an error or Ctrl-C mid-round (worker processes are killed
        rather than told to finish); :meth:`close` is called after it."""

    def state_dict(self) -> dict[str, Any]:
        """What the runtime has learned that a resumed run should keep (e.g. worker
        speeds); saved in every checkpoint. Empty for runtimes that learn nothing."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` after :meth:`start`; never changes results."""


RUNTIMES: Registry[Callable[[Any], Runtime]] = Registry("runtime")
