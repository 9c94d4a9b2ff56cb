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

After the step the global model is checked: a NaN or Inf in it, or a server metric or
mean train loss that overflowed, raises :class:`Diverged` naming the round (the run
stops; nothing of that round is recorded). A round in which
every selected client was dropped leaves the model unchanged and warns (once per run;
``clients == 0`` in its record). The run stops early after the first round that reaches
``target_accuracy`` or ends at or past ``virtual_time_budget_s``; its record then says
why in ``stopped``.

The engine never looks at real time except to report it, and never decides how tasks are
computed: that is the runtime's business.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from roost.algorithms.base import Algorithm, Payload, Strategy
from roost.clock import VirtualClock
from roost.config import RunConfig
from roost.data.base import FederatedDataset
from roost.errors import Diverged, RoostWarning
from roost.runtime.base import Runtime, Task, task_seed
from roost.state import ClientStateStore
from roost.system.model import SystemModel

__all__ = ["Callback", "Engine", "History", "RoundPlan", "plan_round"]


class Callback(Protocol):
    """Called after every round with its record; returns ``(stop, extra metrics)``."""

    def __call__(self, record: dict[str, Any]) -> tuple[bool, dict[str, Any]]: ...


@dataclass
class History:
    """One record per round, as written to ``metrics.jsonl``, and the run's number of
    clients."""

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
    (e.g. Ditto's ``client_trained_personal_accuracy``)."""
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
        initial_params: torch.Tensor | None = None,
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
        self._warned_empty = False
        self.initial_params = initial_params

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
        losses = [m["train_loss"] for _, m in outcome.client_metrics if "train_loss" in m]
        train_loss = float(np.mean(losses)) if losses else None
        if plan.counted:
            server = self.strategy.step(r, outcome.contributions)
            record.update(server)
            self._check_finite(r, train_loss, server)
        else:
            self._warn_empty(r, plan)
        record["virtual_time_s"] = self.clock.now
        record["wall_time_s"] = self.wall_offset_s + (time.perf_counter() - wall_start)
        record["clients"] = len(plan.counted)
        record["dropped"] = len(plan.selected) - len(plan.counted)
        record["bytes_down"] = payload.nbytes * len(plan.counted)
        record["bytes_up"] = self.algorithm.upload_nbytes(self.num_params) * len(plan.counted)
        record["train_loss"] = train_loss
        record.update(client_metric_means(outcome.client_metrics))
        record.update(outcome.metrics)
        record["accuracy"] = record["loss"] = None
        if self._due_eval(r):
            if self._test is not None:
                loss, acc = self.runtime.evaluate(self.strategy.eval_params, self._test)
                record["accuracy"], record["loss"] = acc, loss
            if self.algorithm.evaluates_personal_models():
                record.update(self.evaluate_personal())
            record["wall_time_s"] = self.wall_offset_s + (time.perf_counter() - wall_start)
        return record

    def evaluate_personal(self) -> dict[str, Any]:
        """Every client's personal model on its own test split (clients with no state yet
        at the initial model): ``personal_accuracy`` = correct predictions over all
        clients' test examples, ``personal_loss`` example-weighted, and how many clients
        were measured. Empty when the data has no per-client test splits."""
        if self.state_store is None or self.initial_params is None:
            raise RuntimeError("personal evaluation needs the state store and w^0")
        loss_sum, correct, examples, clients = 0.0, 0, 0, 0
        for cid in range(self.dataset.num_clients):
            test = self.dataset.client_test_data(cid)
            if test is None or len(test) == 0:
                continue
            state = self.state_store.get(cid)
            params = self.initial_params if state is None else self.algorithm.personal_params(state)
            loss, acc = self.runtime.evaluate(params, test)
            n = len(test)
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

    def _check_finite(self, r: int, train_loss: float | None, server: dict[str, Any]) -> None:
        """Raise :class:`Diverged` if the global model holds a NaN or Inf, or if a number
        computed from it overflowed: the server's metrics (e.g. an ``update_norm`` past
        float32's range, ~1.8e19) or the clients' mean train loss."""
        params = self.strategy.params
        models = (
            [params] if self.strategy.eval_params is params else [params, self.strategy.eval_params]
        )
        bad = sum(m.numel() - int(torch.isfinite(m).sum()) for m in models)
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
            f"round {r}: {what} after the server step of algorithm={self.algorithm.name}; "
            "the run diverged and stopped. Try a smaller learning rate (algorithm.lr, or "
            "algorithm.server_lr for a server optimiser)"
        )

    def _warn_empty(self, r: int, plan: RoundPlan) -> None:
        """Warn (once per run) that a round had no client to count."""
        if self._warned_empty:
            return
        self._warned_empty = True
        deadline = self.run_config.deadline_s
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
            stacklevel=3,
        )

    def stop_reason(self, record: dict[str, Any]) -> str | None:
        """Why the run stops after this round, or None: a target accuracy reached or the
        virtual-time budget used up."""
        cfg = self.run_config
        acc = record.get("accuracy")
        if cfg.target_accuracy is not None and acc is not None and acc >= cfg.target_accuracy:
            return f"target_accuracy {cfg.target_accuracy:g} reached ({acc:.4f})"
        budget = cfg.virtual_time_budget_s
        if budget is not None and record["virtual_time_s"] >= budget:
            return f"virtual_time_budget_s {budget:g} used ({record['virtual_time_s']:.1f} s)"
        return None

    def _due_eval(self, r: int) -> bool:
        cfg = self.run_config
        return r == cfg.rounds or (cfg.eval_every > 0 and r % cfg.eval_every == 0)

    def run(self, start_round: int = 1, history: History | None = None) -> History:
        """Run rounds ``start_round .. rounds``; the stop rules and callbacks may stop early."""
        history = history or History()
        wall_start = time.perf_counter()
        for r in range(start_round, self.run_config.rounds + 1):
            record = self.run_round(r, wall_start)
            reason = self.stop_reason(record)
            if reason is not None:
                record["stopped"] = reason
            stop = reason is not None
            for cb in self.callbacks:
                s, extra = cb(record)
                record.update(extra)
                stop = stop or s
            history.records.append(record)
            if stop:
                break
        return history
