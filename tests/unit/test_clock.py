"""VirtualClock: time order, then priority, then insertion order; never backwards."""

import pytest

from roost.clock import VirtualClock


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
