"""FedBuff's server step by hand (ALGORITHMS.md §4.9)."""

from __future__ import annotations

import math

import pytest
import torch

from roost.algorithms.asynchronous import Arrival
from roost.algorithms.base import ClientResult, Contribution
from roost.algorithms.fedbuff import FedBuffConfig, FedBuffStrategy


def _delivery(strategy, delta: float, start_version: int):
    c = Contribution()
    c.fold(ClientResult({"delta": torch.full((3,), delta)}, 1.0), 0)
    arrival = Arrival(0, start_version, strategy.version, 0.0, 1.0, 1.0, 10, 10)
    return strategy.accept(arrival, c)


def test_buffered_step_with_staleness_weights():
    """K = 2: deltas 1 (τ 0, weight 1) and 3 (τ 3, weight 1/sqrt(4) = 1/2) give
    x = 0 + (1 + 1.5) / 2 = 1.25 after one step."""
    s = FedBuffStrategy(FedBuffConfig(buffer_size=2))
    s.initialize(torch.zeros(3))
    s.version = 3
    assert _delivery(s, 1.0, 3) is False and s.arrivals_until_step() == 1
    assert _delivery(s, 3.0, 0) is True
    s.server_step(1)
    assert torch.equal(s.params, torch.full((3,), 1.25))
    assert s.version == 4 and s.arrivals_until_step() == 2


def test_flsim_normalised_staleness_weight_by_hand():
    """staleness_normalize_at = τ̄ = 3 with s(τ) = (1 + τ)^-0.5: s(3) = 1/2, so the weights
    are s(τ) / (1/2): τ 0 -> 2, τ 8 -> (1/3) / (1/2) = 2/3. K = 2, deltas 1 (τ 0) and 3
    (τ 8): x = (2·1 + (2/3)·3) / 2 = 2."""
    s = FedBuffStrategy(FedBuffConfig(buffer_size=2, staleness_normalize_at=3.0))
    s.initialize(torch.zeros(3))
    s.version = 8
    _delivery(s, 1.0, 8)
    assert _delivery(s, 3.0, 0) is True
    s.server_step(1)
    torch.testing.assert_close(s.params, torch.full((3,), 2.0), rtol=0, atol=1e-7)
    from roost.registry import ConfigError

    with pytest.raises(ConfigError, match="staleness_normalize_at"):
        FedBuffConfig(staleness_normalize_at=-1.0)


def test_server_momentum_by_hand():
    """K = 1, β = 0.5, η_g = 1, no staleness: deltas 1, 1, 2 give m = 1, 1.5, 2.75 and
    x = 1, 2.5, 5.25; the momentum survives a state_dict round trip."""
    cfg = FedBuffConfig(buffer_size=1, server_momentum=0.5, staleness="constant")
    s = FedBuffStrategy(cfg)
    s.initialize(torch.zeros(3))
    xs = []
    for step, delta in enumerate([1.0, 1.0, 2.0], start=1):
        _delivery(s, delta, s.version)
        s.server_step(step)
        xs.append(float(s.params[0]))
        if step == 2:
            restored = FedBuffStrategy(cfg)
            restored.initialize(torch.zeros(3))
            restored.load_state_dict(s.state_dict())
            s = restored
    assert xs == [1.0, 2.5, 5.25]
    assert math.isclose(float(s.momentum[0]), 2.75)


def test_bad_settings_name_the_field():
    from roost.registry import ConfigError

    with pytest.raises(ConfigError, match="server_momentum"):
        FedBuffConfig(server_momentum=1.0)


def test_the_buffer_sums_in_float32_as_the_floor_and_the_paper_do():
    """Deltas 0.1 and 0.2 (float32), τ 0 and 3 (weights 1 and 1/2), K = 2: the buffer is
    float32 and holds exactly float32(0.1) + float32(0.2) * float32(0.5) computed in
    float32 (torch's add_ with alpha), and the step adds buffer / 2 in float32."""
    s = FedBuffStrategy(FedBuffConfig(buffer_size=2))
    s.initialize(torch.zeros(3))
    s.version = 3
    _delivery(s, 0.1, 3)
    _delivery(s, 0.2, 0)
    assert s.buffer is not None and s.buffer.dtype == torch.float32
    expected = torch.full((3,), 0.1).add_(torch.full((3,), 0.2), alpha=0.5)
    assert torch.equal(s.buffer, expected)
    s.server_step(1)
    assert s.params.dtype == torch.float32
    assert torch.equal(s.params, expected / 2)


def test_a_float64_buffer_from_an_older_checkpoint_is_resumed_as_float32():
    s = FedBuffStrategy(FedBuffConfig(buffer_size=2))
    s.initialize(torch.zeros(3))
    state = s.state_dict()
    state["buffer"], state["buffered"] = torch.full((3,), 0.5, dtype=torch.float64), 1
    t = FedBuffStrategy(FedBuffConfig(buffer_size=2))
    t.initialize(torch.zeros(3))
    t.load_state_dict(state)
    assert t.buffer is not None and t.buffer.dtype == torch.float32
    assert _delivery(t, 1.5, 0) is True
    t.server_step(1)
    assert torch.equal(t.params, torch.full((3,), 1.0))  # (0.5 + 1.5) / 2
