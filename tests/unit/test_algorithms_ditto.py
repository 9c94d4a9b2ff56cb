"""Ditto: the λ-regularised personal step, personal state kept between selections, the
FedAvg global model, and personal evaluation on the client's own test split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _fl_helpers import (
    check_state_survives,
    client_task,
    hand_clients,
    linear_model,
    make_clients,
    np_linear_loss_acc,
    np_local_sgd,
    run_rounds,
    zero_linear,
)

from roost.algorithms import ALGORITHMS, Ditto, DittoConfig, FedAvg, FedAvgConfig, FedAvgStrategy
from roost.algorithms.base import Contribution, Strategy, Tensors
from roost.data.base import ClientData
from roost.params import FlatModel
from roost.registry import ConfigError

ATOL = 1e-6


def close(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(np.asarray(expected, dtype=np.float64))
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=ATOL)


def ditto_round(
    alg: Ditto,
    strategy: Strategy,
    model: FlatModel,
    clients: list[ClientData],
    selected: list[int],
    rnd: int,
    states: dict[int, Tensors],
    test_data: dict[int, ClientData] | None = None,
) -> dict[int, dict[str, float]]:
    """One round through the real client update and strategy; returns each client's metrics."""
    payload = strategy.payload(rnd)
    contribution = Contribution()
    metrics = {}
    for cid in selected:
        out = client_task(alg, model, clients[cid], payload, cid, rnd, states, test_data)
        assert out.result.weight == float(len(clients[cid]))
        contribution.fold(out.result, cid)
        metrics[cid] = out.metrics
    strategy.step(rnd, [contribution])
    return metrics


def setup(lam: float, lr: float, batch_size: int, epochs: int, personal_epochs: int):
    cfg = DittoConfig(
        lam=lam,
        lr=lr,
        batch_size=batch_size,
        local_epochs=epochs,
        personal_epochs=personal_epochs,
        shuffle=False,
    )
    alg = Ditto(cfg)
    model = FlatModel(zero_linear())
    strategy = alg.make_strategy()
    strategy.initialize(model.params, 3)
    return alg, model, strategy


def test_round_one_by_hand() -> None:
    # w⁰ = 0, λ = 1/2, η = 1/2, one step per model (A's 1 example and B's 2 are one batch).
    # v_k starts at w⁰, so v_k − w⁰ = 0 at the step and v_k = −η g_k (hand_clients); the
    # global copy takes the same step, and the server takes the n_k-weighted mean (1 : 2):
    #   v_A = w_A = (1/4, 1/2, −1/4, −1/2, 1/4, −1/4)
    #   v_B = w_B = (−1/4, 1/4, 1/4, −1/4, −1/4, 1/4)
    #   w¹ = (w_A + 2 w_B)/3 = (−1/12, 1/3, 1/12, −1/3, −1/12, 1/12)
    # A's test example x = (1, 0), y = 0 under v_A: logits (1/4 + 1/4, −1/4 − 1/4) =
    # (1/2, −1/2), loss log(1 + e^{−1}) = 0.3132616875..., correct (accuracy 1).
    clients = hand_clients()
    alg, model, strategy = setup(lam=0.5, lr=0.5, batch_size=2, epochs=1, personal_epochs=1)
    states: dict[int, Tensors] = {}
    tests = {0: ClientData(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))}
    metrics = ditto_round(alg, strategy, model, clients, [0, 1], 1, states, tests)
    close(states[0]["personal"], [0.25, 0.5, -0.25, -0.5, 0.25, -0.25])
    close(states[1]["personal"], [-0.25, 0.25, 0.25, -0.25, -0.25, 0.25])
    close(strategy.params, [-1 / 12, 1 / 3, 1 / 12, -1 / 3, -1 / 12, 1 / 12])
    assert metrics[0]["trained_personal_loss"] == pytest.approx(
        math.log(1 + math.exp(-1)), abs=ATOL
    )
    assert metrics[0]["trained_personal_accuracy"] == 1.0
    assert metrics[0]["local_steps"] == 1.0
    # B has no test split: no personal metrics, only the global training ones
    assert set(metrics[1]) == {"train_loss", "local_steps"}


