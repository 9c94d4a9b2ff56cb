"""Roost's W1 trains exactly the compute floor's clients and minibatches, in the same order.

WORKLOADS.md fixes every random stream, and the floor (benchmarks/w1_floor.py) is written
from WORKLOADS.md without importing Roost. Same clients, same minibatches, same SGD
arithmetic and the same n_i-weighted sum mean the two final models agree up to float
summation order in the evaluation, so the final test losses must agree to 1e-5.
"""

import importlib.util
from pathlib import Path

from roost.config import apply_overrides, load_config_source, resolve
from roost.runner import run

FLOOR = Path(__file__).resolve().parents[2] / "benchmarks" / "w1_floor.py"


def _floor_module():
    spec = importlib.util.spec_from_file_location("w1_floor", FLOOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_w1_mlp_final_loss_equals_the_floor():
    floor = _floor_module().run_floor("mlp", clients=1000, clients_per_round=100, rounds=5)
    history = run(resolve(apply_overrides(load_config_source("w1"), ["model=mlp"])))
    final = history.final
    assert final["round"] == 5 and final["clients"] == 100
    assert abs(final["loss"] - floor["final_loss"]) <= 1e-5
    assert final["accuracy"] == floor["final_accuracy"]
    # W1 evaluates once, after the last round, like the floor.
    assert [r["accuracy"] is not None for r in history.records] == [False] * 4 + [True]
