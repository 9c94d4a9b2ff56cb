"""``compression=NAME`` wraps any algorithm that uploads a model or a delta."""

from __future__ import annotations

import pytest

from roost.compression import topk_qsgd
from roost.config import apply_overrides, load_config_source, resolve
from roost.registry import ConfigError
from roost.runner import run

SMALL = ["rounds=2", "clients=20", "clients_per_round=4", "eval_every=0"]


@pytest.mark.parametrize("algorithm", ["fedavg", "fedbuff", "scaffold"])
def test_uploads_are_the_compressed_message_size(algorithm):
    """Top-10% with 8-bit values: every task uploads exactly the compressor's message
    for the model (plus, for SCAFFOLD, its float32 control delta), so a step's bytes_up
    is that size times the results it folded; the upload time follows from it."""
    overrides = [
        *SMALL,
        f"algorithm={algorithm}",
        "compression=topk_qsgd",
        "compression.ratio=0.1",
        "compression.error_feedback=true",
    ]
    cfg = resolve(apply_overrides(load_config_source("quickstart"), overrides))
    history = run(cfg)
    n = 64 * 64 + 64 + 64 * 10 + 10  # quickstart's MLP: 64 inputs, 64 hidden, 10 classes
    per_task = topk_qsgd(0.1, 8).nbytes(n) + (4 * n if algorithm == "scaffold" else 0)
    for record in history.records:
        assert record["bytes_up"] == per_task * record["clients"]
        assert 0 < record["client_compression_error"] < 1


def test_an_algorithm_that_uploads_neither_model_nor_delta_is_refused():
    overrides = [*SMALL, "algorithm=fednova", "compression=topk"]
    with pytest.raises(ConfigError, match="compression=topk: algorithm=fednova cannot be wrapped"):
        run(resolve(apply_overrides(load_config_source("quickstart"), overrides)))
    overrides = [*SMALL, "algorithm=teasq", "compression=topk"]  # compresses its own uploads
    with pytest.raises(ConfigError, match="algorithm=teasq cannot be wrapped"):
        run(resolve(apply_overrides(load_config_source("quickstart"), overrides)))


def test_each_method_takes_only_its_own_fields():
    tree = apply_overrides(
        load_config_source("quickstart"), ["compression=qsgd", "compression.ratio=0.2"]
    )
    with pytest.raises(ConfigError, match="ratio"):
        resolve(tree)
    cfg = resolve(
        apply_overrides(
            load_config_source("quickstart"), ["compression=qsgd", "compression.bits=4"]
        )
    )
    assert cfg.name("compression") == "qsgd" and cfg.config("compression").bits == 4
