"""What users expect of the command line: --version, roost list with plugins and run keys,
clear refusals of bad imports=, the client count, and runs that stop early on purpose."""

from __future__ import annotations

import json

import pytest

import roost
from roost.cli import main

SMALL = ["quickstart", "rounds=6", "clients=20", "clients_per_round=5", "--quiet"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"roost {roost.__version__}\n"


def test_list_shows_run_keys_and_aliases(capsys):
    assert main(["list", "run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "run (top-level keys):"
    for line in (
        "  rounds=10",
        "  deadline_s=none",
        "  target_accuracy=none",
        "  tensorboard=false",
    ):
        assert line in out
    assert "  workers: short for runtime.workers" in out


def test_list_shows_components_registered_by_imports(tmp_path, capsys, monkeypatch):
    from roost.algorithms.base import ALGORITHMS

    monkeypatch.setattr(ALGORITHMS, "_entries", dict(ALGORITHMS._entries))
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "from roost.algorithms.fedavg import FedAvg, FedAvgConfig\n"
        "from roost.algorithms.base import register_algorithm\n"
        "@dataclass(frozen=True)\n"
        "class Cfg(FedAvgConfig):\n"
        "    shrink: float = 0.5\n"
        "@register_algorithm('listed_plugin')\n"
        "class Listed(FedAvg):\n"
        "    '''A plugin algorithm for the list test.'''\n"
        "    Config = Cfg\n"
    )
    assert main(["list", "algorithm", f"imports={plugin}"]) == 0
    out = capsys.readouterr().out
    assert "listed_plugin  A plugin algorithm for the list test." in out
    assert "shrink=0.5" in out
    assert main(["list", "algorithm", "rounds=3"]) == 2
    assert "roost list takes only imports=" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notes.txt", "hello", "not a Python file; give a path ending in .py or a module name"),
        ("conf.yaml", "a: 1", "not a Python file; give a path ending in .py or a module name"),
        ("broken.py", "def f(:\n", "invalid Python: "),
        ("missing.py", None, "no such Python file"),
    ],
)
def test_imports_of_a_non_python_file_is_refused_clearly(
    tmp_path, capsys, monkeypatch, name, content, message
):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / name).write_text(content)
    assert main(["run", *SMALL, f"imports={name}", "--out", "r"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"roost: error: imports={name}: {message}"), err
    assert err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_the_run_prints_and_records_its_number_of_clients(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "rounds=1", "--out", str(out)]) == 0
    assert "1 rounds, 20 clients; results in" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["clients"] == 20


def test_notes_about_dropped_parameters_are_printed(tmp_path, capsys):
    assert main(["run", *SMALL, "rounds=1", "model=cnn", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "roost: note: model=cnn does not take hidden=[64] (set for mlp); dropped\n" in err


def test_a_run_stops_at_its_target_accuracy_and_stays_stopped_on_resume(tmp_path, capsys):
    # accuracy on digits passes 0.3 within the first rounds (about 0.5 after round 1 with
    # the preset's settings); the run must stop at the first evaluated round reaching it
    out = tmp_path / "run"
    assert main(["run", *SMALL, "rounds=50", "target_accuracy=0.3", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    hit = next(i for i, r in enumerate(records) if r["accuracy"] >= 0.3)
    assert len(records) == hit + 1 < 50
    assert records[-1]["stopped"].startswith("target_accuracy 0.3 reached")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["rounds"]) == ("stopped", hit + 1)
    assert "(stopped: target_accuracy 0.3 reached" in capsys.readouterr().out
    assert main(["run", "--resume", str(out), "--quiet"]) == 0  # finished: nothing more
    assert len((out / "metrics.jsonl").read_text().splitlines()) == hit + 1


def test_a_run_stops_when_its_virtual_time_budget_is_used(tmp_path):
    out = tmp_path / "run"
    # quickstart's heterogeneous devices take a fraction of a virtual second per round
    assert main(["run", *SMALL, "rounds=50", "virtual_time_budget_s=1", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    times = [r["virtual_time_s"] for r in records]
    assert times[-1] >= 1.0 and all(t < 1.0 for t in times[:-1])
    assert records[-1]["stopped"].startswith("virtual_time_budget_s 1 used")


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("target_accuracy=1.5", "target_accuracy=1.5: must be in (0, 1] or none"),
        ("virtual_time_budget_s=0", "virtual_time_budget_s=0: must be a number > 0 or none"),
    ],
)
def test_bad_stop_rules_are_refused(tmp_path, capsys, arg, message):
    assert main(["run", *SMALL, arg, "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == f"roost: error: {message}\n"


def test_imports_without_gc_turns_the_collector_off_then_freezes_what_was_made():
    """Inside: no collection runs (the collector is off). After: it is on again if it
    was, and the objects made inside are in the permanent generation (the freeze count
    grew by at least the 1,000 lists made there); a collector that was off stays off."""
    import gc

    from roost.cli import imports_without_gc

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with imports_without_gc():
            assert not gc.isenabled()
            made = [[] for _ in range(1000)]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + 1000
        gc.disable()
        with imports_without_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
    del made


def test_main_freezes_nothing_when_the_run_modules_are_already_imported(capsys):
    """``roost run`` imports roost.runner under imports_without_gc once per process: here
    (a test process that has imported it) the freeze count stays as it was."""
    import gc
    import sys

    import roost.runner  # noqa: F401

    assert "roost.runner" in sys.modules
    frozen = gc.get_freeze_count()
    assert main(["run", "no-such-preset", "--quiet"]) == 2
    assert "no-such-preset" in capsys.readouterr().err
    assert gc.get_freeze_count() == frozen


def test_a_fresh_roost_process_imports_under_a_frozen_collector():
    """In a new process ``main`` imports roost.runner (torch with it) with the collector
    off and freezes the result: over 100,000 objects (torch alone makes several hundred
    thousand) end in the permanent generation, and the collector is on again."""
    import subprocess
    import sys

    code = (
        "import gc; from roost.cli import main; rc = main(['run', 'no-such-preset']); "
        "print(rc, gc.get_freeze_count() > 100_000, gc.isenabled())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "True", "True"]
