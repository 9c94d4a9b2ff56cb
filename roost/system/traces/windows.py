"""Availability windows of many devices, flattened: one vectorised query for all clients.

A device is *available* at trace time ``τ`` when::

    rel = (τ - origin_d) mod period_d        lies in one of its windows [s, e)

:func:`normalise_windows` turns a source's raw ``[start, end]`` rows into half-open,
sorted, merged windows in ``[0, period)``: negative parts are clipped to 0, a window
running past the period wraps to its start (whole-day periods keep the time of day),
overlapping or touching windows merge and empty ones vanish.

:class:`Windows` concatenates the windows of every slot into one sorted array of keys
``start + slot * width`` (``width`` = twice the longest period), so that locating any
number of (slot, τ) pairs is one ``np.searchsorted``, not a Python loop over clients.
Per window it also keeps ``until``, the end of the online stretch that window starts:
its end, or past the period when the device's last window ends at the period and its
first starts at 0 (the stretch continues into the next cycle), or inf when one window
covers the whole period. A query at exactly a window's start computes the same float
sum as the stored key, so boundaries are exact; a time closer to a window's start than
one unit in the last place of the keys (``n * width * 1.1e-16``: 1e-7 s for FLASH's
2,849 devices) may be placed on the wrong side of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Windows", "normalise_windows"]


def normalise_windows(raw: np.ndarray, period: float) -> np.ndarray:
    """Raw ``[start, end]`` rows (relative to the origin) -> sorted, merged, half-open
    windows in ``[0, period)``, shape (k, 2)."""
    s = np.maximum(raw[:, 0], 0.0)
    e = raw[:, 1]
    keep = e > s
    s, e = s[keep], e[keep]
    if len(s) == 0:
        return np.zeros((0, 2))
    length = e - s
    if (length >= period).any():
        return np.array([[0.0, period]])
    s0 = np.mod(s, period)
    e0 = s0 + length
    wrap = e0 > period
    starts = np.concatenate([s0, np.zeros(int(wrap.sum()))])
    ends = np.concatenate([np.minimum(e0, period), e0[wrap] - period])
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    run_end = np.maximum.accumulate(ends)
    new = np.ones(len(starts), dtype=bool)
    new[1:] = starts[1:] > run_end[:-1]
    heads = np.flatnonzero(new)
    return np.stack([starts[heads], np.maximum.reduceat(ends, heads)], axis=1)


class Windows:
    """Per slot: its windows (from :func:`normalise_windows`), origin and period,
    flattened for vectorised queries. Times are trace seconds."""

    def __init__(
        self, per_slot: Sequence[np.ndarray], origin: np.ndarray, period: np.ndarray
    ) -> None:
        self.n = len(per_slot)
        self.origin = np.asarray(origin, dtype=np.float64)
        self.period = np.asarray(period, dtype=np.float64)
        counts = np.array([len(w) for w in per_slot], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat = np.concatenate([*per_slot, np.zeros((0, 2))])
        self.starts, self.ends = flat[:, 0].copy(), flat[:, 1].copy()
        # until: end of the continuous online stretch a window starts (relative to the
        # same cycle): past the period when the last window ends at the period and the
        # first starts at 0; inf when one window covers the whole period.
        self.until = self.ends.copy()
        for j in np.flatnonzero(counts):
            lo, hi, p = self.first[j], self.first[j + 1], self.period[j]
            if self.ends[hi - 1] >= p and self.starts[lo] <= 0.0:
                self.until[hi - 1] = math.inf if hi - 1 == lo else p + self.ends[lo]
        width = 2.0 * float(self.period.max()) if self.n else 1.0
        self._base = np.arange(self.n, dtype=np.float64) * width
        self._keys = self.starts + np.repeat(self._base, counts)
        self._all = np.arange(self.n, dtype=np.int64)
        self._cache: dict[str, tuple[float, np.ndarray]] = {}

    def every_slot(self, query: str, tau: float) -> np.ndarray:
        """``available`` or ``next_online`` of every slot at ``tau`` (the last answer per
        query is cached: selecting clients asks at one time repeatedly)."""
        hit = self._cache.get(query)
        if hit is None or hit[0] != tau:
            fn = self.available if query == "available" else self.next_online
            hit = (tau, fn(self._all, tau))
            self._cache[query] = hit
        return hit[1]

    def _locate(self, slots: np.ndarray, tau: float) -> tuple[np.ndarray, ...]:
        period = self.period[slots]
        rel = np.mod(tau - self.origin[slots], period)
        rel = np.where(rel >= period, 0.0, rel)
        idx = np.searchsorted(self._keys, rel + self._base[slots], side="right") - 1
        lo = self.first[slots]
        hit = idx >= lo
        idx_c = np.where(hit, idx, 0)
        inside = hit & (rel < self.ends[idx_c]) if len(self._keys) else hit
        return rel, idx, idx_c, lo, inside, period

    def available(self, slots: np.ndarray, tau: float) -> np.ndarray:
        """Boolean mask: which slots are inside a window at trace time ``tau``."""
        if not len(self._keys):
            return np.zeros(len(slots), dtype=bool)
        return self._locate(slots, tau)[4]

    def online_until(self, slots: np.ndarray, tau: float) -> np.ndarray:
        """Per slot, the trace time its current online stretch ends (``tau`` when offline
        now, inf when it never ends)."""
        if not len(self._keys):
            return np.full(len(slots), float(tau))
        rel, _, idx_c, _, inside, _ = self._locate(slots, tau)
        return np.where(inside, tau + (self.until[idx_c] - rel), tau)

    def next_online(self, slots: np.ndarray, tau: float) -> np.ndarray:
        """Per slot, the earliest trace time ``>= tau`` at which it is online (inf for a
        device with no windows)."""
        if not len(self._keys):
            return np.full(len(slots), math.inf)
        rel, idx, _, lo, inside, period = self._locate(slots, tau)
        hi = self.first[slots + 1]
        nxt = np.maximum(idx + 1, lo)
        last = len(self.starts) - 1
        same = nxt < hi
        wait_same = self.starts[np.minimum(nxt, last)] - rel
        wait_wrap = period - rel + self.starts[np.minimum(lo, last)]
        wait = np.where(inside, 0.0, np.where(same, wait_same, wait_wrap))
        return np.where(hi > lo, tau + wait, math.inf)
