"""FedDyn: the dynamically regularised local loss, the client's ∇_k, and the server's h and θ."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _fl_helpers import (
    check_state_survives,
    client_task,
    hand_clients,
    linear_model,
    make_clients,
    np_local_sgd,
    zero_linear,
)

from roost.algorithms import ALGORITHMS, FedDyn, FedDynConfig, FedDynStrategy
from roost.algorithms.base import ClientResult, Contribution, Tensors
from roost.data.base import ClientData
from roost.params import FlatModel
from roost.registry import ConfigError

ATOL = 1e-6


def close(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(np.asarray(expected, dtype=np.float64))
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=ATOL)


def feddyn_round(
    alg: FedDyn,
    strategy: FedDynStrategy,
    model: FlatModel,
    clients: list[ClientData],
    selected: list[int],
    rnd: int,
    states: dict[int, Tensors],
) -> dict[int, torch.Tensor]:
    """One round through the real client update and strategy; returns each client's θ_k."""
    payload = strategy.payload(rnd)
    contribution = Contribution()
    theta = {}
    for cid in selected:
        out = client_task(alg, model, clients[cid], payload, cid, rnd, states)
        assert out.result.weight == 1.0
        theta[cid] = out.result.tensors["params"].clone()
        contribution.fold(out.result, cid)
    strategy.step(rnd, [contribution])
    return theta


def make(alpha: float, lr: float, batch_size: int, epochs: int, n_total: int):
    alg = FedDyn(
        FedDynConfig(alpha=alpha, lr=lr, batch_size=batch_size, local_epochs=epochs, shuffle=False)
    )
    model = FlatModel(zero_linear())
    strategy = alg.make_strategy()
    assert isinstance(strategy, FedDynStrategy)
    strategy.initialize(model.params, n_total)
    return alg, model, strategy


def test_round_one_by_hand() -> None:
    # θ⁰ = 0, ∇_k = 0, α = 1/2, η = 1/2, one step each, N = 4, P_1 = {A, B}. At the first
    # step θ = θ⁰ and ∇_k = 0, so the correction is 0 and θ_k = −η g_k (hand_clients):
    #   θ_A = (1/4, 1/2, −1/4, −1/2, 1/4, −1/4),  θ_B = (−1/4, 1/4, 1/4, −1/4, −1/4, 1/4)
    #   ∇_k ← 0 − α (θ_k − 0):  ∇_A = (−1/8, −1/4, 1/8, 1/4, −1/8, 1/8),
    #                           ∇_B = (1/8, −1/8, −1/8, 1/8, 1/8, −1/8)
    #   h¹ = 0 − α (1/N)(θ_A + θ_B) = −(1/8)(0, 3/4, 0, −3/4, 0, 0) = (0, −3/32, 0, 3/32, 0, 0)
    #   θ¹ = (θ_A + θ_B)/2 − h¹/α = (0, 3/8, 0, −3/8, 0, 0) + (0, 3/16, 0, −3/16, 0, 0)
    #      = (0, 9/16, 0, −9/16, 0, 0)
    clients = hand_clients()
    alg, model, strategy = make(alpha=0.5, lr=0.5, batch_size=2, epochs=1, n_total=4)
    states: dict[int, Tensors] = {}
    theta = feddyn_round(alg, strategy, model, clients, [0, 1], 1, states)
    close(theta[0], [0.25, 0.5, -0.25, -0.5, 0.25, -0.25])
    close(theta[1], [-0.25, 0.25, 0.25, -0.25, -0.25, 0.25])
    close(states[0]["grad"], [-0.125, -0.25, 0.125, 0.25, -0.125, 0.125])
    close(states[1]["grad"], [0.125, -0.125, -0.125, 0.125, 0.125, -0.125])
    close(strategy.h, [0.0, -3 / 32, 0.0, 3 / 32, 0.0, 0.0])
    close(strategy.params, [0.0, 9 / 16, 0.0, -9 / 16, 0.0, 0.0])
    assert strategy.version == 1


@pytest.mark.parametrize(
    ("alpha", "lr", "batch_size", "epochs"), [(0.5, 0.5, 2, 1), (0.1, 0.3, 1, 2)]
)
def test_two_rounds_match_numpy_oracle(
    alpha: float, lr: float, batch_size: int, epochs: int
) -> None:
    # ALGORITHMS.md 4.6 in float64 numpy: P_1 = {A, B}, P_2 = {A, C}, N = 4. In round 2 A
    # carries ∇_A ≠ 0 and every client starts from θ¹ ≠ θ_k, so both the linear and the
    # proximal term act; the second case (batch 1, 2 epochs) takes several steps per task.
    clients = hand_clients()
    n_total = 4
    alg, model, strategy = make(alpha, lr, batch_size, epochs, n_total)
    states: dict[int, Tensors] = {}

    theta, h = np.zeros(6), np.zeros(6)
    grads: dict[int, np.ndarray] = {}
    for rnd, selected in enumerate([[0, 1], [0, 2]], start=1):
        got = feddyn_round(alg, strategy, model, clients, selected, rnd, states)
        local = []
        for k in selected:
            g_k = grads.get(k, np.zeros(6))

            def correction(th, g_k=g_k, anchor=theta):
                return -g_k + alpha * (th - anchor)

            theta_k, _ = np_local_sgd(theta, clients[k], lr, batch_size, epochs, correction)
            grads[k] = g_k - alpha * (theta_k - theta)
            local.append(theta_k)
            close(got[k], theta_k)
            close(states[k]["grad"], grads[k])
        h = h - alpha / n_total * np.sum([t - theta for t in local], axis=0)
        theta = np.mean(local, axis=0) - h / alpha
        close(strategy.h, h)
        close(strategy.params, theta)
    assert strategy.version == 2
    assert np.abs(h).max() > 1e-3


