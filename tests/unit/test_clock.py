"""Clocks: time order, then priority, then insertion order; never backwards.

``VirtualClock`` is the simulation's time. ``WallClock`` is the same interface over real
seconds; most of its tests run on :class:`FakeTime`, so they are instant and exact (all the
numbers below are sums of binary fractions, so ``==`` on floats is exact). One test uses real
time with small delays.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from roost.clock import ClockTimeout, Event, VirtualClock, WallClock

# ---------------------------------------------------------------- VirtualClock (unchanged)


def test_events_pop_in_time_priority_sequence_order():
    clock = VirtualClock()
    clock.schedule(2.0, "late")
    clock.schedule(1.0, "b", priority=1)
    clock.schedule(1.0, "a", priority=0)
    clock.schedule(1.0, "c", priority=1)  # same time and priority as "b": inserted after it
    order = [clock.pop().payload for _ in range(4)]
    assert order == ["a", "b", "c", "late"]
    assert clock.now == 2.0


def test_clock_refuses_to_go_back():
    clock = VirtualClock(start=5.0)
    with pytest.raises(ValueError, match="before now"):
        clock.schedule(4.0, "x")
    with pytest.raises(ValueError, match="back"):
        clock.advance_to(1.0)


def test_advance_refuses_to_skip_pending_events():
    clock = VirtualClock()
    clock.schedule(1.0, "x")
    with pytest.raises(ValueError, match="pending"):
        clock.advance_to(2.0)


def test_virtual_pop_accepts_and_ignores_timeout():
    # Same signature as WallClock.pop; virtual time never waits, so an event at t=100 is
    # delivered even with timeout=0, and an empty clock raises IndexError as before.
    clock = VirtualClock()
    clock.schedule(100.0, "x")
    assert clock.pop(timeout=0.0).payload == "x"
    assert clock.now == 100.0
    with pytest.raises(IndexError):
        clock.pop(timeout=1.0)


# ---------------------------------------------------------------- WallClock on a fake time


class FakeTime:
    """A monotonic counter that moves only when the clock waits.

    A wait of ``s`` seconds advances it by ``s`` (nobody woke the clock up), unless a hook
    from ``during_wait`` is queued: the hook stands in for another thread that schedules
    while the clock waits, and the wait then returns without time passing (the notify woke
    it). Every requested wait is recorded in ``waits``. The counter starts at 1000 so that
    the tests also show ``now`` counts from the clock's construction, not the host's epoch.
    """

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t
        self.waits: list[float | None] = []
        self.during_wait: list[Callable[[], object]] = []

    def monotonic(self) -> float:
        return self.t

    def wait(self, cond: threading.Condition, timeout: float | None) -> bool:
        self.waits.append(timeout)
        if self.during_wait:
            self.during_wait.pop(0)()
            return True
        if timeout is None:
            raise AssertionError("would block forever: no other thread can schedule")
        self.t += timeout
        return False


def fake_wall(start: float = 0.0) -> tuple[WallClock, FakeTime]:
    fake = FakeTime()
    return WallClock(start, monotonic=fake.monotonic, wait=fake.wait), fake


def test_wall_clock_is_a_virtual_clock_for_the_engine():
    # The engine is typed against VirtualClock; a WallClock must be accepted in its place.
    clock, _ = fake_wall()
    assert isinstance(clock, VirtualClock)


def test_wall_now_is_start_plus_monotonic_seconds_since_construction():
    # Built when the host counter reads 1000, resumed at t=50: now is 50, not 1000 or 0.
    clock, fake = fake_wall(start=50.0)
    assert clock.now == 50.0
    fake.t += 2.5
    assert clock.now == 52.5
    # A resumed deployment continues its timeline: an event at 60 is 7.5 s away.
    clock.schedule(60.0, "x")
    assert clock.pop().time == 60.0
    assert fake.waits == [7.5]
    assert clock.now == 60.0


def test_wall_delivers_in_the_same_order_and_at_the_same_times_as_virtual():
    script = [(2.0, "late", 0), (1.0, "b", 1), (1.0, "a", 0), (1.0, "c", 1), (0.5, "first", 9)]
    virtual = VirtualClock(start=0.25)
    wall, fake = fake_wall(start=0.25)
    for clock in (virtual, wall):
        for at, payload, priority in script:
            clock.schedule(at, payload, priority)

    def drain(clock: VirtualClock) -> list[tuple[str, float, float]]:
        out = []
        while len(clock):
            ev = clock.pop()
            out.append((ev.payload, ev.time, clock.now))
        return out

    expected = [
        ("first", 0.5, 0.5),
        ("a", 1.0, 1.0),  # priority 0 before 1 at the same time
        ("b", 1.0, 1.0),
        ("c", 1.0, 1.0),  # same time and priority as "b": inserted after it
        ("late", 2.0, 2.0),
    ]
    assert drain(virtual) == expected
    assert drain(wall) == expected
    # The wall clock slept exactly up to each due time: 0.25 -> 0.5 -> 1.0 -> 2.0; the three
    # events at 1.0 needed no extra wait.
    assert fake.waits == [0.25, 0.5, 1.0]


def test_wall_schedule_in_the_past_is_due_now_and_never_reorders_time():
    # Chosen semantics: a network arrival is stamped when it is received, so an event
    # scheduled before now is stamped now; it goes after the events already due.
    clock, fake = fake_wall()
    clock.schedule(5.0, "a")
    fake.t += 6.0  # now = 6: "a" is due but not yet popped
    b = clock.schedule(3.0, "b")  # in the past -> t=6
    c = clock.schedule(6.0, "c", priority=-1)  # same stamp, higher priority than "b"
    assert (b.time, c.time) == (6.0, 6.0)
    popped = [clock.pop() for _ in range(3)]
    assert [ev.payload for ev in popped] == ["a", "c", "b"]
    assert [ev.time for ev in popped] == [5.0, 6.0, 6.0]  # never decreasing
    assert fake.waits == []  # all were due: no waiting
    with pytest.raises(ValueError, match="nan"):
        clock.schedule(float("nan"), "x")


def test_wall_pop_wakes_early_when_another_thread_schedules_an_earlier_event():
    clock, fake = fake_wall()
    clock.schedule(10.0, "late")

    def other_thread() -> None:  # 1 s into the 10 s wait, an arrival due at 1.5
        fake.t += 1.0
        clock.schedule(clock.now + 0.5, "early")

    fake.during_wait.append(other_thread)
    ev = clock.pop()
    assert ev.payload == "early"
    assert clock.now == 1.5
    # Waited for "late" (10 s), was woken at 1.0, then waited 0.5 s for "early".
    assert fake.waits == [10.0, 0.5]
    assert clock.pop().payload == "late"
    assert fake.waits == [10.0, 0.5, 8.5]  # 10 - 1.5
    assert clock.now == 10.0


def test_wall_pop_ignores_a_later_event_scheduled_while_waiting():
    clock, fake = fake_wall()
    clock.schedule(2.0, "first")
    fake.during_wait.append(lambda: clock.schedule(3.0, "second"))
    assert clock.pop().payload == "first"
    assert fake.waits == [2.0, 2.0]  # woken without time passing, then waited out the 2 s
    assert len(clock) == 1


def test_wall_pop_on_an_empty_clock_waits_for_another_thread():
    clock, fake = fake_wall()
    fake.during_wait.append(lambda: clock.schedule(0.0, "arrival"))
    assert clock.pop().payload == "arrival"
    assert fake.waits == [None]  # no event, no timeout: wait until notified


def test_wall_pop_timeout():
    clock, fake = fake_wall()
    # Empty: waits the whole 0.25 s, then raises.
    with pytest.raises(ClockTimeout, match="0 pending"):
        clock.pop(timeout=0.25)
    assert fake.waits == [0.25]
    assert clock.now == 0.25
    # An event at 5.25 is 5 s away: a 1 s timeout waits 1 s and leaves it pending.
    clock.schedule(5.25, "x")
    with pytest.raises(ClockTimeout, match=r"next at t=5\.25"):
        clock.pop(timeout=1.0)
    assert fake.waits == [0.25, 1.0]
    assert len(clock) == 1
    # A 10 s timeout only waits the 4 s until the event is due.
    assert clock.pop(timeout=10.0).payload == "x"
    assert fake.waits == [0.25, 1.0, 4.0]
    # timeout=0 polls: a due event is returned without waiting, otherwise ClockTimeout.
    clock.schedule(0.0, "due")
    assert clock.pop(timeout=0.0).payload == "due"
    with pytest.raises(ClockTimeout):
        clock.pop(timeout=0.0)
    assert fake.waits == [0.25, 1.0, 4.0]
    assert issubclass(ClockTimeout, TimeoutError)
    with pytest.raises(ValueError, match="timeout"):
        clock.pop(timeout=-1.0)


def test_wall_pop_timeout_is_a_deadline_across_wake_ups():
    # Woken at 0.5 by an event that is not earlier than the 3 s deadline allows: the
    # remaining wait is 1.5 s (deadline 2.0 - now 0.5), not a fresh 2 s.
    clock, fake = fake_wall()

    def other_thread() -> None:
        fake.t += 0.5
        clock.schedule(7.0, "later")

    fake.during_wait.append(other_thread)
    with pytest.raises(ClockTimeout):
        clock.pop(timeout=2.0)
    assert fake.waits == [2.0, 1.5]
    assert clock.now == 2.0


def test_wall_advance_to_sleeps_but_never_skips_pending_events():
    clock, fake = fake_wall()
    clock.advance_to(3.0)
    assert fake.waits == [3.0]
    assert clock.now == 3.0
    clock.advance_to(1.0)  # already past: returns at once (real time cannot go back)
    assert fake.waits == [3.0]
    clock.schedule(4.0, "x")
    with pytest.raises(ValueError, match="pending"):
        clock.advance_to(5.0)  # "x" at 4 would be skipped
    assert fake.waits == [3.0]  # refused before sleeping
    clock.advance_to(4.0)  # an event exactly at t is not skipped (same as VirtualClock)
    assert clock.now == 4.0
    assert clock.pop(timeout=0.0).payload == "x"
    with pytest.raises(ValueError, match="nan"):
        clock.advance_to(float("nan"))


def test_wall_advance_to_raises_if_an_earlier_event_arrives_while_sleeping():
    clock, fake = fake_wall()

    def other_thread() -> None:
        fake.t += 1.0
        clock.schedule(2.0, "arrival")

    fake.during_wait.append(other_thread)
    with pytest.raises(ValueError, match="pending"):
        clock.advance_to(4.0)
    assert fake.waits == [4.0]
    assert clock.now == 1.0  # stopped when woken; the arrival is still there to pop
    assert len(clock) == 1
    # An arrival after t does not interrupt: woken, then the remaining 3 s are slept.
    clock2, fake2 = fake_wall()
    fake2.during_wait.append(lambda: clock2.schedule(9.0, "later"))
    clock2.advance_to(3.0)
    assert fake2.waits == [3.0, 3.0]
    assert clock2.now == 3.0


def test_wall_waits_beyond_the_platform_limit_are_capped():
    # An event at +inf (never due) waits indefinitely; a huge finite delay is capped to
    # threading.TIMEOUT_MAX instead of overflowing Condition.wait.
    clock, fake = fake_wall()
    clock.schedule(float("inf"), "never")
    with pytest.raises(AssertionError, match="forever"):
        clock.pop()
    assert fake.waits == [None]
    clock2, fake2 = fake_wall()
    clock2.schedule(1e300, "far")
    fake2.during_wait.append(lambda: clock2.schedule(0.0, "now"))
    assert clock2.pop().payload == "now"
    assert fake2.waits == [threading.TIMEOUT_MAX]


# ---------------------------------------------------------------- WallClock on real time


def test_wall_real_time_ordering_and_early_wakeup_from_another_thread():
    # About 0.18 s in all: two events due at 0.15 s; 0.02 s in, another thread pushes an
    # arrival "due now", which must wake the waiting pop long before 0.15 s.
    clock = WallClock()
    clock.schedule(0.15, "late-low", priority=1)
    clock.schedule(0.15, "late")

    def push() -> None:
        time.sleep(0.02)
        clock.schedule(-1.0, "pushed")  # in the past: stamped with the receiving time

    thread = threading.Thread(target=push)
    thread.start()
    first = clock.pop(timeout=1.0)
    woke = clock.now
    thread.join()
    assert first.payload == "pushed"
    # Woken before the 0.15 s events were due: without the wake-up, pop would sleep to 0.15.
    assert 0.0 < first.time <= woke < 0.15
    rest = [clock.pop(timeout=1.0) for _ in range(2)]
    assert [ev.payload for ev in rest] == ["late", "late-low"]  # priority 0 before 1
    assert clock.now >= 0.15  # never delivered early
    # Nothing more: a 0.03 s timeout really waits about 0.03 s, then raises.
    before = clock.now
    with pytest.raises(ClockTimeout):
        clock.pop(timeout=0.03)
    assert clock.now - before >= 0.03


def test_wall_concurrent_schedules_from_many_threads():
    # 4 threads x 50 arrivals, all "due now": none is lost, each has a distinct sequence
    # number, and they come out in non-decreasing time order.
    clock = WallClock()

    def push(k: int) -> None:
        for i in range(50):
            clock.schedule(0.0, (k, i), priority=i % 3)

    threads = [threading.Thread(target=push, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(clock) == 200
    popped: list[Event] = [clock.pop(timeout=0.0) for _ in range(200)]
    assert len({ev.seq for ev in popped}) == 200
    assert sorted(ev.payload for ev in popped) == [(k, i) for k in range(4) for i in range(50)]
    assert popped == sorted(popped)  # (time, priority, seq) order
    assert len(clock) == 0
