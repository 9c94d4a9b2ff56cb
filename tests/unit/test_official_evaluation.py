"""The metrics FedDyn and Ditto report are the ones their official code reports.

FedDyn (github.com/alpemreacar/FedDyn) reports the test accuracy of the mean of the round's
client models, not of the "cloud" model clients train from. Ditto (github.com/litian96/ditto)
reports every client's personal model on its own test split, correct predictions summed
over all clients' test examples, with personal models that were never trained at w^0.

Oracles: a FedDyn step on hand-made client models (the mean is known exactly), and, for
whole runs, the metric recomputed from what the run kept on disk (the checkpoint's client
states and strategy, the seeded w^0) with a fresh module and a plain loop.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from roost.algorithms import FedDynStrategy
from roost.algorithms.base import ClientResult, Contribution
from roost.build import build_parts, initial_params
from roost.config import apply_overrides, load_config_source, resolve
from roost.evaluation import evaluate
from roost.params import ParamLayout
from roost.runner import run


def _contribution(models: list[list[float]]) -> Contribution:
    c = Contribution()
    for i, m in enumerate(models):
        c.fold(ClientResult({"params": torch.tensor(m)}, 1.0), i)
    return c


def test_feddyn_evaluates_the_mean_of_the_rounds_client_models() -> None:
    # θ⁰ = (0, 0), α = 0.5, N = 4, clients θ_1 = (1, 2), θ_2 = (3, 0):
    #   mean = (2, 1); h = −α (2/4)(mean − θ⁰) = (−0.5, −0.25); θ¹ = mean − h/α = (3, 1.5)
    strategy = FedDynStrategy(alpha=0.5)
    strategy.initialize(torch.zeros(2), num_clients=4)
    assert torch.equal(strategy.eval_params, torch.zeros(2))  # before any round: θ⁰
    strategy.step(1, [_contribution([[1.0, 2.0], [3.0, 0.0]])])
    torch.testing.assert_close(strategy.params, torch.tensor([3.0, 1.5]))
    torch.testing.assert_close(strategy.eval_params, torch.tensor([2.0, 1.0]))
    # a round without clients keeps the last mean
    strategy.step(2, [Contribution()])
    torch.testing.assert_close(strategy.eval_params, torch.tensor([2.0, 1.0]))
    # the mean survives a checkpoint
    again = FedDynStrategy(alpha=0.5)
    again.initialize(torch.zeros(2), num_clients=4)
    again.load_state_dict(strategy.state_dict())
    torch.testing.assert_close(again.eval_params, torch.tensor([2.0, 1.0]))


def test_feddyn_cloud_option_evaluates_the_server_model() -> None:
    strategy = FedDynStrategy(alpha=0.5, evaluate="cloud")
    strategy.initialize(torch.zeros(2), num_clients=4)
    strategy.step(1, [_contribution([[1.0, 2.0], [3.0, 0.0]])])
    torch.testing.assert_close(strategy.eval_params, torch.tensor([3.0, 1.5]))


SMALL = ["rounds=3", "clients=20", "clients_per_round=5", "model.hidden=16", "eval_every=1"]


def _load(module: torch.nn.Module, flat: torch.Tensor) -> None:
    views = ParamLayout.of(module).views(flat)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(views[name])


def _central_accuracy(cfg, params: torch.Tensor) -> float:
    parts = build_parts(cfg)
    module = parts.build_module()
    _load(module, params)
    return evaluate(module, parts.dataset.test_data())[1]


@pytest.mark.parametrize(("mode", "key"), [("client_mean", "client_mean"), ("cloud", "params")])
def test_a_feddyn_run_reports_the_accuracy_of_the_model_it_names(tmp_path, mode, key) -> None:
    overrides = ["algorithm=feddyn", f"algorithm.evaluate={mode}", *SMALL]
    cfg = resolve(apply_overrides(load_config_source("quickstart"), overrides))
    history = run(cfg, tmp_path / "run")
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    strategy = checkpoint["strategy"]
    assert not torch.equal(strategy["client_mean"], strategy["params"])  # h != 0 after round 1
    expected = _central_accuracy(cfg, strategy[key])
    assert history.final["accuracy"] == pytest.approx(expected, abs=1e-12)


def _leaf(folder: Path, writers: int = 6) -> Path:
    """Writers with 4 classes of 16 noisy features: each writer's class means are shifted
    by its own offset, so personal models can beat the global one."""
    rng = random.Random(0)
    for split, n in (("train", 24), ("test", 8)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        users = [f"w{i}" for i in range(writers)]
        data = {}
        for i, u in enumerate(users):
            ys = [rng.randrange(4) for _ in range(n)]
            xs = [[(y + 1) / 5 + 0.3 * (i % 3) + rng.gauss(0, 0.15) for _ in range(16)] for y in ys]
            data[u] = {"x": xs, "y": ys}
        (folder / split / "d.json").write_text(
            json.dumps({"users": users, "num_samples": [n] * writers, "user_data": data})
        )
    return folder


def _ditto_oracle(cfg, out: Path) -> tuple[float, int]:
    """The official metric recomputed from the checkpoint: every client's personal model
    (w^0 where the client has no state) on its test split; correct / test examples."""
    parts = build_parts(cfg)
    w0 = initial_params(cfg, parts)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    states = {int(k): v for k, v in checkpoint["client_state"]["states"].items()}
    module = parts.build_module()
    correct = examples = 0
    for cid in range(parts.dataset.num_clients):
        test = parts.dataset.client_test_data(cid)
        assert test is not None and len(test) == 8
        params = states[cid]["personal"] if cid in states else w0
        _load(module, params)
        with torch.no_grad():
            correct += int((module(test.x).argmax(1) == test.y).sum())
        examples += len(test)
    return correct / examples, len(states)


def _ditto_config(leaf: Path, *extra: str):
    """Ditto on the writers of ``leaf``, 2 rounds, as a user would type it on the preset."""
    base = ["algorithm=ditto", "data=leaf", f"data.path={leaf}", "rounds=2", "model.hidden=8"]
    return resolve(apply_overrides(load_config_source("quickstart"), [*base, *extra]))


def test_ditto_personal_accuracy_is_the_official_metric(tmp_path) -> None:
    cfg = _ditto_config(_leaf(tmp_path / "leaf"), "clients_per_round=2")
    assert (cfg.name("partition"), cfg.run.clients) == ("natural", None)
    history = run(cfg, tmp_path / "run")
    final = history.final
    expected, trained = _ditto_oracle(cfg, tmp_path / "run")
    # 2 rounds of 2 clients out of 6: at least 2 clients are still at w^0
    assert 2 <= trained <= 4
    assert final["personal_clients"] == 6
    assert final["personal_accuracy"] == pytest.approx(expected, abs=1e-12)
    # the earlier metric (the round's own clients, just trained) is kept under its own name
    assert "client_trained_personal_accuracy" in final
    assert "client_personal_accuracy" not in final


def test_ditto_personal_metric_is_the_same_on_workers_with_disk_state(tmp_path) -> None:
    leaf = _leaf(tmp_path / "leaf")
    local = run(_ditto_config(leaf, "clients_per_round=3"))
    on_workers = ["runtime=workers", "workers=2", "state_store=disk"]
    workers = run(_ditto_config(leaf, "clients_per_round=3", *on_workers), tmp_path / "w")
    for a, b in zip(local.records, workers.records, strict=True):
        assert a["personal_accuracy"] == pytest.approx(b["personal_accuracy"], abs=1 / 48)
        assert a["personal_loss"] == pytest.approx(b["personal_loss"], rel=1e-4)


def test_ditto_personal_eval_off_skips_it(tmp_path) -> None:
    leaf = _leaf(tmp_path / "leaf")
    overrides = ["algorithm=ditto", "algorithm.personal_eval=off", "data=leaf"]
    tree = apply_overrides(load_config_source("quickstart"), overrides)
    cfg = resolve(apply_overrides(tree, [f"data.path={leaf}", "rounds=1", "clients_per_round=2"]))
    assert "personal_accuracy" not in run(cfg).final
