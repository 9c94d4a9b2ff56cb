"""deprune / prune as a method (issue 10 item 3): the rounds' phases, the server's gate
resets, one prune-mode task's loss, mask, gradient and bytes by hand, the model carrying
its mode to evaluation, and runs from the CLI on the quickstart."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _fl_helpers import make_clients
from torch import nn

from roost.algorithms import Deprune, DepruneConfig
from roost.algorithms.base import Payload
from roost.algorithms.deprune import DepruneStrategy, phase_of
from roost.data.base import DatasetInfo
from roost.params import FlatModel
from roost.registry import ConfigError
from roost.split.bottleneck import Encoder

SHORT = {
    "prune_1_budget": 3,
    "prune_1_epochs": 2,
    "prune_2_budget": 2,
    "prune_2_epochs": 2,
    "training_epochs": 2,
    "boost_epochs": 1,
}


def test_rounds_follow_the_deprune_schedule() -> None:
    """Round r is epoch r - 1: b1 = 3 for two rounds at lr 1e-2; reset, b2 = 2 with one
    boosted round at 5e-2 then 1e-2; reset, normal training; after the schedule, its
    last epoch again."""
    schedule = DepruneConfig(**SHORT).phases()
    got = [
        (phase.budget, phase.lrs[epoch], reset)
        for phase, epoch, reset in (phase_of(schedule, r) for r in range(1, 9))
    ]
    assert got == [
        (3, 1e-2, False),
        (3, 1e-2, False),
        (2, 5e-2, True),
        (2, 1e-2, False),
        (None, 1e-2, True),
        (None, 1e-2, False),
        (None, 1e-2, False),
        (None, 1e-2, False),
    ]


def _bound(cfg: DepruneConfig, module: nn.Module, info: DatasetInfo) -> tuple[Deprune, nn.Module]:
    alg = Deprune(cfg)
    adapted = alg.adapt_model(module, info)
    alg.bind_model(adapted)
    return alg, adapted


def _mlp() -> nn.Sequential:
    """Flatten, Linear(4, 6), ReLU, Linear(6, 3): the bottleneck goes after layer 2."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_the_server_resets_the_gates_and_sets_the_budget_per_round() -> None:
    """Before round 3 (phase 2) the raw gates under 0.9 are redrawn in [0, 1), the
    others set to 15, once; every payload carries the round's budget (0 in normal
    mode) in the encoder's buffer."""
    info = DatasetInfo((4,), 3)
    alg, module = _bound(DepruneConfig(**SHORT, cut=2), _mlp(), info)
    encoder = module[2]
    assert isinstance(encoder, Encoder) and encoder.out_channels == 6
    strategy = alg.make_strategy()
    model = FlatModel(module)
    params = model.params.clone()
    gates = torch.tensor([0.2, 5.0, 0.89, 0.9, 14.0, -1.0])
    layout = {s.name: s for s in model.layout.slots}
    slot = layout["2.gate"]
    params[slot.offset : slot.offset + 6] = gates
    strategy.initialize(params, 4)
    budgets = []
    for r in range(1, 7):
        payload = strategy.payload(r)
        budgets.append(float(payload.params[layout["2.budget"].offset]))
        if r == 2:
            assert torch.equal(payload.params[slot.offset : slot.offset + 6], gates)
        if r == 3:
            after = payload.params[slot.offset : slot.offset + 6]
            assert after[[1, 3, 4]].tolist() == [15.0, 15.0, 15.0]
            low = after[[0, 2, 5]]
            assert ((low >= 0) & (low < 1)).all()
            again = strategy.payload(3).params[slot.offset : slot.offset + 6]
            assert torch.equal(again, after)  # once per round
    assert [float(b) for b in budgets] == [3, 3, 2, 2, 0, 0]
    assert strategy.reset_at == [3, 5]


def test_one_prune_mode_task_by_hand() -> None:
    """One minibatch of 5 examples, budget 2 of 6 channels, lr 0.1, no weight decay:

    * the kept channels are the two of largest gate p (here set to 3, 2, 1, 0, -1, -2:
      channels 0 and 1);
    * the uplink is 5 examples x 2 channels x 2 bytes (fp16) + 2 one-byte indices +
      5 one-byte labels = 27 bytes, the downlink the float32 gradient on the kept
      channels, 5 x 2 x 4 = 40, and the device part (Linear(4, 6) 30, encoder conv
      6 x 6 + 6, BN 6 + 6 and its 12 statistics, 6 gates, the budget: 103 floats) each
      way;
    * the encoder's conv rows of the pruned channels get no gradient: unchanged;
    * gate_penalty = 1000 (exp(δ(S - 2)) + exp(-δ(S - 2))), S = Σ sigmoid(p)², δ = 1e-3.
    """
    info = DatasetInfo((4,), 3)
    cfg = DepruneConfig(**SHORT, cut=2, lr=0.1, weight_decay=0.0, batch_size=8)
    alg, module = _bound(cfg, _mlp(), info)
    model = FlatModel(module)
    layout = {s.name: s for s in model.layout.slots}
    params = model.params.clone()
    p = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0])
    params[layout["2.gate"].offset : layout["2.gate"].offset + 6] = p
    params[layout["2.budget"].offset] = 2.0
    (data,) = make_clients([5], 4, 3, seed=1)
    settings = {"budget": 2, "masked_backward": True, "lr": 0.1, "wire_dtype": "float16"}
    from roost.algorithms.base import ClientContext, drive

    model.load_(params)
    before = module[2].conv.weight.detach().clone()
    ctx = ClientContext(0, 1, 0, 5, torch.Generator().manual_seed(0), None, settings)
    out = drive(alg.update(ctx, model, data, Payload(params, 0), None), lambda r: None)
    m = out.metrics
    assert m["kept_channels"] == 2
    part = 4 * (30 + 42 + 12 + 12 + 6 + 1)
    assert m["cut_bytes_up"] == 27 + part
    assert m["cut_bytes_down"] == 40 + part
    after = module[2].conv.weight.detach()
    assert torch.equal(after[2:], before[2:])
    assert not torch.equal(after[:2], before[:2])
    s = float((torch.sigmoid(p) ** 2).sum())
    assert m["gate_penalty"] == pytest.approx(
        1000 * (math.exp(1e-3 * (s - 2)) + math.exp(-1e-3 * (s - 2)))
    )
    # the plan the engine times has the same bytes
    from roost.models.cost import layer_costs
    from roost.split.plan import DeviceLink

    plan = alg.split_plan(layer_costs(module, info), 5, settings, DeviceLink(1e-3, 1e-4, 1e6, 1e6))
    up, down = plan.cut_bytes()
    assert (up + plan.part_bytes, down + plan.part_bytes) == (
        m["cut_bytes_up"],
        m["cut_bytes_down"],
    )


