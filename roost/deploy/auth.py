"""Node authentication: one Ed25519 key pair per node, an allow-list on the server, and a
signature over every request's content.

Why Ed25519 (not ECDSA P-256, nor Flower's P-384): signatures are deterministic, so a
device with a weak random source cannot leak its key through a repeated signing nonce as
ECDSA can; keys are 32 bytes and signatures 64; signing and verifying take tens of
microseconds; there are no curve or hash parameters to get wrong. The cost: some hardware
key stores of older devices support only NIST curves, and FIPS 186-5 approved Ed25519 only
in 2023.

**What is signed.** Each request carries, in gRPC metadata:

=====================  ======================================================
``roost-node-id``       the node's id (its allow-list entry's name)
``roost-public-key``    its raw 32-byte public key, base64
``roost-timestamp-ms``  milliseconds since the Unix epoch, on the node's clock
``roost-nonce``         16 random bytes, hex
``roost-body-sha256``   :class:`BodyDigest` of the exact request bytes, hex
``roost-signature``     Ed25519 signature of :func:`signed_content`, base64
=====================  ======================================================

:func:`signed_content` binds the scheme (``roost-deploy-v1``), the full gRPC method name
(so a Heartbeat's signature cannot be replayed as a Register), the node id, timestamp,
nonce and body digest. The body digest is SHA-256 over every message of the request, each
preceded by its length as 8 bytes big-endian: one message for a unary request, every frame
of a client stream (PushResult) in order. The node knows its whole result before it sends,
so it computes the digest first and sends the stream after; one signature, checked before
the server reads any frame, thus covers every chunk, and the server compares the digest of
what arrived before anything reaches the application. The trade-off: the node hashes its
result twice (once to sign, once as it streams) and the server can tell a tampered stream
only at its end (it has buffered it, within its size cap, but delivered nothing).

**What the server refuses** (:meth:`Verifier.verify`, then :meth:`Verifier.check_body`), in
this order: missing or malformed metadata (:class:`~roost.deploy.errors.Unsigned`); a key
not on the allow-list, or a node id other than the key's allow-list name
(:class:`~roost.deploy.errors.UnknownKey`, PERMISSION_DENIED); a timestamp more than
``window_s`` (default 60 s) from the server's clock (StaleTimestamp); a signature that does
not verify (BadSignature); a (node, nonce) pair already seen within the window
(ReplayedNonce); a body whose digest is not the signed one (TamperedBody). All but
UnknownKey are UNAUTHENTICATED. Nonces are remembered until their timestamp leaves the
window, in a cache of at most ``replay_capacity`` entries; when it is full of live entries
new requests are refused (Overloaded, RESOURCE_EXHAUSTED) rather than a nonce forgotten.
Only requests whose signature verified are remembered, so unauthenticated traffic cannot
fill it. Logging each refusal is the server's job (:mod:`roost.deploy.server`).

Compared with Flower's SuperNode authentication (an allow-list of EC public keys, each
request signed over a timestamp), this also signs the request's content, method and a
nonce, so a captured request can neither be altered nor replayed within the window.

**Allow-list file.** One node per line, OpenSSH ``authorized_keys`` style with the node id
as the comment: ``ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI... node-0``. Blank lines and lines
starting with ``#`` are ignored; any other line that is not an Ed25519 key with a node id,
a repeated node id or a repeated key is an error naming the line. Node ids are 1 to 64
characters of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import re
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from roost.deploy._deps import missing_extra
from roost.deploy.errors import (
    BadSignature,
    Overloaded,
    ReplayedNonce,
    StaleTimestamp,
    TamperedBody,
    UnknownKey,
    Unsigned,
)

try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
except ImportError as e:
    raise missing_extra("cryptography", e) from e

__all__ = [
    "AllowList",
    "BodyDigest",
    "Caller",
    "NodeKey",
    "ReplayCache",
    "Signer",
    "Verifier",
    "body_digest",
    "check_node_id",
    "signed_content",
]

SCHEME = "roost-deploy-v1"
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NONCE = re.compile(r"[0-9a-f]{32}")
DIGEST = re.compile(r"[0-9a-f]{64}")
KEYS = (
    "roost-node-id",
    "roost-public-key",
    "roost-timestamp-ms",
    "roost-nonce",
    "roost-body-sha256",
    "roost-signature",
)


def check_node_id(node_id: str) -> str:
    """``node_id`` if it is a valid node id, else ValueError saying what is allowed."""
    if not NODE_ID.fullmatch(node_id):
        raise ValueError(
            f"node id {node_id!r} must be 1 to 64 characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return node_id


class BodyDigest:
    """SHA-256 over a sequence of messages, each preceded by its 8-byte big-endian length."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, message: bytes) -> None:
        self._h.update(struct.pack(">Q", len(message)))
        self._h.update(message)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def body_digest(messages: Iterable[bytes]) -> str:
    """:class:`BodyDigest` of ``messages``, hex."""
    d = BodyDigest()
    for m in messages:
        d.update(m)
    return d.hexdigest()


