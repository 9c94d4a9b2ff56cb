"""Tasks in flight: what was dispatched, from which version, when it will arrive.

The engine knows at dispatch when a task arrives (or when its device goes offline), since
durations come from the system model. This table keeps every dispatched task until it is
delivered or lost, the model snapshots those tasks started from (one per version that
still has a task in flight), the results computed ahead of delivery, and answers the
question that lets a runtime compute ahead without waste: which tasks are *certain* to be
delivered before the run ends (:func:`certain_prefix`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from roost.algorithms.base import Contribution, Payload
from roost.runtime.base import Task
from roost.system.model import TaskTiming

__all__ = ["Flight", "FlightTable", "certain_prefix"]


@dataclass(slots=True)
class Flight:
    """One dispatched task. ``key`` orders tasks by dispatch (ties in arrival time go to
    the task dispatched first); ``dispatch`` is the client's dispatch number (from 1).
    ``requests_s`` are the times its procedure asks the server something (FedASMU's
    fetch), ``answers`` the model versions the server answered with so far."""

    key: int
    task: Task
    timing: TaskTiming
    dispatch: int
    work_examples: int
    down_bytes: int
    up_bytes: int
    requests_s: tuple[float, ...] = ()
    answers: list[int] = field(default_factory=list)
    # derived, plain attributes (read several times per event): the task's client, whether
    # its device goes offline first, and when it leaves the table (arrival or offline)
    client_id: int = field(init=False)
    lost: bool = field(init=False)
    end_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.client_id = self.task.client_id
        offline = self.timing.offline_s
        self.lost = offline is not None
        self.end_s = offline if offline is not None else self.timing.arrival_s

    def versions(self) -> set[int]:
        """The model versions this task needs: where it started, and its answers."""
        return {self.task.version, *self.answers}


@dataclass
class Computed:
    """A task's result, computed ahead of its delivery."""

    contribution: Contribution
    metrics: dict[str, float]
    state: dict[str, torch.Tensor] | None


@dataclass
class FlightTable:
    """Dispatched tasks by key, the snapshots they need, and results computed ahead."""

    flights: dict[int, Flight] = field(default_factory=dict)
    snapshots: dict[int, Payload] = field(default_factory=dict)
    computed: dict[int, Computed] = field(default_factory=dict)
    next_key: int = 0
    users: dict[int, int] = field(default_factory=dict)  # version -> tasks that need it

    def add(self, flight: Flight, payload: Payload) -> None:
        self.flights[flight.key] = flight
        self.snapshots.setdefault(payload.version, payload)
        users = self.users
        for v in flight.versions() if flight.answers else (flight.task.version,):
            users[v] = users.get(v, 0) + 1

    def answer(self, flight: Flight, payload: Payload) -> None:
        """Record that ``flight``'s procedure was answered with ``payload`` (kept as a
        snapshot while the task needs it)."""
        self.snapshots.setdefault(payload.version, payload)
        if payload.version not in flight.versions():
            self.users[payload.version] = self.users.get(payload.version, 0) + 1
        flight.answers.append(payload.version)

    def new_key(self) -> int:
        key = self.next_key
        self.next_key += 1
        return key

    def remove(self, key: int) -> Flight:
        """Take a task out (delivered or lost); drop snapshots no task needs any more."""
        flight = self.flights.pop(key)
        self.computed.pop(key, None)
        users = self.users
        for version in flight.versions() if flight.answers else (flight.task.version,):
            left = users[version] - 1
            if left:
                users[version] = left
            else:
                del users[version]
                self.snapshots.pop(version, None)
        return flight

    def __len__(self) -> int:
        return len(self.flights)

    def clients(self) -> list[int]:
        return [f.client_id for f in self.flights.values()]

    def uncomputed_arrivals(self) -> list[Flight]:
        """Tasks that will arrive and have no result yet, in delivery order."""
        pending = [f for k, f in self.flights.items() if not f.lost and k not in self.computed]
        return sorted(pending, key=lambda f: (f.timing.arrival_s, f.key))

    def snapshot_dicts(self) -> dict[int, dict[str, Any]]:
        """The snapshots tasks in flight start from, by version, as plain dicts."""
        return {
            v: {"params": p.params, "extras": dict(p.extras)} for v, p in self.snapshots.items()
        }

    def state_dict(self, with_snapshots: bool = True) -> dict[str, Any]:
        """The tasks in flight and, unless the caller stores them itself, their snapshots
        (results computed ahead are not kept: a resumed run computes them again, to the
        same values)."""
        return {
            "next_key": self.next_key,
            "flights": [
                {
                    "key": f.key,
                    "task": [f.task.client_id, f.task.round, f.task.version, f.task.seed],
                    "settings": [list(kv) for kv in f.task.settings],
                    "timing": [
                        f.timing.start_s,
                        f.timing.download_end_s,
                        f.timing.compute_end_s,
                        f.timing.arrival_s,
                        f.timing.offline_s,
                    ],
                    "dispatch": f.dispatch,
                    "work": [f.work_examples, f.down_bytes, f.up_bytes],
                    "requests_s": list(f.requests_s),
                    "answers": list(f.answers),
                }
                for f in self.flights.values()
            ],
            "snapshot_versions": sorted(self.snapshots),
            "snapshots": self.snapshot_dicts() if with_snapshots else None,
        }

    @staticmethod
    def from_state_dict(state: dict[str, Any]) -> FlightTable:
        table = FlightTable(next_key=int(state["next_key"]))
        for v, p in state["snapshots"].items():
            table.snapshots[int(v)] = Payload(p["params"], int(v), dict(p["extras"]))
        for f in state["flights"]:
            cid, rnd, version, seed = f["task"]
            settings = tuple((str(k), v) for k, v in f.get("settings", []))
            start, down, compute, arrival, offline = f["timing"]
            work, down_b, up_b = f["work"]
            table.flights[int(f["key"])] = Flight(
                int(f["key"]),
                Task(int(cid), int(rnd), int(version), int(seed), 0, int(f["key"]), settings),
                TaskTiming(start, down, compute, arrival, offline),
                int(f["dispatch"]),
                int(work),
                int(down_b),
                int(up_b),
                tuple(float(t) for t in f["requests_s"]),
                [int(v) for v in f["answers"]],
            )
        for flight in table.flights.values():
            for v in flight.versions():
                table.users[v] = table.users.get(v, 0) + 1
        return table


