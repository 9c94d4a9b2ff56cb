"""A served run and its nodes in one process: ``roost serve``'s :func:`serve` on a thread
(port 0) and each node's :func:`run_node` on its own thread, each node with its own
identity (a ``roost keys`` federation) and channel.

Import only after ``pytest.importorskip("grpc")`` and ``("cryptography")``.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from roost.config import resolve
from roost.deploy.keys import make_federation
from roost.deployment import NodeOptions, ServeOptions, run_node, serve
from roost.engine import History

SMALL = {
    "rounds": 3,
    "clients": 4,
    "clients_per_round": 4,
    "eval_every": 1,
    "algorithm": {"name": "fedavg", "lr": 0.1, "batch_size": 10, "local_epochs": 1},
    "data": {"name": "digits"},
    "partition": {"name": "iid"},
    "model": {"name": "mlp", "hidden": [16]},
}
"""A run small enough to serve in a second: 4 digits clients, all in every round."""


def federation(root: Path, nodes: int) -> Path:
    make_federation(root, nodes)
    return root


@dataclasses.dataclass
class Served:
    """A :func:`serve` running on a thread: its address once bound, then its history."""

    thread: threading.Thread
    address: str
    outcome: dict[str, Any]

    def join(self, timeout: float = 120.0, *nodes: dict[int, Any]) -> History:
        """The run's history once it finished; a node's exception (in ``nodes``, the
        outcomes :func:`start_nodes` returned) is raised as soon as it is seen."""
        deadline = time.monotonic() + timeout
        while self.thread.is_alive() and time.monotonic() < deadline:
            self.thread.join(0.1)
            for outcome in nodes:
                for value in list(outcome.values()):
                    if isinstance(value, BaseException):
                        raise value
        assert not self.thread.is_alive(), "the server did not finish"
        if "error" in self.outcome:
            raise self.outcome["error"]
        history: History = self.outcome["history"]
        return history


def start_server(
    tree: dict[str, Any] | None,
    out: Path,
    keys: Path,
    *,
    resume: bool = False,
    **options: Any,
) -> Served:
    """Start :func:`serve` on a thread (``127.0.0.1:0``, TLS with ``keys``)."""
    ready: queue.Queue[str] = queue.Queue()
    outcome: dict[str, Any] = {}
    serve_options = ServeOptions(
        address="127.0.0.1:0", keys=keys, **{"finish_grace_s": 5.0, **options}
    )
    cfg = resolve(tree) if tree is not None else None

    def main() -> None:
        try:
            outcome["history"] = serve(cfg, out, serve_options, resume=resume, on_ready=ready.put)
        except BaseException as e:  # re-raised by Served.join
            outcome["error"] = e
            ready.put("")

    thread = threading.Thread(target=main, name="roost-serve", daemon=True)
    thread.start()
    address = ready.get(timeout=60)
    if not address:
        raise outcome["error"]
    return Served(thread, address, outcome)


def start_nodes(
    address: str,
    keys: Path,
    nodes: Sequence[int],
    make: Callable[[int], dict[str, Any]] | None = None,
    stop: threading.Event | None = None,
) -> tuple[list[threading.Thread], dict[int, Any]]:
    """One thread per node running :func:`run_node`; ``make(i)`` gives node i's extra
    :class:`NodeOptions` fields. Returns the threads and, per node, the number of tasks
    it trained or the exception it raised."""
    outcome: dict[int, Any] = {}
    threads = []
    for i in nodes:
        fields = make(i) if make is not None else {}
        options = NodeOptions(server=address, key=keys / "nodes" / f"node-{i}", **fields)

        def work(i: int = i, options: NodeOptions = options) -> None:
            try:
                outcome[i] = run_node(options, stop)
            except BaseException as e:  # reported by the test
                outcome[i] = e

        threads.append(threading.Thread(target=work, name=f"node-{i}", daemon=True))
    for t in threads:
        t.start()
    return threads, outcome


def serve_to_nodes(
    tree: dict[str, Any], root: Path, nodes: int = 4, **options: Any
) -> tuple[Path, dict[int, Any]]:
    """Serve ``tree`` to ``nodes`` nodes, node i declaring client i and keeping its state
    on disk in ``root/state-i``; wait for the run and the nodes. Returns the run
    directory and what each node returned (tasks trained, or its exception)."""
    keys = federation(root / "keys", nodes)
    out = root / "served"
    served = start_server(tree, out, keys, **options)
    threads, trained = start_nodes(
        served.address,
        keys,
        range(nodes),
        lambda i: {"client_id": i, "state_dir": root / f"state-{i}"},
    )
    served.join(120, trained)
    for t in threads:
        t.join(30)
    return out, trained
