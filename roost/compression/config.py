"""The validated settings of update compression, and the compressor they give at a version.

Meant to become ``algorithm.compression.*`` (``algorithm.compression=topk_qsgd``,
``algorithm.compression.ratio=0.1``, …); field names follow the maths of
:mod:`roost.compression.compressors` and :mod:`roost.compression.schedule`::

    method       none | topk | randk | qsgd | topk_qsgd
    ratio        s_0, kept fraction in (0, 1]              (topk, randk, topk_qsgd)
    bits         q_0 in 1..16, or 32 = float32 values      (qsgd, topk_qsgd)
    rounding     stochastic (unbiased) | nearest            (qsgd, topk_qsgd)
    bucket_size  d >= 1 values per QSGD norm (512)           (qsgd, topk_qsgd)
    rescale      random-k values × n/k (unbiased)           (randk)
    error_feedback  keep e_k ← Δ + e_k − C(Δ + e_k) per client
    schedule     constant | tighten | relax                 (direction of the decay)
    ratio_gamma  γ_s in (0, 1];  ratio_limit  s_min / s_max in (0, 1]
    bits_period  T_q >= 1;       bits_limit   q_min / q_max in 1..16

Defaults are TEASQ-Fed's inferred ones (ALGORITHMS.md §2.8: s_0 = 0.1, q_0 = 8,
γ_s = 0.99); ``ratio_limit = 0.01``, ``bits_period = 50`` and ``bits_limit = 2`` are this
module's guesses (the source gives none). ``bucket_size = 512`` is QSGD's (Alistarh et al.
2017, the bucket size of their experiments): each run of ``d`` consecutive quantised values
has its own norm, so the variance is at most ``min(d/s², √d/s) ||x||²`` instead of
``min(n/s², √n/s) ||x||²`` (:mod:`roost.compression.quantize`), for 4 bytes per further
bucket; ``bucket_size`` >= the number of values sent is one norm for all of them.
``method="none"`` ignores every other field except that ``error_feedback`` must then be
false; the non-quantising methods ignore ``bucket_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from roost.compression.compressors import Compressor, Sparsifier
from roost.compression.quantize import DEFAULT_BUCKET_SIZE, MAX_BUCKET_SIZE, Rounding
from roost.compression.schedule import CompressionSchedule, Direction
from roost.registry import check

__all__ = ["METHODS", "CompressionConfig", "Method"]

Method = Literal["none", "topk", "randk", "qsgd", "topk_qsgd"]
METHODS: tuple[Method, ...] = ("none", "topk", "randk", "qsgd", "topk_qsgd")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class CompressionConfig:
    """How client updates are compressed (see the module docstring for each field)."""

    method: Method = "none"
    ratio: float = 0.1
    bits: int = 8
    rounding: Rounding = "stochastic"
    bucket_size: int = DEFAULT_BUCKET_SIZE
    rescale: bool = False
    error_feedback: bool = False
    schedule: Direction = "constant"
    ratio_gamma: float = 0.99
    ratio_limit: float = 0.01
    bits_period: int = 50
    bits_limit: int = 2

    def __post_init__(self) -> None:
        check(self.method in METHODS, "method", self.method, f"allowed: {', '.join(METHODS)}")
        check(
            _is_number(self.ratio) and 0 < self.ratio <= 1,
            "ratio",
            self.ratio,
            "must be a number in (0, 1] (the kept fraction)",
        )
        check(
            _is_int(self.bits) and (1 <= self.bits <= 16 or self.bits == 32),
            "bits",
            self.bits,
            "must be an integer in 1..16, or 32 for float32 values",
        )
        check(
            self.rounding in ("stochastic", "nearest"),
            "rounding",
            self.rounding,
            "allowed: stochastic, nearest",
        )
        check(
            _is_int(self.bucket_size) and 1 <= self.bucket_size <= MAX_BUCKET_SIZE,
            "bucket_size",
            self.bucket_size,
            f"must be an integer >= 1 (values per QSGD norm; at most {MAX_BUCKET_SIZE})",
        )
        for name in ("rescale", "error_feedback"):
            value = getattr(self, name)
            check(isinstance(value, bool), name, value, "expected true or false")
        check(
            not self.rescale or self.method == "randk",
            "rescale",
            self.rescale,
            f"only applies to method=randk (method={self.method})",
        )
        check(
            not self.error_feedback or self.method != "none",
            "error_feedback",
            self.error_feedback,
            "needs a compressing method (method=none sends updates exactly)",
        )
        check(
            self.schedule in ("constant", "tighten", "relax"),
            "schedule",
            self.schedule,
            "allowed: constant, tighten, relax",
        )
        check(
            _is_number(self.ratio_gamma) and 0 < self.ratio_gamma <= 1,
            "ratio_gamma",
            self.ratio_gamma,
            "must be a number in (0, 1]",
        )
        check(
            _is_number(self.ratio_limit) and 0 < self.ratio_limit <= 1,
            "ratio_limit",
            self.ratio_limit,
            "must be a number in (0, 1]",
        )
        check(
            _is_int(self.bits_period) and self.bits_period >= 1,
            "bits_period",
            self.bits_period,
            "must be an integer >= 1",
        )
        check(
            _is_int(self.bits_limit) and 1 <= self.bits_limit <= 16,
            "bits_limit",
            self.bits_limit,
            "must be an integer in 1..16",
        )
        if self.schedule == "tighten":
            check(
                not self.uses_ratio or self.ratio_limit <= self.ratio,
                "ratio_limit",
                self.ratio_limit,
                f"schedule=tighten decays the kept fraction down to s_min: needs <= ratio "
                f"({self.ratio})",
            )
            check(
                not self.scheduled_bits or self.bits_limit <= self.bits,
                "bits_limit",
                self.bits_limit,
                f"schedule=tighten lowers the bits down to q_min: needs <= bits ({self.bits})",
            )
        elif self.schedule == "relax":
            check(
                not self.uses_ratio or self.ratio_limit >= self.ratio,
                "ratio_limit",
                self.ratio_limit,
                f"schedule=relax grows the kept fraction up to s_max: needs >= ratio "
                f"({self.ratio})",
            )
            check(
                not self.scheduled_bits or self.bits_limit >= self.bits,
                "bits_limit",
                self.bits_limit,
                f"schedule=relax raises the bits up to q_max: needs >= bits ({self.bits})",
            )

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def uses_ratio(self) -> bool:
        """True for the sparsifying methods (top-k, random-k, top-k + QSGD)."""
        return self.method in ("topk", "randk", "topk_qsgd")

    @property
    def uses_bits(self) -> bool:
        """True for the quantising methods (QSGD, top-k + QSGD)."""
        return self.method in ("qsgd", "topk_qsgd")

    @property
    def scheduled_bits(self) -> bool:
        return self.uses_bits and self.bits != 32

    def make_schedule(self) -> CompressionSchedule:
        return CompressionSchedule(
            direction=self.schedule,
            ratio=self.ratio if self.uses_ratio else 1.0,
            bits=self.bits if self.uses_bits else 32,
            ratio_gamma=self.ratio_gamma,
            ratio_limit=self.ratio_limit if self.uses_ratio else 1.0,
            bits_period=self.bits_period,
            bits_limit=self.bits_limit,
        )

    def compressor(self, version: int = 0) -> Compressor | None:
        """The compressor used at model version ``version`` (None for ``method=none``)."""
        if not self.enabled:
            return None
        schedule = self.make_schedule()
        ratio = schedule.ratio_at(version)
        bits = schedule.bits_at(version)
        if self.method == "qsgd":
            return Compressor("none", 1.0, bits, self.rounding, bucket_size=self.bucket_size)
        sparsifier: Sparsifier = "randk" if self.method == "randk" else "topk"
        quantized = self.method == "topk_qsgd"
        return Compressor(
            sparsifier,
            ratio,
            bits if quantized else 32,
            self.rounding,
            self.rescale,
            self.bucket_size if quantized else DEFAULT_BUCKET_SIZE,
        )
