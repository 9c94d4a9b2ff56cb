"""The workers runtime computes the job it is given, not a run rebuilt from a config."""

from __future__ import annotations

import subprocess
import sys

import torch
from _async_helpers_path import make_engine

from roost.config import RunConfig
from roost.runtime.workers import WorkersRuntime, WorkersRuntimeConfig
from roost.system import HeterogeneousConfig, HeterogeneousSystem


def test_the_runtime_does_not_import_the_assembly_layer():
    """runtime -> build/config was an import cycle (config -> runtime -> workers ->
    worker_process -> build -> config): the runtime now imports neither."""
    code = (
        "import sys, roost.runtime.workers, roost.runtime.worker_process; "
        "print(sorted(m for m in ('roost.build', 'roost.config') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_programmatic_engine_on_workers_computes_its_own_job():
    """An Engine assembled by hand (FedAvg with lr 0.123, a setting no preset has) on two
    worker processes: the workers receive the job's own algorithm and dataset, so the
    model equals the local runtime's (float64 sums: to the last bits, rtol 1e-5)."""
    run = RunConfig(rounds=2, clients=12, clients_per_round=4, eval_every=0)
    system = HeterogeneousSystem(HeterogeneousConfig(), seed=0)
    params = {"lr": 0.123}
    local, _ = make_engine(run, system, "fedavg", params)
    local.run()
    runtime = WorkersRuntime(WorkersRuntimeConfig(workers=2, device="cpu"))
    try:
        workers, _ = make_engine(run, system, "fedavg", params, runtime=runtime)
        workers.run()
    finally:
        runtime.close()
    torch.testing.assert_close(workers.strategy.params, local.strategy.params, rtol=1e-5, atol=1e-6)
