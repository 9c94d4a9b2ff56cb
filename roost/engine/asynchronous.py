"""The asynchronous policy of the event loop: a cap of tasks in flight, one step at a time.

For an :class:`~roost.algorithms.asynchronous.AsyncStrategy` with concurrency ``C``
(default: the run's ``clients_per_round``):

1. at the start, ``C`` clients are selected among those available at t = 0 with the
   generator of a synchronous round 1, ``default_rng([seed, 4, 1])``, and dispatched in
   that order from version 0 (in deployment, once ``C`` clients have a node connected);
2. events are popped in (time, priority, dispatch order). An arrival is delivered: its
   result goes to :meth:`AsyncStrategy.accept` with its :class:`Arrival` (staleness =
   server version now minus the version it started from), the client's new state is
   committed, and if the strategy asks for it the server steps (one record). A task
   whose device went offline is a dropout (counted in the next record);
3. after every arrival (and its step) or dropout, unless the run is over, the freed slot
   is refilled by a dispatch event at the same time, which comes after every arrival at
   that time (so tasks that arrive together are all delivered before any new task
   starts): the ``j``-th refill picks a client among the idle, available ones with
   ``default_rng([seed, 6, j])`` (:meth:`AsyncStrategy.select_idle`), from the current
   version. When no client is available the slot waits for the next one to come online.

Results are computed ahead of their arrival only when they are certain to be delivered
(:func:`~roost.engine.flight.certain_prefix`), in batches of up to the runtime's
``batch_hint``, with their client state deferred until delivery: a task that would
arrive after the run's last step, or whose device goes offline, is never computed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from roost.algorithms.asynchronous import AsyncStrategy
from roost.algorithms.base import Strategy
from roost.engine.core import REFILL, WAKE, delivery_metrics, split_fields
from roost.engine.draws import LazyStream, StreamDraws
from roost.engine.flight import Computed, certain_prefix
from roost.registry import ConfigError
from roost.system.split_schedule import Interval, RoundSchedule, TaskSchedule

if TYPE_CHECKING:
    from roost.engine.core import Engine
    from roost.engine.flight import Flight

__all__ = ["AsyncPolicy"]


class AsyncPolicy:
    """One record per server step of an asynchronous strategy; see the module docstring."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        strategy = engine.strategy
        assert isinstance(strategy, AsyncStrategy)
        self.strategy: AsyncStrategy = strategy
        self.concurrency = strategy.concurrency or engine.run_config.clients_per_round
        if self.concurrency > engine.dataset.num_clients:
            raise ConfigError(
                "concurrency",
                self.concurrency,
                f"must be <= the number of clients ({engine.dataset.num_clients})",
            )
        self.configures = type(strategy).configure_tasks is not Strategy.configure_tasks
        self.started = False
        self.refills = 0
        self.pending_refills = 0  # REFILL events in the clock
        self.wake_s: float | None = None  # when a pending WAKE event fires
        self.progress: dict[int, int] = {}  # task key -> answers its suspended procedure took
        self._min_task_s: float | None = None
        self.runtime_metrics: dict[str, Any] = {}  # of the last execute (batch or resume)
        self._refill_draws = StreamDraws(engine.run_config.seed, 6)
        self.last_step_s = 0.0  # virtual time of the last server step
        self._reset_step()

    def _reset_step(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.staleness: list[int] = []
        self.dropped = 0
        self.bytes_down = 0
        self.bytes_up = 0
        self.split_tasks: list[TaskSchedule] = []  # timelines of the step's split tasks
        self.split_timeline: list[Interval] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "refills": self.refills,
            "pending_refills": self.pending_refills,
            "wake_s": self.wake_s,
            "last_step_s": self.last_step_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters and put the pending dispatch events back on the clock."""
        clock = self.engine.clock
        self.started = bool(state["started"])
        self.refills = int(state["refills"])
        self.pending_refills = int(state["pending_refills"])
        for _ in range(self.pending_refills):
            clock.schedule(clock.now, ("refill", -1), REFILL)
        self.last_step_s = float(state.get("last_step_s", clock.now))
        self.wake_s = state["wake_s"]
        if self.wake_s is not None:
            clock.schedule(self.wake_s, ("wake", -1), WAKE)

    # ---- dispatching
    def _start(self) -> None:
        e = self.engine
        self.started = True
        if e.remote is not None:  # deployment: start when the cap can be filled
            while len(e.candidates(e.clock.now)) < self.concurrency:
                e.pop_event()  # each node's registration is a wake event
        rng = np.random.default_rng([e.run_config.seed, 4, 1])
        chosen = self.strategy.select(1, e.candidates(e.clock.now), self.concurrency, rng)
        payload = self.strategy.payload(self.strategy.version)
        for cid in chosen:
            self._dispatch(cid, payload)
        if len(chosen) < self.concurrency:
            self._wait()

    def _dispatch(self, client_id: int, payload: Any) -> None:
        e = self.engine
        version = self.strategy.version
        settings = None
        if self.configures:  # the dispatch's own stream, made only when it is used
            rng = np.random.default_rng([e.run_config.seed, 11, e.flights.next_key])
            settings = self.strategy.configure_tasks(version, [client_id], rng).get(client_id)
        flight = e.plan_flight(client_id, version, payload, e.clock.now, settings)
        e.launch(flight, e.snapshot(payload))

    def _refill(self) -> None:
        """Fill free slots with idle, available clients (one per slot)."""
        e = self.engine
        payload = None
        while len(e.flights) < self.concurrency:
            idle = e.dispatchable(e.clock.now)
            if not len(idle):
                self._wait()
                return
            self.refills += 1
            # default_rng([seed, 6, j]), its first integers(n) computed in batches
            rng: Any = LazyStream(self._refill_draws, self.refills)
            payload = payload or self.strategy.payload(self.strategy.version)
            self._dispatch(self.strategy.select_idle(self.refills, idle, rng), payload)

    def _wait(self) -> None:
        """No idle client is available now: retry when the next one comes online."""
        e = self.engine
        if self.wake_s is not None:
            return
        pool = e.idle_pool(e.clock.now)
        if pool is not None:
            t = pool.next_online_s()
        else:
            t = e.system.next_available_s(np.flatnonzero(~e.busy), e.clock.now)
        if t <= e.clock.now:  # available "now" but not at this instant: try a moment later
            t = math.nextafter(e.clock.now, math.inf)
        if math.isfinite(t):
            self.wake_s = t
            e.clock.schedule(t, ("wake", -1), WAKE)

    def _schedule_refill(self) -> None:
        e = self.engine
        self.pending_refills += 1
        e.clock.schedule(e.clock.now, ("refill", -1), REFILL)

    # ---- computing
    def min_task_s(self) -> float:
        if self._min_task_s is None:
            e = self.engine
            if self.configures:  # per-task settings may shrink the work: bound it by 0
                work = np.zeros(e.dataset.num_clients, dtype=np.int64)
            else:
                work = np.array(
                    [
                        e.algorithm.work_examples(e.dataset.num_examples(c))
                        for c in range(e.dataset.num_clients)
                    ]
                )
            payload = self.strategy.payload(self.strategy.version)
            # uploads may shrink with the version (compression schedules): bound them by 0;
            # a split task's compute partly runs on the server: no bound but 0
            self._min_task_s = (
                0.0 if e.times_split else float(e.system.min_task_time_s(work, payload.nbytes, 0))
            )
        return self._min_task_s

    def _needed(self, step: int) -> int | None:
        """Arrivals the run still needs (None: unknown), counting to the last step, or to
        the next evaluated step when a target accuracy may stop the run there."""
        e, s = self.engine, self.strategy
        until, per = s.arrivals_until_step(), s.arrivals_per_step
        if until is None or per is None:
            return None
        last = e.run_config.rounds
        if e.run_config.target_accuracy is not None:
            last = next((t for t in range(step, last + 1) if e.due_eval(t)), last)
        return until + (last - step) * per

    def _compute_ahead(self, flight: Flight, step: int) -> None:
        """Compute the arriving task, and with it the next ones certain to be delivered
        (up to the runtime's batch hint)."""
        e = self.engine
        if flight.requests_s:
            self._finish_requesting(flight)
            return
        limit = max(1, e.runtime.batch_hint)
        if limit == 1:
            self._compute([flight])
            return
        pending = [f for f in e.flights.uncomputed_arrivals() if not f.requests_s or f is flight]
        assert pending and pending[0].key == flight.key, "arrivals are delivered in order"
        budget = e.run_config.virtual_time_budget_s
        batch = certain_prefix(
            pending,
            (f.end_s for f in e.flights.flights.values()),
            self.concurrency - len(e.flights),
            e.clock.now,
            self._needed(step),
            self.min_task_s(),
            math.inf if budget is None else budget,
            limit,
        )
        self._compute(batch)

    def _compute(self, batch: list[Flight]) -> None:
        e = self.engine
        tasks = [
            f.task if f.task.group == i else dataclasses.replace(f.task, group=i)
            for i, f in enumerate(batch)
        ]
        versions = {f.task.version for f in batch}
        outcome = e.runtime.execute(
            tasks, {v: e.flights.snapshots[v] for v in versions}, len(tasks), defer_state=True
        )
        self.runtime_metrics = outcome.metrics
        for f, contribution, (_, metrics) in zip(
            batch, outcome.contributions, outcome.client_metrics, strict=True
        ):
            e.flights.computed[f.key] = Computed(
                contribution, metrics, outcome.new_states.get(f.client_id)
            )

    # ---- procedures that ask the server mid-task
    def _advance(self, flight: Flight, answers: int) -> Any:
        """Run ``flight``'s procedure until it has taken ``answers`` answers (starting it,
        or replaying it after a resume, as needed); the Outcome if it finished, else None."""
        e = self.engine
        key, task = flight.key, flight.task
        done = self.progress.get(key, -1)  # -1: not started
        while done < answers:
            if done < 0:
                payloads = {task.version: e.flights.snapshots[task.version]}
                out = e.runtime.execute([task], payloads, 1, defer_state=True)
            else:
                answer = e.flights.snapshots[flight.answers[done]]
                out = e.runtime.execute([task], {}, 1, defer_state=True, answers={key: answer})
            self.runtime_metrics = out.metrics
            done += 1
            self.progress[key] = done
            if key not in out.requests:
                self.progress.pop(key)
                return out
        return None

    def _answer_request(self, flight: Flight) -> None:
        """The procedure's next request reaches the server now: answer it with the
        current global model (kept as a snapshot until the task ends)."""
        e = self.engine
        if e.remote is not None:  # the node's procedure is suspended on its own device
            e.answer_remote(flight, self.strategy.payload(self.strategy.version))
            return
        asked = len(flight.answers)
        if self._advance(flight, asked) is not None:
            raise RuntimeError(
                f"algorithm={e.algorithm.name} declares {len(flight.requests_s)} request(s) "
                f"per task, but client {flight.client_id}'s procedure returned after {asked}"
            )
        e.flights.answer(flight, e.snapshot(self.strategy.payload(self.strategy.version)))

    def _finish_requesting(self, flight: Flight) -> None:
        out = self._advance(flight, len(flight.answers))
        if out is None:
            raise RuntimeError(
                f"client {flight.client_id}'s procedure asked the server more often than "
                f"algorithm={self.engine.algorithm.name} declares ({len(flight.requests_s)})"
            )
        (metrics,) = [m for _, m in out.client_metrics]
        state = out.new_states.get(flight.client_id)
        self.engine.flights.computed[flight.key] = Computed(out.contributions[0], metrics, state)

    # ---- the loop
    def next_record(self, step: int, wall_start: float) -> dict[str, Any] | None:
        e = self.engine
        if not self.started:
            self._start()
        if e.state_store is not None:
            e.state_store.begin_round(step)
        while True:
            if not len(e.clock) and e.remote is None:
                return None  # nothing in flight and no client will ever come online
            ev = e.pop_event()
            kind, key = ev.payload
            if kind == "wake":
                self.wake_s = None
                self._refill()
                continue
            if kind == "refill":
                self.pending_refills -= 1
                self._refill()
                continue
            flight = e.flights.flights[key]
            if kind == "request":
                self._answer_request(flight)
                continue
            if flight.lost:
                if key in self.progress:  # a suspended procedure that will never finish
                    e.runtime.discard([key])
                    self.progress.pop(key)
                e.land(key)
                self.dropped += 1
                self._schedule_refill()
                continue
            if key not in e.flights.computed:
                self._compute_ahead(flight, step)
            done = e.flights.computed[key]
            e.land(key)
            if done.state is not None and e.state_store is not None:
                e.state_store.put(flight.client_id, done.state)
            arrival = e.arrival(flight)
            self.metrics.append((flight.client_id, done.metrics))
            self.staleness.append(arrival.staleness)
            self.bytes_down += flight.down_bytes
            self.bytes_up += flight.up_bytes
            if e.times_split:  # the first step's first task keeps its timeline
                first = step == 1 and not self.split_tasks
                scheduled = e.task_schedule(flight, timeline=first)
                self.split_tasks += scheduled.tasks
                self.split_timeline += scheduled.timeline
            stepped = self.strategy.accept(arrival, done.contribution)
            if not stepped or step < e.run_config.rounds:
                self._schedule_refill()
            if stepped:
                return self._step_record(step, wall_start)

    def _step_record(self, step: int, wall_start: float) -> dict[str, Any]:
        e = self.engine
        server = self.strategy.server_step(step)
        fields = delivery_metrics(self.metrics, self.staleness)
        e.check_finite(step, fields["train_loss"], server)
        record: dict[str, Any] = {"round": step, **server}
        record["clients"] = len(self.metrics)
        record["dropped"] = self.dropped
        record["bytes_down"] = self.bytes_down
        record["bytes_up"] = self.bytes_up
        record["in_flight"] = len(e.flights)
        record.update(fields)
        record.update(self.runtime_metrics)
        now = e.clock.now
        if self.split_tasks:
            busy = sum(t.server_busy_s for t in self.split_tasks)
            schedule = RoundSchedule(self.split_tasks, busy, self.split_timeline)
            record.update(split_fields(schedule, self.last_step_s, now))
        self.last_step_s = now
        self._reset_step()
        e.finish_record(record, step, wall_start)
        return record
