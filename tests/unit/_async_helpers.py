"""Small engines for the event-loop tests: digits clients, a tiny MLP, and a system model
whose per-client durations and offline times are given by hand."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np
import torch

from roost.algorithms.base import ALGORITHMS, Strategy
from roost.config import RunConfig
from roost.data import build_dataset
from roost.engine import Engine
from roost.models import MODELS, build_model
from roost.params import ParamLayout
from roost.runtime.base import Job, Runtime
from roost.runtime.local import LocalRuntime
from roost.state import InMemoryStateStore
from roost.system.model import SystemModel, TaskTiming


class HandSystem(SystemModel):
    """Client k's task lasts ``durations[k]`` seconds; client k is offline from
    ``offline_from[k]`` on (its task is lost if that falls before its arrival)."""

    def __init__(self, durations: Mapping[int, float], offline_from: Mapping[int, float] = {}):
        self.durations = dict(durations)
        self.offline_from = dict(offline_from)

    def timing(self, client_id, start_s, work_examples, down_bytes, up_bytes):
        end = start_s + self.durations[client_id]
        off = self.offline_from.get(client_id, math.inf)
        lost = off if start_s <= off < end else None
        return TaskTiming(start_s, start_s, end, end, lost)

    def available(self, client_ids, t):
        return np.array([t < self.offline_from.get(int(c), math.inf) for c in client_ids], bool)

    def next_available_s(self, client_ids, t):
        return t if self.available(client_ids, t).any() else math.inf

    def min_task_time_s(self, work_examples, down_bytes, up_bytes):
        return min(self.durations.values())


class CountingRuntime(LocalRuntime):
    """The local runtime with a chosen batch hint, counting the tasks it computes."""

    def __init__(self, batch_hint: int = 1) -> None:
        super().__init__()
        self.batch_hint = batch_hint
        self.computed: list[list[int]] = []

    def execute(self, tasks, payloads, num_groups=1, defer_state=False, answers=None):
        self.computed.append([t.client_id for t in tasks])
        return super().execute(tasks, payloads, num_groups, defer_state, answers)


def make_engine(
    run: RunConfig,
    system: SystemModel,
    algorithm: str = "fedbuff",
    params: Mapping[str, object] | None = None,
    strategy: Strategy | None = None,
    runtime: Runtime | None = None,
    partition: str = "iid",
) -> tuple[Engine, Runtime]:
    """An engine on ``run.clients`` digits clients with a 64-16-10 MLP (seeded init)."""
    data = build_dataset("digits", {}, partition, {}, run.clients, run.seed)
    cfg = ALGORITHMS.config(algorithm, {"batch_size": 10, "lr": 0.1, **(params or {})})
    alg = ALGORITHMS.get(algorithm).factory(cfg)
    model_cfg = MODELS.config("mlp", {"hidden": (16,)})
    build = functools.partial(build_model, "mlp", model_cfg, data.info)  # picklable

    torch.manual_seed(run.seed)
    module = build()
    layout = ParamLayout.of(module)
    strategy = strategy or alg.make_strategy()
    strategy.initialize(layout.flatten_module(module), data.num_clients)
    runtime = runtime or CountingRuntime()
    store = InMemoryStateStore()
    runtime.start(Job(alg, data, build, store))
    engine = Engine(
        run=run,
        algorithm=alg,
        strategy=strategy,
        runtime=runtime,
        dataset=data,
        system=system,
        num_params=layout.numel,
        state_store=store,
    )
    return engine, runtime
