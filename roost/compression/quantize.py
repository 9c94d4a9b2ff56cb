"""Quantisation of a vector to ``q``-bit levels of the norms of its buckets (QSGD).

Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-Efficient SGD via Gradient
Quantization and Encoding", NeurIPS 2017 (arXiv 1610.02132), §3. With ``s = 2^q − 1``
levels, the vector is cut into *buckets* of ``d`` consecutive values (``x_b``; the last one
may be shorter), each quantised against its own norm. For ``i`` in bucket ``b``, with
``r_i = s |x_i| / ||x_b||₂ ∈ [0, s]`` and ``l_i = ⌊r_i⌋``::

    Q_s(x)_i = ||x_b||₂ · sgn(x_i) · ξ_i / s,
    ξ_i = l_i + 1  with probability  r_i − l_i,   l_i  otherwise      (stochastic)
    ξ_i = ⌊r_i + 1/2⌋                                                 (nearest)

Stochastic rounding is unbiased, ``E[Q_s(x)] = x``, with ``|Q_s(x)_i − x_i| < ||x_b||/s``
(one level spacing of its bucket) and, per bucket (QSGD Lemma 3.1 applied to ``x_b``)::

    E||Q_s(x_b) − x_b||² <= min(d/s², √d/s) ||x_b||²,
    E||Q_s(x) − x||²     <= Σ_b min(d_b/s², √d_b/s) ||x_b||²  <=  min(d/s², √d/s) ||x||²

(``d_b <= d`` the size of bucket ``b``). With one norm for the whole vector (``d = n``) the
factor is ``min(n/s², √n/s)``: for a model of millions of values and few bits almost
every coordinate rounds to 0 and the variance is ``√n/s`` times the update's energy.
Buckets bound it by ``√d/s`` at the price of one float32 norm per ``d`` values; the
paper's experiments use ``d = 512`` (:data:`DEFAULT_BUCKET_SIZE`). Nearest rounding is
biased but deterministic, with ``|Q_s(x)_i − x_i| <= ||x_b||/(2s)``.

Wire form: per coordinate a code of ``q + 1`` bits, ``sign << q | ξ_i`` (sign 1 for a
negative value with ``ξ_i > 0``), and one float32 norm per bucket. Each float32 norm is
rounded *up* from the float64 norm of its bucket, so ``r_i <= s`` always holds for the
scale the decoder uses and the unbiasedness is exact with respect to it. ``q = 1`` gives
ternary values ``{−||x_b||, 0, +||x_b||}`` (as in TernGrad).

Random draws: stochastic rounding draws one uniform float64 per coordinate, ``u_i`` for
coordinate ``i`` in order, from the task's generator, whatever the bucket size (nothing
is drawn when no bucket has a positive, finite norm). So ``ξ_i`` depends only on ``x_i``,
its bucket's norm and ``u_i``, and ``bucket_size >= n`` gives exactly the codes and norm
of the single-norm quantisation.

A bucket holding NaN or ±inf (or whose norm overflows float32) is sent with norm NaN and
every code 0; it decodes to all NaN, so the server sees a diverged update rather than a
silently finite one.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

__all__ = [
    "DEFAULT_BUCKET_SIZE",
    "MAX_BUCKET_SIZE",
    "Rounding",
    "bucket_norms",
    "dequantize",
    "levels",
    "num_buckets",
    "quantize",
]

Rounding = Literal["stochastic", "nearest"]

DEFAULT_BUCKET_SIZE = 512
"""QSGD's bucket size ``d`` in its experiments (Alistarh et al. 2017, §5)."""
MAX_BUCKET_SIZE = 2**32 - 1
"""The largest bucket size the wire format carries (a uint32)."""


