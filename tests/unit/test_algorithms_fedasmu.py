"""FedASMU: its weights by hand, and the reductions of ALGORITHMS.md §5 (no trustworthy
oracle exists: the paper's body was not reachable)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _async_helpers import make_engine

from roost.algorithms.fedasmu import FedASMUConfig, device_merge_weight, server_weight
from roost.config import RunConfig
from roost.system import HeterogeneousConfig, HeterogeneousSystem


def test_server_weight_by_hand():
    # t = 4, d = 1, λ = 1, σ = 0.5, ι = 0, μ_α = 1: ξ = 1 / (2 · 1) = 0.5, α = 0.5 / 1.5
    assert server_weight(4, 1, 1.0, 0.5, 0.0, 1.0) == pytest.approx(1 / 3, abs=1e-15)
    # d = 4: ξ = 1 / (2 · 4^0.5) = 0.25, α = 0.25 / 1.25 = 0.2
    assert server_weight(4, 4, 1.0, 0.5, 0.0, 1.0) == pytest.approx(0.2, abs=1e-15)
    # variant B (half exponent): ξ = 1 / (2 · 4^0.25) = 1 / (2 sqrt 2)
    xi = 1 / (2 * math.sqrt(2))
    assert server_weight(4, 4, 1.0, 0.5, 0.0, 1.0, half=True) == pytest.approx(xi / (1 + xi))
    # α in [0, 1) and decreasing in the staleness for σ > 0
    weights = [server_weight(10, d, 1.0, 0.5, 0.0, 1.0) for d in range(1, 30)]
    assert all(0 <= a < 1 for a in weights)
    assert all(a > b for a, b in itertools.pairwise(weights))


def test_default_server_weight_stays_useful_after_hundreds_of_steps():
    """μ_α = 10 (not the re-implementations' 1, under which the weight decays to ~0.03 and
    FEMNIST's CNN stalls at 0.28): at t = 400 with d = 9, ξ = 1 / (sqrt(400) · 9^0.5) = 1/60
    and α = (10/60) / (1 + 10/60) = 1/7; with μ_α = 1 it would be (1/60) / (61/60) = 1/61."""
    c = FedASMUConfig()
    assert c.mu_alpha == 10.0
    a = server_weight(400, 9, c.lambda0, c.sigma0, c.iota0, c.mu_alpha)
    assert a == pytest.approx(1 / 7, abs=1e-15)
    assert server_weight(400, 9, 1.0, 0.5, 0.0, 1.0) == pytest.approx(1 / 61, abs=1e-15)


def test_device_merge_weight_by_hand():
    # not fresher: no merge
    assert device_merge_weight(3, 3, 1.0, 0.5, 1.0) == 0.0
    # t' = 4, o = 1: φ = 1/2 · (1 - 0.5 / sqrt(4)) = 0.375, β = 0.375 / 1.375
    assert device_merge_weight(4, 1, 1.0, 0.5, 1.0) == pytest.approx(0.375 / 1.375, abs=1e-15)
    # φ <= 0 (υ large): β = 0
    assert device_merge_weight(4, 1, 1.0, 5.0, 1.0) == 0.0


RUN = RunConfig(rounds=12, clients=12, clients_per_round=4, eval_every=0)
SYSTEM = HeterogeneousSystem(HeterogeneousConfig(speed_sigma=1.0), seed=0)


def test_frozen_controls_without_device_merge_are_fedasync_with_that_weight(monkeypatch):
    """control_lr = 0 and no device merge: every arrival is mixed in with
    α(t, d) = 10 ξ / (1 + 10 ξ), ξ = 1 / (sqrt(t) d^0.5) (λ0 = 1, σ0 = 0.5, ι0 = 0,
    μ_α = 10). FedAsync
    with ρ = 0 and that weight trains the same tasks the same way: the same model, bit
    for bit."""
    asmu, _ = make_engine(RUN, SYSTEM, "fedasmu", {"control_lr": 0.0, "device_merge": False})
    asmu.run()
    fedasync, _ = make_engine(RUN, SYSTEM, "fedasync", {"rho": 0.0, "alpha": 1.0})
    strategy = fedasync.strategy
    monkeypatch.setattr(
        strategy,
        "mixing_weight",
        lambda a: server_weight(strategy.version + 1, a.staleness + 1, 1.0, 0.5, 0.0, 10.0),
    )
    fedasync.run()
    assert torch.equal(asmu.strategy.params, strategy.params)


def test_one_task_in_flight_never_finds_a_fresher_model():
    """With concurrency 1 no step happens while a task runs, so the fetched model is the
    task's own start version: β = 0 every time, and the run equals one without the
    device-side merge."""
    one = RunConfig(rounds=6, clients=12, clients_per_round=1, eval_every=0)
    merge, _ = make_engine(one, SYSTEM, "fedasmu", {"control_lr": 0.0})
    h = merge.run()
    assert h.series("client_merge_beta") == [0.0] * 6
    assert h.series("client_fetched_versions_ahead") == [0.0] * 6
    plain, _ = make_engine(one, SYSTEM, "fedasmu", {"control_lr": 0.0, "device_merge": False})
    plain.run()
    assert torch.equal(merge.strategy.params, plain.strategy.params)


def test_device_merge_happens_and_controls_adapt():
    """Four in flight: later tasks fetch newer versions (β > 0 for some), the server's
    per-device controls move from (1, 0.5, 0) for devices that reported, and the device
    controls are kept as client state."""
    engine, _ = make_engine(RUN, SYSTEM, "fedasmu")
    h = engine.run()
    assert max(h.series("client_merge_beta")) > 0
    moved = (engine.strategy.controls - torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)).abs()
    assert (moved.sum(1) > 0).sum() >= 2
    states = [engine.state_store.get(c) for c in range(12)]
    assert sum(s is not None for s in states) >= 4
