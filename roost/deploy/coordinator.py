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

Clients and nodes: a node may declare the client id it holds (property ``client_id``,
0 .. N-1: a client of the run's partitioned set); a node that declares none is given the
lowest id no node holds or was given (a node with its own data). One node per client
id; a node that registers again keeps its id, also after the watchdog disconnected it (an
id assigned stays that node's while the server runs). Registration tells the node its id
and the run's config (JSON), makes its client available and wakes an engine that waits for
nodes; a registration with the
property ``ready=False`` only reserves the id and fetches the config (a node then builds
its data, silent, and registers again to take work). A reservation not followed by that
second registration within ``reserve_timeout_s`` (10 minutes) expires: the id is free
again, and a node that never took work with it is no longer given it.

Silent nodes: every call of a node counts as a sign of life (an idle node asks for work
every ``retry_after_s``, a busy one heartbeats every ``heartbeat_interval_s``). The
watchdog (:meth:`start_watchdog`, or :meth:`check_silent` called by hand) disconnects a
node silent for ``silent_after_s``: its client is no longer selectable and each of its
tasks in flight is lost now (its event is scheduled at once and finds no delivery), a
dropout as when a device goes offline. A node that comes back is told it is not
registered, registers again by itself and gets new work. A task whose node is gone when
the engine sends it is lost at once. The coordinator remembers the ids of each client's
last ``keep_tasks_per_client`` tasks (16): a result or request for an older, settled one
is refused as not one of the run's; memory is O(clients), not O(tasks).

Persistence (with a :class:`~roost.deploy.journal.Journal`): every accepted result is
journaled before its Ack, and every event the engine consumes (and every change of the
connected set it saw) is logged. Resumed from the checkpoint of step ``s``
(``replay_step``), the coordinator first replays: it answers the engine's queries and
events from the journal, so the engine re-makes exactly the decisions it made before the
restart, while every node is told to retry (UNAVAILABLE). When the log is exhausted, the
run goes live once ``min_nodes`` nodes have registered again, and the tasks in flight are
settled: those whose result was accepted before the restart are
delivered from the journal (each accepted update is applied exactly once), the others
wait for their client's node to register again and are sent to it under the same task id.

Memory: at most ``max_waiting_results`` received results wait for the engine to take
them (a result beyond that waits in its gRPC call, before it is acknowledged), and the
server receives at most ``ServerConfig.max_receiving`` at once, so the server holds a
bounded number of results whatever the number of nodes.

Evaluations (personalised methods, Ditto): :meth:`EngineCoordinator.evaluate_clients`
sends every connected client's node an evaluation task (:attr:`TaskKind.EVALUATE`) and
waits for the answers (loss, accuracy, test examples; checked by
:func:`evaluation_from_wire`), journaled by their index since the checkpoint.

Results: a node sends its client update's own tensors (float32), weight and scalars, and
its client metrics; the engine folds them as the local runtime folds a task. A tensor the
update also encoded (:attr:`ClientResult.encoded`: a compressed update) travels as those
bytes instead (:class:`~roost.deploy.tensors.Encoded`, codec :data:`ENCODED_UPLOAD`),
and the server rebuilds it with the algorithm's ``decode_upload`` before acknowledging,
so a bad message is refused before anything reaches the engine. The delivery counts
the bytes the result's tensors really took on the wire. Metrics
travel in :attr:`Result.metrics` under ``metric.<name>``, the result's scalars under
``scalar.<name>``, and the node's measured compute seconds as ``compute_s``.
"""

from __future__ import annotations

import collections
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from roost.algorithms.base import ClientResult, Payload
from roost.clock import WallClock
from roost.deploy.errors import AlreadyArrived, NonFinite, NotRegistered, Resuming, WireError
from roost.deploy.journal import Journal, LoggedEvent
from roost.deploy.protocol import (
    Ack,
    Answer,
    Exchange,
    MidTaskRequest,
    NodeInfo,
    Registration,
    RequestKind,
    Result,
    SettingValue,
    TaskKind,
    TaskSpec,
    WireStats,
)
from roost.deploy.split import (
    DEVICE_PARAMS,
    SplitServingLike,
    SplitTaskLike,
    exchange_from_wire,
    exchange_spec,
    read_fields,
    reply_to_wire,
)
from roost.deploy.tensors import Encoded, TensorSpec, WireValue
from roost.engine.core import ARRIVAL, REQUEST, WAKE
from roost.engine.flight import Flight
from roost.engine.remote import ClientEvaluation, Delivery

__all__ = [
    "ENCODED_UPLOAD",
    "EngineCoordinator",
    "UnknownClient",
    "UploadDecoder",
    "payload_from_wire",
    "payload_to_wire",
    "result_from_wire",
    "result_to_wire",
]

EXTRA = "extra."
METRIC = "metric."
SCALAR = "scalar."
ENCODED_UPLOAD = "roost.upload"
"""The codec name of a result tensor sent encoded (the algorithm's own bytes)."""

UploadDecoder = Callable[[str, bytes, Payload], torch.Tensor]
"""``(name, data, payload) -> tensor``: a result tensor rebuilt from the bytes a node sent
for it, for a task given ``payload`` (the algorithm's ``decode_upload``); raises
ValueError for bad bytes."""


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
    tensors: dict[str, WireValue] = {}
    for name, value in result.tensors.items():
        data = result.encoded.get(name)
        if data is not None:
            tensors[name] = Encoded(ENCODED_UPLOAD, data)
        else:
            tensors[name] = value.detach().to(torch.float32).contiguous()
    return Result(task_id, tensors, float(result.weight), wire_metrics)


def result_from_wire(
    result: Result, payload: Payload, decode_upload: UploadDecoder | None = None
) -> tuple[ClientResult, dict[str, float], float]:
    """The client result, client metrics and compute seconds of a received result of a
    task given ``payload``.

    Every tensor must be a float32 vector whose length is one the task's model has (the
    flat parameters and the payload's extras), or, with ``decode_upload``, bytes of codec
    :data:`ENCODED_UPLOAD` that it rebuilds into such a vector of finite values; the
    weight must be finite and > 0."""
    sizes = {payload.params.numel(), *(v.numel() for v in payload.extras.values())}
    tensors: dict[str, torch.Tensor] = {}
    for name, value in result.tensors.items():
        if isinstance(value, Encoded):
            value = _decoded(name, value, payload, decode_upload)
        elif not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
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


def _decoded(
    name: str, value: Encoded, payload: Payload, decode_upload: UploadDecoder | None
) -> torch.Tensor:
    if decode_upload is None or value.codec != ENCODED_UPLOAD:
        allowed = f"float32 values or codec {ENCODED_UPLOAD!r}" if decode_upload else "float32"
        raise ResultRefused(
            f"result tensor {name!r} arrived encoded as {value.codec!r}; allowed: {allowed}"
        )
    try:
        tensor = decode_upload(name, value.data, payload)
    except ValueError as e:
        raise ResultRefused(f"result tensor {name!r}: {e}") from None
    if tensor.dtype != torch.float32:
        raise ResultRefused(f"result tensor {name!r} decodes to {tensor.dtype}, not float32")
    if not bool(torch.isfinite(tensor).all()):
        raise NonFinite(f"result tensor {name!r} decodes to NaN or Inf values")
    return tensor


def _joined(result: Result, task: SplitTaskLike) -> Result:
    """A split task's result with its device part joined to the replica's server part
    (``params``), and the bytes the task's activations took up counted in its wire size."""
    device = result.tensors.get(DEVICE_PARAMS)
    if not isinstance(device, torch.Tensor) or set(result.tensors) != {DEVICE_PARAMS}:
        raise ResultRefused(f"a split task's result is one float32 tensor {DEVICE_PARAMS!r}")
    try:
        params = task.join(device)
    except ValueError as e:
        raise ResultRefused(f"task {result.task_id}: {e}") from None
    w = result.wire
    wire = WireStats(w.payload_bytes + task.bytes_up, w.message_bytes, w.chunks)
    return Result(result.task_id, {"params": params}, result.weight, result.metrics, wire)


EVAL_LOSS, EVAL_ACCURACY, EVAL_EXAMPLES = "eval.loss", "eval.accuracy", "eval.examples"


def evaluation_to_wire(task_id: str, loss: float, accuracy: float, examples: int) -> Result:
    """What a node sends for an evaluation task: no tensors, three metrics."""
    metrics = {EVAL_LOSS: float(loss), EVAL_ACCURACY: float(accuracy)}
    metrics[EVAL_EXAMPLES] = float(examples)
    return Result(task_id, {}, 1.0, metrics)


def evaluation_from_wire(result: Result, client_id: int) -> ClientEvaluation:
    """The measurement of a received evaluation result: no tensors; a finite loss >= 0,
    an accuracy in [0, 1] and a whole number of examples >= 0 (accuracy times examples
    a whole number of correct predictions, to 1e-6)."""
    if result.tensors:
        raise ResultRefused(
            f"an evaluation result holds no tensors, got {', '.join(sorted(result.tensors))}"
        )
    m = result.metrics
    missing = [k for k in (EVAL_LOSS, EVAL_ACCURACY, EVAL_EXAMPLES) if k not in m]
    if missing:
        raise ResultRefused(f"an evaluation result needs the metrics {', '.join(missing)}")
    loss, accuracy, examples = m[EVAL_LOSS], m[EVAL_ACCURACY], m[EVAL_EXAMPLES]
    if not (math.isfinite(loss) and loss >= 0):
        raise ResultRefused(f"{EVAL_LOSS} must be a finite number >= 0, got {loss}")
    if not (0 <= examples <= 2**53 and examples == int(examples)):
        raise ResultRefused(f"{EVAL_EXAMPLES} must be a whole number >= 0, got {examples}")
    correct = accuracy * examples
    if not (0 <= accuracy <= 1 and abs(correct - round(correct)) <= 1e-6 * max(1, examples)):
        raise ResultRefused(
            f"{EVAL_ACCURACY} must be a fraction in [0, 1] of the {int(examples)} examples, "
            f"got {accuracy}"
        )
    return ClientEvaluation(client_id, float(loss), float(accuracy), int(examples))


@dataclass
class _Evaluation:
    """One evaluation of the connected clients' personal models, being answered."""

    expected: set[int]
    answers: dict[int, ClientEvaluation] = field(default_factory=dict)

    def done(self) -> bool:
        return self.expected <= set(self.answers)


@dataclass
class _Pending:
    """A mid-task request waiting for the engine's answer."""

    done: threading.Event = field(default_factory=threading.Event)
    answer: Payload | None = None


@dataclass
class _SplitFlight:
    """A split task's replica on this server, and the last micro-batch it answered (a
    resent message, with the same digest, gets that answer again)."""

    task: SplitTaskLike
    model_version: int
    sent_bytes: int = 0  # the task's payload: the device part (and any extras)
    lock: threading.Lock = field(default_factory=threading.Lock)
    last: tuple[tuple[int, int], str, Answer] | None = None


class EngineCoordinator:
    """See the module docstring. ``task_timeout_s``: seconds after dispatch when a task
    with no result is lost; ``answer_timeout_s``: how long a mid-task request may wait;
    ``silent_after_s``: how long a node may say nothing before the watchdog disconnects
    it; ``run_config``: the JSON told to every node at registration;
    ``reserve_timeout_s``: how long a client id reserved by a node that is not ready yet
    stays its."""

    def __init__(
        self,
        clock: WallClock,
        num_clients: int,
        *,
        task_timeout_s: float = 600.0,
        answer_timeout_s: float = 60.0,
        silent_after_s: float = 30.0,
        run_config: str = "",
        journal: Journal | None = None,
        replay_step: int | None = None,
        min_nodes: int = 0,
        max_waiting_results: int = 4,
        decode_upload: UploadDecoder | None = None,
        keep_tasks_per_client: int = 16,
        reserve_timeout_s: float = 600.0,
        split: SplitServingLike | None = None,
    ) -> None:
        if silent_after_s <= 0:
            raise ValueError(f"silent_after_s must be > 0, got {silent_after_s}")
        self.clock = clock
        self.num_clients = num_clients
        self.task_timeout_s = task_timeout_s
        self.answer_timeout_s = answer_timeout_s
        self.silent_after_s = silent_after_s
        self.run_config = run_config
        self.min_nodes = min_nodes
        self.max_waiting_results = max(1, max_waiting_results)
        self.decode_upload = decode_upload
        self.split = split
        self._split: dict[int, _SplitFlight] = {}  # task key -> its replica (split methods)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # notified when a node may have work
        self._waiting: dict[str, int] = {}  # node -> its PullTasks waiting for work
        self.journal = journal
        # task ids are unique in the run and, journaled, the same across restarts
        self._prefix = journal.task_prefix() if journal is not None else secrets.token_hex(4)
        self._replay: collections.deque[LoggedEvent] = collections.deque()
        self._replay_connected: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        self._replaying = False
        self._current: LoggedEvent | None = None  # the replayed event being applied
        self._queries = 0  # the engine's connected() queries since the checkpoint
        self._last_mask: np.ndarray | None = None
        self._specs: dict[int, TaskSpec] = {}  # replay: task key -> spec, settled at the end
        self._orphans: dict[int, list[TaskSpec]] = {}  # client -> tasks waiting for its node
        if journal is not None:
            journal.after_step = replay_step or 0
        if journal is not None and replay_step is not None:
            self._replay.extend(journal.events(replay_step))
            self._replay_connected.extend(journal.connected(replay_step))
            self._replaying = True
        self._client_of: dict[str, int] = {}
        self._node_of: dict[int, str] = {}
        self._connected = np.zeros(num_clients, dtype=bool)
        self._queues: dict[str, collections.deque[TaskSpec]] = {}
        self._tasks_of: dict[str, set[int]] = {}  # node -> keys of its tasks in flight
        self._last_seen: dict[str, float] = {}  # node -> time.monotonic() of its last call
        self._given: dict[str, int] = {}  # node -> the client id it was assigned (kept)
        self._reserved: dict[str, float] = {}  # node -> when it reserved (not ready yet)
        self._ready_once: set[str] = set()  # nodes that took work at least once
        self.reserve_timeout_s = reserve_timeout_s
        self._key_of: dict[str, int] = {}
        self._recent: dict[int, collections.deque[str]] = {}  # client -> its last task ids
        self.keep_tasks_per_client = keep_tasks_per_client
        self._payloads: dict[int, Payload] = {}  # task key -> its payload, until settled
        self._deliveries: dict[int, Delivery] = {}
        self._pending: dict[int, _Pending] = {}
        self._cancelled: set[int] = set()
        self._evaluations = 0  # evaluations since the checkpoint (their journal index)
        self._evaluating: dict[str, tuple[_Evaluation, int]] = {}  # task id -> (it, client)
        self._finished = False
        self._told: set[str] = set()  # nodes told that the run is over
        self._watchdog: threading.Thread | None = None
        self._stop_watchdog = threading.Event()
        self.disconnected: list[str] = []
        """Nodes the watchdog disconnected, in order (a node may appear more than once)."""
        self.released: list[str] = []
        """Nodes whose reservation expired, in order."""

    # ---- the engine's side (RemoteFleet)
    def connected(self, num_clients: int) -> np.ndarray:
        """The engine's query (journaled, and answered from the journal in replay)."""
        with self._lock:
            query = self._queries
            self._queries += 1
            if self._replaying:
                while self._replay_connected and self._replay_connected[0][0] <= query:
                    self._last_mask = self._replay_connected.popleft()[1]
                mask = self._last_mask
                if mask is None:
                    mask = np.zeros(self.num_clients, dtype=bool)
                return mask[:num_clients].copy()
            mask = self._connected[:num_clients].copy()
            if self.journal is not None and (
                self._last_mask is None or not np.array_equal(mask, self._last_mask)
            ):
                self.journal.add_connected(query, mask)
                self._last_mask = mask
            return mask

    def num_connected(self) -> int:
        """How many clients have a node now (not an engine query: not journaled)."""
        with self._lock:
            return int(self._connected.sum())

    # ---- replay and the journal (the engine's side)
    def replay_next(self) -> tuple[str, int] | None:
        """The next journaled event for the engine to consume, or None: the replay is
        over (then the tasks in flight are settled, and nodes are served again)."""
        with self._lock:
            if not self._replaying:
                return None
            if self._replay:
                self._current = self._replay.popleft()
                return self._current.kind, self._current.key
        self._go_live()
        return None

    def _go_live(self) -> None:
        """End the replay: settle the tasks in flight and wait for ``min_nodes`` nodes."""
        with self._lock:
            self._replaying = False
            self._current = None
            self._last_mask = None  # the live mask is logged at the next query
            specs, self._specs = self._specs, {}
        self._settle(specs)
        self.wait_for_nodes()

    def wait_for_nodes(self, poll_s: float = 0.02) -> None:
        """Block until ``min_nodes`` nodes are connected (at the start of a run, and when
        a resumed run goes live after its replay)."""
        while self.num_connected() < self.min_nodes:
            time.sleep(poll_s)

    def replaying(self) -> bool:
        with self._lock:
            return self._replaying

    def consumed(self, kind: str, key: int, delivered: bool) -> None:
        """The engine consumed this event (journaled, live only)."""
        if self.journal is None or self._replaying:
            return
        task_id = f"{self._prefix}-{key}" if kind == "task" and delivered else None
        self.journal.add_event(LoggedEvent(kind, key, task_id))

    def checkpointed(self, step: int, in_flight: list[int]) -> None:
        """A checkpoint of ``step`` is on disk with the tasks ``in_flight``."""
        if self.journal is not None:
            self.journal.checkpointed(step, [f"{self._prefix}-{k}" for k in in_flight])
            with self._lock:
                self._queries, self._last_mask, self._evaluations = 0, None, 0

    def _settle(self, specs: dict[int, TaskSpec]) -> None:
        """After the replay: deliver from the journal what was accepted before the
        restart; keep the rest for their client's node."""
        for key, spec in sorted(specs.items()):
            delivery = self.journal.result(spec.task_id) if self.journal is not None else None
            with self._lock:
                if key in self._cancelled:
                    continue
                lost = False
                if delivery is not None:
                    self._deliveries[key] = delivery
                    self._payloads.pop(key, None)
                elif key in self._split:  # its replica's training died with the server
                    lost = True
                else:
                    self._orphans.setdefault(spec.client_id, []).append(spec)
                self._split.pop(key, None)
            if delivery is not None or lost:
                self.clock.schedule(self.clock.now, ("task", key), ARRIVAL)
        self.clock.schedule(self.clock.now, ("wake", -1), WAKE)

    def send(self, flight: Flight, payload: Payload) -> None:
        task_id = f"{self._prefix}-{flight.key}"
        settings: dict[str, SettingValue] = dict(flight.task.settings)
        wire = payload_to_wire(payload)
        result_spec: dict[str, TensorSpec] | None = None
        split: _SplitFlight | None = None
        if self.split is not None:  # the node gets the device part; the rest stays here
            device = self.split.device_params(payload.params, settings)
            del wire["params"]
            wire[DEVICE_PARAMS] = device
            result_spec = {DEVICE_PARAMS: TensorSpec("float32", (device.numel(),))}
            sent = sum(
                v.numel() * v.element_size() for v in wire.values() if isinstance(v, torch.Tensor)
            )
            split = _SplitFlight(
                self.split.open(flight.client_id, payload, settings), flight.task.version, sent
            )
        spec = TaskSpec(
            task_id,
            flight.client_id,
            flight.task.version,
            flight.task.seed,
            flight.task.round,
            wire,
            settings,
            result_spec,
        )
        with self._lock:
            if split is not None:
                self._split[flight.key] = split
            self._key_of[task_id] = flight.key
            self._payloads[flight.key] = payload
            self._remember(flight.client_id, task_id)
            if self._replaying:  # settled when the replay ends
                self._specs[flight.key] = spec
                return
            node = self._node_of.get(flight.client_id)
            if node is not None:
                self._queues.setdefault(node, collections.deque()).append(spec)
                self._tasks_of.setdefault(node, set()).add(flight.key)
                self._work.notify_all()
        if node is None:  # its node left since the engine saw it connected: lost now
            self.clock.schedule(self.clock.now, ("task", flight.key), ARRIVAL)

    def evaluate_clients(self, initial: Payload) -> list[ClientEvaluation]:
        """Send an evaluation task to every connected client's node and wait (at most
        ``task_timeout_s``) until each has answered or left; journaled, and answered from
        the journal in a replay (a replay that finds none goes live and measures now)."""
        with self._lock:
            index = self._evaluations
            self._evaluations += 1
            replaying = self._replaying
        if replaying:
            logged = self.journal.evaluation(index) if self.journal is not None else None
            if logged is not None:
                return logged
            self._go_live()  # the server stopped during this evaluation: measure it now
        evaluation = self._send_evaluations(index, initial)
        deadline = time.monotonic() + self.task_timeout_s
        with self._work:
            while not evaluation.done() and not self._finished:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._work.wait(min(left, 1.0))
            for task_id in [t for t, (e, _) in self._evaluating.items() if e is evaluation]:
                del self._evaluating[task_id]
                for queue in self._queues.values():
                    for spec in [q for q in queue if q.task_id == task_id]:
                        queue.remove(spec)
            measured = [evaluation.answers[c] for c in sorted(evaluation.answers)]
        if self.journal is not None:
            self.journal.add_evaluation(index, measured)
        return measured

    def _send_evaluations(self, index: int, initial: Payload) -> _Evaluation:
        wire = payload_to_wire(initial)
        with self._lock:
            clients = [c for c in sorted(self._node_of) if self._connected[c]]
            evaluation = _Evaluation(set(clients))
            for client in clients:
                step = self.journal.after_step if self.journal is not None else 0
                task_id = f"{self._prefix}-s{step}e{index}-{client}"
                spec = TaskSpec(
                    task_id, client, initial.version, 0, 0, wire, kind=TaskKind.EVALUATE
                )
                self._evaluating[task_id] = (evaluation, client)
                node = self._node_of[client]
                self._queues.setdefault(node, collections.deque()).append(spec)
            self._work.notify_all()
        return evaluation

    def _accept_evaluation(self, node_id: str, result: Result) -> Ack:
        with self._lock:
            entry = self._evaluating.get(result.task_id)
        if entry is None:
            return Ack(False, f"evaluation {result.task_id} is over")
        evaluation, client = entry
        measured = evaluation_from_wire(result, client)
        with self._work:
            if self._evaluating.get(result.task_id) is not entry:
                return Ack(False, f"evaluation {result.task_id} is over")
            evaluation.answers[client] = measured
            self._work.notify_all()
        return Ack(True)

    def _remember(self, client: int, task_id: str) -> None:
        """Keep the ids of the client's last ``keep_tasks_per_client`` tasks; forget the
        records of older ones that are settled (no payload, delivery or request left)."""
        recent = self._recent.setdefault(client, collections.deque())
        recent.append(task_id)
        while len(recent) > self.keep_tasks_per_client:
            key = self._key_of.get(recent[0])
            if key is not None and (
                key in self._payloads or key in self._deliveries or key in self._pending
            ):
                break  # still in flight: forgotten once settled, at a later send
            self._key_of.pop(recent.popleft(), None)
            self._cancelled.discard(key)

    def answer(self, key: int, payload: Payload) -> None:
        with self._lock:
            pending = self._pending.get(key)
        if pending is not None:
            pending.answer = payload
            pending.done.set()

    def cancel(self, key: int) -> None:
        with self._lock:
            self._cancelled.add(key)
            self._specs.pop(key, None)
            self._payloads.pop(key, None)
            self._split.pop(key, None)
            if self._deliveries.pop(key, None) is not None:
                self._work.notify_all()
            for keys in self._tasks_of.values():
                keys.discard(key)
            for waiting in self._orphans.values():
                waiting[:] = [t for t in waiting if self._key_of.get(t.task_id) != key]
            for queue in self._queues.values():
                for spec in list(queue):
                    if self._key_of.get(spec.task_id) == key:
                        queue.remove(spec)
            pending = self._pending.pop(key, None)
        if pending is not None:
            pending.done.set()  # the waiting request is told its task is gone

    def take(self, key: int) -> Delivery | None:
        with self._lock:
            self._split.pop(key, None)  # delivered or lost: its replica is done
            current = self._current
            if self._replaying and current is not None and current.key == key:
                self._specs.pop(key, None)  # delivered or lost in the replay: settled
                self._payloads.pop(key, None)
                if current.task_id is None or self.journal is None:
                    return None
                found = self.journal.result(current.task_id)
                if found is None:
                    raise RuntimeError(
                        f"{self.journal.path}: the journal delivers task {current.task_id} "
                        "but holds no result for it"
                    )
                return found
            taken = self._deliveries.pop(key, None)
            if taken is not None:
                self._work.notify_all()  # a result waiting for room may be delivered
            return taken

    def disconnect(self, node_id: str) -> None:
        """``node_id`` is gone: its client is unavailable until it registers again, and
        each of its tasks in flight is lost now."""
        with self._lock:
            client = self._client_of.pop(node_id, None)
            if client is not None:
                self._node_of.pop(client, None)
                self._connected[client] = False
            self._queues.pop(node_id, None)
            self._last_seen.pop(node_id, None)
            lost = self._tasks_of.pop(node_id, set())
            if client is not None:  # an evaluation waits for it no more
                for evaluation, c in self._evaluating.values():
                    if c == client:
                        evaluation.expected.discard(client)
            self._work.notify_all()  # its waiting pull, if any, returns
        for key in sorted(lost):
            self.clock.schedule(self.clock.now, ("task", key), ARRIVAL)

    def check_silent(self, now: float | None = None) -> list[str]:
        """Disconnect every node whose last call is ``silent_after_s`` or more before
        ``now`` (``time.monotonic()`` by default); returns them."""
        now = time.monotonic() if now is None else now
        with self._lock:
            silent = sorted(  # a node waiting in a PullTask is not silent
                n
                for n, seen in self._last_seen.items()
                if now - seen >= self.silent_after_s and n not in self._waiting
            )
            for node_id, since in list(self._reserved.items()):
                if now - since >= self.reserve_timeout_s:
                    self._release(node_id)
        for node_id in silent:
            self.disconnect(node_id)
        self.disconnected += silent
        return silent

    def _release(self, node_id: str) -> None:
        """Under the lock: a reservation expired; its client id is free again (also for
        the node itself, if it never took work with it)."""
        del self._reserved[node_id]
        client = self._client_of.pop(node_id, None)
        if client is not None and self._node_of.get(client) == node_id:
            del self._node_of[client]
        if node_id not in self._ready_once:
            self._given.pop(node_id, None)
        self.released.append(node_id)

    def start_watchdog(self, every_s: float | None = None) -> None:
        """Run :meth:`check_silent` every ``every_s`` (a quarter of ``silent_after_s``
        by default) on a daemon thread until :meth:`close`."""
        interval = self.silent_after_s / 4 if every_s is None else every_s

        def watch() -> None:
            while not self._stop_watchdog.wait(interval):
                self.check_silent()

        self._watchdog = threading.Thread(target=watch, name="roost-watchdog", daemon=True)
        self._watchdog.start()

    def finish(self) -> None:
        """The run is over: nodes asking for work are told to stop."""
        with self._lock:
            self._finished = True
            self._work.notify_all()

    def close(self) -> None:
        """Stop the watchdog."""
        self._stop_watchdog.set()
        if self._watchdog is not None:
            self._watchdog.join()

    def _seen(self, node_id: str) -> None:
        """Under the lock: ``node_id`` called; NotRegistered if it is not (or no longer)
        registered, so that it registers again."""
        self._serving()
        if node_id not in self._client_of:
            raise NotRegistered(
                f"node {node_id!r} is not registered (it was silent for "
                f"{self.silent_after_s:g} s, or the server restarted); register"
            )
        self._last_seen[node_id] = time.monotonic()

    # ---- the network's side (Coordinator)
    def _serving(self) -> None:
        """Under the lock: refuse nodes while the journal is replayed."""
        if self._replaying:
            raise Resuming("the server is resuming its run; retry in a moment")

    def register(self, node: NodeInfo) -> Registration:
        with self._lock:
            self._serving()
        ready = node.properties.get("ready", True)
        raw = node.properties.get("client_id")
        if raw is not None and (isinstance(raw, bool) or not isinstance(raw, int)):
            raise UnknownClient(
                f"node {node.node_id} declares client_id={raw!r}; it must be an integer "
                f"0 .. {self.num_clients - 1}, or absent (the server assigns one)"
            )
        if raw is not None and not 0 <= raw < self.num_clients:
            raise UnknownClient(
                f"node {node.node_id} declares client_id={raw}; allowed: 0 .. "
                f"{self.num_clients - 1}"
            )
        with self._lock:
            client = self._given.get(node.node_id) if raw is None else raw
            if client is None:  # the lowest client id no node holds or was given
                held = np.zeros(self.num_clients, dtype=bool)
                held[list(self._node_of)] = True
                held[list(self._given.values())] = True
                free = np.flatnonzero(~held)
                if not len(free):
                    raise UnknownClient(
                        f"node {node.node_id}: all {self.num_clients} client ids of this "
                        "run are held by connected nodes"
                    )
                client = int(free[0])
            holder = self._node_of.get(client)
            if holder is not None and holder != node.node_id:
                raise UnknownClient(f"client_id={client} is held by node {holder}")
            previous = self._client_of.get(node.node_id)
            if previous is not None and previous != client:  # it now holds another client
                self._node_of.pop(previous, None)
                self._connected[previous] = False
            self._client_of[node.node_id] = client
            self._node_of[client] = node.node_id
            if raw is None:  # assigned: this node's for the server's life
                self._given[node.node_id] = client
            if ready is False:  # the id is the node's, but it takes no work yet
                self._reserved[node.node_id] = time.monotonic()
                return Registration(client, self.run_config)
            self._reserved.pop(node.node_id, None)
            self._ready_once.add(node.node_id)
            self._connected[client] = True
            queue = self._queues.setdefault(node.node_id, collections.deque())
            for spec in self._orphans.pop(client, []):  # sent before a restart: again
                queue.append(spec)
                self._tasks_of.setdefault(node.node_id, set()).add(self._key_of[spec.task_id])
            self._work.notify_all()
            self._last_seen[node.node_id] = time.monotonic()
        self.clock.schedule(self.clock.now, ("wake", -1), WAKE)
        return Registration(client, self.run_config)

    def finished(self) -> bool:
        with self._lock:
            return self._finished

    def next_task(self, node_id: str, wait_s: float = 0.0) -> TaskSpec | None:
        deadline = time.monotonic() + wait_s
        with self._work:
            self._seen(node_id)
            self._waiting[node_id] = self._waiting.get(node_id, 0) + 1
            try:
                while True:
                    queue = self._queues.get(node_id)
                    if queue:
                        return queue.popleft()
                    if self._finished:
                        self._told.add(node_id)
                        return None
                    left = deadline - time.monotonic()
                    if left <= 0 or node_id not in self._client_of:
                        return None
                    self._work.wait(left)
            finally:
                self._waiting[node_id] -= 1
                if not self._waiting[node_id]:
                    del self._waiting[node_id]
                if node_id in self._last_seen:
                    self._last_seen[node_id] = time.monotonic()

    def all_told_finished(self) -> bool:
        """Every connected node has asked for work since :meth:`finish` (and so heard
        that the run is over)."""
        with self._lock:
            return set(self._client_of) <= self._told

    def accept_result(self, node_id: str, result: Result) -> Ack:
        with self._lock:
            self._serving()
            if node_id in self._client_of:
                self._last_seen[node_id] = time.monotonic()
            evaluation = result.task_id in self._evaluating
            key = self._key_of.get(result.task_id)
            payload = self._payloads.get(key) if key is not None else None
            cancelled = key in self._cancelled
        if evaluation:
            return self._accept_evaluation(node_id, result)
        if cancelled:
            return Ack(False, f"task {result.task_id} no longer counts (its round closed)")
        if key is None or payload is None:
            return Ack(False, f"task {result.task_id} is not one of this run's")
        with self._lock:
            split = self._split.get(key)
        if split is not None:
            result = _joined(result, split.task)
        client_result, metrics, compute_s = result_from_wire(result, payload, self.decode_upload)
        down = split.sent_bytes + split.task.bytes_down if split is not None else None
        delivery = Delivery(
            client_result, metrics, compute_s, result.wire.payload_bytes or None, down
        )
        with self._work:  # results wait here, not in memory, until the engine has room
            while len(self._deliveries) >= self.max_waiting_results and not self._finished:
                self._work.wait(1.0)
            if key in self._cancelled:
                return Ack(False, f"task {result.task_id} no longer counts (its round closed)")
        if self.journal is not None:  # durable before the node hears it was accepted
            self.journal.add_result(result.task_id, delivery)
        with self._lock:
            # cancelled while the journal wrote (its round closed, or it was declared lost):
            # posted now, the delivery would never be taken (the engine skips the events of
            # tasks it no longer has) and would hold one of the max_waiting_results places
            # for good; max_waiting_results of them and no result is accepted any more. The
            # journaled copy is never replayed: the engine consumed this task as lost.
            if key in self._cancelled:
                return Ack(False, f"task {result.task_id} no longer counts (its round closed)")
            self._deliveries[key] = delivery
            self._payloads.pop(key, None)
            self._tasks_of.get(node_id, set()).discard(key)
        if split is not None:  # accepted: what its server part carries on is kept
            split.task.keep_state()
        self.clock.schedule(self.clock.now, ("task", key), ARRIVAL)
        return Ack(True)

    def answer_request(self, node_id: str, request: MidTaskRequest) -> Answer:
        with self._lock:
            self._seen(node_id)
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

    def _split_flight(self, node_id: str, task_id: str) -> _SplitFlight:
        with self._lock:
            self._seen(node_id)
            key = self._key_of.get(task_id)
            split = self._split.get(key) if key is not None and key not in self._cancelled else None
        if split is None:
            raise ResultRefused(
                f"task {task_id} has no split-learning replica on this server (it does not "
                "split the model, or it no longer counts)"
            )
        return split

    def exchange_spec(
        self, node_id: str, task_id: str, kind: RequestKind, fields: Mapping[str, SettingValue]
    ) -> Mapping[str, TensorSpec]:
        split = self._split_flight(node_id, task_id)
        examples = read_fields(fields)["examples"]
        if examples < 1:
            raise ResultRefused("a split exchange carries at least 1 example")
        return exchange_spec(split.task.spec(examples))

    def exchange(self, node_id: str, exchange: Exchange) -> Answer:
        split = self._split_flight(node_id, exchange.task_id)
        message = exchange_from_wire(exchange.fields, exchange.tensors, split.task.channels)
        position = (message.iteration, message.micro_batch)
        with split.lock:  # a node's micro-batches come one at a time; a resend may overlap
            if split.last is not None and split.last[0] == position:
                if split.last[1] == exchange.digest:
                    return split.last[2]
                raise AlreadyArrived(
                    f"task {exchange.task_id}: iteration {position[0]}'s micro-batch "
                    f"{position[1]} was answered already, with different content"
                )
            try:
                reply = split.task.answer(message)
            except ValueError as e:
                raise ResultRefused(f"task {exchange.task_id}: {e}") from None
            answer = Answer(split.model_version, reply_to_wire(reply))
            split.last = (position, exchange.digest, answer)
        return answer

    def heartbeat(self, node_id: str, task_id: str | None) -> bool:
        with self._lock:
            self._seen(node_id)
            if task_id is None:
                return True
            key = self._key_of.get(task_id)
            return key is not None and key not in self._cancelled
