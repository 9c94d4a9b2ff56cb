"""The ``workers`` runtime: FedML Parrot's sequential, hierarchical training on N processes.

Rank 0 is the server (the engine's process); ranks 1..N are long-lived workers, joined in
one ``torch.distributed`` process group over gloo. Workers train on the CPU or each on
its own GPU (``device``; one worker per GPU by default). Each round:

1. the server places the round's tasks on workers with the workload-aware
   :class:`~roost.runtime.schedule.Scheduler` (longest predicted task first, to the worker
   that would finish it earliest), broadcasts the placement and sends the payload: to
   every worker (``star``), or once to worker 1, which broadcasts it over the workers' own
   group, NCCL on GPUs (``relay``);
2. every worker trains its clients one after another on its one resident model (it runs
   the ``local`` runtime on its share) and folds their results into local sums;
3. one reduce brings the workers' sums to the server (``star``), or to worker 1 over the
   workers' group, which sends the total on (``relay``): per-round traffic is
   O(workers x model), never O(clients x model). A strategy whose rule is not a sum
   (``aggregation = "per_client"``), or several groups per execute, receive per-group
   results by a gather instead.

The server is not in the NCCL group: NCCL refuses two ranks on one GPU, and with one
worker per GPU the server would have to share one.

Workers get the dataset, model and algorithm from the job's picklable ``parts`` builder,
which the server broadcasts when they join: the runner's rebuilds them from the run's
resolved config, so nothing large is pickled; a job without one ships its own objects.
Client state is either shipped with the tasks and returned (in-memory store) or read and
written by the workers themselves in a shared store file (disk store).

A worker that dies stops the run with :class:`WorkerFailure`, naming the worker and the
clients it held; ``roost run --resume DIR`` continues from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from roost.algorithms.base import Contribution, Payload
from roost.data.base import ClientData
from roost.errors import WorkerFailure
from roost.evaluation import evaluate
from roost.params import FlatModel
from roost.registry import ConfigError
from roost.runtime.base import RUNTIMES, Job, Outcome, Runtime, Task
from roost.runtime.device import available_gpus, default_worker_count, resolve_device
from roost.runtime.schedule import Assignment, Scheduler, round_robin
from roost.runtime.worker_process import spawned_worker, worker_loop
from roost.runtime.workers_protocol import (
    BACKEND,
    RELAY_RANK,
    RoundOrder,
    Transport,
    WorkerReply,
    WorkersRuntimeConfig,
    free_port,
    launched_by_torchrun,
    payload_tensors,
    shared_store_info,
)

__all__ = [
    "WorkerFailure",
    "WorkersRuntime",
    "WorkersRuntimeConfig",
    "launched_by_torchrun",
    "worker_loop",
]


class WorkersRuntime(Runtime):
    """Server half: spawns (or, under torchrun, joins) the workers and drives rounds."""

    def __init__(self, config: WorkersRuntimeConfig | None = None) -> None:
        self.config = config or WorkersRuntimeConfig()
        self.processes: list[Any] = []
        self.num_workers = 0
        self.scheduler: Scheduler | None = None
        self._job: Job | None = None
        self._eval_model: FlatModel | None = None
        self._round = 0
        self._holder: dict[int, int] = {}  # suspended task key -> worker index
        self._discard: list[int] = []  # suspended tasks to forget, sent with the next order
        self.transport = Transport("star", "gloo")

    # ---- lifecycle
    def start(self, job: Job) -> None:
        cfg = self.config
        self._job = job
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        gpus = available_gpus()
        if launched_by_torchrun():
            world = int(os.environ["WORLD_SIZE"])
            if int(os.environ["RANK"]) != 0:
                raise RuntimeError("WorkersRuntime.start runs on rank 0 only")
            if cfg.workers and cfg.workers != world - 1:
                raise ConfigError(
                    "runtime.workers",
                    cfg.workers,
                    f"torchrun launched {world} processes, so there are {world - 1} workers "
                    "(every rank but the server); leave workers unset under torchrun",
                )
            dist.init_process_group(
                BACKEND, init_method="env://", rank=0, world_size=world, timeout=timeout
            )
        else:
            world = (cfg.workers or default_worker_count(cfg.device, gpus)) + 1
            resolve_device(cfg.device, 0, gpus)  # the spawned workers' devices exist here
            init_method = f"tcp://127.0.0.1:{free_port()}"
            ctx = torch.multiprocessing.get_context("spawn")
            for rank in range(1, world):
                p = ctx.Process(
                    target=spawned_worker,
                    args=(rank, world, init_method, cfg),
                    daemon=True,
                    name=f"roost-worker-{rank}",
                )
                p.start()
                self.processes.append(p)
            dist.init_process_group(
                BACKEND, init_method=init_method, rank=0, world_size=world, timeout=timeout
            )
        self.num_workers = world - 1
        if self.num_workers < 1:
            raise RuntimeError("runtime=workers needs at least one worker process")
        self.scheduler = Scheduler(self.num_workers, cfg.smoothing)
        workers_use_gpus = cfg.device.startswith("cuda") or (cfg.device == "auto" and gpus > 0)
        self.transport = Transport.choose(cfg.topology, workers_use_gpus, dist.is_nccl_available())
        setup = {
            "parts": job.worker_parts(),
            "store": shared_store_info(job.state_store),
            "transport": self.transport,
            "runtime": cfg,
        }

        def join() -> None:
            dist.broadcast_object_list([setup], src=0)
            if self.transport.topology == "relay":  # every rank takes part in new_group
                dist.new_group(ranks=list(range(1, world)), backend=self.transport.worker_backend)

        self._guard("joining", {}, join)
        eval_device = torch.device("cuda", 0) if workers_use_gpus and gpus else torch.device("cpu")
        self._eval_model = FlatModel(job.build_module(), eval_device)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def close(self) -> None:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.broadcast_object_list([None], src=0)
            for p in self.processes:
                p.join(timeout=30)
            dist.destroy_process_group()
        for p in self.processes:
            if p.is_alive():
                p.kill()
        self.processes = []
        self._eval_model = None

    # ---- rounds
    @property
    def batch_hint(self) -> int:  # type: ignore[override]
        """Enough tasks for every worker to train a few clients per exchange."""
        return 4 * max(1, self.num_workers)

    def execute(
        self,
        tasks: Sequence[Task],
        payloads: Mapping[int, Payload],
        num_groups: int = 1,
        defer_state: bool = False,
        answers: Mapping[int, Payload] | None = None,
    ) -> Outcome:
        job, scheduler = self._job, self.scheduler
        if job is None or scheduler is None:
            raise RuntimeError("runtime not started")
        answers = answers or {}
        # a suspended task resumes on the worker that holds its procedure
        resumed = [t for t in tasks if t.key in answers]
        tasks = [t for t in tasks if t.key not in answers]
        self._round = (tasks or resumed)[0].round if (tasks or resumed) else self._round
        units = [
            float(
                job.algorithm.work_examples(job.dataset.num_examples(t.client_id), dict(t.settings))
            )
            for t in tasks
        ]
        plan = scheduler.plan(units)
        # a prediction in seconds needs a measured worker; before that it is in units
        predicted_s: float | None = (
            plan.predicted_makespan_s if any(scheduler.observations) else None
        )
        if self.config.placement == "round_robin":
            plan = Assignment(round_robin(units, self.num_workers), [], float("nan"))
            predicted_s = None
        assignments = [[tasks[i] for i in idx] for idx in plan.per_worker]
        for t in resumed:
            assignments[self._holder.pop(t.key)].append(t)
        held = {w + 1: [t.client_id for t in a] for w, a in enumerate(assignments)}
        payloads = dict(payloads)
        for a in answers.values():
            payloads.setdefault(a.version, a)
        stateful = bool(job.algorithm.client_state_spec(self._num_params()))
        shipped = None
        if stateful and shared_store_info(job.state_store) is None:
            shipped = {}
            for t in tasks:
                s = job.state_store.get(t.client_id)
                if s is not None:
                    shipped[t.client_id] = s
        layout = {v: [(n, t.numel()) for n, t in payload_tensors(p)] for v, p in payloads.items()}
        answer_versions = {k: a.version for k, a in answers.items()}
        order = RoundOrder(
            assignments, layout, num_groups, shipped, defer_state, answer_versions, self._discard
        )
        self._discard = []

        relay = self.transport.topology == "relay"

        def exchange() -> tuple[list[WorkerReply], list[Contribution]]:
            dist.broadcast_object_list([order], src=0)
            for _, payload in sorted(payloads.items()):
                for _, t in payload_tensors(payload):
                    if relay:
                        dist.send(t.detach().contiguous(), dst=RELAY_RANK)
                    else:
                        dist.broadcast(t.detach().contiguous(), src=0)
            replies: list[Any] = [None] * (self.num_workers + 1)
            dist.gather_object(None, replies, dst=0)
            worker_replies: list[WorkerReply] = replies[1:]
            if num_groups == 1:
                return worker_replies, [self._reduce(worker_replies)]
            merged = [Contribution() for _ in range(num_groups)]
            for reply in worker_replies:
                for g, c in enumerate(reply.contributions):
                    if c.count:
                        merged[g].merge(c)
            return worker_replies, merged

        replies, contributions = self._guard(f"round {self._round}", held, exchange)
        requests: dict[int, Any] = {}
        for w, reply in enumerate(replies):
            for key, request in reply.requests.items():
                self._holder[key] = w
                requests[key] = request
        new_states = {cid: s for reply in replies for cid, s in reply.new_states.items()}
        if not defer_state:
            for cid, state in new_states.items():
                job.state_store.put(cid, state)
            new_states = {}
        busy = [r.busy_s for r in replies]
        for w, idx in enumerate(plan.per_worker):  # resumed tasks are not in the units
            scheduler.observe(w, sum(units[i] for i in idx), busy[w])
        by_client = {cid: m for r in replies for cid, m in r.client_metrics}
        client_metrics = [
            (t.client_id, by_client[t.client_id])
            for t in [*tasks, *resumed]
            if t.client_id in by_client
        ]
        metrics = {
            "predicted_makespan_s": predicted_s,
            "makespan_s": max(busy, default=0.0),
            "worker_busy_s": busy,
            "worker_units": [sum(units[i] for i in idx) for idx in plan.per_worker],
            "worker_peak_rss_mb": [r.peak_rss_mb for r in replies],
            "worker_devices": [r.device for r in replies],
        }
        return Outcome(contributions, client_metrics, metrics, new_states, requests)

    def discard(self, keys: Sequence[int]) -> None:
        for key in keys:
            if self._holder.pop(key, None) is not None:
                self._discard.append(key)

    def _reduce(self, replies: list[WorkerReply]) -> Contribution:
        headers = [r.header for r in replies if r.header is not None]
        names: dict[str, int] = {}
        for h in headers:
            names.update(h.sizes)
        layout = sorted(names.items())
        dist.broadcast_object_list([layout], src=0)
        total = Contribution()
        relay = self.transport.topology == "relay"
        for name, numel in layout:
            total.sums[name] = torch.zeros(numel, dtype=torch.float64)
            if relay:  # the workers reduce among themselves; worker 1 sends the total
                dist.recv(total.sums[name], src=RELAY_RANK)
            else:
                dist.reduce(total.sums[name], dst=0, op=dist.ReduceOp.SUM)
        for h in headers:
            for k, v in h.scalar_sums.items():
                total.scalar_sums[k] = total.scalar_sums.get(k, 0.0) + v
            total.weight += h.weight
            total.count += h.count
            total.clients.extend(h.clients)
        return total

    def _guard(self, what: str, held: Mapping[int, list[int]], fn: Any) -> Any:
        """Run a collective exchange; turn a dead worker into a WorkerFailure naming it."""
        try:
            return fn()
        except Exception as e:  # gloo raises RuntimeError (or a subclass) on a lost peer
            for p in self.processes:  # a worker that failed is exiting: give it a moment
                p.join(timeout=2.0 / max(1, len(self.processes)))
            dead = [(rank, p) for rank, p in enumerate(self.processes, start=1) if not p.is_alive()]
            if dead:
                parts = []
                for rank, p in dead:
                    code = p.exitcode
                    how = (
                        f"killed by {signal.Signals(-code).name}"
                        if code is not None and code < 0
                        else f"exit code {code}"
                    )
                    parts.append(
                        f"worker {rank} (pid {p.pid}) died ({how}) during {what} "
                        f"holding clients {held.get(rank, [])}"
                    )
                message = "; ".join(parts)
            else:
                message = f"a worker stopped answering during {what} ({e}); held: {dict(held)}"
            self.abort()
            raise WorkerFailure(message) from e

    def abort(self) -> None:
        for p in self.processes:
            if p.is_alive():
                p.kill()
        for p in self.processes:
            p.join(timeout=10)
        self.processes = []
        with contextlib.suppress(Exception):
            dist.destroy_process_group()

    def _num_params(self) -> int:
        assert self._eval_model is not None
        return self._eval_model.numel

    def evaluate(self, params: torch.Tensor, data: ClientData) -> tuple[float, float]:
        model = self._eval_model
        if model is None:
            raise RuntimeError("runtime not started")
        model.load_(params)
        return evaluate(model.module, data)

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's learned worker speeds."""
        return {"scheduler": self.scheduler.state_dict() if self.scheduler else {}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore learned speeds when the run resumes on as many workers as it had; on
        another number (a torchrun relaunch of another size) they are learned anew."""
        saved = state.get("scheduler") or {}
        if self.scheduler is None:
            raise RuntimeError("runtime not started")
        if saved and int(saved["num_workers"]) == self.scheduler.num_workers:
            self.scheduler.load_state_dict(saved)


RUNTIMES.register("workers", WorkersRuntimeConfig, "N worker processes, many clients each")(
    WorkersRuntime
)
