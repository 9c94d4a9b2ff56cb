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

import functools
import threading
import time

import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

import torch
from _deploy_helpers import FAST

from roost.algorithms import ALGORITHMS
from roost.clock import WallClock
from roost.config import RunConfig
from roost.data import build_dataset
from roost.deploy.auth import AllowList, NodeKey, Verifier
from roost.deploy.client import ClientConfig, NodeClient
from roost.deploy.coordinator import EngineCoordinator
from roost.deploy.node import NodeWorker
from roost.deploy.server import DeployServer
from roost.engine import Engine
from roost.engine.remote import ConnectedNodes
from roost.models import MODELS, build_model
from roost.params import ParamLayout
from roost.runtime.base import Job
from roost.runtime.capture import CapturingAlgorithm
from roost.runtime.local import LocalRuntime, LocalRuntimeConfig
from roost.state import InMemoryStateStore
from roost.system import HomogeneousConfig
from roost.system.model import HomogeneousSystem

CLIENTS = 4


def _parts(algorithm: str, params: dict[str, object], seed: int):  # type: ignore[no-untyped-def]
    data = build_dataset("digits", {}, "iid", {}, CLIENTS, seed)
    cfg = ALGORITHMS.config(algorithm, {"batch_size": 10, "lr": 0.1, **params})
    alg = ALGORITHMS.get(algorithm).factory(cfg)
    model = MODELS.config("mlp", {"hidden": (16,)})
    build = functools.partial(build_model, "mlp", model, data.info)
    torch.manual_seed(seed)
    module = build()
    init = ParamLayout.of(module).flatten_module(module)
    return data, alg, build, init


def _engine(run: RunConfig, algorithm: str, params: dict[str, object], **kw):  # type: ignore[no-untyped-def]
    data, alg, build, init = _parts(algorithm, params, run.seed)
    strategy = alg.make_strategy()
    strategy.initialize(init, data.num_clients)
    runtime = LocalRuntime(LocalRuntimeConfig())
    runtime.start(Job(alg, data, build, InMemoryStateStore()))
    system = kw.pop("system", None) or HomogeneousSystem(HomogeneousConfig())
    return Engine(
        run=run,
        algorithm=alg,
        strategy=strategy,
        runtime=runtime,
        dataset=data,
        system=system,
        num_params=init.numel(),
        state_store=None,
        **kw,
    )


def _deployed(run: RunConfig, algorithm: str, params: dict[str, object]) -> Engine:
    """The run served on loopback, with CLIENTS nodes (threads), each its own key."""
    clock = WallClock()
    fleet = EngineCoordinator(clock, CLIENTS, task_timeout_s=120.0)
    keys = [NodeKey.generate(f"node-{i}") for i in range(CLIENTS)]
    allow = AllowList({k.node_id: k.public_bytes for k in keys})
    engine = _engine(
        run, algorithm, params, system=ConnectedNodes(fleet, CLIENTS), clock=clock, remote=fleet
    )
    stop = threading.Event()
    errors: list[BaseException] = []
    with DeployServer(fleet, Verifier(allow)) as server:
        threads = []
        for i, key in enumerate(keys):
            data, alg, build, _ = _parts(algorithm, params, run.seed)  # the node's own copy
            capture = CapturingAlgorithm(alg)
            runtime = LocalRuntime(LocalRuntimeConfig())
            runtime.start(Job(capture, data, build, InMemoryStateStore()))  # type: ignore[arg-type]
            client = NodeClient(
                server.address,
                key,
                num_examples=data.num_examples(i),
                properties={"client_id": i},
                config=ClientConfig(backoff=FAST),
            )
            worker = NodeWorker(client, runtime, capture, i)

            def work(w: NodeWorker = worker) -> None:
                try:
                    w.run(stop)
                except BaseException as e:  # reported by the test below
                    errors.append(e)

            threads.append(threading.Thread(target=work, daemon=True))
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30  # the same participation: every node is there
        while not fleet.connected(CLIENTS).all() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fleet.connected(CLIENTS).all()
        try:
            engine.history = engine.run()  # type: ignore[attr-defined]
        finally:
            stop.set()
            for t in threads:
                t.join(10)
    assert not errors, errors
    return engine


def test_fedavg_deployed_equals_fedavg_simulated() -> None:
    """3 synchronous FedAvg rounds of all 4 clients: every round waits for its 4 nodes,
    each trains the same task (payload, data, seed) as in simulation; the models agree."""
    run = RunConfig(rounds=3, clients=CLIENTS, clients_per_round=CLIENTS, eval_every=0, seed=2)
    sim = _engine(run, "fedavg", {})
    sim_history = sim.run()
    dep = _deployed(run, "fedavg", {})
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
    sim = _engine(run, "fedbuff", params)
    sim_history = sim.run()
    dep = _deployed(run, "fedbuff", params)
    history = dep.history  # type: ignore[attr-defined]
    assert [r["clients"] for r in history.records] == [2, 2, 2]
    assert [r["staleness_max"] for r in history.records] == [0, 0, 0]
    assert dep.strategy.version == sim.strategy.version == 3
    for got, want in zip(history.records, sim_history.records, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-6)
    diff = (dep.strategy.params - sim.strategy.params).abs().max().item()
    assert diff <= 1e-6, diff
