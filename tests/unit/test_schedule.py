"""Scheduler: LPT / earliest-finish placement, EMA speeds, baselines; numbers worked by hand."""

import json

import numpy as np
import pytest

from roost.runtime.schedule import (
    Assignment,
    Scheduler,
    ideal_makespan,
    makespan,
    round_robin,
)


def test_lpt_on_two_identical_workers():
    # Sorted: 7(t0) 5(t1) 4(t2) 3(t3) 3(t4) 2(t5); spu = 1 on both (nothing observed).
    # t0 -> w0 (7 vs 7, tie -> lower id)  loads [7, 0]
    # t1 -> w1 (12 vs 5)                  loads [7, 5]
    # t2 -> w1 (11 vs 9)                  loads [7, 9]
    # t3 -> w0 (10 vs 12)                 loads [10, 9]
    # t4 -> w1 (13 vs 12)                 loads [10, 12]
    # t5 -> w0 (12 vs 14)                 loads [12, 12]
    plan = Scheduler(2).plan([7, 5, 4, 3, 3, 2])
    assert plan == Assignment([[0, 3, 5], [1, 2, 4]], [12.0, 12.0], 12.0)
    assert plan.predicted_makespan_s == ideal_makespan([7, 5, 4, 3, 3, 2], [1.0, 1.0])


def test_equal_sizes_go_in_index_order_and_ties_to_lower_worker():
    # 2,2,2: t0 -> w0 (tie), t1 -> w1 (4 vs 2), t2 -> w0 (4 vs 4, tie).
    plan = Scheduler(2).plan([2, 2, 2])
    assert plan.per_worker == [[0, 2], [1]]
    assert plan.predicted_finish_s == [4.0, 2.0]


def test_more_workers_than_tasks_and_no_tasks():
    plan = Scheduler(3).plan([1.0, 5.0])
    assert plan.per_worker == [[1], [0], []]
    assert plan.predicted_finish_s == [5.0, 1.0, 0.0]
    empty = Scheduler(2).plan([])
    assert empty == Assignment([[], []], [0.0, 0.0], 0.0)


def test_slow_worker_gets_less_work():
    sched = Scheduler(2)
    sched.observe(0, units=1.0, seconds=1.0)
    sched.observe(1, units=1.0, seconds=2.0)  # half speed
    assert sched.seconds_per_unit == [1.0, 2.0]
    # Sorted: 6(t0) 4(t1) 2(t2) 2(t3).
    # t0 -> w0 (6 vs 12)   finish [6, 0]
    # t1 -> w1 (10 vs 8)   finish [6, 8]
    # t2 -> w0 (8 vs 12)   finish [8, 8]
    # t3 -> w0 (10 vs 12)  finish [10, 8]
    units = [6, 4, 2, 2]
    plan = sched.plan(units)
    assert plan == Assignment([[0, 2, 3], [1]], [10.0, 8.0], 10.0)
    span, busy = makespan(plan.per_worker, units, [1.0, 2.0])
    assert (span, busy) == (10.0, [10.0, 8.0])
    assert ideal_makespan(units, [1.0, 2.0]) == pytest.approx(14 / 1.5)  # 9.333


def test_ema_update():
    sched = Scheduler(1, smoothing=0.3)
    sched.observe(0, units=10, seconds=20)  # first observation sets it: 2.0
    assert sched.seconds_per_unit == [2.0]
    sched.observe(0, units=5, seconds=5)  # 0.7 * 2.0 + 0.3 * 1.0 = 1.7
    assert sched.seconds_per_unit == [pytest.approx(1.7)]
    sched.observe(0, units=0, seconds=3)  # zero units: ignored
    assert sched.seconds_per_unit == [pytest.approx(1.7)]
    sched.observe(0, units=4, seconds=12)  # 0.7 * 1.7 + 0.3 * 3.0 = 2.09
    assert sched.seconds_per_unit == [pytest.approx(2.09)]
    assert sched.observations == [3]


def test_smoothing_one_keeps_only_the_latest():
    sched = Scheduler(1, smoothing=1.0)
    sched.observe(0, 2, 8)
    sched.observe(0, 2, 3)
    assert sched.seconds_per_unit == [1.5]


def test_unobserved_workers_inherit_the_mean():
    sched = Scheduler(3)
    assert sched.seconds_per_unit == [1.0, 1.0, 1.0]
    sched.observe(0, units=1, seconds=2)
    assert sched.seconds_per_unit == [2.0, 2.0, 2.0]
    sched.observe(2, units=2, seconds=8)
    assert sched.seconds_per_unit == [2.0, 3.0, 4.0]  # w1 = mean(2, 4)


