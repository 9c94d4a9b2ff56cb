"""PiPar's stage graph and APS against hand-computed schedules (issue 10, item 4: "the APS
choice and makespan against a hand-computed DAG on a small profile")."""

from __future__ import annotations

import pytest

from roost.split.pipeline import LayerCosts, StageTotals, choose_split, makespan, micro_batches_for


def test_one_micro_batch_is_every_stage_in_turn() -> None:
    totals = StageTotals(2, 4, 2, 2, 4, 2)
    assert makespan(totals, 1) == 16  # nothing overlaps: 2 + 4 + 2 + 2 + 4 + 2


def test_two_micro_batches_by_hand() -> None:
    """Per stage CF 1, UP 2, SF 1, SB 1, DN 2, CB 1. CF_1 0-1, CF_2 1-2; UP_1 1-3, UP_2
    3-5; SF_1 3-4, SB_1 4-5, SF_2 5-6, SB_2 6-7; DN_1 5-7, DN_2 7-9; CB_1 7-8 (after DN_1),
    CB_2 9-10: the iteration takes 10 (16 without the pipeline)."""
    assert makespan(StageTotals(2, 4, 2, 2, 4, 2), 2) == 10


def test_the_reference_codes_two_differences() -> None:
    """A slow downlink (DN 4 per stage, the rest as above): DN_1 5-9; DN_2 waits for DN_1
    (9-13), CB_2 13-14. The reference code makes DN_2 wait for SB_1 (ends 5) and SB_2
    (ends 7) only: DN_2 7-11 on a link still busy with DN_1, CB_2 11-12."""
    slow_down = StageTotals(2, 4, 2, 2, 8, 2)
    assert makespan(slow_down, 2) == 14
    assert makespan(slow_down, 2, reference_compat=True) == 12
    # a slow device forward (5 per stage) and everything else free but its backward (1):
    # CB_1 waits for the device's last forward (ends 10): 10-11, CB_2 11-12. The reference
    # code starts CB_1 at 5, while the device is still forwarding micro-batch 2.
    slow_forward = StageTotals(10, 0, 0, 0, 0, 2)
    assert makespan(slow_forward, 2) == 12
    assert makespan(slow_forward, 2, reference_compat=True) == 11


def test_aps_picks_the_cut_and_micro_batch_count_of_least_makespan() -> None:
    """Three layers, 1 s forward and 1 s backward each on the device, 0.1 s each on the
    server; outputs of 1,000, 100 and 10 bytes; 1,000 bytes/s links; batch 10.

    Cut 1: C_f = C_b = 1, S_f = S_b = 0.2, U = D = 1 s: N = ⌈2.4 / 1⌉ + 1 = 4, at most
    min(10 // 2, 100) = 5, made even: 10 // (10 // 4) = 5. Stages of 0.2, 0.2, 0.04, 0.04,
    0.2, 0.2: CB_1 waits for the last forward (ends 1.0) and the five backwards end at
    1.2, 1.4, 1.6, 1.8, 2.0: 2.0 s.
    Cut 2: C_f = C_b = 2, S_f = S_b = 0.1, U = D = 0.1: N = ⌈0.4 / 2⌉ + 1 = 2; stages of 1,
    0.05, 0.05, 0.05, 0.05, 1: CF ends 1, 2; CB_1 2-3, CB_2 3-4: 4.0 s. Cut 1 wins."""
    costs = LayerCosts([1, 1, 1], [1, 1, 1], [0.1] * 3, [0.1] * 3, [1000, 100, 10])
    choice = choose_split(costs, 10, uplink_bps=8000, downlink_bps=8000)
    assert (choice.cut, choice.micro_batches) == (1, 5)
    assert choice.seconds == pytest.approx(2.0, abs=1e-12)
    (c1, n1, t1), (c2, n2, t2) = choice.candidates
    assert (c1, n1, c2, n2) == (1, 5, 2, 2) and t1 == choice.seconds
    assert t2 == pytest.approx(4.0, abs=1e-12)
    assert micro_batches_for(costs.totals(2, 8000, 8000), 10) == 2


def test_bad_profiles_are_refused_naming_the_problem() -> None:
    with pytest.raises(ValueError, match="one entry per layer"):
        LayerCosts([1, 1], [1], [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="at least 2 layers"):
        choose_split(LayerCosts([1], [1], [1], [1], [1]), 10, 1.0, 1.0)
    with pytest.raises(ValueError, match="bandwidths must be > 0"):
        choose_split(LayerCosts([1, 1], [1, 1], [1, 1], [1, 1], [1, 1]), 10, 0.0, 1.0)
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        makespan(StageTotals(1, 1, 1, 1, 1, 1), 0)


def test_a_host_profile_gives_each_layers_output_size_and_scales_to_a_device() -> None:
    """Output elements per example are exact (Linear(6, 5) then ReLU: 5, 5; Linear(5, 4),
    ReLU: 4, 4; Linear(4, 3): 3; a 5x5 convolution with padding 2 to 2 channels of an 8x8
    image: 2·8·8 = 128); the times are measured (> 0 forward for a Linear); a device 3 times
    slower takes 3 times the host's seconds, twice the batch twice them, and a cut after a
    layer sends its output at the wire dtype's bytes for the batch."""
    import torch
    from torch import nn

    from roost.split.profile import profile_layers

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    profile = profile_layers(mlp, torch.randn(8, 6), repeats=3)
    assert profile.batch == 8 and profile.output_elements == (5, 5, 4, 4, 3)
    assert all(t > 0 for t in profile.forward_s[::2]) and min(profile.backward_s) >= 0
    costs = profile.costs(3.0, 0.5, wire_bytes=2, batch=16)
    assert list(costs.output_bytes) == [5 * 16 * 2, 160, 128, 128, 96]
    assert costs.device_forward[0] == pytest.approx(profile.forward_s[0] * 3 * 2)
    assert costs.server_backward[2] == pytest.approx(profile.backward_s[2] * 0.5 * 2)
    choice = choose_split(costs, 16, uplink_bps=1e6, downlink_bps=1e6)
    assert 1 <= choice.cut <= 4 and 1 <= choice.micro_batches <= 8
    conv = nn.Sequential(nn.Conv2d(1, 2, 5, padding=2), nn.Flatten(), nn.Linear(128, 3))
    assert profile_layers(conv, torch.randn(4, 1, 8, 8), repeats=1).output_elements == (128, 128, 3)
    with pytest.raises(ValueError, match="slowdowns must be > 0"):
        profile.costs(0.0, 1.0)
