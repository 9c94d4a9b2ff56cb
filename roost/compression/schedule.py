"""Decaying compression parameters over model versions (TEASQ-Fed's dynamic decay).

TEASQ-Fed (Jia et al., CCPE 2024, arXiv 2312.15186) adapts its compression parameters
with "a dynamic decaying approach"; the formulas below are the inferred ones of
ALGORITHMS.md §2.8. At model version ``t`` (rounds completed, or the server version an
asynchronous client starts from)::

    tighten (more compression over time):
        s_t = max(s_min, s_0 · γ_s^t)          kept fraction
        q_t = max(q_min, q_0 − ⌊t / T_q⌋)      bits
    relax (less compression over time):
        s_t = min(s_max, s_0 · γ_s^{−t})
        q_t = min(q_max, q_0 + ⌊t / T_q⌋)

**The direction is unknown**: the paper text available (abstract and summaries) does not
say whether compression becomes more aggressive as training converges (small late updates
tolerate it) or less (late fine-tuning needs precision); ALGORITHMS.md §2.8 and §6 item 7
leave it open, so both are exposed and neither is the default (``"constant"`` is).
``ratio_limit``/``bits_limit`` are ``s_min``/``q_min`` when tightening and
``s_max``/``q_max`` when relaxing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["CompressionSchedule", "Direction"]

Direction = Literal["constant", "tighten", "relax"]


@dataclass(frozen=True)
class CompressionSchedule:
    """Kept fraction ``s_t`` and bits ``q_t`` as functions of the version ``t >= 0``.

    Attributes:
        direction: ``"constant"`` (``s_t = s_0``, ``q_t = q_0``), ``"tighten"`` or ``"relax"``.
        ratio: ``s_0`` in (0, 1].
        bits: ``q_0`` in 1..16 (quantised) or 32 (float32; never scheduled).
        ratio_gamma: ``γ_s`` in (0, 1].
        ratio_limit: ``s_min`` (tighten) or ``s_max`` (relax), in (0, 1].
        bits_period: ``T_q >= 1`` versions per one-bit step.
        bits_limit: ``q_min`` (tighten) or ``q_max`` (relax), in 1..16.
    """

    direction: Direction = "constant"
    ratio: float = 1.0
    bits: int = 32
    ratio_gamma: float = 1.0
    ratio_limit: float = 1.0
    bits_period: int = 1
    bits_limit: int = 16

    def __post_init__(self) -> None:
        if self.direction not in ("constant", "tighten", "relax"):
            raise ValueError(f"direction must be constant, tighten or relax: {self.direction!r}")
        if not 0 < self.ratio_gamma <= 1:
            raise ValueError(f"ratio_gamma must be in (0, 1], got {self.ratio_gamma}")
        if self.bits_period < 1:
            raise ValueError(f"bits_period must be >= 1, got {self.bits_period}")
        if self.direction == "tighten" and (
            self.ratio_limit > self.ratio or (self.bits != 32 and self.bits_limit > self.bits)
        ):
            raise ValueError("a tightening schedule needs ratio_limit <= ratio, bits_limit <= bits")
        if self.direction == "relax" and (
            self.ratio_limit < self.ratio or (self.bits != 32 and self.bits_limit < self.bits)
        ):
            raise ValueError("a relaxing schedule needs ratio_limit >= ratio, bits_limit >= bits")

    def ratio_at(self, t: int) -> float:
        """``s_t``; never outside (0, 1] nor past its limit."""
        if t < 0:
            raise ValueError(f"version must be >= 0, got {t}")
        if self.direction == "constant" or self.ratio_gamma == 1:
            return self.ratio
        if self.direction == "tighten":
            # γ^t underflows to 0 for huge t; the max() then returns the floor, as it should
            return max(self.ratio_limit, self.ratio * self.ratio_gamma**t)
        log_s = math.log(self.ratio) - t * math.log(self.ratio_gamma)
        return min(self.ratio_limit, math.exp(min(log_s, 0.0)))

    def bits_at(self, t: int) -> int:
        """``q_t``; 32 (float32 values) stays 32."""
        if t < 0:
            raise ValueError(f"version must be >= 0, got {t}")
        if self.direction == "constant" or self.bits == 32:
            return self.bits
        step = t // self.bits_period
        if self.direction == "tighten":
            return max(self.bits_limit, self.bits - step)
        return min(self.bits_limit, self.bits + step)
