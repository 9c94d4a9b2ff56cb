"""PiPar's pipeline model of one iteration, and its automated parameter selection (APS).

One iteration of a device with split point ``s`` and ``N`` micro-batches has six kinds of
stage per micro-batch ``j`` (ALGORITHMS.md §2.1, from PiPar's ``util/profile.py``): device
forward ``CF_j``, uplink ``UP_j``, server forward ``SF_j`` and backward ``SB_j``, downlink
``DN_j`` and device backward ``CB_j``. Each lasts ``1/N`` of its whole-batch total
(``C_f, U, S_f, S_b, D, C_b``). A stage starts when its predecessors end:

    CF_j <- CF_{j-1}                 the device forwards the micro-batches in order
    UP_j <- CF_j, UP_{j-1}           the uplink sends them in order
    SF_j <- UP_j, SB_{j-1}           the server takes them in order, one at a time
    SB_j <- SF_j
    DN_j <- SB_j, DN_{j-1}           the downlink returns the gradients in order
    CB_j <- DN_j, CB_{j-1}, CF_N     the device back-propagates them in order, after its
                                     last forward (it forwards all N first)

and the iteration's time (the makespan) is when ``CB_N`` ends. Computed in one pass over
``j`` (every predecessor has a smaller ``j`` or is an earlier stage of the same ``j``):
``O(N)``, where the reference code's recursion without memoisation is exponential.

With ``reference_compat=True`` the two places where the reference code differs are
reproduced: ``DN_j`` waits for ``SB_{j-1}`` instead of ``DN_{j-1}`` (probably a typo there),
and ``CB_1`` does not wait for ``CF_N``. Either way, the transfers: ``U = 8 o_s / BW_up``
seconds for ``o_s`` bytes of activations of the batch at cut ``s`` over ``BW_up`` bits per
second (the reference divides by ``2^20`` for "Mbps"; pass the bandwidth in bits per
second here), ``D`` likewise with the downlink.

APS (:func:`choose_split`): for every cut ``s = 1 .. L - 1``, from per-layer times on the
device (``cf_ℓ, cb_ℓ``) and on the server (``sf_ℓ, sb_ℓ``), ``C_f = Σ_{ℓ<=s} cf_ℓ``,
``C_b = Σ_{ℓ<=s} cb_ℓ``, ``S_f = Σ_{ℓ>s} sf_ℓ``, ``S_b = Σ_{ℓ>s} sb_ℓ``; the micro-batch
count ``N = ⌈(U + S_f + S_b + D) / (min(C_f, C_b) + 10^-8)⌉ + 1``, capped at ``min(N, B // 2,
100)`` and made to divide evenly, ``N = B // (B // N)``; the choice is the cut of least
makespan (the first on a tie) with its ``N``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "LayerCosts",
    "SplitChoice",
    "StageTotals",
    "choose_split",
    "makespan",
    "micro_batches_for",
]


@dataclass(frozen=True)
class StageTotals:
    """Whole-batch seconds of each kind of stage (split evenly over the micro-batches)."""

    device_forward: float
    uplink: float
    server_forward: float
    server_backward: float
    downlink: float
    device_backward: float


def makespan(totals: StageTotals, micro_batches: int, *, reference_compat: bool = False) -> float:
    """The iteration's time on the stage graph of the module docstring."""
    n = micro_batches
    if n < 1:
        raise ValueError(f"micro_batches must be >= 1, got {n}")
    t = totals
    cf_d, up_d, sf_d, sb_d, dn_d, cb_d = (
        x / n
        for x in (
            t.device_forward,
            t.uplink,
            t.server_forward,
            t.server_backward,
            t.downlink,
            t.device_backward,
        )
    )
    cf = up = sb = dn = cb = 0.0  # end times of stage j - 1 (0 before the first)
    cf_end = [0.0] * n
    for j in range(n):
        cf = cf + cf_d
        cf_end[j] = cf
    for j in range(n):
        sb_prev = sb
        up = max(cf_end[j], up) + up_d
        sf = max(up, sb) + sf_d
        sb = sf + sb_d
        dn = max(sb, sb_prev if reference_compat else dn) + dn_d
        after = cb if (reference_compat or j > 0) else max(cb, cf_end[-1])
        cb = max(dn, after) + cb_d
    return cb


def micro_batches_for(totals: StageTotals, batch: int) -> int:
    """APS's ``N`` for a cut with these totals (the module docstring's formula)."""
    t = totals
    busy = t.uplink + t.server_forward + t.server_backward + t.downlink
    n = math.ceil(busy / (min(t.device_forward, t.device_backward) + 1e-8)) + 1
    n = max(1, min(n, batch // 2, 100))
    return batch // (batch // n)


@dataclass(frozen=True)
class LayerCosts:
    """Per top-level layer ``ℓ`` of the whole model, for one batch: seconds forward and
    backward on the device and on the server, and the bytes of its output (the
    activations a cut after it sends)."""

    device_forward: Sequence[float]
    device_backward: Sequence[float]
    server_forward: Sequence[float]
    server_backward: Sequence[float]
    output_bytes: Sequence[int]

    def __post_init__(self) -> None:
        sizes = {len(v) for v in vars(self).values()}
        if len(sizes) != 1:
            raise ValueError(f"every per-layer list needs one entry per layer, got sizes {sizes}")

    def totals(
        self, cut: int, uplink_bps: float, downlink_bps: float, *, gradient_bytes: int | None = None
    ) -> StageTotals:
        """The stage totals of cut ``cut`` (1 .. L - 1): layers ``1 .. cut`` on the device.
        The gradient sent back has the activations' size unless ``gradient_bytes``."""
        size = self.output_bytes[cut - 1]
        back = size if gradient_bytes is None else gradient_bytes
        return StageTotals(
            sum(self.device_forward[:cut]),
            8 * size / uplink_bps,
            sum(self.server_forward[cut:]),
            sum(self.server_backward[cut:]),
            8 * back / downlink_bps,
            sum(self.device_backward[:cut]),
        )


@dataclass(frozen=True)
class SplitChoice:
    """APS's choice: the cut (layers on the device), the micro-batch count and the
    predicted iteration seconds; ``candidates`` holds ``(cut, N, seconds)`` for every cut."""

    cut: int
    micro_batches: int
    seconds: float
    candidates: tuple[tuple[int, int, float], ...]


def choose_split(
    costs: LayerCosts,
    batch: int,
    uplink_bps: float,
    downlink_bps: float,
    *,
    reference_compat: bool = False,
    cuts: Sequence[int] | None = None,
) -> SplitChoice:
    """The cut of least predicted iteration time, with its ``N`` (module docstring),
    among ``cuts`` (default: every cut ``1 .. L - 1``)."""
    layers = len(costs.output_bytes)
    if layers < 2:
        raise ValueError(f"a split needs a model of at least 2 layers, got {layers}")
    if uplink_bps <= 0 or downlink_bps <= 0:
        raise ValueError(f"bandwidths must be > 0 bits/s, got {uplink_bps} and {downlink_bps}")
    allowed = range(1, layers) if cuts is None else cuts
    if not allowed or any(not 1 <= c < layers for c in allowed):
        raise ValueError(f"cuts must be some of 1 .. {layers - 1}, got {list(allowed)}")
    candidates = []
    for cut in allowed:
        totals = costs.totals(cut, uplink_bps, downlink_bps)
        n = micro_batches_for(totals, batch)
        candidates.append((cut, n, makespan(totals, n, reference_compat=reference_compat)))
    best = min(candidates, key=lambda c: c[2])
    return SplitChoice(best[0], best[1], best[2], tuple(candidates))
