"""The wire format of one compressed vector: header, kept indices, norms, packed values.

A message is the bytes a client would really upload; its length is a function of
``(n, k, bits, bucket_size)`` alone (:func:`message_nbytes`), so the simulator knows the
upload size at dispatch, before anything is compressed. Layout, all little-endian::

    offset  size  field
    0       2     magic b"RQ"
    2       1     format version (2)
    3       1     sparsifier code: 0 dense, 1 top-k, 2 random-k (informational)
    4       1     index encoding: 0 dense (k = n), 1 sorted index array, 2 bitmap
    5       1     bits q: 1..16 quantised codes, 32 raw float32 values
    6       1     rounding: 0 stochastic, 1 nearest, 255 none (q = 32)
    7       1     reserved, 0
    8       6     n   (uint48) length of the vector
    14      6     k   (uint48) number of transmitted coordinates, k <= n
    20      4     bucket size d (uint32) of the QSGD norms, >= 1 (0 when q = 32)
    24      4     norm of bucket 0 (float32; 0 when q = 32 or k = 0)
    28      4     CRC-32 of the header bytes 0..27 followed by the body
    32      ...   body: indices, then the norms of buckets 1 .. B − 1, then values

Indices (omitted when ``k = n``): the ``k`` kept positions in increasing order, as the
smallest unsigned integer type holding the largest index ``n − 1`` (uint8 for n <= 2^8,
uint16 for n <= 2^16, uint32, uint64), or a bitmap of ``⌈n/8⌉`` bytes (bit i set iff i is
kept, ``numpy.packbits`` order: most significant bit first) when that is strictly smaller.

Norms (quantised values only): the ``k`` sent values form ``B = ⌈k/d⌉`` buckets of ``d``
consecutive values, in the order they are sent (the last may be shorter), each with its
own float32 norm (:mod:`roost.compression.quantize`). Bucket 0's norm sits in the
header, the other ``B − 1`` follow the indices as float32, ``4 (B − 1)`` bytes; a norm is
a finite number >= 0, or NaN for a bucket that was not finite.

Values: ``4k`` bytes of float32 when ``q = 32``; otherwise ``k`` codes of ``q + 1`` bits each
(a sign bit above ``q`` level bits, see :mod:`roost.compression.quantize`), concatenated
most significant bit first and zero-padded to ``⌈k (q + 1) / 8⌉`` bytes.

Version 1 had one norm for the whole vector and 64-bit ``n`` and ``k``; version 2 narrows
them to 48 bits (2^48 − 1 ≈ 2.8 · 10^14 coordinates, a petabyte of float32) to carry the
bucket size in the same 32 bytes, so a message of one bucket (``k <= d``) is exactly as
long as before and each further bucket adds 4 bytes.
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
    "MAX_LENGTH",
    "Header",
    "index_dtype",
    "index_encoding",
    "index_nbytes",
    "message_nbytes",
    "norms_nbytes",
    "num_norms",
    "pack_message",
    "unpack_message",
    "value_nbytes",
]

MAGIC = b"RQ"
FORMAT_VERSION = 2
HEADER = struct.Struct("<2sBBBBBB6s6sIf")
HEADER_NBYTES = HEADER.size + 4  # + CRC-32
DENSE, INDEX_ARRAY, BITMAP = 0, 1, 2
SPARSIFIERS = {0: "dense", 1: "topk", 2: "randk"}
ROUNDINGS = {0: "stochastic", 1: "nearest", 255: "none"}
RAW_BITS = 32
MAX_LENGTH = 2**48 - 1
"""The largest ``n`` (and ``k``) a message carries (uint48)."""
MAX_BUCKET = 2**32 - 1


@dataclass(frozen=True)
class Header:
    """The decoded fixed-size header of a message (see the module docstring); the norms,
    bucket 0's included, are passed and returned separately."""

    sparsifier: int
    index_encoding: int
    bits: int
    rounding: int
    n: int
    k: int
    bucket_size: int = 0


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


def num_norms(k: int, bits: int, bucket_size: int) -> int:
    """``B = ⌈k/d⌉`` norms of ``k`` quantised values (0 for raw float32 values)."""
    if bits == RAW_BITS:
        return 0
    if bucket_size < 1:
        raise ValueError(f"quantised values need a bucket size >= 1, got {bucket_size}")
    return (k + bucket_size - 1) // bucket_size


def norms_nbytes(k: int, bits: int, bucket_size: int) -> int:
    """``4 (B − 1)``: the norms after the header's (none for one bucket or raw values)."""
    return 4 * max(num_norms(k, bits, bucket_size) - 1, 0)


def value_nbytes(k: int, bits: int) -> int:
    """``4k`` for raw float32, else ``⌈k (q + 1) / 8⌉`` (q level bits and a sign bit)."""
    return 4 * k if bits == RAW_BITS else (k * (bits + 1) + 7) // 8


def message_nbytes(n: int, k: int, bits: int, bucket_size: int = 0) -> int:
    """Exact length of a message: header + indices + norms + values
    (``bucket_size`` >= 1 is needed when ``bits`` quantises, and ignored for ``bits = 32``)."""
    return (
        HEADER_NBYTES
        + index_nbytes(n, k)
        + norms_nbytes(k, bits, bucket_size)
        + value_nbytes(k, bits)
    )


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


def _check_norm(norm: float, bucket: int) -> None:
    if math.isnan(norm):
        return
    if norm < 0:
        raise ValueError(f"corrupt message: negative quantisation norm {norm} of bucket {bucket}")
    if math.isinf(norm):
        raise ValueError(
            f"corrupt message: quantisation norm {norm} of bucket {bucket} (a norm is a "
            f"finite number >= 0, or NaN for a bucket that was not finite)"
        )


