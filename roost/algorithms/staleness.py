"""Staleness functions ``s(τ)``: how much a result that is ``τ`` versions old counts.

Xie, Koyejo, Gupta, "Asynchronous Federated Optimization" (FedAsync, 2019, arXiv
1903.03934), §5.2::

    constant     s(τ) = 1
    polynomial   s(τ) = (τ + 1)^(-a)
    hinge        s(τ) = 1                       if τ <= b
                        1 / (a (τ - b) + 1)     otherwise

FedBuff (Nguyen et al., AISTATS 2022) weights each buffered delta by ``1 / sqrt(1 + τ)``,
the polynomial with ``a = 0.5``. FLGo's hinge omits the ``+ 1`` (ALGORITHMS.md §4.8); this
one follows the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from roost.registry import check

__all__ = ["StalenessConfig", "staleness_weight"]

StalenessKind = Literal["constant", "polynomial", "hinge"]


@dataclass(frozen=True)
class StalenessConfig:
    """kind: constant, polynomial or hinge; a and b as in the formulas above."""

    kind: StalenessKind = "polynomial"
    a: float = 0.5
    b: float = 4.0

    def __post_init__(self) -> None:
        check(
            self.kind in ("constant", "polynomial", "hinge"),
            "staleness",
            self.kind,
            "must be constant, polynomial or hinge",
        )
        check(self.a >= 0, "staleness_a", self.a, "must be >= 0")
        check(self.b >= 0, "staleness_b", self.b, "must be >= 0")


def staleness_weight(kind: StalenessKind, tau: int, a: float, b: float) -> float:
    """``s(τ)`` of the module docstring (``τ >= 0``)."""
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((tau + 1.0) ** (-a))
    if kind == "hinge":
        return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise ValueError(f"unknown staleness function {kind!r}")
