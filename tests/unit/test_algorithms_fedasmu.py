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


def _arrive(strategy, cid: int, merge_reward: float) -> None:
    from roost.algorithms.asynchronous import Arrival
    from roost.algorithms.base import ClientResult, Contribution

    c = Contribution()
    c.fold(
        ClientResult({"params": strategy.params.clone()}, 1.0, {"merge_reward": merge_reward}), cid
    )
    strategy.accept(Arrival(cid, strategy.version, strategy.version, 0.0, 1.0, 1.0, 10, 10), c)
    strategy.server_step(strategy.version + 1)


def test_qlearning_request_slots_by_hand():
    """q_slots = 4 (fractions 1/8, 3/8, 5/8, 7/8), start at slot 2, ε = 0, lr 0.1, γ 0.9:
    zeros -> stay (5/8); reward 1: Q(2, stay) = 0.1 (1 + 0.9 · 0 - 0) = 0.1 -> stay;
    reward -1: Q(2, stay) = 0.1 + 0.1 (-1 + 0.9 · 0.1 - 0.1) = -0.001 -> earlier (ties
    between earlier and later go to earlier), slot 1 (3/8); reward 0.5: Q(2, earlier) =
    0.1 (0.5 + 0.9 · 0 - 0) = 0.05, and the device now sits at slot 1."""
    import numpy as np

    from roost.algorithms.fedasmu import FedASMUQStrategy

    cfg = FedASMUConfig(request_policy="qlearning", q_slots=4, q_epsilon=0.0, control_lr=0.0)
    s = FedASMUQStrategy(cfg)
    s.initialize(torch.zeros(3), 2)
    rng = np.random.default_rng(0)
    fractions = []
    for reward in (1.0, -1.0, 0.5):
        (settings,) = s.configure_tasks(s.version, [1], rng).values()
        fractions.append(settings["request_fraction"])
        _arrive(s, 1, reward)
    assert fractions == [5 / 8, 5 / 8, 3 / 8]
    assert s.q[1, 2].tolist() == pytest.approx([-0.001, 0.05, 0.0], abs=1e-15)
    assert int(s.slot[1]) == 1 and int(s.slot[0]) == 2  # client 0 never moved
    restored = FedASMUQStrategy(cfg)
    restored.initialize(torch.zeros(3), 2)
    s.configure_tasks(s.version, [0], rng)  # an action in flight survives the round trip
    restored.load_state_dict(s.state_dict())
    assert torch.equal(restored.q, s.q) and restored.chosen == s.chosen == {0: (2, 0, 2)}


def test_qlearning_explores_every_action_and_stays_on_the_grid():
    """ε = 1: each action a third of the time (600 draws: 200 ± 3 sd of 11.5), the slot
    clipped to 0..q_slots-1."""
    import numpy as np

    from roost.algorithms.fedasmu import FedASMUQStrategy

    cfg = FedASMUConfig(request_policy="qlearning", q_slots=3, q_epsilon=1.0)
    s = FedASMUQStrategy(cfg)
    s.initialize(torch.zeros(3), 1)
    rng = np.random.default_rng(1)
    counts = [0, 0, 0]
    for _ in range(600):
        s.configure_tasks(0, [0], rng)
        _, a, nxt = s.chosen[0]
        counts[a] += 1
        assert 0 <= nxt <= 2
        s.slot[0] = nxt
    assert all(165 < n < 235 for n in counts), counts


def test_the_engine_charges_the_fetch_at_each_tasks_learned_fraction():
    """Every dispatched task's request time is its download's end plus f of its compute
    time, for its own setting f."""
    run = RunConfig(rounds=30, clients=12, clients_per_round=4, eval_every=0)
    cfg = {"request_policy": "qlearning", "q_slots": 5, "q_epsilon": 0.5}
    engine, _ = make_engine(run, SYSTEM, "fedasmu", cfg)
    seen = []
    launch = engine.launch

    def recording_launch(flight, payload):
        seen.append(flight)
        launch(flight, payload)

    engine.launch = recording_launch
    engine.run()
    fractions = set()
    for f in seen:
        (fraction,) = [v for k, v in f.task.settings if k == "request_fraction"]
        fractions.add(fraction)
        (t,) = f.requests_s
        compute_s = SYSTEM.compute_time_s(f.client_id, f.work_examples)
        assert t == pytest.approx(f.timing.download_end_s + fraction * compute_s, rel=1e-12)
    assert len(fractions) >= 3  # the slots moved
