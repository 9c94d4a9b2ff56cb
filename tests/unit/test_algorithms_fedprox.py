"""FedProx: μ = 0 is FedAvg bit for bit; μ > 0 is SGD on F_k + (μ/2)||w − w^t||²."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _fl_helpers import linear_model, make_clients, no_server_requests, run_rounds, task_seed

from roost.algorithms import FedAvg, FedAvgConfig, FedAvgStrategy, FedProx, FedProxConfig
from roost.algorithms.base import ClientContext, drive
from roost.params import FlatModel
from roost.registry import ConfigError


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_mu_zero_equals_fedavg_exactly(momentum: float) -> None:
    # Three clients of different sizes (one batch, a short last batch, several batches),
    # two rounds. With μ = 0 no correction is installed, so every float operation is the
    # same as FedAvg's and the global models are identical.
    clients = make_clients([3, 7, 12], seed=11)
    local = {"batch_size": 4, "lr": 0.1, "momentum": momentum, "local_epochs": 2}
    fedavg = run_rounds(FedAvg(FedAvgConfig(**local)), linear_model(seed=12), clients, 2)
    fedprox = run_rounds(FedProx(FedProxConfig(mu=0.0, **local)), linear_model(seed=12), clients, 2)
    assert torch.equal(fedprox.params, fedavg.params)
    assert fedprox.version == fedavg.version == 2
    # ... and μ > 0 does change the result
    prox = run_rounds(FedProx(FedProxConfig(mu=0.5, **local)), linear_model(seed=12), clients, 2)
    assert not torch.equal(prox.params, fedavg.params)


def test_server_is_fedavgs() -> None:
    assert isinstance(FedProx(FedProxConfig()).make_strategy(), FedAvgStrategy)


def test_proximal_term_matches_autograd() -> None:
    # Reference: torch.optim.SGD on the explicit objective CE + (μ/2)||w − w^t||², with the
    # gradient from autograd. 10 examples, batch 4, 2 epochs, no shuffling: 6 steps, all
    # but the first with w ≠ w^t so the term acts.
    mu, lr = 0.7, 0.2
    module = linear_model(4, 3, seed=13)
    reference = copy.deepcopy(module)
    anchor = [p.detach().clone() for p in reference.parameters()]
    (data,) = make_clients([10], seed=14)

    alg = FedProx(FedProxConfig(mu=mu, lr=lr, batch_size=4, local_epochs=2, shuffle=False))
    model = FlatModel(module)
    strategy = alg.make_strategy()
    strategy.initialize(model.params)
    payload = strategy.payload(1)
    model.load_(payload.params)
    seed = task_seed(0, 1)
    ctx = ClientContext(0, 1, seed, len(data), torch.Generator().manual_seed(seed))
    out = drive(alg.update(ctx, model, data, payload, None), no_server_requests)

    opt = torch.optim.SGD(reference.parameters(), lr=lr)
    for _ in range(2):
        for s in range(0, 10, 4):
            opt.zero_grad()
            loss = F.cross_entropy(reference(data.x[s : s + 4]), data.y[s : s + 4])
            prox = sum(
                ((p - a) ** 2).sum() for p, a in zip(reference.parameters(), anchor, strict=True)
            )
            (loss + 0.5 * mu * prox).backward()
            opt.step()
    expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    assert out.metrics["local_steps"] == 6.0
    torch.testing.assert_close(out.result.tensors["params"], expected, rtol=0, atol=1e-6)
    # the anchor w^t (the payload) is untouched by training
    assert torch.equal(payload.params, strategy.params)


def test_mu_validation() -> None:
    with pytest.raises(ConfigError) as err:
        FedProxConfig(mu=-1.0)
    assert err.value.key == "mu"
    assert "mu" in str(err.value)
    with pytest.raises(ConfigError) as err:
        FedProxConfig(mu=float("nan"))
    assert err.value.key == "mu"
