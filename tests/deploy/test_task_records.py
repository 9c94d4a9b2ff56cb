"""The server's records of tasks stay O(clients), not O(tasks) (issue 9, item 4 / memory).

A node trains its tasks one after another and its result is acknowledged before it asks
for the next, so the server needs the records of a node's last few tasks only (to answer
a resent result with its first Ack, and to refuse a late one). Both the server's task
table and the coordinator keep 16 per node (per client) by default.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

from _deploy_helpers import FAST

from roost.algorithms.base import ClientResult, Payload
from roost.clock import WallClock
from roost.deploy.auth import AllowList, NodeKey, Verifier
from roost.deploy.client import ClientConfig, NodeClient, RemoteRefusal
from roost.deploy.coordinator import EngineCoordinator, result_to_wire
from roost.deploy.errors import TaskNotFound
from roost.deploy.protocol import Ack
from roost.deploy.server import DeployServer
from roost.deploy.tasks import TaskTable
from roost.engine.flight import Flight
from roost.runtime.base import Task
from roost.system.model import TaskTiming


def test_the_task_table_keeps_each_nodes_last_tasks_and_one_being_delivered() -> None:
    table = TaskTable(keep_per_node=2)
    for t in ("a1", "a2", "a3"):
        table.give(t, "a", None)
    table.give("b1", "b", None)  # another node's window is its own
    with pytest.raises(TaskNotFound):
        table.peek("a", "a1", "")  # the third task of node a forgot its first
    assert table.peek("a", "a2", "") is None and table.peek("b", "b1", "") is None
    assert len(table) == 3  # a2, a3, b1
    assert table.begin_delivery("a", "a2", "d") is None  # a2 is being delivered ...
    table.give("a4", "a", None)
    assert len(table) == 4  # ... so it is kept past the window
    table.finish_delivery("a2", Ack(True))
    table.give("a5", "a", None)  # now a2 and a3 go: a4, a5 remain
    assert {table.state(t) for t in ("a2", "a3")} == {None}
    assert len(table) == 3


def test_a_served_client_with_40_tasks_leaves_16_records_and_a_late_result_is_refused() -> None:
    """40 tasks of one client, each pulled, pushed and taken by the engine: the server's
    task table and the coordinator's map hold the last 16; the first task's result sent
    again now is refused (NOT_FOUND: no such task was given out), not delivered."""
    clock = WallClock()
    coordinator = EngineCoordinator(clock, 1)
    key = NodeKey.generate("node-0")
    allow = AllowList({key.node_id: key.public_bytes})
    payload = Payload(torch.zeros(3), 0)
    first = None
    with DeployServer(coordinator, Verifier(allow)) as server:
        client = NodeClient(
            server.address, key, properties={"client_id": 0}, config=ClientConfig(backoff=FAST)
        )
        client.register()
        for k in range(1, 41):
            task = Task(0, k, 0, k, key=k)
            flight = Flight(k, task, TaskTiming(0.0, 0.0, 0.0, 1.0), k, 10, 12, 12)
            coordinator.send(flight, payload)
            wire_task = client.pull_task()
            assert wire_task is not None
            result = ClientResult({"params": torch.full((3,), float(k))}, 1.0)
            wire = result_to_wire(wire_task.task_id, result, {}, 0.01)
            first = first or wire
            assert client.push_result(wire).accepted
            delivery = coordinator.take(k)
            assert delivery is not None and delivery.result.tensors["params"][0] == k
        assert len(server.servicer.tasks) == 16
        assert len(coordinator._key_of) == 16
        with pytest.raises(RemoteRefusal) as refused:
            client.push_result(first)
        client.close()
    assert refused.value.code == "NOT_FOUND"
