"""Shared pieces of the deployment tests: a recording coordinator, identities, raw calls.

Import only after ``pytest.importorskip("grpc")`` (and cryptography): this module imports
roost.deploy's grpc-backed modules at its top.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import torch

from roost.deploy._proto import METHODS, PROTOCOL_VERSION, pb
from roost.deploy.auth import AllowList, NodeKey, Signer, Verifier, body_digest
from roost.deploy.backoff import Backoff
from roost.deploy.client import ClientConfig, NodeClient
from roost.deploy.protocol import (
    Ack,
    Answer,
    MidTaskRequest,
    NodeInfo,
    Result,
    TaskSpec,
)
from roost.deploy.server import DeployServer, ServerConfig

FAST = Backoff(initial_s=0.01, max_s=0.05, max_total_s=10.0)


class RecordingCoordinator:
    """Hands out fixed tasks per node (in order) and records every call it receives."""

    def __init__(self, tasks: dict[str, Sequence[TaskSpec]] | None = None) -> None:
        self.lock = threading.Lock()
        self.queues = {n: collections.deque(ts) for n, ts in (tasks or {}).items()}
        self.registered: list[NodeInfo] = []
        self.pulls: list[str] = []
        self.accepted: list[tuple[str, Result]] = []
        self.requests: list[tuple[str, MidTaskRequest]] = []
        self.heartbeats: list[tuple[str, str | None]] = []
        self.answer = Answer(7, {"params": torch.arange(4, dtype=torch.float32)})
        self.keep_going = True

    def add(self, node_id: str, *tasks: TaskSpec) -> None:
        with self.lock:
            self.queues.setdefault(node_id, collections.deque()).extend(tasks)

    def register(self, node: NodeInfo) -> None:
        with self.lock:
            self.registered.append(node)

    def finished(self) -> bool:
        return False

    def next_task(self, node_id: str, wait_s: float = 0.0) -> TaskSpec | None:
        with self.lock:
            self.pulls.append(node_id)
            queue = self.queues.get(node_id)
            return queue.popleft() if queue else None

    def accept_result(self, node_id: str, result: Result) -> Ack:
        with self.lock:
            self.accepted.append((node_id, result))
        return Ack(True, f"thanks {node_id}")

    def answer_request(self, node_id: str, request: MidTaskRequest) -> Answer:
        with self.lock:
            self.requests.append((node_id, request))
        return self.answer

    def heartbeat(self, node_id: str, task_id: str | None) -> bool:
        with self.lock:
            self.heartbeats.append((node_id, task_id))
        return self.keep_going

    def calls(self) -> tuple[int, int, int, int, int]:
        """How many register, pull, accept, request and heartbeat calls arrived."""
        with self.lock:
            return (
                len(self.registered),
                len(self.pulls),
                len(self.accepted),
                len(self.requests),
                len(self.heartbeats),
            )


@dataclass
class Federation:
    """alice, mallory and bob are on the allow-list (bob never registers); eve is not."""

    alice: NodeKey = field(default_factory=lambda: NodeKey.generate("alice"))
    mallory: NodeKey = field(default_factory=lambda: NodeKey.generate("mallory"))
    bob: NodeKey = field(default_factory=lambda: NodeKey.generate("bob"))
    eve: NodeKey = field(default_factory=lambda: NodeKey.generate("eve"))

    def allow_list(self) -> AllowList:
        allowed = (self.alice, self.mallory, self.bob)
        return AllowList({k.node_id: k.public_bytes for k in allowed})

    def verifier(self, **kwargs: float) -> Verifier:
        return Verifier(self.allow_list(), **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def running_server(
    coordinator: RecordingCoordinator,
    fed: Federation,
    config: ServerConfig | None = None,
    **kwargs: object,
) -> Iterator[DeployServer]:
    server = DeployServer(
        coordinator,
        fed.verifier(),
        address="127.0.0.1:0",
        config=config or ServerConfig(),
        **kwargs,  # type: ignore[arg-type]
    )
    with server:
        yield server


def client(server: DeployServer, key: NodeKey, **kwargs: object) -> NodeClient:
    kwargs.setdefault("config", ClientConfig(backoff=FAST))
    return NodeClient(server.address, key, **kwargs)  # type: ignore[arg-type]


def spec(
    task_id: str, payload: dict[str, torch.Tensor], result_spec: dict | None = None, **kw: int
) -> TaskSpec:
    fields = {"client_id": 3, "model_version": 5, "seed": 11, "round": 2} | kw
    return TaskSpec(task_id=task_id, payload=payload, result_spec=result_spec, **fields)


# --- raw calls: exactly the bytes and metadata a test chooses ---------------------------


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    kind: str
    details: str
    reply: bytes | list[bytes] | None = None


def _outcome(error: grpc.RpcError) -> Outcome:
    kind = dict(error.trailing_metadata() or ()).get("roost-refusal", "")
    return Outcome(error.code(), kind, error.details() or "")


def call(
    channel: grpc.Channel,
    name: str,
    body: bytes | Sequence[bytes],
    metadata: Sequence[tuple[str, str]] = (),
) -> Outcome:
    """One raw call of method ``name`` (a unary body, or the frames of PushResult)."""
    path = METHODS[name]
    try:
        if name == "PushResult":
            reply = channel.stream_unary(path)(iter(list(body)), metadata=metadata, timeout=20)
        elif name in ("PullTask", "Request"):
            reply = list(channel.unary_stream(path)(body, metadata=metadata, timeout=20))
        else:
            reply = channel.unary_unary(path)(body, metadata=metadata, timeout=20)
    except grpc.RpcError as e:
        return _outcome(e)
    return Outcome(grpc.StatusCode.OK, "", "", reply)


def signed(
    signer: Signer, name: str, body: bytes | Sequence[bytes], **kw: object
) -> tuple[tuple[str, str], ...]:
    frames = [body] if isinstance(body, bytes) else list(body)
    return signer.metadata(METHODS[name], body_digest(frames), **kw)  # type: ignore[arg-type]


def heartbeat_body(node_id: str, task_id: str = "", version: int = PROTOCOL_VERSION) -> bytes:
    return pb.HeartbeatRequest(
        protocol_version=version, node_id=node_id, task_id=task_id
    ).SerializeToString()


def pull_body(node_id: str) -> bytes:
    return pb.PullTaskRequest(
        protocol_version=PROTOCOL_VERSION, node_id=node_id
    ).SerializeToString()


def result_frames(
    node_id: str,
    task_id: str,
    entries: Iterable[tuple[pb.TensorHeader, bytes]],
    *,
    weight: float = 1.0,
    total_bytes: int | None = None,
    chunk_bytes: int = 1 << 20,
) -> list[bytes]:
    """A PushResult stream built by hand: each entry's header (as given, possibly lying) and
    its raw bytes cut into chunks; ``total_bytes`` overrides the manifest's total."""
    entries = list(entries)
    manifest = pb.Manifest(tensors=[h for h, _ in entries])
    manifest.total_bytes = sum(h.nbytes for h, _ in entries) if total_bytes is None else total_bytes
    header = pb.ResultHeader(node_id=node_id, task_id=task_id, weight=weight, result=manifest)
    frames = [pb.ResultFrame(protocol_version=PROTOCOL_VERSION, header=header)]
    for index, (_, data) in enumerate(entries):
        for offset in range(0, len(data), chunk_bytes):
            chunk = pb.DataChunk(
                tensor_index=index, offset=offset, data=data[offset : offset + chunk_bytes]
            )
            frames.append(pb.ResultFrame(protocol_version=PROTOCOL_VERSION, chunk=chunk))
    return [f.SerializeToString() for f in frames]


def dense(name: str, t: torch.Tensor, **override: object) -> tuple[pb.TensorHeader, bytes]:
    """A dense entry's honest header and bytes for ``t``, with header fields overridden."""
    dtype = str(t.dtype).removeprefix("torch.")
    h = pb.TensorHeader(
        name=name,
        dtype=dtype,
        shape=list(t.shape),
        numel=t.numel(),
        nbytes=t.numel() * t.element_size(),
    )
    for key, value in override.items():
        if key == "shape":
            del h.shape[:]
            h.shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(h, key, value)
    data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return h, data
