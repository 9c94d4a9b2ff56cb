"""The engine behind the gRPC server: a :class:`Coordinator` that is the engine's
:class:`~roost.engine.remote.RemoteFleet`.

The engine runs its loop on a :class:`~roost.clock.WallClock` in its own thread; the
server's threads call this object. The two sides meet in three places only, each under
this object's lock: the queue of launched tasks per node (the engine puts, a node's pull
takes), the deliveries (a node's result or a loss is posted, and its task's event
scheduled on the clock; the engine takes it when it pops that event), and the pending
mid-task requests (a node's request schedules a ``request`` event and waits; the engine
answers with the global model). Nothing of the strategy or the flight table is touched
from a network thread.

Clients and nodes: a node declares the client id it holds (property ``client_id``,
0 .. N-1) at registration; one node per client id. A node that registers makes its
client available (and wakes an engine that waits for nodes); :meth:`disconnect` takes
it away. Nothing calls :meth:`disconnect` yet: a node that dies is noticed only by its
task's deadline (a dropout), and its client stays selectable (no heartbeat watchdog yet).
The task-id map keeps one short entry per task of the run (not built yet: forgetting
delivered tasks).

Results: a node sends its client update's own tensors (float32), weight and scalars, and
its client metrics; the engine folds them as the local runtime folds a task. Metrics
travel in :attr:`Result.metrics` under ``metric.<name>``, the result's scalars under
``scalar.<name>``, and the node's measured compute seconds as ``compute_s``.
"""

from __future__ import annotations

import collections
import math
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from roost.algorithms.base import ClientResult, Payload
from roost.clock import WallClock
from roost.deploy.errors import WireError
from roost.deploy.protocol import (
    Ack,
    Answer,
    MidTaskRequest,
    NodeInfo,
    Result,
    SettingValue,
    TaskSpec,
)
from roost.deploy.tensors import WireValue
from roost.engine.core import ARRIVAL, REQUEST, WAKE
from roost.engine.flight import Flight
from roost.engine.remote import Delivery

__all__ = [
    "EngineCoordinator",
    "UnknownClient",
    "payload_from_wire",
    "payload_to_wire",
    "result_from_wire",
    "result_to_wire",
]

EXTRA = "extra."
METRIC = "metric."
SCALAR = "scalar."


class UnknownClient(WireError):
    """A registration naming no client id, one out of range, or one another node holds."""

    code = "FAILED_PRECONDITION"


class ResultRefused(WireError):
    """A result whose tensors are not what the task's model can produce."""

    code = "INVALID_ARGUMENT"


def payload_to_wire(payload: Payload) -> dict[str, WireValue]:
    """A payload's tensors by wire name: ``params`` and ``extra.<name>``."""
    out: dict[str, WireValue] = {"params": payload.params}
    out.update({EXTRA + k: v for k, v in payload.extras.items()})
    return out


def payload_from_wire(tensors: Mapping[str, WireValue], version: int) -> Payload:
    """The inverse of :func:`payload_to_wire` (the tensors must be plain tensors)."""
    plain = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if "params" not in plain or len(plain) != len(tensors):
        raise ValueError(
            f"a payload needs a 'params' tensor and plain tensors, got {sorted(tensors)}"
        )
    extras = {k[len(EXTRA) :]: v for k, v in plain.items() if k.startswith(EXTRA)}
    return Payload(plain["params"], version, extras)


def result_to_wire(
    task_id: str, result: ClientResult, metrics: Mapping[str, float], compute_s: float
) -> Result:
    """What a node sends for a finished task (see the module docstring)."""
    wire_metrics = {METRIC + k: float(v) for k, v in metrics.items()}
    wire_metrics.update({SCALAR + k: float(v) for k, v in result.scalars.items()})
    wire_metrics["compute_s"] = float(compute_s)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in result.tensors.items()}
    return Result(task_id, tensors, float(result.weight), wire_metrics)


def result_from_wire(
    result: Result, sizes: frozenset[int]
) -> tuple[ClientResult, dict[str, float], float]:
    """The client result, client metrics and compute seconds of a received result.

    Every tensor must be a float32 vector whose length is one the task's model has
    (``sizes``: the flat parameters and the payload's extras); the weight finite and > 0."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in result.tensors.items():
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            raise ResultRefused(f"result tensor {name!r} must be float32 values")
        if value.dim() != 1 or value.numel() not in sizes:
            raise ResultRefused(
                f"result tensor {name!r} has shape {tuple(value.shape)}; allowed: a vector "
                f"of length {', '.join(str(s) for s in sorted(sizes))}"
            )
        tensors[name] = value
    if not (math.isfinite(result.weight) and result.weight > 0):
        raise ResultRefused(f"result weight must be a finite number > 0, got {result.weight}")
    metrics = {k[len(METRIC) :]: v for k, v in result.metrics.items() if k.startswith(METRIC)}
    scalars = {k[len(SCALAR) :]: v for k, v in result.metrics.items() if k.startswith(SCALAR)}
    compute_s = float(result.metrics.get("compute_s", 0.0))
    return ClientResult(tensors, result.weight, scalars), metrics, max(0.0, compute_s)


@dataclass
class _Pending:
    """A mid-task request waiting for the engine's answer."""

    done: threading.Event = field(default_factory=threading.Event)
    answer: Payload | None = None


