"""FedNova: normaliser a_k, normalised update d_k, and the τ_eff-rescaled server step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _fl_helpers import client_round, linear_model, make_clients, run_rounds
from torch import nn

from roost.algorithms import FedAvg, FedAvgConfig, FedNova, FedNovaConfig
from roost.algorithms.fednova import fednova_normalizer
from roost.data.base import ClientData
from roost.params import FlatModel


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def sgd_reference(module: nn.Module, data: ClientData, lr: float, rho: float, bs: int):
    """One epoch of torch.optim.SGD in stored order: the w_k a client should reach."""
    ref = copy.deepcopy(module)
    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=rho)
    for s in range(0, len(data), bs):
        opt.zero_grad()
        F.cross_entropy(ref(data.x[s : s + bs]), data.y[s : s + bs]).backward()
        opt.step()
    return flat(ref)


def test_normalizer_closed_form() -> None:
    # ρ = 0: a = τ. ρ = 0.9: a = Σ_{i=1..τ} (1 − ρ^i)/(1 − ρ) = 1, 1 + 1.9, 1 + 1.9 + 2.71
    # = 1, 2.9, 5.61 (the official code's running counter c ← ρ c + 1, a ← a + c).
    assert [fednova_normalizer(t, 0.0) for t in (0, 1, 3, 7)] == [0.0, 1.0, 3.0, 7.0]
    for tau, expected in [(1, 1.0), (2, 2.9), (3, 5.61)]:
        assert fednova_normalizer(tau, 0.9) == pytest.approx(expected, abs=1e-12)
    for rho in (0.5, 0.9, 0.99):
        counter = total = 0.0
        for tau in range(1, 40):
            counter = rho * counter + 1.0
            total += counter
            assert fednova_normalizer(tau, rho) == pytest.approx(total, rel=1e-12)


@pytest.mark.parametrize(
    ("rho", "a", "server_lr"),
    [
        # τ = (1, 3): ρ = 0 gives a = (1, 3); ρ = 0.9 gives a = (1, 5.61).
        (0.0, (1.0, 3.0), 1.0),
        (0.9, (1.0, 5.61), 1.0),
        (0.9, (1.0, 5.61), 0.5),
    ],
)
def test_normalised_update_two_clients(rho: float, a: tuple[float, float], server_lr: float):
    # Client 0 has 2 examples, client 1 has 6; batch 2 gives τ = 1 and 3 local steps.
    # p = (2/8, 6/8); τ_eff = p·a (2.5 for ρ = 0, 0.25 + 0.75·5.61 = 4.4575 for ρ = 0.9);
    # w^1 = w^0 − η_g τ_eff Σ p_k (w^0 − w_k)/a_k, with w_k from torch.optim.SGD.
    lr, bs = 0.3, 2
    module = linear_model(4, 3, seed=21)
    clients = make_clients([2, 6], seed=22)
    w0 = flat(module).double()
    w = [sgd_reference(module, c, lr, rho, bs).double() for c in clients]
    p = (0.25, 0.75)
    tau_eff = p[0] * a[0] + p[1] * a[1]
    assert tau_eff == pytest.approx(2.5 if rho == 0 else 4.4575)
    expected = w0 - server_lr * tau_eff * sum(
        pk * (w0 - wk) / ak for pk, wk, ak in zip(p, w, a, strict=True)
    )

    alg = FedNova(
        FedNovaConfig(lr=lr, batch_size=bs, momentum=rho, shuffle=False, server_lr=server_lr)
    )
    model = FlatModel(module)
    strategy = alg.make_strategy()
    strategy.initialize(model.params)
    contribution, metrics = client_round(alg, strategy, model, list(enumerate(clients)), 1)
    assert [m["local_steps"] for m in metrics] == [1.0, 3.0]
    assert contribution.weight == 8.0
    assert contribution.scalar_mean("a") == pytest.approx(tau_eff, abs=1e-12)
    server = strategy.step(1, [contribution])
    assert server["tau_eff"] == pytest.approx(tau_eff, abs=1e-12)
    torch.testing.assert_close(strategy.params.double(), expected, rtol=0, atol=1e-6)
    assert strategy.version == 1
    # the step moved the model by more than the tolerance
    assert (strategy.params.double() - w0).abs().max() > 1e-3


def test_client_result_is_d_and_a() -> None:
    # One client, 6 examples, batch 2, ρ = 0.9: τ = 3, a = 5.61, d = (w^0 − w_1)/5.61.
    module = linear_model(seed=23)
    (data,) = make_clients([6], seed=24)
    w0 = flat(module)
    w1 = sgd_reference(module, data, 0.1, 0.9, 2)
    alg = FedNova(FedNovaConfig(lr=0.1, batch_size=2, momentum=0.9, shuffle=False))
    model = FlatModel(module)
    strategy = alg.make_strategy()
    strategy.initialize(model.params)
    contribution, _ = client_round(alg, strategy, model, [(0, data)], 1)
    assert contribution.scalar_sums["a"] == pytest.approx(6 * 5.61, abs=1e-10)
    torch.testing.assert_close(contribution.mean("d"), (w0 - w1) / 5.61, rtol=0, atol=1e-7)
    # the trained weights are left in place (d is written into the gradient buffer)
    torch.testing.assert_close(model.params, w1, rtol=0, atol=1e-7)


def test_equal_steps_no_momentum_is_fedavg() -> None:
    # ρ = 0 and τ_k = τ for all k: τ_eff = τ and w − τ Σ p (w − w_k)/τ = Σ p w_k.
    clients = make_clients([4, 4, 4], seed=25)
    local = {"lr": 0.1, "batch_size": 2}
    nova = run_rounds(FedNova(FedNovaConfig(**local)), linear_model(seed=26), clients, 2)
    avg = run_rounds(FedAvg(FedAvgConfig(**local)), linear_model(seed=26), clients, 2)
    torch.testing.assert_close(nova.params, avg.params, rtol=0, atol=1e-6)


def test_permutation_invariance() -> None:
    clients = make_clients([2, 5, 9], seed=27)
    alg = FedNova(FedNovaConfig(lr=0.1, batch_size=2, momentum=0.9))
    a = run_rounds(alg, linear_model(seed=28), clients, 2, order=[0, 1, 2])
    b = run_rounds(alg, linear_model(seed=28), clients, 2, order=[1, 2, 0])
    torch.testing.assert_close(a.params, b.params, rtol=0, atol=1e-6)
