"""``roost serve`` and ``roost node`` (issue 9, item 1): a served run is the simulated run
with its tasks trained by nodes, keeping the same run directory; nodes get the run's config
at registration, hold their own data and state, and stop when the run is over.

Everything runs in this process on loopback with TLS (a ``roost keys`` federation): the
server's :func:`serve` on a thread, each node's :func:`run_node` on its own thread with its
own key and channel (tests/deploy/_serving.py).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

import torch
from _serving import SMALL, federation, serve_to_nodes, start_nodes, start_server

from roost.registry import ConfigError
from roost.runner import run
from roost.track.rundir import RunDir


def _params(out: Path) -> torch.Tensor:
    return RunDir(out).load_checkpoint()["strategy"]["params"]


def _records(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_served_fedavg_run_is_the_simulated_run(tmp_path: Path) -> None:
    """3 rounds of FedAvg on 4 digits clients, all selected every round. The server assigns
    client ids in registration order (lowest free first) and each node trains its client of
    the run's partitioned set, so every task is the simulation's task (same payload, data,
    seed): the final model agrees to 1e-6 (both fold in float64; only the order of the
    four sums differs), the accuracies are equal to 1e-9, and the run directory has what a
    simulated run's has (config, 3 metric lines, checkpoint, summary 'completed')."""
    keys = federation(tmp_path / "keys", 4)
    sim = tmp_path / "sim"
    run(SMALL, sim)
    served = start_server(SMALL, tmp_path / "served", keys)
    threads, trained = start_nodes(served.address, keys, range(4))
    history = served.join(120, trained)
    for t in threads:
        t.join(30)
    assert trained == {0: 3, 1: 3, 2: 3, 3: 3}  # each node: one task per round, then stops
    assert [r["clients"] for r in history.records] == [4, 4, 4]
    got, want = _records(tmp_path / "served"), _records(sim)
    assert [r["round"] for r in got] == [1, 2, 3]
    for g, w in zip(got, want, strict=True):
        assert g["accuracy"] == pytest.approx(w["accuracy"], abs=1e-9)
        assert g["train_loss"] == pytest.approx(w["train_loss"], abs=1e-6)
    diff = (_params(tmp_path / "served") - _params(sim)).abs().max().item()
    assert diff <= 1e-6, diff
    summary = json.loads((tmp_path / "served" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 3
    assert (tmp_path / "served" / "config.json").exists()


def test_a_node_with_its_own_data_is_given_a_free_client_id(tmp_path: Path) -> None:
    """Two nodes on a 2-client run: node 0 declares client 1 of the run's data
    (``client_id``), node 1 brings its own data (``clients=1``: the whole digits training
    set as its client 0) and is given the id left, 0. FedAvg weights each result by its
    examples: the own-data node's 1,437 (digits' 80% training split) against client 1's
    half of them. The run finishes its 2 rounds with both nodes in each."""
    keys = federation(tmp_path / "keys", 2)
    tree = {**SMALL, "clients": 2, "clients_per_round": 2, "rounds": 2}
    served = start_server(tree, tmp_path / "served", keys)
    threads, trained = start_nodes(
        served.address,
        keys,
        [0],
        lambda i: {"client_id": 1},
    )
    time.sleep(0.2)  # node 0 holds client 1 before the other asks for a free one
    more, trained_own = start_nodes(
        served.address, keys, [1], lambda i: {"overrides": ("clients=1",)}
    )
    history = served.join(120, trained, trained_own)
    for t in threads + more:
        t.join(30)
    assert trained == {0: 2} and trained_own == {1: 2}
    assert [r["clients"] for r in history.records] == [2, 2]
    assert history.final["accuracy"] > 0.5  # digits' 10 classes: 0.1 is chance


def test_a_node_may_set_only_its_data(tmp_path: Path) -> None:
    """A node override outside data, partition, clients and threads is refused before the
    node connects, naming what a node may set."""
    from roost.deployment import NodeOptions, run_node

    keys = federation(tmp_path / "keys", 1)
    options = NodeOptions(
        server="127.0.0.1:1", key=keys / "nodes" / "node-0", overrides=("algorithm.lr=9",)
    )
    with pytest.raises(ConfigError, match=r"algorithm.lr=9: a node may set only its own data"):
        run_node(options)


def test_a_stateful_algorithm_keeps_its_state_on_the_nodes(tmp_path: Path) -> None:
    """SCAFFOLD's client control variates live on the nodes (``state_dir``, on disk), not
    on the server: served with 4 nodes it ends on the simulated model (to 1e-5: the
    control variates are float32 on both sides, folded in float64), and each node's
    directory holds its client state file and the record of its 3 committed tasks."""
    tree = {**SMALL, "algorithm": {"name": "scaffold", "lr": 0.1, "batch_size": 10}}
    sim = tmp_path / "sim"
    run(tree, sim)
    _, trained = serve_to_nodes(tree, tmp_path)
    assert trained == {0: 3, 1: 3, 2: 3, 3: 3}
    diff = (_params(tmp_path / "served") - _params(sim)).abs().max().item()
    assert diff <= 1e-5, diff
    for i in range(4):
        record = json.loads((tmp_path / f"state-{i}" / "node_state.json").read_text())
        assert record["round"] == 3  # one committed step per task
        assert (tmp_path / f"state-{i}" / record["file"]).stat().st_size > 0


def test_a_silent_node_becomes_a_dropout_and_gets_work_when_it_comes_back(
    tmp_path: Path,
) -> None:
    """4 nodes, all 4 clients in each of 3 rounds. One node takes its round-1 task and
    then says nothing (no heartbeat: a frozen device) for 2 s; the watchdog (silent after
    3 heartbeats of 0.1 s) disconnects it, its task is lost, and round 1 closes with the
    3 results that came (1 offline). The node then comes back: told it is not registered,
    it registers again by itself and trains rounds 2 and 3 like the others."""
    from roost.deploy.auth import NodeKey
    from roost.deploy.client import NodeClient
    from roost.deploy.tls import ClientTls

    keys = federation(tmp_path / "keys", 4)
    served = start_server(SMALL, tmp_path / "served", keys, heartbeat_s=0.1, retry_after_s=0.05)
    threads, trained = start_nodes(served.address, keys, range(3), lambda i: {"client_id": i})
    frozen = NodeClient(
        served.address,
        NodeKey.load(keys / "nodes" / "node-3"),
        tls=ClientTls(keys / "ca.pem"),
        properties={"client_id": 3},
    )
    frozen.register()
    task = None
    while task is None:
        task = frozen.pull_task()
        time.sleep(0.02)
    assert task.round == 1
    time.sleep(2.0)  # frozen: no call at all
    from roost.deployment import NodeOptions, run_node

    came_back: dict[str, int] = {}
    thread = threading.Thread(
        target=lambda: came_back.update(
            n=run_node(NodeOptions(served.address, keys / "nodes" / "node-3", client_id=3))
        )
    )
    thread.start()
    history = served.join(120, trained)
    for t in [*threads, thread]:
        t.join(30)
    frozen.close()
    records = history.records
    assert [r["clients"] for r in records] == [3, 4, 4]
    assert records[0]["offline"] == 1
    assert came_back == {"n": 2}
    assert trained == {0: 3, 1: 3, 2: 3}


def test_a_pull_that_waits_on_the_server_gets_the_task_as_soon_as_it_is_sent() -> None:
    """PullTask may wait on the server (``long_poll_s``): a node asking while its client
    has no task is answered when the engine sends one (here 0.2 s later), not after its
    next poll; a wait that sees no task ends with None at its deadline (0.3 s), and a
    node waiting is not taken for silent by the watchdog (silent after 0.1 s here)."""
    from roost.clock import WallClock
    from roost.deploy.coordinator import EngineCoordinator
    from roost.deploy.protocol import NodeInfo

    coordinator = EngineCoordinator(WallClock(), 2, silent_after_s=0.1)
    coordinator.register(NodeInfo("n0", b"k" * 32, 5, {"client_id": 0}))
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(coordinator.next_task("n0", 10.0)))
    waiter.start()
    time.sleep(0.2)
    assert coordinator.check_silent() == []  # 0.2 s without a call, but waiting in a pull
    spec = object()
    with coordinator._lock:  # what send() does for client 0's node, then its notify
        coordinator._queues["n0"].append(spec)  # type: ignore[arg-type]
        coordinator._work.notify_all()
    waiter.join(5)
    assert got == [spec]
    start = time.monotonic()
    assert coordinator.next_task("n0", 0.3) is None
    assert time.monotonic() - start >= 0.3


def test_results_beyond_the_cap_wait_in_their_call_until_the_engine_takes_one() -> None:
    """The server's memory of received results is bounded: with room for 1 waiting
    result, a second result's call blocks (not acknowledged) until the engine takes the
    first, then is accepted; a result for a task cancelled meanwhile is refused."""
    from roost.algorithms.base import Payload
    from roost.clock import WallClock
    from roost.deploy.coordinator import EngineCoordinator
    from roost.deploy.protocol import NodeInfo, Result

    coordinator = EngineCoordinator(WallClock(), 2, max_waiting_results=1)
    coordinator.register(NodeInfo("n0", b"k" * 32, 5, {"client_id": 0}))
    for key in (1, 2, 3):  # what send() records for three tasks of a 3-parameter model
        coordinator._key_of[f"t{key}"] = key
        coordinator._payloads[key] = Payload(torch.zeros(3), 0)

    def result(task_id: str) -> Result:
        return Result(task_id, {"params": torch.ones(3)}, 1.0, {"compute_s": 0.1})

    assert coordinator.accept_result("n0", result("t1")).accepted
    acks: list[object] = []
    second = threading.Thread(
        target=lambda: acks.append(coordinator.accept_result("n0", result("t2")))
    )
    second.start()
    time.sleep(0.3)
    assert second.is_alive() and acks == []  # waiting: room for 1, and t1 is not taken
    assert coordinator.take(1) is not None
    second.join(5)
    assert [a.accepted for a in acks] == [True]  # type: ignore[attr-defined]
    third = threading.Thread(
        target=lambda: acks.append(coordinator.accept_result("n0", result("t3")))
    )
    third.start()
    time.sleep(0.3)
    coordinator.cancel(3)  # its round closed while it waited
    coordinator.cancel(2)  # and the waiting room frees
    third.join(5)
    assert [a.accepted for a in acks] == [True, False]  # type: ignore[attr-defined]


def test_a_reservation_that_never_becomes_ready_expires_and_frees_its_client_id() -> None:
    """Ids are the lowest free: A reserves 0 (``ready=False``: it builds its data), B
    takes 1. A never comes back; once ``reserve_timeout_s`` has passed the watchdog frees
    0, so C gets 0 (not 2). A node that did take work keeps its id (B: 1, registering
    again after it left)."""
    from roost.clock import WallClock
    from roost.deploy.coordinator import EngineCoordinator
    from roost.deploy.protocol import NodeInfo

    coordinator = EngineCoordinator(WallClock(), 4, reserve_timeout_s=100.0)
    node = {n: NodeInfo(n, b"k" * 32, 5, {}) for n in "ABC"}
    reserving = NodeInfo("A", b"k" * 32, 0, {"ready": False})
    assert coordinator.register(reserving).client_id == 0
    assert coordinator.register(node["B"]).client_id == 1
    now = time.monotonic()
    # at 50 s B has been silent for more than 30 s: disconnected; A's 100 s are not over
    assert coordinator.check_silent(now + 50.0) == ["B"] and coordinator.released == []
    assert coordinator.check_silent(now + 101.0) == []
    assert coordinator.released == ["A"]
    assert coordinator.register(node["C"]).client_id == 0
    assert coordinator.register(node["B"]).client_id == 1  # its own id, kept
    assert coordinator.register(node["A"]).client_id == 2  # A, back, gets a free one


def test_serve_makes_glibc_return_model_size_blocks_to_the_os() -> None:
    """On Linux with glibc (the machines here), mallopt(M_MMAP_THRESHOLD, 1 MiB) succeeds:
    a freed 6 MB result buffer is unmapped at once instead of kept in a thread's arena."""
    import platform

    from roost.deployment import return_large_blocks_to_os

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert return_large_blocks_to_os() is True


def test_plaintext_is_refused_off_loopback_naming_the_option(tmp_path: Path) -> None:
    """--plaintext on an address that is not loopback is refused before anything binds or
    connects, saying which option to drop; no run directory is made."""
    from roost.deployment import NodeOptions, ServeOptions, run_node, serve

    keys = federation(tmp_path / "keys", 1)
    options = ServeOptions(address="10.1.2.3:5000", keys=keys, plaintext=True)
    with pytest.raises(ValueError, match=r"--plaintext serves without TLS.*not 10\.1\.2\.3:5000"):
        serve(None, tmp_path / "served", options)
    assert not (tmp_path / "served").exists()
    node = NodeOptions(server="10.1.2.3:5000", key=keys / "nodes" / "node-0", plaintext=True)
    with pytest.raises(ValueError, match=r"--plaintext connects without TLS"):
        run_node(node)


def test_a_node_computes_with_the_runs_torch_thread_count() -> None:
    """A node trains with the run's thread count (``threads``, or the small-model default
    of one thread that ``roost run`` uses), not torch's own default: the bits of a matrix
    product depend on how many threads sum it. Before this, a `roost node` process used
    two threads here and a served FedAvg round of the quickstart (5 local epochs) ended
    7.4e-4 away from the simulated one; it is now the same model, bit for bit."""
    from roost.config import resolve
    from roost.deployment import _node_worker

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _node_worker(object(), resolve({**SMALL, "threads": 3}), 0, 0, None)  # type: ignore[arg-type]
        assert torch.get_num_threads() == 3
        torch.set_num_threads(2)
        _node_worker(object(), resolve(SMALL), 0, 0, None)  # type: ignore[arg-type]
        assert torch.get_num_threads() == 1  # the 16-unit MLP is small: one thread
    finally:
        torch.set_num_threads(before)


def test_nodes_in_processes_of_their_own_train_the_simulated_model(tmp_path: Path) -> None:
    """The process boundary itself: two `roost node` processes (as a user starts them)
    against a served quickstart-sized run, which must end on the simulated model bit for
    bit. A node process starts with torch's own settings, not the test runner's, so this
    catches what the in-process nodes of the other tests cannot (it caught the thread
    count: 7.4e-4 apart before the fix)."""
    import subprocess
    import sys

    tree = {**SMALL, "clients": 2, "clients_per_round": 2, "rounds": 2, "eval_every": 0}
    tree["algorithm"] = {**SMALL["algorithm"], "local_epochs": 3}
    keys = federation(tmp_path / "keys", 2)
    sim = tmp_path / "sim"
    run(tree, sim)
    served = start_server(tree, tmp_path / "served", keys)

    def node(i: int) -> subprocess.Popen[bytes]:
        key = str(keys / "nodes" / f"node-{i}")
        command = ["node", "--server", served.address, "--key", key, "--client-id", str(i)]
        return subprocess.Popen(
            [sys.executable, "-m", "roost", *command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    nodes = [node(i) for i in range(2)]
    try:
        served.join(120)
        for p in nodes:
            assert p.wait(60) == 0, p.stderr.read() if p.stderr else ""
    finally:
        for p in nodes:
            p.kill()
    assert torch.equal(_params(tmp_path / "served"), _params(sim))
