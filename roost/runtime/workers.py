"""The ``workers`` runtime: FedML Parrot's sequential, hierarchical training on N processes.

Rank 0 is the server (the engine's process); ranks 1..N are long-lived workers. Workers
train on the CPU or each on its own GPU (``device``; one worker per GPU by default).

Starting. The server starts its workers itself (:mod:`roost.runtime.launch`: forked from
it as soon as the run's config is known, when that is safe, so that they do not import
torch again), or, under torchrun, they are the other ranks. Workers get the dataset,
model and algorithm from the job's picklable ``parts`` builder: the runner's rebuilds
them from the run's resolved config, so nothing large is pickled; a job without one ships
its own objects. Client state is either shipped with the tasks and returned (in-memory
store) or read and written by the workers themselves in a shared store file (disk store).

Collective rounds, over ``torch.distributed`` (gloo), which the server's own workers join
at their first such round, and torchrun's from the start. Each round:

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
   results by a gather instead (a single result as the float32 tensor it was, which the
   server folds to the same float64 sum).

Streamed tasks. An asynchronous method computes ahead tasks that are certain to be
delivered, each its own group, and reads each result only at its delivery. For a method
without client state, whose tasks make no mid-task request, on workers this runtime
started, :meth:`execute` *streams* them and returns at once, with results that are
received when the engine first reads them (:class:`StreamedContribution`). Each task goes
by its worker's pipe to the worker predicted to be free first (the scheduler's learned
speeds, counting what it has queued), with the model version it starts from in shared
memory, written once for all workers; every worker trains its queue without waiting for
the others or for the server, and writes each result (the float32 tensor its client
computed, see :func:`~roost.runtime.workers_protocol.result_to_wire`) into its own
shared-memory ring as soon as it has it, while the server goes on delivering the earlier
ones: the engine's event loop and the workers' training overlap. The server folds each
result into float64 as the local runtime does, so results are the local runtime's bit
for bit (same code, payload and seed, each result folded alone). Where shared memory is
not available (not Linux on x86), versions and results travel on the pipes.

A worker that dies stops the run with :class:`WorkerFailure`, naming the worker and the
clients it held; ``roost run --resume DIR`` continues from the last checkpoint.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import os
import pickle
import select
import signal
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

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
from roost.runtime.launch import Launched, claim, launch
from roost.runtime.schedule import Assignment, Scheduler, round_robin
from roost.runtime.worker_process import worker_loop
from roost.runtime.workers_protocol import (
    BACKEND,
    DTYPES,
    RELAY_RANK,
    ResultRing,
    RoundOrder,
    SharedSlots,
    StreamResult,
    Transport,
    WorkerNote,
    WorkerReply,
    WorkersRuntimeConfig,
    launched_by_torchrun,
    payload_tensors,
    recv_tensor,
    send_tensor,
    shared_store_info,
    sums_from_wire,
)

__all__ = [
    "StreamedContribution",
    "WorkerFailure",
    "WorkersRuntime",
    "WorkersRuntimeConfig",
    "launched_by_torchrun",
    "worker_loop",
]

STREAM_AHEAD_BYTES = 64 << 20
"""How many bytes of float32 results :attr:`WorkersRuntime.batch_hint` lets the engine
compute ahead when tasks are streamed (at least 4 tasks per worker, at most 64 in all)."""

KEEP_VERSIONS_BYTES = 16 << 20
"""How many bytes of model versions no queued task needs a worker keeps (the most recent
first), in case later tasks start from them."""

SHARED_VERSIONS_BYTES = 16 << 20
"""About how much shared memory holds the model versions streamed tasks start from (8 to
16 versions; with more in use at once, the others go on the workers' pipes)."""


class WorkersRuntime(Runtime):
    """Server half: starts (or, under torchrun, joins) the workers and drives rounds."""

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
        self._launched: Launched | None = None  # the workers this server started
        self._in_group = False  # whether rank 0 joined the group of all ranks
        self._store: Any = None  # the group's TCPStore, hosted here (own workers)
        self._stream: _Stream | None = None  # None: tasks are never streamed
        self._threads_before: int | None = None  # the server's torch threads, to restore
        self.start_method = "torchrun"

    # ---- lifecycle
    def start(self, job: Job) -> None:
        cfg = self.config
        self._job = job
        torchrun = launched_by_torchrun()
        world = self._join_torchrun() if torchrun else 0  # its options checked first
        gpus = available_gpus()
        parts = job.worker_parts()
        workers_use_gpus = cfg.device.startswith("cuda") or (cfg.device == "auto" and gpus > 0)
        self.transport = Transport.choose(cfg.topology, workers_use_gpus, dist.is_nccl_available())
        setup: dict[str, Any] = {
            "parts": parts,
            "store": shared_store_info(job.state_store),
            "transport": self.transport,
            "runtime": cfg,
        }
        if torchrun:
            self.num_workers = world - 1
            if self.num_workers < 1:
                raise RuntimeError("runtime=workers needs at least one worker process")

            def join() -> None:
                dist.broadcast_object_list([setup], src=0)
                if self.transport.topology == "relay":  # every rank takes part in new_group
                    dist.new_group(
                        ranks=list(range(1, world)), backend=self.transport.worker_backend
                    )

            self._guard("joining", {}, join)
        else:
            world = (cfg.workers or default_worker_count(cfg.device, gpus)) + 1
            resolve_device(cfg.device, 0, gpus)  # the workers' devices exist here
            launched = claim(cfg)
            if launched is None or launched.world_size != world:
                if launched is not None:
                    launched.kill()
                launched = launch(cfg, parts, world)
            self._launched, self.processes = launched, launched.processes
            self.start_method = launched.method
            self.num_workers = world - 1
            if _same_parts(launched.parts, parts):
                setup["parts"] = None  # the workers have built these parts already

            def send_setup() -> None:
                for pipe in launched.pipes:
                    pipe.send.send(("setup", setup))

            self._guard("joining", {}, send_setup)
        self.scheduler = Scheduler(self.num_workers, cfg.smoothing)
        eval_device = torch.device("cuda", 0) if workers_use_gpus and gpus else torch.device("cpu")
        self._eval_model = FlatModel(job.build_module(), eval_device)
        numel = self._eval_model.numel
        if self._launched is not None and not job.algorithm.client_state_spec(numel):
            self._stream = _Stream(self, self._launched, numel)
            # while tasks stream, the server's own ops (folding results, the strategy's
            # steps) overlap the workers' training, which takes every core: on more
            # threads they only spin on the workers' cores (W3's cnn: 12.5 s of server
            # CPU on 2 threads, 3.8 s on one). Given back at close.
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(1)

    def _join_torchrun(self) -> int:
        cfg = self.config
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
            BACKEND,
            init_method="env://",
            rank=0,
            world_size=world,
            timeout=datetime.timedelta(seconds=cfg.timeout_s),
        )
        self._in_group = True
        return world

    def _enter_collective(self) -> None:
        """Tell this server's own workers that a collective round follows (they join the
        group of all ranks at the first one)."""
        launched = self._launched
        if launched is None:
            return
        address = None
        if not self._in_group:
            timeout = datetime.timedelta(seconds=self.config.timeout_s)
            self._store = dist.TCPStore(
                "127.0.0.1",
                0,
                launched.world_size,
                is_master=True,
                wait_for_workers=False,
                timeout=timeout,
            )
            address = ("127.0.0.1", int(self._store.port))
        for pipe in launched.pipes:
            pipe.send.send(("collective", address))
        if not self._in_group:
            world = launched.world_size
            dist.init_process_group(
                BACKEND,
                store=self._store,
                rank=0,
                world_size=world,
                timeout=datetime.timedelta(seconds=self.config.timeout_s),
            )
            self._in_group = True
            if self.transport.topology == "relay":  # every rank takes part in new_group
                dist.new_group(ranks=list(range(1, world)), backend=self.transport.worker_backend)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def close(self) -> None:
        if self._launched is not None:
            for pipe in self._launched.pipes:
                with contextlib.suppress(OSError):
                    pipe.send.send(("stop",))
        elif dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.broadcast_object_list([None], src=0)
        for p in self.processes:
            p.join(timeout=30)
        if self._in_group and dist.is_initialized():
            dist.destroy_process_group()
        self._in_group = False
        if self._launched is not None:
            self._launched.kill()
        self._launched = None
        self._stream = None
        self._store = None
        self.processes = []
        self._eval_model = None
        self._restore_threads()

    def _restore_threads(self) -> None:
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def abort(self) -> None:
        for p in self.processes:
            if p.is_alive():
                p.kill()
        for p in self.processes:
            p.join(timeout=10)
        if self._launched is not None:
            self._launched.kill()
        self._launched = None
        self._stream = None
        self.processes = []
        self._restore_threads()
        if self._in_group:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        self._in_group = False

    # ---- rounds
    @property
    def batch_hint(self) -> int:  # type: ignore[override]
        """Enough tasks for every worker to train a few clients per exchange; when tasks
        are streamed, as many as :data:`STREAM_AHEAD_BYTES` of results (the workers then
        never wait for the engine to ask for more)."""
        least = 4 * max(1, self.num_workers)
        if self._stream is None:
            return least
        return max(least, min(64, STREAM_AHEAD_BYTES // max(1, 4 * self._stream.numel)))

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
        stream = self._stream
        if (
            stream is not None
            and defer_state
            and not answers
            and num_groups == len(tasks)
            and all(
                t.group == i and not job.algorithm.request_points(dict(t.settings))
                for i, t in enumerate(tasks)
            )
        ):
            return stream.execute(tasks, payloads)
        if stream is not None:
            stream.settle()  # a collective round starts when nothing is streaming
        # a suspended task resumes on the worker that holds its procedure
        resumed = [t for t in tasks if t.key in answers]
        tasks = [t for t in tasks if t.key not in answers]
        self._round = (tasks or resumed)[0].round if (tasks or resumed) else self._round
        units = [self._units(t) for t in tasks]
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
            self._enter_collective()
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
                for g, packed in enumerate(reply.contributions):
                    if packed.header.count:
                        c = packed.unpack()
                        if merged[g].count:
                            merged[g].merge(c)
                        else:
                            merged[g] = c
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

    def _units(self, task: Task) -> float:
        job = self._job
        assert job is not None
        n = job.dataset.num_examples(task.client_id)
        return float(job.algorithm.work_examples(n, dict(task.settings)))

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
        """Run an exchange; turn a dead worker into a WorkerFailure naming it."""
        try:
            return fn()
        except Exception as e:  # gloo raises RuntimeError (or a subclass) on a lost peer
            raise self._failure(what, held, e) from e

    def _failure(
        self, what: str, held: Mapping[int, list[int]], error: Exception | None
    ) -> WorkerFailure:
        """The error that names the dead workers (the run is aborted)."""
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
            message = f"a worker stopped answering during {what} ({error}); held: {dict(held)}"
        self.abort()
        return WorkerFailure(message)

    def _num_params(self) -> int:
        assert self._eval_model is not None
        return self._eval_model.numel

    def evaluate(self, params: torch.Tensor, data: ClientData) -> tuple[float, float]:
        model = self._eval_model
        if model is None:
            raise RuntimeError("runtime not started")
        model.load_(params)
        threads = torch.get_num_threads()
        if self._threads_before is not None:  # the run's threads, as on the local runtime
            torch.set_num_threads(self._threads_before)
        try:
            return evaluate(model.module, data)
        finally:
            torch.set_num_threads(threads)

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


def _same_parts(given: Any, parts: Any) -> bool:
    """Whether the workers were started with these parts (the same builder, or an
    equal one: the runner's config tree)."""
    if given is parts:
        return True
    try:
        return type(given) is type(parts) and bool(given == parts)
    except Exception:  # an __eq__ that cannot answer (tensors): rebuild
        return False


# --------------------------------------------------------------------------- streaming


class _Pending:
    """A streamed task, until its result is read: where it runs (``worker`` -1 while it
    waits in the server's backlog), and what came back."""

    __slots__ = ("payload", "result", "seq", "stream", "task", "tensors", "units", "worker")

    def __init__(
        self, stream: _Stream, seq: int, task: Task, payload: Payload, units: float
    ) -> None:
        self.stream, self.seq, self.task, self.payload, self.units = (
            stream,
            seq,
            task,
            payload,
            units,
        )
        self.worker = -1
        self.result: StreamResult | None = None
        self.tensors: list[torch.Tensor] | None = None  # the result's, as they came

    def wait(self) -> StreamResult:
        if self.result is None:
            self.stream.receive(until=self)
        elif self.stream.backlog:  # a moment to hand the workers more tasks
            self.stream.receive()
        assert self.result is not None
        return self.result

    def contribution(self) -> Contribution:
        """The result, folded now (its float64 sums live only from here on)."""
        result = self.wait()
        tensors, self.tensors = self.tensors, None
        assert tensors is not None, "a streamed result is read once"
        return sums_from_wire(result.sums, tensors)


def _slot(name: str) -> Any:
    return Contribution.__dict__[name]


class StreamedContribution(Contribution):
    """A streamed task's :class:`Contribution`: the first read of any of its fields waits
    for the task's result (if it has not come yet) and fills them in."""

    __slots__ = ("_pending",)

    def __init__(self, pending: _Pending) -> None:  # no super().__init__: filled when read
        self._pending: _Pending | None = pending

    def _fill(self) -> None:
        pending = self._pending
        assert pending is not None
        c = pending.contribution()
        _slot("_sums").__set__(self, c.sums)  # float64 (a received result is summed)
        _slot("_one").__set__(self, None)
        for name in ("scalar_sums", "weight", "count", "clients"):
            _slot(name).__set__(self, getattr(c, name))
        _slot("_scratch").__set__(self, {})
        self._pending = None

    def __reduce_ex__(self, protocol: Any) -> Any:  # pickles as the plain Contribution
        plain = Contribution()
        plain.__setstate__(self.__getstate__())
        return plain.__reduce_ex__(protocol)


def _streamed_field(name: str) -> property:
    slot = _slot(name)

    def get(self: StreamedContribution) -> Any:
        if self._pending is not None:
            self._fill()
        return slot.__get__(self, Contribution)

    def put(self: StreamedContribution, value: Any) -> None:
        if self._pending is not None:
            self._fill()
        slot.__set__(self, value)

    return property(get, put)


for _name in ("_sums", "_one", "scalar_sums", "weight", "count", "clients", "_scratch"):
    setattr(StreamedContribution, _name, _streamed_field(_name))


class StreamedMetrics(Mapping[str, float]):
    """A streamed task's client metrics, waited for when first read."""

    __slots__ = ("_data", "_pending")

    def __init__(self, pending: _Pending) -> None:
        self._pending: _Pending | None = pending
        self._data: dict[str, float] = {}

    def _get(self) -> dict[str, float]:
        if self._pending is not None:
            self._data = self._pending.wait().metrics
            self._pending = None
        return self._data

    def __getitem__(self, key: str) -> float:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return repr(self._get())


class _Stream:
    """The server's side of streamed tasks (see the module docstring).

    Tasks wait in a backlog, in delivery order, and each worker is kept up to ``DEPTH``
    tasks ahead: whenever the server is in the runtime (an execute, the read of a result) it
    reads the results that came and hands the next tasks to the workers that have room,
    the one predicted to be free first (the scheduler's learned speeds) first. A worker
    that computes faster takes more tasks, and the earliest tasks are computed first."""

    DEPTH = 8

    def __init__(self, runtime: WorkersRuntime, launched: Launched, numel: int) -> None:
        self.runtime, self.launched, self.numel = runtime, launched, numel
        n = launched.num_workers
        self.outstanding = [0.0] * n  # units sent to each worker and not back yet
        self.queued = [0] * n  # tasks sent to each worker and not back yet
        self.held: list[dict[int, int]] = [{} for _ in range(n)]  # version -> queued tasks
        self.sent: list[dict[int, Payload]] = [{} for _ in range(n)]  # version -> payload
        self.backlog: collections.deque[_Pending] = collections.deque()
        self.pending: dict[int, _Pending] = {}  # sent, result not read yet
        self.seq = 0
        self.failed: WorkerFailure | None = None
        self.busy_s = [0.0] * n
        self.tasks = [0] * n
        self.rss_mb = [0.0] * n
        self.devices = [""] * n
        self.metrics: dict[str, Any] = {}
        self.keep_versions = max(2, KEEP_VERSIONS_BYTES // max(1, 4 * numel))
        self.rings: list[ResultRing | None] = [None] * n
        # model versions in shared memory, offered with the first one: per worker, None
        # until it answers, then whether it mapped them (else they go on its pipe)
        self.shared: SharedSlots | None = None
        self.shared_tried = False
        self.shared_ok: list[bool | None] = [False] * n
        self.slot_of: dict[int, tuple[int, Payload]] = {}  # version -> (slot, payload)
        self.by_slot: list[int | None] = []  # slot -> version in it
        self.via_slot: list[set[int]] = [set() for _ in range(n)]  # versions seen there
        # results come on these pipes; a worker's sentinel is ready when it has exited
        self.results_of = {pipe.recv.fileno(): w for w, pipe in enumerate(launched.pipes)}
        self.poller = select.poll()
        for fd in self.results_of:
            self.poller.register(fd, select.POLLIN)
        for p in launched.processes:
            self.poller.register(p.sentinel, select.POLLIN)

    # ---- sending
    def execute(self, tasks: Sequence[Task], payloads: Mapping[int, Payload]) -> Outcome:
        self._check()
        self._forget_replaced(payloads)
        contributions: list[Contribution] = []
        metrics: list[tuple[int, dict[str, float]]] = []
        for task in tasks:
            self.seq += 1
            plain = task if task.group == 0 else dataclasses.replace(task, group=0)
            pending = _Pending(
                self, self.seq, plain, payloads[task.version], self.runtime._units(task)
            )
            self.backlog.append(pending)
            contributions.append(StreamedContribution(pending))
            metrics.append((task.client_id, cast(dict[str, float], StreamedMetrics(pending))))
        self.receive()  # reads what has come, hands out the new tasks
        return Outcome(contributions, metrics, self.metrics, {}, {})

    def _hand_out(self) -> None:
        """Give the backlog's first tasks to the workers that have room."""
        if not self.backlog:
            return
        scheduler = self.runtime.scheduler
        assert scheduler is not None
        spu = scheduler.seconds_per_unit
        orders: list[list[tuple[int, Task]]] = [[] for _ in self.queued]
        while self.backlog:
            room = [w for w, n in enumerate(self.queued) if n < self.DEPTH]
            if not room:
                break
            pending = self.backlog.popleft()
            w = min(room, key=lambda w: (self.outstanding[w] * spu[w], w))
            pending.worker = w
            self.outstanding[w] += pending.units
            self.queued[w] += 1
            version = pending.task.version
            held = self.held[w]
            if version not in held:
                self._send_payload(w, pending.payload)
                self.sent[w][version] = pending.payload
                held[version] = 0
            held[version] += 1
            self.pending[pending.seq] = pending
            orders[w].append((pending.seq, pending.task))
        for w, items in enumerate(orders):
            if items:
                self.launched.pipes[w].send.send(("tasks", items))
        self._drop_versions()

    def _forget_replaced(self, payloads: Mapping[int, Payload]) -> None:
        """A version a worker holds, whose payload is now another object (a runtime
        reused by another engine, whose versions start at 0 again), is sent anew, once
        the tasks queued with the old one are done."""
        stale = [
            (w, v)
            for w, sent in enumerate(self.sent)
            for v, p in sent.items()
            if v in payloads and payloads[v] is not p
        ]
        if not stale:
            return
        self.settle()
        for w, v in stale:
            del self.sent[w][v]
            del self.held[w][v]
            self.via_slot[w].discard(v)

    def _send_payload(self, w: int, payload: Payload) -> None:
        tensors = payload_tensors(payload)
        layout = [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in tensors]
        conn = self.launched.pipes[w].send
        if not self.shared_tried:
            self.shared_tried = True
            if SharedSlots.supported():
                self._offer_shared([t for _, t in tensors])
        if self.shared_ok[w]:
            slot = self._slot_for(payload, [t for _, t in tensors])
            if slot is not None:
                conn.send(("payload_slot", payload.version, slot, layout))
                self.via_slot[w].add(payload.version)
                return
        conn.send(("payload", payload.version, layout))
        for _, t in tensors:
            send_tensor(conn, t.detach().cpu())

    def _offer_shared(self, tensors: list[torch.Tensor]) -> None:
        """Create the shared slots of model versions and offer them to every worker."""
        slot_bytes = SharedSlots.slot_size(tensors)
        slots = max(8, min(16, SHARED_VERSIONS_BYTES // slot_bytes))
        self.shared = SharedSlots.create(slot_bytes, slots)
        if self.shared is None:
            return
        self.by_slot = [None] * slots
        for w, pipe in enumerate(self.launched.pipes):
            pipe.send.send(("payload_slots", self.shared.offer()))
            self.shared_ok[w] = None

    def _slot_for(self, payload: Payload, tensors: list[torch.Tensor]) -> int | None:
        """The shared slot that holds ``payload`` (written now if it is not there yet,
        in a free slot or one whose version no queued task needs), or None: every slot
        is in use, or the payload does not fit."""
        shared = self.shared
        assert shared is not None
        held = self.slot_of.get(payload.version)
        if held is not None and held[1] is payload:
            return held[0]
        if SharedSlots.footprint(tensors) > shared.slot_bytes:
            return None
        if held is not None:  # another payload of the same version: it goes
            self._evict(payload.version)
        slot = next((k for k, v in enumerate(self.by_slot) if v is None), None)
        if slot is None:
            busy = {v for held in self.held for v, n in held.items() if n}
            idle = [v for v in self.by_slot if v is not None and v not in busy]
            if not idle:
                return None
            slot = self._evict(min(idle))
        shared.write(slot, tensors)
        self.slot_of[payload.version] = (slot, payload)
        self.by_slot[slot] = payload.version
        return slot

    def _evict(self, version: int) -> int:
        """Take ``version`` out of its shared slot: the workers that read it there drop
        it first (their pipe keeps the drop before anything written in the slot later)."""
        slot, _ = self.slot_of.pop(version)
        self.by_slot[slot] = None
        for w, seen in enumerate(self.via_slot):
            if version in seen:
                seen.discard(version)
                if version in self.held[w]:
                    del self.held[w][version]
                    del self.sent[w][version]
                self.launched.pipes[w].send.send(("drop", [version]))
        return slot

    def _drop_versions(self) -> None:
        """Versions a worker holds that none of its queued tasks needs, nor a task of the
        backlog: the most recent ``keep_versions`` stay (later tasks may start from
        them), the others go."""
        wanted = {p.task.version for p in self.backlog}
        for w, held in enumerate(self.held):
            idle = sorted(v for v, n in held.items() if n == 0 and v not in wanted)
            drop = idle[: max(0, len(idle) - self.keep_versions)]
            if drop:
                for v in drop:
                    del held[v]
                    del self.sent[w][v]
                    self.via_slot[w].discard(v)
                self.launched.pipes[w].send.send(("drop", drop))

    # ---- receiving
    def receive(self, until: _Pending | None = None) -> None:
        """Read the results that have come (with ``until``: until that task's has), and
        hand out more tasks."""
        self._check()
        timeout_ms = int(self.runtime.config.timeout_s * 1000)
        try:
            while True:
                self._hand_out()
                if until is not None and until.result is not None:
                    return
                ready = self.poller.poll(0 if until is None else timeout_ms)
                if not ready:
                    if until is None:
                        return
                    raise TimeoutError(f"no result came for {timeout_ms / 1000} s")
                for fd, _ in ready:
                    w = self.results_of.get(fd)
                    if w is not None:
                        self._read(w)
                if any(fd not in self.results_of for fd, _ in ready):
                    raise EOFError("a worker exited")  # workers exit only when told to
                if until is None:  # one pass: what had come
                    self._hand_out()
                    return
        except (OSError, EOFError, TimeoutError) as e:
            raise self._fail(e) from e

    def _read(self, w: int) -> None:
        conn = self.launched.pipes[w].recv
        result: StreamResult | WorkerNote = pickle.loads(conn.recv_bytes())
        if isinstance(result, WorkerNote):  # the answer to the offer of shared versions
            self.shared_ok[w] = result.ok
            return
        names = result.sums.names
        ring = self.rings[w]
        if result.slot >= 0:  # copied out (float32: half the sums' bytes) to free the slot
            assert ring is not None
            tensors = [t.clone() for t in ring.result(result.slot, names)]
            ring.release()
        else:
            tensors = [recv_tensor(conn, DTYPES[k], shape) for _, k, shape in names]
        if result.ring is not None:
            self._take_ring(w, result.ring)
        pending = self.pending.pop(result.seq)
        pending.result, pending.tensors = result, tensors
        self.outstanding[w] = max(0.0, self.outstanding[w] - pending.units)
        self.queued[w] -= 1
        self.held[w][pending.task.version] -= 1
        scheduler = self.runtime.scheduler
        assert scheduler is not None
        scheduler.observe(w, pending.units, result.busy_s)
        self.busy_s[w] += result.busy_s
        self.tasks[w] += 1
        self.rss_mb[w] = result.peak_rss_mb
        self.devices[w] = result.device
        # new lists each time: a record that took the old ones keeps them
        self.metrics["worker_busy_s"] = list(self.busy_s)
        self.metrics["worker_tasks"] = list(self.tasks)
        self.metrics["worker_peak_rss_mb"] = list(self.rss_mb)
        self.metrics["worker_devices"] = list(self.devices)

    def _take_ring(self, w: int, offer: tuple[int, int, int, int]) -> None:
        """Map the result ring worker ``w`` offers (it writes there once told so)."""
        try:
            self.rings[w] = ResultRing.open(*offer)
        except OSError:
            self.rings[w] = None
        self.launched.pipes[w].send.send(("ring", self.rings[w] is not None))

    def settle(self) -> None:
        """Wait for every streamed result (before a collective round)."""
        while self.backlog or self.pending:
            last = self.backlog[-1] if self.backlog else next(reversed(self.pending.values()))
            self.receive(until=last)

    # ---- failures
    def _check(self) -> None:
        if self.failed is not None:
            raise self.failed
        if self.runtime._stream is not self:
            raise RuntimeError("the workers runtime was closed before this result came")

    def _fail(self, error: Exception) -> WorkerFailure:
        held: dict[int, list[int]] = {}
        for p in self.pending.values():
            held.setdefault(p.worker + 1, []).append(p.task.client_id)
        first = min([*self.pending.values(), *self.backlog], key=lambda p: p.seq, default=None)
        what = f"round {first.task.round}" if first is not None else "streaming"
        self.failed = self.runtime._failure(what, held, error)
        return self.failed


RUNTIMES.register("workers", WorkersRuntimeConfig, "N worker processes, many clients each")(
    WorkersRuntime
)
