"""SCAFFOLD: corrected local steps, option II controls, and the server's x and c updates."""

from __future__ import annotations

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
    run_rounds,
    zero_linear,
)

from roost.algorithms import ALGORITHMS, FedAvg, FedAvgConfig, Scaffold, ScaffoldConfig
from roost.algorithms.base import ClientResult, Contribution, Tensors
from roost.algorithms.scaffold import ScaffoldStrategy
from roost.data.base import ClientData
from roost.params import FlatModel
from roost.registry import ConfigError

ATOL = 1e-6


def scaffold_round(
    alg: Scaffold,
    strategy: ScaffoldStrategy,
    model: FlatModel,
    clients: list[ClientData],
    selected: list[int],
    rnd: int,
    states: dict[int, Tensors],
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """One round through the real client update and strategy; returns each client's Δy, Δc."""
    payload = strategy.payload(rnd)
    contribution = Contribution()
    dy, dc = {}, {}
    for cid in selected:
        out = client_task(alg, model, clients[cid], payload, cid, rnd, states)
        assert out.result.weight == 1.0
        dy[cid] = out.result.tensors["delta"].clone()
        dc[cid] = out.result.tensors["control_delta"].clone()
        contribution.fold(out.result, cid)
    strategy.step(rnd, [contribution])
    return dy, dc


def close(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(np.asarray(expected, dtype=np.float64))
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=ATOL)


def test_round_one_by_hand() -> None:
    # θ = x⁰ = 0, c = c_k = 0, η_l = 1/2, one step each (A's 1 example and B's 2 form one
    # batch), N = 4 clients of which S = {A, B} take part, η_g = 1. With the gradients
    # g_A = (−1/2, −1, 1/2, 1, −1/2, 1/2), g_B = (1/2, −1/2, −1/2, 1/2, 1/2, −1/2)
    # (hand_clients):
    #   Δy_A = −η_l g_A = (1/4, 1/2, −1/4, −1/2, 1/4, −1/4)
    #   Δy_B = −η_l g_B = (−1/4, 1/4, 1/4, −1/4, −1/4, 1/4)
    #   c_k⁺ = 0 − 0 + (x − y_k)/(1 · η_l) = g_k,  so Δc_A = g_A, Δc_B = g_B
    #   x¹ = 0 + 1 · (Δy_A + Δy_B)/2 = (0, 3/8, 0, −3/8, 0, 0)
    #   c¹ = 0 + (2/4) (g_A + g_B)/2 = (0, −3/8, 0, 3/8, 0, 0)
    clients = hand_clients()
    alg = Scaffold(ScaffoldConfig(lr=0.5, batch_size=2, shuffle=False))
    model = FlatModel(zero_linear())
    strategy = alg.make_strategy()
    assert isinstance(strategy, ScaffoldStrategy)
    strategy.initialize(model.params, 4)
    states: dict[int, Tensors] = {}
    dy, dc = scaffold_round(alg, strategy, model, clients, [0, 1], 1, states)

    g_a = [-0.5, -1.0, 0.5, 1.0, -0.5, 0.5]
    g_b = [0.5, -0.5, -0.5, 0.5, 0.5, -0.5]
    close(dy[0], [0.25, 0.5, -0.25, -0.5, 0.25, -0.25])
    close(dy[1], [-0.25, 0.25, 0.25, -0.25, -0.25, 0.25])
    close(dc[0], g_a)
    close(dc[1], g_b)
    close(states[0]["control"], g_a)
    close(states[1]["control"], g_b)
    close(strategy.params, [0.0, 0.375, 0.0, -0.375, 0.0, 0.0])
    close(strategy.control, [0.0, -0.375, 0.0, 0.375, 0.0, 0.0])
    assert strategy.version == 1


@pytest.mark.parametrize(
    ("lr", "batch_size", "epochs", "server_lr"), [(0.5, 2, 1, 1.0), (0.3, 1, 2, 0.5)]
)
def test_two_rounds_match_numpy_oracle(
    lr: float, batch_size: int, epochs: int, server_lr: float
) -> None:
    # Round 1: S = {A, B}; round 2: S = {A, C}, so A starts from its own c_A ≠ 0 and C from
    # c_C = 0 while c ≠ 0. N = 4. The oracle is the update equations in float64 numpy.
    # The second case takes K = 2, 4, 6 steps (batch 1, 2 epochs), so K enters c_k⁺.
    clients = hand_clients()
    n_total = 4
    rounds = [[0, 1], [0, 2]]
    alg = Scaffold(
        ScaffoldConfig(
            lr=lr, batch_size=batch_size, local_epochs=epochs, shuffle=False, server_lr=server_lr
        )
    )
    model = FlatModel(zero_linear())
    strategy = alg.make_strategy()
    assert isinstance(strategy, ScaffoldStrategy)
    strategy.initialize(model.params, n_total)
    states: dict[int, Tensors] = {}

    x, c = np.zeros(6), np.zeros(6)
    ck: dict[int, np.ndarray] = {}
    for rnd, selected in enumerate(rounds, start=1):
        dy, dc = scaffold_round(alg, strategy, model, clients, selected, rnd, states)
        dys, dcs = [], []
        for k in selected:
            c_k = ck.get(k, np.zeros(6))
            y, steps = np_local_sgd(x, clients[k], lr, batch_size, epochs, lambda _, s=c - c_k: s)
            c_new = c_k - c + (x - y) / (steps * lr)
            dys.append(y - x)
            dcs.append(c_new - c_k)
            ck[k] = c_new
            close(dy[k], y - x)
            close(dc[k], c_new - c_k)
            close(states[k]["control"], c_new)
        x = x + server_lr * np.mean(dys, axis=0)
        c = c + len(selected) / n_total * np.mean(dcs, axis=0)
        close(strategy.params, x)
        close(strategy.control, c)
    assert strategy.version == 2
    # the correction mattered: the round-2 steps moved by more than the tolerance
    assert np.abs(c).max() > 1e-2
    # B sat out round 2: its control is the one it returned in round 1
    assert set(states) == {0, 1, 2}


def test_zero_controls_and_one_step_is_fedavg() -> None:
    # Round 1 has c = c_k = 0, so the corrected step is plain SGD; the server's
    # x + mean(y_k − x) is the uniform mean of the y_k. With a single step (batch 8 covers
    # every client) c_k⁺ = (x − y_k)/η_l is the gradient ∇F_k(x) itself.
    clients = make_clients([5, 8, 3], seed=31)
    local = {"lr": 0.1, "batch_size": 8}
    scaffold = run_rounds(Scaffold(ScaffoldConfig(**local)), linear_model(seed=32), clients, 1)
    fedavg = run_rounds(
        FedAvg(FedAvgConfig(weighted=False, **local)), linear_model(seed=32), clients, 1
    )
    torch.testing.assert_close(scaffold.params, fedavg.params, rtol=0, atol=ATOL)

    module = linear_model(seed=32)
    model = FlatModel(module)
    alg = Scaffold(ScaffoldConfig(**local))
    strategy = alg.make_strategy()
    strategy.initialize(model.params, 3)
    states: dict[int, Tensors] = {}
    out = client_task(alg, model, clients[1], strategy.payload(1), 1, 1, states)
    assert out.metrics["local_steps"] == 1.0
    model.load_(strategy.params)
    model.zero_grad_()  # (module.zero_grad() would unbind the flat gradient buffer)
    F.cross_entropy(module(clients[1].x), clients[1].y).backward()
    torch.testing.assert_close(states[1]["control"], model.grads, rtol=0, atol=ATOL)


def test_payload_carries_control_and_step_is_not_in_place() -> None:
    strategy = ScaffoldStrategy(server_lr=1.0)
    strategy.initialize(torch.zeros(2), 2)
    sent = strategy.payload(1)
    assert set(sent.extras) == {"control"}
    assert sent.extras["control"].tolist() == [0.0, 0.0]
    assert sent.nbytes == 2 * 4 * 2  # x and c
    c = Contribution()
    for cid, (dy, dc) in enumerate([([1.0, 2.0], [4.0, 0.0]), ([3.0, -2.0], [0.0, 8.0])]):
        c.fold(ClientResult({"delta": torch.tensor(dy), "control_delta": torch.tensor(dc)}, 1), cid)
    strategy.step(1, [c])
    # x = 0 + mean Δy = (2, 0);  c = 0 + (2/2) mean Δc = (2, 4)
    assert strategy.params.tolist() == [2.0, 0.0]
    assert strategy.control.tolist() == [2.0, 4.0]
    assert sent.params.tolist() == [0.0, 0.0]
    assert sent.extras["control"].tolist() == [0.0, 0.0]
    assert strategy.payload(2).extras["control"].tolist() == [2.0, 4.0]


def test_state_dict_holds_control() -> None:
    strategy = ScaffoldStrategy()
    strategy.initialize(torch.zeros(3), 5)
    strategy.control = torch.tensor([1.0, -2.0, 0.5])
    saved = strategy.state_dict()
    assert torch.equal(saved["control"], strategy.control)
    fresh = ScaffoldStrategy()
    fresh.initialize(torch.zeros(3), 5)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.control, strategy.control)
    saved["control"].zero_()  # the loaded copy is the strategy's own
    assert fresh.control.tolist() == [1.0, -2.0, 0.5]