@pytest.mark.parametrize(
    ("lam", "lr", "batch_size", "epochs", "personal_epochs"),
    [(0.5, 0.5, 2, 1, 1), (1.0, 0.3, 1, 1, 2), (0.0, 0.3, 2, 2, 1)],
)
def test_three_rounds_match_numpy_oracle(
    lam: float, lr: float, batch_size: int, epochs: int, personal_epochs: int
) -> None:
    # Selections {A, B}, {A}, {A, B}: B sits out round 2, so its v_B must come back in
    # round 3 exactly as it left round 1, and then be pulled towards w² (not w¹). The
    # oracle: v ← v − η (∇F_k(v) + λ (v − w^t)) for personal_epochs epochs, w_k by plain
    # SGD from w^t, w^{t+1} = Σ n_k w_k / Σ n_k, in float64 numpy.
    clients = hand_clients()
    alg, model, strategy = setup(lam, lr, batch_size, epochs, personal_epochs)
    states: dict[int, Tensors] = {}
    tests = {k: clients[(k + 1) % 3] for k in range(3)}  # some other client's examples

    w = np.zeros(6)
    v: dict[int, np.ndarray] = {}
    for rnd, selected in enumerate([[0, 1], [0], [0, 1]], start=1):
        before = {k: s["personal"].clone() for k, s in states.items()}
        metrics = ditto_round(alg, strategy, model, clients, selected, rnd, states, tests)
        local, sizes = [], []
        for k in selected:
            v[k], _ = np_local_sgd(
                v.get(k, w),
                clients[k],
                lr,
                batch_size,
                personal_epochs,
                lambda t, w=w: lam * (t - w),
            )
            w_k, _ = np_local_sgd(w, clients[k], lr, batch_size, epochs)
            local.append(len(clients[k]) * w_k)
            sizes.append(len(clients[k]))
            close(states[k]["personal"], v[k])
            loss, acc = np_linear_loss_acc(v[k], tests[k])
            assert metrics[k]["trained_personal_loss"] == pytest.approx(loss, abs=ATOL)
            assert metrics[k]["trained_personal_accuracy"] == acc
        for k, state in before.items():
            if k not in selected:  # not selected: personal model untouched
                assert torch.equal(states[k]["personal"], state)
        w = np.sum(local, axis=0) / np.sum(sizes)
        close(strategy.params, w)
    assert set(states) == {0, 1}


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_global_model_is_fedavg_exactly(momentum: float) -> None:
    # The global copy is trained by FedAvg's own update with the task's shuffles restored
    # after the personal pass, and the server is FedAvgStrategy: bit-identical to FedAvg.
    clients = make_clients([3, 7, 12], seed=51)
    local = {"batch_size": 4, "lr": 0.1, "momentum": momentum, "local_epochs": 2}
    fedavg = run_rounds(FedAvg(FedAvgConfig(**local)), linear_model(seed=52), clients, 3)
    ditto = run_rounds(
        Ditto(DittoConfig(lam=0.7, personal_epochs=3, **local)), linear_model(seed=52), clients, 3
    )
    assert torch.equal(ditto.params, fedavg.params)
    assert isinstance(Ditto(DittoConfig()).make_strategy(), FedAvgStrategy)


def test_personal_state_initialised_from_global_model() -> None:
    # A client's first task starts v_k from w^t (here a non-zero w^1), not from w^0.
    clients = hand_clients()
    alg, model, strategy = setup(lam=0.5, lr=0.5, batch_size=2, epochs=1, personal_epochs=1)
    states: dict[int, Tensors] = {}
    ditto_round(alg, strategy, model, clients, [0], 1, states)
    w1 = strategy.params.double().numpy()
    ditto_round(alg, strategy, model, clients, [2], 2, states)
    expected, _ = np_local_sgd(w1, clients[2], 0.5, 2, 1, lambda t: 0.5 * (t - w1))
    assert not np.allclose(w1, 0.0)  # w^1 differs from w^0 = 0, so the start matters
    close(states[2]["personal"], expected)


def test_spec_work_and_registration() -> None:
    alg = Ditto(DittoConfig(local_epochs=2, personal_epochs=3))
    assert alg.uses_client_test_data
    assert alg.client_state_spec(11) == {"personal": 11}
    assert alg.work_examples(10) == 50
    assert alg.upload_nbytes(11) == 4 * 11
    assert ALGORITHMS.get("ditto").factory is Ditto
    defaults = DittoConfig()
    assert (defaults.lam, defaults.personal_epochs, defaults.weighted) == (1.0, 1, True)


def test_config_validation() -> None:
    for bad in (-0.1, float("nan")):
        with pytest.raises(ConfigError) as err:
            DittoConfig(lam=bad)
        assert err.value.key == "lam"
    with pytest.raises(ConfigError) as err:
        DittoConfig(personal_epochs=0)
    assert err.value.key == "personal_epochs"


@pytest.mark.parametrize(
    ("runtime", "state_store"), [("local", "memory"), ("workers", "memory"), ("workers", "disk")]
)
def test_client_state_survives_between_rounds(
    runtime: str, state_store: str, tmp_path, monkeypatch
) -> None:
    # 5 rounds x 3 clients: every task was recorded and checked
    assert check_state_survives("ditto", runtime, tmp_path, monkeypatch, state_store) == 15
