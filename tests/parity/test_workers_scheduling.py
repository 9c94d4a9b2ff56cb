"""The scheduler on real workers: a worker slowed 3x (``runtime.slowdown=1,3``, which
the server sends to the workers at join) is measured about 3x slower per unit of work
and, once measured, given less of it."""

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
    "runtime.slowdown=1,3",
]


def test_a_slowed_worker_is_measured_slower_and_given_less_work(tmp_path):
    history = run(resolve(apply_overrides(load_config_source("quickstart"), OVERRIDES)))
    first, last = history.records[0], history.records[-1]
    # Round 1: no speeds yet, so the work is split evenly by units (LPT on equal speeds:
    # within the largest client's size of each other).
    u1, u2 = first["worker_units"]
    assert abs(u1 - u2) <= max(u1, u2) / 2
    # Seconds per unit: worker 2 sleeps twice its compute time after computing, so ~3x
    # worker 1's. Both compute on one core each; 1.8 leaves room for timing noise.
    spu = [b / u for b, u in zip(first["worker_busy_s"], first["worker_units"], strict=True)]
    assert spu[1] / spu[0] > 1.8, spu
    # From round 2 on the slow worker gets about a quarter of the work (1/(1+3)).
    u1, u2 = last["worker_units"]
    assert u2 < 0.45 * (u1 + u2), (u1, u2)
