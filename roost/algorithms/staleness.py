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

from typing import Literal

from roost.registry import check

__all__ = ["StalenessKind", "check_staleness", "staleness_weight"]

StalenessKind = Literal["constant", "polynomial", "hinge"]


def check_staleness(kind: str, a: float, b: float) -> None:
    """Validate a config's ``staleness``, ``staleness_a`` and ``staleness_b`` fields."""
    check(
        kind in ("constant", "polynomial", "hinge"),
        "staleness",
        kind,
        "must be constant, polynomial or hinge",
    )
    check(a >= 0, "staleness_a", a, "must be >= 0")
    check(b >= 0, "staleness_b", b, "must be >= 0")


def staleness_weight(kind: StalenessKind, tau: float, a: float, b: float) -> float:
    """``s(τ)`` of the module docstring (``τ >= 0``; a real ``τ`` is allowed, e.g. an
    expected staleness to normalise by)."""
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((tau + 1.0) ** (-a))
    if kind == "hinge":
        return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise ValueError(f"unknown staleness function {kind!r}")
