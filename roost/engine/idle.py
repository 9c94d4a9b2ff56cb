"""The clients that can be dispatched now: available and not in flight, in id order.

An asynchronous run dispatches one client at a time, each pick ``idle[k]`` for a random
``k < len(idle)`` (:meth:`~roost.algorithms.asynchronous.AsyncStrategy.select_idle`).
Building that sorted list for every dispatch costs O(N) (a vectorised availability query
over all N clients, then ``flatnonzero``): about a millisecond at N = 100,000.
:class:`IdlePool` keeps it incrementally instead:

* one byte per client for "available" and one for "idle" (= available and not in
  flight), and the idle clients of each block of ``BLOCK`` = 64 ids as the bits of one
  integer, all written in O(1);
* the number of idle clients per block in a Fenwick tree (Fenwick, "A new data structure
  for cumulative frequency tables", SPE 1994), so that the block holding the k-th idle
  client is found in O(log(N / BLOCK)) and a count changes in the same time;
* ``pool[k]``: that block's k'-th set bit (at most 63 steps of ``m & (m - 1)``, which
  clears the lowest set bit).

Availability comes from the system model's list of changes
(:meth:`~roost.system.model.SystemModel.availability_changes`): the pool starts from
``available(ids, start)`` and applies, in order, every change with time <= t before it
answers at t (:meth:`advance`). The changes are fetched in chunks of virtual time. A
change is O(log(N / BLOCK)) when the client is idle and O(1) otherwise, so the cost per
change does not depend on N, while the number of changes per virtual second grows with N.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, overload

import numpy as np

__all__ = ["BLOCK", "IdlePool"]

BLOCK = 64

Changes = tuple[np.ndarray, np.ndarray, np.ndarray]


class IdlePool(Sequence[int]):
    """See the module docstring. ``changes(t0, t1)`` lists the availability changes in
    ``(t0, t1]`` (times ascending, client ids, online flags); ``chunk_s`` is the length of
    the first chunk asked for, doubled after a chunk of fewer than ``min_chunk`` changes
    (sparse traces are not fetched second by second) and halved after one of more than
    ``16 min_chunk`` (a dense trace, or a fast time scale, is not listed days ahead of a
    run that may end in seconds)."""

    def __init__(
        self,
        available: np.ndarray,
        busy: np.ndarray,
        start_s: float,
        changes: Callable[[float, float], Changes],
        chunk_s: float = 1.0,
        min_chunk: int = 4096,
    ) -> None:
        n = len(available)
        self.n = n
        self._available = bytearray(np.asarray(available, dtype=np.uint8).tobytes())
        idle = np.asarray(available, dtype=bool) & ~np.asarray(busy, dtype=bool)
        self._idle = bytearray(idle.astype(np.uint8).tobytes())
        self._idle_view = np.frombuffer(self._idle, dtype=np.uint8)
        self._busy = bytearray(np.asarray(busy, dtype=np.uint8).tobytes())
        self._blocks = max(1, -(-n // BLOCK))
        counts = np.add.reduceat(idle.astype(np.int64), np.arange(0, max(n, 1), BLOCK))[
            : self._blocks
        ]
        if n == 0:
            counts = np.zeros(1, dtype=np.int64)
        self._tree = _fenwick(counts.tolist())
        padded = np.zeros(self._blocks * BLOCK, dtype=bool)
        padded[:n] = idle
        weights = np.uint64(1) << np.arange(BLOCK, dtype=np.uint64)
        self._masks = [
            int(m) for m in (padded.reshape(-1, BLOCK).astype(np.uint64) * weights).sum(axis=1)
        ]
        self._top = 1 << (self._blocks.bit_length() - 1)
        self._size = int(counts.sum())
        self._fetch = changes
        self._chunk_s = float(chunk_s)
        self._min_chunk = int(min_chunk)
        self._fetched_to = float(start_s)  # changes are known up to this time
        self._times: list[float] = []
        self._clients: list[int] = []
        self._online: list[bool] = []
        self._next = 0  # index of the first change not applied
        self.applied = 0  # changes applied so far (the engine reports them as events)

    # ---- the sequence protocol select_idle uses
    def __len__(self) -> int:
        return self._size

    @overload
    def __getitem__(self, k: int) -> int: ...

    @overload
    def __getitem__(self, k: slice) -> Sequence[int]: ...

    def __getitem__(self, k: int | slice) -> int | Sequence[int]:
        """The k-th idle client in id order (0 <= k < len)."""
        if isinstance(k, slice):
            return [int(c) for c in self.ids()[k]]
        k = int(k)
        if not 0 <= k < self._size:
            raise IndexError(f"idle client {k} of {self._size}")
        tree, pos, step = self._tree, 0, self._top
        while step:  # the last block whose preceding blocks hold <= k idle clients
            nxt = pos + step
            if nxt <= self._blocks and tree[nxt] <= k:
                pos = nxt
                k -= tree[nxt]
            step >>= 1
        m = self._masks[pos]
        for _ in range(k):
            m &= m - 1
        return pos * BLOCK + (m & -m).bit_length() - 1

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        ids = np.flatnonzero(self._idle_view)
        return ids if dtype is None else ids.astype(dtype)

    def ids(self) -> np.ndarray:
        return np.flatnonzero(self._idle_view)

    # ---- updates
    def _add(self, client: int, delta: int) -> None:
        """``client`` became idle (+1) or stopped being idle (-1)."""
        self._size += delta
        b = client >> 6  # client // BLOCK
        self._masks[b] ^= 1 << (client & 63)
        i, tree, blocks = b + 1, self._tree, self._blocks
        while i <= blocks:
            tree[i] += delta
            i += i & -i

    def set_busy(self, client: int, busy: bool) -> None:
        """A task of ``client`` was launched (busy) or landed (not busy)."""
        self._busy[client] = busy
        if self._available[client]:
            self._idle[client] = not busy
            self._add(client, -1 if busy else 1)

    def set_available(self, client: int, online: bool) -> None:
        """``client`` is known to be online (or offline) now, e.g. a dropout: its device
        went offline at this instant, whatever the rounding of the change list's time
        for that boundary (a later change saying the same is then a no-op)."""
        self._set_available(client, online)

    def _set_available(self, client: int, online: bool) -> None:
        if self._available[client] == online:
            return
        self._available[client] = online
        if not self._busy[client]:
            self._idle[client] = online
            self._add(client, 1 if online else -1)

    def advance(self, t: float) -> None:
        """Apply every availability change with time <= ``t``."""
        while True:
            times, i = self._times, self._next
            while i < len(times) and times[i] <= t:
                self._set_available(self._clients[i], self._online[i])
                i += 1
            self.applied += i - self._next
            self._next = i
            if i < len(times) or not self._more(t):
                return

    def _more(self, t: float) -> bool:
        """Fetch the next chunk of changes if ``t`` is past what is known; False when no
        change can come before ``t``."""
        if t <= self._fetched_to or not math.isfinite(self._fetched_to):
            return False
        return self._fetch_chunk()

    def _fetch_chunk(self) -> bool:
        """Fetch the next chunk of changes (True if any were fetched)."""
        t0 = self._fetched_to
        chunk = self._chunk_s
        while True:
            times, clients, online = self._fetch(t0, t0 + chunk)
            if len(times) or chunk > 1e12:
                break
            chunk *= 2.0
        if not len(times):
            self._fetched_to = math.inf  # no change ever again
            self._times, self._clients, self._online, self._next = [], [], [], 0
            return False
        self._fetched_to = t0 + chunk
        if len(times) < self._min_chunk:
            self._chunk_s = chunk * 2.0
        elif len(times) > 16 * self._min_chunk:
            self._chunk_s = chunk / 2.0
        self._times = times.tolist()
        self._clients = clients.tolist()
        self._online = online.tolist()
        self._next = 0
        return True

    def next_online_s(self, horizon_s: float = math.inf) -> float:
        """When the next client that is not in flight comes online (after every change
        already applied), or inf if none does before ``horizon_s``. Fetches chunks as
        needed; the changes it looks at stay pending until :meth:`advance`."""
        seen: dict[int, bool] = {}  # availability as the scan replays the changes
        i = self._next
        while True:
            times, clients, online, busy = self._times, self._clients, self._online, self._busy
            for i in range(i, len(times)):  # noqa: B020 (the scan resumes where it stopped)
                if times[i] > horizon_s:
                    return math.inf
                c = clients[i]
                if online[i] and not busy[c] and not seen.get(c, self._available[c]):
                    return times[i]
                seen[c] = online[i]
            i = len(times)
            if self._fetched_to > horizon_s or not math.isfinite(self._fetched_to):
                return math.inf
            pending = self._next
            tail = (times[pending:], clients[pending:], online[pending:])
            found = self._fetch_chunk()  # replaces the lists: put the pending tail first
            self._times = [*tail[0], *self._times]
            self._clients = [*tail[1], *self._clients]
            self._online = [*tail[2], *self._online]
            self._next = 0
            i -= pending
            if not found:
                return math.inf


def _fenwick(counts: list[int]) -> list[int]:
    """A 1-based Fenwick tree over ``counts``, built in O(n)."""
    tree = [0, *counts]
    n = len(counts)
    for i in range(1, n + 1):
        j = i + (i & -i)
        if j <= n:
            tree[j] += tree[i]
    return tree
