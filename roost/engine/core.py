"""The engine: the one event loop where strategy, runtime and system model meet.

Every dispatched task becomes a :class:`~roost.engine.flight.Flight` whose arrival (or
dropout, when its device goes offline first) is an event on the
:class:`~roost.clock.VirtualClock`; events are popped in (time, priority, dispatch order).
How the server paces itself is a *policy* on that loop:

* rounds (:mod:`roost.engine.rounds`), for a synchronous :class:`Strategy`: a barrier.
  With ``late_results=carry`` a round's deadline does not discard late results: they are
  delivered in the round during which they arrive, with their staleness (semi-async);
* asynchronous (:mod:`roost.engine.asynchronous`), for an
  :class:`~roost.algorithms.asynchronous.AsyncStrategy`: a cap of tasks in flight, one
  dispatch per freed slot, and a server step whenever the strategy asks for one.

Each record of the history is one server step (``round`` is its number in both
policies). A task's seed comes from (run seed, client, that client's dispatch number),
never from the round. After each step the global model is checked: a NaN or Inf in it,
or a server metric or mean train loss that overflowed, raises :class:`Diverged` naming
the step. The run stops early after the first step that reaches ``target_accuracy`` or
ends at or past ``virtual_time_budget_s``; its record then says why in ``stopped``.

The engine never looks at real time except to report it, and never decides how tasks are
computed: that is the runtime's business (it is handed batches of tasks whose delivery is
certain, and returns a result per task or per round).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import torch

from roost.algorithms.asynchronous import Arrival, AsyncStrategy
from roost.algorithms.base import Algorithm, Contribution, Payload, Strategy
from roost.clock import Event, VirtualClock, WallClock
from roost.config import RunConfig
from roost.data.base import FederatedDataset
from roost.engine.flight import Computed, Flight, FlightTable
from roost.engine.idle import IdlePool
from roost.engine.remote import Delivery, RemoteFleet
from roost.errors import Diverged
from roost.models.cost import LayerCost
from roost.runtime.base import Runtime, Task, task_seed
from roost.split.plan import DeviceLink, SplitPlan
from roost.state import ClientStateStore
from roost.system.model import SystemModel, TaskTiming
from roost.system.split_schedule import RoundSchedule, SplitTask, TaskSchedule, schedule_split_tasks

__all__ = [
    "ARRIVAL",
    "REFILL",
    "REQUEST",
    "ROUND_END",
    "WAKE",
    "Callback",
    "Engine",
    "History",
    "client_metric_means",
    "split_fields",
]

# event priorities at equal times: a slot waiting for an online client is retried; tasks
# arrive (in dispatch order); mid-task requests are answered (with the model those
# arrivals made); freed slots are refilled; a round ends
WAKE = 0
ARRIVAL = 1
_NO_SETTINGS: Mapping[str, Any] = MappingProxyType({})
REQUEST = 2
REFILL = 3
ROUND_END = 4


class Callback(Protocol):
    """Called after every server step with its record; returns ``(stop, extra metrics)``."""

    def __call__(self, record: dict[str, Any]) -> tuple[bool, dict[str, Any]]: ...


@dataclass
class History:
    """One record per server step, as written to ``metrics.jsonl``, and the run's number
    of clients."""

    records: list[dict[str, Any]] = field(default_factory=list)
    num_clients: int = 0

    @property
    def final(self) -> dict[str, Any]:
        return self.records[-1] if self.records else {}

    def last_evaluated(self) -> dict[str, Any]:
        for rec in reversed(self.records):
            if rec.get("accuracy") is not None:
                return rec
        return {}

    def series(self, key: str) -> list[Any]:
        return [rec.get(key) for rec in self.records]


def client_metric_means(metrics: Sequence[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """``client_<key>``: the mean over clients of every client metric except train_loss
    (e.g. Ditto's ``client_trained_personal_accuracy``)."""
    sums: dict[str, list[float]] = {}
    for _, m in metrics:
        for key, value in m.items():
            if key not in ("train_loss", "local_steps"):
                sums.setdefault(key, []).append(float(value))
    return {f"client_{k}": math.fsum(v) / len(v) for k, v in sums.items()}


def delivery_metrics(
    metrics: Sequence[tuple[int, dict[str, float]]], staleness: Sequence[int]
) -> dict[str, Any]:
    """A step's record fields from its delivered results: mean train loss, the clients'
    other metrics, and staleness statistics."""
    losses = [m["train_loss"] for _, m in metrics if "train_loss" in m]
    out: dict[str, Any] = {"train_loss": math.fsum(losses) / len(losses) if losses else None}
    out.update(client_metric_means(metrics))
    out["staleness_mean"] = sum(staleness) / len(staleness) if len(staleness) else None
    out["staleness_max"] = int(max(staleness)) if len(staleness) else None
    return out


def split_fields(schedule: RoundSchedule, t0: float, end_s: float) -> dict[str, Any]:
    """A split-learning round's (or asynchronous step's) resources for its record: its
    span (from ``t0``, the round's dispatch or the previous step, to ``end_s``), the
    shared server's busy and idle seconds within it, the mean over its tasks of each
    device resource's busy seconds, and, when the schedule kept one, the timeline of the
    first iteration (times from ``t0``)."""
    span = end_s - t0
    tasks = schedule.tasks
    n = len(tasks)
    fields: dict[str, Any] = {
        "round_span_s": span,
        "server_busy_s": schedule.server_busy_s,
        "server_idle_s": max(0.0, span - schedule.server_busy_s),
        "device_compute_busy_s": sum(t.device_compute_busy_s for t in tasks) / n,
        "uplink_busy_s": sum(t.uplink_busy_s for t in tasks) / n,
        "downlink_busy_s": sum(t.downlink_busy_s for t in tasks) / n,
    }
    if schedule.timeline:
        fields["split_timeline"] = [
            [res, client, j, start - t0, end - t0, *([what] if res == "device_compute" else [])]
            for res, client, j, start, end, what in schedule.timeline
        ]
    return fields


class Engine:
    """Runs a federated method in virtual time; see the module docstring."""

    def __init__(
        self,
        *,
        run: RunConfig,
        algorithm: Algorithm,
        strategy: Strategy,
        runtime: Runtime,
        dataset: FederatedDataset,
        system: SystemModel,
        num_params: int,
        clock: VirtualClock | None = None,
        callbacks: Sequence[Callback] = (),
        state_store: ClientStateStore | None = None,
        initial_params: torch.Tensor | None = None,
        remote: RemoteFleet | None = None,
        split_layers: Sequence[LayerCost] | None = None,
    ) -> None:
        from roost.engine.asynchronous import AsyncPolicy
        from roost.engine.rounds import RoundPolicy

        self.run_config = run
        self.algorithm = algorithm
        self.strategy = strategy
        self.runtime = runtime
        self.dataset = dataset
        self.system = system
        self.remote = remote
        self.num_params = num_params
        self.clock = clock if clock is not None else VirtualClock()  # an empty clock is falsy
        self.callbacks = list(callbacks)
        self.state_store = state_store
        self.wall_offset_s = 0.0
        self.initial_params = initial_params
        self.test_data = dataset.test_data()
        self.flights = FlightTable()
        self.dispatches = np.zeros(dataset.num_clients, dtype=np.int64)
        self.busy = np.zeros(dataset.num_clients, dtype=bool)
        self._ids = np.arange(dataset.num_clients)
        self._always_available = type(system).available is SystemModel.available
        self._pool: IdlePool | None = None  # built at the first dispatchable() call
        self._pool_unsupported = False
        self.split_layers = tuple(split_layers) if split_layers is not None else None
        # split-learning tasks are timed per micro-batch (a shared server) when the
        # algorithm splits the model and the system model has devices and links to time
        self.times_split = (
            algorithm.splits_the_model
            and self.split_layers is not None
            and system.times_split_tasks
            and remote is None
        )
        self.split_schedule: RoundSchedule | None = None  # of the last plan_flights
        self.policy: RoundPolicy | AsyncPolicy = (
            AsyncPolicy(self) if isinstance(strategy, AsyncStrategy) else RoundPolicy(self)
        )

    # ---- dispatching
    def candidates(self, t: float) -> np.ndarray:
        """Clients available at ``t`` and not in flight, in id order (one vectorised
        query of the system model)."""
        if self._always_available:
            return np.flatnonzero(~self.busy)
        return np.flatnonzero(self.system.available(self._ids, t) & ~self.busy)

    def dispatchable(self, t: float) -> IdlePool | np.ndarray:
        """The clients available at ``t`` and not in flight, in id order, for picking one
        at a time: an :class:`~roost.engine.idle.IdlePool` kept up to date from the system
        model's availability changes (``len`` and ``pool[k]`` in O(log N)), or, when the
        model cannot list its changes, the array :meth:`candidates` builds in O(N)."""
        pool = self.idle_pool(t)
        return self.candidates(t) if pool is None else pool

    def idle_pool(self, t: float) -> IdlePool | None:
        """The pool of dispatchable clients advanced to ``t`` (None when the system model
        cannot list its availability changes). Built on first use from one vectorised
        ``available`` query at ``t``."""
        pool = self._pool
        if pool is None:
            if self._pool_unsupported:
                return None
            n = self.dataset.num_clients
            system = self.system
            if system.availability_changes(t, t, n) is None:
                self._pool_unsupported = True
                return None
            available = (
                np.ones(n, dtype=bool) if self._always_available else system.available(self._ids, t)
            )

            def changes(t0: float, t1: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
                out = system.availability_changes(t0, t1, n)
                assert out is not None
                return out

            pool = self._pool = IdlePool(available, self.busy, t, changes)
        pool.advance(t)
        return pool

    def plan_flights(
        self,
        round: int,
        clients: Sequence[int],
        payload: Payload,
        t: float,
        settings: Mapping[int, Mapping[str, Any]],
        *,
        timeline: bool = False,
    ) -> list[Flight]:
        """The tasks of ``clients`` dispatched together at ``t`` (:meth:`plan_flight`
        each). Split-learning tasks are timed together, since they share the server
        (:mod:`roost.system.split_schedule`); their schedule is kept in
        :attr:`split_schedule`, with its timeline when ``timeline``."""
        if not self.times_split:
            return [self.plan_flight(c, round, payload, t, settings.get(c)) for c in clients]
        plans = [self.split_plan(c, settings.get(c)) for c in clients]
        tasks = [SplitTask(c, t, p) for c, p in zip(clients, plans, strict=True)]
        schedule = schedule_split_tasks(self.system, tasks, timeline=timeline)
        self.split_schedule = schedule
        return [
            self.plan_flight(c, round, payload, t, p.settings, scheduled=s)
            for c, p, s in zip(clients, plans, schedule.tasks, strict=True)
        ]

    def split_plan(self, client_id: int, settings: Mapping[str, Any] | None) -> SplitPlan:
        """The algorithm's plan of a split task of ``client_id``, on its device as the
        system model describes it."""
        assert self.split_layers is not None
        system = self.system
        p = system.profile(client_id)
        link = DeviceLink(
            system.compute_time_s(client_id, 1),
            system.server_compute_time_s(1),
            p.uplink_mbps * 1e6,
            p.downlink_mbps * 1e6,
        )
        n = self.dataset.num_examples(client_id)
        return self.algorithm.split_plan(self.split_layers, n, settings or _NO_SETTINGS, link)

    def task_schedule(self, flight: Flight, *, timeline: bool = False) -> RoundSchedule:
        """The schedule of a split task that was scheduled alone (an asynchronous
        method's), computed again from its plan: its resources' busy seconds, and the
        intervals of its first iteration when ``timeline``."""
        plan = self.split_plan(flight.client_id, dict(flight.task.settings))
        task = SplitTask(flight.client_id, flight.timing.start_s, plan)
        return schedule_split_tasks(self.system, [task], timeline=timeline)

    def plan_flight(
        self,
        client_id: int,
        round: int,
        payload: Payload,
        t: float,
        settings: Mapping[str, Any] | None = None,
        *,
        scheduled: TaskSchedule | None = None,
    ) -> Flight:
        """A task of ``client_id`` dispatched at ``t`` from ``payload`` with the strategy's
        ``settings`` for it (its work and timing from them and the system model, or from
        its split-learning ``scheduled`` timeline; not yet in flight, see
        :meth:`launch`)."""
        if scheduled is None and self.times_split:  # alone: the server is its own
            plan = self.split_plan(client_id, settings)
            settings = plan.settings
            scheduled = schedule_split_tasks(self.system, [SplitTask(client_id, t, plan)]).tasks[0]
        self.dispatches[client_id] += 1
        dispatch = int(self.dispatches[client_id])
        settings = dict(settings) if settings else _NO_SETTINGS
        work = self.algorithm.work_examples(self.dataset.num_examples(client_id), settings)
        requests: tuple[float, ...] = ()
        if scheduled is not None:
            timing, down, up = scheduled.timing, scheduled.down_bytes, scheduled.up_bytes
        else:
            down = payload.nbytes
            up = self.algorithm.upload_nbytes(self.num_params, payload.version)
            timing = self.system.timing(client_id, t, work, down, up)
            points = self.algorithm.request_points(settings) if self.remote is None else ()
            if points:
                timing, requests = self._with_requests(client_id, timing, points, down, up)
        seed = task_seed(self.run_config.seed, client_id, dispatch)
        key = self.flights.new_key()
        task = Task(
            client_id,
            round,
            payload.version,
            seed,
            key=key,
            settings=tuple(sorted(settings.items())) if settings else (),
        )
        # each answered request downloads the model once more
        return Flight(key, task, timing, dispatch, work, down * (1 + len(requests)), up, requests)

    def _with_requests(
        self, client_id: int, timing: TaskTiming, points: Sequence[float], down: int, up: int
    ) -> tuple[TaskTiming, tuple[float, ...]]:
        """The timeline of a task whose procedure asks the server at fractions ``points`` of
        its compute: each request is answered by a download of the model (charged on the
        device's downlink from the request time), then the compute goes on."""
        compute_s = timing.compute_end_s - timing.download_end_s
        t, done, requests = timing.download_end_s, 0.0, []
        for f in points:
            t_request = t + (f - done) * compute_s
            requests.append(t_request)
            t = self.system.transfer_end_s(client_id, t_request, down, uplink=False)
            done = f
        compute_end = t + (1.0 - done) * compute_s
        arrival = self.system.transfer_end_s(client_id, compute_end, up, uplink=True)
        offline = self.system.offline_s(client_id, timing.start_s, arrival)
        if offline is None and timing.offline_s is not None and timing.offline_s < arrival:
            offline = timing.offline_s
        extended = TaskTiming(timing.start_s, timing.download_end_s, compute_end, arrival, offline)
        lost_at = offline if offline is not None else math.inf
        return extended, tuple(r for r in requests if r < lost_at)

    def launch(self, flight: Flight, payload: Payload) -> None:
        """Put a planned task in flight: its arrival (or dropout) becomes an event."""
        self.flights.add(flight, payload)
        self.busy[flight.client_id] = True
        if self._pool is not None:
            self._pool.set_busy(flight.client_id, True)
        if self.remote is not None:  # its node reports the arrival; the deadline is ours
            self.remote.send(flight, payload)
            deadline = self.clock.now + self.remote.task_timeout_s
            self.clock.schedule(deadline, ("task", flight.key), ARRIVAL)
            return
        self.clock.schedule(flight.end_s, ("task", flight.key), ARRIVAL)
        for t in flight.requests_s[len(flight.answers) :]:
            self.clock.schedule(t, ("request", flight.key), REQUEST)

    def pop_event(self) -> Event:
        """The next event of the loop. In deployment (``remote``) a task's event applies
        what the network delivered for it first (:mod:`roost.engine.remote`): its result,
        folded as the local runtime folds a task, or its loss (no result by its
        deadline); events of tasks no longer in flight are skipped."""
        if self.remote is None:
            return self.clock.pop()
        while True:
            ev = self._remote_pop()
            kind, key = ev.payload
            if kind not in ("task", "request"):
                self.remote.consumed(kind, key, False)
                return ev
            flight = self.flights.flights.get(key)
            if flight is None or key in self.flights.computed or flight.lost:
                continue  # the other event of a task already delivered, lost or answered
            delivered = False
            if kind == "task":
                delivery = self.remote.take(key)
                delivered = delivery is not None
                self._apply_delivery(flight, delivery)
            self.remote.consumed(kind, key, delivered)
            return ev

    def _remote_pop(self) -> Event:
        """The clock's next event, or, while a resumed deployment replays its journal,
        the next journaled one (the engine's own refills are still taken from the clock,
        where the replayed decisions put them)."""
        assert self.remote is not None
        logged = self.remote.replay_next()
        if logged is None:
            return self.clock.pop()
        if logged[0] == "refill":
            ev = self.clock.pop()
            if ev.payload != ("refill", -1):
                raise RuntimeError(
                    f"replaying the journal: the engine's next event is {ev.payload}, where "
                    "the journal has a refill (the run's code or config changed?)"
                )
            return ev
        return Event(self.clock.now, 0, 0, logged)

    def _apply_delivery(self, flight: Flight, delivery: Delivery | None) -> None:
        now = self.clock.now
        if delivery is None:
            flight.lost = True
            flight.end_s = now
            flight.timing = flight.timing._replace(offline_s=now)
            assert self.remote is not None
            self.remote.cancel(flight.key)
            return
        contribution = Contribution()
        contribution.fold(delivery.result, flight.client_id)
        start = flight.timing.start_s
        flight.timing = TaskTiming(start, start, min(now, start + delivery.compute_s), now)
        flight.end_s = now
        if delivery.upload_bytes is not None:
            flight.up_bytes = delivery.upload_bytes
        if delivery.download_bytes is not None:
            flight.down_bytes = delivery.download_bytes
        self.flights.computed[flight.key] = Computed(contribution, delivery.metrics, None)

    def answer_remote(self, flight: Flight, payload: Payload) -> None:
        """Answer a deployed task's mid-task request with ``payload`` (kept as a snapshot
        while the task needs it, and counted in its downloaded bytes)."""
        assert self.remote is not None
        answer = self.snapshot(payload)
        self.flights.answer(flight, answer)
        flight.down_bytes += answer.nbytes
        self.remote.answer(flight.key, answer)

    def land(self, key: int) -> Flight:
        """Take a task out of flight (delivered or lost); its client is idle again, and
        offline if the task was lost (its device went offline now: the pool of idle
        clients does not wait for the change list's time of that boundary, which may
        round an ulp later)."""
        flight = self.flights.remove(key)
        self.busy[flight.client_id] = False
        pool = self._pool
        if pool is not None:
            if flight.lost:
                pool.set_available(flight.client_id, False)
            pool.set_busy(flight.client_id, False)
        return flight

    def arrival(self, flight: Flight) -> Arrival:
        """What the strategy learns about a result delivered now."""
        return Arrival(
            flight.client_id,
            flight.task.version,
            self.strategy.version,
            flight.timing.start_s,
            flight.timing.arrival_s,
            flight.timing.compute_end_s - flight.timing.download_end_s,
            self.dataset.num_examples(flight.client_id),
            flight.work_examples,
        )

    def snapshot(self, payload: Payload) -> Payload:
        """The payload tasks in flight start from, kept while any of them is in flight
        (shared by all tasks of one version)."""
        kept = self.flights.snapshots.get(payload.version)
        if kept is not None:
            return kept
        return Payload(payload.params.clone(), payload.version, dict(payload.extras))

    # ---- steps
    def check_finite(self, step: int, train_loss: float | None, server: dict[str, Any]) -> None:
        """Raise :class:`Diverged` if the global model holds a NaN or Inf, or if a number
        computed from it overflowed: the server's metrics (e.g. an ``update_norm`` past
        float32's range, ~1.8e19) or the clients' mean train loss."""
        params = self.strategy.params
        models = (
            [params] if self.strategy.eval_params is params else [params, self.strategy.eval_params]
        )
        # a float sum is finite only if every term is (NaN and Inf propagate): one
        # reduction per model; the values are counted only when it is not
        bad = sum(
            m.numel() - int(torch.isfinite(m).sum())
            for m in models
            if not math.isfinite(float(m.sum()))
        )
        if not bad:
            overflowed = [
                k
                for k, v in [*server.items(), ("train_loss", train_loss)]
                if isinstance(v, float) and not math.isfinite(v)
            ]
            if not overflowed:
                return
            what = f"a non-finite {' and '.join(overflowed)}"
        else:
            what = f"{bad:,} of the global model's {params.numel():,} values are NaN or Inf"
            if train_loss is not None:
                what += f" (the clients' mean train_loss was {train_loss:g})"
        raise Diverged(
            f"round {step}: {what} after the server step of algorithm={self.algorithm.name}; "
            "the run diverged and stopped. Try a smaller learning rate (algorithm.lr, or "
            "algorithm.server_lr for a server optimiser)"
        )

    def finish_record(self, record: dict[str, Any], step: int, wall_start: float) -> None:
        """Add time and, when due, the evaluation to a step's record."""
        record["virtual_time_s"] = self.clock.now
        record["accuracy"] = record["loss"] = None
        if self.due_eval(step):
            if self.test_data is not None:
                loss, acc = self.runtime.evaluate(self.strategy.eval_params, self.test_data)
                record["accuracy"], record["loss"] = acc, loss
            if self.algorithm.evaluates_personal_models():
                record.update(self.evaluate_personal())
        record["wall_time_s"] = self.wall_offset_s + (time.perf_counter() - wall_start)

    def evaluate_personal(self) -> dict[str, Any]:
        """Every client's personal model on its own test split (clients with no state yet
        at the initial model): ``personal_accuracy`` = correct predictions over all
        clients' test examples, ``personal_loss`` example-weighted, and how many clients
        were measured. Empty when the data has no per-client test splits.

        Deployed (``remote``), the state and the test splits are on the nodes: each
        connected client's node measures its own (:meth:`RemoteFleet.evaluate_clients`)."""
        if self.initial_params is None:
            raise RuntimeError("personal evaluation needs w^0")
        measured: list[tuple[float, float, int]] = []
        if self.remote is not None:
            initial = Payload(self.initial_params, 0)
            measured = [
                (e.loss, e.accuracy, e.examples) for e in self.remote.evaluate_clients(initial)
            ]
        else:
            if self.state_store is None:
                raise RuntimeError("personal evaluation needs the state store")
            for cid in range(self.dataset.num_clients):
                test = self.dataset.client_test_data(cid)
                if test is None or len(test) == 0:
                    continue
                state = self.state_store.get(cid)
                params = (
                    self.initial_params if state is None else self.algorithm.personal_params(state)
                )
                loss, acc = self.runtime.evaluate(params, test)
                measured.append((loss, acc, len(test)))
        loss_sum, correct, examples, clients = 0.0, 0, 0, 0
        for loss, acc, n in measured:
            if n == 0:
                continue
            loss_sum += loss * n
            correct += round(acc * n)
            examples += n
            clients += 1
        if not examples:
            return {}
        return {
            "personal_accuracy": correct / examples,
            "personal_loss": loss_sum / examples,
            "personal_clients": clients,
        }

    def due_eval(self, step: int) -> bool:
        cfg = self.run_config
        return step == cfg.rounds or (cfg.eval_every > 0 and step % cfg.eval_every == 0)

    def stop_reason(self, record: dict[str, Any]) -> str | None:
        """Why the run stops after this step, or None: a target accuracy reached or the
        virtual-time budget used up."""
        cfg = self.run_config
        acc = record.get("accuracy")
        if cfg.target_accuracy is not None and acc is not None and acc >= cfg.target_accuracy:
            return f"target_accuracy {cfg.target_accuracy:g} reached ({acc:.4f})"
        budget = cfg.virtual_time_budget_s
        if budget is not None and record["virtual_time_s"] >= budget:
            return f"virtual_time_budget_s {budget:g} used ({record['virtual_time_s']:.1f} s)"
        return None

    # ---- the run
    def run(self, start_round: int = 1, history: History | None = None) -> History:
        """Run server steps ``start_round .. rounds``; the stop rules and callbacks may
        stop early, and an asynchronous run also ends when no client can ever be
        dispatched again."""
        history = history or History()
        wall_start = time.perf_counter()
        for step in range(start_round, self.run_config.rounds + 1):
            record = self.policy.next_record(step, wall_start)
            if record is None:
                break
            reason = self.stop_reason(record)
            if reason is not None:
                record["stopped"] = reason
                if record.get("accuracy") is None and self.test_data is not None:
                    # the run ends here: its last step is evaluated like a last round
                    record["loss"], record["accuracy"] = self.runtime.evaluate(
                        self.strategy.eval_params, self.test_data
                    )
            stop = reason is not None
            for cb in self.callbacks:
                s, extra = cb(record)
                record.update(extra)
                stop = stop or s
            history.records.append(record)
            if stop:
                break
        return history

    # ---- checkpoints
    def state_dict(self, with_snapshots: bool = True) -> dict[str, Any]:
        """What a resumed run needs besides the strategy and the client state: the clock,
        every client's dispatch count, the tasks in flight with (unless the caller stores
        them itself, ``flights.snapshot_dicts()``) their snapshots, the policy's counters,
        and split learning's per-layer seconds when they were measured."""
        state = {
            "virtual_time_s": self.clock.now,
            "dispatches": torch.from_numpy(self.dispatches.copy()),
            "flights": self.flights.state_dict(with_snapshots),
            "policy": self.policy.state_dict(),
        }
        layers = self.split_layers
        if layers is not None and all(c.forward_s is not None for c in layers):
            # measured on the host (split_costs=profile): a resumed run times with these
            state["split_seconds"] = [[c.forward_s, c.backward_s] for c in layers]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(self.clock, WallClock):  # a wall clock keeps the wall's time
            self.clock = VirtualClock(float(state["virtual_time_s"]))
        self.dispatches = state["dispatches"].numpy().astype(np.int64).copy()
        seconds = state.get("split_seconds")
        if seconds is not None and self.split_layers is not None:
            self.split_layers = tuple(
                dataclasses.replace(c, forward_s=float(f), backward_s=float(b))
                for c, (f, b) in zip(self.split_layers, seconds, strict=True)
            )
        self.flights = FlightTable.from_state_dict(state["flights"])
        self.busy[:] = False
        self._pool = None  # rebuilt from the clock's time at the next dispatch
        for key in sorted(self.flights.flights):
            flight = self.flights.flights[key]
            self.busy[flight.client_id] = True
            self.clock.schedule(flight.end_s, ("task", key), ARRIVAL)
            for t in flight.requests_s[len(flight.answers) :]:
                self.clock.schedule(t, ("request", key), REQUEST)
            if self.remote is not None:  # sent again to its node, with a new deadline
                self.remote.send(flight, self.flights.snapshots[flight.task.version])
                deadline = self.clock.now + self.remote.task_timeout_s
                self.clock.schedule(deadline, ("task", key), ARRIVAL)
        self.policy.load_state_dict(state["policy"])
