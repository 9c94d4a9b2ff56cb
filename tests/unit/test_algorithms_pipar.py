"""PiPar (issue 10 item 3): an iteration is the batch's gradient accumulated over its
micro-batches, exactly, against plain PyTorch; the optimiser's momentum lives across
aggregations as in the reference; APS's inputs by hand; and it runs from the CLI."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _fl_helpers import make_clients, run_rounds
from torch import nn

from roost.algorithms import PiPar, PiParConfig, SplitFed, SplitFedConfig
from roost.algorithms.pipar import trained_cuts
from roost.models.cost import LayerCost
from roost.params import FlatModel
from roost.registry import ConfigError
from roost.split.plan import DeviceLink, aps_costs


def _net(seed: int = 0) -> nn.Sequential:
    """No BatchNorm: Linear(4, 6), ReLU, Linear(6, 5), ReLU, Linear(5, 3)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _reference_steps(module: nn.Module, batches, micro: int, lr: float, momentum: float):
    """Plain PyTorch: per batch, N micro-batch losses CE / N back-propagated through the
    whole model (gradients accumulate), then one torch.optim.SGD step; one optimiser for
    all batches (the reference's, created once)."""
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum)
    for x, y in batches:
        opt.zero_grad()
        m = len(x) // micro
        for j in range(micro):
            loss = F.cross_entropy(module(x[j * m : (j + 1) * m]), y[j * m : (j + 1) * m])
            (loss / micro).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


@pytest.mark.parametrize(("micro", "cut"), [(1, 2), (4, 2), (4, 4), (8, 1)])
def test_one_device_iterations_are_accumulated_sgd_exactly(micro: int, cut: int) -> None:
    """One device, F = 1 iteration per round, 3 rounds: its model after each averaging
    (of itself alone) is plain SGD with momentum 0.9 on the batch's micro-batches, bit
    for bit, with the momentum buffer carried from round to round (N = 1: centralised
    SGD on the batch)."""
    (data,) = make_clients([8], 4, 3, seed=2)  # one batch of 8 per iteration, unshuffled
    cfg = PiParConfig(
        batch_size=8, cut=cut, micro_batches=micro, aggregation_iterations=1, shuffle=False
    )
    pipar = run_rounds(PiPar(cfg), _net(), [data], 3).params
    expected = _reference_steps(_net(), [(data.x, data.y)] * 3, micro, 0.01, 0.9)
    assert torch.equal(pipar, expected)


def test_an_iteration_is_splitfed_v1s_with_gradient_accumulation() -> None:
    """Three devices, one iteration each per round, no momentum, equal weights: PiPar's
    rounds are SplitFed v1's with the same micro-batches (weighted=false), exactly; with
    momentum PiPar's state makes them differ from round 2 on."""
    clients = make_clients([8, 8, 8], 4, 3, seed=4)
    opt = {"batch_size": 8, "lr": 0.1, "weighted": False, "cut": 2, "micro_batches": 4}
    split = run_rounds(SplitFed(SplitFedConfig(**opt)), _net(), clients, 3).params
    pipar = PiPar(PiParConfig(**opt, momentum=0.0, aggregation_iterations=1))
    assert torch.equal(run_rounds(pipar, _net(), clients, 3).params, split)
    with_momentum = PiPar(PiParConfig(**opt, aggregation_iterations=1))
    assert not torch.equal(run_rounds(with_momentum, _net(), clients, 3).params, split)


def test_aggregation_every_f_iterations_and_equal_weights() -> None:
    """F = 3 on clients of 8 and 2 examples (batch 4: 2 and 1 iterations per epoch): the
    first client does 3 iterations (1.5 epochs), the second 3 (3 epochs); equal weights
    by default: the average is the plain mean of the two models."""
    clients = make_clients([8, 2], 4, 3, seed=6)
    alg = PiPar(PiParConfig(batch_size=4, cut=2, micro_batches=2, aggregation_iterations=3))
    assert alg.work_examples(8) == 4 + 4 + 4
    assert alg.work_examples(2) == 2 * 3
    strategy = run_rounds(alg, _net(), clients, 1)
    alone = [run_rounds(alg, _net(), [c], 1).params for c in clients]
    assert torch.allclose(strategy.params, (alone[0] + alone[1]) / 2, atol=1e-7)


