"""benchmarks/split.py's floor does Roost's work: on the smallest setting, SplitFed's and
PiPar's final global models equal the plain-PyTorch floor's bit for bit.

6 clients, 3 a round, 2 rounds: clients 2 and 4 take part in both rounds, so PiPar's
momentum kept per client across rounds is exercised; W1's sizes give short last
minibatches, which PiPar's 4 micro-batches split with a remainder dropped.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "split.py"


def _bench():
    spec = importlib.util.spec_from_file_location("benchmark_split", BENCH)
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name)
    if module is None:  # registered first: its dataclasses look their module up
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("algorithm", ["splitfed", "pipar"])
def test_the_floor_computes_roosts_final_model_bit_for_bit(algorithm):
    bench = _bench()
    s = bench.Setting(rounds=2, clients=6, clients_per_round=3)
    cohorts = [
        set(np.random.default_rng([s.seed, 4, r]).choice(6, 3, replace=False)) for r in (1, 2)
    ]
    assert cohorts[0] & cohorts[1]  # a client in both rounds
    c = bench.check(algorithm, s)
    assert c["numel"] == 459_210  # VGG5's 458,890 parameters and 320 BatchNorm statistics
    assert c["bit_for_bit"], c
    assert c["loss_abs_diff"] == 0.0
