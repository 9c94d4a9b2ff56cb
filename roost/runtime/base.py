"""The runtime protocol: how the host computes batches of client tasks.

The engine decides *what* is computed (which client, from which model version, folded into
which group); a runtime decides *how*: sequentially in one process (``local``), across
long-lived worker processes (``workers``), or vectorised. A runtime never imports an
algorithm: it is handed an :class:`~roost.algorithms.base.Algorithm` object in a
:class:`Job` and calls its ``update``.

Tasks carry a ``group``: the runtime returns one :class:`Contribution` per group, each the
fold of its tasks' results in task order. A synchronous round is one group; asynchronous
methods, whose results the engine folds one by one at their delivery, use one group per
task. Grouping is what lets a runtime pre-reduce on the worker without changing what the
strategy sees.

Generator procedures (a client that asks the server something mid-task, FedASMU's fetch of
a fresher model) are suspended at their request: :meth:`Runtime.execute` returns the
request, keeps the procedure with copies of its parameters and optimizer buffers (the
resident model is free for other tasks meanwhile), and a later execute of the same task
with the answer resumes it.

Client state: by default a runtime writes the new state of each task to the job's store as
it computes. With ``defer_state=True`` (the engine computes tasks ahead of their delivery)
it leaves the store untouched and returns the new states in :attr:`Outcome.new_states`;
the engine commits each one when its task is delivered. The tasks of one execute never
share a client, so every task reads the state its client had before the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from roost.registry import Registry

if TYPE_CHECKING:
    from roost.algorithms.base import Algorithm, Contribution, Payload
    from roost.data.base import ClientData, FederatedDataset
    from roost.state import ClientStateStore

__all__ = ["RUNTIMES", "Job", "JobParts", "Outcome", "Runtime", "Task", "task_seed"]


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's output function (Steele, Lea, Flood, OOPSLA 2014; Vigna's constants):
    a bijection of 64-bit words whose outputs pass BigCrush for consecutive inputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def task_seed(seed: int, client_id: int, dispatch: int) -> int:
    """The seed of one task, from (run seed, client id, dispatch number) only (DESIGN.md):
    a 32-bit word, ``splitmix64(splitmix64(splitmix64(seed ^ 8·φ) ^ client) ^ dispatch)``
    folded to 32 bits (φ = 0x9E37...; 8 tags the purpose, as the numpy streams'
    ``[seed, purpose, ...]`` keys do). Pure-Python integer arithmetic: about 1 µs, where a
    ``SeedSequence`` costs about 15 µs, and the engine derives one per dispatch."""
    h = _splitmix64((seed ^ (8 * 0x9E3779B97F4A7C15)) & _MASK64)
    h = _splitmix64(h ^ (client_id & _MASK64))
    h = _splitmix64(h ^ (dispatch & _MASK64))
    return (h ^ (h >> 32)) & 0xFFFFFFFF


@dataclass(frozen=True)
class Task:
    """One client task: train ``client_id`` from model ``version``; fold into ``group``.

    ``key`` identifies the task across executes: a procedure that yields a request is
    suspended under it and resumed by a later execute of the same task with the answer.
    ``settings`` are its overrides of the algorithm's config (``ClientContext.settings``).
    """

    client_id: int
    round: int
    version: int
    seed: int
    group: int = 0
    key: int = -1
    settings: tuple[tuple[str, Any], ...] = ()


@dataclass
class Outcome:
    """The result of :meth:`Runtime.execute`: a Contribution per group, per-task client
    metrics ``(client_id, metrics)`` in task order, the runtime's own metrics for the
    batch (e.g. predicted and actual makespan), recorded in metrics.jsonl, when the
    state was deferred each client's new state, and the requests of tasks whose
    procedure suspended (by task key; those tasks folded nothing yet)."""

    contributions: list[Contribution]
    client_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    new_states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    requests: dict[int, Any] = field(default_factory=dict)


@dataclass
class Job:
    """What a runtime needs to compute tasks. ``build_module`` makes the architecture
    (its initial weights do not matter: every task loads a payload).

    ``parts`` is how a worker process gets the same algorithm, dataset and architecture:
    a picklable callable returning ``(algorithm, dataset, build_module)``, run in the
    worker. The runner passes one that rebuilds them from the run's resolved config (so
    nothing large is pickled); without it a worker receives the job's own objects
    pickled (:class:`JobParts`), so a programmatic engine computes exactly its own run.
    """

    algorithm: Algorithm
    dataset: FederatedDataset
    build_module: Callable[[], nn.Module]
    state_store: ClientStateStore
    parts: Callable[[], tuple[Algorithm, FederatedDataset, Callable[[], nn.Module]]] | None = None

    def worker_parts(
        self,
    ) -> Callable[[], tuple[Algorithm, FederatedDataset, Callable[[], nn.Module]]]:
        """What a worker process calls to get this job's parts."""
        return self.parts or JobParts(self.algorithm, self.dataset, self.build_module)


@dataclass
class JobParts:
    """A job's own algorithm, dataset and architecture, pickled to a worker."""

    algorithm: Algorithm
    dataset: FederatedDataset
    build_module: Callable[[], nn.Module]

    def __call__(self) -> tuple[Algorithm, FederatedDataset, Callable[[], nn.Module]]:
        return self.algorithm, self.dataset, self.build_module


class Runtime:
    """Computes batches of client tasks. Implementations: ``local`` and ``workers``."""

    batch_hint: int = 1
    """How many tasks the engine should hand over at once when it may compute ahead (a
    runtime that computes one task at a time gains nothing from more, and holds their
    results in memory until they are delivered)."""

    def start(self, job: Job) -> None:
        raise NotImplementedError

    def execute(
        self,
        tasks: Sequence[Task],
        payloads: Mapping[int, Payload],
        num_groups: int = 1,
        defer_state: bool = False,
        answers: Mapping[int, Payload] | None = None,
    ) -> Outcome:
        """Run each task to its end, or to its procedure's next request.

        A task whose key is in ``answers`` was suspended by an earlier execute: it resumes
        with its answer (in its own parameters and optimizer buffers, which were kept
        aside meanwhile). A task that yields a request is suspended and its request
        returned in :attr:`Outcome.requests`.
        """
        raise NotImplementedError

    def discard(self, keys: Sequence[int]) -> None:
        """Forget suspended tasks that will never resume (their device went offline)."""

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