def test_the_model_carries_its_mode_to_evaluation() -> None:
    """An encoder whose budget buffer is 2 zeroes the other channels in eval mode too."""
    torch.manual_seed(0)
    enc = Encoder(4, flat=True)
    with torch.no_grad():
        enc.gate.copy_(torch.tensor([0.0, 3.0, 1.0, 2.0]))
        enc.budget.fill_(2.0)
    enc.eval()
    z = enc(torch.randn(3, 4))
    assert z.shape == (3, 4, 1, 1)
    assert (z[:, [0, 2]] == 0).all() and (z[:, [1, 3]] != 0).all()


def test_bad_settings_name_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match="prune_1_budget"):
        _bound(DepruneConfig(cut=2, prune_1_budget=7), _mlp(), DatasetInfo((4,), 3))
    with pytest.raises(ConfigError, match="micro_batches"):
        DepruneConfig(micro_batches=2)
    with pytest.raises(ConfigError, match="schedule"):
        DepruneConfig(schedule="vcc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no resolution to compress"):
        _bound(DepruneConfig(cut=2, resolution_compression=2), _mlp(), DatasetInfo((4,), 3))


def test_deprune_runs_from_the_cli_and_sends_fewer_channels() -> None:
    """The quickstart's 10 first clients every round, a short schedule: 16 channels of
    the bottleneck's 64 for two rounds, 4 for two, all 64 for two; the same examples
    every round, so the activations' bytes follow the channels: 4 < 16 < 64."""
    from roost.config import apply_overrides, load_config_source, resolve
    from roost.runner import run

    overrides = [
        "algorithm=deprune",
        "clients=10",
        "rounds=6",
        "algorithm.prune_1_epochs=2",
        "algorithm.prune_2_epochs=2",
        "algorithm.training_epochs=2",
    ]
    records = run(resolve(apply_overrides(load_config_source("quickstart"), overrides))).records
    assert [r["client_kept_channels"] for r in records] == [16, 16, 4, 4, 64, 64]
    up = [r["bytes_up"] for r in records]
    assert up[2] < up[0] < up[4]
    assert records[-1]["accuracy"] > 0.5


def test_the_prune_schedule_trains_first_then_prunes() -> None:
    """schedule=prune: normal training at lr 1e-3 with momentum 0.9 and float32
    activations first, then prune phases at the boosted lr."""
    schedule = DepruneConfig(schedule="prune", **SHORT).phases()
    first, epoch, _ = phase_of(schedule, 1)
    assert (first.mode, first.lrs[epoch], first.momentum, first.wire) == (
        "normal",
        1e-3,
        0.9,
        "float32",
    )
    third, epoch, _ = phase_of(schedule, 3)
    assert (third.mode, third.budget, third.lrs[epoch]) == ("prune", 3, 5e-2)


def test_wire_dtype_sets_every_phase_and_schedule_keeps_the_references() -> None:
    """``wire_dtype=schedule`` (the default) keeps each phase's own dtype: fp16 in all of
    deprune's, float32 in prune's first, normal phase and fp16 in its prune phases (the
    reference's ``train`` and ``pruneTrain``); a dtype given applies to every phase and
    reaches every task's settings (it was accepted and then ignored before)."""
    assert {p.wire for p in DepruneConfig().phases().phases} == {"float16"}
    prune = DepruneConfig(schedule="prune").phases().phases
    assert [p.wire for p in prune] == ["float32", "float16", "float16"]
    wide = DepruneConfig(schedule="prune", wire_dtype="float32")
    assert {p.wire for p in wide.phases().phases} == {"float32"}
    strategy = DepruneStrategy(wide.phases(), torch.arange(2), 2)
    for round in (1, 60, 70):  # normal, first prune, second prune
        (settings,) = strategy.configure_tasks(round, [0], np.random.default_rng(0)).values()
        assert settings["wire_dtype"] == "float32"
    with pytest.raises(ConfigError, match="one of schedule, float32, float16, bfloat16"):
        DepruneConfig(wire_dtype="int8")
