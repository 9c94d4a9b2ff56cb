"""SplitFed v1 (issue 10): with float32 messages and one micro-batch each minibatch's
gradients are exactly the whole model's (tests/unit/test_split.py), so its rounds are
FedAvg's bit for bit; micro-batches and float16 messages change the model only by float
rounding; the cut's traffic is counted by hand; and deployment refuses it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _fl_helpers import client_task, make_clients, run_rounds
from torch import nn

from roost.algorithms import FedAvg, FedAvgConfig, SplitFed, SplitFedConfig
from roost.algorithms.base import Payload
from roost.params import FlatModel
from roost.registry import ConfigError


def _net(seed: int = 0) -> nn.Sequential:
    """4 inputs -> Linear(4, 6) -> ReLU -> Linear(6, 5) -> ReLU -> Linear(5, 3): 5 layers."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _clients() -> list:
    return make_clients([16, 9, 24], 4, 3, seed=3)


@pytest.mark.parametrize("cut", [1, 2, 4])
def test_splitfed_with_float32_and_one_micro_batch_is_fedavg_bit_for_bit(cut: int) -> None:
    """Three rounds of 3 clients, batch 8 (so epochs end on short minibatches of 1 and 8),
    momentum 0.9: the same model as unweighted FedAvg, exactly, at every cut."""
    opt = {"batch_size": 8, "lr": 0.1, "momentum": 0.9, "weighted": False}
    plain = run_rounds(FedAvg(FedAvgConfig(**opt)), _net(), _clients(), 3)
    split = run_rounds(SplitFed(SplitFedConfig(**opt, cut=cut)), _net(), _clients(), 3)
    assert torch.equal(split.params, plain.params)


def test_micro_batches_and_float16_messages_change_the_model_only_by_rounding() -> None:
    """4 micro-batches of 2 per minibatch of 8: the same mean gradient up to float32 sums
    (to 1e-6 after three rounds); float16 activations and gradients round each message
    to 11 significant bits, which moves the model by under 1e-2 here but not by 0."""
    opt = {"batch_size": 8, "lr": 0.1, "weighted": False}
    plain = run_rounds(FedAvg(FedAvgConfig(**opt)), _net(), _clients(), 3).params
    micro = run_rounds(SplitFed(SplitFedConfig(**opt, micro_batches=4)), _net(), _clients(), 3)
    assert (micro.params - plain).abs().max().item() <= 1e-6
    half = SplitFedConfig(**opt, wire_dtype="float16")
    fp16 = run_rounds(SplitFed(half), _net(), _clients(), 3).params
    assert 0 < (fp16 - plain).abs().max().item() <= 1e-2


def test_the_cuts_traffic_is_counted_by_hand() -> None:
    """Client of 9 examples, batch 4: minibatches of 4, 4, 1. Default cut: 5 layers // 2 =
    2, after Linear(4, 6) and ReLU: 6 activations per example. Uplink per example 6·4
    float32 bytes + 1 label byte (uint8): 25·9 = 225; downlink 24·9 = 216. The device part
    (Linear(4, 6): 30 parameters, 120 bytes) goes down at the start and up at the end:
    345 up, 336 down. In float16: 13·9 + 120 = 237 up, 12·9 + 120 = 228 down."""
    (data,) = make_clients([9], 4, 3, seed=5)
    for dtype, up, down in (("float32", 345, 336), ("float16", 237, 228)):
        alg = SplitFed(SplitFedConfig(batch_size=4, wire_dtype=dtype))
        model = FlatModel(_net())
        payload = Payload(model.params.clone(), 0)
        metrics = client_task(alg, model, data, payload, 0, 1).metrics
        assert (metrics["cut_bytes_up"], metrics["cut_bytes_down"]) == (up, down)
        assert metrics["local_steps"] == 3


def test_bad_settings_name_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match="micro_batches"):
        SplitFedConfig(batch_size=4, micro_batches=5)
    with pytest.raises(ConfigError, match="float32, float16, bfloat16"):
        SplitFedConfig(wire_dtype="int8")
    with pytest.raises(ConfigError, match="cut"):
        SplitFedConfig(cut=-1)
    alg = SplitFed(SplitFedConfig(cut=9))
    model = FlatModel(_net())
    (data,) = make_clients([4], 4, 3)
    with pytest.raises(ValueError, match=r"the cuts allowed are 1 \.\. 4"):
        client_task(alg, model, data, Payload(model.params.clone(), 0), 0, 1)


def test_serving_a_split_method_without_a_deployment_is_refused_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A method that splits the model but gives no ``split_serving`` (none of the shipped
    ones: this one is deprune with its deployment taken away) is refused by ``roost
    serve`` before anything starts, naming the algorithm."""
    pytest.importorskip("grpc")
    pytest.importorskip("cryptography")
    from roost.config import resolve
    from roost.deploy.keys import make_federation
    from roost.deployment import ServeOptions, serve

    keys = tmp_path / "keys"
    make_federation(keys, 1)
    tree = {
        "rounds": 1,
        "clients": 2,
        "clients_per_round": 1,
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [64]},
        "algorithm": {"name": "deprune"},
    }
    from roost.algorithms.deprune import Deprune

    monkeypatch.setattr(Deprune, "split_serving", lambda self, build, info: None)
    options = ServeOptions(address="127.0.0.1:0", keys=keys)
    with pytest.raises(ConfigError, match=r"deploying it .* is not built yet for this method"):
        serve(resolve(tree), tmp_path / "run", options)
