"""Named tensors to and from a :class:`Manifest` and a sequence of :class:`DataChunk` frames.

A set of named values travels as one ``Manifest`` (every entry's name, dtype, shape,
element count and byte count, and their total) followed by ``DataChunk`` frames, each a
slice of at most ``chunk_bytes`` (default 1 MiB) of one entry's bytes, in order: entry 0
from offset 0 to its end, then entry 1, and so on (an empty entry has no chunk). Dense
tensors are their elements in C order, little-endian. An :class:`Encoded` value (e.g. a
compressed update in :mod:`roost.compression.wire`'s format) is opaque bytes with the name
of its codec; its byte count is exactly what the chunks carry.

:func:`encode` raises ValueError or TypeError for values it cannot send (a local mistake).
:class:`Decoder` is strict about what it receives and raises a
:class:`~roost.deploy.errors.WireError` subclass naming what was wrong and what is allowed:

* the manifest is checked whole before anything is allocated: at most
  ``Limits.max_tensors`` entries, unique non-empty names, allowed dtypes only, ``shape``'s
  product equal to ``numel``, ``nbytes == numel * itemsize``, ``total_bytes`` equal to the
  sum of the entries and at most ``Limits.max_total_bytes`` (TooLarge, RESOURCE_EXHAUSTED);
  and, when a spec is given, exactly the spec's names with its dtypes, shapes and codecs;
* each chunk must be the next slice in order, non-empty, at most ``Limits.max_chunk_bytes``
  and inside its entry; an entry's buffer is allocated at its first chunk;
* :meth:`Decoder.finish` refuses a stream that ended early and, with
  ``Limits.require_finite``, a floating-point tensor holding NaN or Inf.

Only little-endian hosts are supported (both ends copy raw memory).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from roost.deploy._proto import pb
from roost.deploy.errors import BadTensor, MalformedMessage, NonFinite, SpecMismatch, TooLarge

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DTYPES",
    "Decoder",
    "Encoded",
    "Limits",
    "TensorSpec",
    "WireValue",
    "decode",
    "encode",
    "manifest_of",
]

DEFAULT_CHUNK_BYTES = 1 << 20
"""1 MiB: a chunk frame stays well under gRPC's default 4 MiB message limit."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
"""The dtypes a dense tensor may have on the wire, by their wire name."""

_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_NAME_LENGTH = 256


@dataclass(frozen=True)
class Encoded:
    """Opaque encoded bytes and the name of their encoding (e.g. ``"roost.compression.wire"``)."""

    codec: str
    data: bytes


WireValue = torch.Tensor | Encoded


@dataclass(frozen=True)
class TensorSpec:
    """What the receiver expects of one entry; ``None`` fields are not checked.

    A dense entry is checked against ``dtype`` (a key of :data:`DTYPES`) and ``shape``; an
    encoded entry against ``codec`` and ``max_nbytes``. Giving ``codec`` requires an
    encoded entry; giving ``dtype`` or ``shape`` requires a dense one."""

    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    codec: str | None = None
    max_nbytes: int | None = None


@dataclass(frozen=True)
class Limits:
    """The receiver's caps. ``max_total_bytes`` bounds the memory one decode allocates."""

    max_total_bytes: int = 256 << 20
    max_tensors: int = 1024
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    require_finite: bool = False


def _check_host() -> None:
    if sys.byteorder != "little":
        raise NotImplementedError("roost.deploy sends raw little-endian memory; this host is not")


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's elements as C-order bytes (a view where the tensor is contiguous on CPU)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def manifest_of(values: Mapping[str, WireValue]) -> pb.Manifest:
    """The manifest of ``values`` (no data). Raises TypeError for a value that is neither a
    tensor nor :class:`Encoded`, ValueError for a dtype outside :data:`DTYPES` or a bad name."""
    manifest = pb.Manifest()
    total = 0
    for name, value in values.items():
        if not name or len(name) > MAX_NAME_LENGTH:
            raise ValueError(f"tensor name {name!r} must have 1 to {MAX_NAME_LENGTH} characters")
        entry = manifest.tensors.add(name=name)
        if isinstance(value, Encoded):
            if not value.codec:
                raise ValueError(f"encoded value {name!r} needs a codec name")
            entry.codec = value.codec
            entry.numel = entry.nbytes = len(value.data)
        elif isinstance(value, torch.Tensor):
            dtype = _NAMES.get(value.dtype)
            if dtype is None:
                raise ValueError(
                    f"tensor {name!r} has dtype {value.dtype}, which does not travel; "
                    f"allowed: {', '.join(DTYPES)}"
                )
            entry.dtype = dtype
            entry.shape.extend(value.shape)
            entry.numel = value.numel()
            entry.nbytes = value.numel() * value.element_size()
        else:
            raise TypeError(f"{name!r} is a {type(value).__name__}, not a tensor or Encoded")
        total += entry.nbytes
    manifest.total_bytes = total
    return manifest


