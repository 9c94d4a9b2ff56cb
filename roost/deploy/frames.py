"""The messages of each RPC, as serialized bytes: built on one side, parsed strictly on the other.

Both sides send and receive raw bytes (the gRPC methods are registered without
serializers), so that a request's signature covers exactly the bytes on the wire. A stream
is a header frame, then the :mod:`~roost.deploy.tensors` chunks of its manifest, each in a
frame of the same message type:

* PullTask answers ``TaskFrame{header}`` + ``TaskFrame{chunk}``..., or one
  ``TaskFrame{no_task}`` (:func:`task_frames`, :func:`no_task_frame`, :func:`read_task`);
* PushResult sends ``ResultFrame{header}`` + ``ResultFrame{chunk}``... (:class:`ResultStream`;
  the server reads it in :mod:`roost.deploy.server`);
* Request answers ``AnswerFrame{header}`` + ``AnswerFrame{chunk}``... (:func:`answer_frames`,
  :func:`read_answer`).

:func:`parse` refuses bytes that are not the expected message (MalformedMessage) and any
``protocol_version`` but :data:`~roost.deploy._proto.PROTOCOL_VERSION` (VersionMismatch).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

from google.protobuf.message import DecodeError

from roost.deploy._proto import PROTOCOL_VERSION, pb
from roost.deploy.errors import MalformedMessage, NonFinite, TooLarge, VersionMismatch
from roost.deploy.protocol import (
    Answer,
    Exchange,
    NoWork,
    RequestKind,
    Result,
    SettingValue,
    Task,
    TaskKind,
    TaskSpec,
    WireStats,
)
from roost.deploy.tensors import DEFAULT_CHUNK_BYTES, Decoder, Limits, encode

__all__ = [
    "MAX_ENTRIES",
    "ExchangeStream",
    "ResultStream",
    "answer_frames",
    "enum_member",
    "no_task_frame",
    "parse",
    "put_settings",
    "read_answer",
    "read_metrics",
    "read_settings",
    "read_task",
    "task_frames",
]

MAX_ENTRIES = 256
"""The most settings, properties or metrics one message may carry."""
INT64 = range(-(2**63), 2**63)


def parse(message_type: Any, raw: bytes) -> Any:
    """``raw`` parsed as ``message_type``; MalformedMessage if it does not parse,
    VersionMismatch if its ``protocol_version`` is not this code's."""
    try:
        message = message_type.FromString(raw)
    except (DecodeError, ValueError, TypeError) as e:
        raise MalformedMessage(
            f"{len(raw)} bytes that are not a {message_type.DESCRIPTOR.full_name} message ({e})"
        ) from None
    if message.protocol_version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"{message_type.DESCRIPTOR.name} has protocol_version {message.protocol_version}; "
            f"this side speaks version {PROTOCOL_VERSION} only (upgrade the older of the two)"
        )
    return message


def put_settings(target: Any, settings: Mapping[str, SettingValue]) -> None:
    """Append ``settings`` to a repeated ``Setting`` field; TypeError for another type,
    ValueError for an int outside int64."""
    for key, value in settings.items():
        if isinstance(value, bool):
            target.add(key=key, bool_value=value)
        elif isinstance(value, int):
            if value not in INT64:
                raise ValueError(f"setting {key!r} = {value} does not fit in int64")
            target.add(key=key, int_value=value)
        elif isinstance(value, float):
            target.add(key=key, float_value=value)
        elif isinstance(value, str):
            target.add(key=key, string_value=value)
        else:
            raise TypeError(
                f"setting {key!r} is a {type(value).__name__}; allowed: bool, int, float, str"
            )


