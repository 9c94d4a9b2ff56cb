"""Hostile messages, one maker per kind of refusal, each with the status it must get.

Every maker builds a fresh message (fresh nonce and timestamp where it signs), so calling
one many times gives many distinct attacks of that kind, not replays of one. The scene
(:class:`Scene`): mallory (allowed, registered) was given task ``m-1`` whose result spec is
``{"delta": float32 (8,)}`` and has delivered ``m-done`` already; alice (allowed,
registered) was given ``a-1``; bob is allowed but never registered; eve is not allowed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch
from _deploy_helpers import Federation, dense, heartbeat_body, pull_body, result_frames, signed

from roost.deploy._proto import PROTOCOL_VERSION, pb
from roost.deploy.auth import NodeKey, Signer

SPEC_NUMEL = 8
GOOD_DELTA = torch.linspace(-1, 1, SPEC_NUMEL)
Code = grpc.StatusCode


@dataclass
class Scene:
    fed: Federation
    mallory_task: str = "m-1"
    alice_task: str = "a-1"
    done_task: str = "m-done"

    def __post_init__(self) -> None:
        self.mallory = Signer(self.fed.mallory)
        self.alice = Signer(self.fed.alice)
        self.eve = Signer(self.fed.eve)
        self.bob = Signer(self.fed.bob)


Message = tuple[str, bytes | list[bytes], tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Hostile:
    label: str
    make: Callable[[Scene], Message]
    code: Code
    kind: str  # the roost-refusal kind ("" for a refusal by gRPC itself)


def _push(s: Scene, frames: list[bytes], signer: Signer | None = None) -> Message:
    return "PushResult", frames, signed(signer or s.mallory, "PushResult", frames)


def _result(s: Scene, *entries, task: str | None = None, **kw) -> list[bytes]:
    return result_frames("mallory", task or s.mallory_task, entries, **kw)


def _good(s: Scene, task: str | None = None) -> list[bytes]:
    return _result(s, dense("delta", GOOD_DELTA), task=task)


def _heartbeat(s: Scene, signer: Signer, node_id: str = "mallory", **kw) -> Message:
    body = heartbeat_body(node_id)
    return "Heartbeat", body, signed(signer, "Heartbeat", body, **kw)


def unsigned(s: Scene) -> Message:
    return "PullTask", pull_body("mallory"), ()


def half_signed(s: Scene) -> Message:
    _, body, md = _heartbeat(s, s.mallory)
    return "Heartbeat", body, tuple(kv for kv in md if kv[0] != "roost-signature")


def unknown_key(s: Scene) -> Message:
    return _heartbeat(s, s.eve, "eve")


def impersonation(s: Scene) -> Message:
    """mallory's key claiming to be alice."""
    liar = Signer(NodeKey("alice", s.fed.mallory.private_key))
    return _heartbeat(s, liar, "alice")


def bad_signature(s: Scene) -> Message:
    """alice's metadata with a signature made for a different nonce."""
    name, body, md = _heartbeat(s, s.alice, "alice")
    other = dict(_heartbeat(s, s.alice, "alice")[2])["roost-signature"]
    return name, body, tuple((k, other if k == "roost-signature" else v) for k, v in md)


def tampered_unary(s: Scene) -> Message:
    body = heartbeat_body("mallory")
    md = signed(s.mallory, "Heartbeat", body)
    return "Heartbeat", heartbeat_body("mallory", s.mallory_task), md


def tampered_stream(s: Scene) -> Message:
    frames = _good(s)
    md = signed(s.mallory, "PushResult", frames)
    last = pb.ResultFrame.FromString(frames[-1])
    data = bytearray(last.chunk.data)
    data[0] ^= 0x01  # one bit of the first float
    last.chunk.data = bytes(data)
    return "PushResult", [*frames[:-1], last.SerializeToString()], md


