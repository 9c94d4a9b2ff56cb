"""The engine: the one event loop where strategy, runtime and system model meet.

A synchronous round ``r`` starting at virtual time ``t0``:

1. the strategy selects ``ceil(m (1 + over_selection))`` clients among those available
   at ``t0``, with the round's generator ``default_rng([seed, 4, r])``;
2. the system model gives each selected client its arrival time
   ``t0 + download + compute + upload``;
3. the first ``m`` clients to arrive within the deadline are *counted*; the others are
   dropped before anything is computed for them;
4. the runtime computes the counted tasks (in selection order) and folds their results;
5. arrivals are delivered on the :class:`~roost.clock.VirtualClock` in time order; the
   round ends when the last counted client arrives (or at the deadline, if fewer than
   ``m`` made it), and the strategy steps.

The engine never looks at real time except to report it, and never decides how tasks are
computed: that is the runtime's business.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from roost.algorithms.base import Algorithm, Payload, Strategy
from roost.clock import VirtualClock
from roost.config import RunConfig
from roost.data.base import FederatedDataset
from roost.runtime.base import Runtime, Task, task_seed
from roost.state import ClientStateStore
from roost.system.model import SystemModel

__all__ = ["Callback", "Engine", "History", "RoundPlan", "plan_round"]


class Callback(Protocol):
    """Called after every round with its record; returns ``(stop, extra metrics)``."""

    def __call__(self, record: dict[str, Any]) -> tuple[bool, dict[str, Any]]: ...


@dataclass
class History:
    """One record per round, as written to ``metrics.jsonl``."""

    records: list[dict[str, Any]] = field(default_factory=list)

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


@dataclass(frozen=True)
class RoundPlan:
    """Who was selected, who is counted (in selection order) and when the round ends."""

    selected: list[int]
    counted: list[int]
    arrival_s: dict[int, float]
    end_s: float


def plan_round(
    selected: Sequence[int],
    durations_s: Sequence[float],
    t0: float,
    k: int,
    deadline_s: float | None,
) -> RoundPlan:
    """Count the first ``k`` arrivals within the deadline (ties: earlier selection first)."""
    arrival = {cid: t0 + d for cid, d in zip(selected, durations_s, strict=True)}
    order = sorted(range(len(selected)), key=lambda i: (t0 + durations_s[i], i))
    limit = math.inf if deadline_s is None else t0 + deadline_s
    first = [i for i in order if t0 + durations_s[i] <= limit][:k]
    counted = [selected[i] for i in sorted(first)]
    if len(first) < k and deadline_s is not None:
        end = t0 + deadline_s
    else:
        end = max((arrival[c] for c in counted), default=t0)
    return RoundPlan(list(selected), counted, arrival, end)


def client_metric_means(metrics: Sequence[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """``client_<key>``: the mean over clients of every client metric except train_loss
    (e.g. Ditto's ``client_personal_accuracy``)."""
    sums: dict[str, list[float]] = {}
    for _, m in metrics:
        for key, value in m.items():
            if key not in ("train_loss", "local_steps"):
                sums.setdefault(key, []).append(float(value))
    return {f"client_{k}": float(np.mean(v)) for k, v in sums.items()}


class Engine:
    """Runs synchronous rounds in virtual time; see the module docstring."""

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
    ) -> None:
        self.run_config = run
        self.algorithm = algorithm
        self.strategy = strategy
        self.runtime = runtime
        self.dataset = dataset
        self.system = system
        self.num_params = num_params
        self.clock = clock or VirtualClock()
        self.callbacks = list(callbacks)
        self.state_store = state_store
        self.wall_offset_s = 0.0
        self._test = dataset.test_data()

    def _candidates(self, t: float) -> np.ndarray:
        n = self.dataset.num_clients
        ids = np.arange(n)
        if type(self.system).is_available is SystemModel.is_available:
            return ids
        mask = np.fromiter((self.system.is_available(int(c), t) for c in ids), bool, n)
        return ids[mask]

    def plan(self, r: int, payload: Payload) -> RoundPlan:
        cfg = self.run_config
        t0 = self.clock.now
        k = cfg.clients_per_round
        k_sel = math.ceil(k * (1.0 + cfg.over_selection))
        rng = np.random.default_rng([cfg.seed, 4, r])
        selected = self.strategy.select(r, self._candidates(t0), k_sel, rng)
        down = payload.nbytes
        up = self.algorithm.upload_nbytes(self.num_params)
        durations = [
            self.system.task_time_s(
                cid, self.algorithm.work_examples(self.dataset.num_examples(cid)), down, up
            )
            for cid in selected
        ]
        return plan_round(selected, durations, t0, k, cfg.deadline_s)

    def run_round(self, r: int, wall_start: float) -> dict[str, Any]:
        cfg = self.run_config
        payload = self.strategy.payload(r)
        plan = self.plan(r, payload)
        if self.state_store is not None:
            self.state_store.begin_round(r)
        per_client = self.strategy.aggregation == "per_client"
        by_arrival = sorted(plan.counted, key=lambda c: plan.arrival_s[c])
        arrival_rank = {c: i for i, c in enumerate(by_arrival)}
        tasks = [
            Task(
                cid,
                r,
                payload.version,
                task_seed(cfg.seed, cid, r),
                arrival_rank[cid] if per_client else 0,
            )
            for cid in plan.counted
        ]
        outcome = self.runtime.execute(
            tasks, {payload.version: payload}, len(tasks) if per_client else 1
        )
        for cid in plan.counted:
            self.clock.schedule(plan.arrival_s[cid], cid)
        while len(self.clock):
            self.clock.pop()
        self.clock.advance_to(max(plan.end_s, self.clock.now))

        record: dict[str, Any] = {"round": r}
        if plan.counted:
            server = self.strategy.step(r, outcome.contributions)
            record.update(server)
        record["virtual_time_s"] = self.clock.now
        record["wall_time_s"] = self.wall_offset_s + (time.perf_counter() - wall_start)
        record["clients"] = len(plan.counted)
        record["dropped"] = len(plan.selected) - len(plan.counted)
        record["bytes_down"] = payload.nbytes * len(plan.counted)
        record["bytes_up"] = self.algorithm.upload_nbytes(self.num_params) * len(plan.counted)
        losses = [m["train_loss"] for _, m in outcome.client_metrics if "train_loss" in m]
        record["train_loss"] = float(np.mean(losses)) if losses else None
        record.update(client_metric_means(outcome.client_metrics))
        record.update(outcome.metrics)
        record["accuracy"] = record["loss"] = None
        if self._test is not None and self._due_eval(r):
            loss, acc = self.runtime.evaluate(self.strategy.params, self._test)
            record["accuracy"], record["loss"] = acc, loss
            record["wall_time_s"] = self.wall_offset_s + (time.perf_counter() - wall_start)
        return record

    def _due_eval(self, r: int) -> bool:
        cfg = self.run_config
        return r == cfg.rounds or (cfg.eval_every > 0 and r % cfg.eval_every == 0)

    def run(self, start_round: int = 1, history: History | None = None) -> History:
        """Run rounds ``start_round .. rounds``; callbacks may stop early."""
        history = history or History()
        wall_start = time.perf_counter()
        for r in range(start_round, self.run_config.rounds + 1):
            record = self.run_round(r, wall_start)
            stop = False
            for cb in self.callbacks:
                s, extra = cb(record)
                record.update(extra)
                stop = stop or s
            history.records.append(record)
            if stop:
                break
        return history