def levels(bits: int) -> int:
    """``s = 2^q − 1`` quantisation levels above 0 for ``q`` bits (``1 <= q <= 16``)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    return (1 << bits) - 1


def _bucket_size(n: int, bucket_size: int | None) -> int:
    """``d``, checked; ``None`` means one bucket of the whole vector."""
    if bucket_size is None:
        return max(n, 1)
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, (int, np.integer)):
        raise ValueError(f"bucket_size must be an integer >= 1, got {bucket_size!r}")
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    return int(bucket_size)


def num_buckets(n: int, bucket_size: int | None) -> int:
    """``⌈n / d⌉`` buckets of ``n`` values (0 for an empty vector)."""
    d = _bucket_size(n, bucket_size)
    return (n + d - 1) // d


def _bucket_counts(n: int, d: int) -> np.ndarray:
    """The size of each bucket: ``d``, …, ``d``, and the remainder."""
    b = (n + d - 1) // d
    counts = np.full(b, d, dtype=np.int64)
    if b:
        counts[-1] = n - d * (b - 1)
    return counts


def bucket_norms(x: np.ndarray, bucket_size: int | None = None) -> np.ndarray:
    """The float32 norm of each bucket, each the smallest float32 >= its ``||x_b||₂``
    (computed in float64); NaN for a bucket that is not finite (or whose norm overflows
    float32). ``None``: one bucket.

    A single bucket's sum of squares is ``np.dot(x, x)`` (what ``np.linalg.norm`` does, so
    ``bucket_size >= n`` reproduces the unbucketed norm bit for bit); several buckets are
    summed row by row (``einsum``, vectorised: the cost is O(n) whatever ``d``), each sum a
    function of its own bucket only.
    """
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    d = _bucket_size(x.size, bucket_size)
    x64 = x.astype(np.float64)
    b = (x.size + d - 1) // d
    if b <= 1:  # one bucket: the dot product np.linalg.norm computes, as unbucketed QSGD
        sq = np.array([np.dot(x64, x64)] if b else [], dtype=np.float64)
    else:  # each full bucket's own sum of squares, then the shorter last one
        full = x.size // d
        rows = x64[: full * d].reshape(full, d)
        tail = x64[full * d :]
        sq = np.concatenate([np.einsum("ij,ij->i", rows, rows), [np.dot(tail, tail)]])
        sq = sq[:b]
    norm64 = np.sqrt(sq)
    with np.errstate(over="ignore", invalid="ignore"):
        norm32 = norm64.astype(np.float32)
        low = norm32.astype(np.float64) < norm64
        norm32[low] = np.nextafter(norm32[low], np.float32(np.inf))
    norm32[~np.isfinite(norm32)] = np.float32(np.nan)
    return norm32


def quantize(
    x: np.ndarray,
    bits: int,
    rounding: Rounding = "stochastic",
    generator: torch.Generator | None = None,
    bucket_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, norms)``: uint32 codes of ``bits + 1`` bits and the float32 norm of each
    bucket of ``bucket_size`` consecutive values (``⌈n / d⌉`` of them; ``None``: one norm
    for the whole vector, as the unbucketed QSGD).

    Stochastic rounding draws one uniform float64 per coordinate from ``generator``
    (required: the result must be a function of the seed), see the module docstring.
    """
    s = levels(bits)
    if rounding not in ("stochastic", "nearest"):
        raise ValueError(f"rounding must be 'stochastic' or 'nearest', got {rounding!r}")
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    d = _bucket_size(n, bucket_size)
    norms = bucket_norms(x, d)
    codes = np.zeros(n, dtype=np.uint32)
    live = np.isfinite(norms) & (norms > 0)  # buckets with something to quantise
    if not live.any():
        return codes, norms
    counts = _bucket_counts(n, d)
    mask = np.repeat(live, counts)
    factor = np.repeat(np.where(live, s / np.where(live, norms, 1).astype(np.float64), 0), counts)
    r = np.zeros(n, dtype=np.float64)
    r[mask] = np.abs(x[mask].astype(np.float64)) * factor[mask]
    if rounding == "stochastic":
        if generator is None:
            raise ValueError("stochastic quantisation needs a seeded torch.Generator")
        floor = np.floor(r)
        u = torch.rand(n, generator=generator, dtype=torch.float64).numpy()
        level = floor + (u < r - floor)
    else:
        level = np.floor(r + 0.5)
    level = np.minimum(level, s).astype(np.uint32)
    sign = ((x < 0) & (level > 0)).astype(np.uint32)
    return (sign << np.uint32(bits)) | level, norms


def dequantize(
    codes: np.ndarray,
    norms: np.ndarray,
    bits: int,
    bucket_size: int | None = None,
) -> np.ndarray:
    """The float32 values ``sgn · ||x_b|| · ξ / s`` of ``bits + 1``-bit codes, with
    ``norms[b]`` the norm of bucket ``b`` (``⌈n / d⌉`` of them)."""
    s = levels(bits)
    codes = np.asarray(codes, dtype=np.uint32).reshape(-1)
    norms = np.asarray(norms, dtype=np.float32).reshape(-1)
    n = codes.size
    d = _bucket_size(n, bucket_size)
    counts = _bucket_counts(n, d)
    if norms.size != counts.size:
        raise ValueError(
            f"{n} codes in buckets of {d} need {counts.size} norm(s), got {norms.size}"
        )
    level = (codes & np.uint32(s)).astype(np.float64)
    negative = (codes >> np.uint32(bits)) & np.uint32(1)
    values = level * np.repeat(norms.astype(np.float64) / s, counts)
    values[negative.astype(bool)] *= -1.0
    return values.astype(np.float32)
