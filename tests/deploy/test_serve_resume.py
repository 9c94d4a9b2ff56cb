"""A served run survives ``kill -9`` of its server (issue 9, item 4): ``roost serve
--resume DIR`` continues it, every update acknowledged before the kill is applied exactly
once, and the nodes reconnect by themselves.

The server is a real ``roost serve`` process (so the kill is real); the 4 nodes run in this
process on threads (each its own key and TLS channel). The algorithm is SCAFFOLD, whose
client control variates live on the nodes: an update applied twice, or a task trained
twice on a node (its state advanced twice), would change the final model. So the oracle
is the simulation of the same run: the resumed run must end on its model (to 1e-5).

Timeline: rounds 1-2 run; in round 3 node 3 holds its result for 4 s while the other
three push theirs (acknowledged, so journaled); the test checks that the journal holds
those three, then kills the server, restarts it with ``--resume`` and lets node 3 go on.
Node 3's push fails while the server is down, is refused by the new server (it does not
know that task yet), and the server, replaying its journal, delivers the three kept
results and sends node 3's task again under the same id: the node pushes the result it
kept (without training again). Nodes 0-2 are never sent their round-3 task again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

from _deploy_helpers import FAST
from _serving import SMALL, federation, start_nodes

from roost.deploy.client import ClientConfig
from roost.deploy.journal import JOURNAL_FILE
from roost.deploy.node import NodeWorker
from roost.runner import run
from roost.track.rundir import RunDir

CASES: dict[str, dict[str, Any]] = {
    # 4 tasks per round, keys 4(r-1) .. 4r-1: round 3 is keys 8-11; the node given key 11
    # holds its result while 8-10 are acknowledged; rounds 1-2 closed before the kill
    "scaffold": {
        "tree": {
            **SMALL,
            "rounds": 5,
            "algorithm": {"name": "scaffold", "lr": 0.1, "batch_size": 10},
        },
        "held": 11,
        "acked": {8, 9, 10},
        "records_before": 2,
    },
    # one task in flight, a step every 2 arrivals: keys 0-3 made steps 1-2, key 4 is
    # acknowledged and waits in the buffer (not applied) when the server dies, and the
    # node given key 5 holds its result
    "fedbuff": {
        "tree": {
            **SMALL,
            "rounds": 5,
            "clients_per_round": 1,
            "algorithm": {
                "name": "fedbuff",
                "lr": 0.1,
                "batch_size": 10,
                "concurrency": 1,
                "buffer_size": 2,
            },
        },
        "held": 5,
        "acked": {4},
        "records_before": 2,
    },
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "roost", "serve", *args, "--quiet", "--heartbeat", "0.5"]
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_server_killed_mid_step_resumes_and_applies_every_acked_update_once(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree, held_key = CASES[case]["tree"], CASES[case]["held"]
    keys = federation(tmp_path / "keys", 4)
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tree))
    out = tmp_path / "served"
    address = f"127.0.0.1:{_free_port()}"
    log = tmp_path / "server.log"

    received: Counter[tuple[str, str]] = Counter()  # (node, task id) -> times sent to it
    release = threading.Event()
    held: list[str] = []
    original_run_one = NodeWorker.run_one
    original_push = NodeWorker._push

    def run_one(self: NodeWorker, task: Any) -> bool:
        received[threading.current_thread().name, task.task_id] += 1
        return original_run_one(self, task)

    def push(self: NodeWorker, task_id: str, result: Any) -> bool:
        if task_id.endswith(f"-{held_key}") and not held:
            held.append(task_id)
            release.wait(60)
        return original_push(self, task_id, result)

    monkeypatch.setattr(NodeWorker, "run_one", run_one)
    monkeypatch.setattr(NodeWorker, "_push", push)

    server = _serve(  # every node there before the first selection, as in simulation
        [
            str(config),
            "--address",
            address,
            "--keys",
            str(keys),
            "--out",
            str(out),
            "--min-nodes",
            "4",
        ],
        log,
    )
    client_config = ClientConfig(backoff=type(FAST)(initial_s=0.05, max_s=0.5, max_total_s=120))
    threads, trained = start_nodes(
        address,
        keys,
        range(4),
        lambda i: {
            "client_id": i,
            "state_dir": tmp_path / f"state-{i}",
            "client_config": client_config,
        },
    )
    try:
        _wait_for(lambda: bool(held), 60, f"a node to hold the result of task {held_key}")
        journal = out / JOURNAL_FILE
        prefix = held[0].rsplit("-", 1)[0]
        acked = {f"{prefix}-{k}" for k in CASES[case]["acked"]}

        def journaled() -> set[str]:
            with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as db:
                rows = db.execute("SELECT task_id FROM results").fetchall()
            return {r[0] for r in rows} & acked

        _wait_for(lambda: journaled() == acked, 30, f"results {sorted(acked)} acknowledged")
        time.sleep(0.2)  # let the engine apply them (or not): the kill may come at any time
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == CASES[case]["records_before"]
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)

        resumed = _serve(  # it goes on once the 4 nodes are back, as in simulation
            ["--resume", str(out), "--address", address, "--keys", str(keys), "--min-nodes", "4"],
            log,
        )
        time.sleep(0.5)
        release.set()  # the held push reaches a server that replays, then the live one
        assert resumed.wait(120) == 0, log.read_text()
    finally:
        release.set()
        if server.poll() is None:
            server.kill()
        for t in threads:
            t.join(30)
    assert all(isinstance(n, int) for n in trained.values()), trained

    sim = tmp_path / "sim"
    run(tree, sim)
    got = RunDir(out).load_checkpoint()["strategy"]
    want = RunDir(sim).load_checkpoint()["strategy"]
    rounds = tree["rounds"]
    assert got["version"] == want["version"] == rounds
    diff = (got["params"] - want["params"]).abs().max().item()
    assert diff <= 1e-5, diff
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (sim / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    assert [r["clients"] for r in records] == [r["clients"] for r in expected]
    # only the held task was sent twice (to the same node); every other task once
    twice = [(n, t) for (n, t), k in received.items() if k > 1]
    assert len(twice) == 1 and twice[0][1] == held[0] and received[twice[0]] == 2
    # and no task was trained twice: the nodes trained as many as the simulation did
    assert sum(trained.values()) == sum(r["clients"] for r in expected)
