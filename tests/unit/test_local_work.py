"""Per-task local work chosen by the server: AMBLE's adaptive settings, FedProx's
stragglers, FedNova's random epochs (ALGORITHMS.md §2.3, §4.2, §4.3, §5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _async_helpers import CountingRuntime, make_engine

from roost.algorithms.amble import AMBLEConfig, amble_settings
from roost.algorithms.fedavg import FedAvgStrategy
from roost.algorithms.fedprox import DropStragglersStrategy
from roost.algorithms.local_work import random_epochs, stragglers
from roost.config import RunConfig
from roost.system import HeterogeneousConfig, HeterogeneousSystem, HomogeneousConfig
from roost.system.model import HomogeneousSystem


def test_amble_on_identical_devices_with_equal_data_is_fedavg():
    """3 IID clients of 480, 479 and 479 digits on identical devices: every rate is equal,
    T = E0 · 480 / r + c, so the others' budget is E0 · 480 examples and
    E_k = floor(480 / 479) = 1 = E0; B_k = B0, η_k = η0: FedAvg, bit for bit."""
    run = RunConfig(rounds=3, clients=3, clients_per_round=3, eval_every=0)
    system = HomogeneousSystem(HomogeneousConfig())
    amble, _ = make_engine(run, system, "amble")
    amble.run()
    assert [amble.dataset.num_examples(c) for c in range(3)] == [480, 479, 479]
    fedavg, _ = make_engine(run, system, "fedavg")
    fedavg.run()
    assert torch.equal(amble.strategy.params, fedavg.strategy.params)


def test_amble_lets_fast_devices_work_while_the_straggler_finishes():
    """Heterogeneous devices, the same 6 clients every round. Round 1 runs the base
    settings and measures every device; from round 2 on each device gets the most epochs
    it can finish within round 1's time T (the straggler's), so round 2 lasts exactly T
    and the faster devices run more than E0 epochs."""
    run = RunConfig(rounds=2, clients=6, clients_per_round=6, eval_every=0)
    system = HeterogeneousSystem(HeterogeneousConfig(speed_sigma=1.0), seed=0)
    engine, _ = make_engine(run, system, "amble", {"local_epochs": 1}, partition="dirichlet")
    h = engine.run()
    t1 = h.records[0]["virtual_time_s"]
    t2 = h.records[1]["virtual_time_s"] - t1
    assert t2 == pytest.approx(t1, rel=1e-9)
    s = engine.strategy
    settings, target = amble_settings(s.cfg, s.rates, s.comm, s.sizes)
    assert target == pytest.approx(t1, rel=1e-9)
    for k, st in settings.items():
        predicted = st["local_epochs"] * s.sizes[k] / s.rates[k] + s.comm[k]
        assert predicted <= target * (1 + 1e-9)
    assert max(st["local_epochs"] for st in settings.values()) > 1


def test_amble_settings_by_hand():
    """Two devices: rates 100 and 400 examples/s, no transfer time, 200 examples each,
    E0 = 1, B0 = 10: T = max(200/100, 200/400) = 2 s. The fast one can process 400 x 2 =
    800 examples: E = 4; ρ = 4, B = 40, η = 0.05 x sqrt(4) = 0.1 (the default sqrt
    scaling), 0.05 x 4 = 0.2 with lr_scaling=linear."""
    rates, comm, sizes = {0: 100.0, 1: 400.0}, {0: 0.0, 1: 0.0}, {0: 200, 1: 200}
    cfg = AMBLEConfig(lr=0.05, batch_size=10, local_epochs=1)
    settings, t = amble_settings(cfg, rates, comm, sizes)
    assert t == 2.0
    assert settings[0] == {"batch_size": 10, "local_epochs": 1, "lr": 0.05}
    assert settings[1] == {"batch_size": 40, "local_epochs": 4, "lr": pytest.approx(0.1)}
    linear = AMBLEConfig(lr=0.05, batch_size=10, local_epochs=1, lr_scaling="linear")
    assert amble_settings(linear, rates, comm, sizes)[0][1]["lr"] == pytest.approx(0.2)


def test_stragglers_are_the_stated_fraction_with_1_to_e_epochs():
    clients = list(range(100, 120))
    for fraction, count in ((0.0, 0), (0.5, 10), (0.9, 18)):
        got = stragglers(clients, np.random.default_rng(3), fraction, 20)
        assert len(got) == count
        assert set(got) <= set(clients)
        assert all(1 <= s["local_epochs"] <= 20 for s in got.values())


def test_fedprox_stragglers_shorten_the_round_on_identical_devices():
    """Identical devices: a task's compute is its examples x epochs. With every device a
    straggler (1..E epochs, E = 5), no task is longer than with E epochs, and some are
    shorter, so the round cannot be longer; the stragglers' work is counted (all 5)."""
    run = RunConfig(rounds=1, clients=10, clients_per_round=5, eval_every=0)
    system = HomogeneousSystem(HomogeneousConfig())
    params = {"local_epochs": 5}
    full, _ = make_engine(run, system, "fedprox", params)
    h_full = full.run()
    lazy, _ = make_engine(run, system, "fedprox", {**params, "stragglers": 1.0})
    h_lazy = lazy.run()
    assert h_lazy.final["clients"] == 5
    assert h_lazy.final["virtual_time_s"] <= h_full.final["virtual_time_s"]
    settings = lazy.strategy.configure_tasks(1, [0, 1, 2, 3, 4], np.random.default_rng(0))
    assert len(settings) == 5 and all(1 <= s["local_epochs"] <= 5 for s in settings.values())


