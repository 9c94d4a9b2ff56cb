"""Split learning deployed (issue 10, item 5): the device part trains on the nodes, the
server part on a replica per task on the server, activations and gradients cross
loopback gRPC per micro-batch, and the run ends on the model the simulation computes.

Why the bits agree: the node and the server replica each step their own copy of the
whole flat model with SGDStepper's elementwise rule, the node's device entries and the
replica's server entries receiving exactly the gradients the simulated task's one model
receives (the same float32 operations in the same order: the device forwards micro-batch
j + 1 after the server answered j in both), and the server joins the two halves
(roost/algorithms/split_serving.py). Results are folded in float64 in arrival order, so
the models agree to the last bit up to the fold's order (1e-6 allowed, as in
test_deploy_engine.py).
"""

from __future__ import annotations

import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

from pathlib import Path

from _loopback import CLIENTS, deployed, engine, parts

from roost.config import RunConfig

# the 16-unit MLP cut after its first linear layer: flatten + Linear(64, 16) on the
# device, 64 * 16 + 16 = 1,040 float32 parameters, 4,160 bytes each way per task
DEVICE_BYTES = 4 * (64 * 16 + 16)


def _same(sim, dep, records: int) -> None:  # type: ignore[no-untyped-def]
    sim_history = sim.history
    history = dep.history
    assert len(history.records) == len(sim_history.records) == records
    diff = (dep.strategy.params - sim.strategy.params).abs().max().item()
    assert diff <= 1e-6, diff
    for got, want in zip(history.records, sim_history.records, strict=True):
        assert got["clients"] == want["clients"]
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-6)
        assert got["client_cut_bytes_up"] == want["client_cut_bytes_up"]
        # sent to the nodes, measured by the server: the device parts and every gradient
        # message, which is what the simulation's plan counts
        assert got["bytes_down"] == want["bytes_down"]
    assert not dep.coordinator._split  # every replica was released


def _simulated(run: RunConfig, algorithm: str, params: dict[str, object]):  # type: ignore[no-untyped-def]
    sim = engine(run, algorithm, params)
    sim.history = sim.run()
    return sim


def test_splitfed_deployed_equals_simulated() -> None:
    """3 SplitFed v1 rounds of the 4 clients, 2 micro-batches of 5 per minibatch,
    activations and gradients in float16: the nodes receive the device part alone
    (12 tasks x 4,160 bytes), and the run's model, losses and cut traffic are the
    simulation's; the bytes up are the device parts and every activation message (the
    simulation's plan of the same messages)."""
    run = RunConfig(rounds=3, clients=CLIENTS, clients_per_round=CLIENTS, eval_every=0, seed=3)
    params = {"cut": 2, "micro_batches": 2, "wire_dtype": "float16"}
    sim = _simulated(run, "splitfed", params)
    dep = deployed(run, "splitfed", params)
    _same(sim, dep, 3)
    assert sum(w.received_bytes for w in dep.workers) == 12 * DEVICE_BYTES
    # per minibatch of b examples, min(2, b) micro-batches of m = b // min(2, b): each
    # m float16 activations of 16 values (2 bytes) and m uint8 labels
    data = parts("splitfed", params, run.seed).data
    per_task = []
    for k in range(CLIENTS):
        n = data.num_examples(k)
        sizes = [10] * (n // 10) + ([n % 10] if n % 10 else [])
        up = sum(min(2, b) * (b // min(2, b)) * (16 * 2 + 1) for b in sizes)
        per_task.append(DEVICE_BYTES + up)
    for got, want in zip(dep.history.records, sim.history.records, strict=True):
        assert got["bytes_up"] == want["bytes_up"] == sum(per_task)


@pytest.mark.slow  # test_same_code.py serves PiPar in the default run
def test_pipar_deployed_keeps_both_halves_momentum() -> None:
    """PiPar with momentum 0.9 over 3 rounds: the device part's momentum lives in each
    node's client state, the server part's on the server per client; a lost buffer on
    either side would change rounds 2 and 3."""
    run = RunConfig(rounds=3, clients=CLIENTS, clients_per_round=CLIENTS, eval_every=0, seed=4)
    params = {"cut": 2, "micro_batches": 3, "lr": 0.05}
    sim = _simulated(run, "pipar", params)
    dep = deployed(run, "pipar", params)
    _same(sim, dep, 3)
    assert sorted(dep.coordinator.split._momentum) == list(range(CLIENTS))


@pytest.mark.slow  # test_same_code.py serves both in the default run
@pytest.mark.parametrize("algorithm", ["vanilla_sl", "splitfed_v2"])
def test_turn_taking_methods_deployed_equal_simulated(algorithm: str) -> None:
    """Vanilla split learning and SplitFed v2: one device at a time, 6 turns; each turn's
    replica starts from the server part the last turn left."""
    run = RunConfig(rounds=6, clients=CLIENTS, clients_per_round=2, eval_every=0, seed=5)
    params = {"cut": 2, "micro_batches": 2}
    sim = _simulated(run, algorithm, params)
    dep = deployed(run, algorithm, params)
    _same(sim, dep, 6)
    assert dep.strategy.version == sim.strategy.version == 6  # one server step per turn


def test_deprune_deployed_equals_simulated() -> None:
    """deprune's schedule in 3 rounds of one epoch: 4 of the bottleneck's 16 channels
    kept, a gate reset, 2 kept, a reset, then all 16. In prune mode a message is the kept
    channels in fp16 with their ids and its answer their float32 gradient alone; the
    gate penalty is the node's. The run's model, losses and bytes are the simulation's."""
    run = RunConfig(rounds=3, clients=CLIENTS, clients_per_round=CLIENTS, eval_every=0, seed=6)
    params = {
        "prune_1_budget": 4,
        "prune_2_budget": 2,
        "prune_1_epochs": 1,
        "prune_2_epochs": 1,
        "training_epochs": 1,
    }
    sim = _simulated(run, "deprune", params)
    dep = deployed(run, "deprune", params)
    _same(sim, dep, 3)
    assert [r["client_kept_channels"] for r in dep.history.records] == [4, 2, 16]
    for got, want in zip(dep.history.records, sim.history.records, strict=True):
        assert got["bytes_up"] == want["bytes_up"]
        assert got["client_gate_penalty"] == pytest.approx(want["client_gate_penalty"], abs=1e-6)


def test_resuming_a_served_pipar_run_warns_that_the_server_momentum_restarts(
    tmp_path: Path,
) -> None:
    """PiPar's server-half momentum lives in the server's memory (not in the checkpoint or
    the journal): ``roost serve --resume`` says so instead of resuming silently. The run
    resumed here has finished, so nothing else happens."""
    from roost.config import resolve
    from roost.deploy.keys import make_federation
    from roost.deployment import ServeOptions, serve
    from roost.errors import RoostWarning
    from roost.runner import run

    tree = {
        "rounds": 1,
        "clients": 2,
        "clients_per_round": 2,
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [8]},
        "algorithm": {"name": "pipar", "cut": 2, "micro_batches": 1, "batch_size": 10},
    }
    run(resolve(tree), tmp_path / "run")
    make_federation(tmp_path / "keys", 1)
    options = ServeOptions(address="127.0.0.1:0", keys=tmp_path / "keys")
    with pytest.warns(RoostWarning, match="momentum of the server part .* starts again") as got:
        serve(None, tmp_path / "run", options, resume=True)
    assert sum("not the uninterrupted one" in str(w.message) for w in got) == 1
