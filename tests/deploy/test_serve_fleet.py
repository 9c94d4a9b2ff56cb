"""100 nodes, 20 of them dying mid-run (issue 9, item 4): the run still finishes.

Each node is its own identity (a ``roost keys`` federation of 100) with its own TLS channel,
data and runtime; they are hosted on threads of this process, which is what lets 100 fit
in memory. 40 clients per round with 25% over-selection (50 tasks sent per round). From
round 2 on, nodes 0-19 die at their first task: they stop calling the server at all (no
heartbeat, no result), as a device that lost power. The watchdog (silent after 3
heartbeats of 1 s) disconnects each dead node and its task is lost (or, if its round
already had its 40 results, dropped); a round closes at its 40th result or when none of
its tasks is left, so every round still counts results.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

from _serving import SMALL, federation, start_nodes, start_server

from roost.deploy.coordinator import EngineCoordinator
from roost.deploy.node import NodeWorker

NODES, DEAD = 100, 20


class _Dead(Exception):
    """A dead node's thread ends with this, after the run."""


def test_a_run_of_100_nodes_finishes_when_20_die_mid_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = {
        **SMALL,
        "rounds": 4,
        "clients": NODES,
        "clients_per_round": 40,
        "over_selection": 0.25,
        "algorithm": {"name": "fedavg", "lr": 0.2, "batch_size": 10, "local_epochs": 5},
    }
    dead = {f"node-{i}" for i in range(DEAD)}
    died: set[str] = set()
    gone = threading.Event()  # set at the end: the dead threads may then return
    original = NodeWorker.run_one

    def run_one(self: NodeWorker, task: Any) -> bool:
        name = threading.current_thread().name
        if name in dead and task.round >= 2:
            died.add(name)
            gone.wait(120)  # silent from now on
            raise _Dead(name)  # and never back (its thread ends)
        return original(self, task)

    coordinators: list[EngineCoordinator] = []
    init = EngineCoordinator.__init__

    def keep(self: EngineCoordinator, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        coordinators.append(self)

    monkeypatch.setattr(NodeWorker, "run_one", run_one)
    monkeypatch.setattr(EngineCoordinator, "__init__", keep)
    keys = federation(tmp_path / "keys", NODES)
    served = start_server(
        tree,
        tmp_path / "served",
        keys,
        heartbeat_s=1.0,
        retry_after_s=0.5,
        min_nodes=NODES,
        finish_grace_s=3.0,
    )
    threads, trained = start_nodes(served.address, keys, range(NODES))
    try:
        history = served.join(240, trained)
    finally:
        gone.set()
        for t in threads:
            t.join(30)
    assert sorted(i for i, v in trained.items() if isinstance(v, _Dead)) == sorted(
        int(n.removeprefix("node-")) for n in died
    )  # every other node trained and stopped when the run was over
    assert all(isinstance(v, int) for i, v in trained.items() if f"node-{i}" not in died)
    records = history.records
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert records[0]["clients"] == 40  # round 1: nobody dead, closes at its 40th result
    assert all(r["clients"] >= 1 for r in records)
    # dead nodes were noticed (a node dying in the last round may not be, before the run
    # ends), and only dead ones: no live node was taken for silent
    (coordinator,) = coordinators
    assert died, "no dead node was selected in rounds 2-4"
    assert coordinator.disconnected, "the watchdog noticed no dead node"
    assert set(coordinator.disconnected) <= died
    assert len(coordinator.disconnected) == len(set(coordinator.disconnected))  # once each
    assert sum(r["offline"] + r["dropped"] for r in records) >= len(coordinator.disconnected)
    print(
        "DEBUG",
        [
            (
                r["round"],
                r["clients"],
                r["offline"],
                r["dropped"],
                round(r["virtual_time_s"], 1),
                r.get("accuracy"),
            )
            for r in records
        ],
        sorted(died),
        coordinator.disconnected,
    )
    assert history.final["accuracy"] > 0.5  # digits' 10 classes: 0.1 is chance