def pack_message(
    header: Header, indices: np.ndarray | None, norms: np.ndarray | None, values: np.ndarray
) -> bytes:
    """Serialise one message. ``indices``: sorted int64 positions (None when ``k = n``);
    ``norms``: the float32 norm of each bucket of ``header.bucket_size`` sent values
    (``⌈k/d⌉`` of them; None or empty for raw values); ``values``: float32 values
    (q = 32) or uint32 codes of ``q + 1`` bits."""
    n, k, bits = header.n, header.k, header.bits
    if not 0 <= k <= n <= MAX_LENGTH:
        raise ValueError(f"need 0 <= k <= n <= 2^48 - 1, got n = {n}, k = {k}")
    bucket = 0 if bits == RAW_BITS else header.bucket_size
    if bits != RAW_BITS and not 1 <= bucket <= MAX_BUCKET:
        raise ValueError(f"bucket size must be in 1..2^32 - 1, got {bucket}")
    norm_arr = np.zeros(0, dtype="<f4") if norms is None else np.asarray(norms, dtype="<f4")
    norm_arr = norm_arr.reshape(-1)
    expected_norms = num_norms(k, bits, bucket)
    if norm_arr.size != expected_norms:
        raise ValueError(
            f"{k} values in buckets of {bucket} need {expected_norms} norm(s), got {norm_arr.size}"
        )
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
    parts.append(norm_arr[1:].tobytes())
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
        n.to_bytes(6, "little"),
        k.to_bytes(6, "little"),
        bucket,
        float(norm_arr[0]) if norm_arr.size else 0.0,
    )
    crc = zlib.crc32(body, zlib.crc32(head))
    message = head + struct.pack("<I", crc) + body
    assert len(message) == message_nbytes(n, k, bits, bucket)
    return message


def _read_header(message: bytes) -> tuple[Header, float]:
    if len(message) < HEADER_NBYTES:
        raise ValueError(
            f"truncated message: {len(message)} bytes, the header alone is {HEADER_NBYTES}"
        )
    magic, version, sparsifier, enc, bits, rounding, reserved, n6, k6, bucket, norm = (
        HEADER.unpack_from(message)
    )
    n, k = int.from_bytes(n6, "little"), int.from_bytes(k6, "little")
    if magic != MAGIC:
        raise ValueError(f"not a compressed-vector message: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"unsupported format version {version} (this decoder reads {FORMAT_VERSION})"
        )
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
    if bits == RAW_BITS:
        if bucket != 0:
            raise ValueError(
                f"corrupt header: bucket size {bucket} with bits 32 (raw float32 values "
                f"have no buckets: expected 0)"
            )
        if norm != 0:
            raise ValueError(f"corrupt header: norm {norm} with bits 32 (expected 0)")
    else:
        if bucket == 0:
            raise ValueError(
                "corrupt header: bucket size 0 (quantised values need a bucket size >= 1)"
            )
        if k == 0 and norm != 0:
            raise ValueError(f"corrupt header: norm {norm} with k = 0 (no bucket: expected 0)")
        _check_norm(norm, 0)
    return Header(sparsifier, enc, bits, rounding, n, k, bucket), norm


def unpack_message(
    message: bytes,
) -> tuple[Header, np.ndarray | None, np.ndarray, np.ndarray]:
    """Parse and validate a message: ``(header, indices or None, norms, values or codes)``
    (``norms``: float32, one per bucket, empty for raw values).

    Raises ValueError naming the problem for a truncated or over-long message (one too
    short for its norms says so), a bad header field (a bucket size of 0 for quantised
    values, a negative or infinite norm), a checksum mismatch, or indices that are not
    strictly increasing in ``[0, n)`` (a bitmap with the wrong number of set bits).
    """
    message = bytes(message)
    h, norm0 = _read_header(message)
    expected = message_nbytes(h.n, h.k, h.bits, h.bucket_size)
    if len(message) != expected:
        what = "truncated" if len(message) < expected else "over-long"
        detail = ""
        norms_end = (
            HEADER_NBYTES + index_nbytes(h.n, h.k) + norms_nbytes(h.k, h.bits, h.bucket_size)
        )
        if len(message) < norms_end:
            b = num_norms(h.k, h.bits, h.bucket_size)
            detail = f"; the norms array of the {b} buckets would end at byte {norms_end}"
        raise ValueError(
            f"{what} message: {len(message)} bytes, but n = {h.n}, k = {h.k}, "
            f"bits = {h.bits}, bucket_size = {h.bucket_size} imply {expected}{detail}"
        )
    (crc,) = struct.unpack_from("<I", message, HEADER.size)
    body = message[HEADER_NBYTES:]
    if zlib.crc32(body, zlib.crc32(message[: HEADER.size])) != crc:
        raise ValueError("corrupt message: CRC-32 mismatch")
    isize = index_nbytes(h.n, h.k)
    nsize = norms_nbytes(h.k, h.bits, h.bucket_size)
    ibuf, nbuf, vbuf = body[:isize], body[isize : isize + nsize], body[isize + nsize :]
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
    norms = np.zeros(0, dtype=np.float32)
    if num_norms(h.k, h.bits, h.bucket_size):
        rest = np.frombuffer(nbuf, dtype="<f4").astype(np.float32)
        bad = np.flatnonzero(~np.isnan(rest) & ~((rest >= 0) & np.isfinite(rest)))
        if bad.size:
            _check_norm(float(rest[bad[0]]), int(bad[0]) + 1)
        norms = np.concatenate([np.array([norm0], dtype=np.float32), rest])
    if h.bits == RAW_BITS:
        values = np.frombuffer(vbuf, dtype="<f4").astype(np.float32)
    else:
        values = _unpack_codes(vbuf, h.k, h.bits + 1)
    return h, indices, norms, values
