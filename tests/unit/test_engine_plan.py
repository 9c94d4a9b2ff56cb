"""Round planning: who is counted, who is dropped before computing, when the round ends."""

from roost.engine import plan_round


def test_without_deadline_all_selected_count_and_round_ends_at_last_arrival():
    # arrival times are absolute: t0 + durations 4, 1, 2
    plan = plan_round([7, 3, 5], [14.0, 11.0, 12.0], t0=10.0, k=3, deadline_s=None)
    assert plan.counted == [7, 3, 5]  # selection order is kept for computing
    assert plan.end_s == 14.0


def test_over_selection_counts_the_first_k_arrivals():
    # 5 selected for k=3: the two slowest (ids 1 and 4) are dropped before computing.
    plan = plan_round([1, 2, 3, 4, 5], [9.0, 1.0, 3.0, 8.0, 2.0], t0=0.0, k=3, deadline_s=None)
    assert plan.counted == [2, 3, 5]
    assert plan.end_s == 3.0


def test_deadline_drops_late_clients_and_round_waits_until_deadline_when_short():
    plan = plan_round([1, 2, 3], [1.0, 5.0, 2.0], t0=0.0, k=3, deadline_s=4.0)
    assert plan.counted == [1, 3]
    assert plan.end_s == 4.0  # fewer than k arrived: the server waited for the deadline


def test_equal_arrival_times_break_ties_by_selection_order():
    plan = plan_round([9, 8, 7], [1.0, 1.0, 1.0], t0=0.0, k=2, deadline_s=None)
    assert plan.counted == [9, 8]


def test_a_task_that_never_arrives_is_not_counted():
    # client 2's device goes offline (arrival inf): with k=2 the round waits for client 3
    plan = plan_round([1, 2, 3], [1.0, float("inf"), 6.0], t0=0.0, k=2, deadline_s=None)
    assert plan.counted == [1, 3]
    assert plan.end_s == 6.0


def test_without_a_deadline_a_lost_task_is_never_counted():
    # all three selected, k = 3, no deadline: the lost one (inf) must not be counted, and
    # the round ends at the last real arrival, not at infinity
    plan = plan_round([1, 2, 3], [5.0, float("inf"), 7.0], t0=0.0, k=3, deadline_s=None)
    assert plan.counted == [1, 3]
    assert plan.end_s == 7.0
