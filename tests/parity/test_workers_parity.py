"""The workers runtime against the local oracle.

Same seed, same clients, same minibatches: the only difference a worker process may make
is the order in which the clients' results are summed (each worker pre-sums its clients,
then one reduce adds the workers). Sums are float64 (see Contribution), so the float32
means agree except at rare rounding ties, a few ulps; we allow rtol 1e-5, atol 1e-6 on the
final parameters, and test-set accuracies within one example. SCAFFOLD also carries client
state, shipped with the tasks (memory store) or read by the workers from the shared file
(disk store).

Both topologies are checked: ``star`` (the CPU default: server <-> every worker) and
``relay`` (the GPU default: payload and sums pass through worker 1 and the workers' own
group, here gloo on the CPU, NCCL on GPUs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _runs import TEST_EXAMPLES, final_run

from roost.runtime.device import resolve_device


@pytest.mark.parametrize(
    ("algorithm", "state_store"),
    [("fedavg", "memory"), ("fedadam", "memory"), ("scaffold", "memory"), ("scaffold", "disk")],
)
def test_workers_match_local(tmp_path, algorithm, state_store):
    common = [f"algorithm={algorithm}", f"state_store={state_store}"]
    local_h, local_p = final_run(tmp_path, "local", common)
    for n, topology in ((2, "star"), (3, "star"), (3, "relay")):
        workers = ["runtime=workers", f"workers={n}", f"runtime.topology={topology}"]
        h, p = final_run(tmp_path, f"w{n}{topology}", [*common, *workers])
        torch.testing.assert_close(p, local_p, rtol=1e-5, atol=1e-6)
        for a, b in zip(h.records, local_h.records, strict=True):
            assert a["clients"] == b["clients"]
            assert a["virtual_time_s"] == b["virtual_time_s"]
            assert abs(a["accuracy"] - b["accuracy"]) <= 1 / TEST_EXAMPLES
        assert len(h.final["worker_busy_s"]) == n
        # device=auto: the CPU here; one GPU each (mod #GPUs) on a machine with CUDA.
        assert h.final["worker_devices"] == [str(resolve_device("auto", s)) for s in range(n)]


def test_per_client_strategy_gets_the_same_results_over_workers(tmp_path):
    """A coordinate-wise median (tests/parity/median_plugin.py) needs every client's own
    model: they are gathered whole from the workers, not reduced. The median of the same
    vectors does not depend on how they were grouped; what remains is the last-bit noise
    of training the same client with another number of torch threads (workers get one
    core each), within the tolerance above."""
    plugin = str(Path(__file__).with_name("median_plugin.py"))
    common = [f"imports={plugin}", "algorithm=test_median"]
    local_h, local_p = final_run(tmp_path, "local", common)
    assert local_h.records[-1]["clients_in_median"] == 7.0
    for n, topology in ((2, "star"), (3, "relay")):
        workers = ["runtime=workers", f"workers={n}", f"runtime.topology={topology}"]
        h, p = final_run(tmp_path, f"w{n}{topology}", [*common, *workers])
        torch.testing.assert_close(p, local_p, rtol=1e-5, atol=1e-6)
        for a, b in zip(h.records, local_h.records, strict=True):
            assert a["clients_in_median"] == b["clients_in_median"] == 7.0
            assert abs(a["accuracy"] - b["accuracy"]) <= 1 / TEST_EXAMPLES


@pytest.mark.parametrize(
    ("algorithm", "state_store"),
    [("fedbuff", "memory"), ("fedasmu", "memory"), ("fedasmu", "disk")],
)
def test_asynchronous_runs_have_the_local_history_on_workers(tmp_path, algorithm, state_store):
    """Asynchronous methods on 2 workers: batches of tasks certain to be delivered train
    on both workers at once (FedBuff), procedures suspended at their fetch wait in their
    worker (FedASMU, whose merge controls are client state, shipped or in the shared
    file); results are folded at delivery in the same order as on ``local``. Each result
    is a single client's, so the only difference is float64-sum rounding: rtol 1e-5."""
    common = [f"algorithm={algorithm}", f"state_store={state_store}", "rounds=12"]
    if algorithm == "fedbuff":
        common.append("algorithm.buffer_size=3")
    local_h, local_p = final_run(tmp_path, "local", common)
    h, p = final_run(tmp_path, "w2", [*common, "runtime=workers", "workers=2"])
    torch.testing.assert_close(p, local_p, rtol=1e-5, atol=1e-6)
    for key in ("clients", "virtual_time_s", "staleness_mean", "dropped"):
        assert [r[key] for r in h.records] == [r[key] for r in local_h.records], key
    # the workers' own figures reach the records (and so summary.json's memory total)
    assert len(h.final["worker_peak_rss_mb"]) == 2
