"""A worker process killed mid-run stops the run with an error naming it and its clients;
``roost run --resume`` then finishes with the uninterrupted run's model (float summation
order aside: see test_workers_parity.py for the tolerance)."""

from __future__ import annotations

import json
import re
import signal

import psutil
import torch

from roost.config import apply_overrides, load_config_source, resolve
from roost.runner import run

OVERRIDES = [
    "rounds=6",
    "clients=30",
    "clients_per_round=10",
    "model=cnn",
    "algorithm=scaffold",
    "algorithm.local_epochs=2",
    "runtime=workers",
    "workers=2",
]


def _params(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["strategy"]


def test_killed_worker_is_named_and_the_run_resumes(tmp_path, start_run_until_round, resume_run):
    cut = tmp_path / "cut"
    proc = start_run_until_round(OVERRIDES, cut)
    metrics = cut / "metrics.jsonl"
    workers = [
        c
        for c in psutil.Process(proc.pid).children(recursive=True)
        if c.name().startswith("roost-worker")  # workers name themselves roost-worker-N
    ]
    assert len(workers) == 2, [c.cmdline() for c in workers]
    victim = workers[0]
    victim.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    line = [x for x in err.splitlines() if x.startswith("roost: error:")]
    assert len(line) == 1, err
    match = re.search(
        rf"worker (\d) \(pid {victim.pid}\) died \(killed by SIGKILL\) during "
        r"round (\d) holding clients \[([\d, ]*)\]",
        line[0],
    )
    assert match, line[0]
    done = len(metrics.read_text().splitlines())
    assert 2 <= done < 6

    resumed = resume_run(cut)
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5, 6]

    full = resolve(apply_overrides(load_config_source("quickstart"), OVERRIDES))
    run(full, tmp_path / "full")
    a, b = _params(cut), _params(tmp_path / "full")
    torch.testing.assert_close(a["params"], b["params"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["control"], b["control"], rtol=1e-5, atol=1e-6)
    # The scheduler's learned speeds came through the checkpoint: each worker has one
    # observation per round of the whole run (both get tasks every round: 10 clients on
    # 2 workers), not only of the rounds after the resume.
    scheduler = torch.load(cut / "checkpoint.pt", weights_only=True)["runtime"]["scheduler"]
    assert scheduler["observations"] == [6, 6]
