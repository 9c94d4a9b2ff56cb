"""FedAvg: the client loop is plain (momentum) SGD, the server an example-weighted mean."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _fl_helpers import (
    contribution_of,
    linear_model,
    make_clients,
    no_server_requests,
    run_rounds,
    task_seed,
)
from torch import nn

from roost.algorithms import ALGORITHMS, FedAvg, FedAvgConfig
from roost.algorithms.base import ClientContext, ClientResult, Contribution, Payload, drive
from roost.params import FlatModel


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def one_task(alg: FedAvg, module: nn.Module, data, cid: int = 0, rnd: int = 1):
    model = FlatModel(module)
    strategy = alg.make_strategy()
    strategy.initialize(model.params)
    payload = strategy.payload(rnd)
    seed = task_seed(cid, rnd)
    ctx = ClientContext(cid, rnd, seed, len(data), torch.Generator().manual_seed(seed))
    model.load_(payload.params)
    out = drive(alg.update(ctx, model, data, payload, None), no_server_requests)
    return strategy, model, out


def test_registered_names() -> None:
    names = set(ALGORITHMS.names())
    assert {"fedavg", "fedprox", "fednova", "fedadagrad", "fedadam", "fedyogi"} <= names
    assert ALGORITHMS.get("fedavg").factory is FedAvg


def test_one_client_one_step_equals_torch_sgd() -> None:
    # One client whose 8 examples form exactly one batch: the task is a single SGD step,
    # and the weighted mean of one model with weight 8 (a power of two) is that model, so
    # the new global model must equal one torch.optim.SGD step bit for bit.
    module = linear_model(5, 3, seed=1)
    reference = copy.deepcopy(module)
    (data,) = make_clients([8], 5, 3, seed=2)
    alg = FedAvg(FedAvgConfig(batch_size=8, lr=0.1, shuffle=False))
    strategy, _model, out = one_task(alg, module, data)

    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt.zero_grad()
    F.cross_entropy(reference(data.x), data.y).backward()
    opt.step()

    assert out.result.weight == 8.0
    assert out.metrics["local_steps"] == 1.0
    assert torch.equal(out.result.tensors["params"], flat(reference))
    strategy.step(1, [_fold(out.result)])
    assert torch.equal(strategy.params, flat(reference))
    assert strategy.version == 1


def test_local_loop_equals_torch_sgd_momentum_weight_decay_shuffle() -> None:
    # 7 examples, batch 3, 2 epochs: batches of 3, 3, 1 per epoch (6 steps), reshuffled
    # each epoch from the task's generator exactly as local_sgd draws it. local_sgd performs
    # the same elementwise operations as torch.optim.SGD (dampening 0), so equality is exact.
    module = linear_model(4, 3, seed=3)
    reference = copy.deepcopy(module)
    (data,) = make_clients([7], seed=4)
    cfg = FedAvgConfig(
        local_epochs=2, batch_size=3, lr=0.05, momentum=0.9, weight_decay=1e-3, shuffle=True
    )
    _, _, out = one_task(FedAvg(cfg), module, data, cid=3, rnd=2)

    g = torch.Generator().manual_seed(task_seed(3, 2))
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    steps = 0
    for _ in range(2):
        order = torch.randperm(7, generator=g)
        xs, ys = data.x[order], data.y[order]
        for s in range(0, 7, 3):
            opt.zero_grad()
            F.cross_entropy(reference(xs[s : s + 3]), ys[s : s + 3]).backward()
            opt.step()
            steps += 1
    assert out.metrics["local_steps"] == steps == 6
    assert torch.equal(out.result.tensors["params"], flat(reference))


def _fold(result) -> Contribution:
    c = Contribution()
    c.fold(result, 0)
    return c


def test_weighted_mean_hand_computed() -> None:
    # (1*[1, 2] + 3*[5, -2]) / 4 = [4, -1]; uniform weights give [3, 0].
    strategy = FedAvg(FedAvgConfig()).make_strategy()
    strategy.initialize(torch.zeros(2))
    strategy.step(1, [contribution_of([([1.0, 2.0], 1.0), ([5.0, -2.0], 3.0)])])
    assert strategy.params.tolist() == [4.0, -1.0]
    strategy.step(2, [contribution_of([([1.0, 2.0], 1.0), ([5.0, -2.0], 1.0)])])
    assert strategy.params.tolist() == [3.0, 0.0]
    assert strategy.version == 2


@pytest.mark.parametrize("weighted", [True, False])
def test_client_weight(weighted: bool) -> None:
    (data,) = make_clients([6])
    _, _, out = one_task(FedAvg(FedAvgConfig(weighted=weighted)), linear_model(), data)
    assert out.result.weight == (6.0 if weighted else 1.0)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadagrad", "fedadam", "fedyogi"])
def test_identical_clients_leave_global_unchanged(name: str) -> None:
    # Every client returns w^t itself, with unequal weights: the weighted mean is w^t, so
    # FedAvg/FedProx keep it and FedOpt sees Δ = 0, m = v = 0, step 0 / (0 + τ) = 0.
    # Dyadic values keep the float32 sums exact.
    entry = ALGORITHMS.get(name)
    strategy = entry.factory(entry.config_cls()).make_strategy()
    w = [0.5, -1.25, 3.0, 0.0]
    strategy.initialize(torch.tensor(w))
    for r in (1, 2):
        strategy.step(r, [contribution_of([(w, 3.0), (w, 5.0), (w, 8.0)])])
        assert strategy.params.tolist() == w


def test_client_permutation_invariance() -> None:
    clients = make_clients([5, 9, 3], seed=5)
    alg = FedAvg(FedAvgConfig(batch_size=4, lr=0.1))
    a = run_rounds(alg, linear_model(seed=6), clients, rounds=2, order=[0, 1, 2])
    b = run_rounds(alg, linear_model(seed=6), clients, rounds=2, order=[2, 0, 1])
    torch.testing.assert_close(a.params, b.params, rtol=0, atol=1e-6)
    assert not torch.equal(a.params, flat(linear_model(seed=6)))


def test_empty_round_is_a_no_op() -> None:
    strategy = FedAvg(FedAvgConfig()).make_strategy()
    strategy.initialize(torch.ones(3))
    assert strategy.step(1, [Contribution()]) == {}
    assert strategy.params.tolist() == [1.0, 1.0, 1.0]
    assert strategy.version == 0


def test_step_does_not_mutate_a_sent_payload() -> None:
    strategy = FedAvg(FedAvgConfig()).make_strategy()
    strategy.initialize(torch.ones(2))
    sent: Payload = strategy.payload(1)
    strategy.step(1, [contribution_of([([3.0, 5.0], 2.0)])])
    assert sent.params.tolist() == [1.0, 1.0]
    assert strategy.payload(2).version == 1


def test_a_one_result_contribution_gives_the_float64_sums_of_before() -> None:
    """One weight-1 float32 result is kept as a float32 copy (not a view of the result:
    the runtime reuses that memory); its sums, read later, are float64(x) exactly; a
    second fold then adds w2 * float64(x2) as every fold does; merge, pickling and mean
    give what the float64 path gives."""
    import pickle

    x1 = torch.tensor([0.1, -2.5, 3.0e-8], dtype=torch.float32)
    x2 = torch.tensor([1.0, 0.3, -7.0], dtype=torch.float32)
    c = Contribution()
    c.fold(ClientResult({"p": x1}, 1.0, {"loss": 2.0}), 4)
    x1_before = x1.clone()
    x1.fill_(99.0)  # the runtime overwrites its buffers: the contribution kept a copy
    assert torch.equal(c.mean("p", copy=False), x1_before)
    assert c.mean("p").data_ptr() != c.mean("p", copy=False).data_ptr()
    assert pickle.loads(pickle.dumps(c)).sums["p"].dtype == torch.float64
    d = Contribution()
    d.fold(ClientResult({"p": x1_before}, 1.0, {"loss": 2.0}), 4)
    d.fold(ClientResult({"p": x2}, 3.0, {"loss": 1.0}), 5)
    expected = x1_before.double() + 3.0 * x2.double()
    assert torch.equal(d.sums["p"], expected)
    assert (d.weight, d.count, d.clients, d.scalar_sums) == (4.0, 2, [4, 5], {"loss": 5.0})
    assert torch.equal(d.mean("p"), (expected / 4.0).float())
    e = Contribution()
    e.fold(ClientResult({"p": x2}, 3.0), 5)
    c.merge(e)
    assert torch.equal(c.sums["p"], expected) and c.weight == 4.0