def test_spec_and_traffic() -> None:
    alg = Scaffold(ScaffoldConfig())
    assert alg.client_state_spec(7) == {"control": 7}
    assert alg.upload_nbytes(7) == 2 * 4 * 7
    assert ALGORITHMS.get("scaffold").factory is Scaffold


def test_config_validation() -> None:
    with pytest.raises(ConfigError) as err:
        ScaffoldConfig(momentum=0.9)
    assert err.value.key == "momentum"
    assert "plain SGD" in str(err.value)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ConfigError) as err:
            ScaffoldConfig(server_lr=bad)
        assert err.value.key == "server_lr"
    ScaffoldConfig(weight_decay=1e-4)  # allowed


def test_needs_the_number_of_clients() -> None:
    strategy = ScaffoldStrategy()
    strategy.initialize(torch.zeros(1))  # N not given
    c = Contribution()
    c.fold(ClientResult({"delta": torch.ones(1), "control_delta": torch.ones(1)}, 1), 0)
    with pytest.raises(ValueError, match="number of clients"):
        strategy.step(1, [c])


@pytest.mark.parametrize(
    ("runtime", "state_store"), [("local", "memory"), ("workers", "memory"), ("workers", "disk")]
)
def test_client_state_survives_between_rounds(
    runtime: str, state_store: str, tmp_path, monkeypatch
) -> None:
    # 5 rounds x 3 clients: every task was recorded and checked
    assert check_state_survives("scaffold", runtime, tmp_path, monkeypatch, state_store) == 15
