"""Roost's W3 (asynchronous FedBuff) trains exactly the floor's tasks, in the same order.

WORKLOADS.md fixes every random stream of W3: the first 100 dispatches, every refill, every
duration. The floor (benchmarks/w3_floor.py) is written from WORKLOADS.md without importing
Roost: a heap of arrivals, each task trained when it arrives from its version's snapshot.
Same clients from the same versions, the same SGD and the same staleness weights mean the
final models agree up to float rounding of the buffer sums (float64 in Roost, float32 in
the floor), so the final test losses agree to 1e-5 (WORKLOADS.md's criterion).
"""

import importlib.util
from pathlib import Path

import pytest

from roost.config import apply_overrides, load_config_source, resolve
from roost.runner import run

FLOOR = Path(__file__).resolve().parents[2] / "benchmarks" / "w3_floor.py"


def _floor_module():
    spec = importlib.util.spec_from_file_location("w3_floor", FLOOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_w3_mlp_final_loss_equals_the_floor():
    floor = _floor_module().run_floor("mlp")
    history = run(resolve(apply_overrides(load_config_source("w3"), ["model=mlp"])))
    final = history.final
    assert final["round"] == 50
    assert sum(history.series("clients")) == floor["arrivals"] == 500  # 50 steps of K = 10
    assert abs(final["loss"] - floor["final_loss"]) <= 1e-5
    staleness = [r["staleness_mean"] for r in history.records]
    mean = sum(staleness) / len(staleness)  # every step folds 10 arrivals: mean of means
    assert mean == pytest.approx(floor["mean_staleness"], abs=1e-12)
    assert 6 < mean < 8  # WORKLOADS.md: "mean staleness about 7"