def test_local_objective_matches_autograd() -> None:
    # Reference: torch.optim.SGD on L_k(θ) − ⟨∇_k, θ⟩ + (α/2)||θ − θ^{t−1}||² with autograd,
    # from θ^{t−1} with a non-zero ∇_k; 10 examples, batch 4, 2 epochs, weight decay 1e-2.
    alpha, lr, wd = 0.3, 0.2, 1e-2
    module = linear_model(4, 3, seed=41)
    reference = copy.deepcopy(module)
    (data,) = make_clients([10], seed=42)
    model = FlatModel(module)
    grad_k = torch.randn(model.numel, generator=torch.Generator().manual_seed(43))
    alg = FedDyn(
        FedDynConfig(
            alpha=alpha, lr=lr, batch_size=4, local_epochs=2, weight_decay=wd, shuffle=False
        )
    )
    strategy = alg.make_strategy()
    strategy.initialize(model.params, 3)
    payload = strategy.payload(1)
    states = {0: {"grad": grad_k.clone()}}
    out = client_task(alg, model, data, payload, 0, 1, states)

    anchor = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    opt = torch.optim.SGD(reference.parameters(), lr=lr, weight_decay=wd)
    for _ in range(2):
        for s in range(0, 10, 4):
            opt.zero_grad()
            theta = torch.cat([p.reshape(-1) for p in reference.parameters()])
            loss = F.cross_entropy(reference(data.x[s : s + 4]), data.y[s : s + 4])
            loss = loss - grad_k @ theta + 0.5 * alpha * ((theta - anchor) ** 2).sum()
            loss.backward()
            opt.step()
    expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    assert out.metrics["local_steps"] == 6.0
    torch.testing.assert_close(out.result.tensors["params"], expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(
        states[0]["grad"], grad_k - alpha * (expected - anchor), rtol=0, atol=ATOL
    )
    assert torch.equal(payload.params, strategy.params)  # θ^{t−1} untouched


def test_server_divides_by_all_clients() -> None:
    # θ^{t−1} = 0, α = 1/2, N = 8, two clients return (2, 0) and (0, 4):
    # h = −(1/2)(1/8)(2, 4) = (−1/8, −1/4);  θ = (1, 2) − 2 h = (5/4, 5/2).
    strategy = FedDynStrategy(alpha=0.5)
    strategy.initialize(torch.zeros(2), 8)
    sent = strategy.payload(1)
    c = Contribution()
    c.fold(ClientResult({"params": torch.tensor([2.0, 0.0])}, 1.0), 0)
    c.fold(ClientResult({"params": torch.tensor([0.0, 4.0])}, 1.0), 1)
    strategy.step(1, [c])
    assert strategy.h.tolist() == [-0.125, -0.25]
    assert strategy.params.tolist() == [1.25, 2.5]
    assert sent.params.tolist() == [0.0, 0.0]
    saved = strategy.state_dict()
    fresh = FedDynStrategy(alpha=0.5)
    fresh.initialize(torch.zeros(2), 8)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.h, strategy.h)
    assert torch.equal(fresh.params, strategy.params)


def test_alpha_validation() -> None:
    for bad in (0.0, -0.01, float("nan"), float("inf")):
        with pytest.raises(ConfigError) as err:
            FedDynConfig(alpha=bad)
        assert err.value.key == "alpha"
        assert "alpha" in str(err.value)
    with pytest.raises(ConfigError) as err:
        ALGORITHMS.config("feddyn", {"alpha": "0"})
    assert err.value.key == "algorithm.alpha"


def test_spec() -> None:
    alg = FedDyn(FedDynConfig())
    assert alg.config.alpha == 0.01
    assert alg.client_state_spec(9) == {"grad": 9}
    assert alg.upload_nbytes(9) == 4 * 9


@pytest.mark.parametrize(
    ("runtime", "state_store"), [("local", "memory"), ("workers", "memory"), ("workers", "disk")]
)
def test_client_state_survives_between_rounds(
    runtime: str, state_store: str, tmp_path, monkeypatch
) -> None:
    # 5 rounds x 3 clients: every task was recorded and checked
    assert check_state_survives("feddyn", runtime, tmp_path, monkeypatch, state_store) == 15
