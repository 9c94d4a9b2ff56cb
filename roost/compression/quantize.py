"""Quantisation of a vector to ``q``-bit levels of its norm (QSGD).

Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-Efficient SGD via Gradient
Quantization and Encoding", NeurIPS 2017 (arXiv 1610.02132). With ``s = 2^q − 1`` levels
and ``r_i = s |x_i| / ||x||₂ ∈ [0, s]``, ``l_i = ⌊r_i⌋``::

    Q_s(x)_i = ||x||₂ · sgn(x_i) · ξ_i / s,
    ξ_i = l_i + 1  with probability  r_i − l_i,   l_i  otherwise      (stochastic)
    ξ_i = ⌊r_i + 1/2⌋                                                 (nearest)

Stochastic rounding is unbiased, ``E[Q_s(x)] = x``, with ``|Q_s(x)_i − x_i| < ||x||/s``
(one level spacing) and ``E||Q_s(x) − x||² <= min(n/s², √n/s) ||x||²`` (QSGD Lemma 3.1);
nearest rounding is biased but deterministic, with ``|Q_s(x)_i − x_i| <= ||x||/(2s)``.

Wire form: per coordinate a code of ``q + 1`` bits, ``sign << q | ξ_i`` (sign 1 for a
negative value with ``ξ_i > 0``), and one float32 norm. The float32 norm is rounded *up*
from the float64 norm, so ``r_i <= s`` always holds for the scale the decoder uses and the
unbiasedness is exact with respect to it. ``q = 1`` gives ternary values ``{−||x||, 0,
+||x||}`` (as in TernGrad).

A vector holding NaN or ±inf is sent with norm NaN and every code 0; it decodes to all
NaN, so the server sees a diverged update rather than a silently finite one.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

__all__ = ["Rounding", "dequantize", "levels", "quantize"]

Rounding = Literal["stochastic", "nearest"]


def levels(bits: int) -> int:
    """``s = 2^q − 1`` quantisation levels above 0 for ``q`` bits (``1 <= q <= 16``)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    return (1 << bits) - 1


def _norm_up(x: np.ndarray) -> float:
    """The smallest float32 >= ``||x||₂`` (computed in float64); NaN if ``x`` is not finite."""
    norm64 = float(np.linalg.norm(x.astype(np.float64)))
    norm32 = np.float32(norm64)
    if float(norm32) < norm64:
        norm32 = np.nextafter(norm32, np.float32(np.inf))
    return float(norm32) if math.isfinite(float(norm32)) else math.nan


def quantize(
    x: np.ndarray,
    bits: int,
    rounding: Rounding = "stochastic",
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, float]:
    """``(codes, norm)``: uint32 codes of ``bits + 1`` bits and the float32 norm of ``x``.

    Stochastic rounding draws one uniform float64 per coordinate from ``generator``
    (required: the result must be a function of the seed).
    """
    s = levels(bits)
    x = np.asarray(x, dtype=np.float32)
    norm = _norm_up(x)
    if math.isnan(norm) or norm == 0.0 or x.size == 0:
        return np.zeros(x.size, dtype=np.uint32), (norm if x.size else 0.0)
    r = np.abs(x.astype(np.float64)) * (s / norm)
    if rounding == "stochastic":
        if generator is None:
            raise ValueError("stochastic quantisation needs a seeded torch.Generator")
        floor = np.floor(r)
        u = torch.rand(x.size, generator=generator, dtype=torch.float64).numpy()
        level = floor + (u < r - floor)
    elif rounding == "nearest":
        level = np.floor(r + 0.5)
    else:
        raise ValueError(f"rounding must be 'stochastic' or 'nearest', got {rounding!r}")
    level = np.minimum(level, s).astype(np.uint32)
    sign = ((x < 0) & (level > 0)).astype(np.uint32)
    return (sign << np.uint32(bits)) | level, norm


def dequantize(codes: np.ndarray, norm: float, bits: int) -> np.ndarray:
    """The float32 values ``sgn · norm · ξ / s`` of ``bits + 1``-bit codes."""
    s = levels(bits)
    codes = np.asarray(codes, dtype=np.uint32)
    level = (codes & np.uint32(s)).astype(np.float64)
    negative = (codes >> np.uint32(bits)) & np.uint32(1)
    values = level * (norm / s)
    values[negative.astype(bool)] *= -1.0
    return values.astype(np.float32)
