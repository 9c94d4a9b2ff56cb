"""The engine in virtual time: durations, over-selection, deadlines, per-client delivery."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from roost.algorithms.base import ALGORITHMS, Contribution, Strategy
from roost.config import RunConfig
from roost.data import build_dataset
from roost.engine import Engine
from roost.errors import RoostWarning
from roost.models import MODELS, build_model
from roost.params import ParamLayout
from roost.runtime.base import Job, Task
from roost.runtime.local import LocalRuntime
from roost.state import InMemoryStateStore
from roost.system import HeterogeneousConfig, HeterogeneousSystem, HomogeneousConfig
from roost.system.model import HomogeneousSystem


class RecordingRuntime(LocalRuntime):
    """The local runtime, remembering which clients it was asked to compute."""

    def __init__(self) -> None:
        super().__init__()
        self.computed: list[list[int]] = []

    def execute(self, tasks, payloads, num_groups=1):
        self.computed.append([t.client_id for t in tasks])
        return super().execute(tasks, payloads, num_groups)


def _engine(run: RunConfig, system, algorithm="fedavg", strategy: Strategy | None = None):
    data = build_dataset("digits", {}, "iid", {}, run.clients, run.seed)
    alg = ALGORITHMS.get(algorithm).factory(ALGORITHMS.config(algorithm, {"batch_size": 10}))
    model_cfg = MODELS.config("mlp", {"hidden": (16,)})

    def build():
        return build_model("mlp", model_cfg, data.info)

    torch.manual_seed(run.seed)
    module = build()
    layout = ParamLayout.of(module)
    strategy = strategy or alg.make_strategy()
    strategy.initialize(layout.flatten_module(module))
    runtime = RecordingRuntime()
    runtime.start(Job(alg, data, build, InMemoryStateStore()))
    engine = Engine(
        run=run,
        algorithm=alg,
        strategy=strategy,
        runtime=runtime,
        dataset=data,
        system=system,
        num_params=layout.numel,
    )
    return engine, runtime, data, layout.numel


def test_round_time_is_download_compute_upload_of_the_slowest_client():
    system = HomogeneousSystem(
        HomogeneousConfig(seconds_per_example=0.01, uplink_mbps=8.0, downlink_mbps=16.0)
    )
    run = RunConfig(rounds=1, clients=20, clients_per_round=4, eval_every=0)
    engine, runtime, data, numel = _engine(run, system)
    history = engine.run()
    nbytes = 4 * numel
    # Every device is the reference one: the slowest is the one with the most examples.
    n_max = max(data.num_examples(c) for c in runtime.computed[0])
    expected = 8 * nbytes / 16e6 + n_max * 1 * 0.01 + 8 * nbytes / 8e6
    assert history.final["virtual_time_s"] == pytest.approx(expected, rel=1e-12)
    assert history.final["clients"] == 4 and history.final["dropped"] == 0


def test_over_selection_computes_only_the_first_arrivals():
    system = HeterogeneousSystem(HeterogeneousConfig(speed_sigma=1.0), seed=0)
    run = RunConfig(rounds=2, clients=40, clients_per_round=5, over_selection=1.0)
    engine, runtime, data, numel = _engine(run, system)
    payload_bytes = 4 * numel
    history = engine.run()
    for r, computed in enumerate(runtime.computed, start=1):
        rng = np.random.default_rng([0, 4, r])
        selected = [int(c) for c in rng.choice(40, size=10, replace=False)]
        times = {
            c: system.task_time_s(c, data.num_examples(c), payload_bytes, payload_bytes)
            for c in selected
        }
        fastest = sorted(selected, key=lambda c: times[c])[:5]
        # the runtime saw exactly the 5 earliest arrivals, in selection order
        assert computed == [c for c in selected if c in fastest]
    assert [rec["dropped"] for rec in history.records] == [5, 5]


def test_a_deadline_nobody_meets_leaves_the_model_and_advances_to_the_deadline():
    system = HomogeneousSystem(HomogeneousConfig(seconds_per_example=1.0))
    run = RunConfig(rounds=2, clients=10, clients_per_round=3, deadline_s=0.5, eval_every=0)
    engine, runtime, _, _ = _engine(run, system)
    before = engine.strategy.params.clone()
    with pytest.warns(RoostWarning, match=r"^round 1: none of the 3 selected clients") as caught:
        history = engine.run()
    assert len(caught) == 1  # once per run, not once per empty round
    assert runtime.computed == [[], []]
    assert torch.equal(engine.strategy.params, before)
    assert [rec["virtual_time_s"] for rec in history.records] == [0.5, 1.0]
    assert [rec["clients"] for rec in history.records] == [0, 0]


class PerClient(Strategy):
    """Records the order in which per-client contributions arrive."""

    aggregation = "per_client"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[int]] = []

    def step(self, round: int, contributions: list[Contribution]) -> dict[str, float]:
        self.seen.append([c.clients[0] for c in contributions])
        assert all(c.count == 1 for c in contributions)
        return {}


def test_per_client_strategies_receive_results_in_arrival_order():
    system = HeterogeneousSystem(HeterogeneousConfig(speed_sigma=1.0), seed=3)
    run = RunConfig(rounds=1, clients=30, clients_per_round=6, eval_every=0)
    engine, runtime, data, numel = _engine(run, system, strategy=PerClient())
    engine.run()
    computed = runtime.computed[0]
    nb = 4 * numel
    by_arrival = sorted(computed, key=lambda c: system.task_time_s(c, data.num_examples(c), nb, nb))
    assert engine.strategy.seen == [by_arrival]


def test_heterogeneous_profiles_are_seeded_per_client_and_in_range():
    a = HeterogeneousSystem(HeterogeneousConfig(), seed=1)
    b = HeterogeneousSystem(HeterogeneousConfig(), seed=1)
    c = HeterogeneousSystem(HeterogeneousConfig(), seed=2)
    assert [a.profile(i) for i in range(50)] == [b.profile(i) for i in range(50)]
    assert a.profile(0) != c.profile(0)
    speeds = np.array([a.profile(i).speed for i in range(4000)])
    # lognormal(0, 0.5): the median of speed is exp(0) = 1 and the mean exp(0.125) ≈ 1.133
    assert abs(np.median(speeds) - 1.0) < 0.05
    assert abs(speeds.mean() - math.exp(0.125)) < 0.03
    ups = [a.profile(i).uplink_mbps for i in range(500)]
    assert min(ups) >= 1.0 and max(ups) <= 20.0


def test_task_seeds_depend_only_on_seed_client_and_dispatch():
    from roost.runtime.base import task_seed

    assert task_seed(0, 5, 1) == task_seed(0, 5, 1)
    assert len({task_seed(0, c, r) for c in range(50) for r in range(1, 5)}) == 200
    assert Task(5, 1, 0, task_seed(0, 5, 1)).group == 0


def test_task_seed_mixer_is_splitmix64():
    """The reference SplitMix64 (Vigna's splitmix64.c) seeded with state 0 outputs
    0xE220A8397B1DCDAF, then 0x6E789E6AA1B965F4 (state 2·φ): the mixer is that function."""
    from roost.runtime.base import _splitmix64

    assert _splitmix64(0) == 0xE220A8397B1DCDAF
    assert _splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    # 32-bit seeds, spread over the range: 10,000 tasks of one client hit both halves evenly
    from roost.runtime.base import task_seed

    seeds = [task_seed(0, 7, d) for d in range(1, 10_001)]
    assert all(0 <= x < 2**32 for x in seeds)
    assert 4_800 < sum(x >= 2**31 for x in seeds) < 5_200  # binomial sd 50


def test_wall_time_of_an_evaluated_round_includes_its_evaluation():
    # A runtime whose evaluation takes 0.3 s: the round's wall_time_s is taken after it.
    import time

    class SlowEval(RecordingRuntime):
        def evaluate(self, params, data):
            time.sleep(0.3)
            return super().evaluate(params, data)

    run = RunConfig(rounds=1, clients=10, clients_per_round=2, eval_every=1)
    engine, _, _, _ = _engine(run, HomogeneousSystem(HomogeneousConfig()))
    slow = SlowEval()
    slow.start(engine.runtime._job)
    engine.runtime = slow
    started = time.perf_counter()
    record = engine.run().final
    assert record["accuracy"] is not None
    assert 0.3 <= record["wall_time_s"] <= time.perf_counter() - started