def test_aps_inputs_by_hand() -> None:
    """Flatten (8 outputs), Linear (300 multiply-adds, 4 outputs, 10 parameters), ReLU,
    Linear (100, 2, 5): shares 0, 3/4, 0, 1/4 of the forward work. For a batch of 10 on
    a device of 0.3 s and a server of 0.03 s per example (forward + backward = 3 units),
    forward seconds are 10 * 0.3 * share / 3 = share on the device, a tenth of that on
    the server, backward twice; outputs 10 examples * elements * 4 bytes. A cut after the
    flatten would put no parameter on the device: APS leaves it out."""
    layers = [LayerCost(0, 8, 0), LayerCost(300, 4, 10), LayerCost(0, 4, 0), LayerCost(100, 2, 5)]
    costs = aps_costs(layers, 10, DeviceLink(0.3, 0.03, 8.0, 8.0), 4)
    assert list(costs.device_forward) == pytest.approx([0, 0.75, 0, 0.25])
    assert list(costs.device_backward) == pytest.approx([0, 1.5, 0, 0.5])
    assert list(costs.server_forward) == pytest.approx([0, 0.075, 0, 0.025])
    assert list(costs.output_bytes) == [320, 160, 160, 80]
    assert trained_cuts(layers) == [2, 3]
    # 1 byte/s links: the cut after the ReLU or the Linear both send 160 bytes (160 s
    # each way); N = ceil((160 + 0.025 + 0.05 + 160) / 0.75) + 1 = 428, capped at B // 2
    alg = PiPar(PiParConfig(batch_size=10))
    cut, n = alg.choose(layers, 50, alg.config, DeviceLink(0.3, 0.03, 8.0, 8.0))
    assert cut in (2, 3) and n == 5
    fixed = PiPar(PiParConfig(batch_size=10, cut=3))
    assert fixed.choose(layers, 50, fixed.config, DeviceLink(0.3, 0.03, 8.0, 8.0)) == (3, 5)


def test_a_device_part_without_parameters_gets_no_gradient() -> None:
    """Cut after a Flatten: the device sends its input and has nothing to train."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    (data,) = make_clients([4], 4, 3)
    model = FlatModel(copy.deepcopy(module))
    alg = SplitFed(SplitFedConfig(batch_size=4, cut=1))
    from _fl_helpers import client_task

    from roost.algorithms.base import Payload

    out = client_task(alg, model, data, Payload(model.params.clone(), 0), 0, 1)
    assert out.metrics["cut_bytes_down"] == 0  # no gradient, no device part
    assert out.metrics["cut_bytes_up"] == 4 * (4 * 4 + 1)


def test_bad_settings_name_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match="aggregation_iterations"):
        PiParConfig(aggregation_iterations=-1)
    with pytest.raises(ConfigError, match=r"0 \.\. batch_size \(100\) \(0: chosen per device"):
        PiParConfig(micro_batches=101)
    with pytest.raises(ConfigError, match="0: chosen per device by APS"):
        PiParConfig(cut=-2)


def test_pipar_runs_from_the_cli_on_the_quickstart() -> None:
    """``roost run quickstart algorithm=pipar``: APS picks the mlp's cut 2 (flatten and
    the first linear layer on the device; cut 1 would put no parameter there) and a
    micro-batch count per device (3 on the quickstart's devices); the run learns: 0.71
    after 3 rounds (FedAvg and SplitFed: 0.59; PiPar's momentum 0.9 on the preset's lr
    0.2 learns faster here), asserted above 0.6."""
    from roost.config import apply_overrides, load_config_source, resolve
    from roost.runner import run

    tree = apply_overrides(load_config_source("quickstart"), ["algorithm=pipar", "rounds=3"])
    records = run(resolve(tree)).records
    assert all(r["client_cut"] == 2 for r in records)
    assert all(1 <= r["client_micro_batches"] <= 5 for r in records)  # B // 2 = 5
    assert records[-1]["accuracy"] > 0.6
    assert records[0]["server_busy_s"] > 0
