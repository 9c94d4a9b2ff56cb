"""Compressors of a flat float32 vector: sparsify, then optionally quantise the kept values.

One :class:`Compressor` covers every method as the composition ``C = Q_q ∘ S_k``:

* ``S_k`` keeps ``k = ⌈ratio · n⌉`` coordinates — all of them (``sparsifier="none"``), the
  ``k`` largest magnitudes (``"topk"``) or ``k`` uniformly random ones (``"randk"``,
  optionally rescaled by ``n/k`` to be unbiased), see :mod:`roost.compression.sparsify`;
* ``Q_q`` quantises the ``k`` kept values to ``q``-bit QSGD levels, stochastically
  (unbiased) or to the nearest level, in buckets of ``d`` consecutive kept values (in
  the order they are sent: increasing index) each scaled by its own norm ``||x_b||``
  (QSGD's bucketing, ``d = 512`` by default; ``d >= k`` is one norm ``||S_k(x)||``), or
  sends them as float32 when ``q = 32``, see :mod:`roost.compression.quantize`.

``topk_qsgd`` is TEASQ-Fed's ``Q_q(TopK_s(Δ))`` (Jia et al., CCPE 2024, arXiv 2312.15186).
Its reconstruction error splits into the dropped mass and the quantisation error of the
kept values, ``||x − C(x)||² = Σ_{i∉S} x_i² + Σ_{i∈S} (x_i − Q(x_S)_i)²``.

:meth:`Compressor.encode` produces the real wire message (:mod:`roost.compression.wire`),
:meth:`Compressor.decode` parses and validates it, and :meth:`Compressor.nbytes` gives its
exact length from ``n`` alone, before anything is compressed::

    c = topk_qsgd(ratio=0.1, bits=8)
    msg = c.encode(delta, generator)      # bytes; len(msg) == c.nbytes(delta.numel())
    received = c.decode(msg)              # what the server reconstructs

Everything random (random-k's indices, stochastic rounding) is drawn from the
``torch.Generator`` passed to ``encode``, so a seeded generator gives the same message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from roost.compression.quantize import (
    DEFAULT_BUCKET_SIZE,
    MAX_BUCKET_SIZE,
    Rounding,
    dequantize,
    quantize,
)
from roost.compression.sparsify import num_kept, rand_k_indices, top_k_indices
from roost.compression.wire import RAW_BITS, Header, message_nbytes, pack_message, unpack_message

__all__ = ["Compressor", "Sparsifier", "qsgd", "randk", "topk", "topk_qsgd"]

Sparsifier = Literal["none", "topk", "randk"]
_SPARSIFIER_CODE = {"none": 0, "topk": 1, "randk": 2}
_ROUNDING_CODE = {"stochastic": 0, "nearest": 1}


@dataclass(frozen=True)
class Compressor:
    """``Q_bits ∘ S_ratio`` on a flat float32 vector, with a real wire format.

    Attributes:
        sparsifier: ``"none"`` (dense), ``"topk"`` or ``"randk"``.
        ratio: kept fraction in (0, 1]; ``k = ⌈ratio · n⌉`` (must be 1 for ``"none"``).
        bits: ``q`` in 1..16 (QSGD with ``s = 2^q − 1`` levels), or 32 for float32 values.
        rounding: ``"stochastic"`` (unbiased) or ``"nearest"`` (deterministic, biased).
        rescale: random-k only: multiply the kept values by ``n/k`` (unbiased random-k).
        bucket_size: ``d >= 1``, the kept values per QSGD norm (ignored for ``bits = 32``).
    """

    sparsifier: Sparsifier = "none"
    ratio: float = 1.0
    bits: int = RAW_BITS
    rounding: Rounding = "stochastic"
    rescale: bool = False
    bucket_size: int = DEFAULT_BUCKET_SIZE

    def __post_init__(self) -> None:
        if self.sparsifier not in _SPARSIFIER_CODE:
            raise ValueError(f"sparsifier must be none, topk or randk, got {self.sparsifier!r}")
        if not (isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1):
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio!r}")
        if self.sparsifier == "none" and self.ratio != 1:
            raise ValueError(f"a dense compressor keeps everything; ratio {self.ratio} != 1")
        if isinstance(self.bits, bool) or not (
            isinstance(self.bits, int) and (1 <= self.bits <= 16 or self.bits == RAW_BITS)
        ):
            raise ValueError(f"bits must be an integer in 1..16, or 32, got {self.bits!r}")
        if self.rounding not in _ROUNDING_CODE:
            raise ValueError(f"rounding must be stochastic or nearest, got {self.rounding!r}")
        if self.rescale and self.sparsifier != "randk":
            raise ValueError("rescale (n/k) only applies to the randk sparsifier")
        if isinstance(self.bucket_size, bool) or not (
            isinstance(self.bucket_size, int) and 1 <= self.bucket_size <= MAX_BUCKET_SIZE
        ):
            raise ValueError(
                f"bucket_size must be an integer in 1..{MAX_BUCKET_SIZE}, got {self.bucket_size!r}"
            )

    @property
    def quantizes(self) -> bool:
        return self.bits != RAW_BITS

    @property
    def randomized(self) -> bool:
        """True when :meth:`encode` draws from its generator."""
        return self.sparsifier == "randk" or (self.quantizes and self.rounding == "stochastic")

    def kept(self, n: int) -> int:
        """``k``, the number of coordinates sent of a vector of ``n``."""
        return n if self.sparsifier == "none" else num_kept(n, self.ratio)

    def nbytes(self, n: int) -> int:
        """The exact length of :meth:`encode`'s message for a vector of ``n`` elements:
        32 header bytes (bucket 0's norm included) + indices (none when ``k = n``; else
        ``min(k · itemsize(n), ⌈n/8⌉)``) + values (``4k``, or when quantised ``⌈k (q + 1)
        / 8⌉`` and the ``⌈k/d⌉ − 1`` further float32 norms, ``4 (⌈k/d⌉ − 1)``)."""
        return message_nbytes(n, self.kept(n), self.bits, self._wire_bucket)

    @property
    def _wire_bucket(self) -> int:
        """The bucket size the header carries (0 for raw float32 values)."""
        return self.bucket_size if self.quantizes else 0

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> bytes:
        """The wire message for flat vector ``x`` (any device; read, never modified).

        ``generator`` (CPU) is required when :attr:`randomized`: drawing from torch's
        global generator would make the message depend on unrelated code.
        """
        if x.dim() != 1:
            raise ValueError(f"compressors take a flat vector, got shape {tuple(x.shape)}")
        if self.randomized and generator is None:
            raise ValueError(f"{self.describe()} draws random numbers: pass a torch.Generator")
        flat = x.detach().to("cpu", torch.float32).numpy()
        n = flat.size
        k = self.kept(n)
        indices: np.ndarray | None = None
        values = flat
        if k < n:
            if self.sparsifier == "topk":
                indices = top_k_indices(flat, k)
            else:
                assert generator is not None
                indices = rand_k_indices(n, k, generator)
            values = flat[indices]
            if self.rescale:
                values = (values.astype(np.float64) * (n / k)).astype(np.float32)
        norms = None
        if self.quantizes:
            values, norms = quantize(values, self.bits, self.rounding, generator, self.bucket_size)
        header = Header(
            _SPARSIFIER_CODE[self.sparsifier],
            0,  # the index encoding is derived from (n, k) by pack_message
            self.bits,
            _ROUNDING_CODE[self.rounding] if self.quantizes else 255,
            n,
            k,
            self._wire_bucket,
        )
        return pack_message(header, indices, norms, values)

    def decode(self, message: bytes) -> torch.Tensor:
        """The float32 vector a message reconstructs (zeros where nothing was sent).

        Raises ValueError naming the problem if the message is truncated, over-long or
        corrupt (:func:`~roost.compression.wire.unpack_message`), or was not produced by a
        compressor with these settings (sparsifier, bits, rounding, bucket size, ``k`` for
        its ``n``).
        """
        h, indices, norms, values = unpack_message(message)
        expected = {
            "sparsifier": (h.sparsifier, _SPARSIFIER_CODE[self.sparsifier]),
            "bits": (h.bits, self.bits),
            "rounding": (h.rounding, _ROUNDING_CODE[self.rounding] if self.quantizes else 255),
            "bucket_size": (h.bucket_size, self._wire_bucket),
            "k": (h.k, self.kept(h.n)),
        }
        for name, (got, want) in expected.items():
            if got != want:
                raise ValueError(
                    f"message {name} is {got}, but {self.describe()} sends {want} (n = {h.n})"
                )
        if self.quantizes:
            values = dequantize(values, norms, h.bits, h.bucket_size)
        if indices is None:
            out = values
        else:
            out = np.zeros(h.n, dtype=np.float32)
            out[indices] = values
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``decode(encode(x))`` on ``x``'s device: what the receiver reconstructs."""
        return self.decode(self.encode(x, generator)).to(x.device)

    def describe(self) -> str:
        parts = []
        if self.sparsifier != "none":
            parts.append(
                f"{self.sparsifier}(ratio={self.ratio}{', rescaled' if self.rescale else ''})"
            )
        if self.quantizes:
            parts.append(f"qsgd(bits={self.bits}, {self.rounding}, bucket={self.bucket_size})")
        return " then ".join(parts) or "float32 (no compression)"


def topk(ratio: float) -> Compressor:
    """Top-k sparsification, kept values as float32."""
    return Compressor("topk", ratio)


def randk(ratio: float, rescale: bool = False) -> Compressor:
    """Random-k sparsification; ``rescale=True`` multiplies by ``n/k`` (unbiased)."""
    return Compressor("randk", ratio, rescale=rescale)


def qsgd(
    bits: int, rounding: Rounding = "stochastic", bucket_size: int = DEFAULT_BUCKET_SIZE
) -> Compressor:
    """QSGD quantisation of the whole vector in buckets of ``bucket_size`` values
    (``bits=32``: float32, no quantisation)."""
    return Compressor("none", 1.0, bits, rounding, bucket_size=bucket_size)


def topk_qsgd(
    ratio: float,
    bits: int,
    rounding: Rounding = "stochastic",
    bucket_size: int = DEFAULT_BUCKET_SIZE,
) -> Compressor:
    """TEASQ-Fed's ``Q_q(TopK_s(x))``: top-k, then QSGD on the kept values, one norm per
    ``bucket_size`` of them (in increasing index order)."""
    return Compressor("topk", ratio, bits, rounding, bucket_size=bucket_size)
