"""A run served on loopback gRPC with real nodes (threads, each its own key, channel,
data, state and runtime), and the same run simulated: the deployment tests' oracle.

Import only after ``pytest.importorskip("grpc")`` and ``("cryptography")``.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from _deploy_helpers import FAST

from roost.algorithms import ALGORITHMS
from roost.algorithms.base import Algorithm
from roost.clock import WallClock
from roost.config import RunConfig
from roost.data import build_dataset
from roost.data.base import FederatedDataset
from roost.deploy.auth import AllowList, NodeKey, Verifier
from roost.deploy.client import ClientConfig, NodeClient
from roost.deploy.coordinator import EngineCoordinator
from roost.deploy.node import NodeWorker
from roost.deploy.server import DeployServer
from roost.engine import Engine
from roost.engine.remote import ConnectedNodes
from roost.models import MODELS, build_model
from roost.models.cost import layer_costs
from roost.params import ParamLayout
from roost.runtime.base import Job
from roost.runtime.capture import CapturingAlgorithm
from roost.runtime.local import LocalRuntime, LocalRuntimeConfig
from roost.state import InMemoryStateStore
from roost.system import HomogeneousConfig
from roost.system.model import HomogeneousSystem

CLIENTS = 4


@dataclass
class Parts:
    data: FederatedDataset
    algorithm: Algorithm
    build: Any
    init: torch.Tensor


def parts(algorithm: str, params: dict[str, object], seed: int) -> Parts:
    """Digits in 4 iid clients, the 16-unit MLP (as the algorithm adapts it), ``algorithm``
    with batch 10, lr 0.1 and ``params``; the initial model drawn from ``seed``."""
    data = build_dataset("digits", {}, "iid", {}, CLIENTS, seed)
    cfg = ALGORITHMS.config(algorithm, {"batch_size": 10, "lr": 0.1, **params})
    alg = ALGORITHMS.get(algorithm).factory(cfg)
    model = MODELS.config("mlp", {"hidden": (16,)})
    plain = functools.partial(build_model, "mlp", model, data.info)

    def build() -> Any:  # every process builds the model the algorithm trains
        return alg.adapt_model(plain(), data.info)

    torch.manual_seed(seed)
    module = build()
    alg.bind_model(build())
    init = ParamLayout.of(module).flatten_module(module)
    return Parts(data, alg, build, init)


def engine(run: RunConfig, algorithm: str, params: dict[str, object], **kw: Any) -> Engine:
    """The run simulated (``system``, ``clock`` and ``remote`` in ``kw`` deploy it)."""
    p = parts(algorithm, params, run.seed)
    strategy = p.algorithm.make_strategy()
    strategy.clients_per_round = run.clients_per_round
    strategy.initialize(p.init, p.data.num_clients)
    runtime = LocalRuntime(LocalRuntimeConfig())
    runtime.start(Job(p.algorithm, p.data, p.build, InMemoryStateStore()))
    system = kw.pop("system", None) or HomogeneousSystem(HomogeneousConfig())
    splits = p.algorithm.splits_the_model
    return Engine(
        run=run,
        algorithm=p.algorithm,
        strategy=strategy,
        runtime=runtime,
        dataset=p.data,
        system=system,
        num_params=p.init.numel(),
        state_store=None,
        split_layers=layer_costs(p.build(), p.data.info) if splits else None,
        **kw,
    )


def deployed(run: RunConfig, algorithm: str, params: dict[str, object]) -> Engine:
    """The run served on loopback, with CLIENTS nodes (threads), each its own key. A split
    method's nodes hold the device part, the server a replica per task."""
    clock = WallClock()
    server_parts = parts(algorithm, params, run.seed)
    split = server_parts.algorithm.split_serving(server_parts.build, server_parts.data.info)
    fleet = EngineCoordinator(clock, CLIENTS, task_timeout_s=120.0, split=split)
    keys = [NodeKey.generate(f"node-{i}") for i in range(CLIENTS)]
    allow = AllowList({k.node_id: k.public_bytes for k in keys})
    dep = engine(
        run, algorithm, params, system=ConnectedNodes(fleet, CLIENTS), clock=clock, remote=fleet
    )
    stop = threading.Event()
    errors: list[BaseException] = []
    dep.workers = []  # type: ignore[attr-defined]
    with DeployServer(fleet, Verifier(allow)) as server:
        threads = []
        for i, key in enumerate(keys):
            p = parts(algorithm, params, run.seed)  # the node's own copy
            capture = CapturingAlgorithm(p.algorithm)
            runtime = LocalRuntime(LocalRuntimeConfig())
            runtime.start(Job(capture, p.data, p.build, InMemoryStateStore()))  # type: ignore[arg-type]
            client = NodeClient(
                server.address,
                key,
                num_examples=p.data.num_examples(i),
                properties={"client_id": i},
                config=ClientConfig(backoff=FAST),
            )
            node_split = p.algorithm.split_serving(p.build, p.data.info)
            worker = NodeWorker(client, runtime, capture, i, split=node_split)
            dep.workers.append(worker)  # type: ignore[attr-defined]

            def work(w: NodeWorker = worker) -> None:
                try:
                    w.run(stop)
                except BaseException as e:  # reported by the test
                    errors.append(e)

            threads.append(threading.Thread(target=work, daemon=True))
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30  # the same participation: every node is there
        while not fleet.connected(CLIENTS).all() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fleet.connected(CLIENTS).all()
        try:
            dep.history = dep.run()  # type: ignore[attr-defined]
        finally:
            stop.set()
            for t in threads:
                t.join(10)
    assert not errors, errors
    dep.coordinator = fleet  # type: ignore[attr-defined]
    return dep
