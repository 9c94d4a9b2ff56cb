"""The server's task table: which node was given each task, and whether its result arrived.

A task is *given* when the coordinator hands it to a node, *delivering* while its result
is with the coordinator, and *arrived* after (with the coordinator's Ack and the SHA-256 of
the result stream, so that a resubmission is recognised). Rules it enforces:

* a result or request for a task id never given is TaskNotFound (NOT_FOUND); for a task
  given to another node, WrongTask (PERMISSION_DENIED);
* a result for an arrived task with the same digest (the node resending after a lost
  reply) gets the stored Ack with ``duplicate=True`` and is not delivered again; with a
  different digest it is AlreadyArrived (ALREADY_EXISTS);
* two submissions of one task at once: the second waits until the first is delivered (or
  failed) and is then answered by the rules above, so the coordinator sees it once.

Memory: the table keeps, per node, the records of the last ``keep_per_node`` tasks given
to it (16 by default); giving it one more forgets its oldest (one being delivered is
kept). A node trains its tasks one after another and has its result acknowledged
before it asks for the next, so the records forgotten are of tasks it is done with; a
late copy of one is TaskNotFound. The table holds O(nodes) records, not O(tasks).
"""

from __future__ import annotations

import collections
import enum
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace

from roost.deploy.errors import AlreadyArrived, TaskNotFound, WrongTask
from roost.deploy.protocol import Ack
from roost.deploy.tensors import TensorSpec

__all__ = ["TaskState", "TaskTable"]


class TaskState(enum.Enum):
    GIVEN = "given"
    DELIVERING = "delivering"
    ARRIVED = "arrived"


@dataclass
class _Entry:
    node_id: str
    result_spec: Mapping[str, TensorSpec] | None
    state: TaskState = TaskState.GIVEN
    digest: str = ""
    ack: Ack | None = None


class TaskTable:
    """Thread-safe; every method takes the table's lock."""

    def __init__(self, keep_per_node: int = 16) -> None:
        if keep_per_node < 1:
            raise ValueError(f"keep_per_node must be >= 1, got {keep_per_node}")
        self.keep_per_node = keep_per_node
        self._tasks: dict[str, _Entry] = {}
        self._given: dict[str, collections.deque[str]] = {}  # node -> its task ids, in order
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._tasks)

    def state(self, task_id: str) -> TaskState | None:
        with self._cond:
            entry = self._tasks.get(task_id)
            return entry.state if entry else None

    def give(
        self, task_id: str, node_id: str, result_spec: Mapping[str, TensorSpec] | None
    ) -> None:
        """Record that ``task_id`` goes to ``node_id``. Giving a task again to the same node
        before its result arrived is allowed (it replaces the spec); ValueError otherwise."""
        with self._cond:
            entry = self._tasks.get(task_id)
            if entry is not None and (
                entry.node_id != node_id or entry.state is not TaskState.GIVEN
            ):
                raise ValueError(
                    f"coordinator gave task {task_id!r} to {node_id!r}, but it was given to "
                    f"{entry.node_id!r} and is {entry.state.value}; task ids must be unique"
                )
            self._tasks[task_id] = _Entry(node_id, result_spec)
            if entry is None:
                self._remember(node_id, task_id)

    def _remember(self, node_id: str, task_id: str) -> None:
        """Add ``task_id`` to the node's window; forget the oldest beyond the window."""
        given = self._given.setdefault(node_id, collections.deque())
        given.append(task_id)
        while len(given) > self.keep_per_node:
            old = given[0]
            entry = self._tasks.get(old)
            if entry is not None and entry.state is TaskState.DELIVERING:
                break  # its delivery ends soon; forgotten at a later give
            given.popleft()
            if entry is not None and entry.node_id == node_id:
                del self._tasks[old]

    def _own(self, node_id: str, task_id: str) -> _Entry:
        entry = self._tasks.get(task_id)
        if entry is None:
            raise TaskNotFound(f"no task {task_id[:80]!r} was given out")
        if entry.node_id != node_id:
            raise WrongTask(f"task {task_id!r} was given to another node, not {node_id!r}")
        return entry

    def check_active(self, node_id: str, task_id: str) -> None:
        """The task is ``node_id``'s and its result has not arrived (for requests, heartbeats)."""
        with self._cond:
            entry = self._own(node_id, task_id)
            if entry.state is not TaskState.GIVEN:
                raise AlreadyArrived(f"the result of task {task_id!r} has already arrived")

    def result_spec(self, node_id: str, task_id: str) -> Mapping[str, TensorSpec] | None:
        with self._cond:
            return self._own(node_id, task_id).result_spec

    def _duplicate(self, entry: _Entry, task_id: str, digest: str) -> Ack:
        if digest != entry.digest:
            raise AlreadyArrived(
                f"the result of task {task_id!r} already arrived, with different content; "
                "a task has one result"
            )
        assert entry.ack is not None
        return replace(entry.ack, duplicate=True)

    def peek(self, node_id: str, task_id: str, digest: str) -> Ack | None:
        """Before reading a result's body: None if it may be delivered, the duplicate Ack if
        this exact result arrived already; raises for the refusals in the module docstring."""
        with self._cond:
            entry = self._own(node_id, task_id)
            if entry.state is TaskState.ARRIVED:
                return self._duplicate(entry, task_id, digest)
            return None

    def begin_delivery(self, node_id: str, task_id: str, digest: str) -> Ack | None:
        """Mark the task delivering and return None (the caller now delivers it and calls
        :meth:`finish_delivery` or :meth:`abort_delivery`), or return the duplicate Ack."""
        with self._cond:
            entry = self._own(node_id, task_id)
            while entry.state is TaskState.DELIVERING:
                self._cond.wait()
                entry = self._own(node_id, task_id)
            if entry.state is TaskState.ARRIVED:
                return self._duplicate(entry, task_id, digest)
            entry.state = TaskState.DELIVERING
            entry.digest = digest
            return None

    def finish_delivery(self, task_id: str, ack: Ack) -> None:
        with self._cond:
            entry = self._tasks[task_id]
            entry.state, entry.ack = TaskState.ARRIVED, ack
            self._cond.notify_all()

    def abort_delivery(self, task_id: str) -> None:
        """The coordinator failed on the result: the task is back to given."""
        with self._cond:
            entry = self._tasks[task_id]
            entry.state, entry.digest = TaskState.GIVEN, ""
            self._cond.notify_all()

    def forget(self, task_id: str) -> None:
        """Drop a task's record (later results or requests for it are TaskNotFound)."""
        with self._cond:
            entry = self._tasks.get(task_id)
            if entry is not None and entry.state is not TaskState.DELIVERING:
                del self._tasks[task_id]