def test_round_robin_baseline():
    units = [7, 5, 4, 3, 3, 2]
    rr = round_robin(units, 2)
    assert rr == [[0, 2, 4], [1, 3, 5]]
    assert makespan(rr, units, [1.0, 1.0]) == (14.0, [14.0, 10.0])  # LPT gets 12
    assert round_robin(range(5), 3) == [[0, 3], [1, 4], [2]]
    assert round_robin([1.0], 3) == [[0], [], []]


def test_ideal_makespan():
    assert ideal_makespan([7, 5, 4, 3, 3, 2], [1.0, 1.0]) == 12.0
    assert ideal_makespan([3, 3], [1.0, 1.0, 1.0, 2.0]) == pytest.approx(6 / 3.5)
    assert ideal_makespan([], [1.0]) == 0.0


def test_state_dict_round_trip_survives_json():
    sched = Scheduler(3, smoothing=0.5)
    sched.observe(0, 2, 3)
    sched.observe(0, 1, 2)  # 0.5 * 1.5 + 0.5 * 2 = 1.75
    sched.observe(2, 1, 4)
    state = json.loads(json.dumps(sched.state_dict()))
    resumed = Scheduler(3, smoothing=0.5)
    resumed.load_state_dict(state)
    assert resumed.seconds_per_unit == sched.seconds_per_unit == [1.75, 2.875, 4.0]
    assert resumed.observations == [2, 0, 1]
    units = [5, 1, 4, 2, 2, 3]
    assert resumed.plan(units) == sched.plan(units)
    resumed.observe(1, 1, 1)  # w1 was unobserved: its first observation sets it
    assert resumed.seconds_per_unit[1] == 1.0
    with pytest.raises(ValueError, match="num_workers"):
        Scheduler(2).load_state_dict(state)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: Scheduler(0), "num_workers"),
        (lambda: Scheduler(2, smoothing=0.0), "smoothing"),
        (lambda: Scheduler(2, smoothing=1.5), "smoothing"),
        (lambda: Scheduler(2).plan([1.0, -1.0]), "units"),
        (lambda: Scheduler(2).plan([float("nan")]), "units"),
        (lambda: Scheduler(2).observe(0, -1.0, 1.0), "units"),
        (lambda: Scheduler(2).observe(0, 1.0, -1.0), "seconds"),
        (lambda: Scheduler(2).observe(2, 1.0, 1.0), "worker"),
        (lambda: round_robin([1.0], 0), "num_workers"),
        (lambda: round_robin([-1.0], 2), "units"),
        (lambda: makespan([[0]], [1.0], [1.0, 1.0]), "per_worker"),
        (lambda: makespan([[1]], [1.0], [1.0]), "per_worker"),
        (lambda: ideal_makespan([1.0], [0.0]), "seconds_per_unit"),
    ],
)
def test_validation_names_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_learned_lpt_is_near_ideal_and_beats_round_robin():
    """100 lognormal(sigma=1) tasks, 4 workers, worker 3 at half speed.

    Three warm-up rounds of plan + observe() with the true times x lognormal(0.05) noise
    teach the speeds; then one scored round. Observed with seed 0: learned spu
    [1.021, 0.993, 0.987, 1.934] (true [1, 1, 1, 2]); LPT makespan 47.62 s, ideal 46.39 s
    (ratio 1.027, predicted 46.22 s), round robin 85.78 s (1.85x ideal).
    """
    rng = np.random.default_rng(0)
    true_spu = [1.0, 1.0, 1.0, 2.0]
    sched = Scheduler(4)
    for _ in range(3):
        units = rng.lognormal(0.0, 1.0, 100)
        for w, tasks in enumerate(sched.plan(units).per_worker):
            for i in tasks:
                noise = rng.lognormal(0.0, 0.05)
                sched.observe(w, units[i], units[i] * true_spu[w] * noise)
    assert sched.seconds_per_unit == pytest.approx(true_spu, rel=0.1)

    units = rng.lognormal(0.0, 1.0, 100)
    plan = sched.plan(units)
    assert sorted(i for tasks in plan.per_worker for i in tasks) == list(range(100))
    lpt, busy = makespan(plan.per_worker, units, true_spu)
    rr, _ = makespan(round_robin(units, 4), units, true_spu)
    ideal = ideal_makespan(units, true_spu)
    assert ideal <= lpt <= 1.15 * ideal
    assert rr > lpt
    assert busy[3] / true_spu[3] < min(busy[:3])  # units: the slow worker gets the fewest
    assert plan.predicted_makespan_s == pytest.approx(lpt, rel=0.1)
