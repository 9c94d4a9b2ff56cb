"""The ``local`` runtime: one process, one resident model, clients one after another.

This is the reference oracle every faster runtime is tested against, and already the
Parrot pattern on one process: the model and its flat buffers are built once; each task
loads the payload into them in place, trains, and its result is folded into the group's
running sum before the next task starts. No per-client model, optimiser or result copy is
ever kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from roost.algorithms.base import ClientContext, Contribution, Payload, drive
from roost.data.base import ClientData
from roost.evaluation import evaluate
from roost.params import FlatModel
from roost.runtime.base import RUNTIMES, Job, Outcome, Runtime, Task
from roost.state import ClientStateStore

__all__ = ["LocalRuntime", "LocalRuntimeConfig"]


@dataclass(frozen=True)
class LocalRuntimeConfig:
    """The local runtime has no options."""


def _no_server(request: Any) -> Any:
    raise RuntimeError(
        f"client procedure sent {type(request).__name__} to the server, but this engine "
        "mode runs client tasks without server interaction"
    )


class LocalRuntime(Runtime):
    def __init__(self, config: LocalRuntimeConfig | None = None) -> None:
        self.config = config or LocalRuntimeConfig()
        self._job: Job | None = None
        self._model: FlatModel | None = None
        self._generator = torch.Generator()

    def start(self, job: Job) -> None:
        self._job = job
        self._model = FlatModel(job.build_module())

    def use_state_store(self, store: ClientStateStore) -> None:
        """Read and write client state in ``store`` from the next execute on."""
        if self._job is None:
            raise RuntimeError("runtime not started")
        self._job.state_store = store

    @property
    def model(self) -> FlatModel:
        if self._model is None:
            raise RuntimeError("runtime not started")
        return self._model

    def execute(
        self, tasks: Sequence[Task], payloads: Mapping[int, Payload], num_groups: int = 1
    ) -> Outcome:
        job = self._job
        if job is None:
            raise RuntimeError("runtime not started")
        model = self.model
        alg, store = job.algorithm, job.state_store
        stateful = bool(alg.client_state_spec(model.numel))
        wants_test = alg.uses_client_test_data
        contributions = [Contribution() for _ in range(num_groups)]
        metrics: list[tuple[int, dict[str, float]]] = []
        for task in tasks:
            cid = task.client_id
            payload = payloads[task.version]
            data = job.dataset.client_data(cid)
            model.load_(payload.params)
            self._generator.manual_seed(task.seed)
            # Seeds dropout and other global-RNG users. Not torch.manual_seed: on every
            # call it queues a CUDA seeding with a captured stack trace (~1 ms a task).
            torch.default_generator.manual_seed(task.seed)
            test = job.dataset.client_test_data(cid) if wants_test else None
            ctx = ClientContext(cid, task.round, task.seed, len(data), self._generator, test)
            state = store.get(cid) if stateful else None
            out = drive(alg.update(ctx, model, data, payload, state), _no_server)
            if out.state is not None:
                store.put(cid, out.state)
            contributions[task.group].fold(out.result, cid)
            metrics.append((cid, out.metrics))
        return Outcome(contributions, metrics)

    def evaluate(self, params: torch.Tensor, data: ClientData) -> tuple[float, float]:
        model = self.model
        model.load_(params)
        return evaluate(model.module, data)

    def close(self) -> None:
        self._model = None


RUNTIMES.register("local", LocalRuntimeConfig, "one process, clients in sequence")(LocalRuntime)
