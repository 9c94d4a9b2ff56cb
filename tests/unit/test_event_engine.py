"""The event loop: hand-computed asynchronous and semi-asynchronous traces, the concurrency
cap, computing ahead without waste, and the equivalences of ALGORITHMS.md §5."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _async_helpers import CountingRuntime, HandSystem, make_engine

from roost.algorithms.asynchronous import Arrival, AsyncStrategy
from roost.algorithms.base import Contribution
from roost.config import RunConfig
from roost.engine.flight import Flight, certain_prefix
from roost.runtime.base import Task
from roost.system.model import ConstantConfig, ConstantSystem, TaskTiming


class Recorder(AsyncStrategy):
    """Steps every two arrivals; first candidates first, then the largest idle id."""

    concurrency = 2
    arrivals_per_step = 2

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[Arrival] = []
        self.buffered = 0
        self.max_in_flight = 0

    def select(self, round, candidates, k, rng):
        return [int(c) for c in candidates[:k]]

    def select_idle(self, refill, idle, rng):
        return int(idle[-1])

    def accept(self, arrival: Arrival, contribution: Contribution) -> bool:
        self.arrivals.append(arrival)
        self.buffered += 1
        return self.buffered == 2

    def arrivals_until_step(self) -> int:
        return 2 - self.buffered

    def server_step(self, step: int) -> dict[str, float]:
        self.buffered = 0
        self.version += 1
        return {}


def test_a_hand_computed_three_client_trace():
    """Durations c0 1 s, c1 3 s, c2 1.5 s; c2 goes offline at t = 2; cap 2, K = 2.

    t=0   dispatch c0 (v0, due 1), c1 (v0, due 3)
    t=1   c0 arrives, τ 0; refill picks c2 (largest idle), due 2.5 but offline at 2
    t=2   c2 lost (dropout); refill: c2 is offline, so c0 (v0, due 3)
    t=3   c1 (dispatched first) arrives, τ 0 -> step 1 at t=3 (v1); then c0, τ 1;
          two refills: c1 (v1, due 6), c0 (v1, due 4)
    t=4   c0, τ 0 -> step 2 at t=4 (v2); refill c0 (v2, due 5)
    t=5   c0, τ 0; refill c0 (v2, due 6)
    t=6   c1 (dispatched before c0) arrives, τ 2 - 1 = 1 -> step 3 at t=6
    """
    strategy = Recorder()
    run = RunConfig(rounds=3, clients=3, clients_per_round=2, eval_every=0)
    system = HandSystem({0: 1.0, 1: 3.0, 2: 1.5}, offline_from={2: 2.0})
    engine, runtime = make_engine(run, system, strategy=strategy)
    launch = engine.launch

    def capped_launch(flight, payload):
        launch(flight, payload)
        strategy.max_in_flight = max(strategy.max_in_flight, len(engine.flights))

    engine.launch = capped_launch  # type: ignore[method-assign]
    history = engine.run()
    seen = [(a.client_id, a.arrived_s, a.start_version, a.staleness) for a in strategy.arrivals]
    assert seen == [
        (0, 1.0, 0, 0),
        (1, 3.0, 0, 0),
        (0, 3.0, 0, 1),
        (0, 4.0, 1, 0),
        (0, 5.0, 2, 0),
        (1, 6.0, 1, 1),
    ]
    assert history.series("virtual_time_s") == [3.0, 4.0, 6.0]
    assert history.series("dropped") == [1, 0, 0]
    assert history.series("clients") == [2, 2, 2]
    assert history.series("staleness_max") == [0, 1, 1]
    assert strategy.max_in_flight == 2  # the cap, reached and never exceeded
    # c2's lost task was never computed; everything computed was delivered
    assert sorted(c for batch in runtime.computed for c in batch) == [0, 0, 0, 0, 1, 1]


def test_semi_async_rounds_carry_late_results_with_their_staleness():
    """c0 1 s, c1 2 s, c2 5 s; deadline 3 s; 3 per round.

    Round 1 (t0 = 0): c0, c1 counted; c2 late (due 5): with carry it stays in flight;
    the round ends at the deadline, 3. Round 2 (t0 = 3): c2 is busy, so c0, c1 (due 4,
    5); the deadline is 6; c2 arrives at 5, in round 2, from version 0 at version 1.
    """
    system = HandSystem({0: 1.0, 1: 2.0, 2: 5.0})
    carry = RunConfig(
        rounds=2, clients=3, clients_per_round=3, eval_every=0, deadline_s=3.0, late_results="carry"
    )
    engine, runtime = make_engine(carry, system, algorithm="fedavg")
    h = engine.run()
    assert h.series("virtual_time_s") == [3.0, 6.0]
    assert h.series("clients") == [2, 3]
    assert h.series("late") == [0, 1]
    assert h.series("staleness_max") == [0, 1]
    assert h.series("in_flight") == [1, 0]
    assert runtime.computed == [[0, 1], [0, 1, 2]]  # c2 computed in the round it arrives

    drop = RunConfig(rounds=2, clients=3, clients_per_round=3, eval_every=0, deadline_s=3.0)
    engine, runtime = make_engine(drop, system, algorithm="fedavg")
    h = engine.run()
    assert h.series("clients") == [2, 2] and h.series("dropped") == [1, 1]
    assert runtime.computed == [[0, 1], [0, 1]]  # late tasks are never computed


def _flight(key: int, arrival: float) -> Flight:
    return Flight(key, Task(key, 1, 0, 0), TaskTiming(0.0, 0.0, arrival, arrival), 1, 1, 0, 0)


def test_certain_prefix_by_hand():
    """Pending arrivals at 1.0, 1.2, 1.9, 3.5; every slot is busy (4 tasks in flight, ending
    at those times); a new task lasts >= 1.0; now = 0.5.

    a_1 = 1.2: only the slot ending at 1.0 could yield a new arrival before it, at most
    floor(0.2 / 1.0) = 0, so X = 0 and r + X = 1 < needed.
    a_2 = 1.9: floor(0.9) + floor(0.7) = 0 -> certain when needed > 2.
    a_3 = 3.5: floor(2.5) + floor(2.3) + floor(1.6) = 5 -> r + X = 8: not certain unless
    the run needs more than 8 arrivals.
    """
    pending = [_flight(i, a) for i, a in enumerate([1.0, 1.2, 1.9, 3.5])]
    ends = [1.0, 1.2, 1.9, 3.5]

    def keys(needed, limit=10, horizon=float("inf"), free=0):
        out = certain_prefix(pending, ends, free, 0.5, needed, 1.0, horizon, limit)
        return [f.key for f in out]

    assert keys(needed=9) == [0, 1, 2, 3]
    assert keys(needed=8) == [0, 1, 2]
    assert keys(needed=2) == [0, 1]
    assert keys(needed=None) == [0]  # unknown needs: only the next arrival
    assert keys(needed=9, limit=2) == [0, 1]
    assert keys(needed=9, horizon=1.5) == [0, 1]  # a time budget ends before 1.9
    # a free slot (from now = 0.5) adds floor((a - 0.5) / 1): 1 for a = 1.9
    assert keys(needed=3, free=1) == [0, 1]


@pytest.mark.parametrize("batch_hint", [4, 32])
def test_computing_ahead_changes_nothing_and_wastes_nothing(batch_hint):
    """FedBuff on 12 clients with heterogeneous durations: computing in batches of
    certain tasks gives the same model bit for bit as computing each at its arrival, and
    computes exactly the tasks that were delivered."""
    run = RunConfig(rounds=6, clients=12, clients_per_round=4, eval_every=0)
    durations = {k: 1.0 + 0.37 * ((k * 7) % 12) for k in range(12)}
    params = {"buffer_size": 3}
    one, _ = make_engine(run, HandSystem(durations), params=params)
    h_one = one.run()
    ahead, rt = make_engine(
        run, HandSystem(durations), params=params, runtime=CountingRuntime(batch_hint)
    )
    h = ahead.run()
    assert torch.equal(ahead.strategy.params, one.strategy.params)
    assert h.series("virtual_time_s") == h_one.series("virtual_time_s")
    delivered = sum(h.series("clients"))
    assert delivered == 18  # 6 steps of K = 3
    assert sum(len(b) for b in rt.computed) == delivered
    assert max(len(b) for b in rt.computed) > 1  # it did batch


def test_fedbuff_with_the_cohort_as_buffer_equals_fedavg():
    """ALGORITHMS.md §5: K = cohort = every client, no staleness weight and equal
    latencies: every step averages all clients' models from the same version, as
    uniform FedAvg does. FedBuff adds the mean delta to w (float32 rounding of
    w + mean(y - w) against mean(y)): equal to 1e-6."""
    run = RunConfig(rounds=3, clients=5, clients_per_round=5, eval_every=0)
    system = ConstantSystem(ConstantConfig(duration_s=2.0))
    buff, _ = make_engine(run, system, params={"buffer_size": 5, "staleness": "constant"})
    h = buff.run()
    avg, _ = make_engine(run, system, algorithm="fedavg", params={"weighted": False})
    h_avg = avg.run()
    assert h.series("virtual_time_s") == h_avg.series("virtual_time_s") == [2.0, 4.0, 6.0]
    assert h.series("staleness_max") == [0, 0, 0]
    diff = (buff.strategy.params - avg.strategy.params).abs().max().item()
    assert diff < 1e-6


def test_fedasync_with_weight_one_and_one_task_in_flight_is_sequential_sgd():
    """α = 1, concurrency 1, ρ = 0: each arrival replaces the model by the client's SGD
    result from the current model, so the run is plain SGD over the clients in dispatch
    order: the first from default_rng([seed, 4, 1]), then the j-th refill
    idle[default_rng([seed, 6, j]).integers(len(idle))] with every client idle."""
    run = RunConfig(rounds=5, clients=4, clients_per_round=1, eval_every=0)
    params = {"alpha": 1.0, "rho": 0.0, "concurrency": 1, "shuffle": False, "lr": 0.1}
    engine, _ = make_engine(run, ConstantSystem(ConstantConfig()), "fedasync", params)
    w = engine.strategy.params.clone()
    engine.run()

    order = [int(np.random.default_rng([0, 4, 1]).choice(4, size=1, replace=False)[0])]
    order += [int(np.random.default_rng([0, 6, j]).integers(4)) for j in range(1, 5)]
    model = engine.runtime.model  # only to get the module shape: loaded from w below
    for cid in order:
        data = engine.dataset.client_data(cid)
        model.load_(w)
        module = model.module
        for s in range(0, len(data), 10):
            module.zero_grad()
            F.cross_entropy(module(data.x[s : s + 10]), data.y[s : s + 10]).backward()
            with torch.no_grad():
                for p in module.parameters():
                    p -= 0.1 * p.grad
        w = model.params.detach().clone()
    assert torch.allclose(engine.strategy.params, w, atol=1e-6)


PLUGIN = str(Path(__file__).resolve().parent / "fetch_plugin.py")


@pytest.mark.parametrize("runtime", ["local", "workers"])
def test_a_suspended_procedure_gets_the_model_current_at_its_request_time(runtime):
    """Each task asks for the global model halfway through its compute (W3's devices: no
    network time, so the request is at dispatch + compute / 2). The answer must be the
    version made by the steps up to that time (a step at the same instant counts: the
    answer comes after arrivals), with exactly that version's parameters; on workers the
    procedures are suspended in the worker processes and resumed there."""
    from roost.config import apply_overrides, load_config_source, resolve
    from roost.runner import run

    overrides = [
        f"imports={PLUGIN}",
        "algorithm=test_fetch",
        "system=w3",
        "rounds=12",
        "clients=20",
        "clients_per_round=4",
        "eval_every=0",
        f"runtime={runtime}",
    ]
    history = run(resolve(apply_overrides(load_config_source("quickstart"), overrides)))
    import sys

    log = sys.modules["roost_plugin_fetch_plugin"].LOG
    steps, arrivals = log["steps"], log["arrivals"]
    assert len(steps) == 13 and len(arrivals) == 12 == len(history.records)
    sums = {v: total for v, _, total in steps}
    ahead = 0
    for dispatched, compute, start, fetched, fetched_sum in arrivals:
        request = dispatched + 0.5 * compute
        current = max(v for v, t, _ in steps if t <= request)
        assert fetched == current >= start
        assert fetched_sum == sums[fetched]
        ahead += fetched > start
    assert ahead >= 4  # tasks that fetched a model newer than the one they started from


def test_a_run_stopped_by_its_time_budget_is_evaluated_at_its_last_step():
    """eval_every=0 evaluates only the last of `rounds` steps; a run that a virtual-time
    budget stops earlier must still report its final model's accuracy (constant 1 s
    tasks, K = 2 of 2 in flight: steps at t = 1, 2, 3, so a 2.5 s budget stops at 3)."""
    run = RunConfig(
        rounds=50, clients=4, clients_per_round=2, eval_every=0, virtual_time_budget_s=2.5
    )
    engine, _ = make_engine(run, ConstantSystem(ConstantConfig()), params={"buffer_size": 2})
    h = engine.run()
    assert h.series("virtual_time_s") == [1.0, 2.0, 3.0]
    assert h.final["stopped"].startswith("virtual_time_budget_s 2.5 used")
    assert h.series("accuracy")[:2] == [None, None] and h.final["accuracy"] is not None
