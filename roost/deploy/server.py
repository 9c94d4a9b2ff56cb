"""The gRPC server: security and validation in front of a
:class:`~roost.deploy.protocol.Coordinator`.

:class:`DeployServicer` registers the six methods of ``roost.deploy.v1.Deploy`` without
serializers, so each handler sees the exact request bytes. For every request it, in order:
verifies the signature metadata (:class:`~roost.deploy.auth.Verifier`); for a unary
request checks the body's SHA-256 against the signed one; parses the message and its
``protocol_version``; checks that the body's node id is the signer's and that the node has
registered since the server started; checks task ownership in the
:class:`~roost.deploy.tasks.TaskTable`; decodes tensors strictly (the task's result spec,
the size caps, finite values); for a result stream checks the digest of every frame
received; and only then calls the coordinator. A refusal is answered with the
:class:`~roost.deploy.errors.WireError`'s status, its message, trailing metadata
``roost-refusal: KIND``, and one WARNING line on the ``roost.deploy`` logger; any other
exception (a coordinator bug) is logged with its traceback and answered INTERNAL. Either
way the server goes on serving.

:class:`DeployServer` runs it on a thread-pool ``grpc.server`` with the message limits set
explicitly (default 4 MiB both ways, gRPC's own default; the chunks it sends are 1 MiB,
those it asks nodes to send 64 KiB: see ``ServerConfig.upload_chunk_bytes``).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from roost.deploy._deps import missing_extra
from roost.deploy._proto import FRAME_OVERHEAD, METHODS, PROTOCOL_VERSION, SERVICE, pb
from roost.deploy.auth import BodyDigest, Caller, Verifier, body_digest
from roost.deploy.errors import (
    MalformedMessage,
    NonFinite,
    NotRegistered,
    PermissionDenied,
    WireError,
)
from roost.deploy.frames import (
    answer_frames,
    enum_member,
    no_task_frame,
    parse,
    read_metrics,
    read_settings,
    task_frames,
)
from roost.deploy.protocol import (
    Ack,
    Answer,
    Coordinator,
    Exchange,
    MidTaskRequest,
    NodeInfo,
    Registration,
    RequestKind,
    Result,
    WireStats,
)
from roost.deploy.tasks import TaskTable
from roost.deploy.tensors import DEFAULT_CHUNK_BYTES, Decoder, Limits
from roost.deploy.tls import ServerTls, server_credentials

try:
    import grpc
except ImportError as e:
    raise missing_extra("grpcio", e) from e

__all__ = ["METHODS", "DeployServer", "DeployServicer", "ServerConfig"]

log = logging.getLogger("roost.deploy")


@dataclass(frozen=True)
class ServerConfig:
    """Server limits and timings.

    Attributes:
        chunk_bytes: data per chunk frame the server sends.
        max_message_bytes: gRPC's receive and send limit for one message, set explicitly.
        max_result_bytes: the most tensor bytes one result may declare (refused before
            anything is allocated); also the cap for one result's buffers.
        max_tensors: the most entries one result's manifest may list.
        require_finite: refuse results with NaN or Inf in a floating-point tensor.
        heartbeat_interval_s: told to nodes at registration.
        retry_after_s: told to a node when there is no task for it.
        max_workers: threads of the gRPC server (each open RPC holds one).
        long_poll_s: how long a PullTask that finds no task may wait for one on the
            server (the node then asks again at once); at most half of ``max_workers``
            wait so, the other pulls are answered at once with ``retry_after_s``. 0: no
            waiting.
        max_receiving: how many results are received (read and decoded) at once; the
            other PushResults wait for a turn before they read anything, so the memory
            of results in reception is at most this many results, whatever the nodes.
        max_sending: how many tasks are streamed to nodes at once (the others wait for
            a turn before their first frame), for the same reason.
        tasks_per_node: how many of each node's last tasks the task table remembers
            (:class:`~roost.deploy.tasks.TaskTable`; a node works one task at a time).
        upload_chunk_bytes: the largest chunk the server asks nodes to send results and
            exchanges in (told at registration; a node sends at most this and its own
            ``chunk_bytes``). gRPC's TCP endpoint keeps, for every connection, read
            buffers about as large as the largest message it received on it, also while
            the connection is idle; with 1 MiB result chunks that was about 1 MiB per node
            in the server (plus the allocator's fragments), with smaller models as large
            as their one chunk. With 64 KiB chunks a plain gRPC server kept about 0.3 MB
            per connection (0.1 MB of it in use), whatever the model, for about the same
            CPU per byte received.

    gRPC's HTTP/2 flow-control windows are kept at their initial size (no BDP probing),
    so a call waiting for its turn buffers at most one window (64 KiB), not megabytes.
    """

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_message_bytes: int = 4 << 20
    max_result_bytes: int = 256 << 20
    max_tensors: int = 1024
    require_finite: bool = True
    heartbeat_interval_s: float = 10.0
    retry_after_s: float = 1.0
    max_workers: int = 64
    long_poll_s: float = 2.0
    max_receiving: int = 4
    max_sending: int = 8
    tasks_per_node: int = 16
    upload_chunk_bytes: int = 64 << 10

    def __post_init__(self) -> None:
        for name in ("chunk_bytes", "upload_chunk_bytes"):
            value = getattr(self, name)
            if not 1 <= value <= self.max_message_bytes - FRAME_OVERHEAD:
                raise ValueError(
                    f"{name} = {value} must be in 1 .. max_message_bytes - "
                    f"{FRAME_OVERHEAD} = {self.max_message_bytes - FRAME_OVERHEAD}"
                )
        if self.max_result_bytes < 0 or self.max_tensors < 1 or self.max_workers < 1:
            raise ValueError("max_result_bytes >= 0, max_tensors >= 1, max_workers >= 1 needed")
        if self.heartbeat_interval_s <= 0 or self.retry_after_s < 0:
            raise ValueError("heartbeat_interval_s must be > 0 and retry_after_s >= 0")


def _reply(ack: Ack, task_id: str) -> bytes:
    return pb.PushResultReply(
        protocol_version=PROTOCOL_VERSION,
        task_id=task_id,
        accepted=ack.accepted,
        duplicate=ack.duplicate,
        detail=ack.detail,
    ).SerializeToString()


def _stream_header(
    name: str, frame_type: Any, frames: Iterator[bytes], digest: BodyDigest
) -> tuple[Any, int]:
    """A client stream's header frame (hashed into ``digest``) and its size in bytes."""
    first = next(frames, None)
    if first is None:
        raise MalformedMessage(f"{name} stream with no frame")
    digest.update(first)
    frame = parse(frame_type, first)
    if frame.WhichOneof("frame") != "header":
        raise MalformedMessage(f"{name}'s first frame is not a header")
    return frame.header, len(first)


def _stream_body(
    name: str,
    frame_type: Any,
    frames: Iterator[bytes],
    digest: BodyDigest,
    decoder: Decoder,
    first_bytes: int,
) -> WireStats:
    """A client stream's chunk frames after its header, each hashed into ``digest`` and
    fed to ``decoder``; what the whole stream cost."""
    message_bytes, chunks = first_bytes, 0
    for raw in frames:
        digest.update(raw)
        message_bytes += len(raw)
        frame = parse(frame_type, raw)
        if frame.WhichOneof("frame") != "chunk":
            raise MalformedMessage(f"{name} frame after the header is not a chunk")
        decoder.add(frame.chunk)
        chunks += 1
    return WireStats(decoder.received_bytes, message_bytes, chunks)


class DeployServicer:
    """The handlers of ``roost.deploy.v1.Deploy`` (see the module docstring)."""

    def __init__(
        self, coordinator: Coordinator, verifier: Verifier, config: ServerConfig = ServerConfig()
    ) -> None:
        self.coordinator = coordinator
        self.verifier = verifier
        self.config = config
        self.tasks = TaskTable(config.tasks_per_node)
        self.nodes: dict[str, NodeInfo] = {}
        self._lock = threading.Lock()
        self._long_polls = threading.BoundedSemaphore(max(1, config.max_workers // 2))
        self._receiving = threading.BoundedSemaphore(max(1, config.max_receiving))
        self._sending = threading.BoundedSemaphore(max(1, config.max_sending))
        self.result_limits = Limits(
            max_total_bytes=config.max_result_bytes,
            max_tensors=config.max_tensors,
            max_chunk_bytes=config.max_message_bytes,
            require_finite=config.require_finite,
        )

    def handler(self) -> Any:
        """The ``grpc.GenericRpcHandler`` serving the six methods on raw bytes."""
        handlers = {
            "Register": grpc.unary_unary_rpc_method_handler(self._unary("Register", self.register)),
            "PullTask": grpc.unary_stream_rpc_method_handler(
                self._streaming("PullTask", self.pull_task)
            ),
            "PushResult": grpc.stream_unary_rpc_method_handler(
                self._unary("PushResult", self.push_result)
            ),
            "Request": grpc.unary_stream_rpc_method_handler(
                self._streaming("Request", self.request)
            ),
            "Exchange": grpc.stream_stream_rpc_method_handler(
                self._streaming("Exchange", self.exchange)
            ),
            "Heartbeat": grpc.unary_unary_rpc_method_handler(
                self._unary("Heartbeat", self.heartbeat)
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    # --- refusals ---------------------------------------------------------------------

    def _fail(self, name: str, context: Any, error: BaseException) -> None:
        """Log ``error`` and abort the call with its status (INTERNAL for a non-WireError)."""
        peer = context.peer()
        claimed = dict(context.invocation_metadata()).get("roost-node-id", "?")
        who = f"{peer} (claiming node {str(claimed)[:64]!r})"
        if isinstance(error, WireError):
            log.warning("refused %s from %s: %s %s: %s", name, who, error.code, error.kind, error)
            context.set_trailing_metadata((("roost-refusal", error.kind),))
            context.abort(error.grpc_code(), str(error))
        if not context.is_active():  # the client went away mid-call
            log.info("%s from %s ended by the client (%s)", name, who, type(error).__name__)
            return
        log.error("%s from %s failed inside the server", name, who, exc_info=error)
        context.abort(grpc.StatusCode.INTERNAL, f"server error: {type(error).__name__}: {error}")

    def _unary(self, name: str, fn: Callable[[Any, Any], bytes]) -> Callable[[Any, Any], bytes]:
        def handle(request: Any, context: Any) -> bytes:
            try:
                return fn(request, context)
            except Exception as e:
                self._fail(name, context, e)
                return b""

        return handle

    def _streaming(
        self, name: str, fn: Callable[[Any, Any], Iterator[bytes]]
    ) -> Callable[[Any, Any], Iterator[bytes]]:
        def handle(request: Any, context: Any) -> Iterator[bytes]:
            try:
                yield from fn(request, context)
            except Exception as e:
                self._fail(name, context, e)

        return handle

    # --- checks shared by the handlers --------------------------------------------------

    def _caller(self, name: str, context: Any, body: bytes | None) -> Caller:
        """The authenticated caller; for a unary request (``body``) also its body digest."""
        caller = self.verifier.verify(METHODS[name], context.invocation_metadata())
        if body is not None:
            self.verifier.check_body(caller, body_digest([body]))
        return caller

    def _check_node(self, caller: Caller, node_id: str) -> None:
        if node_id != caller.node_id:
            raise PermissionDenied(
                f"node {caller.node_id!r} sent a message for node {node_id[:64]!r}"
            )
        with self._lock:
            known = self.nodes.get(node_id)
        if known is None or known.public_key != caller.public_key:
            raise NotRegistered(f"node {node_id!r} has not registered with this server; register")

    # --- the six methods ----------------------------------------------------------------

    def register(self, raw: bytes, context: Any) -> bytes:
        caller = self._caller("Register", context, raw)
        req = parse(pb.RegisterRequest, raw)
        if req.node_id != caller.node_id or req.public_key != caller.public_key:
            raise PermissionDenied(
                f"node {caller.node_id!r} may register only itself with its own key"
            )
        node = NodeInfo(
            caller.node_id,
            caller.public_key,
            req.num_examples,
            read_settings(req.properties, "properties"),
        )
        registration = self.coordinator.register(node) or Registration()
        with self._lock:
            self.nodes[node.node_id] = node
        log.info(
            "node %r registered (%d examples), client %d",
            node.node_id,
            node.num_examples,
            registration.client_id,
        )
        cfg = self.config
        return pb.RegisterReply(
            protocol_version=PROTOCOL_VERSION,
            heartbeat_interval_ms=round(cfg.heartbeat_interval_s * 1000),
            max_message_bytes=cfg.max_message_bytes,
            chunk_bytes=cfg.chunk_bytes,
            client_id=registration.client_id,
            run_config_json=registration.run_config,
            upload_chunk_bytes=cfg.upload_chunk_bytes,
        ).SerializeToString()

    def pull_task(self, raw: bytes, context: Any) -> Iterator[bytes]:
        caller = self._caller("PullTask", context, raw)
        req = parse(pb.PullTaskRequest, raw)
        self._check_node(caller, req.node_id)
        waited = self.config.long_poll_s > 0 and self._long_polls.acquire(blocking=False)
        try:
            wait_s = self.config.long_poll_s if waited else 0.0
            spec = self.coordinator.next_task(caller.node_id, wait_s)
        finally:
            if waited:
                self._long_polls.release()
        if spec is None:  # after a wait on the server, ask again at once
            retry = 0.0 if waited else self.config.retry_after_s
            yield no_task_frame(retry, self.coordinator.finished())
            return
        frames = task_frames(spec, self.config.chunk_bytes)  # checks the spec first
        self.tasks.give(spec.task_id, caller.node_id, spec.result_spec)
        with self._sending:  # a bounded number of models in transit at once
            yield from frames

    def push_result(self, request_iterator: Iterator[bytes], context: Any) -> bytes:
        with self._receiving:  # a bounded number of results in memory at once
            return self._push_result(request_iterator, context)

    def _push_result(self, request_iterator: Iterator[bytes], context: Any) -> bytes:
        caller = self._caller("PushResult", context, None)
        digest = BodyDigest()
        frames = iter(request_iterator)
        h, first_bytes = _stream_header("PushResult", pb.ResultFrame, frames, digest)
        self._check_node(caller, h.node_id)
        node_id, task_id = caller.node_id, h.task_id
        duplicate = self.tasks.peek(node_id, task_id, caller.body_sha256)
        if duplicate is not None:
            log.info("duplicate result of task %r from %r acknowledged", task_id, node_id)
            return _reply(duplicate, task_id)
        if not math.isfinite(h.weight):
            raise NonFinite(f"result weight is {h.weight}; it must be finite")
        if h.weight < 0:
            raise MalformedMessage(f"result weight is {h.weight}; it must be >= 0")
        metrics = read_metrics(h.metrics)
        decoder = Decoder(h.result, self.result_limits, self.tasks.result_spec(node_id, task_id))
        wire = _stream_body("PushResult", pb.ResultFrame, frames, digest, decoder, first_bytes)
        self.verifier.check_body(caller, digest.hexdigest())
        result = Result(task_id, decoder.finish(), h.weight, metrics, wire)
        duplicate = self.tasks.begin_delivery(node_id, task_id, caller.body_sha256)
        if duplicate is not None:
            return _reply(duplicate, task_id)
        try:
            ack = self.coordinator.accept_result(node_id, result)
        except BaseException:
            self.tasks.abort_delivery(task_id)
            raise
        self.tasks.finish_delivery(task_id, ack)
        return _reply(ack, task_id)

    def request(self, raw: bytes, context: Any) -> Iterator[bytes]:
        caller = self._caller("Request", context, raw)
        req = parse(pb.MidTaskRequest, raw)
        self._check_node(caller, req.node_id)
        kind = enum_member(RequestKind, req.kind, "request kind")
        self.tasks.check_active(caller.node_id, req.task_id)
        answer = self.coordinator.answer_request(caller.node_id, MidTaskRequest(req.task_id, kind))
        yield from answer_frames(req.task_id, kind, answer, self.config.chunk_bytes)

    def exchange(self, request_iterator: Iterator[bytes], context: Any) -> Iterator[bytes]:
        with self._receiving:  # a bounded number of messages in memory at once
            answer, task_id, kind = self._exchange(request_iterator, context)
        yield from answer_frames(task_id, kind, answer, self.config.chunk_bytes)

    def _exchange(
        self, request_iterator: Iterator[bytes], context: Any
    ) -> tuple[Answer, str, RequestKind]:
        caller = self._caller("Exchange", context, None)
        digest = BodyDigest()
        frames = iter(request_iterator)
        h, first_bytes = _stream_header("Exchange", pb.ExchangeFrame, frames, digest)
        self._check_node(caller, h.node_id)
        kind = enum_member(RequestKind, h.kind, "request kind")
        if kind is not RequestKind.SPLIT_ACTIVATIONS:
            raise MalformedMessage(
                f"an Exchange is of kind {RequestKind.SPLIT_ACTIVATIONS.value} "
                f"(SPLIT_ACTIVATIONS), not {kind.value} ({kind.name})"
            )
        node_id, task_id = caller.node_id, h.task_id
        self.tasks.check_active(node_id, task_id)
        fields = read_settings(h.fields, "fields")
        spec = self.coordinator.exchange_spec(node_id, task_id, kind, fields)
        decoder = Decoder(h.payload, self.result_limits, spec)
        wire = _stream_body("Exchange", pb.ExchangeFrame, frames, digest, decoder, first_bytes)
        self.verifier.check_body(caller, digest.hexdigest())
        exchange = Exchange(task_id, kind, fields, decoder.finish(), caller.body_sha256, wire)
        return self.coordinator.exchange(node_id, exchange), task_id, kind

    def heartbeat(self, raw: bytes, context: Any) -> bytes:
        caller = self._caller("Heartbeat", context, raw)
        req = parse(pb.HeartbeatRequest, raw)
        self._check_node(caller, req.node_id)
        if req.task_id:
            self.tasks.check_active(caller.node_id, req.task_id)
        go_on = self.coordinator.heartbeat(caller.node_id, req.task_id or None)
        return pb.HeartbeatReply(
            protocol_version=PROTOCOL_VERSION, continue_task=bool(go_on)
        ).SerializeToString()


class DeployServer:
    """A :class:`DeployServicer` on a thread-pool ``grpc.server`` bound to ``address``.

    Plaintext is refused on a non-loopback address unless ``insecure`` (see
    :mod:`roost.deploy.tls`); that check runs before anything is bound. ``port`` is the bound
    port (useful with port 0). Use as a context manager, or :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        verifier: Verifier,
        *,
        address: str = "127.0.0.1:0",
        tls: ServerTls | None = None,
        insecure: bool = False,
        config: ServerConfig = ServerConfig(),
    ) -> None:
        credentials = server_credentials(address, tls, insecure=insecure)
        self.servicer = DeployServicer(coordinator, verifier, config)
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="roost-deploy"),
            handlers=[self.servicer.handler()],
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),
                ("grpc.http2.bdp_probe", 0),  # windows stay 64 KiB: see ServerConfig
            ],
        )
        try:
            if credentials is None:
                port = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, credentials)
        except RuntimeError as e:
            raise OSError(f"cannot bind the server to {address}: {e}") from e
        if not port:
            raise OSError(f"cannot bind the server to {address}")
        self.port: int = port
        self.host = address.rsplit(":", 1)[0]
        self.tls = credentials is not None

    @property
    def address(self) -> str:
        """``HOST:PORT`` with the bound port."""
        return f"{self.host}:{self.port}"

    def start(self) -> DeployServer:
        self._server.start()
        log.info("serving %s on %s (%s)", SERVICE, self.address, "TLS" if self.tls else "plaintext")
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting calls, end open ones after ``grace_s`` (None: at once), and wait."""
        self._server.stop(grace_s).wait()

    def __enter__(self) -> DeployServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
