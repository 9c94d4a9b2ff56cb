"""The engine's pool of dispatchable clients against the O(N) list it replaces.

The oracle is the definition: ``np.flatnonzero(available(t) & ~busy)``, with
``available(t)`` replayed from the same list of changes by a plain loop.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from roost.engine.idle import BLOCK, IdlePool
from roost.system.model import SystemModel, TaskTiming


def feed(times, clients, online):
    """A change list served in chunks, recording what was asked."""
    times, clients, online = np.asarray(times, float), np.asarray(clients), np.asarray(online)
    asked: list[tuple[float, float, int]] = []

    def changes(t0: float, t1: float):
        sel = (times > t0) & (times <= t1)
        asked.append((t0, t1, int(sel.sum())))
        return times[sel], clients[sel].astype(np.int64), online[sel].astype(bool)

    return changes, asked


def test_a_hand_made_trace_by_hand():
    """Five clients, all online at 0 except 3; 1 is in flight. Changes: 0 goes offline at
    10, 3 comes online at 10, 4 goes offline at 20 and 1 at 25, 4 is back at 30."""
    available = np.array([1, 1, 1, 0, 1], dtype=bool)
    busy = np.array([0, 1, 0, 0, 0], dtype=bool)
    changes, _ = feed([10, 10, 20, 25, 30], [0, 3, 4, 1, 4], [False, True, False, False, True])
    pool = IdlePool(available, busy, 0.0, changes, chunk_s=7.0, min_chunk=1)
    assert [pool[k] for k in range(len(pool))] == [0, 2, 4]
    assert pool.next_online_s() == 10.0  # client 3
    pool.advance(10.0)  # the change at exactly 10 applies at 10
    assert [pool[k] for k in range(len(pool))] == [2, 3, 4]
    pool.advance(24.0)
    assert list(pool.ids()) == [2, 3]
    pool.set_busy(1, False)  # 1 lands at 24: still online until 25
    assert list(pool.ids()) == [1, 2, 3]
    assert pool.next_online_s() == 30.0  # client 4 (1 goes offline at 25: not a wake-up)
    pool.advance(30.0)
    assert list(pool.ids()) == [2, 3, 4] and pool.applied == 5
    pool.set_busy(3, True)
    assert list(pool.ids()) == [2, 4] and pool.next_online_s() == math.inf
    with pytest.raises(IndexError):
        pool[2]


@pytest.mark.parametrize("n", [1, BLOCK - 1, BLOCK, 3 * BLOCK + 17, 5000])
def test_random_operations_match_the_definition(n):
    rng = np.random.default_rng(n)
    m = 4 * n
    times = np.sort(rng.uniform(0, 1000, m))
    clients = rng.integers(0, n, m)
    online = rng.random(m) < 0.5
    available = rng.random(n) < 0.3
    busy = rng.random(n) < 0.2
    changes, asked = feed(times, clients, online)
    pool = IdlePool(available, busy, 0.0, changes, chunk_s=1.0, min_chunk=50)
    avail, b, applied = available.copy(), busy.copy(), 0
    for t in np.sort(rng.uniform(0, 1100, 60)):
        while applied < m and times[applied] <= t:
            avail[clients[applied]] = online[applied]
            applied += 1
        pool.advance(t)
        for c in rng.integers(0, n, 5):  # tasks launched and landed
            b[c] = not b[c]
            pool.set_busy(int(c), bool(b[c]))
        want = np.flatnonzero(avail & ~b)
        assert len(pool) == len(want)
        ks = rng.integers(0, len(want), 20) if len(want) else []
        assert [pool[k] for k in ks] == [int(want[k]) for k in ks]
        np.testing.assert_array_equal(np.asarray(pool), want)
        # the next idle, offline client to come online, by a scan of the remaining list
        nxt = math.inf
        state = avail.copy()
        for i in range(applied, m):
            c = clients[i]
            if online[i] and not b[c] and not state[c]:
                nxt = times[i]
                break
            state[c] = online[i]
        assert pool.next_online_s() == nxt
    assert pool.applied == applied
    # each chunk twice as long as the one before if that one held fewer than min_chunk =
    # 50 changes, half as long if it held more than 16 · 50, else as long; it follows the
    # one before, or, when that was empty, replaces it (the same start, twice as long)
    for (a0, a1, size), (b0, b1, _) in itertools.pairwise(asked):
        assert b0 == (a0 if size == 0 else a1)
        factor = 2 if size < 50 else 0.5 if size > 800 else 1
        assert b1 - b0 == pytest.approx((a1 - a0) * factor)


def test_a_model_with_no_changes_is_fetched_a_bounded_number_of_times():
    calls = []

    def none(t0, t1):
        calls.append(t1 - t0)
        return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)

    pool = IdlePool(np.ones(10, dtype=bool), np.zeros(10, dtype=bool), 0.0, none)
    pool.advance(5.0)
    pool.advance(1e9)
    assert len(pool) == 10 and pool.next_online_s() == math.inf
    # chunks of 2^k s for k = 0..40 (2^40 = 1.1e12 is the first past 1e12): 41 fetches,
    # then never again
    assert len(calls) == 41


class BlinkingSystem(SystemModel):
    """Client k is online while ``floor((t + 1.25 k) / 3.5)`` is even (3.5 s on, 3.5 s
    off, phases spread), and its task lasts ``2 + (k mod 5)`` seconds; a task is lost
    when its device goes offline before it arrives. Every boundary is a multiple of
    0.25, exact in binary, so the availability query and the change list agree to the
    last bit (a trace's boundaries may not: see the dropout test below)."""

    period = 7.0

    def _phase(self, k):
        return 1.25 * np.asarray(k, dtype=np.float64)

    def available(self, client_ids, t):
        return np.floor((t + self._phase(client_ids)) / (self.period / 2)) % 2 == 0

    def availability_changes(self, t0, t1, num_clients):
        if not t1 > t0:
            return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        times, clients, online = [], [], []
        half = self.period / 2
        for k in range(num_clients):
            ph = 1.25 * k
            m = math.floor((t0 + ph) / half) + 1  # boundaries at m·half - ph
            while (t := m * half - ph) <= t1:
                if t > t0:
                    times.append(t)
                    clients.append(k)
                    online.append(m % 2 == 0)
                m += 1
        order = np.lexsort((np.array(clients), np.array(online), np.array(times)))
        return (
            np.array(times)[order],
            np.array(clients, dtype=np.int64)[order],
            np.array(online, dtype=bool)[order],
        )

    def next_available_s(self, client_ids, t):
        half = self.period / 2
        best = math.inf
        for k in client_ids:
            ph = 1.25 * int(k)
            m = math.floor((t + ph) / half)
            best = min(best, t if m % 2 == 0 else (m + 1) * half - ph)
        return best

    def timing(self, client_id, start_s, work_examples, down_bytes, up_bytes):
        end = start_s + 2.0 + client_id % 5
        half = self.period / 2
        m = math.floor((start_s + 1.25 * client_id) / half)
        off = (m + 1) * half - 1.25 * client_id  # the end of this online stretch
        return TaskTiming(start_s, start_s, end, end, off if off < end else None)

    def min_task_time_s(self, work_examples, down_bytes, up_bytes):
        return 2.0


@pytest.mark.parametrize("algorithm", ["fedbuff", "fedasync"])
def test_an_asynchronous_run_picks_the_same_clients_as_the_o_n_list(algorithm):
    """The pool against the slow reference path (the engine told the model cannot list
    its changes: the sorted idle list rebuilt by an availability query at every
    dispatch): the same picks, dropouts, times and model."""
    from _async_helpers import make_engine

    from roost.config import RunConfig

    run = RunConfig(rounds=40, clients=30, clients_per_round=6, eval_every=0, seed=2)
    fast, _ = make_engine(run, BlinkingSystem(), algorithm)
    h_fast = fast.run()
    slow, _ = make_engine(run, BlinkingSystem(), algorithm)
    slow._pool_unsupported = True
    h_slow = slow.run()
    assert fast._pool is not None and fast._pool.applied > 100  # the pool did the work
    assert slow._pool is None
    for key in ("clients", "dropped", "virtual_time_s", "staleness_mean"):
        assert h_fast.series(key) == h_slow.series(key), key
    assert sum(h_fast.series("dropped")) > 0  # devices went offline mid-task
    assert torch.equal(fast.strategy.params, slow.strategy.params)


class EarlyDropSystem(BlinkingSystem):
    """As BlinkingSystem, but a task's dropout time is computed 1e-9 s before the
    boundary the change list gives (two float paths to one boundary, as a trace's
    ``offline_s`` and its change list may round differently). Logs every dispatch."""

    def __init__(self):
        self.log: list[tuple[str, int, float]] = []

    def timing(self, client_id, start_s, work_examples, down_bytes, up_bytes):
        self.log.append(("dispatch", client_id, start_s))
        t = super().timing(client_id, start_s, work_examples, down_bytes, up_bytes)
        if t.offline_s is None:
            return t
        return t._replace(offline_s=t.offline_s - 1e-9)


def test_a_client_that_dropped_is_not_dispatched_again_at_that_instant():
    """At a dropout the device is offline, even if the change list's time for that
    boundary is (here by 1e-9 s) later: once a task is lost at t, its client is not
    dispatched again at t."""
    from _async_helpers import make_engine

    from roost.config import RunConfig

    system = EarlyDropSystem()
    run = RunConfig(rounds=40, clients=30, clients_per_round=6, eval_every=0, seed=2)
    engine, _ = make_engine(run, system, "fedasync")
    land = engine.land

    def logging_land(key):
        flight = land(key)
        if flight.lost:
            system.log.append(("lost", flight.client_id, flight.timing.offline_s))
        return flight

    engine.land = logging_land  # type: ignore[method-assign]
    engine.run()
    lost_at: set[tuple[int, float]] = set()
    again = []
    for kind, client, t in system.log:
        if kind == "lost":
            lost_at.add((client, t))
        elif (client, t) in lost_at:
            again.append((client, t))
    assert sum(kind == "lost" for kind, _, _ in system.log) > 20
    assert not again, f"clients dispatched again at the instant they went offline: {again}"