def stale(s: Scene) -> Message:
    return _heartbeat(s, s.mallory, timestamp_ms=int((time.time() - 61) * 1000))


def from_the_future(s: Scene) -> Message:
    return _heartbeat(s, s.mallory, timestamp_ms=int((time.time() + 61) * 1000))


def malformed_unary(s: Scene) -> Message:
    body = b"\x0f" + bytes(range(40))  # tag 0x0f: field 1 with wire type 7, which is invalid
    return "Heartbeat", body, signed(s.mallory, "Heartbeat", body)


def malformed_frame(s: Scene) -> Message:
    return _push(s, [*_good(s)[:1], b"\x0f\x00\x01\x02"])


def chunk_first(s: Scene) -> Message:
    return _push(s, _good(s)[1:])


def declared_oversized(s: Scene) -> Message:
    """300 MiB declared (the cap is 256 MiB); no data follows, nothing is allocated."""
    n = 300 * (1 << 20) // 4
    h, _ = dense("delta", torch.zeros(1), shape=[n], numel=n, nbytes=4 * n)
    return _push(s, _result(s, (h, b"")))


def over_message_limit(s: Scene) -> Message:
    """One 5 MiB message (a heartbeat with a 5 MiB task id): over gRPC's 4 MiB limit, so
    gRPC itself refuses it before the handler runs."""
    body = heartbeat_body("mallory", "x" * (5 << 20))
    return "Heartbeat", body, signed(s.mallory, "Heartbeat", body)


def too_many_tensors(s: Scene) -> Message:
    entries = [dense(f"t{i}", torch.zeros(0)) for i in range(1025)]
    return _push(s, _result(s, *entries))


def wrong_length(s: Scene) -> Message:
    return _push(s, _result(s, dense("delta", GOOD_DELTA, nbytes=31)))


def wrong_shape(s: Scene) -> Message:
    return _push(s, _result(s, dense("delta", GOOD_DELTA, shape=[3, 3])))


def short_stream(s: Scene) -> Message:
    h, data = dense("delta", GOOD_DELTA)
    return _push(s, _result(s, (h, data[:-4])))


def chunk_past_end(s: Scene) -> Message:
    h, data = dense("delta", GOOD_DELTA)
    return _push(s, _result(s, (h, data + b"\x00\x00\x00\x00")))


def disallowed_dtype(s: Scene) -> Message:
    return _push(s, _result(s, dense("delta", GOOD_DELTA, dtype="complex64")))


def dtype_not_in_spec(s: Scene) -> Message:
    return _push(s, _result(s, dense("delta", GOOD_DELTA.double())))


def name_not_in_spec(s: Scene) -> Message:
    return _push(s, _result(s, dense("params", GOOD_DELTA)))


def nan(s: Scene) -> Message:
    t = GOOD_DELTA.clone()
    t[3] = float("nan")
    return _push(s, _result(s, dense("delta", t)))


def inf(s: Scene) -> Message:
    t = GOOD_DELTA.clone()
    t[5] = float("-inf")
    return _push(s, _result(s, dense("delta", t)))


def nan_weight(s: Scene) -> Message:
    return _push(s, _result(s, dense("delta", GOOD_DELTA), weight=float("nan")))


def task_never_given(s: Scene) -> Message:
    return _push(s, _good(s, task="no-such-task"))


def someone_elses_task(s: Scene) -> Message:
    return _push(s, _good(s, task=s.alice_task))


def someone_elses_node_id(s: Scene) -> Message:
    frames = result_frames("alice", s.alice_task, [dense("delta", GOOD_DELTA)])
    return _push(s, frames)


def second_different_result(s: Scene) -> Message:
    t = GOOD_DELTA + 1
    return _push(s, _result(s, dense("delta", t), task=s.done_task))


def unregistered(s: Scene) -> Message:
    body = pull_body("bob")
    return "PullTask", body, signed(s.bob, "PullTask", body)


