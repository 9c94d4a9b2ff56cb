"""The node side: :class:`NodeClient` connects, registers, pulls tasks, pushes results, sends
mid-task requests and heartbeats, signing every request with the node's key.

Every call retries, after a :class:`~roost.deploy.backoff.Backoff` delay, when the server
is unreachable (UNAVAILABLE), too slow (DEADLINE_EXCEEDED) or overloaded (the
``Overloaded`` refusal), re-signing each attempt (fresh timestamp and nonce); when the
delays run out it raises :class:`Unreachable`. A failed TLS handshake is not retried (the
certificates will not change between attempts): it raises :class:`TlsFailure` at once,
saying what to check (see ``TLS_FAILED`` and ``CLOSED_AT_CONNECT`` for how it is told
apart from a server that is down, which is retried). When the server answers
``NotRegistered`` (it restarted and forgot the node) the client registers again and
repeats the call once. Any other refusal raises :class:`RemoteRefusal` with the gRPC
status, the refusal kind and the server's message. A call that has to register first names
both in its errors and log lines ("Register (before Heartbeat): ..."). Retrying a
PushResult is safe: the server acknowledges a resubmitted identical result as a duplicate
and delivers it once. A PullTask whose stream broke is not resumed; the next pull asks for
new work (the task given is the engine's to time out).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from roost.deploy._deps import missing_extra
from roost.deploy._proto import FRAME_OVERHEAD, METHODS, PROTOCOL_VERSION, pb
from roost.deploy.auth import NodeKey, Signer, body_digest
from roost.deploy.backoff import Backoff
from roost.deploy.frames import (
    ExchangeStream,
    ResultStream,
    parse,
    put_settings,
    read_answer,
    read_task,
)
from roost.deploy.protocol import (
    Ack,
    Answer,
    Exchange,
    NoWork,
    RequestKind,
    Result,
    SettingValue,
    Task,
)
from roost.deploy.tensors import DEFAULT_CHUNK_BYTES, Limits
from roost.deploy.tls import ClientTls, channel_credentials, host_of

try:
    import grpc
except ImportError as e:
    raise missing_extra("grpcio", e) from e

__all__ = [
    "ClientConfig",
    "NodeClient",
    "RemoteRefusal",
    "ServerInfo",
    "TlsFailure",
    "Unreachable",
]

log = logging.getLogger("roost.deploy")
T = TypeVar("T")


class RemoteRefusal(Exception):
    """The server refused a call: ``code`` (a ``grpc.StatusCode`` name), ``kind`` (the
    ``roost-refusal`` name such as ``"StaleTimestamp"``, empty if the server sent none) and
    ``details`` (its message)."""

    def __init__(self, code: str, kind: str, details: str) -> None:
        super().__init__(f"{code} {kind}: {details}" if kind else f"{code}: {details}")
        self.code, self.kind, self.details = code, kind, details


class Unreachable(ConnectionError):
    """The server did not answer within the client's backoff schedule."""


class TlsFailure(Unreachable):
    """The TLS handshake with the server failed: the node does not trust the server's
    certificate, the certificate does not name the address's host, or the server refused
    the node (no client certificate, or one its client CA did not sign, under mutual TLS;
    a plaintext node talking to a TLS server). Raised at the first attempt, not retried."""


@dataclass(frozen=True)
class ClientConfig:
    """A node's limits and timings.

    Attributes:
        chunk_bytes: data per chunk frame the node sends at most (a server may ask for
            less: :attr:`ServerInfo.upload_chunk_bytes`).
        max_message_bytes: gRPC's receive and send limit for one message, set explicitly.
        max_payload_bytes: the most tensor bytes a task payload or an answer may declare.
        timeout_s: deadline of one call (one attempt).
        backoff: delays between attempts.
    """

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_message_bytes: int = 4 << 20
    max_payload_bytes: int = 256 << 20
    timeout_s: float = 120.0
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_bytes <= self.max_message_bytes - FRAME_OVERHEAD:
            raise ValueError(
                f"chunk_bytes = {self.chunk_bytes} must be in 1 .. max_message_bytes - "
                f"{FRAME_OVERHEAD}"
            )