def read_settings(items: Iterable[Any], what: str = "settings") -> dict[str, SettingValue]:
    """A repeated ``Setting`` field as a dict; refuses duplicates, unset values, too many."""
    out: dict[str, SettingValue] = {}
    for item in items:
        if len(out) >= MAX_ENTRIES:
            raise TooLarge(f"more than {MAX_ENTRIES} {what}")
        if not item.key or item.key in out:
            raise MalformedMessage(f"{what}: key {item.key!r} is empty or repeated")
        which = item.WhichOneof("value")
        if which is None:
            raise MalformedMessage(f"{what}: {item.key!r} has no value")
        out[item.key] = getattr(item, which)
    return out


def read_metrics(items: Iterable[Any]) -> dict[str, float]:
    """A repeated ``Metric`` field as a dict; refuses duplicates, NaN/Inf, too many."""
    out: dict[str, float] = {}
    for item in items:
        if len(out) >= MAX_ENTRIES:
            raise TooLarge(f"more than {MAX_ENTRIES} metrics")
        if not item.name or item.name in out:
            raise MalformedMessage(f"metric name {item.name!r} is empty or repeated")
        if not math.isfinite(item.value):
            raise NonFinite(f"metric {item.name!r} is {item.value}; metrics must be finite")
        out[item.name] = item.value
    return out


def _frames(frame_type: Any, header: Any, chunks: Iterator[Any]) -> Iterator[bytes]:
    yield frame_type(protocol_version=PROTOCOL_VERSION, header=header).SerializeToString(
        deterministic=True
    )
    for chunk in chunks:
        yield frame_type(protocol_version=PROTOCOL_VERSION, chunk=chunk).SerializeToString(
            deterministic=True
        )


