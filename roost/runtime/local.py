"""The ``local`` runtime: one process, one resident model, clients one after another.

This is the reference oracle every faster runtime is tested against, and already the
Parrot pattern on one process: the model and its flat buffers are built once; each task
loads the payload into them in place, trains, and its result is folded into the group's
running sum before the next task starts. No per-client model, optimiser or result copy is
ever kept.

``device`` (see :mod:`roost.runtime.device`) puts the resident model on a GPU: the payload
moves there once per execute, each client's examples and state once per task, and new
client state and the round's sums come back to host memory for the strategy and the
store.

A generator procedure that yields a request is suspended (:class:`Suspended`): copies of
its parameters, scratch buffers and random-generator states are kept by task key, the
resident model goes on to the next task, and a later execute with the answer restores
them and resumes the generator where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from roost.algorithms.base import ClientContext, Contribution, Payload, UpdateOutput
from roost.data.base import ClientData
from roost.evaluation import evaluate
from roost.params import FlatModel
from roost.runtime.base import RUNTIMES, Job, Outcome, Runtime, Task
from roost.runtime.device import check_device_spec, resolve_device, seed_device_rng, tensors_to
from roost.state import ClientStateStore

__all__ = ["LocalRuntime", "LocalRuntimeConfig"]


@dataclass(frozen=True)
class LocalRuntimeConfig:
    """device: where the model trains: auto (the first GPU if CUDA is available, else
    the CPU), cpu, cuda or cuda:K."""

    device: str = "auto"

    def __post_init__(self) -> None:
        check_device_spec("device", self.device)


@dataclass
class Suspended:
    """A task whose procedure yielded a request: the generator, and copies of what it had
    in the resident model and in the random generators, restored when it resumes."""

    procedure: Generator[Any, Any, UpdateOutput]
    resident: dict[str, torch.Tensor]
    generator_state: torch.Tensor
    default_state: torch.Tensor


class LocalRuntime(Runtime):
    """``sums_device``: where :meth:`execute` leaves the round's sums (default: host
    memory, where strategies step; a worker that reduces over NCCL keeps them on its GPU).
    """

    def __init__(self, config: LocalRuntimeConfig | None = None, sums_device: str = "cpu") -> None:
        self.config = config or LocalRuntimeConfig()
        self.sums_device = torch.device(sums_device)
        self.device = torch.device("cpu")
        self._job: Job | None = None
        self._model: FlatModel | None = None
        self._generator = torch.Generator()
        self._suspended: dict[int, Suspended] = {}

    def start(self, job: Job) -> None:
        self._job = job
        self.device = resolve_device(self.config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._model = FlatModel(job.build_module(), self.device)

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
        self,
        tasks: Sequence[Task],
        payloads: Mapping[int, Payload],
        num_groups: int = 1,
        defer_state: bool = False,
        answers: Mapping[int, Payload] | None = None,
        server: Callable[[Any], Any] | None = None,
    ) -> Outcome:
        """Run ``tasks`` (see :class:`~roost.runtime.base.Runtime`). ``server``, when
        given, is every task's ``ClientContext.server``: it answers a split-learning
        procedure's messages (a deployed node sends them over the network)."""
        job = self._job
        if job is None:
            raise RuntimeError("runtime not started")
        model, device, host = self.model, self.device, torch.device("cpu")
        alg, store = job.algorithm, job.state_store
        stateful = bool(alg.client_state_spec(model.numel))
        wants_test = alg.uses_client_test_data
        on_device = {v: p.to(device) for v, p in payloads.items()}
        contributions = [Contribution() for _ in range(num_groups)]
        metrics: list[tuple[int, dict[str, float]]] = []
        new_states: dict[int, dict[str, torch.Tensor]] = {}
        requests: dict[int, Any] = {}
        for task in tasks:
            cid = task.client_id
            suspended = self._suspended.pop(task.key, None)
            if suspended is not None:
                if answers is None or task.key not in answers:
                    raise RuntimeError(f"task {task.key} of client {cid} resumed without an answer")
                model.restore_resident(suspended.resident)
                self._generator.set_state(suspended.generator_state)
                torch.default_generator.set_state(suspended.default_state)
                procedure: Generator[Any, Any, UpdateOutput] | None = suspended.procedure
                send: Any = answers[task.key].to(device)
            else:
                payload = on_device[task.version]
                data = job.dataset.client_data(cid).to(device)
                model.load_(payload.params)
                self._generator.manual_seed(task.seed)
                seed_device_rng(device, task.seed)  # dropout and other global-RNG users
                test = job.dataset.client_test_data(cid) if wants_test else None
                if test is not None:
                    test = test.to(device)
                ctx = ClientContext(
                    cid,
                    task.round,
                    task.seed,
                    len(data),
                    self._generator,
                    test,
                    dict(task.settings),
                    server,
                )
                state = store.get(cid) if stateful else None
                if state is not None:
                    state = tensors_to(state, device)
                returned = alg.update(ctx, model, data, payload, state)
                if isinstance(returned, UpdateOutput):
                    out, procedure = returned, None
                else:
                    procedure, send = returned, None  # send(None) starts a generator
            if procedure is not None:
                try:
                    request = procedure.send(send)
                except StopIteration as stop:
                    if not isinstance(stop.value, UpdateOutput):
                        raise TypeError("a client procedure must return an UpdateOutput") from None
                    out = stop.value
                else:
                    if task.key < 0:
                        raise RuntimeError(
                            f"client {cid}'s procedure sent {type(request).__name__} to the "
                            "server, but its task has no key to resume it by"
                        )
                    self._suspended[task.key] = Suspended(
                        procedure,
                        model.save_resident(),
                        self._generator.get_state(),
                        torch.default_generator.get_state(),
                    )
                    requests[task.key] = request
                    continue
            if out.state is not None:
                if defer_state:  # a copy: the state may alias the resident model
                    new_states[cid] = {
                        k: v.detach().to(host, copy=True) for k, v in out.state.items()
                    }
                else:
                    store.put(cid, tensors_to(out.state, host))
            contributions[task.group].fold(out.result, cid)
            metrics.append((cid, out.metrics))
        contributions = [c.to(self.sums_device) for c in contributions]
        return Outcome(contributions, metrics, new_states=new_states, requests=requests)

    def discard(self, keys: Sequence[int]) -> None:
        for key in keys:
            self._suspended.pop(key, None)

    def evaluate(self, params: torch.Tensor, data: ClientData) -> tuple[float, float]:
        model = self.model
        model.load_(params)
        return evaluate(model.module, data)

    def close(self) -> None:
        self._model = None
        self._suspended.clear()


RUNTIMES.register("local", LocalRuntimeConfig, "one process, clients in sequence")(LocalRuntime)
