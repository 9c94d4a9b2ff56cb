"""The engine on a wall clock with its tasks trained by real nodes over loopback gRPC,
against the same run simulated (issue 9, item 5: the same algorithm code, proved).

Each node is its own identity (key pair on the server's allow-list) and channel, holds its
client's data and state, and trains with the algorithm's own ``update`` through the local
runtime; the server's engine folds the results it receives. Simulation folds a synchronous
round's results in selection order, deployment in arrival order: both sum in float64, so
the float32 models agree up to the last bit (the tests allow 1e-6 absolute; they are
usually bit-identical).
"""

from __future__ import annotations

import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

from _loopback import CLIENTS, deployed, engine

from roost.config import RunConfig


def test_fedavg_deployed_equals_fedavg_simulated() -> None:
    """3 synchronous FedAvg rounds of all 4 clients: every round waits for its 4 nodes,
    each trains the same task (payload, data, seed) as in simulation; the models agree."""
    run = RunConfig(rounds=3, clients=CLIENTS, clients_per_round=CLIENTS, eval_every=0, seed=2)
    sim = engine(run, "fedavg", {})
    sim_history = sim.run()
    dep = deployed(run, "fedavg", {})
    history = dep.history  # type: ignore[attr-defined]
    assert [r["clients"] for r in history.records] == [4, 4, 4]
    assert [r["round"] for r in history.records] == [1, 2, 3]
    assert dep.strategy.version == sim.strategy.version == 3
    diff = (dep.strategy.params - sim.strategy.params).abs().max().item()
    assert diff <= 1e-6, diff
    # the train losses the nodes measured are the simulation's (same tasks, same bits)
    for got, want in zip(history.records, sim_history.records, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-6)
    assert [r["bytes_up"] for r in history.records] == [r["bytes_up"] for r in sim_history.records]


def test_fedbuff_deployed_one_at_a_time_equals_simulation() -> None:
    """FedBuff with one task in flight and a buffer of 2: the order of arrivals is the
    order of dispatch on both sides, and every dispatch draws its client from the same
    stream (seed, 6, j) among the same idle clients, so the deployed run trains the same
    6 tasks as the simulated one and ends on the same model. (With one task in flight
    every result is fresh: the refill after the first arrival of a buffer still starts
    from the version that buffer will step, so staleness is 0 throughout.)"""
    params = {"buffer_size": 2, "concurrency": 1}
    run = RunConfig(rounds=3, clients=CLIENTS, clients_per_round=1, eval_every=0, seed=1)
    sim = engine(run, "fedbuff", params)
    sim_history = sim.run()
    dep = deployed(run, "fedbuff", params)
    history = dep.history  # type: ignore[attr-defined]
    assert [r["clients"] for r in history.records] == [2, 2, 2]
    assert [r["staleness_max"] for r in history.records] == [0, 0, 0]
    assert dep.strategy.version == sim.strategy.version == 3
    for got, want in zip(history.records, sim_history.records, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-6)
    diff = (dep.strategy.params - sim.strategy.params).abs().max().item()
    assert diff <= 1e-6, diff
