"""Each real-data loader runs end to end from the command line on the staged files.

The files live in ../shared/data (shared/data/PROVENANCE.md); these tests skip cleanly
where that folder is absent.
"""

import json
from pathlib import Path

import pytest

from roost.cli import main

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not here")
    return path


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "run"
    assert main(["run", "quickstart", *args, "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "summary.json").read_text())


def test_femnist_leaf_with_cnn(tmp_path):
    leaf = _need(SHARED / "femnist_leaf")
    summary = _run(
        tmp_path,
        "data=leaf",
        f"data.path={leaf}",
        "data.num_classes=62",
        "partition=natural",
        "clients=none",
        "model=cnn",
        "clients_per_round=4",
        "rounds=2",
        "algorithm.batch_size=20",
        "algorithm.local_epochs=1",
        "algorithm.lr=0.05",
    )
    # 31 writers, 518 test images, 62 classes: after 2 rounds the model is barely
    # trained, but evaluation ran on the real split.
    assert summary["rounds"] == 2 and 0.0 <= summary["final_accuracy"] <= 1.0


def test_mnist_idx_folder(tmp_path):
    mnist = _need(SHARED / "mnist")
    summary = _run(
        tmp_path,
        "data=mnist",
        f"data.path={mnist}",
        "partition=dirichlet",
        "clients=50",
        "rounds=3",
        "model.hidden=64",
    )
    # 8,000 t10k training images over 50 clients: a few rounds of FedAvg pass 0.5.
    assert summary["final_accuracy"] > 0.5


def test_tiny_shakespeare_by_speaker_with_char_lstm(tmp_path):
    text = _need(SHARED / "tinyshakespeare" / "input.txt")
    summary = _run(
        tmp_path,
        "data=text",
        f"data.path={text}",
        "data.stride=160",
        "data.min_chars=20000",
        "data.max_test=300",
        "partition=natural",
        "clients=none",
        "model=char_lstm",
        "model.hidden=32",
        "clients_per_round=3",
        "rounds=2",
        "algorithm.batch_size=32",
        "algorithm.local_epochs=1",
        "algorithm.lr=0.5",
    )
    # 65 symbols: a model that learnt anything beats the uniform loss ln 65 ≈ 4.17.
    assert summary["final_loss"] < 4.17


def test_femnist_on_the_quickstart_gets_one_client_per_writer(tmp_path, capsys):
    # What a newcomer types: no partition, no clients. The staged shards hold 31 writers.
    leaf = _need(SHARED / "femnist_leaf")
    summary = _run(tmp_path, "data=leaf", f"data.path={leaf}", "model=cnn", "rounds=1")
    assert summary["clients"] == 31
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["partition"]["name"], config["clients"]) == ("natural", None)
    assert "roost: note: data=leaf has natural clients" in capsys.readouterr().err


@pytest.mark.slow
def test_femnist_with_the_readmes_cnn_settings_learns_in_10_rounds(tmp_path):
    # The README's `quickstart data=leaf data.path=... model=cnn algorithm.lr=0.05` (10 of
    # 31 writers a round, batch 10, 5 epochs), its first 10 rounds: a third of the cost
    # of the README's 30 (about 100 s on 2 cores), in CI. Measured 0.689 at round 10
    # (seed 0, 2026-12-03); 0.6 leaves room for other machines' float rounding.
    leaf = _need(SHARED / "femnist_leaf")
    args = ("data=leaf", f"data.path={leaf}", "model=cnn", "algorithm.lr=0.05", "rounds=10")
    summary = _run(tmp_path, *args)
    assert summary["clients"] == 31
    assert summary["final_accuracy"] >= 0.6


@pytest.mark.experiment
def test_femnist_with_the_readmes_cnn_settings_reaches_its_accuracy(tmp_path):
    # The README's number: 0.79 after the 30 rounds. Measured 0.7915 (seed 0); 0.7 leaves
    # room for other machines' float rounding. About 5 minutes: with the experiments.
    leaf = _need(SHARED / "femnist_leaf")
    summary = _run(tmp_path, "data=leaf", f"data.path={leaf}", "model=cnn", "algorithm.lr=0.05")
    assert summary["clients"] == 31
    assert summary["final_accuracy"] >= 0.7
