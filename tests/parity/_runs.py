"""The small digits run the parity tests compare, and how they read its final model."""

from __future__ import annotations

from pathlib import Path

import torch

from roost.config import apply_overrides, load_config_source, resolve
from roost.engine import History
from roost.runner import run

BASE = ["clients=24", "clients_per_round=7", "rounds=3", "model.hidden=16", "eval_every=1"]
TEST_EXAMPLES = 360  # digits: 1,797 examples, 20% held out, stratified


def final_run(tmp_path: Path, name: str, overrides: list[str]) -> tuple[History, torch.Tensor]:
    """Run quickstart with BASE + ``overrides`` into ``tmp_path/name``; return its history
    and final global parameters (from the checkpoint)."""
    cfg = resolve(apply_overrides(load_config_source("quickstart"), [*BASE, *overrides]))
    history = run(cfg, tmp_path / name)
    params = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["strategy"]["params"]
    return history, params