def old_protocol(s: Scene) -> Message:
    body = heartbeat_body("mallory", version=PROTOCOL_VERSION + 1)
    return "Heartbeat", body, signed(s.mallory, "Heartbeat", body)


def unknown_request_kind(s: Scene) -> Message:
    body = pb.MidTaskRequest(
        protocol_version=PROTOCOL_VERSION, node_id="mallory", task_id=s.mallory_task, kind=0
    ).SerializeToString()
    return "Request", body, signed(s.mallory, "Request", body)


def request_for_someone_elses_task(s: Scene) -> Message:
    body = pb.MidTaskRequest(
        protocol_version=PROTOCOL_VERSION, node_id="mallory", task_id=s.alice_task, kind=1
    ).SerializeToString()
    return "Request", body, signed(s.mallory, "Request", body)


UNAUTH, DENIED = Code.UNAUTHENTICATED, Code.PERMISSION_DENIED
INVALID, EXHAUSTED = Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED
HOSTILE = [
    Hostile("unsigned", unsigned, UNAUTH, "Unsigned"),
    Hostile("signature missing", half_signed, UNAUTH, "Unsigned"),
    Hostile("unknown key", unknown_key, DENIED, "UnknownKey"),
    Hostile("impersonation", impersonation, DENIED, "UnknownKey"),
    Hostile("bad signature", bad_signature, UNAUTH, "BadSignature"),
    Hostile("tampered body", tampered_unary, UNAUTH, "TamperedBody"),
    Hostile("tampered chunk", tampered_stream, UNAUTH, "TamperedBody"),
    Hostile("stale timestamp", stale, UNAUTH, "StaleTimestamp"),
    Hostile("future timestamp", from_the_future, UNAUTH, "StaleTimestamp"),
    Hostile("malformed protobuf", malformed_unary, INVALID, "MalformedMessage"),
    Hostile("malformed frame", malformed_frame, INVALID, "MalformedMessage"),
    Hostile("chunk before header", chunk_first, INVALID, "MalformedMessage"),
    Hostile("oversized", declared_oversized, EXHAUSTED, "TooLarge"),
    Hostile("message over the limit", over_message_limit, EXHAUSTED, ""),
    Hostile("too many tensors", too_many_tensors, EXHAUSTED, "TooLarge"),
    Hostile("wrong length", wrong_length, INVALID, "BadTensor"),
    Hostile("wrong shape", wrong_shape, INVALID, "BadTensor"),
    Hostile("stream ends early", short_stream, INVALID, "BadTensor"),
    Hostile("chunk past the end", chunk_past_end, INVALID, "BadTensor"),
    Hostile("wrong dtype", disallowed_dtype, INVALID, "BadTensor"),
    Hostile("dtype not in spec", dtype_not_in_spec, INVALID, "SpecMismatch"),
    Hostile("name not in spec", name_not_in_spec, INVALID, "SpecMismatch"),
    Hostile("NaN", nan, INVALID, "NonFinite"),
    Hostile("Inf", inf, INVALID, "NonFinite"),
    Hostile("NaN weight", nan_weight, INVALID, "NonFinite"),
    Hostile("task not given", task_never_given, Code.NOT_FOUND, "TaskNotFound"),
    Hostile("another node's task", someone_elses_task, DENIED, "WrongTask"),
    Hostile("another node's id", someone_elses_node_id, DENIED, "PermissionDenied"),
    Hostile("duplicate, different", second_different_result, Code.ALREADY_EXISTS, "AlreadyArrived"),
    Hostile("not registered", unregistered, Code.FAILED_PRECONDITION, "NotRegistered"),
    Hostile("protocol version", old_protocol, Code.FAILED_PRECONDITION, "VersionMismatch"),
    Hostile("request kind 0", unknown_request_kind, INVALID, "MalformedMessage"),
    Hostile("request, another's task", request_for_someone_elses_task, DENIED, "WrongTask"),
]
