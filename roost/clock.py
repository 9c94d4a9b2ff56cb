"""Clocks: a heap of events keyed by (time, priority, sequence).

The :class:`VirtualClock` is the simulation's time: events are delivered in time order,
ties broken by priority and then by insertion order, so a run is deterministic however the
host computed it. The :class:`WallClock` keeps the same interface over real seconds, for
deployment: the same engine loop runs on it, with arrivals pushed from other threads.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["ClockTimeout", "Event", "VirtualClock", "WallClock"]


class Event(NamedTuple):
    """One scheduled event. A tuple, so that the heap compares (time, priority, seq) in C;
    ``seq`` is unique, so ``payload`` is never compared."""

    time: float
    priority: int
    seq: int
    payload: Any


class ClockTimeout(TimeoutError):
    """``WallClock.pop(timeout=...)``: no event became due within the timeout."""


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

    def pop(self, timeout: float | None = None) -> Event:
        """Remove the earliest event and advance the clock to its time.

        ``timeout`` is accepted for interface compatibility with :class:`WallClock` and
        ignored: virtual time never waits, the earliest event is always due. An empty clock
        raises :class:`IndexError` (nothing can ever arrive).
        """
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


def _condition_wait(cond: threading.Condition, timeout: float | None) -> object:
    return cond.wait(timeout)


class WallClock(VirtualClock):
    """Real seconds: ``now`` is ``start`` plus the monotonic seconds since construction.

    Same ordering as :class:`VirtualClock` -- events are delivered in (time, priority,
    sequence) order -- and thread-safe: ``schedule``, ``pop`` and ``len`` may be called from
    any thread (e.g. a server's network threads push arrivals while the engine loop pops).

    Differences forced by real time:

    * ``schedule`` at a time in the past does not raise: the event is stamped *now* ("due
      now"). A network arrival is stamped when it is received; time is never reordered
      backwards, so it goes after every event already due, and the times of the delivered
      events never decrease.
    * ``pop`` blocks until the earliest event is due (on an empty clock: until another
      thread schedules one) and wakes up early when another thread schedules an earlier
      event. With ``timeout`` (seconds) it raises :class:`ClockTimeout` if nothing became
      due in time, so a server loop can also check deadlines and heartbeats. Events may be
      delivered late (the host was busy), never early.
    * ``advance_to(t)`` sleeps until ``t``; a ``t`` already past returns at once. Like
      :class:`VirtualClock` it raises if an event is pending before ``t``, also when
      another thread schedules one during the wait: pop it first, nothing is skipped.

    ``start`` lets a resumed deployment continue its timeline. ``monotonic`` (a seconds
    counter) and ``wait`` (``wait(condition, timeout)``, called with the condition's lock
    held, must release it while waiting like ``Condition.wait``) are injectable so tests can
    run on a fake time source.
    """

    def __init__(
        self,
        start: float = 0.0,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wait: Callable[[threading.Condition, float | None], object] = _condition_wait,
    ) -> None:
        super().__init__(start)
        self._start = float(start)
        self._monotonic = monotonic
        self._wait = wait
        self._t0 = monotonic()
        self._cond = threading.Condition()  # an RLock: a fake ``wait`` may schedule

    @property
    def now(self) -> float:
        return self._start + (self._monotonic() - self._t0)

    def schedule(self, at: float, payload: Any, priority: int = 0) -> Event:
        at = float(at)
        if math.isnan(at):
            raise ValueError("cannot schedule at t=nan")
        with self._cond:
            ev = Event(max(at, self.now), priority, next(self._seq), payload)
            heapq.heappush(self._heap, ev)
            self._cond.notify_all()  # a waiting pop/advance_to re-checks the earliest event
        return ev

    def _sleep(self, seconds: float | None) -> None:
        """Wait on the condition (lock held) for ``seconds``, or until notified."""
        if seconds is not None and not seconds < threading.TIMEOUT_MAX:
            seconds = None if math.isinf(seconds) else threading.TIMEOUT_MAX
        self._wait(self._cond, seconds)

    def pop(self, timeout: float | None = None) -> Event:
        """Remove the earliest event once it is due (see the class docstring)."""
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be >= 0, got {timeout}")
        with self._cond:
            deadline = None if timeout is None else self.now + timeout
            while True:
                now = self.now
                if self._heap and self._heap[0].time <= now:
                    return heapq.heappop(self._heap)
                if deadline is not None and now >= deadline:
                    nxt = f", next at t={self._heap[0].time}" if self._heap else ""
                    raise ClockTimeout(
                        f"no event became due within {timeout}s "
                        f"(now={now}, {len(self._heap)} pending{nxt})"
                    )
                wait = self._heap[0].time - now if self._heap else None
                if deadline is not None:
                    wait = deadline - now if wait is None else min(wait, deadline - now)
                self._sleep(wait)

    def advance_to(self, t: float) -> None:
        t = float(t)
        if math.isnan(t):
            raise ValueError("cannot advance to t=nan")
        with self._cond:
            while True:
                if self._heap and self._heap[0].time < t:
                    raise ValueError("events are pending before the requested time")
                now = self.now
                if now >= t:
                    return
                self._sleep(t - now)

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)
