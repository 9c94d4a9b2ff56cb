"""A run that goes wrong says so in one line and leaves nothing misleading behind."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from roost.cli import main

SMALL = ["quickstart", "rounds=3", "clients=20", "clients_per_round=5", "--quiet"]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_a_run_that_diverges_in_round_1_stops_and_leaves_no_directory(tmp_path, capsys):
    # lr 1e6 blows the MLP up in the first local steps: the round-1 update's norm
    # overflows float32 (~1.8e19), so the run must stop there with exit 1
    out = tmp_path / "run"
    assert main(["run", *SMALL, "algorithm.lr=1e6", "--out", str(out)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("roost: error: round 1: a non-finite update_norm after the server ")
    assert "diverged" in line and "algorithm.lr" in line and "nothing was written" in line
    assert not out.exists()


def test_a_run_that_diverges_later_keeps_the_good_rounds_and_says_diverged(tmp_path, capsys):
    # A callback poisons the model after round 2, as an exploding step would; round 3's
    # FedAvg mean of clients trained from NaN is NaN, so round 3 must be refused.
    import torch

    from roost.config import apply_overrides, load_config_source, resolve
    from roost.errors import Diverged
    from roost.runner import run

    cfg = resolve(apply_overrides(load_config_source("quickstart"), SMALL[1:-1]))
    engine_ref = {}

    def poison(record):
        if record["round"] == 2:
            engine_ref["strategy"].params = torch.full_like(engine_ref["strategy"].params, 1e38)
        return False, {}

    import roost.runner as runner_module

    original = runner_module.Engine

    class Spy(original):  # type: ignore[misc, valid-type]
        def __init__(self, **kw):
            super().__init__(**kw)
            engine_ref["strategy"] = self.strategy

    runner_module.Engine = Spy
    try:
        with pytest.raises(
            Diverged, match=r"^round 3: [\d,]+ of the global model's [\d,]+ values are NaN or Inf"
        ):
            run(cfg, tmp_path / "run", callbacks=[poison])
    finally:
        runner_module.Engine = original
    rounds = [json.loads(x)["round"] for x in (tmp_path / "run" / "metrics.jsonl").open()]
    assert rounds == [1, 2]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["error"].startswith("round 3:")


def test_metrics_never_hold_nan_or_infinity(tmp_path):
    from roost.track.rundir import RunDir

    rundir = RunDir(tmp_path)
    rundir.create({})
    rundir.append_metrics({"round": 1, "update_norm": float("inf"), "x": [float("nan"), 1.0]})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(text) == {"round": 1, "update_norm": None, "x": [None, 1.0]}
    assert "Infinity" not in text and "NaN" not in text


def test_a_round_with_every_client_dropped_warns_once(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "deadline_s=0.0001", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("roost: warning:")]
    assert warnings == [
        "roost: warning: round 1: none of the 5 selected clients could arrive within "
        "deadline_s=0.0001, so the global model did not change; later rounds like it are "
        "not warned about again (summary.json counts them in rounds_without_clients)"
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_without_clients"] == 3


def test_out_naming_an_existing_file_is_one_line_and_exit_2(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("keep me")
    assert main(["run", *SMALL, "--out", str(target)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"roost: error: {target} is a file, not a run directory; choose another --out"
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("out_given", [True, False])
def test_a_run_that_fails_before_its_first_round_leaves_no_directory(
    tmp_path, capsys, monkeypatch, out_given
):
    monkeypatch.chdir(tmp_path)
    args = ["run", *SMALL, "clients_per_round=500"]  # more than the 20 clients: fails at build
    if out_given:
        args += ["--out", "runs/x"]
    assert main(args) == 2
    assert _one_error_line(capsys.readouterr().err).startswith(
        "roost: error: clients_per_round=500: must be <= the number of clients (20)"
    )
    assert not (tmp_path / "runs").exists()


def test_a_failed_start_in_an_existing_directory_removes_only_its_own_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["run", *SMALL, "clients_per_round=500", "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_yaml_syntax_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: 3\nmodel: [mlp\n")
    assert main(["run", str(bad)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == (
        f"roost: error: {bad}: invalid YAML: line 3, column 1: expected ',' or ']', but got "
        "'<stream end>' (while parsing a flow sequence)"
    )


def test_resuming_a_finished_run_keeps_its_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--out", str(out)]) == 0
    summary = (out / "summary.json").read_bytes()
    mtime = (out / "summary.json").stat().st_mtime_ns
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert (out / "summary.json").read_bytes() == summary
    assert (out / "summary.json").stat().st_mtime_ns == mtime
    assert "3 rounds, 20 clients; results in" in capsys.readouterr().out


def test_ctrl_c_under_workers_is_one_line_naming_the_run_directory(tmp_path, start_run_until_round):
    out = tmp_path / "run"
    overrides = ["runtime=workers", "workers=2", "rounds=100000", "clients=20"]
    proc = start_run_until_round(overrides, out, rounds_done=2, new_session=True)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert _one_error_line(err) == (f"roost: interrupted; continue with roost run --resume {out}")
    time.sleep(0.5)  # the workers were killed by the server, not left behind
    assert (out / "checkpoint.pt").exists()


def test_ctrl_c_before_anything_was_written_does_not_suggest_resume(capsys, monkeypatch):
    import roost.runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(roost.runner, "run", interrupted)
    assert main(["run", *SMALL, "--out", "never-made"]) == 130
    assert capsys.readouterr().err.strip() == "roost: interrupted; nothing was written"
