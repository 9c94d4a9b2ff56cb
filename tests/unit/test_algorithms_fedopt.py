"""FedAdagrad / FedAdam / FedYogi: three server steps against hand-derived numbers.

The strategies are fed Contributions built directly (no training). Round 1 is written out
by hand below; rounds 2-3 come from :func:`flower_reference`, an independent float64 numpy
transcription of Flower's classic strategies (``flwr/server/strategy/fed{adagrad,adam,
yogi}.py``: no bias correction, m = v = 0 at the start). They are checked both with
Flower's default hyperparameters (passed explicitly) and with roost's own defaults, which
differ (roost/algorithms/fedopt.py; tests/unit/test_fedopt_defaults_learn.py).

Round 1: w^0 = [1, -0.5, 0]; clients [1.25, -0.5, 0.75] (weight 1) and [1.75, -0.25, -0.25]
(weight 3); mean = [6.5/4, -1.25/4, 0/4] = [1.625, -0.3125, 0]; Δ_1 = [0.625, 0.1875, 0].
(Dyadic numbers, so float32 holds Δ_1 exactly and its last coordinate is exactly 0.)

With Flower's defaults:

* FedAdagrad (η 0.1, β1 0, τ 1e-9): m = Δ, v = Δ², step η Δ/(|Δ| + τ) ≈ η sign(Δ)
  → w^1 = [1.1, -0.4, 0.0] (the 0 coordinate: 0/(0 + τ) = 0).
* FedAdam (η 0.1, β1 0.9, β2 0.99, τ 1e-9): m = 0.1 Δ, v = 0.01 Δ², sqrt(v) = 0.1 |Δ|,
  step η 0.1Δ/(0.1|Δ| + τ) ≈ η sign(Δ) → w^1 = [1.1, -0.4, 0.0] (to 1e-8).
* FedYogi (η 0.01, β1 0.9, β2 0.99, τ 1e-3): v_0 = 0 so sign(0 − Δ²) = −1 and
  v = 0.01 Δ² = [0.00390625, 0.000351563, 0] (sign(0) = 0 on the last coordinate);
  m = 0.1 Δ = [0.0625, 0.01875, 0]; sqrt(v) = [0.0625, 0.01875, 0];
  step = 0.01 [0.0625/0.0635, 0.01875/0.01975, 0/0.001] = [0.00984252, 0.00949367, 0]
  → w^1 = [1.0098425196850394, -0.4905063291139241, 0.0].

With roost's defaults (η 0.03, β1 0.9, τ 1e-3 for all three; β2 0.99):

* FedAdagrad: m = 0.1 Δ, v = Δ², step = 0.03 [0.0625/0.626, 0.01875/0.1885, 0/0.001]
  = [0.00299521, 0.00298408, 0] → w^1 = [1.0029952076677315, -0.4970159151193634, 0.0].
* FedAdam and FedYogi (the same in round 1, as above): sqrt(v) = 0.1 |Δ|,
  step = 0.03 [0.0625/0.0635, 0.01875/0.01975, 0] = [0.0295276, 0.0284810, 0]
  → w^1 = [1.029527559055118, -0.47151898734177217, 0.0].

Round 3 is chosen so that Yogi's sign(v − Δ²) is +1 on two coordinates (v shrinks there)
and −1 on the other; round 1 covers sign 0.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from _fl_helpers import contribution_of, linear_model, make_clients, run_rounds

from roost.algorithms import (
    ALGORITHMS,
    FedAdagrad,
    FedAdagradConfig,
    FedAdam,
    FedAdamConfig,
    FedOptStrategy,
    FedYogi,
    FedYogiConfig,
)

W0 = [1.0, -0.5, 0.0]
ROUNDS = [
    [([1.25, -0.5, 0.75], 1.0), ([1.75, -0.25, -0.25], 3.0)],
    [([1.0, -0.1, 0.5], 2.0), ([1.4, -0.6, -0.1], 2.0)],
    [([1.0, -0.3, 0.1], 1.0), ([1.1, -0.45, 0.3], 1.0), ([1.05, -0.2, -0.2], 2.0)],
]
ROUND1_FLOWER = {
    "fedadagrad": [1.1, -0.4, 0.0],
    "fedadam": [1.1, -0.4, 0.0],
    "fedyogi": [1.0098425196850394, -0.4905063291139241, 0.0],
}
ROUND1_DEFAULTS = {
    "fedadagrad": [1.0029952076677315, -0.4970159151193634, 0.0],
    "fedadam": [1.029527559055118, -0.47151898734177217, 0.0],
    "fedyogi": [1.029527559055118, -0.47151898734177217, 0.0],
}
# name: (η, β1, β2, τ); FedAdagrad has no β2 (Flower passes 0 and never reads it)
FLOWER_DEFAULTS = {
    "fedadagrad": (0.1, 0.0, 0.0, 1e-9),
    "fedadam": (0.1, 0.9, 0.99, 1e-9),
    "fedyogi": (0.01, 0.9, 0.99, 1e-3),
}
ROOST_DEFAULTS = {
    "fedadagrad": (0.03, 0.9, 0.0, 1e-3),
    "fedadam": (0.03, 0.9, 0.99, 1e-3),
    "fedyogi": (0.03, 0.9, 0.99, 1e-3),
}
RULE = {"fedadagrad": "adagrad", "fedadam": "adam", "fedyogi": "yogi"}


def flower_reference(rule, w0, rounds, eta, beta1, beta2, tau):
    """Flower's aggregate_fit loop in float64: the server models after each round."""
    w = np.array(w0, dtype=np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    out = []
    for clients in rounds:
        total = sum(n for _, n in clients)
        agg = sum(n * np.array(p, dtype=np.float64) for p, n in clients) / total
        delta = agg - w
        m = beta1 * m + (1 - beta1) * delta
        if rule == "adagrad":
            v = v + delta * delta
        elif rule == "adam":
            v = beta2 * v + (1 - beta2) * delta * delta
        else:
            v = v - (1.0 - beta2) * delta * delta * np.sign(v - delta * delta)
        w = w + eta * m / (np.sqrt(v) + tau)
        out.append(w.copy())
    return out


def run_strategy(strategy, rounds=ROUNDS, w0=W0):
    strategy.initialize(torch.tensor(w0))
    out = []
    for r, clients in enumerate(rounds, start=1):
        strategy.step(r, [contribution_of(clients)])
        out.append(strategy.params.clone())
    return out


def config_with(name: str, eta: float, beta1: float, beta2: float, tau: float):
    extra = {} if name == "fedadagrad" else {"beta2": beta2}
    return ALGORITHMS.get(name).config_cls(server_lr=eta, beta1=beta1, tau=tau, **extra)


def three_rounds(name: str, cfg, params) -> tuple[np.ndarray, np.ndarray]:
    """(the strategy's models, Flower's reference models) after each of the 3 rounds."""
    eta, beta1, beta2, tau = params
    got = run_strategy(ALGORITHMS.get(name).factory(cfg).make_strategy())
    expected = flower_reference(RULE[name], W0, ROUNDS, eta, beta1, beta2, tau)
    return np.stack([g.double().numpy() for g in got]), np.stack(expected)


def assert_matches_reference_and_round1(got, expected, round1) -> None:
    # the reference agrees with the hand-derived round 1 ...
    np.testing.assert_allclose(expected[0], round1, rtol=0, atol=1e-7)
    # ... and the strategy with both, round by round
    np.testing.assert_allclose(got[0], round1, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_three_rounds_with_flower_defaults(name: str) -> None:
    # Flower's defaults, set explicitly: the strategy is Flower's numpy strategy.
    params = FLOWER_DEFAULTS[name]
    got, expected = three_rounds(name, config_with(name, *params), params)
    assert got.shape == expected.shape == (3, 3)
    assert_matches_reference_and_round1(got, expected, ROUND1_FLOWER[name])


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_three_rounds_with_roost_defaults(name: str) -> None:
    cfg = ALGORITHMS.get(name).config_cls()
    eta, beta1, beta2, tau = params = ROOST_DEFAULTS[name]
    assert (cfg.server_lr, cfg.beta1, cfg.tau) == (eta, beta1, tau)
    assert getattr(cfg, "beta2", 0.0) == beta2
    assert cfg == config_with(name, *params)
    got, expected = three_rounds(name, cfg, params)
    assert got.shape == expected.shape == (3, 3)
    assert_matches_reference_and_round1(got, expected, ROUND1_DEFAULTS[name])


def test_yogi_sign_cases_are_covered() -> None:
    # Guard on the data above: Yogi's v sees sign 0 (round 1), −1 and +1 (round 3).
    w = np.array(W0)
    v = np.zeros(3)
    m = np.zeros(3)
    signs = []
    for clients in ROUNDS:
        agg = sum(n * np.array(p) for p, n in clients) / sum(n for _, n in clients)
        d = agg - w
        signs.append(np.sign(v - d * d))
        m = 0.9 * m + 0.1 * d
        v = v - 0.01 * d * d * signs[-1]
        w = w + 0.01 * m / (np.sqrt(v) + 1e-3)
    assert signs[0].tolist() == [-1.0, -1.0, 0.0]
    assert signs[2].tolist() == [1.0, -1.0, 1.0]


@pytest.mark.parametrize(
    ("cls", "cfg", "rule", "beta2"),
    [
        (FedAdagrad, FedAdagradConfig(server_lr=0.3, beta1=0.5, tau=1e-2), "adagrad", 0.0),
        (FedAdam, FedAdamConfig(server_lr=0.05, beta1=0.8, beta2=0.9, tau=1e-3), "adam", 0.9),
        (FedYogi, FedYogiConfig(server_lr=0.2, beta1=0.5, beta2=0.9, tau=1e-2), "yogi", 0.9),
    ],
)
def test_three_rounds_non_default(cls, cfg, rule: str, beta2: float) -> None:
    got = run_strategy(cls(cfg).make_strategy())
    expected = flower_reference(rule, W0, ROUNDS, cfg.server_lr, cfg.beta1, beta2, cfg.tau)
    for r in range(3):
        np.testing.assert_allclose(got[r].double().numpy(), expected[r], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_resume_from_state_dict(name: str) -> None:
    # Two rounds, checkpoint through torch.save, a fresh strategy resumes: round 3 matches
    # an uninterrupted run exactly, so m and v are part of the state.
    entry = ALGORITHMS.get(name)
    alg = entry.factory(entry.config_cls())
    straight = alg.make_strategy()
    run_strategy(straight)

    first = alg.make_strategy()
    run_strategy(first, ROUNDS[:2])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    first.step(3, [contribution_of(ROUNDS[2])])  # must not alter the saved snapshot
    buf.seek(0)
    state = torch.load(buf)
    assert {"params", "version", "m", "v"} <= set(state)

    resumed = alg.make_strategy()
    resumed.initialize(torch.zeros(3))
    resumed.load_state_dict(state)
    assert resumed.version == 2
    resumed.step(3, [contribution_of(ROUNDS[2])])
    assert torch.equal(resumed.params, straight.params)
    assert resumed.version == straight.version == 3
    assert isinstance(resumed, FedOptStrategy)
    assert torch.equal(resumed.v, straight.v)


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_trains_end_to_end(name: str) -> None:
    # The client half is FedAvg's; two rounds through the stand-in runtime move the model.
    entry = ALGORITHMS.get(name)
    alg = entry.factory(entry.config_cls(batch_size=4, lr=0.1))
    clients = make_clients([3, 8], seed=31)
    strategy = run_rounds(alg, linear_model(seed=32), clients, 2)
    assert strategy.version == 2
    assert torch.isfinite(strategy.params).all()
    start = torch.cat([p.detach().reshape(-1) for p in linear_model(seed=32).parameters()])
    assert not torch.equal(strategy.params, start)
