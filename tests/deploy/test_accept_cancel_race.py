"""A result being journaled when its task is cancelled is refused, not posted (a 100-node
run once hung on this: tests/deploy/test_serve_fleet.py).

``accept_result`` checks that the task still counts, then writes the result to the
journal outside the lock (SQLite, slow), then posts the delivery. A task cancelled in
between (its synchronous round closed, or its deadline passed) used to get its delivery
posted anyway: the engine, which skips the events of tasks it no longer has, never took
it, and it held one of the ``max_waiting_results`` places for good. Four of them (the
default) and every later result waited for room forever."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("grpc")

from roost.algorithms.base import Payload
from roost.clock import WallClock
from roost.deploy.coordinator import EngineCoordinator
from roost.deploy.protocol import NodeInfo, Result
from roost.engine.flight import Flight, TaskTiming
from roost.runtime.base import Task

W = Payload(torch.zeros(4), 0)


class CancellingJournal:
    """A journal whose ``add_result`` lets the engine cancel the task meanwhile (what a
    round closing during the SQLite write does)."""

    def __init__(self) -> None:
        self.coordinator: EngineCoordinator | None = None
        self.written: list[str] = []

    def add_result(self, task_id: str, delivery: object) -> None:
        self.written.append(task_id)
        assert self.coordinator is not None
        self.coordinator.cancel(int(task_id.rsplit("-", 1)[1]))

    def __getattr__(self, name: str) -> object:  # the other journal calls: nothing to keep
        return lambda *a, **k: None


def _one_task(coordinator: EngineCoordinator, key: int) -> str:
    task = Task(0, 1, 0, 7, key=key)
    coordinator.send(Flight(key, task, TaskTiming(0.0, 0.0, 0.0, 1.0), key, 10, 0, 0), W)
    spec = coordinator.next_task("n0", 1.0)
    assert spec is not None
    return spec.task_id


def test_a_result_whose_task_is_cancelled_while_it_is_journaled_is_refused_and_not_posted():
    journal = CancellingJournal()
    coordinator = EngineCoordinator(WallClock(), 1, journal=journal, max_waiting_results=1)  # type: ignore[arg-type]
    journal.coordinator = coordinator
    coordinator.register(NodeInfo("n0", b"k" * 32, 10, {"client_id": 0}))
    task_id = _one_task(coordinator, 1)
    result = Result(task_id, {"params": torch.ones(4)}, 1.0, {"train_loss": 0.5})
    ack = coordinator.accept_result("n0", result)
    assert journal.written == [task_id]
    assert not ack.accepted and "no longer counts" in ack.detail
    assert coordinator.take(1) is None  # nothing posted for the engine to take
    # the place was not used up: with max_waiting_results = 1 the next task's result is
    # accepted at once (with the leak it waited for room forever)
    journal.add_result = lambda task_id, delivery: None  # type: ignore[method-assign]
    task_id = _one_task(coordinator, 2)
    ack = coordinator.accept_result("n0", Result(task_id, {"params": torch.ones(4)}, 1.0, {}))
    assert ack.accepted
    delivery = coordinator.take(2)
    assert delivery is not None and torch.equal(delivery.result.tensors["params"], torch.ones(4))
