"""The workers runtime against the local oracle.

Same seed, same clients, same minibatches: the only difference a worker process may make
is the order in which the clients' results are summed (each worker pre-sums its clients,
then one reduce adds the workers). Sums are float64 (see Contribution), so the float32
means agree except at rare rounding ties, a few ulps; we allow rtol 1e-5, atol 1e-6 on the
final parameters, and test-set accuracies within one example. SCAFFOLD also carries client
state, shipped with the tasks (memory store) or read by the workers from the shared file
(disk store).
"""

from __future__ import annotations

import pytest
import torch

from roost.config import apply_overrides, load_config_source, resolve
from roost.runner import run

BASE = ["clients=24", "clients_per_round=7", "rounds=3", "model.hidden=16", "eval_every=1"]


def _final(tmp_path, name, overrides):
    cfg = resolve(apply_overrides(load_config_source("quickstart"), [*BASE, *overrides]))
    history = run(cfg, tmp_path / name)
    params = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["strategy"]["params"]
    return history, params


@pytest.mark.parametrize(
    ("algorithm", "state_store"),
    [("fedavg", "memory"), ("fedadam", "memory"), ("scaffold", "memory"), ("scaffold", "disk")],
)
def test_workers_match_local(tmp_path, algorithm, state_store):
    common = [f"algorithm={algorithm}", f"state_store={state_store}"]
    local_h, local_p = _final(tmp_path, "local", common)
    test_examples = 360  # digits: 1,797 examples, 20% held out, stratified
    for n in (2, 3):
        h, p = _final(tmp_path, f"w{n}", [*common, "runtime=workers", f"workers={n}"])
        torch.testing.assert_close(p, local_p, rtol=1e-5, atol=1e-6)
        for a, b in zip(h.records, local_h.records, strict=True):
            assert a["clients"] == b["clients"]
            assert a["virtual_time_s"] == b["virtual_time_s"]
            assert abs(a["accuracy"] - b["accuracy"]) <= 1 / test_examples
        assert len(h.final["worker_busy_s"]) == n