class EngineCoordinator:
    """See the module docstring. ``task_timeout_s``: seconds after dispatch when a task
    with no result is lost; ``answer_timeout_s``: how long a mid-task request may wait."""

    def __init__(
        self,
        clock: WallClock,
        num_clients: int,
        *,
        task_timeout_s: float = 600.0,
        answer_timeout_s: float = 60.0,
    ) -> None:
        self.clock = clock
        self.num_clients = num_clients
        self.task_timeout_s = task_timeout_s
        self.answer_timeout_s = answer_timeout_s
        self._lock = threading.Lock()
        self._prefix = secrets.token_hex(4)  # task ids stay unique across server restarts
        self._client_of: dict[str, int] = {}
        self._node_of: dict[int, str] = {}
        self._connected = np.zeros(num_clients, dtype=bool)
        self._queues: dict[str, collections.deque[TaskSpec]] = {}
        self._key_of: dict[str, int] = {}
        self._sizes: dict[int, frozenset[int]] = {}
        self._deliveries: dict[int, Delivery] = {}
        self._pending: dict[int, _Pending] = {}
        self._cancelled: set[int] = set()

    # ---- the engine's side (RemoteFleet)
    def connected(self, num_clients: int) -> np.ndarray:
        with self._lock:
            return self._connected[:num_clients].copy()

    def send(self, flight: Flight, payload: Payload) -> None:
        task_id = f"{self._prefix}-{flight.key}"
        settings: dict[str, SettingValue] = dict(flight.task.settings)
        spec = TaskSpec(
            task_id,
            flight.client_id,
            flight.task.version,
            flight.task.seed,
            flight.task.round,
            payload_to_wire(payload),
            settings,
        )
        sizes = frozenset({payload.params.numel(), *(v.numel() for v in payload.extras.values())})
        with self._lock:
            self._key_of[task_id] = flight.key
            self._sizes[flight.key] = sizes
            node = self._node_of.get(flight.client_id)
            if node is not None:
                self._queues.setdefault(node, collections.deque()).append(spec)

    def answer(self, key: int, payload: Payload) -> None:
        with self._lock:
            pending = self._pending.get(key)
        if pending is not None:
            pending.answer = payload
            pending.done.set()

    def cancel(self, key: int) -> None:
        with self._lock:
            self._cancelled.add(key)
            for queue in self._queues.values():
                for spec in list(queue):
                    if self._key_of.get(spec.task_id) == key:
                        queue.remove(spec)
            pending = self._pending.pop(key, None)
        if pending is not None:
            pending.done.set()  # the waiting request is told its task is gone

    def take(self, key: int) -> Delivery | None:
        with self._lock:
            return self._deliveries.pop(key, None)

    def disconnect(self, node_id: str) -> None:
        """``node_id`` is gone: its client is unavailable until it registers again."""
        with self._lock:
            client = self._client_of.pop(node_id, None)
            if client is not None:
                self._node_of.pop(client, None)
                self._connected[client] = False
            self._queues.pop(node_id, None)

    # ---- the network's side (Coordinator)
    def register(self, node: NodeInfo) -> None:
        raw = node.properties.get("client_id")
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise UnknownClient(
                f"node {node.node_id} must declare the client id it holds as the integer "
                f"property client_id (0 .. {self.num_clients - 1})"
            )
        if not 0 <= raw < self.num_clients:
            raise UnknownClient(
                f"node {node.node_id} declares client_id={raw}; allowed: 0 .. "
                f"{self.num_clients - 1}"
            )
        with self._lock:
            holder = self._node_of.get(raw)
            if holder is not None and holder != node.node_id:
                raise UnknownClient(f"client_id={raw} is held by node {holder}")
            self._client_of[node.node_id] = raw
            self._node_of[raw] = node.node_id
            self._connected[raw] = True
            self._queues.setdefault(node.node_id, collections.deque())
        self.clock.schedule(self.clock.now, ("wake", -1), WAKE)

    def next_task(self, node_id: str) -> TaskSpec | None:
        with self._lock:
            queue = self._queues.get(node_id)
            return queue.popleft() if queue else None

    def accept_result(self, node_id: str, result: Result) -> Ack:
        with self._lock:
            key = self._key_of.get(result.task_id)
            sizes = self._sizes.get(key) if key is not None else None
            cancelled = key in self._cancelled
        if key is None or sizes is None:
            return Ack(False, f"task {result.task_id} is not one of this run's")
        if cancelled:
            return Ack(False, f"task {result.task_id} no longer counts (its round closed)")
        client_result, metrics, compute_s = result_from_wire(result, sizes)
        with self._lock:
            self._deliveries[key] = Delivery(client_result, metrics, compute_s)
            self._sizes.pop(key, None)
        self.clock.schedule(self.clock.now, ("task", key), ARRIVAL)
        return Ack(True)

    def answer_request(self, node_id: str, request: MidTaskRequest) -> Answer:
        with self._lock:
            key = self._key_of.get(request.task_id)
            if key is None or key in self._cancelled:
                raise ResultRefused(f"task {request.task_id} no longer counts")
            pending = self._pending[key] = _Pending()
        self.clock.schedule(self.clock.now, ("request", key), REQUEST)
        if not pending.done.wait(self.answer_timeout_s) or pending.answer is None:
            with self._lock:
                self._pending.pop(key, None)
            raise ResultRefused(f"task {request.task_id}: no answer (its task no longer counts)")
        with self._lock:
            self._pending.pop(key, None)
        answer = pending.answer
        return Answer(answer.version, payload_to_wire(answer))

    def heartbeat(self, node_id: str, task_id: str | None) -> bool:
        if task_id is None:
            return True
        with self._lock:
            key = self._key_of.get(task_id)
            return key is not None and key not in self._cancelled
