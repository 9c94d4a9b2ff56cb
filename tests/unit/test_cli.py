"""The command line: runs, errors as one line with exit code 2, plots."""

import json

import pytest
import torch

from roost.cli import main

SMALL = ["quickstart", "rounds=2", "clients=20", "clients_per_round=5", "--quiet"]


def test_run_writes_config_metrics_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["rounds"] == 2 and config["algorithm"]["name"] == "fedavg"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["round"] for r in records] == [1, 2]
    for key in ("virtual_time_s", "wall_time_s", "accuracy", "loss", "clients"):
        assert key in records[0]
    assert records[0]["clients"] == 5
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "final_accuracy",
        "final_loss",
        "rounds",
        "wall_s",
        "virtual_time_s",
        "peak_rss_mb",
    ):
        assert key in summary
    assert summary["final_accuracy"] == records[-1]["accuracy"]
    assert "results in" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["algorithm.mu=0.1"], "roost: error: algorithm.mu=0.1: unknown key; allowed:"),
        (
            ["algorithm=fedprox", "algorithm.mu=abc"],
            "roost: error: algorithm.mu=abc: expected a number",
        ),
        (["data.path=/nonexistent"], "roost: error: data.path=/nonexistent"),
        (["runtime.device=gpu"], "roost: error: runtime.device=gpu: must be auto, cpu, cuda"),
    ],
)
def test_bad_keys_and_values_exit_2_with_one_line(tmp_path, capsys, args, expected):
    code = main(["run", *SMALL, *args, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(expected), err
    assert err.count("\n") == 1


def test_existing_run_directory_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--out", str(out)]) == 0
    before = (out / "metrics.jsonl").read_text()
    assert main(["run", *SMALL, "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine with no GPU")
@pytest.mark.parametrize("runtime", ["local", "workers"])
def test_gpu_asked_on_a_machine_without_one_fails_at_start(tmp_path, capsys, runtime):
    out = tmp_path / "run"
    code = main(["run", *SMALL, f"runtime={runtime}", "runtime.device=cuda", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    expected = "runtime.device=cuda: no CUDA GPU is visible here; use device=cpu or auto"
    assert err == f"roost: error: {expected}\n"
    # The run never finished a round: its directory is reused once the device is fixed.
    assert main(["run", *SMALL, f"runtime={runtime}", "runtime.device=cpu", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["runtime"]["device"] == "cpu"


def test_plot_writes_png_for_several_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", *SMALL, "--out", str(a)]) == 0
    assert main(["run", *SMALL, "algorithm=fedprox", "--out", str(b)]) == 0
    png = tmp_path / "cmp.png"
    assert main(["plot", str(a), str(b), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_non_run_directory_fails_clearly(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "not a run directory: config.json is missing" in capsys.readouterr().err