@dataclass(frozen=True)
class ServerInfo:
    """What the server said at registration."""

    heartbeat_interval_s: float
    max_message_bytes: int
    chunk_bytes: int
    client_id: int = 0
    """The client id this node holds in the run."""
    run_config: str = ""
    """The run's resolved config as JSON ("" when the server gave none)."""
    upload_chunk_bytes: int = 0
    """The largest chunk the server asks results and exchanges in (0: no request)."""


RETRIED = ("UNAVAILABLE", "DEADLINE_EXCEEDED")

TLS_FAILED = (
    # what gRPC (1.85) puts in the UNAVAILABLE details when the client's side of the
    # handshake fails: "failed to connect to all addresses; last error: UNKNOWN:
    # ipv4:127.0.0.1:PORT: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: ..."
    # (a CA that did not sign the server's certificate, a plaintext server); older gRPC
    # said "Ssl handshake failed: ... CERTIFICATE_VERIFY_FAILED"
    "handshake failed",
    "certificate verify failed",
    "certificate_verify_failed",
    # the server's certificate does not name the host (or ClientTls.server_name): "Custom
    # verification check failed with error: UNAUTHENTICATED: Hostname Verification Check
    # failed."; older gRPC: "Peer name NAME is not in peer certificate"
    "hostname verification check failed",
    "is not in peer certificate",
)
"""Substrings (lower case) of an UNAVAILABLE status's details that mean the TLS handshake
failed."""

CLOSED_AT_CONNECT = ("socket closed", "connection reset by peer")
"""One of these with "failed to connect" in the details: the server accepted the TCP
connection and closed it before the HTTP/2 connection was set up ("failed to connect to all
addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:PORT: Socket closed", or "recvmsg:
Connection reset by peer (104)" when the close caught bytes the client had sent unread).
That is all a node learns when a mutual-TLS server refuses its certificate (or its lack of
one: with TLS 1.3 the client's side of the handshake is done before the server checks) and
when it talks plaintext to a TLS server. A proxy whose server is down can do the same, so it
counts as a TLS failure only until the client has reached the server once; after that it is
retried like any UNAVAILABLE. (A server that is down refuses the connection: "Failed to
connect to remote host: Connection refused", always retried.)"""


def _refusal(error: Any) -> RemoteRefusal:
    kind = ""
    for key, value in error.trailing_metadata() or ():
        if key == "roost-refusal":
            kind = value
    return RemoteRefusal(error.code().name, kind, error.details() or "")