def encode(
    values: Mapping[str, WireValue], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[pb.Manifest, Iterator[pb.DataChunk]]:
    """``values``' manifest and a lazy iterator over their chunks (each at most ``chunk_bytes``).

    The iterator copies one chunk at a time out of the tensors, so do not modify them until
    it is exhausted."""
    _check_host()
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    manifest = manifest_of(values)

    def chunks() -> Iterator[pb.DataChunk]:
        for index, value in enumerate(values.values()):
            raw = memoryview(value.data) if isinstance(value, Encoded) else _tensor_bytes(value)
            for offset in range(0, len(raw), chunk_bytes):
                piece = bytes(raw[offset : offset + chunk_bytes])
                yield pb.DataChunk(tensor_index=index, offset=offset, data=piece)

    return manifest, chunks()


class Decoder:
    """Rebuilds the values of one manifest from its chunks, refusing anything inconsistent.

    ``Decoder(manifest, limits, spec)`` checks the manifest (and raises) before allocating;
    :meth:`add` takes the chunks in order; :meth:`finish` returns ``{name: value}``.
    ``received_bytes`` counts the chunk data taken so far."""

    def __init__(
        self,
        manifest: pb.Manifest,
        limits: Limits = Limits(),
        spec: Mapping[str, TensorSpec] | None = None,
    ) -> None:
        _check_host()
        self.limits = limits
        self.entries = list(manifest.tensors)
        self._check_manifest(manifest)
        if spec is not None:
            self._check_spec(spec)
        self._buffers: list[bytearray | None] = [None] * len(self.entries)
        self._index = 0
        self._offset = 0
        self.received_bytes = 0
        self._skip_empty()

    def _check_manifest(self, manifest: pb.Manifest) -> None:
        limits = self.limits
        if len(self.entries) > limits.max_tensors:
            raise TooLarge(
                f"{len(self.entries)} tensors in one message; at most {limits.max_tensors}"
            )
        seen: set[str] = set()
        total = 0
        for e in self.entries:
            if not e.name or len(e.name) > MAX_NAME_LENGTH:
                raise BadTensor(
                    f"tensor name {e.name[:40]!r} must have 1 to {MAX_NAME_LENGTH} chars"
                )
            if e.name in seen:
                raise BadTensor(f"tensor name {e.name!r} appears twice in the manifest")
            seen.add(e.name)
            if e.codec:
                if e.dtype or list(e.shape) not in ([], [e.numel]):
                    raise BadTensor(f"encoded entry {e.name!r} ({e.codec}) has a dtype or shape")
                if e.nbytes != e.numel:
                    raise BadTensor(
                        f"encoded entry {e.name!r}: nbytes {e.nbytes} != byte count {e.numel}"
                    )
            else:
                dtype = DTYPES.get(e.dtype)
                if dtype is None:
                    raise BadTensor(
                        f"tensor {e.name!r} has dtype {e.dtype!r}, which is not allowed; "
                        f"allowed: {', '.join(DTYPES)}"
                    )
                if math.prod(e.shape) != e.numel:
                    raise BadTensor(
                        f"tensor {e.name!r}: shape {list(e.shape)} holds "
                        f"{math.prod(e.shape)} elements, but numel is {e.numel}"
                    )
                itemsize = torch.empty((), dtype=dtype).element_size()
                if e.nbytes != e.numel * itemsize:
                    raise BadTensor(
                        f"tensor {e.name!r}: {e.nbytes} bytes for {e.numel} {e.dtype} elements; "
                        f"must be numel * {itemsize} = {e.numel * itemsize}"
                    )
            total += e.nbytes
        if total != manifest.total_bytes:
            raise BadTensor(
                f"manifest total_bytes {manifest.total_bytes} != {total}, the sum of its entries"
            )
        if total > limits.max_total_bytes:
            raise TooLarge(
                f"{total} bytes of tensors in one message; at most {limits.max_total_bytes}"
            )

    def _check_spec(self, spec: Mapping[str, TensorSpec]) -> None:
        names = [e.name for e in self.entries]
        missing = sorted(set(spec) - set(names))
        extra = sorted(set(names) - set(spec))
        if missing or extra:
            raise SpecMismatch(
                f"expected tensors {sorted(spec)}; missing {missing}, unexpected {extra}"
            )
        for e in self.entries:
            want = spec[e.name]
            if want.codec is not None and e.codec != want.codec:
                raise SpecMismatch(
                    f"{e.name!r} must be encoded with {want.codec!r}, not {e.codec or 'dense'!r}"
                )
            if (want.dtype is not None or want.shape is not None) and e.codec:
                raise SpecMismatch(f"{e.name!r} must be a dense tensor, not {e.codec!r} bytes")
            if want.dtype is not None and e.dtype != want.dtype:
                raise SpecMismatch(f"{e.name!r} must be {want.dtype}, not {e.dtype}")
            if want.shape is not None and tuple(e.shape) != tuple(want.shape):
                raise SpecMismatch(
                    f"{e.name!r} must have shape {list(want.shape)}, not {list(e.shape)}"
                )
            if want.max_nbytes is not None and e.nbytes > want.max_nbytes:
                raise TooLarge(f"{e.name!r} has {e.nbytes} bytes; at most {want.max_nbytes}")

    def _skip_empty(self) -> None:
        while self._index < len(self.entries) and self.entries[self._index].nbytes == 0:
            self._index += 1

    @property
    def complete(self) -> bool:
        return self._index >= len(self.entries)

    def add(self, chunk: pb.DataChunk) -> None:
        """Copy one chunk into its entry's buffer; it must be the next slice in order."""
        size = len(chunk.data)
        if self.complete:
            raise MalformedMessage(
                f"chunk for tensor {chunk.tensor_index} after every tensor was complete"
            )
        entry = self.entries[self._index]
        if chunk.tensor_index != self._index or chunk.offset != self._offset:
            raise MalformedMessage(
                f"chunk for tensor {chunk.tensor_index} at offset {chunk.offset}; expected "
                f"tensor {self._index} ({entry.name!r}) at offset {self._offset}"
            )
        if size == 0:
            raise MalformedMessage(f"empty chunk for tensor {entry.name!r}")
        if size > self.limits.max_chunk_bytes:
            raise TooLarge(f"chunk of {size} bytes; at most {self.limits.max_chunk_bytes}")
        if self._offset + size > entry.nbytes:
            raise BadTensor(
                f"tensor {entry.name!r} is {entry.nbytes} bytes, but chunks run to "
                f"{self._offset + size}"
            )
        buf = self._buffers[self._index]
        if buf is None:
            buf = self._buffers[self._index] = bytearray(entry.nbytes)
        buf[self._offset : self._offset + size] = chunk.data
        self._offset += size
        self.received_bytes += size
        if self._offset == entry.nbytes:
            self._index += 1
            self._offset = 0
            self._skip_empty()

    def finish(self) -> dict[str, WireValue]:
        """The decoded values, by name in manifest order; raises if any byte is missing or, with
        ``require_finite``, a floating-point tensor holds NaN or Inf."""
        if not self.complete:
            entry = self.entries[self._index]
            raise BadTensor(
                f"stream ended with tensor {entry.name!r} at {self._offset} of {entry.nbytes} bytes"
            )
        out: dict[str, WireValue] = {}
        for e, buf in zip(self.entries, self._buffers, strict=True):
            data = buf if buf is not None else bytearray()
            if e.codec:
                out[e.name] = Encoded(e.codec, bytes(data))
                continue
            dtype = DTYPES[e.dtype]
            shape = tuple(e.shape)
            t = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            t = t.reshape(shape)
            if self.limits.require_finite and t.is_floating_point():
                bad = t.numel() - int(torch.isfinite(t).sum())
                if bad:
                    nans = int(torch.isnan(t).sum())
                    raise NonFinite(
                        f"tensor {e.name!r} holds {nans} NaN and {bad - nans} Inf values; "
                        "results must be finite"
                    )
            out[e.name] = t
        return out


def decode(
    manifest: pb.Manifest,
    chunks: Iterable[pb.DataChunk],
    limits: Limits = Limits(),
    spec: Mapping[str, TensorSpec] | None = None,
) -> dict[str, WireValue]:
    """:class:`Decoder` over a whole sequence of chunks."""
    decoder = Decoder(manifest, limits, spec)
    for chunk in chunks:
        decoder.add(chunk)
    return decoder.finish()
