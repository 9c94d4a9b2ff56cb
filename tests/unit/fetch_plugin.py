"""A two-phase client procedure for the tests (``imports=tests/unit/fetch_plugin.py``).

Phase 1 trains one epoch; the procedure then asks for the current global model
(FetchModel) and returns exactly that model (as if it merged with weight 1), with the
fetched version and the sum of its parameters as result scalars. The server mixes every
arrival in with weight 1/2 and logs, in :data:`LOG`, each step's time and parameter sum
and each arrival's dispatch time, compute time and what it fetched, so a test can check
that the answer was the model current at the request's virtual time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from roost.algorithms.asynchronous import AsyncStrategy
from roost.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    ClientOptimConfig,
    ClientResult,
    FetchModel,
    UpdateOutput,
    register_algorithm,
)
from roost.algorithms.local_sgd import local_sgd

LOG: dict[str, list] = {"steps": [], "arrivals": []}


@dataclass(frozen=True)
class FetchConfig(ClientOptimConfig):
    request_fraction: float = 0.5


class FetchStrategy(AsyncStrategy):
    arrivals_per_step = 1

    def initialize(self, params, num_clients=0):
        super().initialize(params, num_clients)
        LOG["steps"][:] = [(0, 0.0, float(self.params.double().sum()))]
        LOG["arrivals"][:] = []

    def accept(self, arrival, contribution):
        s = contribution.scalar_sums
        LOG["arrivals"].append(
            (
                arrival.dispatched_s,
                arrival.compute_s,
                arrival.start_version,
                int(s["fetched_version"]),
                s["fetched_sum"],
            )
        )
        self._new, self._t = contribution.mean("params"), arrival.arrived_s
        return True

    def arrivals_until_step(self):
        return 1

    def server_step(self, step):
        self.params = torch.lerp(self.params, self._new, 0.5)
        self.version += 1
        LOG["steps"].append((self.version, self._t, float(self.params.double().sum())))
        return {}


if "test_fetch" not in ALGORITHMS.names():

    @register_algorithm("test_fetch")
    class FetchAlgorithm(Algorithm):
        Config = FetchConfig

        def make_strategy(self):
            return FetchStrategy()

        def request_points(self, settings=None):
            return (self.config.request_fraction,)

        def update(self, ctx, model, data, payload, state):
            local_sgd(ctx, model, data, self.config)
            fresh = yield FetchModel()
            model.load_(fresh.params)
            scalars = {
                "fetched_version": float(fresh.version),
                "fetched_sum": float(fresh.params.double().sum()),
            }
            return UpdateOutput(ClientResult({"params": model.params}, 1.0, scalars), None, {})
