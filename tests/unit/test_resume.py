"""Checkpoints and --resume: a killed run continues to exactly the uninterrupted result."""

import json
import signal
from pathlib import Path

import pytest
import torch

from roost.config import apply_overrides, load_config_source, resolve
from roost.runner import resume, run

# Small enough to be quick, stateful enough to matter: FedAdam keeps server moments that a
# resume must restore, and Dirichlet clients on heterogeneous devices give distinct rounds.
OVERRIDES = ["rounds=4", "clients=20", "clients_per_round=5", "algorithm=fedadam"]


def _final_params(out: Path) -> torch.Tensor:
    return torch.load(out / "checkpoint.pt", weights_only=True)["strategy"]["params"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class Crash(Exception):
    pass


def test_resume_after_an_in_process_crash_matches_the_uninterrupted_run(tmp_path):
    cfg = resolve(apply_overrides(load_config_source("quickstart"), OVERRIDES))
    run(cfg, tmp_path / "full")

    def crash_after_round_2(record):
        if record["round"] == 2:
            raise Crash
        return False, {}

    with pytest.raises(Crash):
        run(cfg, tmp_path / "cut", callbacks=[crash_after_round_2])
    # The crash hit before round 2's checkpoint: the directory holds round 1 only.
    assert [r["round"] for r in _records(tmp_path / "cut")] == [1]
    resume(tmp_path / "cut")
    assert torch.equal(_final_params(tmp_path / "cut"), _final_params(tmp_path / "full"))
    full, cut = _records(tmp_path / "full"), _records(tmp_path / "cut")
    assert [r["round"] for r in cut] == [1, 2, 3, 4]
    for key in ("accuracy", "loss", "virtual_time_s", "train_loss"):
        assert [r[key] for r in cut] == [r[key] for r in full], key


def test_resume_after_sigkill_of_a_real_run(tmp_path, start_run_until_round, resume_run):
    """Kill a real `roost run` process mid-run with SIGKILL, then `roost run --resume`."""
    overrides = [
        "rounds=8",
        "clients=30",
        "clients_per_round=10",
        "model=cnn",
        "algorithm=fedadam",
        "algorithm.local_epochs=3",
    ]
    cfg = resolve(apply_overrides(load_config_source("quickstart"), overrides))
    run(cfg, tmp_path / "full")

    cut = tmp_path / "cut"
    proc = start_run_until_round(overrides, cut)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(_records(cut))
    assert 2 <= done < 8

    resumed = resume_run(cut)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.equal(_final_params(cut), _final_params(tmp_path / "full"))
    assert [r["round"] for r in _records(cut)] == list(range(1, 9))
    assert [r["accuracy"] for r in _records(cut)] == [
        r["accuracy"] for r in _records(tmp_path / "full")
    ]


def test_resume_of_a_missing_directory_fails_clearly(tmp_path):
    from roost.track.rundir import RunDirError

    with pytest.raises(RunDirError, match=r"config\.json is missing"):
        resume(tmp_path / "nothing")
