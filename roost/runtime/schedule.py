"""Workload-aware placement of client tasks on long-lived workers.

Each round the host has a list of client tasks and ``N`` worker processes; every worker
trains the clients it is given one after another. Following FedML Parrot (Tang et al.,
"FedML Parrot: A Scalable Federated Learning System via Heterogeneity-aware Scheduling on
Sequential and Hierarchical Training", 2023, arXiv:2303.01778), the scheduler

* predicts a task's cost as ``units = examples x local_epochs``. The per-model cost of one
  unit is the same for every task of a run, so it is absorbed into each worker's
  learned *seconds per unit*;
* learns each worker's seconds per unit online, as an exponential moving average of the
  measured ``seconds / units`` of the tasks it ran (:meth:`Scheduler.observe`);
* places tasks by *longest processing time first* (LPT, Graham 1969, "Bounds on
  multiprocessing timing anomalies", SIAM J. Appl. Math. 17(2)) generalised to workers of
  different speeds: tasks in decreasing size, each to the worker that would *finish* it
  earliest (earliest-finish-time list scheduling on uniformly related machines).

Everything here is pure Python/numpy and deterministic: the same units and the same learned
speeds give the same assignment. :func:`round_robin` is the baseline;
:func:`makespan` and :func:`ideal_makespan` score an assignment against true speeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Assignment", "Scheduler", "ideal_makespan", "makespan", "round_robin"]


@dataclass(frozen=True)
class Assignment:
    """One round's placement.

    ``per_worker[w]`` lists the task indices worker ``w`` runs, in execution order;
    ``predicted_finish_s[w]`` is when it is predicted to finish them (seconds from the start
    of the round, or plain units while no worker has been measured);
    ``predicted_makespan_s`` is the largest of those (0.0 with no tasks).
    """

    per_worker: list[list[int]]
    predicted_finish_s: list[float]
    predicted_makespan_s: float


def _check_num_workers(num_workers: int) -> int:
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)):
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    return int(num_workers)


def _check_units(units: Sequence[float]) -> list[float]:
    out = [float(u) for u in units]
    for i, u in enumerate(out):
        if not (math.isfinite(u) and u >= 0.0):
            raise ValueError(f"units must be finite and >= 0, got units[{i}] = {u}")
    return out


def _check_speeds(seconds_per_unit: Sequence[float]) -> list[float]:
    out = [float(s) for s in seconds_per_unit]
    if not out:
        raise ValueError("seconds_per_unit must name at least one worker")
    for w, s in enumerate(out):
        if not (math.isfinite(s) and s > 0.0):
            raise ValueError(
                f"seconds_per_unit must be finite and > 0, got seconds_per_unit[{w}] = {s}"
            )
    return out


class Scheduler:
    """LPT / earliest-finish-time placement with per-worker speeds learned online.

    Rules (all deterministic):

    * :meth:`plan` sorts tasks by ``units`` descending, ties by lower task index, and gives
      each to the worker with the smallest predicted finish ``load_w + units * spu_w``,
      ties by lower worker id. A worker runs its tasks in the order they were assigned.
    * :meth:`observe` updates one worker's seconds per unit: the first observation sets it
      to ``seconds / units``; later ones apply
      ``spu <- (1 - smoothing) * spu + smoothing * seconds / units``. Observations of zero
      units carry no speed information and are ignored.
    * A worker not yet observed is predicted at the mean seconds per unit of the observed
      workers, or 1.0 if none has been observed (predictions are then in units).
    """

    def __init__(self, num_workers: int, smoothing: float = 0.3) -> None:
        self.num_workers = _check_num_workers(num_workers)
        smoothing = float(smoothing)
        if not (0.0 < smoothing <= 1.0):
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.smoothing = smoothing
        self._spu: list[float | None] = [None] * self.num_workers
        self._observations = [0] * self.num_workers

    @property
    def seconds_per_unit(self) -> list[float]:
        """Predicted seconds per unit of each worker (unobserved ones filled in, see above)."""
        observed = [s for s in self._spu if s is not None]
        default = sum(observed) / len(observed) if observed else 1.0
        return [default if s is None else s for s in self._spu]

    @property
    def observations(self) -> list[int]:
        """How many (non-zero-unit) observations each worker's speed is learned from."""
        return list(self._observations)

    def observe(self, worker: int, units: float, seconds: float) -> None:
        """Record that ``worker`` took ``seconds`` to run a task of ``units`` units."""
        if isinstance(worker, bool) or not isinstance(worker, (int, np.integer)):
            raise ValueError(f"worker must be an integer worker id, got {worker!r}")
        if not 0 <= worker < self.num_workers:
            raise ValueError(f"worker must be in [0, {self.num_workers}), got {worker}")
        units = float(units)
        seconds = float(seconds)
        if not (math.isfinite(units) and units >= 0.0):
            raise ValueError(f"units must be finite and >= 0, got {units}")
        if not (math.isfinite(seconds) and seconds >= 0.0):
            raise ValueError(f"seconds must be finite and >= 0, got {seconds}")
        if units == 0.0:
            return
        rate = seconds / units
        w = int(worker)
        old = self._spu[w]
        self._spu[w] = rate if old is None else (1.0 - self.smoothing) * old + self.smoothing * rate
        self._observations[w] += 1

    def plan(self, units: Sequence[float]) -> Assignment:
        """Place tasks of the given sizes (see the class docstring for the rules)."""
        sizes = _check_units(units)
        spu = np.asarray(self.seconds_per_unit, dtype=np.float64)
        load = np.zeros(self.num_workers, dtype=np.float64)
        per_worker: list[list[int]] = [[] for _ in range(self.num_workers)]
        # Stable sort on -units: equal sizes keep index order.
        for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
            finish = load + sizes[i] * spu
            w = int(np.argmin(finish))  # argmin returns the first (lowest id) minimum
            load[w] = finish[w]
            per_worker[w].append(i)
        finish_s = [float(x) for x in load]
        return Assignment(per_worker, finish_s, max(finish_s))

    def state_dict(self) -> dict[str, Any]:
        """The learned speeds (``None`` for unobserved workers), JSON-serialisable."""
        return {
            "num_workers": self.num_workers,
            "smoothing": self.smoothing,
            "seconds_per_unit": list(self._spu),
            "observations": list(self._observations),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore learned speeds. ``smoothing`` stays as configured on this instance."""
        n = int(state["num_workers"])
        if n != self.num_workers:
            raise ValueError(
                f"num_workers mismatch: state has {n} workers, scheduler has {self.num_workers}"
            )
        spu = list(state["seconds_per_unit"])
        obs = [int(k) for k in state.get("observations", [0 if s is None else 1 for s in spu])]
        if len(spu) != n or len(obs) != n:
            raise ValueError(f"seconds_per_unit must have {n} entries, got {len(spu)}")
        for w, s in enumerate(spu):
            if s is not None and not (math.isfinite(float(s)) and float(s) >= 0.0):
                raise ValueError(f"seconds_per_unit[{w}] must be finite and >= 0, got {s}")
        self._spu = [None if s is None else float(s) for s in spu]
        self._observations = obs


def round_robin(units: Sequence[float], num_workers: int) -> list[list[int]]:
    """The baseline: task ``i`` to worker ``i % num_workers``, each worker in index order."""
    n = _check_num_workers(num_workers)
    count = len(_check_units(units))
    return [list(range(w, count, n)) for w in range(n)]


def makespan(
    per_worker: list[list[int]], units: Sequence[float], seconds_per_unit: Sequence[float]
) -> tuple[float, list[float]]:
    """Makespan and per-worker busy seconds of ``per_worker`` under the given true speeds.

    Worker ``w`` is busy ``sum(units[i] for i in per_worker[w]) * seconds_per_unit[w]``;
    the makespan is the largest busy time.
    """
    sizes = _check_units(units)
    spu = _check_speeds(seconds_per_unit)
    if len(per_worker) != len(spu):
        raise ValueError(
            f"per_worker has {len(per_worker)} workers but seconds_per_unit has {len(spu)}"
        )
    busy: list[float] = []
    for w, tasks in enumerate(per_worker):
        for i in tasks:
            if not 0 <= i < len(sizes):
                raise ValueError(f"per_worker[{w}] names task {i}, out of range {len(sizes)}")
        busy.append(sum(sizes[i] for i in tasks) * spu[w])
    return max(busy), busy


def ideal_makespan(units: Sequence[float], seconds_per_unit: Sequence[float]) -> float:
    """The fluid lower bound: total work over total speed, ``sum(units) / sum(1 / spu_w)``.

    No placement of indivisible tasks can beat it; it is reached only if work could be split
    so that every worker finishes at the same instant.
    """
    sizes = _check_units(units)
    spu = _check_speeds(seconds_per_unit)
    return sum(sizes) / sum(1.0 / s for s in spu)