def task_frames(spec: TaskSpec, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """PullTask's answer for ``spec``. The header is built (and ``spec`` checked: ValueError,
    TypeError) at the call; the chunks are copied out as the iterator is consumed."""
    manifest, chunks = encode(spec.payload, chunk_bytes)
    header = pb.TaskHeader(
        task_id=spec.task_id,
        client_id=spec.client_id,
        model_version=spec.model_version,
        seed=spec.seed,
        round=spec.round,
        payload=manifest,
        kind=f"TASK_KIND_{spec.kind.name}",
    )
    put_settings(header.settings, spec.settings)
    return _frames(pb.TaskFrame, header, chunks)


def no_task_frame(retry_after_s: float, finished: bool = False) -> bytes:
    """PullTask's answer when there is no work: ask again after ``retry_after_s``, or,
    ``finished``, stop: the run is over."""
    no_task = pb.NoTask(retry_after_ms=max(0, round(retry_after_s * 1000)), finished=finished)
    return pb.TaskFrame(protocol_version=PROTOCOL_VERSION, no_task=no_task).SerializeToString()


def answer_frames(
    task_id: str, kind: RequestKind, answer: Answer, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[bytes]:
    """Request's answer; the header is built (and ``answer`` checked) at the call."""
    manifest, chunks = encode(answer.tensors, chunk_bytes)
    header = pb.AnswerHeader(
        task_id=task_id,
        kind=f"REQUEST_KIND_{kind.name}",
        model_version=answer.model_version,
        payload=manifest,
    )
    return _frames(pb.AnswerFrame, header, chunks)


def _read_chunks(
    frame_type: Any, frames: Iterator[bytes], decoder: Decoder, first_size: int
) -> WireStats:
    message_bytes, count = first_size, 0
    for raw in frames:
        frame = parse(frame_type, raw)
        if frame.WhichOneof("frame") != "chunk":
            raise MalformedMessage(f"{frame_type.DESCRIPTOR.name} after the header is not a chunk")
        decoder.add(frame.chunk)
        message_bytes += len(raw)
        count += 1
    return WireStats(decoder.received_bytes, message_bytes, count)


E = TypeVar("E", bound=enum.Enum)


def enum_member(kinds: type[E], value: int, what: str) -> E:
    """The member of ``kinds`` a message's enum field holds; MalformedMessage naming the
    allowed values otherwise."""
    try:
        return kinds(value)
    except ValueError:
        allowed = ", ".join(f"{k.value} ({k.name})" for k in kinds)
        raise MalformedMessage(f"{what} {value} is not one of {allowed}") from None


def read_task(frames: Iterable[bytes], limits: Limits | None = None) -> Task | NoWork:
    """A PullTask answer: the :class:`Task`, or :class:`NoWork` (when to ask again, or
    that the run is over). WireError for anything malformed."""
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise MalformedMessage("PullTask answered with an empty stream")
    frame = parse(pb.TaskFrame, first)
    which = frame.WhichOneof("frame")
    if which == "no_task":
        return NoWork(frame.no_task.retry_after_ms / 1000, frame.no_task.finished)
    if which != "header":
        raise MalformedMessage(f"PullTask's first frame is {which}, not a header")
    h = frame.header
    kind = enum_member(TaskKind, h.kind, "task kind")
    decoder = Decoder(h.payload, limits or Limits())
    wire = _read_chunks(pb.TaskFrame, it, decoder, len(first))
    return Task(
        task_id=h.task_id,
        client_id=h.client_id,
        model_version=h.model_version,
        seed=h.seed,
        round=h.round,
        payload=decoder.finish(),
        settings=read_settings(h.settings),
        wire=wire,
        kind=kind,
    )


def read_answer(frames: Iterable[bytes], limits: Limits | None = None) -> Answer:
    """A Request answer; WireError for anything malformed."""
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise MalformedMessage("Request answered with an empty stream")
    frame = parse(pb.AnswerFrame, first)
    if frame.WhichOneof("frame") != "header":
        raise MalformedMessage("Request's first frame is not a header")
    decoder = Decoder(frame.header.payload, limits or Limits())
    wire = _read_chunks(pb.AnswerFrame, it, decoder, len(first))
    return Answer(frame.header.model_version, decoder.finish(), wire)


class ResultStream:
    """PushResult's frames for one result, re-iterable: iterating twice yields the same bytes,
    so a node hashes them for its signature and then sends them without holding them all.

    The header is built (and ``result`` checked: ValueError, TypeError) at construction."""

    def __init__(
        self, node_id: str, result: Result, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        if not (math.isfinite(result.weight) and result.weight >= 0):
            raise ValueError(f"result weight must be a finite number >= 0, got {result.weight}")
        bad = {k: v for k, v in result.metrics.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"metrics must be finite, got {bad}")
        self.result = result
        self.chunk_bytes = chunk_bytes
        manifest, _ = encode(result.tensors, chunk_bytes)
        self.header = pb.ResultHeader(
            node_id=node_id, task_id=result.task_id, weight=result.weight, result=manifest
        )
        for name, value in result.metrics.items():
            self.header.metrics.add(name=name, value=float(value))
        self.payload_bytes = manifest.total_bytes

    def __iter__(self) -> Iterator[bytes]:
        _, chunks = encode(self.result.tensors, self.chunk_bytes)
        return _frames(pb.ResultFrame, self.header, chunks)


class ExchangeStream:
    """Exchange's frames for one :class:`~roost.deploy.protocol.Exchange`, re-iterable
    like :class:`ResultStream` (hashed for the signature, then sent)."""

    def __init__(
        self, node_id: str, exchange: Exchange, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        self.exchange = exchange
        self.chunk_bytes = chunk_bytes
        manifest, _ = encode(exchange.tensors, chunk_bytes)
        self.header = pb.ExchangeHeader(
            node_id=node_id,
            task_id=exchange.task_id,
            kind=f"REQUEST_KIND_{exchange.kind.name}",
            payload=manifest,
        )
        put_settings(self.header.fields, exchange.fields)
        self.payload_bytes = manifest.total_bytes

    def __iter__(self) -> Iterator[bytes]:
        _, chunks = encode(self.exchange.tensors, self.chunk_bytes)
        return _frames(pb.ExchangeFrame, self.header, chunks)
