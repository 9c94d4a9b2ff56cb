"""What the application on each side sees: tasks, results, mid-task requests, and the
:class:`Coordinator` seam between the gRPC server and the engine.

Nothing here imports grpc. The server (:mod:`roost.deploy.server`) owns the network,
validation and security and calls a :class:`Coordinator` only with messages that passed
all of it: signed by an allowed node, byte-for-byte what that node signed, well-formed,
within the size caps, matching the task's result spec, finite, for a task given to that
very node, and not a duplicate of a result already delivered.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from roost.deploy.tensors import TensorSpec, WireValue

__all__ = [
    "Ack",
    "Answer",
    "Coordinator",
    "Exchange",
    "MidTaskRequest",
    "NoWork",
    "NodeInfo",
    "Registration",
    "RequestKind",
    "Result",
    "SettingValue",
    "Task",
    "TaskKind",
    "TaskSpec",
    "WireStats",
]

SettingValue = bool | int | float | str
"""A typed setting value (per-task settings, node properties)."""


class RequestKind(enum.Enum):
    """What a node may ask for in the middle of a task (the proto's ``RequestKind``)."""

    FETCH_MODEL = 1
    """The current global model (FedASMU's mid-task fetch of a fresher model)."""
    SPLIT_ACTIVATIONS = 2
    """Split learning: a micro-batch's activations at the cut (an :class:`Exchange`);
    the answer is their gradient and the micro-batch's loss."""


class TaskKind(enum.Enum):
    """What a task asks of its node (the proto's ``TaskKind``)."""

    TRAIN = 0
    """Train from the payload's model and return the update."""
    EVALUATE = 1
    """Measure the client's personal model on its test split; return only metrics."""


@dataclass(frozen=True)
class WireStats:
    """What a set of tensors cost on the wire: ``payload_bytes`` is the sum of the chunks'
    data (for an :class:`~roost.deploy.tensors.Encoded` value exactly its length);
    ``message_bytes`` the serialized protobuf messages of the whole stream (header frame
    included), i.e. what gRPC framed, before its 5-byte prefix per message and HTTP/2."""

    payload_bytes: int = 0
    message_bytes: int = 0
    chunks: int = 0


@dataclass(frozen=True)
class NodeInfo:
    """A node that registered: its id (from the allow-list), its raw 32-byte Ed25519 public
    key, how many examples it holds, and any properties it declared."""

    node_id: str
    public_key: bytes
    num_examples: int
    properties: Mapping[str, SettingValue] = field(default_factory=dict)


@dataclass(frozen=True)
class Registration:
    """What a coordinator tells a node that registered: the client id it holds in the run
    (the one it declared, or one the coordinator assigned) and the run's resolved config as
    JSON, from which the node builds its algorithm and model ("" when there is none)."""

    client_id: int = 0
    run_config: str = ""


@dataclass(frozen=True)
class NoWork:
    """PullTask's answer when there is no task: ask again after ``retry_after_s``; with
    ``finished`` the run is over and no task will come (the node may stop)."""

    retry_after_s: float
    finished: bool = False


@dataclass(frozen=True)
class TaskSpec:
    """A task the coordinator hands out (server side).

    ``payload`` is sent to the node; ``result_spec``, when set, is what the result must hold
    exactly (names, and each entry's dtype/shape/codec); the server refuses any other."""

    task_id: str
    client_id: int
    model_version: int
    seed: int
    round: int
    payload: Mapping[str, WireValue]
    settings: Mapping[str, SettingValue] = field(default_factory=dict)
    result_spec: Mapping[str, TensorSpec] | None = None
    kind: TaskKind = TaskKind.TRAIN


@dataclass(frozen=True)
class Task:
    """A task as a node received it; ``wire`` is what its payload cost on the wire."""

    task_id: str
    client_id: int
    model_version: int
    seed: int
    round: int
    payload: dict[str, WireValue]
    settings: dict[str, SettingValue]
    wire: WireStats = WireStats()
    kind: TaskKind = TaskKind.TRAIN


@dataclass(frozen=True)
class Result:
    """A task's result: named tensors (or encoded bytes), a weight and scalar metrics.

    A node builds it without ``wire``; the server fills ``wire`` with what it received."""

    task_id: str
    tensors: Mapping[str, WireValue]
    weight: float
    metrics: Mapping[str, float] = field(default_factory=dict)
    wire: WireStats = WireStats()


@dataclass(frozen=True)
class Ack:
    """The coordinator's answer to a result: ``accepted`` False means it arrived but was not
    wanted (say, after its round closed); ``detail`` says why. A duplicate submission of the
    same task gets the first submission's Ack with ``duplicate`` True."""

    accepted: bool = True
    detail: str = ""
    duplicate: bool = False


@dataclass(frozen=True)
class MidTaskRequest:
    """A node's request in the middle of ``task_id``."""

    task_id: str
    kind: RequestKind


@dataclass(frozen=True)
class Exchange:
    """A node's mid-task message with tensors for ``task_id`` (split learning's
    activations): ``fields`` say where they belong in the task; ``digest`` is the SHA-256
    the node signed over the whole stream (a resent message has the same), ``wire`` what
    the tensors cost."""

    task_id: str
    kind: RequestKind
    fields: Mapping[str, SettingValue]
    tensors: Mapping[str, WireValue]
    digest: str = ""
    wire: WireStats = WireStats()


@dataclass(frozen=True)
class Answer:
    """The server's answer to a mid-task request: the tensors and the model version they are."""

    model_version: int
    tensors: Mapping[str, WireValue]
    wire: WireStats = WireStats()


class Coordinator(Protocol):
    """The application behind the server (the engine on a wall clock, in the end).

    The server calls these from its gRPC worker threads, possibly several at once, so an
    implementation must be thread-safe; a call may block (it holds one worker thread). A
    method may raise a :class:`~roost.deploy.errors.WireError` to refuse with that status;
    any other exception is logged and answered with INTERNAL, and the server goes on.

    Guarantees the server gives: ``node_id`` is authenticated (its signature verified
    against the allow-list) and registered since the server started; ``accept_result`` is
    called at most once per task id, only for a task that :meth:`next_task` gave to that
    node, with tensors that passed the task's ``result_spec`` and the finiteness check;
    ``answer_request``, ``exchange_spec``, ``exchange`` and ``heartbeat`` only name tasks
    given to that node whose result has not arrived (``heartbeat``'s ``task_id`` may be
    None: an idle node).
    """

    def register(self, node: NodeInfo) -> Registration | None:
        """A node (re-)registered; raise a WireError to turn it away. What it returns is
        told to the node (None: nothing, a default :class:`Registration`)."""
        ...

    def finished(self) -> bool:
        """True once the run is over: a node asking for work is told to stop."""
        ...

    def next_task(self, node_id: str, wait_s: float = 0.0) -> TaskSpec | None:
        """Work for ``node_id`` now (or, waiting up to ``wait_s`` seconds, as soon as
        there is some), or None (the node is told to ask again).

        Task ids must be unique: the server refuses (INTERNAL) a task id it already gave to
        another node or whose result already arrived."""
        ...

    def accept_result(self, node_id: str, result: Result) -> Ack:
        """The result of a task given to ``node_id`` (``result.wire`` says what it cost)."""
        ...

    def answer_request(self, node_id: str, request: MidTaskRequest) -> Answer:
        """Answer a mid-task request of ``node_id``'s task ``request.task_id``."""
        ...

    def exchange_spec(
        self, node_id: str, task_id: str, kind: RequestKind, fields: Mapping[str, SettingValue]
    ) -> Mapping[str, TensorSpec]:
        """What the tensors of an :class:`Exchange` with these ``fields`` must be, exactly;
        the server checks the manifest against it before it reads any data."""
        ...

    def exchange(self, node_id: str, exchange: Exchange) -> Answer:
        """Answer ``node_id``'s :class:`Exchange` (whose tensors passed the spec and the
        finiteness check)."""
        ...

    def heartbeat(self, node_id: str, task_id: str | None) -> bool:
        """``node_id`` is alive, working on ``task_id``; return False to tell it to drop it."""
        ...
