"""Synchronous rounds: the barrier policy of the event loop (and its semi-async variant).

Round ``r`` starting at virtual time ``t0``:

1. the strategy selects ``ceil(m (1 + over_selection))`` clients among those available
   at ``t0`` and not in flight, with the round's generator ``default_rng([seed, 4, r])``;
2. the system model gives each selected client's task its timing from ``t0`` (the tasks
   of a split-learning method are timed together, per micro-batch, since they share the
   server: :mod:`roost.system.split_schedule`; the record then has the resources' busy
   and idle seconds, :func:`split_fields`); a task whose device goes offline before it
   arrives is lost (counted in ``offline``);
3. the round ends at the ``m``-th arrival, or at the deadline if fewer than ``m`` arrive
   within it (:func:`plan_round`); the first ``m`` arrivals are *counted*;
4. with ``late_results=drop`` every other task is dropped before anything is computed for
   it; with ``late_results=carry`` a task that arrives after the round's end stays in
   flight and is delivered in the round during which it arrives, with its staleness
   (server version at delivery minus the version it started from);
5. the runtime computes the tasks delivered in this round (counted tasks in selection
   order, then carried ones in arrival order), as one group when the strategy
   aggregates sums (workers pre-reduce), else one group per task in arrival order;
6. their arrivals are popped from the clock; the round-end event follows, and the strategy
   steps.

A round in which no result was delivered leaves the model unchanged and warns (once per
run; ``clients == 0`` in its record).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from roost.algorithms.asynchronous import Arrival
from roost.algorithms.base import Contribution
from roost.engine.core import ROUND_END, delivery_metrics, split_fields
from roost.errors import RoostWarning

if TYPE_CHECKING:
    from roost.engine.core import Engine
    from roost.engine.flight import Flight

__all__ = ["RoundPlan", "RoundPolicy", "plan_round"]


@dataclass(frozen=True)
class RoundPlan:
    """Who was selected, who is counted (in selection order) and when the round ends."""

    selected: list[int]
    counted: list[int]
    arrival_s: dict[int, float]
    end_s: float


def plan_round(
    selected: Sequence[int],
    arrivals_s: Sequence[float],
    t0: float,
    k: int,
    deadline_s: float | None,
) -> RoundPlan:
    """Count the first ``k`` arrivals within the deadline (ties: earlier selection first).

    ``arrivals_s`` are absolute times (``inf`` for a task that never arrives). The round
    ends at the last counted arrival, or at ``t0 + deadline_s`` when fewer than ``k``
    arrived within the deadline (at ``t0`` when nothing was selected and there is none).
    """
    arrival = dict(zip(selected, arrivals_s, strict=True))
    order = sorted(range(len(selected)), key=lambda i: (arrivals_s[i], i))
    limit = math.inf if deadline_s is None else t0 + deadline_s
    first = [i for i in order if arrivals_s[i] <= limit and math.isfinite(arrivals_s[i])][:k]
    counted = [selected[i] for i in sorted(first)]
    if len(first) < k and deadline_s is not None:
        end = t0 + deadline_s
    else:
        end = max((arrival[c] for c in counted), default=t0)
    return RoundPlan(list(selected), counted, arrival, end)


class RoundPolicy:
    """The barrier: one record per synchronous round; see the module docstring."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._warned_empty = False

    def state_dict(self) -> dict[str, Any]:
        return {"warned_empty": self._warned_empty}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._warned_empty = bool(state.get("warned_empty", False))

    def next_record(self, r: int, wall_start: float) -> dict[str, Any]:
        e = self.engine
        if e.remote is not None:
            return self._network_record(r, wall_start)
        cfg, strategy = e.run_config, e.strategy
        payload = strategy.payload(r)
        t0 = e.clock.now
        k = cfg.clients_per_round
        rng = np.random.default_rng([cfg.seed, 4, r])
        selected = strategy.select(
            r, e.candidates(t0), math.ceil(k * (1 + cfg.over_selection)), rng
        )
        settings = strategy.configure_tasks(r, selected, np.random.default_rng([cfg.seed, 10, r]))
        planned = e.plan_flights(r, selected, payload, t0, settings, timeline=r == 1)
        arrival_s = [math.inf if f.lost else f.timing.arrival_s for f in planned]
        plan = plan_round(selected, arrival_s, t0, k, cfg.deadline_s)
        counted = set(plan.counted)
        carry = cfg.late_results == "carry"
        kept = [f for f in planned if f.client_id in counted or (carry and not f.lost)]
        if kept:
            snapshot = e.snapshot(payload)
            for f in kept:
                e.launch(f, snapshot)
        e.clock.schedule(plan.end_s, ("round_end", r), ROUND_END)

        # what arrives by the round's end: this round's counted tasks (selection order),
        # then tasks carried from earlier rounds (arrival order)
        due = [f for f in kept if f.client_id in counted]
        due_keys = {f.key for f in due}
        carried = sorted(
            (
                f
                for f in e.flights.flights.values()
                if f.key not in due_keys and not f.lost and f.timing.arrival_s <= plan.end_s
            ),
            key=lambda f: (f.timing.arrival_s, f.key),
        )
        due += carried
        per_client = strategy.aggregation == "per_client"
        rank = {
            f.key: i for i, f in enumerate(sorted(due, key=lambda f: (f.timing.arrival_s, f.key)))
        }
        tasks = [dataclasses.replace(f.task, group=rank[f.key] if per_client else 0) for f in due]
        if e.state_store is not None:
            e.state_store.begin_round(r)
        versions = {f.task.version for f in due}
        groups = len(tasks) if per_client else 1
        outcome = e.runtime.execute(tasks, {v: e.flights.snapshots[v] for v in versions}, groups)
        while outcome.requests:  # within a round the global model is the round's payload
            asking = [t for t in tasks if t.key in outcome.requests]
            answers = {t.key: e.flights.snapshots[t.version] for t in asking}
            more = e.runtime.execute(asking, {}, groups, answers=answers)
            for mine, theirs in zip(outcome.contributions, more.contributions, strict=True):
                mine.merge(theirs)
            outcome.client_metrics += more.client_metrics
            outcome.requests = more.requests

        staleness: list[int] = []
        arrivals: list[Arrival] = []
        while True:
            ev = e.clock.pop()
            kind, key = ev.payload
            if kind == "round_end":
                break
            flight = e.land(key)
            staleness.append(strategy.version - flight.task.version)
            arrivals.append(e.arrival(flight))
        strategy.observe(arrivals)

        counts: dict[str, Any] = {
            "dropped": len(planned) - len(kept),
            "offline": sum(1 for f in planned if f.lost),
            "late": len(carried),
        }
        if e.times_split and e.split_schedule is not None and planned:
            counts.update(split_fields(e.split_schedule, t0, plan.end_s))
        return self._record(
            r,
            wall_start,
            plan,
            due,
            outcome.contributions,
            outcome.client_metrics,
            staleness,
            counts,
            outcome.metrics,
        )

    def _record(
        self,
        r: int,
        wall_start: float,
        plan: RoundPlan,
        due: Sequence[Flight],
        contributions: Sequence[Contribution],
        client_metrics: Sequence[tuple[int, dict[str, float]]],
        staleness: Sequence[int],
        counts: dict[str, Any],
        runtime_metrics: dict[str, Any],
    ) -> dict[str, Any]:
        """Step on the round's delivered results (warn if there are none) and make its
        record; ``counts`` are its dropped, offline and late task counts (and a split
        round's resource fields)."""
        e, strategy = self.engine, self.engine.strategy
        record: dict[str, Any] = {"round": r}
        fields = delivery_metrics(client_metrics, staleness)
        if due:
            server = strategy.step(r, contributions)
            record.update(server)
            e.check_finite(r, fields["train_loss"], server)
        else:
            self._warn_empty(r, plan)
        record["clients"] = len(due)
        record.update(counts)
        record["in_flight"] = len(e.flights)
        record["bytes_down"] = sum(f.down_bytes for f in due)
        record["bytes_up"] = sum(f.up_bytes for f in due)
        record.update(fields)
        record.update(runtime_metrics)
        e.finish_record(record, r, wall_start)
        return record

    def _network_record(self, r: int, wall_start: float) -> dict[str, Any]:
        """One round in deployment, where arrival times are not known ahead: wait until
        ``clients_per_round`` clients have a node connected (unless tasks of earlier
        rounds are still in flight), select among the connected clients (over-selecting
        as configured) and send every task; the round ends at its ``m``-th arrival, at
        ``deadline_s`` after its start, or when none of its tasks is left in flight (the
        others arrived or were lost). Results are folded as they arrive (in arrival order,
        where simulation folds the counted tasks in selection order: the same float64
        sums up to their last bits). Tasks of the round still in flight at its end are
        cancelled with ``late_results=drop``, and with ``carry`` stay in flight and are
        delivered, with their staleness, in the round during which they arrive. A mid-task
        request is answered with the model the task started from (within a round the
        global model does not change)."""
        e = self.engine
        cfg, strategy = e.run_config, e.strategy
        assert e.remote is not None
        payload = strategy.payload(r)
        k = cfg.clients_per_round
        while len(e.candidates(e.clock.now)) < k and not len(e.flights):
            e.pop_event()  # wait for nodes: each registration is a wake event
        t0 = e.clock.now
        rng = np.random.default_rng([cfg.seed, 4, r])
        selected = strategy.select(
            r, e.candidates(t0), math.ceil(k * (1 + cfg.over_selection)), rng
        )
        settings = strategy.configure_tasks(r, selected, np.random.default_rng([cfg.seed, 10, r]))
        planned = [e.plan_flight(cid, r, payload, t0, settings.get(cid)) for cid in selected]
        if planned:
            snapshot = e.snapshot(payload)
            for f in planned:
                e.launch(f, snapshot)
        if cfg.deadline_s is not None:
            e.clock.schedule(t0 + cfg.deadline_s, ("round_end", r), ROUND_END)
        if e.state_store is not None:
            e.state_store.begin_round(r)
        mine = {f.key for f in planned}
        per_client = strategy.aggregation == "per_client"
        total = Contribution()
        contributions: list[Contribution] = [] if per_client else [total]
        due: list[Flight] = []
        client_metrics: list[tuple[int, dict[str, float]]] = []
        staleness: list[int] = []
        arrivals: list[Arrival] = []
        counted = offline = late = 0
        while counted < k and any(key in e.flights.flights for key in mine):
            kind, key = e.pop_event().payload
            if kind == "round_end":
                if key == r:
                    break
                continue  # the deadline of an earlier round that ended sooner
            if kind != "task" and kind != "request":
                continue
            flight = e.flights.flights[key]
            if kind == "request":
                e.answer_remote(flight, e.flights.snapshots[flight.task.version])
                continue
            done = e.flights.computed.get(key)
            e.land(key)
            if done is None:  # lost
                offline += key in mine
                continue
            counted += key in mine
            late += key not in mine
            if per_client:
                contributions.append(done.contribution)
            else:
                total.merge(done.contribution)
            due.append(flight)
            client_metrics.append((flight.client_id, done.metrics))
            staleness.append(strategy.version - flight.task.version)
            arrivals.append(e.arrival(flight))
        dropped = 0
        if cfg.late_results != "carry":
            for key in sorted(mine & e.flights.flights.keys()):
                e.remote.cancel(key)
                e.land(key)
                dropped += 1
        strategy.observe(arrivals)
        plan = RoundPlan(list(selected), [f.client_id for f in due], {}, e.clock.now)
        counts = {"dropped": dropped, "offline": offline, "late": late}
        return self._record(
            r, wall_start, plan, due, contributions, client_metrics, staleness, counts, {}
        )

    def _warn_empty(self, r: int, plan: RoundPlan) -> None:
        """Warn (once per run) that a round had no client to count."""
        if self._warned_empty:
            return
        self._warned_empty = True
        deadline = self.engine.run_config.deadline_s
        if not plan.selected:
            why = "no client was available"
        elif deadline is not None:
            why = (
                f"none of the {len(plan.selected)} selected clients could arrive within "
                f"deadline_s={deadline:g}"
            )
        else:
            why = f"all {len(plan.selected)} selected clients were dropped"
        warnings.warn(
            f"round {r}: {why}, so the global model did not change; later rounds like it "
            "are not warned about again (summary.json counts them in rounds_without_clients)",
            RoostWarning,
            stacklevel=4,
        )