class NodeClient:
    """One node's connection to the server at ``address`` (``HOST:PORT``).

    Plaintext only on loopback unless ``insecure``; with ``tls`` the channel verifies the
    server's certificate (and presents the node's for mutual TLS). The channel connects
    lazily; the first call (or :meth:`register`) reaches the server.
    """

    def __init__(
        self,
        address: str,
        key: NodeKey,
        *,
        tls: ClientTls | None = None,
        insecure: bool = False,
        num_examples: int = 0,
        properties: Mapping[str, SettingValue] | None = None,
        config: ClientConfig | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        credentials = channel_credentials(address, tls, insecure=insecure)
        self.config = config or ClientConfig()
        backoff = self.config.backoff
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            # gRPC's own reconnection timer (default 1 s growing to 120 s) follows ours, so
            # a retry after the server came back does not wait for it
            ("grpc.initial_reconnect_backoff_ms", max(1, round(backoff.initial_s * 1000))),
            ("grpc.min_reconnect_backoff_ms", max(1, round(backoff.initial_s * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, round(backoff.max_s * 1000))),
        ]
        if tls is not None and tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self.address = address
        self.key = key
        self._tls = tls
        self._reached = False  # has any call got through to the server?
        self.num_examples = num_examples
        self.properties = dict(properties or {})
        self._signer = Signer(key, clock)
        self._rng = rng or random.Random()
        self._limits = Limits(max_total_bytes=self.config.max_payload_bytes)
        self._call = {
            "Register": self._channel.unary_unary(METHODS["Register"]),
            "PullTask": self._channel.unary_stream(METHODS["PullTask"]),
            "PushResult": self._channel.stream_unary(METHODS["PushResult"]),
            "Request": self._channel.unary_stream(METHODS["Request"]),
            "Exchange": self._channel.stream_stream(METHODS["Exchange"]),
            "Heartbeat": self._channel.unary_unary(METHODS["Heartbeat"]),
        }
        self.server: ServerInfo | None = None
        self.retry_after_s = 0.0
        """After :meth:`pull_task` returned None: how long the server asked the node to wait."""
        self.finished = False
        """After :meth:`pull_task` returned None: True if the server said the run is over."""

    @property
    def node_id(self) -> str:
        return self.key.node_id

    # --- plumbing -----------------------------------------------------------------------

    def _unary(self, name: str, message: Any) -> bytes:
        raw = message.SerializeToString()
        metadata = self._signer.metadata(METHODS[name], body_digest([raw]))
        reply: bytes = self._call[name](raw, metadata=metadata, timeout=self.config.timeout_s)
        return reply

    def _stream(self, name: str, message: Any) -> Iterator[bytes]:
        raw = message.SerializeToString()
        metadata = self._signer.metadata(METHODS[name], body_digest([raw]))
        frames: Iterator[bytes] = self._call[name](
            raw, metadata=metadata, timeout=self.config.timeout_s
        )
        return frames

    def _tls_failure(self, refusal: RemoteRefusal) -> bool:
        """Whether ``refusal`` says the TLS handshake failed (see TLS_FAILED and
        CLOSED_AT_CONNECT)."""
        if refusal.code != "UNAVAILABLE":
            return False
        details = refusal.details.lower()
        if any(s in details for s in TLS_FAILED):
            return True
        if self._reached or "failed to connect" not in details:
            return False
        return any(s in details for s in CLOSED_AT_CONNECT)

    def _tls_message(self, phase: str, refusal: RemoteRefusal) -> str:
        if self._tls is None:
            return (
                f"{phase}: the server {self.address} closed the connection before any gRPC "
                f"was exchanged ({refusal}), as a TLS server does to a plaintext client: this "
                "node connects without TLS, so there was no TLS handshake. If the server uses "
                "TLS, drop --plaintext and give the node the CA that signed the server's "
                "certificate (roost node --ca, default: ca.pem of its roost keys directory)"
            )
        host = self._tls.server_name or host_of(self.address)
        return (
            f"{phase}: the TLS handshake with the server {self.address} failed ({refusal}). "
            "Check that the CA given with --ca is the one that signed the server's "
            f"certificate, that {host!r} is one of the names in the server's certificate "
            "(roost keys --host adds one), and, under mutual TLS (roost serve --mutual-tls), "
            "that the node presents its client certificate, signed by the server's CA "
            "(roost node --mutual-tls)"
        )

    def _retrying(self, what: str, attempt: Callable[[], T], *, registered: bool = True) -> T:
        delays = self.config.backoff.delays(self._rng)
        registered_again = False
        while True:
            phase = what
            try:
                if registered and self.server is None:
                    phase = f"Register (before {what})"
                    self._register()
                    phase = what
                got = attempt()
            except grpc.RpcError as e:
                refusal = _refusal(e)
            else:
                self._reached = True
                return got
            if refusal.kind:  # a roost refusal: the server answered
                self._reached = True
            if refusal.kind == "NotRegistered" and registered and not registered_again:
                self.server, registered_again = None, True
                continue
            if self._tls_failure(refusal):
                raise TlsFailure(self._tls_message(phase, refusal)) from None
            if refusal.code in RETRIED or refusal.kind == "Overloaded":
                delay = next(delays, None)
                if delay is None:
                    raise Unreachable(
                        f"{phase}: server {self.address} unreachable after retries ({refusal})"
                    ) from None
                log.info("%s: %s; retrying in %.3f s", phase, refusal, delay)
                time.sleep(delay)
                continue
            raise refusal

    def _register(self) -> None:
        req = pb.RegisterRequest(
            protocol_version=PROTOCOL_VERSION,
            node_id=self.node_id,
            public_key=self.key.public_bytes,
            num_examples=self.num_examples,
        )
        put_settings(req.properties, self.properties)
        reply = parse(pb.RegisterReply, self._unary("Register", req))
        self.server = ServerInfo(
            reply.heartbeat_interval_ms / 1000,
            reply.max_message_bytes,
            reply.chunk_bytes,
            reply.client_id,
            reply.run_config_json,
            reply.upload_chunk_bytes,
        )
        self._reached = True

    @property
    def upload_chunk_bytes(self) -> int:
        """The data per chunk frame of this node's results and exchanges: its own
        ``chunk_bytes``, or less if the server asked so at registration (a server keeps
        gRPC's per-connection read buffers small that way)."""
        asked = self.server.upload_chunk_bytes if self.server is not None else 0
        return min(self.config.chunk_bytes, asked) if asked > 0 else self.config.chunk_bytes

    # --- the calls ----------------------------------------------------------------------

    def register(self) -> ServerInfo:
        """Register (again) with the server; returns what it said."""
        self._retrying("Register", self._register, registered=False)
        assert self.server is not None
        return self.server

    def pull_task(self) -> Task | None:
        """The next task, or None when the server has none (then see ``retry_after_s``)."""

        def attempt() -> Task | NoWork:
            req = pb.PullTaskRequest(protocol_version=PROTOCOL_VERSION, node_id=self.node_id)
            return read_task(self._stream("PullTask", req), self._limits)

        got = self._retrying("PullTask", attempt)
        if isinstance(got, NoWork):
            self.retry_after_s, self.finished = got.retry_after_s, got.finished
            return None
        return got

    def push_result(self, result: Result) -> Ack:
        """Send ``result``; the server's Ack (``duplicate`` if it had this result already)."""
        stream = ResultStream(self.node_id, result, self.upload_chunk_bytes)
        digest = body_digest(stream)  # first pass: the signature covers every frame

        def attempt() -> Ack:
            metadata = self._signer.metadata(METHODS["PushResult"], digest)
            raw = self._call["PushResult"](
                iter(stream), metadata=metadata, timeout=self.config.timeout_s
            )
            reply = parse(pb.PushResultReply, raw)
            return Ack(reply.accepted, reply.detail, reply.duplicate)

        return self._retrying("PushResult", attempt)

    def request(self, task_id: str, kind: RequestKind = RequestKind.FETCH_MODEL) -> Answer:
        """A mid-task request for ``task_id``; the server's answer."""

        def attempt() -> Answer:
            req = pb.MidTaskRequest(
                protocol_version=PROTOCOL_VERSION,
                node_id=self.node_id,
                task_id=task_id,
                kind=f"REQUEST_KIND_{kind.name}",
            )
            return read_answer(self._stream("Request", req), self._limits)

        return self._retrying("Request", attempt)

    def exchange(self, exchange: Exchange) -> Answer:
        """Send a mid-task message with tensors (split learning's activations); the
        server's answer. A retry after a lost answer resends the same bytes, which the
        server answers as the first time."""
        stream = ExchangeStream(self.node_id, exchange, self.upload_chunk_bytes)
        digest = body_digest(stream)

        def attempt() -> Answer:
            metadata = self._signer.metadata(METHODS["Exchange"], digest)
            frames = self._call["Exchange"](
                iter(stream), metadata=metadata, timeout=self.config.timeout_s
            )
            return read_answer(frames, self._limits)

        return self._retrying("Exchange", attempt)

    def heartbeat(self, task_id: str | None = None) -> bool:
        """Tell the server the node is alive (working on ``task_id``); False means the
        server no longer wants that task's result."""

        def attempt() -> bool:
            req = pb.HeartbeatRequest(
                protocol_version=PROTOCOL_VERSION, node_id=self.node_id, task_id=task_id or ""
            )
            return bool(parse(pb.HeartbeatReply, self._unary("Heartbeat", req)).continue_task)

        return self._retrying("Heartbeat", attempt)

    @contextlib.contextmanager
    def keep_alive(
        self, task_id: str, interval_s: float | None = None
    ) -> Iterator[threading.Event]:
        """Heartbeat for ``task_id`` every ``interval_s`` (default: the server's interval) on a
        background thread while the block runs. The Event yielded is set if the server says
        to drop the task; a heartbeat that fails (after its retries) is logged and skipped."""
        if interval_s is None:
            interval_s = (self.server or self.register()).heartbeat_interval_s
        drop, done = threading.Event(), threading.Event()

        def beat() -> None:
            while not done.wait(interval_s):
                try:
                    if not self.heartbeat(task_id):
                        drop.set()
                except (RemoteRefusal, Unreachable) as e:
                    log.warning("heartbeat for task %r failed: %s", task_id, e)

        thread = threading.Thread(target=beat, name=f"heartbeat-{task_id}", daemon=True)
        thread.start()
        try:
            yield drop
        finally:
            done.set()
            thread.join()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