def test_fednova_random_epochs_are_drawn_per_client_and_charged():
    """FedNova with local_epochs 2..5: each client's task runs its drawn epochs, so the
    runtime's work units (examples x epochs) match the draws, and τ_eff is the
    n-weighted mean of the clients' step counts (ρ = 0)."""
    got = random_epochs([4, 9, 1], np.random.default_rng(0), 2, 5)
    assert set(got) == {4, 9, 1} and all(2 <= s["local_epochs"] <= 5 for s in got.values())
    run = RunConfig(rounds=1, clients=6, clients_per_round=3, eval_every=0)
    system = HomogeneousSystem(HomogeneousConfig(seconds_per_example=0.01))
    runtime = CountingRuntime()
    engine, _ = make_engine(
        run, system, "fednova", {"local_epochs": 2, "local_epochs_max": 5}, runtime=runtime
    )
    h = engine.run()
    flights_epochs = engine.strategy.configure_tasks(
        1, runtime.computed[0], np.random.default_rng([0, 10, 1])
    )
    sizes = {c: engine.dataset.num_examples(c) for c in runtime.computed[0]}
    steps = {c: flights_epochs[c]["local_epochs"] * -(-sizes[c] // 10) for c in sizes}
    n = sum(sizes.values())
    assert h.final["tau_eff"] == pytest.approx(sum(sizes[c] * steps[c] for c in sizes) / n)
    # the round lasts as long as the most work: download + examples x epochs x 0.01 s
    # + upload (10 Mbps up, 50 down; the payload is the float32 model)
    longest = max(sizes[c] * flights_epochs[c]["local_epochs"] * 0.01 for c in sizes)
    transfer = 8 * 4 * engine.num_params * (1 / 50e6 + 1 / 10e6)
    assert h.final["virtual_time_s"] == pytest.approx(longest + transfer, rel=1e-9)


def test_drop_stragglers_removes_round_x_k_of_the_drawn_cohort():
    """The selection stream draws the cohort (choice of 10 of 20 candidates), then the
    dropped positions (choice of round(0.5 x 10) = 5 of the 10), in that order: the
    oracle replays those two numpy calls by hand. 0.9 x 10 drops 9; 0.25 x 10 = 2.5
    rounds half to even, to 2."""

    candidates = np.arange(100, 120)
    for fraction, count in ((0.5, 5), (0.9, 9), (0.25, 2)):
        rng = np.random.default_rng(7)
        cohort = candidates[rng.choice(20, size=10, replace=False)].tolist()
        dropped = set(rng.choice(10, size=count, replace=False).tolist())
        expected = [c for i, c in enumerate(cohort) if i not in dropped]
        strategy = DropStragglersStrategy(fraction)
        got = strategy.select(1, candidates, 10, np.random.default_rng(7))
        assert got == expected and len(got) == 10 - count
        assert strategy.dropped == count


class _Fixed(FedAvgStrategy):
    """FedAvg whose cohort is given: the oracle run of the drop baseline."""

    def __init__(self, cohorts: dict[int, list[int]]) -> None:
        super().__init__()
        self.cohorts = cohorts

    def select(self, round, candidates, k, rng):  # type: ignore[no-untyped-def]
        return self.cohorts[round]


def test_fedavg_dropping_stragglers_is_fedavg_over_the_rest():
    """The FedProx paper's FedAvg baseline (straggler_work=drop, mu=0, 50% stragglers,
    2 rounds of 6 of 12 clients): each round trains the 3 kept clients only (the 3 dropped
    are never computed) and its model is FedAvg's over exactly those 3, bit for bit."""

    run = RunConfig(rounds=2, clients=12, clients_per_round=6, eval_every=0, seed=3)
    system = HomogeneousSystem(HomogeneousConfig())
    params = {"mu": 0.0, "stragglers": 0.5, "straggler_work": "drop"}
    runtime = CountingRuntime()
    drop, _ = make_engine(run, system, "fedprox", params, runtime=runtime)
    h = drop.run()
    assert isinstance(drop.strategy, DropStragglersStrategy)
    assert [r["clients"] for r in h.records] == [3, 3]
    assert [r["stragglers_dropped"] for r in h.records] == [3.0, 3.0]
    assert [len(c) for c in runtime.computed] == [3, 3]

    cohorts = {}
    for r in (1, 2):  # the engine's selection stream of round r, replayed by hand
        rng = np.random.default_rng([3, 4, r])
        cohort = rng.choice(12, size=6, replace=False).tolist()
        dropped = set(rng.choice(6, size=3, replace=False).tolist())
        cohorts[r] = [c for i, c in enumerate(cohort) if i not in dropped]
    assert sorted(runtime.computed[0]) == sorted(cohorts[1])
    oracle, _ = make_engine(run, system, "fedavg", strategy=_Fixed(cohorts))
    oracle.run()
    assert torch.equal(drop.strategy.params, oracle.strategy.params)
