"""The TensorBoard writer: the scalars read back from its event files are the ones written,
at the right rounds, once each after a resume; a clear error without TensorBoard."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from roost.track.tensorboard import TensorBoardWriter, scalars

# Values exactly representable in float32 (TensorBoard stores scalars as float32).
ROUND_1 = {
    "round": 1,
    "accuracy": None,  # not evaluated: skipped
    "loss": None,
    "train_loss": 2.5,
    "update_norm": 0.75,
    "clients": 10,
    "dropped": 2,
    "bytes_up": 1024,
    "virtual_time_s": 1.5,
    "wall_time_s": 0.25,
    "client_personal_accuracy": 0.125,
    "stopped": False,  # a bool: skipped
    "note": "text",  # not a number: skipped
    "per_client": [1.0, 2.0],  # a list: skipped
}
ROUND_2 = {
    "round": 2,
    "accuracy": 0.625,
    "loss": 1.25,
    "train_loss": 1.5,
    "update_norm": 0.5,
    "clients": 10,
    "dropped": 0,
    "bytes_up": 2048,
    "virtual_time_s": 3.0,
    "wall_time_s": 0.5,
    "client_personal_accuracy": 0.375,
}


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` as TensorBoard itself loads the directory."""
    ea_module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea_module.EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_keep_numbers_and_skip_none_bools_strings_and_lists():
    assert scalars(ROUND_1) == {
        "train_loss": 2.5,
        "update_norm": 0.75,
        "clients": 10.0,
        "dropped": 2.0,
        "bytes_up": 1024.0,
        "virtual_time_s": 1.5,
        "wall_time_s": 0.25,
        "client_personal_accuracy": 0.125,
    }


def test_written_scalars_read_back_with_the_round_as_step(tmp_path):
    pytest.importorskip("tensorboard")
    log_dir = tmp_path / "run" / "tensorboard"
    writer = TensorBoardWriter(log_dir)
    assert writer(ROUND_1) == (False, {})
    assert writer(ROUND_2) == (False, {})
    writer.close()
    got = read_scalars(log_dir)
    assert got == {
        "accuracy": [(2, 0.625)],
        "loss": [(2, 1.25)],
        "train_loss": [(1, 2.5), (2, 1.5)],
        "update_norm": [(1, 0.75), (2, 0.5)],
        "clients": [(1, 10.0), (2, 10.0)],
        "dropped": [(1, 2.0), (2, 0.0)],
        "bytes_up": [(1, 1024.0), (2, 2048.0)],
        "virtual_time_s": [(1, 1.5), (2, 3.0)],
        "wall_time_s": [(1, 0.25), (2, 0.5)],
        "client_personal_accuracy": [(1, 0.125), (2, 0.375)],
    }


def test_events_are_on_disk_after_each_round_before_close(tmp_path):
    pytest.importorskip("tensorboard")
    log_dir = tmp_path / "tensorboard"
    writer = TensorBoardWriter(log_dir)
    assert not log_dir.exists()  # nothing is made before the first round has ended
    writer(ROUND_1)
    assert read_scalars(log_dir)["train_loss"] == [(1, 2.5)]  # a killed run keeps it
    writer.close()
    writer.close()  # closing twice is harmless


def test_resume_replaces_rounds_past_the_checkpoint_and_duplicates_no_step(tmp_path):
    pytest.importorskip("tensorboard")
    # First session: rounds 1-3 logged, but killed before round 3 was checkpointed.
    with TensorBoardWriter(tmp_path) as writer:
        for r, loss in [(1, 3.0), (2, 2.0), (3, 1.0)]:
            writer({"round": r, "train_loss": loss, "accuracy": None})
    # Event files sort by their name's whole-second timestamp: start the next one later,
    # as a real resume (a new process, seconds later) does.
    second = int(time.time())
    while int(time.time()) == second:
        time.sleep(0.05)
    # Resume from the checkpoint of round 2: this session starts at round 3.
    with TensorBoardWriter(tmp_path) as writer:
        for r, loss in [(3, 0.5), (4, 0.25)]:
            writer({"round": r, "train_loss": loss})
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert read_scalars(tmp_path) == {"train_loss": [(1, 3.0), (2, 2.0), (3, 0.5), (4, 0.25)]}


def test_without_tensorboard_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    # As on a machine without the package: torch.utils.tensorboard's `import tensorboard`
    # fails (and any earlier import of it is forgotten).
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(ValueError) as info:
        TensorBoardWriter(tmp_path / "tb")
    assert str(info.value) == (
        "roost's TensorBoard writer needs TensorBoard: pip install 'roost[tensorboard]'"
    )
    assert not (tmp_path / "tb").exists()


def test_a_run_with_tensorboard_true_writes_its_metrics_next_to_metrics_jsonl(tmp_path):
    import json

    from roost.cli import main

    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = ["run", "quickstart", "rounds=2", "clients=10", "clients_per_round=3", "--quiet"]
    assert main([*args, "tensorboard=true", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    got = read_scalars(out / "tensorboard")
    # float32 storage: compare to the JSON values at float32 precision
    assert [s for s, _ in got["accuracy"]] == [1, 2]
    for (step, value), rec in zip(got["accuracy"], records, strict=True):
        assert step == rec["round"] and value == pytest.approx(rec["accuracy"], rel=1e-6)
    assert [v for _, v in got["clients"]] == [3.0, 3.0]
