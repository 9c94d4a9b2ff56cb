"""The wire format of one compressed vector: header, kept indices, packed values.

A message is the bytes a client would really upload; its length is a function of
``(n, k, bits)`` alone (:func:`message_nbytes`), so the simulator knows the upload size at
dispatch, before anything is compressed. Layout, all little-endian::

    offset  size  field
    0       2     magic b"RQ"
    2       1     format version (1)
    3       1     sparsifier code: 0 dense, 1 top-k, 2 random-k (informational)
    4       1     index encoding: 0 dense (k = n), 1 sorted index array, 2 bitmap
    5       1     bits q: 1..16 quantised codes, 32 raw float32 values
    6       1     rounding: 0 stochastic, 1 nearest, 255 none (q = 32)
    7       1     reserved, 0
    8       8     n   (uint64) length of the vector
    16      8     k   (uint64) number of transmitted coordinates, k <= n
    24      4     norm (float32) scale of the quantised codes (0 when q = 32)
    28      4     CRC-32 of the header bytes 0..27 followed by the body
    32      ...   body: indices, then values

Indices (omitted when ``k = n``): the ``k`` kept positions in increasing order, as the
smallest unsigned integer type holding the largest index ``n − 1`` (uint8 for n <= 2^8,
uint16 for n <= 2^16, uint32, uint64), or a bitmap of ``⌈n/8⌉`` bytes (bit i set iff i is
kept, ``numpy.packbits`` order: most significant bit first) when that is strictly smaller.

Values: ``4k`` bytes of float32 when ``q = 32``; otherwise ``k`` codes of ``q + 1`` bits each
(a sign bit above ``q`` level bits, see :mod:`roost.compression.quantize`), concatenated
most significant bit first and zero-padded to ``⌈k (q + 1) / 8⌉`` bytes.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BITMAP",
    "DENSE",
    "HEADER",
    "HEADER_NBYTES",
    "INDEX_ARRAY",
    "Header",
    "index_dtype",
    "index_encoding",
    "index_nbytes",
    "message_nbytes",
    "pack_message",
    "unpack_message",
    "value_nbytes",
]

MAGIC = b"RQ"
FORMAT_VERSION = 1
HEADER = struct.Struct("<2sBBBBBBQQf")
HEADER_NBYTES = HEADER.size + 4  # + CRC-32
DENSE, INDEX_ARRAY, BITMAP = 0, 1, 2
SPARSIFIERS = {0: "dense", 1: "topk", 2: "randk"}
ROUNDINGS = {0: "stochastic", 1: "nearest", 255: "none"}
RAW_BITS = 32


@dataclass(frozen=True)
class Header:
    """The decoded fixed-size header of a message (see the module docstring)."""

    sparsifier: int
    index_encoding: int
    bits: int
    rounding: int
    n: int
    k: int
    norm: float


def index_dtype(n: int) -> np.dtype:
    """The smallest little-endian unsigned dtype that holds every index ``0 .. n − 1``."""
    for dt in ("<u1", "<u2", "<u4"):
        if n - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype("<u8")


def index_encoding(n: int, k: int) -> int:
    """How ``k`` kept positions out of ``n`` are sent: nothing when ``k = n``, else the
    smaller of the index array (``k · itemsize`` bytes) and the bitmap (``⌈n/8⌉``), the
    array on a tie."""
    if k == n:
        return DENSE
    return BITMAP if (n + 7) // 8 < k * index_dtype(n).itemsize else INDEX_ARRAY


def index_nbytes(n: int, k: int) -> int:
    enc = index_encoding(n, k)
    if enc == DENSE:
        return 0
    return (n + 7) // 8 if enc == BITMAP else k * index_dtype(n).itemsize


def value_nbytes(k: int, bits: int) -> int:
    """``4k`` for raw float32, else ``⌈k (q + 1) / 8⌉`` (q level bits and a sign bit)."""
    return 4 * k if bits == RAW_BITS else (k * (bits + 1) + 7) // 8


def message_nbytes(n: int, k: int, bits: int) -> int:
    """Exact length of a message: header + indices + values."""
    return HEADER_NBYTES + index_nbytes(n, k) + value_nbytes(k, bits)


def _pack_codes(codes: np.ndarray, width: int) -> bytes:
    """``width``-bit unsigned codes, most significant bit first, into a zero-padded stream."""
    bits = np.empty((codes.size, width), dtype=np.uint8)
    c = codes.astype(np.uint32, copy=False)
    for j in range(width):
        np.bitwise_and(
            c >> np.uint32(width - 1 - j), np.uint32(1), out=bits[:, j], casting="unsafe"
        )
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack_codes(buf: bytes, count: int, width: int) -> np.ndarray:
    raw = np.frombuffer(buf, dtype=np.uint8)
    pad = raw.size * 8 - count * width
    if pad and int(raw[-1]) & ((1 << pad) - 1):
        raise ValueError("corrupt message: nonzero padding bits after the value codes")
    bits = np.unpackbits(raw, count=count * width).reshape(count, width)
    codes = np.zeros(count, dtype=np.uint32)
    for j in range(width):
        codes |= bits[:, j].astype(np.uint32) << np.uint32(width - 1 - j)
    return codes


def pack_message(header: Header, indices: np.ndarray | None, values: np.ndarray) -> bytes:
    """Serialise one message. ``indices``: sorted int64 positions (None when ``k = n``);
    ``values``: float32 values (q = 32) or uint32 codes of ``q + 1`` bits."""
    n, k, bits = header.n, header.k, header.bits
    enc = index_encoding(n, k)
    parts: list[bytes] = []
    if enc == INDEX_ARRAY:
        assert indices is not None
        parts.append(indices.astype(index_dtype(n)).tobytes())
    elif enc == BITMAP:
        assert indices is not None
        mask = np.zeros(n, dtype=np.uint8)
        mask[indices] = 1
        parts.append(np.packbits(mask).tobytes())
    if bits == RAW_BITS:
        parts.append(values.astype("<f4").tobytes())
    else:
        parts.append(_pack_codes(values, bits + 1))
    body = b"".join(parts)
    head = HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        header.sparsifier,
        enc,
        bits,
        header.rounding,
        0,
        n,
        k,
        header.norm,
    )
    crc = zlib.crc32(body, zlib.crc32(head))
    message = head + struct.pack("<I", crc) + body
    assert len(message) == message_nbytes(n, k, bits)
    return message


def _read_header(message: bytes) -> Header:
    if len(message) < HEADER_NBYTES:
        raise ValueError(
            f"truncated message: {len(message)} bytes, the header alone is {HEADER_NBYTES}"
        )
    magic, version, sparsifier, enc, bits, rounding, reserved, n, k, norm = HEADER.unpack_from(
        message
    )
    if magic != MAGIC:
        raise ValueError(f"not a compressed-vector message: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported format version {version} (this decoder reads 1)")
    if sparsifier not in SPARSIFIERS:
        raise ValueError(f"corrupt header: sparsifier code {sparsifier}, allowed 0, 1, 2")
    if not (1 <= bits <= 16 or bits == RAW_BITS):
        raise ValueError(f"corrupt header: bits {bits}, allowed 1..16 or 32")
    expected_rounding = (255,) if bits == RAW_BITS else (0, 1)
    if rounding not in expected_rounding:
        raise ValueError(f"corrupt header: rounding code {rounding} with bits {bits}")
    if reserved != 0:
        raise ValueError(f"corrupt header: reserved byte is {reserved}, expected 0")
    if k > n:
        raise ValueError(f"corrupt header: k = {k} kept coordinates exceeds n = {n}")
    if enc != index_encoding(n, k):
        raise ValueError(
            f"corrupt header: index encoding {enc}, but n = {n}, k = {k} "
            f"imply {index_encoding(n, k)}"
        )
    if bits != RAW_BITS and not (norm >= 0 or math.isnan(norm)):
        raise ValueError(f"corrupt header: negative quantisation norm {norm}")
    return Header(sparsifier, enc, bits, rounding, n, k, norm)


def unpack_message(message: bytes) -> tuple[Header, np.ndarray | None, np.ndarray]:
    """Parse and validate a message: ``(header, indices or None, values or codes)``.

    Raises ValueError naming the problem for a truncated or over-long message, a bad
    header field, a checksum mismatch, or indices that are not strictly increasing in
    ``[0, n)`` (a bitmap with the wrong number of set bits).
    """
    message = bytes(message)
    h = _read_header(message)
    expected = message_nbytes(h.n, h.k, h.bits)
    if len(message) != expected:
        what = "truncated" if len(message) < expected else "over-long"
        raise ValueError(
            f"{what} message: {len(message)} bytes, but n = {h.n}, k = {h.k}, "
            f"bits = {h.bits} imply {expected}"
        )
    (crc,) = struct.unpack_from("<I", message, HEADER.size)
    body = message[HEADER_NBYTES:]
    if zlib.crc32(body, zlib.crc32(message[: HEADER.size])) != crc:
        raise ValueError("corrupt message: CRC-32 mismatch")
    isize = index_nbytes(h.n, h.k)
    ibuf, vbuf = body[:isize], body[isize:]
    indices: np.ndarray | None = None
    if h.index_encoding == INDEX_ARRAY:
        indices = np.frombuffer(ibuf, dtype=index_dtype(h.n)).astype(np.int64)
        if indices.size and (int(indices[-1]) >= h.n or np.any(np.diff(indices) <= 0)):
            raise ValueError(f"corrupt message: indices not strictly increasing in [0, {h.n})")
    elif h.index_encoding == BITMAP:
        raw = np.frombuffer(ibuf, dtype=np.uint8)
        pad = raw.size * 8 - h.n
        if pad and int(raw[-1]) & ((1 << pad) - 1):
            raise ValueError("corrupt message: nonzero padding bits after the index bitmap")
        indices = np.flatnonzero(np.unpackbits(raw, count=h.n))
        if indices.size != h.k:
            raise ValueError(f"corrupt message: bitmap has {indices.size} set bits, k = {h.k}")
    if h.bits == RAW_BITS:
        values = np.frombuffer(vbuf, dtype="<f4").astype(np.float32)
    else:
        values = _unpack_codes(vbuf, h.k, h.bits + 1)
    return h, indices, values
