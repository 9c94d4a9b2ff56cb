"""Personal models measured on the nodes (issue 9: Ditto deployed). The coordinator sends
an evaluation task to each connected client's node and waits for their answers; what it
accepts is checked; a node that leaves is not waited for; the answers are journaled and
a resumed server replays them instead of asking again. The end-to-end comparison with
the simulation is tests/deploy/test_same_code.py's Ditto test."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

from roost.algorithms.base import Payload
from roost.clock import WallClock
from roost.deploy.coordinator import (
    EngineCoordinator,
    ResultRefused,
    evaluation_from_wire,
    evaluation_to_wire,
)
from roost.deploy.journal import Journal
from roost.deploy.protocol import NodeInfo, Result, TaskKind
from roost.engine.remote import ClientEvaluation

W0 = Payload(torch.arange(3, dtype=torch.float32), 0)


def _coordinator(clients: int, journal: Journal | None = None, **kw: object) -> EngineCoordinator:
    coordinator = EngineCoordinator(WallClock(), clients, journal=journal, **kw)  # type: ignore[arg-type]
    for c in range(clients):
        coordinator.register(NodeInfo(f"n{c}", b"k" * 32, 10, {"client_id": c}))
    return coordinator


def _in_thread(coordinator: EngineCoordinator) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(coordinator.evaluate_clients(W0)))
    thread.start()
    return thread, out


def test_every_connected_node_is_asked_and_the_answers_come_back_by_client() -> None:
    coordinator = _coordinator(2)
    thread, out = _in_thread(coordinator)
    specs = [coordinator.next_task(f"n{c}", 5.0) for c in (0, 1)]
    assert all(s is not None and s.kind is TaskKind.EVALUATE for s in specs)
    assert [s.client_id for s in specs] == [0, 1]  # type: ignore[union-attr]
    assert torch.equal(specs[0].payload["params"], W0.params)  # type: ignore[union-attr,arg-type]
    # answers in the other order; 0.75 of 4 examples is 3 correct
    ack1 = coordinator.accept_result("n1", evaluation_to_wire(specs[1].task_id, 0.5, 0.75, 4))  # type: ignore[union-attr]
    ack0 = coordinator.accept_result("n0", evaluation_to_wire(specs[0].task_id, 1.5, 0.2, 5))  # type: ignore[union-attr]
    thread.join(5)
    assert ack0.accepted and ack1.accepted
    assert out == [[ClientEvaluation(0, 1.5, 0.2, 5), ClientEvaluation(1, 0.5, 0.75, 4)]]
    # a late copy is not taken
    late = coordinator.accept_result("n0", evaluation_to_wire(specs[0].task_id, 1.5, 0.2, 5))  # type: ignore[union-attr]
    assert not late.accepted


def test_a_node_that_leaves_during_an_evaluation_is_not_waited_for() -> None:
    coordinator = _coordinator(2, task_timeout_s=60.0)
    thread, out = _in_thread(coordinator)
    spec = coordinator.next_task("n0", 5.0)
    assert spec is not None
    coordinator.accept_result("n0", evaluation_to_wire(spec.task_id, 1.0, 0.5, 2))
    coordinator.disconnect("n1")  # the watchdog found it silent
    thread.join(5)
    assert not thread.is_alive()  # well before the 60 s timeout
    assert out == [[ClientEvaluation(0, 1.0, 0.5, 2)]]


@pytest.mark.parametrize(
    ("metrics", "tensors", "message"),
    [
        ({"eval.loss": 1.0, "eval.accuracy": 0.5}, {}, "needs the metrics eval.examples"),
        ({"eval.loss": float("nan"), "eval.accuracy": 0.5, "eval.examples": 2.0}, {}, "finite"),
        ({"eval.loss": -1.0, "eval.accuracy": 0.5, "eval.examples": 2.0}, {}, ">= 0"),
        ({"eval.loss": 1.0, "eval.accuracy": 1.5, "eval.examples": 2.0}, {}, "fraction in [0, 1]"),
        # 0.55 of 3 examples is 1.65 correct predictions: no node measured that
        ({"eval.loss": 1.0, "eval.accuracy": 0.55, "eval.examples": 3.0}, {}, "of the 3 examples"),
        ({"eval.loss": 1.0, "eval.accuracy": 0.5, "eval.examples": 2.5}, {}, "whole number"),
        (
            {"eval.loss": 1.0, "eval.accuracy": 0.5, "eval.examples": 2.0},
            {"params": torch.zeros(3)},
            "holds no tensors, got params",
        ),
    ],
)
def test_a_malformed_evaluation_is_refused_naming_what_is_wrong(
    metrics: dict[str, float], tensors: dict[str, torch.Tensor], message: str
) -> None:
    with pytest.raises(ResultRefused, match=message.replace("[", r"\[").replace("]", r"\]")):
        evaluation_from_wire(Result("t", tensors, 1.0, metrics), 0)


def test_a_resumed_server_replays_the_journaled_evaluation_without_asking(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    live = _coordinator(1, journal)
    thread, out = _in_thread(live)
    spec = live.next_task("n0", 5.0)
    assert spec is not None
    live.accept_result("n0", evaluation_to_wire(spec.task_id, 0.25, 1.0, 7))
    thread.join(5)
    assert out == [[ClientEvaluation(0, 0.25, 1.0, 7)]]
    journal.close()

    # the server restarts from the checkpoint of step 0 (nothing was checkpointed since)
    resumed = EngineCoordinator(
        WallClock(), 1, journal=Journal(tmp_path / "j.sqlite"), replay_step=0
    )
    assert resumed.replaying()
    assert resumed.evaluate_clients(W0) == [ClientEvaluation(0, 0.25, 1.0, 7)]
    assert resumed.replaying()  # answered from the journal: still replaying, no task sent
    assert resumed._queues == {}
