"""The default thread count: one thread for small models, torch's default for large ones,
decided from the model alone (benchmarks/threads.py measured why; docs/benchmarks.md)."""

from __future__ import annotations

import torch

from roost.build import build_parts
from roost.config import apply_overrides, load_config_source, resolve
from roost.models.cost import macs_per_example
from roost.runner import run
from roost.runtime.threads import SMALL_MACS, default_threads


def _parts(source: str, *overrides: str):
    parts = build_parts(resolve(apply_overrides(load_config_source(source), list(overrides))))
    return parts.build_module(), parts.dataset.info


def test_multiply_adds_of_the_reference_models_by_hand():
    # quickstart MLP 64-64-10 on 8x8 digits: 64*64 + 64*10
    assert macs_per_example(*_parts("quickstart")) == 4736
    # W1 MLP 784-200-200-10: 784*200 + 200*200 + 200*10
    assert macs_per_example(*_parts("w1")) == 198_800
    # W1 CNN: conv5x5 1->32 at 28x28, conv5x5 32->64 at 14x14, 3136->512, 512->10
    expected = 25 * 32 * 28 * 28 + 32 * 25 * 64 * 14 * 14 + 3136 * 512 + 512 * 10
    assert macs_per_example(*_parts("w1", "model=cnn")) == expected == 12_273_152


def test_small_models_get_one_thread_large_ones_torchs_default():
    assert default_threads(*_parts("quickstart")) == 1
    assert default_threads(*_parts("w1")) == 1
    assert default_threads(*_parts("w1", "model=cnn")) is None
    assert 198_800 < SMALL_MACS < 12_273_152


def test_a_run_with_the_default_computes_on_one_thread_and_restores_the_callers():
    seen = []

    def record_threads(record):
        seen.append(torch.get_num_threads())
        return False, {}

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = resolve(apply_overrides(load_config_source("quickstart"), ["rounds=2"]))
        run(cfg, callbacks=[record_threads])
        assert seen == [1, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
