"""Every registered algorithm runs on the local runtime and checkpoints completely.

For each algorithm: two server steps run end to end with finite parameters (a step of a
synchronous method folds the round's 4 clients; of an asynchronous one, the arrivals it
steps on: 1 for FedAsync, K for FedBuff); and one step,
``state_dict``, a fresh strategy loading it, then a second round, gives exactly the model
of two uninterrupted rounds (so a resumed run is the same run).
"""

import pytest
import torch

from roost.algorithms.asynchronous import AsyncStrategy
from roost.algorithms.base import ALGORITHMS
from roost.build import build_parts
from roost.config import apply_overrides, load_config_source, resolve
from roost.runner import resume, run

SMALL = ["clients=12", "clients_per_round=4", "model.hidden=8", "eval_every=0"]
# settings an algorithm needs on that small model: deprune's budgets fit in its 8 channels
FITS = {"deprune": ["algorithm.prune_1_budget=4", "algorithm.prune_2_budget=2"]}


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_algorithm_runs_and_resumes_exactly(name, tmp_path):
    overrides = [*SMALL, f"algorithm={name}", "algorithm.batch_size=16", *FITS.get(name, [])]
    full = resolve(apply_overrides(load_config_source("quickstart"), [*overrides, "rounds=2"]))
    history = run(full, tmp_path / "full")
    algorithm = ALGORITHMS.get(name).factory(full.config("algorithm"))
    algorithm.bind_model(build_parts(full).build_module())  # as the runner does
    strategy = algorithm.make_strategy()
    per_step = strategy.arrivals_per_step if isinstance(strategy, AsyncStrategy) else 4
    assert [r["clients"] for r in history.records] == [per_step, per_step]
    assert history.final["loss"] is not None and history.final["loss"] < 10

    def stop_after_first(record):
        if record["round"] == 1:
            return True, {}
        return False, {}

    run(full, tmp_path / "cut", callbacks=[stop_after_first])
    resume(tmp_path / "cut")
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["strategy"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["strategy"]
    assert torch.isfinite(a["params"]).all()
    assert torch.equal(a["params"], b["params"])
