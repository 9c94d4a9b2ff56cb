"""Clocks: a heap of events keyed by (time, priority, sequence).

The :class:`VirtualClock` is the simulation's time: events are delivered in time order,
ties broken by priority and then by insertion order, so a run is deterministic however the
host computed it. The :class:`WallClock` keeps the same interface over real seconds, for
deployment.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "VirtualClock", "WallClock"]


@dataclass(order=True)
class Event:
    time: float
    priority: int
    seq: int
    payload: Any = field(compare=False)


class VirtualClock:
    """Simulated seconds. ``schedule`` events, ``pop`` the earliest; time never goes back."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._heap: list[Event] = []
        self._seq = itertools.count()

    @property
    def now(self) -> float:
        return self._now

    def schedule(self, at: float, payload: Any, priority: int = 0) -> Event:
        if at < self._now:
            raise ValueError(f"cannot schedule at t={at} before now={self._now}")
        ev = Event(float(at), priority, next(self._seq), payload)
        heapq.heappush(self._heap, ev)
        return ev

    def pop(self) -> Event:
        """Remove the earliest event and advance the clock to its time."""
        ev = heapq.heappop(self._heap)
        self._now = ev.time
        return ev

    def advance_to(self, t: float) -> None:
        if t < self._now:
            raise ValueError(f"cannot move the clock back from {self._now} to {t}")
        if self._heap and self._heap[0].time < t:
            raise ValueError("events are pending before the requested time")
        self._now = float(t)

    def __len__(self) -> int:
        return len(self._heap)


class WallClock(VirtualClock):
    """Real seconds since construction; ``pop`` sleeps until the event is due."""

    def __init__(self) -> None:
        super().__init__(0.0)
        self._t0 = time.monotonic()

    @property
    def now(self) -> float:
        return time.monotonic() - self._t0

    def pop(self) -> Event:
        ev = heapq.heappop(self._heap)
        delay = ev.time - self.now
        if delay > 0:
            time.sleep(delay)
        return ev

    def advance_to(self, t: float) -> None:
        delay = t - self.now
        if delay > 0:
            time.sleep(delay)
