"""The ``workers`` runtime: FedML Parrot's sequential, hierarchical training on N processes.

Rank 0 is the server (the engine's process); ranks 1..N are long-lived workers, joined in
one ``torch.distributed`` process group (gloo on CPU, NCCL when GPUs are present). Each
round:

1. the server places the round's tasks on workers with the workload-aware
   :class:`~roost.runtime.schedule.Scheduler` (longest predicted task first, to the worker
   that would finish it earliest) and broadcasts the placement and the payload (one
   broadcast of the model per round);
2. every worker trains its clients one after another on its one resident model (it runs
   the ``local`` runtime on its share) and folds their results into local sums;
3. one reduce brings the workers' sums to the server: per-round traffic is
   O(workers x model), never O(clients x model). A strategy whose rule is not a sum
   (``aggregation = "per_client"``), or several groups per execute, receive per-group
   results by a gather instead.

Workers rebuild the dataset, model and algorithm from the run's config, which the server
broadcasts when they join, so nothing large is pickled. Client state is either shipped
with the tasks and returned (in-memory store) or read and written by the workers
themselves in a shared store file (disk store).

A worker that dies stops the run with :class:`WorkerFailure`, naming the worker and the
clients it held; ``roost run --resume DIR`` continues from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from roost.algorithms.base import Contribution, Payload
from roost.data.base import ClientData
from roost.errors import WorkerFailure
from roost.evaluation import evaluate
from roost.params import FlatModel
from roost.registry import check
from roost.runtime.base import RUNTIMES, Job, Outcome, Runtime, Task
from roost.runtime.schedule import Assignment, Scheduler, round_robin
from roost.state import ClientStateStore
from roost.track.resources import peak_rss_mb, use_mmap_for_large_allocations

__all__ = ["WorkerFailure", "WorkersRuntime", "WorkersRuntimeConfig", "launched_by_torchrun"]

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class WorkersRuntimeConfig:
    """workers: worker processes (0: one per GPU when GPUs are present, else 2).
    backend: ``auto`` = NCCL with GPUs, gloo without. timeout_s: the longest a collective
    may wait (a round's compute included) before the run is declared failed.
    threads: torch threads per worker (0: the machine's cores shared evenly).
    smoothing: the scheduler's moving-average weight for measured worker speeds.
    placement: ``lpt`` (longest predicted task first, to the earliest-finishing worker)
    or ``round_robin`` (task i to worker i mod N; the baseline).
    slowdown: per-worker factors that stretch each worker's compute time by sleeping
    (``1,2`` makes worker 2 take twice as long): emulates a heterogeneous cluster for
    scheduling experiments. Empty: no slowdown."""

    workers: int = 0
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = 1800.0
    threads: int = 0
    smoothing: float = 0.3
    placement: Literal["lpt", "round_robin"] = "lpt"
    slowdown: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        check(self.workers >= 0, "workers", self.workers, "must be >= 0 (0: automatic)")
        check(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be > 0")
        check(self.threads >= 0, "threads", self.threads, "must be >= 0 (0: automatic)")
        check(0 < self.smoothing <= 1, "smoothing", self.smoothing, "must be in (0, 1]")
        check(
            all(f >= 1 for f in self.slowdown),
            "slowdown",
            self.slowdown,
            "factors must be >= 1 (1 = full speed)",
        )


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _backend(cfg: WorkersRuntimeConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


# --------------------------------------------------------------------------- messages


@dataclass
class RoundOrder:
    """What the server broadcasts before each execute."""

    assignments: list[list[Task]]
    payload_layout: dict[int, list[tuple[str, int]]]
    num_groups: int
    shipped_states: dict[int, Tensors] | None


@dataclass
class SumHeader:
    """A contribution without its tensors: their sizes, and the small fields."""

    sizes: dict[str, int]
    scalar_sums: dict[str, float]
    weight: float
    count: int
    clients: list[int]

    @staticmethod
    def of(c: Contribution) -> SumHeader:
        sizes = {k: v.numel() for k, v in c.sums.items()}
        return SumHeader(sizes, c.scalar_sums, c.weight, c.count, c.clients)


@dataclass
class WorkerReply:
    """What a worker sends back by gather. On the reduce path (one group) it carries the
    :class:`SumHeader` and the tensors follow in one reduce; otherwise it carries the
    per-group contributions whole."""

    busy_s: float
    client_metrics: list[tuple[int, dict[str, float]]]
    peak_rss_mb: float
    header: SumHeader | None = None
    contributions: list[Contribution] = field(default_factory=list)
    new_states: dict[int, Tensors] = field(default_factory=dict)


def _shared_store_info(store: ClientStateStore) -> dict[str, Any] | None:
    """How another process opens ``store`` (None: it lives in this process's memory)."""
    share = getattr(store, "share", None)
    return share() if share is not None else None


def _open_shared_store(info: dict[str, Any]) -> Any:
    from roost.state import open_shared_store

    return open_shared_store(info)


def _payload_tensors(payload: Payload) -> list[tuple[str, torch.Tensor]]:
    return [("params", payload.params), *sorted(payload.extras.items())]


class _ShippedStates(ClientStateStore):
    """A worker's view of an in-memory store: states shipped with the tasks, new states
    collected to be sent back."""

    def __init__(self, states: Mapping[int, Tensors]) -> None:
        self.states = dict(states)
        self.new: dict[int, Tensors] = {}

    def get(self, client_id: int) -> Tensors | None:
        return self.states.get(client_id)

    def put(self, client_id: int, state: Tensors) -> None:
        self.new[client_id] = {k: v.detach().clone() for k, v in state.items()}


# --------------------------------------------------------------------------- worker side


def worker_loop(rank: int, world_size: int, init_method: str, cfg: WorkersRuntimeConfig) -> None:
    """A worker's life: join, receive the run config, then execute rounds until told to
    stop. Called in spawned processes and, under torchrun, by ranks >= 1."""
    from roost.build import build_parts
    from roost.config import resolve
    from roost.runtime.local import LocalRuntime

    use_mmap_for_large_allocations()
    backend = _backend(cfg)
    if backend == "nccl":
        torch.cuda.set_device((rank - 1) % torch.cuda.device_count())
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=cfg.timeout_s),
    )
    try:
        (setup,) = _recv_object()
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // max(1, world_size - 1))
        torch.set_num_threads(threads)
        parts = build_parts(resolve(setup["config"]))
        shared_store = _open_shared_store(setup["store"]) if setup["store"] else None
        runtime = LocalRuntime()
        runtime.start(
            Job(
                parts.algorithm,
                parts.dataset,
                parts.build_module,
                shared_store or _ShippedStates({}),
            )
        )
        payload_buffers: dict[tuple[int, str], torch.Tensor] = {}
        while True:
            (message,) = _recv_object()
            if message is None:
                return
            order: RoundOrder = message
            payloads = _recv_payloads(order, payload_buffers)
            store = shared_store or _ShippedStates(order.shipped_states or {})
            runtime.use_state_store(store)
            t0 = time.perf_counter()
            outcome = runtime.execute(order.assignments[rank - 1], payloads, order.num_groups)
            busy = time.perf_counter() - t0
            if rank <= len(cfg.slowdown) and cfg.slowdown[rank - 1] > 1:
                time.sleep(busy * (cfg.slowdown[rank - 1] - 1))
                busy = time.perf_counter() - t0
            if shared_store is not None:
                shared_store.flush()  # durable before the server commits the round
            new_states = store.new if isinstance(store, _ShippedStates) else {}
            _send_reply(order, busy, outcome, new_states)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _recv_object() -> list[Any]:
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    return box


def _recv_payloads(
    order: RoundOrder, buffers: dict[tuple[int, str], torch.Tensor]
) -> dict[int, Payload]:
    payloads: dict[int, Payload] = {}
    for version, layout in sorted(order.payload_layout.items()):
        tensors: Tensors = {}
        for name, numel in layout:
            key = (0, name)  # one buffer per name, reused round after round
            buf = buffers.get(key)
            if buf is None or buf.numel() != numel or len(order.payload_layout) > 1:
                buf = torch.empty(numel, dtype=torch.float32)
                if len(order.payload_layout) == 1:
                    buffers[key] = buf
            dist.broadcast(buf, src=0)
            tensors[name] = buf
        params = tensors.pop("params")
        payloads[version] = Payload(params, version, tensors)
    return payloads


def _send_reply(
    order: RoundOrder, busy_s: float, outcome: Outcome, new_states: dict[int, Tensors]
) -> None:
    if order.num_groups == 1:
        contribution = outcome.contributions[0]
        header = SumHeader.of(contribution)
        reply = WorkerReply(
            busy_s, outcome.client_metrics, peak_rss_mb(), header, new_states=new_states
        )
        dist.gather_object(reply, None, dst=0)
        (layout,) = _recv_object()
        for name, numel in layout:  # each sum in place: no packed copy of the model
            t = contribution.sums.get(name)
            if t is None:
                t = torch.zeros(numel, dtype=torch.float64)
            dist.reduce(t.reshape(-1), dst=0, op=dist.ReduceOp.SUM)
    else:
        reply = WorkerReply(
            busy_s,
            outcome.client_metrics,
            peak_rss_mb(),
            None,
            outcome.contributions,
            new_states,
        )
        dist.gather_object(reply, None, dst=0)


# --------------------------------------------------------------------------- server side


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

    # ---- lifecycle
    def start(self, job: Job) -> None:
        cfg = self.config
        self._job = job
        backend = _backend(cfg)
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        if launched_by_torchrun():
            world = int(os.environ["WORLD_SIZE"])
            if int(os.environ["RANK"]) != 0:
                raise RuntimeError("WorkersRuntime.start runs on rank 0 only")
            dist.init_process_group(
                backend, init_method="env://", rank=0, world_size=world, timeout=timeout
            )
        else:
            n = cfg.workers or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
            world = n + 1
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            ctx = torch.multiprocessing.get_context("spawn")
            for rank in range(1, world):
                p = ctx.Process(
                    target=worker_loop,
                    args=(rank, world, init_method, cfg),
                    daemon=True,
                    name=f"roost-worker-{rank}",
                )
                p.start()
                self.processes.append(p)
            dist.init_process_group(
                backend, init_method=init_method, rank=0, world_size=world, timeout=timeout
            )
        self.num_workers = world - 1
        if self.num_workers < 1:
            raise RuntimeError("runtime=workers needs at least one worker process")
        self.scheduler = Scheduler(self.num_workers, cfg.smoothing)
        setup = {"config": job.config, "store": _shared_store_info(job.state_store)}
        self._guard("joining", {}, lambda: dist.broadcast_object_list([setup], src=0))
        self._eval_model = FlatModel(job.build_module())

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
    def execute(
        self, tasks: Sequence[Task], payloads: Mapping[int, Payload], num_groups: int = 1
    ) -> Outcome:
        job, scheduler = self._job, self.scheduler
        if job is None or scheduler is None:
            raise RuntimeError("runtime not started")
        self._round = tasks[0].round if tasks else self._round
        units = [
            float(job.algorithm.work_examples(job.dataset.num_examples(t.client_id))) for t in tasks
        ]
        plan = scheduler.plan(units)
        if self.config.placement == "round_robin":
            plan = Assignment(round_robin(units, self.num_workers), [], float("nan"))
        assignments = [[tasks[i] for i in idx] for idx in plan.per_worker]
        held = {w + 1: [t.client_id for t in a] for w, a in enumerate(assignments)}
        stateful = bool(job.algorithm.client_state_spec(self._num_params()))
        shipped = None
        if stateful and _shared_store_info(job.state_store) is None:
            shipped = {}
            for t in tasks:
                s = job.state_store.get(t.client_id)
                if s is not None:
                    shipped[t.client_id] = s
        layout = {v: [(n, t.numel()) for n, t in _payload_tensors(p)] for v, p in payloads.items()}
        order = RoundOrder(assignments, layout, num_groups, shipped)

        def exchange() -> tuple[list[WorkerReply], list[Contribution]]:
            dist.broadcast_object_list([order], src=0)
            for _, payload in sorted(payloads.items()):
                for _, t in _payload_tensors(payload):
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
        for reply in replies:
            for cid, state in reply.new_states.items():
                job.state_store.put(cid, state)
        busy = [r.busy_s for r in replies]
        for w, idx in enumerate(plan.per_worker):
            scheduler.observe(w, sum(units[i] for i in idx), busy[w])
        by_client = {cid: m for r in replies for cid, m in r.client_metrics}
        client_metrics = [(t.client_id, by_client.get(t.client_id, {})) for t in tasks]
        metrics = {
            "predicted_makespan_s": plan.predicted_makespan_s,
            "makespan_s": max(busy, default=0.0),
            "worker_busy_s": busy,
            "worker_units": [sum(units[i] for i in idx) for idx in plan.per_worker],
            "worker_peak_rss_mb": [r.peak_rss_mb for r in replies],
        }
        return Outcome(contributions, client_metrics, metrics)

    def _reduce(self, replies: list[WorkerReply]) -> Contribution:
        headers = [r.header for r in replies if r.header is not None]
        names: dict[str, int] = {}
        for h in headers:
            names.update(h.sizes)
        layout = sorted(names.items())
        dist.broadcast_object_list([layout], src=0)
        total = Contribution()
        for name, numel in layout:
            total.sums[name] = torch.zeros(numel, dtype=torch.float64)
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
            self._abort()
            raise WorkerFailure(message) from e

    def _abort(self) -> None:
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
        return {"scheduler": self.scheduler.state_dict() if self.scheduler else {}}


RUNTIMES.register("workers", WorkersRuntimeConfig, "N worker processes, many clients each")(
    WorkersRuntime
)