def signed_content(method: str, node_id: str, timestamp_ms: int, nonce: str, digest: str) -> bytes:
    """The exact bytes a node signs: the scheme and the five fields, one per line."""
    return "\n".join((SCHEME, method, node_id, str(timestamp_ms), nonce, digest)).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class NodeKey:
    """A node's identity: its id and Ed25519 private key."""

    node_id: str
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls, node_id: str) -> NodeKey:
        return cls(check_node_id(node_id), Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, node_dir: str | Path) -> NodeKey:
        """Read ``node.key`` (PEM, PKCS #8) and ``node.pub`` (its OpenSSH public key line,
        whose comment is the node id) from ``node_dir``, as written by ``roost keys``."""
        node_dir = Path(node_dir)
        key = serialization.load_pem_private_key((node_dir / "node.key").read_bytes(), None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{node_dir / 'node.key'} is not an Ed25519 private key")
        entries = AllowList.parse((node_dir / "node.pub").read_text(), str(node_dir / "node.pub"))
        if len(entries.nodes) != 1:
            raise ValueError(f"{node_dir / 'node.pub'} must hold exactly one key")
        (node_id,) = entries.nodes
        node = cls(node_id, key)
        if entries.key_of(node_id) != node.public_bytes:
            raise ValueError(f"{node_dir}: node.pub is not the public key of node.key")
        return node

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def public_line(self) -> str:
        """This node's allow-list line: ``ssh-ed25519 BASE64 NODE_ID``."""
        return AllowList.line(self.node_id, self.public_bytes)

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


class AllowList:
    """The server's allowed nodes: node id <-> raw Ed25519 public key (file format above)."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        self._keys = {check_node_id(n): bytes(k) for n, k in keys.items()}
        self._nodes = {k: n for n, k in self._keys.items()}
        if len(self._nodes) != len(self._keys):
            raise ValueError("two node ids share one public key")

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def key_of(self, node_id: str) -> bytes | None:
        return self._keys.get(node_id)

    def node_of(self, public_key: bytes) -> str | None:
        return self._nodes.get(public_key)

    @staticmethod
    def line(node_id: str, public_key: bytes) -> str:
        key = Ed25519PublicKey.from_public_bytes(public_key)
        ssh = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        return f"{ssh.decode()} {check_node_id(node_id)}"

    def text(self) -> str:
        """The allow-list file's content."""
        return "".join(self.line(n, k) + "\n" for n, k in self._keys.items())

    @classmethod
    def parse(cls, text: str, source: str = "allow-list") -> AllowList:
        keys: dict[str, bytes] = {}
        seen: set[bytes] = set()
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{source}:{number}"
            parts = line.split()
            if len(parts) != 3 or parts[0] != "ssh-ed25519":
                raise ValueError(
                    f"{where}: expected 'ssh-ed25519 BASE64 NODE_ID', got {line[:60]!r}"
                )
            try:
                key = serialization.load_ssh_public_key(f"{parts[0]} {parts[1]}".encode())
            except (ValueError, TypeError) as e:
                raise ValueError(f"{where}: not an OpenSSH public key ({e})") from e
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError(f"{where}: not an Ed25519 key")
            raw_key = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            try:
                node_id = check_node_id(parts[2])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e
            if node_id in keys:
                raise ValueError(f"{where}: node id {node_id!r} is listed twice")
            if raw_key in seen:
                raise ValueError(f"{where}: this key is already listed for another node")
            keys[node_id] = raw_key
            seen.add(raw_key)
        return cls(keys)

    @classmethod
    def load(cls, path: str | Path) -> AllowList:
        return cls.parse(Path(path).read_text(), str(path))


class Signer:
    """Signs a node's requests: :meth:`metadata` is the gRPC metadata to send."""

    def __init__(self, key: NodeKey, clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self.clock = clock
        self._public = _b64(key.public_bytes)

    def metadata(
        self,
        method: str,
        digest: str,
        *,
        timestamp_ms: int | None = None,
        nonce: str | None = None,
    ) -> tuple[tuple[str, str], ...]:
        """Metadata for one request to ``method`` whose body has :class:`BodyDigest`
        ``digest``; ``timestamp_ms`` and ``nonce`` default to now and 16 fresh random bytes."""
        ts = int(self.clock() * 1000) if timestamp_ms is None else timestamp_ms
        nonce = secrets.token_hex(16) if nonce is None else nonce
        node_id = self.key.node_id
        signature = self.key.private_key.sign(signed_content(method, node_id, ts, nonce, digest))
        values = (node_id, self._public, str(ts), nonce, digest, _b64(signature))
        return tuple(zip(KEYS, values, strict=True))


class ReplayCache:
    """The (node id, nonce) pairs seen, each until its expiry (ms); bounded in size."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"replay cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._expiry: dict[tuple[str, str], int] = {}
        self._heap: list[tuple[int, tuple[str, str]]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._expiry)

    def record(self, node_id: str, nonce: str, expires_ms: int, now_ms: int) -> None:
        """Remember the pair until ``expires_ms``; ReplayedNonce if it is remembered already,
        Overloaded if the cache is full of unexpired pairs."""
        key = (node_id, nonce)
        with self._lock:
            while self._heap and self._heap[0][0] < now_ms:
                _, old = heapq.heappop(self._heap)
                self._expiry.pop(old, None)
            if key in self._expiry:
                raise ReplayedNonce(f"nonce {nonce} of node {node_id!r} was already used")
            if len(self._expiry) >= self.capacity:
                raise Overloaded(
                    f"the replay cache holds {self.capacity} live nonces; retry in a few seconds"
                )
            self._expiry[key] = expires_ms
            heapq.heappush(self._heap, (expires_ms, key))


@dataclass(frozen=True)
class Caller:
    """An authenticated request's sender and the body digest it signed."""

    node_id: str
    public_key: bytes
    body_sha256: str


class Verifier:
    """Checks a request's signature metadata against the allow-list (see the module doc)."""

    def __init__(
        self,
        allow_list: AllowList,
        *,
        window_s: float = 60.0,
        replay_capacity: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.allow_list = allow_list
        self.window_ms = int(window_s * 1000)
        self.clock = clock
        self.replay = ReplayCache(replay_capacity)

    def verify(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> Caller:
        """The authenticated caller of ``method`` (the server's own name for the method being
        served), or the refusal as a WireError. Records the nonce."""
        fields: dict[str, str] = {}
        for key, value in metadata:
            if key in KEYS:
                if key in fields:
                    raise Unsigned(f"metadata {key} appears twice")
                fields[key] = value if isinstance(value, str) else value.decode("ascii", "replace")
        absent = [k for k in KEYS if k not in fields]
        if absent:
            raise Unsigned(f"unsigned request: metadata {', '.join(absent)} missing")
        node_id, public_b64, ts_text, nonce = (fields[k] for k in KEYS[:4])
        digest, sig_b64 = fields["roost-body-sha256"], fields["roost-signature"]
        try:
            public_key = base64.b64decode(public_b64, validate=True)
            signature = base64.b64decode(sig_b64, validate=True)
            timestamp_ms = int(ts_text)
        except ValueError as e:
            raise Unsigned(f"malformed signature metadata: {e}") from e
        if not (NONCE.fullmatch(nonce) and DIGEST.fullmatch(digest)) or len(signature) != 64:
            raise Unsigned(
                "malformed signature metadata: need a 32-hex-digit nonce, a 64-hex-digit "
                "SHA-256 and a 64-byte signature"
            )
        listed = self.allow_list.node_of(public_key)
        if listed is None:
            raise UnknownKey(f"public key {public_b64[:16]}... is not on the allow-list")
        if listed != node_id:
            raise UnknownKey(f"the key is allowed for node {listed!r}, not {node_id[:64]!r}")
        now_ms = int(self.clock() * 1000)
        skew_ms = timestamp_ms - now_ms
        if abs(skew_ms) > self.window_ms:
            raise StaleTimestamp(
                f"timestamp is {skew_ms / 1000:+.1f} s from the server's clock; allowed "
                f"±{self.window_ms / 1000:g} s (check the node's clock)"
            )
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(
                signature, signed_content(method, node_id, timestamp_ms, nonce, digest)
            )
        except InvalidSignature:
            raise BadSignature(
                f"signature of node {node_id!r} does not verify for {method}"
            ) from None
        self.replay.record(node_id, nonce, timestamp_ms + self.window_ms, now_ms)
        return Caller(node_id, public_key, digest)

    @staticmethod
    def check_body(caller: Caller, digest: str) -> None:
        """TamperedBody unless ``digest`` (of the bytes received) is the one ``caller`` signed."""
        if digest != caller.body_sha256:
            raise TamperedBody(
                f"request body of node {caller.node_id!r} is not what it signed "
                f"(SHA-256 {digest[:16]}..., signed {caller.body_sha256[:16]}...)"
            )