def certain_prefix(
    pending: Sequence[Flight],
    in_flight_ends: Iterable[float],
    free_slots: int,
    now: float,
    needed: int | None,
    min_task_s: float,
    horizon_s: float,
    limit: int,
) -> list[Flight]:
    """The first tasks of ``pending`` (uncomputed tasks in delivery order) that are certain
    to be delivered before the run ends, at most ``limit`` of them.

    With a cap of C tasks in flight, every dispatch fills one of C *slots*, and a slot
    takes a new task only when its current one ends (arrives or is lost) or, if it is
    free, from ``now`` on. A new task lasts at least ``d = min_task_s``, and so a slot
    whose task ends at ``e < a`` yields at most ``floor((a - e) / d)`` arrivals of tasks
    not yet dispatched before time ``a``; a free slot at most ``floor((a - now) / d)``.
    So the number of arrivals before the r-th pending arrival ``a_r`` is at most
    ``r + X(a_r)`` with::

        X(a) = Σ_{slots busy until e < a} floor((a - e) / d) + free · floor((a - now) / d)

    and task r is certain when ``r + X(a_r) < needed`` (the run still needs ``needed``
    arrivals) and ``a_r < horizon_s`` (no time budget ends before it). ``needed=None``
    (unknown) makes only the next arrival certain; so does ``d = 0``, and the next
    arrival is always certain when the run needs one more.
    """
    if not pending or (needed is not None and needed < 1):
        return []
    ends = np.sort(np.fromiter(in_flight_ends, float))
    out: list[Flight] = []
    for r, flight in enumerate(pending[:limit]):
        a = flight.timing.arrival_s
        if a >= horizon_s and r > 0:
            break
        if r == 0:
            out.append(flight)
            if needed is None or min_task_s <= 0:
                break
            continue
        if needed is None:
            break
        before = ends[ends < a]
        x = float(np.floor((a - before) / min_task_s).sum())
        x += free_slots * math.floor((a - now) / min_task_s)
        if r + x >= needed:
            break
        out.append(flight)
    return out
