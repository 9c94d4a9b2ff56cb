"""The scheduler on real workers: a worker slowed 4x (``runtime.slowdown=1,4``, which
the server sends to the workers at join) is measured slower per unit of work and, once
measured, given less of it.

Timing on a shared machine: the slowed worker sleeps 3x its own measured compute, so its
seconds per unit are 4 x c2 / c1 of the other's, where c2 / c1 is how fast the two workers'
cores happened to compute. Another busy process can make one worker compute slower than
the other (a 3x slowdown once measured 1.68x), so the bounds below hold for c2 / c1 down
to 0.5, and the ratio is the median over the rounds rather than one round's."""

from __future__ import annotations

from roost.config import apply_overrides, load_config_source, resolve
from roost.runner import run

OVERRIDES = [
    "clients=40",
    "clients_per_round=20",
    "rounds=3",
    "model.hidden=256",
    "algorithm.local_epochs=20",
    "eval_every=0",
    "runtime=workers",
    "workers=2",
    "runtime.slowdown=1,4",
    "runtime.threads=1",
]


def test_a_slowed_worker_is_measured_slower_and_given_less_work(tmp_path):
    history = run(resolve(apply_overrides(load_config_source("quickstart"), OVERRIDES)))
    first, last = history.records[0], history.records[-1]
    # Round 1: no speeds yet, so the work is split evenly by units (LPT on equal speeds:
    # within the largest client's size of each other).
    u1, u2 = first["worker_units"]
    assert abs(u1 - u2) <= max(u1, u2) / 2
    # Seconds per unit: worker 2 sleeps 3x its compute time after computing, so ~4x
    # worker 1's; > 2 leaves room for one core computing at half the other's speed.
    ratios = sorted(
        (r["worker_busy_s"][1] / r["worker_units"][1])
        / (r["worker_busy_s"][0] / r["worker_units"][0])
        for r in history.records
    )
    assert ratios[len(ratios) // 2] > 2.0, ratios
    # From round 2 on the slow worker gets about a fifth of the work (1/(1+4)); < 0.4
    # holds while it is measured at least 1.5x slower.
    u1, u2 = last["worker_units"]
    assert u2 < 0.4 * (u1 + u2), (u1, u2)
    # Round 1 has no measured speed, so no prediction in seconds; later rounds have one.
    assert first["predicted_makespan_s"] is None
    assert last["predicted_makespan_s"] > 0
