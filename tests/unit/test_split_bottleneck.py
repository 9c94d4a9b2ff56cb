"""The compressing bottleneck at the cut (ALGORITHMS.md §2.7, VCCprune): encoder and decoder
shapes, the top-b mask, the gate penalty, the gate reset, the kept-channel messages and
their bytes, and the deprune/prune schedules, each against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from roost.split.bottleneck import (
    Decoder,
    Encoder,
    KeptChannels,
    KeptGradient,
    Phase,
    PhaseSchedule,
    deprune_schedule,
    gate_penalty,
    prune_loss,
    prune_schedule,
    reset_gates,
    top_b_mask,
    weighted_top_b_mask,
)
from roost.split.cut import cut_module

LN3 = math.log(3.0)  # sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4, sigmoid(0) = 1/2


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# --- encoder and decoder --------------------------------------------------------------


@pytest.mark.parametrize(
    ("rc", "encoded"),
    [
        # rc = 1: kernel 3, stride 1, padding 1 → H' = ⌊(8 + 1 - 2) / 1⌋ + 1 = 8
        (1, 8),
        # rc = 2: kernel 4, stride 2, padding 2 → H' = ⌊(8 + 2 - 2) / 2⌋ + 1 = 5
        (2, 5),
    ],
)
def test_encoder_compresses_and_decoder_restores_the_shape(rc: int, encoded: int) -> None:
    # C = 4, feature_compression 2 → C' = 2. The decoder's transposed conv gives
    # (H' - 1)·rc - 2·rc + (2 + rc) = (H' - 2)·rc + 2: rc=1 → 8, rc=2 → 3·2 + 2 = 8.
    enc = Encoder(4, feature_compression=2, resolution_compression=rc)
    dec = enc.decoder()
    x = _x(3, 4, 8, 8)
    z = enc(x)
    assert enc.out_channels == 2 and enc.gate.shape == (2,)
    assert z.shape == (3, 2, encoded, encoded) == (3, 2, *enc.output_size(8, 8))
    assert dec(z).shape == (3, 4, 8, 8) == (3, 4, *dec.output_size(encoded, encoded))
    assert bool(((z > 0) & (z < 1)).all())  # sigmoid · sigmoid
    assert bool((dec(z) >= 0).all())  # ReLU


def test_odd_sides_need_the_decoders_output_size_for_rc_2() -> None:
    # H = 7, rc = 2: H' = ⌊(7 + 0) / 2⌋ + 1 = 4, and the reference's transposed conv
    # gives (4 - 2)·2 + 2 = 6 (7 - 2 = 5 is odd: one row short). output_size=(7, 7) adds
    # it back as output padding.
    enc = Encoder(4, resolution_compression=2)
    z = enc(_x(2, 4, 7, 7))
    assert z.shape == (2, 4, 4, 4)
    assert Decoder(4, resolution_compression=2)(z).shape == (2, 4, 6, 6)
    assert enc.decoder(output_size=(7, 7))(z).shape == (2, 4, 7, 7)


def test_encoder_output_is_sigmoid_of_bn_times_the_sigmoid_gate() -> None:
    # conv weights and bias 0 → conv(x) = 0; BN in eval with running mean 0, var 1,
    # weight 1, bias 0 → 0; sigmoid(0) = 1/2. Gate p = (0, ln 3) → sigmoid (1/2, 3/4),
    # so channel 0 is 1/2 · 1/2 = 0.25 and channel 1 is 1/2 · 3/4 = 0.375 everywhere.
    enc = Encoder(2).eval()
    with torch.no_grad():
        enc.conv.weight.zero_()
        assert enc.conv.bias is not None
        enc.conv.bias.zero_()
        enc.gate.copy_(torch.tensor([0.0, LN3]))
    z = enc(_x(1, 2, 3, 3))
    assert torch.allclose(z[0, 0], torch.full((3, 3), 0.25))
    assert torch.allclose(z[0, 1], torch.full((3, 3), 0.375))


def test_the_gate_starts_as_15_times_uniform_from_the_generator() -> None:
    g = torch.Generator().manual_seed(7)
    enc = Encoder(6, feature_compression=2, generator=torch.Generator().manual_seed(7))
    # the gate is the generator's first draw of C' = 3 uniforms, times 15: in [0, 15)
    assert torch.equal(enc.gate.detach(), 15.0 * torch.rand(3, generator=g))
    assert bool(((enc.gate >= 0) & (enc.gate < 15)).all())


def test_encoder_and_decoder_are_cut_points_of_a_sequential() -> None:
    torch.manual_seed(0)
    enc = Encoder(4, resolution_compression=2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), enc, enc.decoder(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).eval()
    split = cut_module(model, 2)  # the device part ends with the encoder
    assert isinstance(split.device[-1], Encoder) and isinstance(split.server[0], Decoder)
    x = _x(2, 3, 8, 8)
    assert torch.equal(split.server(split.device(x)), model(x))
    assert "1.gate" in {s.name for s in split.layout.device.slots}


# --- mask -----------------------------------------------------------------------------


def test_top_b_mask_keeps_the_b_largest_gates_ties_to_the_lower_index() -> None:
    p = torch.tensor([0.5, 3.0, -1.0, 3.0, 2.0])
    # ranked by p (= by sigmoid(p)², which is increasing): 3.0 (#1), 3.0 (#3), 2.0 (#4),
    # 0.5 (#0), -1.0 (#2); the tie #1 / #3 goes to the lower index.
    assert top_b_mask(p, 1).tolist() == [0, 1, 0, 0, 0]  # the reference would keep #1 and #3
    assert top_b_mask(p, 2).tolist() == [0, 1, 0, 1, 0]
    assert top_b_mask(p, 3).tolist() == [0, 1, 0, 1, 1]
    for b in range(1, 6):
        mask = top_b_mask(p, b)
        assert mask.dtype == torch.float32 and int(mask.sum()) == b


def test_top_b_mask_ranks_gates_beyond_sigmoid_saturation() -> None:
    # sigmoid(20) and sigmoid(30) both round to 1.0 in float32 (m ties), p does not:
    # the larger gate, #1, is kept.
    p = torch.tensor([20.0, 30.0])
    assert torch.sigmoid(p).tolist() == [1.0, 1.0]
    assert top_b_mask(p, 1).tolist() == [0, 1]


def test_weighted_mask_is_the_references_sigmoid_squared_on_the_kept_channels() -> None:
    # p = (0, ln 3, -ln 3): m = (1/4, 9/16, 1/16); top-2 are #1 and #0 → (0.25, 0.5625, 0).
    p = torch.tensor([0.0, LN3, -LN3], requires_grad=True)
    mask = weighted_top_b_mask(p, 2)
    assert torch.allclose(mask, torch.tensor([0.25, 0.5625, 0.0]))
    assert not mask.requires_grad


@pytest.mark.parametrize("b", [0, 6, True, 2.0])
def test_top_b_mask_refuses_a_budget_outside_1_to_c(b: object) -> None:
    with pytest.raises(ValueError, match=r"b=.*: must be an integer in 1 \.\. 5"):
        top_b_mask(torch.zeros(5), b)  # type: ignore[arg-type]


def test_top_b_mask_refuses_gates_that_are_not_one_per_channel() -> None:
    with pytest.raises(ValueError, match=r"non-empty 1-D tensor.*\(1, 4, 1, 1\)"):
        top_b_mask(torch.zeros(1, 4, 1, 1), 2)


# --- penalty --------------------------------------------------------------------------


def test_prune_loss_is_ce_plus_the_cosh_well_of_the_gate_mass() -> None:
    # p = (0, ln 3, -ln 3): S = Σ sigmoid(p)² = 1/4 + 9/16 + 1/16 = 0.875; b = 2,
    # δ = 0.4: δ(S - b) = 0.4 · (-1.125) = -0.45; exp(-0.45) = 0.6376281516,
    # exp(0.45) = 1.5683121855, sum 2.2059403371; eps = 10 → 22.059403371;
    # CE = 1.25 → 23.309403371.
    p = torch.tensor([0.0, LN3, -LN3], requires_grad=True)
    ce = torch.tensor(1.25, requires_grad=True)
    loss = prune_loss(ce, p, 2, eps=10.0, delta=0.4)
    assert loss.item() == pytest.approx(23.309403371, rel=1e-6)
    assert gate_penalty(p, 2, eps=10.0, delta=0.4).item() == pytest.approx(22.059403371, rel=1e-6)
    # ∂/∂p_c = eps·δ·(e^{δ(S-b)} - e^{-δ(S-b)}) · 2σ_c²(1 - σ_c)
    #        = 4 · (0.6376281516 - 1.5683121855) · 2σ_c²(1 - σ_c) = -3.7227361355 · ...:
    # p_0: 2 · 1/4 · 1/2 = 0.25 → -0.9306840339; p_1: 2 · 9/16 · 1/4 = 0.28125 →
    # -1.0470195381; p_2: 2 · 1/16 · 3/4 = 0.09375 → -0.3490065127. ∂/∂CE = 1.
    loss.backward()
    assert p.grad is not None and ce.grad is not None
    expected = torch.tensor([-0.9306840339, -1.0470195381, -0.3490065127])
    assert torch.allclose(p.grad, expected, rtol=1e-5)
    assert ce.grad.item() == 1.0


def test_prune_loss_defaults_are_eps_1000_delta_0_001() -> None:
    # same p, b = 2: δ(S - b) = 0.001 · (-1.125) = -0.001125;
    # 1000 · (e^{-0.001125} + e^{0.001125}) = 1000 · 2 cosh(0.001125) = 2000.0012656.
    p = torch.tensor([0.0, LN3, -LN3])
    assert prune_loss(torch.tensor(0.0), p, 2).item() == pytest.approx(2000.0012656, abs=3e-4)


def test_gate_penalty_refuses_bad_eps_and_delta() -> None:
    p = torch.zeros(3)
    with pytest.raises(ValueError, match=r"eps=0\.0: must be a finite number > 0"):
        gate_penalty(p, 1, eps=0.0)
    with pytest.raises(ValueError, match=r"delta=-1\.0: must be a finite number > 0"):
        gate_penalty(p, 1, delta=-1.0)
    with pytest.raises(ValueError, match=r"b=4: must be an integer in 1 \.\. 3"):
        gate_penalty(p, 4)


# --- reset ----------------------------------------------------------------------------


def test_reset_gates_redraws_raw_gates_below_0_9_and_sets_the_others_to_15() -> None:
    # raw p < 0.9 → U(0, 3): #0 (0.89), #2 (-3), #4 (0); 0.9 itself is not below 0.9,
    # so #1 (0.9), #3 (5) and #5 (15) → 15. The three draws are the generator's first
    # torch.rand(3), times 3, in channel order.
    p = nn.Parameter(torch.tensor([0.89, 0.9, -3.0, 5.0, 0.0, 15.0]))
    reset_gates(p, 3.0, torch.Generator().manual_seed(5))
    drawn = 3.0 * torch.rand(3, generator=torch.Generator().manual_seed(5))
    assert p[[1, 3, 5]].tolist() == [15.0, 15.0, 15.0]
    assert torch.equal(p.detach()[[0, 2, 4]], drawn)
    assert bool(((drawn >= 0) & (drawn < 3)).all())
    assert p.requires_grad and p.is_leaf


def test_reset_gates_refuses_a_right_side_value_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match=r"right_side_value=0\.0: must be a finite number > 0"):
        reset_gates(torch.zeros(3), 0.0)


# --- messages -------------------------------------------------------------------------


def test_kept_channels_send_b_channels_in_fp16_and_their_indices() -> None:
    # N = 2, C' = 4, H = 3, W = 5, b = 2 (#1 and #3): values 2·2·3·5 = 60 fp16 = 120
    # bytes, indices 2 uint8 (C' <= 256) = 2 bytes → 122.
    x = _x(2, 4, 3, 5)
    mask = top_b_mask(torch.tensor([0.0, 4.0, 1.0, 5.0]), 2)
    sent = KeptChannels.of(x, mask)
    assert sent.values.shape == (2, 2, 3, 5) and sent.values.dtype == torch.float16
    assert sent.indices.tolist() == [1, 3] and sent.indices.dtype == torch.uint8
    assert sent.nbytes == 2 * 2 * 3 * 5 * 2 + 2 == 122
    got = sent.received()
    assert got.shape == (2, 4, 3, 5) and got.dtype == torch.float32 and got.requires_grad
    expected = (x * mask.view(1, -1, 1, 1)).half().float()  # zeros in #0 and #2
    assert torch.equal(got.detach(), expected)
    assert not torch.equal(got.detach(), x * mask.view(1, -1, 1, 1))  # really rounded


def test_kept_channel_indices_widen_past_256_channels() -> None:
    # C' = 300 needs int16 ids: b = 3 → 3 · 2 = 6 index bytes; N = 1, H = W = 1:
    # values 3 fp16 = 6 bytes → 12.
    mask = top_b_mask(torch.arange(300.0), 3)  # keeps #297, #298, #299
    sent = KeptChannels.of(_x(1, 300, 1, 1), mask)
    assert sent.indices.dtype == torch.int16 and sent.indices.tolist() == [297, 298, 299]
    assert sent.nbytes == 3 * 2 + 3 * 2 == 12


def test_kept_channels_multiply_by_the_weighted_mask_before_rounding() -> None:
    # weighted mask (0.25, 0.5625, 0) on p = (0, ln 3, -ln 3), b = 2: the server gets
    # fp16(x_c · m_c) for #0 and #1, zeros for #2.
    x = _x(1, 3, 2, 2)
    mask = weighted_top_b_mask(torch.tensor([0.0, LN3, -LN3]), 2)
    got = KeptChannels.of(x, mask).received().detach()
    assert torch.equal(got, (x * mask.view(1, -1, 1, 1)).half().float())
    assert torch.equal(got[:, 2], torch.zeros(1, 2, 2))


def test_kept_gradient_sends_the_kept_channels_and_masks_at_the_device() -> None:
    # The server's loss (a · w).sum() has ∂L/∂a = w everywhere, also in the pruned
    # channels; the reply carries w on #1 and #3 only: 2·2·3·5 = 60 float32 = 240 bytes
    # (the indices are the device's own). With a = z ⊙ mask the device's gradient is
    # w ⊙ mask: w on #1, #3 and 0 on #0, #2 (0/1 mask), or w · m_c (weighted mask).
    z = _x(2, 4, 3, 5).requires_grad_(True)
    w = _x(2, 4, 3, 5, seed=1)
    p = torch.tensor([0.0, 4.0, 1.0, 5.0])
    for mask in (top_b_mask(p, 2), weighted_top_b_mask(p, 2)):
        sent = KeptChannels.of(z, mask)
        a = sent.received()
        (a * w).sum().backward()
        assert a.grad is not None and torch.equal(a.grad, w)
        reply = KeptGradient.of(a.grad, sent)
        assert reply.values.shape == (2, 2, 3, 5) and reply.nbytes == 240
        z.grad = None
        z.backward(reply.received(mask))
        assert z.grad is not None
        assert torch.equal(z.grad, w * mask.view(1, -1, 1, 1))
    assert KeptGradient.of(w, sent, torch.float16).nbytes == 120


def test_messages_refuse_bad_shapes_and_dtypes() -> None:
    mask = top_b_mask(torch.zeros(4), 2)
    with pytest.raises(ValueError, match=r"activations must be \(N, C', H, W\)"):
        KeptChannels.of(torch.zeros(2, 4, 3), mask)
    with pytest.raises(ValueError, match=r"mask must be a 1-D tensor of 4 channel values"):
        KeptChannels.of(torch.zeros(2, 4, 3, 3), torch.ones(3))
    with pytest.raises(ValueError, match=r"wire dtypes are float32, float16, bfloat16"):
        KeptChannels.of(torch.zeros(2, 4, 3, 3), mask, torch.int8)
    sent = KeptChannels.of(torch.zeros(2, 4, 3, 3), mask)
    with pytest.raises(ValueError, match=r"grad must have the received activations' shape"):
        KeptGradient.of(torch.zeros(2, 2, 3, 3), sent)


# --- layers' parameters ---------------------------------------------------------------


def test_layers_refuse_bad_compressions() -> None:
    with pytest.raises(ValueError, match=r"feature_compression=4: must divide the 6 channels"):
        Encoder(6, feature_compression=4)
    with pytest.raises(ValueError, match=r"feature_compression=0: must be an integer >= 1"):
        Encoder(6, feature_compression=0)
    with pytest.raises(ValueError, match=r"resolution_compression=0: must be an integer >= 1"):
        Encoder(6, resolution_compression=0)
    with pytest.raises(ValueError, match=r"in_channels=0: must be an integer >= 1"):
        Encoder(0)
    with pytest.raises(ValueError, match=r"output_size=0: must be an integer >= 1"):
        Decoder(4, output_size=(0, 4))


# --- schedules ------------------------------------------------------------------------


def test_deprune_schedule_is_prune_16_reset_prune_4_reset_train() -> None:
    s = deprune_schedule()
    first, second, third = s.phases
    # phase 1: prune, b = 16, 15 epochs at 1e-2
    assert (first.mode, first.budget, first.lrs) == ("prune", 16, (1e-2,) * 15)
    assert not first.reset_gates_before and first.train_gate and first.masked_backward
    # phase 2 (after a reset): prune, b = 4, 3 epochs at 5e-2 then 12 at 1e-2
    assert (second.mode, second.budget) == ("prune", 4)
    assert second.lrs == (5e-2,) * 3 + (1e-2,) * 12 and second.reset_gates_before
    # phase 3 (after a reset): normal, no budget, 50 epochs at 1e-2; the gate is still
    # trained (the reference's VGG.forward never passes prune=False to its encoder)
    assert (third.mode, third.budget, third.lrs) == ("normal", None, (1e-2,) * 50)
    assert third.reset_gates_before and third.train_gate
    for phase in s.phases:
        assert (phase.momentum, phase.weight_decay, phase.wire) == (0.0, 5e-4, "float16")
    assert s.epochs == 15 + 15 + 50 == 80 and len(s.lrs) == 80
    assert (s.batch_size, s.eps, s.delta, s.right_side_value) == (16, 1000.0, 1e-3, 1.0)
    assert s.weighted_mask


def test_deprune_schedule_with_a_short_second_phase_stays_boosted() -> None:
    # e2 = 2 < 3 boost epochs: both at 5e-2; e1 = e3 = 0 keep their (empty) phases.
    s = deprune_schedule(prune_1_epochs=0, prune_2_epochs=2, training_epochs=0)
    assert [p.epochs for p in s.phases] == [0, 2, 0]
    assert s.lrs == (5e-2, 5e-2)


def test_prune_schedule_trains_unmasked_then_prunes_with_a_boost() -> None:
    s = prune_schedule(training_epochs=4, prune_phases=[(8, 5)])
    train, prune = s.phases
    # training: 4 epochs at 1e-3, momentum 0.9, float32 wire, gate trained
    assert (train.mode, train.budget, train.lrs) == ("normal", None, (1e-3,) * 4)
    assert (train.momentum, train.wire, train.train_gate) == (0.9, "float32", True)
    # prune b = 8: 3 epochs at 5e-2, then 2 at 1e-2, momentum 0, unmasked gradient back
    assert (prune.mode, prune.budget, prune.lrs) == ("prune", 8, (5e-2,) * 3 + (1e-2,) * 2)
    assert (prune.momentum, prune.masked_backward, prune.reset_gates_before) == (
        0.0,
        False,
        False,
    )
    assert s.lrs == (1e-3,) * 4 + (5e-2,) * 3 + (1e-2,) * 2
    d = prune_schedule()  # the reference's defaults: 50, then (16, 15) and (4, 15)
    assert [(p.budget, p.epochs) for p in d.phases] == [(None, 50), (16, 15), (4, 15)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prune_1_budget": 0}, r"prune_1_budget=0: must be an integer >= 1"),
        ({"prune_2_budget": 2.5}, r"prune_2_budget=2\.5: must be an integer >= 1"),
        ({"prune_2_epochs": -1}, r"prune_2_epochs=-1: must be an integer >= 0"),
        ({"lr": 0.0}, r"lr=0\.0: must be a finite number > 0"),
        ({"boost_lr": math.inf}, r"boost_lr=inf: must be a finite number > 0"),
        ({"delta": -0.1}, r"delta=-0\.1: must be a finite number > 0"),
        ({"right_side_value": 0}, r"right_side_value=0: must be a finite number > 0"),
        ({"batch_size": 0}, r"batch_size=0: must be an integer >= 1"),
        ({"weight_decay": -1.0}, r"weight_decay=-1\.0: must be a finite number >= 0"),
    ],
)
def test_deprune_schedule_names_the_bad_parameter(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        deprune_schedule(**kwargs)


def test_prune_schedule_and_phases_name_the_bad_parameter() -> None:
    with pytest.raises(ValueError, match=r"prune_phases\[1\] budget=0: must be an integer >= 1"):
        prune_schedule(prune_phases=[(4, 2), (0, 2)])
    with pytest.raises(ValueError, match=r"prune_phases: give at least one"):
        prune_schedule(prune_phases=[])
    with pytest.raises(
        ValueError, match=r"training_momentum=1\.0: must be a finite number >= 0\.0 and < 1\.0"
    ):
        prune_schedule(training_momentum=1.0)
    with pytest.raises(ValueError, match=r"mode='fast': must be 'prune' or 'normal'"):
        Phase("fast", None, (1e-2,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"budget=4: a normal phase has no budget"):
        Phase("normal", 4, (1e-2,))
    with pytest.raises(ValueError, match=r"wire='int8': must be one of float32"):
        Phase("prune", 4, (1e-2,), wire="int8")
    with pytest.raises(ValueError, match=r"phases: a schedule has at least one phase"):
        PhaseSchedule(())
