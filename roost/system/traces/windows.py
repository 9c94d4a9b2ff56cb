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

:meth:`Windows.online_until_one` is :meth:`Windows.online_until` for one slot in plain
Python (the slot's keys, ends and ``until`` as lists, built on its first query, and
``bisect``): the same float operations, so the same answer bit for bit, without numpy's
per-call cost on 1-element arrays.

:meth:`Windows.changes` lists every switch on or off of every slot between two times,
vectorised over slots and windows (see its docstring).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

import numpy as np

__all__ = ["Windows", "for_clients", "normalise_windows"]


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
        # per slot, built on its first scalar query: (keys, ends, until, origin, period, base)
        self._one: list[tuple[list[float], list[float], list[float], float, float, float] | None]
        self._one = [None] * self.n
        self._bounds: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

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

    def online_until_one(self, slot: int, tau: float) -> float:
        """:meth:`online_until` of one slot (``0 <= slot < n``) in plain Python: the same
        float operations on the slot's keys, ends and ``until`` (Python lists, built on the
        slot's first query and kept), ``bisect_right`` for ``np.searchsorted(side="right")``
        and ``%`` for ``np.mod`` (both take the sign of the divisor: same bits), so the
        answer is the vectorised one bit for bit."""
        entry = self._one[slot]
        if entry is None:
            lo, hi = int(self.first[slot]), int(self.first[slot + 1])
            entry = (
                self._keys[lo:hi].tolist(),
                self.ends[lo:hi].tolist(),
                self.until[lo:hi].tolist(),
                float(self.origin[slot]),
                float(self.period[slot]),
                float(self._base[slot]),
            )
            self._one[slot] = entry
        keys, ends, until, origin, period, base = entry
        rel = (tau - origin) % period
        if rel >= period:
            rel = 0.0
        i = bisect_right(keys, rel + base) - 1
        if i >= 0 and rel < ends[i]:
            return tau + (until[i] - rel)
        return tau

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

    def _boundaries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per slot, the positions in its cycle at which it switches, ascending: each
        window's start (on) then its end (off); merged windows never touch, so on and off
        alternate. A slot whose last window ends at the period and whose first starts at 0
        is online across the wrap: that end and that start are one stretch and are left
        out (a slot online all the time keeps no boundary). Returns (position, on, first,
        wrap), flattened by slot like the windows (``first[j]:first[j + 1]`` is slot j's
        range; ``wrap[j]``: its two boundaries were left out); built once."""
        if self._bounds is None:
            counts = np.diff(self.first)
            pos = np.empty(2 * len(self.starts))
            pos[0::2], pos[1::2] = self.starts, self.ends
            on = np.zeros(len(pos), dtype=bool)
            on[0::2] = True
            slot = np.repeat(self._all, 2 * counts)
            j = np.flatnonzero(counts)
            lo, hi = self.first[j], self.first[j + 1]
            wrap = np.zeros(self.n, dtype=bool)
            wrap[j] = (self.ends[hi - 1] >= self.period[j]) & (self.starts[lo] <= 0.0)
            keep = np.ones(len(pos), dtype=bool)
            keep[2 * self.first[:-1][wrap]] = False
            keep[2 * self.first[1:][wrap] - 1] = False
            pos, on, slot = pos[keep], on[keep], slot[keep]
            first = np.concatenate([[0], np.cumsum(np.bincount(slot, minlength=self.n))])
            self._bounds = (pos, on, first.astype(np.int64), wrap)
        return self._bounds

    def _passed(self, tau: float, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Per slot ``0..k-1`` at trace time ``tau``: its cycle ``m`` (``tau - origin = m * period +
        rel``) and how many of its :meth:`_boundaries` lie at or before ``rel`` *as*
        :meth:`available` *sees it*: from the window it locates (``idx``, the last start
        ``<= rel``) and whether ``rel`` is inside it, ``2 (idx - lo) + 1`` when inside,
        ``+ 2`` when past its end, 0 before the first window; one less for a wrapping
        slot (its start at 0, always passed, is left out)."""
        slots = self._all[:k]
        period = self.period[:k]
        m, r = np.divmod(tau - self.origin[:k], period)  # r: _locate's rel before its fix
        m = m + (r >= period)  # rel rounded up to the period is 0 of the next cycle
        _, idx, _, lo, inside, _ = self._locate(slots, tau)
        passed = np.where(idx >= lo, 2 * (idx - lo) + np.where(inside, 1, 2), 0)
        return m, passed - self._boundaries()[3][:k]

    def changes(
        self, t0: float, t1: float, offset: float, scale: float, num_slots: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every switch of slots ``0..num_slots-1`` (default: all) in the interval ``(t0,
        t1]`` (finite) of a time ``t`` read at trace time ``τ = offset + scale * t``
        (``scale > 0``): (times float64, slots int64, online bool), ordered by (time, off
        before on, slot). Applying the switches up to ``t`` to ``available(slots, τ(t0))``
        gives ``available(slots, τ(t))``. The work and the output grow with the number of
        switches: about ``(t1 - t0) * scale / period`` times the boundaries per slot.

        Vectorised over slots and windows. For slot j (origin O, period P, boundary
        positions ``p_0 < ... < p_{L-1}`` from :meth:`_boundaries`), ``τ(t0) - O = m0 P +
        r0`` and ``τ(t1) - O = m1 P + r1``, and ``a``, ``b`` boundaries are passed at
        ``r0``, ``r1`` (:meth:`_passed`, from the same float operations as
        :meth:`available`). The switches are the ``(m1 - m0) L + b - a`` boundaries
        ``g = a, a + 1, ...`` counted across cycles: cycle ``m0 + g // L``, position
        ``p_(g mod L)``, at ``τ = O + cycle P + p`` and time ``t = (τ - offset) / scale``.
        Since ``a`` and ``b`` are what :meth:`available` sees at both ends, the switches
        up to ``t1`` give ``available(τ(t1))`` exactly, even when an end is within
        rounding of a boundary.

        A switch's time is its boundary rounded (a few ulps of ``τ``, divided by
        ``scale``), so :meth:`available` at a time within rounding of a switch may still
        give the state before it. Times are clamped into ``(t0, t1]``, and an on and the
        off after it of one slot that round to the same time (a window shorter than the
        rounding) are both dropped, which keeps on and off alternating."""
        if not (math.isfinite(t0) and math.isfinite(t1)):
            raise ValueError(f"changes in ({t0}, {t1}]: the interval must be finite")
        k = self.n if num_slots is None else max(0, min(self.n, int(num_slots)))
        if not t1 > t0 or not k:
            return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        tau0, tau1 = offset + scale * t0, offset + scale * t1
        pos, on, first, _ = self._boundaries()
        lo, size = first[:k], np.diff(first[: k + 1])
        m0, a = self._passed(tau0, k)
        m1, b = self._passed(tau1, k)
        count = np.maximum((m1 - m0).astype(np.int64) * size + b - a, 0)
        total = int(count.sum())
        slot = np.repeat(self._all[:k], count)
        start = np.cumsum(count) - count
        g = np.arange(total, dtype=np.int64) + np.repeat(a - start, count)
        turn, w = np.divmod(g, size[slot])
        idx = lo[slot] + w
        tau = self.origin[slot] + (m0[slot] + turn) * self.period[slot] + pos[idx]
        t = np.clip((tau - offset) / scale, np.nextafter(t0, math.inf), t1)
        online = on[idx]
        # an on and the next off of the same slot at the same time: a window too short
        # for the rounding; dropping both keeps on and off alternating
        pair = (slot[:-1] == slot[1:]) & online[:-1] & ~online[1:] & (t[:-1] == t[1:])
        keep = np.ones(total, dtype=bool)
        keep[:-1] &= ~pair
        keep[1:] &= ~pair
        t, slot, online = t[keep], slot[keep], online[keep]
        order = np.lexsort((slot, online, t))
        return t[order], slot[order], online[order]


def for_clients(
    changes: tuple[np.ndarray, np.ndarray, np.ndarray], n: int, num_clients: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slot switches ordered by (time, off before on, slot) -> the switches of clients
    ``0..num_clients-1``, client k using slot ``k mod n``: slot j's switch is repeated for
    clients ``j, j + n, j + 2n, ... < num_clients``, and the result ordered by (time, off
    before on, client id)."""
    times, slots, online = changes
    reps = np.maximum((num_clients - 1 - slots) // n + 1, 0)
    total = int(reps.sum())
    src = np.repeat(np.arange(len(slots)), reps)
    start = np.cumsum(reps) - reps
    clients = slots[src] + n * (np.arange(total, dtype=np.int64) - start[src])
    times, online = times[src], online[src]
    if num_clients > n and total:
        # within a group of one (time, online), reorder (slot, repeat) to client id
        new = np.ones(total, dtype=bool)
        new[1:] = (times[1:] != times[:-1]) | (online[1:] != online[:-1])
        order = np.argsort((np.cumsum(new) - 1) * num_clients + clients, kind="stable")
        times, clients, online = times[order], clients[order], online[order]
    return times, clients, online
