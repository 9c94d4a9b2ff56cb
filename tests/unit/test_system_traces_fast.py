"""system=trace, one client at a time: the scalar paths (``offline_s``, ``Rates.end_after``,
``transfer_end_s``, ``timing``, ``compute_time_s``, ``speed``) against the vectorised
queries and the numpy formulas they replace, and ``availability_changes``.

Equality is bit for bit (``==``) wherever the scalar path does the same float operations as
the formula it is compared with: every comparison with the vectorised ``online_until`` and
with the former numpy implementation (``numpy_end_after`` below, kept here as the
reference). Hand-derived numbers are exact where they are representable, else within
1e-12 relative. The bytes-delivered check of ``end_after`` (an independent integral) is
within 1e-9 relative. Availability changes are compared with ``available()``: exactly at
``t1``, and at times more than 1e-6 s away from every change elsewhere (a change's time
is its trace boundary mapped back to virtual time, a few ulps from where ``available()``
flips).

Tests of the real traces skip cleanly when the shared data folder is absent.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from roost.system.model import HomogeneousConfig, HomogeneousSystem, SystemModel
from roost.system.traces import Rates, RateSeries, TraceConfig, TraceSystem
from roost.system.traces.files import ENV_VAR
from roost.system.traces.trace_system import GOLDEN
from roost.system.traces.windows import Windows, for_clients, normalise_windows

SHARED = Path(os.environ.get(ENV_VAR) or "/work/shared/data")
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")

Changes = tuple[np.ndarray, np.ndarray, np.ndarray]


# ---- references: the numpy formulas the scalar paths replace ------------------------------


def numpy_end_after(rates: Rates, slot: int, tau: float, nbytes: float) -> float:
    """``Rates.end_after`` as it was, numpy slices and ``np.searchsorted`` per call."""
    if nbytes <= 0:
        return tau
    lo, hi = int(rates.first[slot]), int(rates.first[slot + 1])
    p, total = float(rates.period[slot]), float(rates.total[slot])
    b, r, c = rates.bounds[lo:hi], rates.rates[lo:hi], rates.cum[lo:hi]
    rel = tau - math.floor(tau / p) * p
    if rel >= p:
        rel = 0.0
    j = int(np.searchsorted(b, rel, side="right")) - 1
    g = float(c[j] + r[j] * (rel - b[j])) + float(nbytes)
    q = math.floor(g / total)
    g -= q * total
    if g <= 0.0 and q > 0:
        q, g = q - 1, g + total
    k = min(int(np.searchsorted(rates.cum_end[lo:hi], g, side="left")), hi - lo - 1)
    x = float(b[k] + (g - c[k]) / r[k])
    return tau + (q * p + x - rel)


def numpy_transfer_end(system: TraceSystem, k: int, start: float, nbytes: int, up: bool) -> float:
    rates = system.up if up else system.down
    s = k % rates.n
    begin = start + system.latency_s
    phase = ((system._u0 + k * GOLDEN) % 1.0) * float(rates.period[s])
    return begin + (numpy_end_after(rates, s, begin + phase, float(nbytes)) - (begin + phase))


def numpy_offline(system: TraceSystem, k: int, start: float, arrival: float) -> float | None:
    """``offline_s`` as it was: the vectorised ``online_until`` on a 1-element array."""
    assert system.windows is not None
    cfg = system.cfg
    tau = cfg.availability_offset_s + cfg.availability_time_scale * start
    until = float(system.windows.online_until(np.array([k % system.windows.n]), tau)[0])
    off = start + (until - tau) / cfg.availability_time_scale
    return off if off < arrival else None


def delivered(rates: Rates, slot: int, a: float, b: float) -> float:
    """Bytes sent over trace time [a, b]: an independent integral of the rate (whole
    periods times the bytes of one, plus the rate over every segment piece)."""

    def f(x: float) -> float:
        lo, hi = int(rates.first[slot]), int(rates.first[slot + 1])
        p = float(rates.period[slot])
        m = math.floor(x / p)
        rel = x - m * p
        ends = np.append(rates.bounds[lo + 1 : hi], p)
        part = np.clip(rel - rates.bounds[lo:hi], 0.0, ends - rates.bounds[lo:hi])
        return m * float(rates.total[slot]) + float((part * rates.rates[lo:hi]).sum())

    return f(b) - f(a)


# ---- checking a list of changes against available() -----------------------------------------


def check_changes(
    system: SystemModel, t0: float, t1: float, n: int, out: Changes, probes: int = 40
) -> None:
    """Dtypes, order, (t0, t1], alternation per client, the state at random times more
    than 1e-6 s from every change, and exactly at t1."""
    times, ids, online = out
    assert times.dtype == np.float64 and ids.dtype == np.int64 and online.dtype == bool
    assert len(times) == len(ids) == len(online)
    # (time, off before on, id): strictly increasing, lexicographically
    order = np.lexsort((ids, online, times))
    assert np.array_equal(order, np.arange(len(times)))
    same = (times[1:] == times[:-1]) & (online[1:] == online[:-1])
    assert (ids[1:][same] > ids[:-1][same]).all()
    if len(times):
        assert times[0] > t0 and times[-1] <= t1
        assert ids.min() >= 0 and ids.max() < n
    all_ids = np.arange(n)
    start = system.available(all_ids, t0).copy()
    # every change flips its client's state: per client (time order) on, off, on, ...
    by_client = np.argsort(ids, kind="stable")
    c, o = ids[by_client], online[by_client]
    head = np.ones(len(c), dtype=bool)
    head[1:] = c[1:] != c[:-1]
    assert (o[head] != start[c[head]]).all()
    assert (o[1:][~head[1:]] != o[:-1][~head[1:]]).all()

    rng = np.random.default_rng(int(t0 * 1000) % 2**32)
    at = np.sort(rng.uniform(t0, t1, probes))
    if len(times):
        i = np.searchsorted(times, at)
        gap = np.minimum(
            np.abs(times[np.clip(i, 0, len(times) - 1)] - at),
            np.abs(times[np.clip(i - 1, 0, None)] - at),
        )
        at = at[gap > 1e-6]
    # apply the changes in time order, probe by probe (each batch: its clients' last change)
    state, done = start.copy(), 0
    for t in [*at.tolist(), t1]:
        k = int(np.searchsorted(times, t, side="right"))
        rev_ids, rev_on = ids[done:k][::-1], online[done:k][::-1]
        u, last = np.unique(rev_ids, return_index=True)
        state[u] = rev_on[last]
        done = k
        assert np.array_equal(state, system.available(all_ids, t)), t


# ---- a hand-made trace -----------------------------------------------------------------------


def behave(tmp_path: Path, devices: dict[str, tuple[list[float], list[float]]]) -> str:
    """A FedScale-shaped availability file (JSON), every device with period 1000 s."""
    data = {
        name: {"active": act, "inactive": inact, "finish_time": 1000}
        for name, (act, inact) in devices.items()
    }
    path = tmp_path / "behave.json"
    path.write_text(json.dumps(data))
    return str(path)


def hand_system(tmp_path: Path) -> TraceSystem:
    """Five devices of period 1000 s (identity mapping: client k -> device k mod 5):

    A [100, 300) + [500, 600);  B [0, 200) + [900, 1000), one stretch [900, 1200) across
    the wrap;  C [0, 1000): always online;  D no window (kept): never online;
    E [300, 500).  Trace time τ = 50 + 2 t, so virtual t = (τ - 50) / 2."""
    path = behave(
        tmp_path,
        {
            "A": ([100, 500], [300, 600]),
            "B": ([0, 900], [200, 1000]),
            "C": ([0], [1000]),
            "D": ([], []),
            "E": ([300], [500]),
        },
    )
    cfg = TraceConfig(
        availability="fedscale",
        availability_path=path,
        availability_offset_s=50.0,
        availability_time_scale=2.0,
        keep_unavailable_devices=True,
        mapping="identity",
        compute="none",
        bandwidth="constant",
        reference_seconds_per_example=1.0,
    )
    system = TraceSystem(cfg, 0)
    assert [system.devices(k).availability for k in range(7)] == list("ABCDEAB")
    return system


def test_offline_s_on_a_hand_made_trace(tmp_path: Path) -> None:
    system = hand_system(tmp_path)
    # Client 0 (A) at t=10: τ = 50 + 20 = 70, offline (A starts at 100): lost at once.
    assert system.offline_s(0, 10.0, 30.0) == 10.0
    # t=30: τ=110, inside [100, 300) until τ=300, i.e. t = 30 + (300 - 110) / 2 = 125.
    assert system.offline_s(0, 30.0, 200.0) == 125.0
    assert system.offline_s(0, 30.0, 125.0) is None  # arrives exactly as it goes: kept
    # t=500: τ=1050, rel 50, offline; t=530: τ=1110, rel 110: until rel 300, t = 530 + 95.
    assert system.offline_s(5, 500.0, 501.0) == 500.0
    assert system.offline_s(5, 530.0, 1e9) == 625.0
    # B at t=450: τ=950, rel 950 in [900, 1000) whose stretch runs on to 1200 (the wrap):
    # t = 450 + (1200 - 950) / 2 = 575; at t=460 (τ=970) the same end, 460 + 115 = 575.
    assert system.offline_s(1, 450.0, 1e9) == 575.0
    assert system.offline_s(6, 460.0, 1e9) == 575.0
    # C never goes offline; D is offline at once.
    assert system.offline_s(2, 123.0, 1e12) is None
    assert system.offline_s(3, 123.0, 124.0) == 123.0
    # and every answer is the vectorised one, bit for bit
    for k in range(10):
        for t in np.linspace(-700.0, 2500.0, 321):
            assert system.offline_s(k, float(t), float(t) + 60) == numpy_offline(
                system, k, float(t), float(t) + 60
            )


def test_end_after_on_a_hand_made_series() -> None:
    # Segments [0, 1) at 100 B/s, [1, 3) at 0, [3, 4) at 300: period 4 s, 400 B per period;
    # C (bytes at each segment's start) = [0, 100, 100], C_end = [100, 100, 400].
    rates = Rates(
        [RateSeries("x", np.array([1.0, 2.0, 1.0]), np.array([100.0, 0.0, 300.0]))], np.array([0])
    )
    # From 0.5: G = 100 * 0.5 + 50 = 100 reached in segment 0 at x = 100 / 100 = 1.0.
    assert rates.end_after(0, 0.5, 50.0) == 1.0
    # 51 B: G = 101 > C_end[0] = C_end[1] = 100, so segment 2: x = 3 + (101 - 100) / 300.
    assert rates.end_after(0, 0.5, 51.0) == pytest.approx(3 + 1 / 300, rel=1e-12)
    # From 2.0 (inside the zero-rate segment): G = 100 + 30, x = 3 + 30 / 300 = 3.1.
    assert rates.end_after(0, 2.0, 30.0) == pytest.approx(3.1, rel=1e-12)
    # From 3.5, 400 B (one period): G = 100 + 300 * 0.5 + 400 = 650, q = 1, g = 250,
    # x = 3 + 150 / 300 = 3.5: end = 3.5 + (4 + 3.5 - 3.5) = 7.5.
    assert rates.end_after(0, 3.5, 400.0) == 7.5
    # From 0, 400 B: G = 400 is a whole period: g = 400 in segment 2, x = 4: end 4.0.
    assert rates.end_after(0, 0.0, 400.0) == 4.0
    # Ten periods and a half later the same as from 0.5 (4 s * 10 = 40 s on).
    assert rates.end_after(0, 40.5, 50.0) == 41.0
    assert rates.end_after(0, 1.5, 0.0) == 1.5
    rng = np.random.default_rng(3)
    for tau, n in zip(rng.uniform(-50, 50, 500), rng.uniform(0, 2000, 500), strict=True):
        got = rates.end_after(0, float(tau), float(n))
        assert got == numpy_end_after(rates, 0, float(tau), float(n))
        assert delivered(rates, 0, float(tau), got) == pytest.approx(float(n), rel=1e-9)


def test_end_after_with_a_last_segment_of_rate_zero() -> None:
    # Segments [0, 1) at 0.1 B/s and [1, 2) at 0: bytes arrive at the end of the positive
    # segment when a rounding puts g just past it (the numpy formula divided by 0 there).
    rates = Rates([RateSeries("x", np.array([1.0, 1.0]), np.array([0.1, 0.0]))], np.array([0]))
    rng = np.random.default_rng(4)
    for tau in rng.uniform(0, 100, 2000):
        n = 0.1 * int(rng.integers(1, 30))
        got = rates.end_after(0, float(tau), n)
        assert math.isfinite(got) and got >= tau
        assert delivered(rates, 0, float(tau), got) == pytest.approx(n, rel=1e-9)


def test_scalar_paths_on_a_hand_made_system(tmp_path: Path) -> None:
    # Constant 10 Mbit/s down and 5 up, 0.1 s latency, 1 s per example (compute=none):
    # 1.25e6 B take 1 s down and 2 s up. From t=30: download ends 30.1 + 1 = 31.1, compute
    # 20 examples: 51.1, upload 51.2 + 2 = 53.2; client 0 (A) goes offline at t=125.
    cfg = TraceConfig(
        availability="fedscale",
        availability_path=behave(tmp_path, {"A": ([100, 500], [300, 600])}),
        availability_offset_s=50.0,
        availability_time_scale=2.0,
        compute="none",
        bandwidth="constant",
        downlink_mbps=10,
        uplink_mbps=5,
        latency_s=0.1,
        reference_seconds_per_example=1.0,
    )
    system = TraceSystem(cfg, 0)
    timing = system.timing(0, 30.0, 20, 1_250_000, 1_250_000)
    assert (timing.download_end_s, timing.compute_end_s, timing.arrival_s) == pytest.approx(
        (31.1, 51.1, 53.2), rel=1e-12
    )
    assert timing.offline_s is None
    # From t=100 (τ=250, until τ=300: t=125) the task would arrive at 123.2: kept; from
    # t=110 (τ=270) it would arrive at 133.2: lost at 125.
    assert system.timing(0, 100.0, 20, 1_250_000, 1_250_000).offline_s is None
    assert system.timing(0, 110.0, 20, 1_250_000, 1_250_000).offline_s == 125.0
    assert system.speed(3) == 1.0 and system.compute_time_s(3, 20) == 20.0


# ---- the real traces -------------------------------------------------------------------------


def real_system(**kw: object) -> TraceSystem:
    """As benchmarks/events.py builds it: FLASH loose availability from 27 h, FLASH
    compute, HSDPA bandwidth."""
    args: dict[str, object] = {
        "availability": "flash_loose",
        "availability_offset_s": 27 * 3600.0,
        "compute": "flash",
        "bandwidth": "hsdpa",
        "reference_seconds_per_example": 0.01,
        "data_dir": str(SHARED),
    }
    args.update(kw)
    return TraceSystem(TraceConfig(**args), seed=0)  # type: ignore[arg-type]


@needs_shared
@pytest.mark.parametrize("bandwidth", ["hsdpa", "flash"])
def test_scalar_paths_match_the_vectorised_formulas(bandwidth: str) -> None:
    system = real_system(bandwidth=bandwidth, latency_s=0.05, availability_time_scale=3.0)
    speeds, ref = system._speed, 0.01
    rng = np.random.default_rng(5)
    for _ in range(3000):
        k = int(rng.integers(0, 100_000))
        t = float(rng.uniform(-2e5, 2e6))
        nbytes = int(rng.integers(0, 20_000_000))
        work = int(rng.integers(1, 500))
        horizon = t + float(rng.uniform(0, 3e4))
        assert system.offline_s(k, t, horizon) == numpy_offline(system, k, t, horizon)
        down = numpy_transfer_end(system, k, t, nbytes, up=False)
        assert system.transfer_end_s(k, t, nbytes, uplink=False) == down
        speed = float(speeds[k % len(speeds)])
        assert system.speed(k) == speed
        assert system.compute_time_s(k, work) == work * ref / speed
        compute = down + work * ref / speed
        arrival = numpy_transfer_end(system, k, compute, nbytes // 3, up=True)
        timing = system.timing(k, t, work, nbytes, nbytes // 3)
        assert (timing.download_end_s, timing.compute_end_s, timing.arrival_s) == (
            down,
            compute,
            arrival,
        )
        assert timing.offline_s == numpy_offline(system, k, t, arrival)
        s = k % system.down.n
        tau = float(rng.uniform(-1e6, 1e6))
        assert system.down.end_after(s, tau, float(nbytes)) == numpy_end_after(
            system.down, s, tau, float(nbytes)
        )


@needs_shared
def test_availability_changes_on_flash() -> None:
    rng = np.random.default_rng(6)
    for kw in ({}, {"availability_time_scale": 24.0, "availability_offset_s": 1000.25}):
        system = real_system(**kw)
        assert system.windows is not None
        for _ in range(12):
            t0 = float(rng.uniform(-1e5, 6e5))
            t1 = t0 + float(rng.choice([1.0, 600.0, 3600.0, 5e4]))
            n = int(rng.choice([50, 2849, 10_000]))
            check_changes(system, t0, t1, n, system.availability_changes(t0, t1, n))
        # whole numbers of seconds, where the trace's (integer) boundaries fall exactly
        for t0 in (0.0, 3600.0, 86400.0 - 1000.0):
            check_changes(
                system, t0, t0 + 7200, 3000, system.availability_changes(t0, t0 + 7200, 3000)
            )


@needs_shared
def test_availability_changes_for_100k_clients_is_fast() -> None:
    system = real_system()
    n = 100_000
    system.availability_changes(0.0, 1.0, n)
    start = time.perf_counter()
    out = system.availability_changes(3600.0, 7200.0, n)
    elapsed = time.perf_counter() - start
    check_changes(system, 3600.0, 7200.0, n, out)
    # about 1 ms and 35,000 changes (0.6 MB) on the project machine; 100 ms leaves room
    # for a loaded machine but not for a Python loop over clients or windows
    assert 0 < len(out[0]) < 200_000 and elapsed < 0.1


def test_availability_changes_on_the_hand_made_trace(tmp_path: Path) -> None:
    system = hand_system(tmp_path)
    # Clients 0..7 = A B C D E A B C. (0, 600] is trace (50, 1250]. At τ=50: A off, B on
    # (in [0, 200)), C on, D off, E off. Boundaries, t = (τ - 50) / 2:
    #   A: on 100 (t=25), off 300 (125), on 500 (225), off 600 (275), on 1100 (525);
    #      off 1300 (t=625) is past t1.
    #   B: off 200 (75), on 900 (425); 1000 -> 1000 is the wrap, one stretch: no change;
    #      off 1200 (575).
    #   C, D: none.  E: on 300 (125), off 500 (225); on 1300 (625) is past t1.
    expected = [
        (25.0, 0, True),
        (25.0, 5, True),
        (75.0, 1, False),
        (75.0, 6, False),
        (125.0, 0, False),  # same time: offs first, then ons; ids ascending
        (125.0, 5, False),
        (125.0, 4, True),
        (225.0, 4, False),
        (225.0, 0, True),
        (225.0, 5, True),
        (275.0, 0, False),
        (275.0, 5, False),
        (425.0, 1, True),
        (425.0, 6, True),
        (525.0, 0, True),
        (525.0, 5, True),
        (575.0, 1, False),
        (575.0, 6, False),
    ]
    times, ids, online = system.availability_changes(0.0, 600.0, 8)
    assert list(zip(times.tolist(), ids.tolist(), online.tolist(), strict=True)) == expected
    check_changes(system, 0.0, 600.0, 8, (times, ids, online))
    # (25, 125]: A's on at t=25 is excluded (A is online at 25 already: τ = 100 starts its
    # window), its off at 125 included, as are E's on at 125 and B's off at 75.
    times, ids, online = system.availability_changes(25.0, 125.0, 8)
    assert list(zip(times.tolist(), ids.tolist(), online.tolist(), strict=True)) == [
        (75.0, 1, False),
        (75.0, 6, False),
        (125.0, 0, False),
        (125.0, 5, False),
        (125.0, 4, True),
    ]
    # Fewer clients than devices: clients 0..2 only. An empty or reversed interval: nothing.
    times, ids, online = system.availability_changes(0.0, 100.0, 3)
    assert list(zip(times.tolist(), ids.tolist(), online.tolist(), strict=True)) == [
        (25.0, 0, True),
        (75.0, 1, False),
    ]
    for t0, t1 in ((10.0, 10.0), (20.0, 10.0)):
        assert [len(a) for a in system.availability_changes(t0, t1, 8)] == [0, 0, 0]
    # Many cycles (period 1000 trace s = 500 virtual s): A has 4 changes per cycle, B 2,
    # E 2, per client; clients 0..7 hold A twice, B twice, E once: 4*2 + 2*2 + 2 = 14 per
    # cycle, and (0, 50000] is 100 cycles whose boundaries are all inside.
    out = system.availability_changes(0.0, 50_000.0, 8)
    assert len(out[0]) == 1400
    check_changes(system, 0.0, 50_000.0, 8, out)


def test_availability_changes_with_ends_within_rounding_of_a_boundary(tmp_path: Path) -> None:
    # τ = offset + scale * t with offsets and scales that are not binary fractions, so that
    # an interval's end at a change time (or one ulp on either side) maps to a trace time
    # a few ulps from the boundary: the state at both ends must still be available()'s
    # (counting the boundaries passed at an end by another comparison than available()'s
    # put E's off at 500.7 at t1 instead of just after t0 here).
    path = behave(
        tmp_path,
        {"A": ([100, 500], [300, 600]), "B": ([0, 900], [200, 1000]), "E": ([300.3], [500.7])},
    )
    for offset, scale in ((0.1, 3.0), (0.3, 0.7), (1e5 + 0.1, 1 / 3), (7.77, 24.0)):
        cfg = TraceConfig(
            availability="fedscale",
            availability_path=path,
            availability_offset_s=offset,
            availability_time_scale=scale,
            mapping="identity",
            compute="none",
            bandwidth="constant",
        )
        system = TraceSystem(cfg, 0)
        times = system.availability_changes(-1500 / scale, 1500 / scale, 3)[0]
        # A's, B's and E's boundaries (10 in one cycle of the trace) are all in the range
        assert len(np.unique(times)) >= 10
        for tc in np.unique(times):
            for t in (float(np.nextafter(tc, -np.inf)), float(tc), float(np.nextafter(tc, np.inf))):
                for t0, t1 in ((t - 3.0, t), (t, t + 3.0)):
                    out = system.availability_changes(t0, t1, 3)
                    check_changes(system, t0, t1, 3, out, probes=4)


def test_a_window_shorter_than_the_rounding() -> None:
    # One slot online over [1e5, 1e5 + k ulps) of a 2e5 s period, read at τ = scale * t:
    # its on and off either keep distinct times, on first, or round to one time and are
    # both dropped (never an off and an on at one time, which would read as online).
    for k in range(1, 6):
        end = 1e5
        for _ in range(k):
            end = float(np.nextafter(end, math.inf))
        w = Windows([np.array([[1e5, end]])], np.array([0.0]), np.array([2e5]))
        for scale in (3.0, 7.0, 1 / 3):
            times, slots, online = w.changes((1e5 - 100) / scale, (1e5 + 100) / scale, 0.0, scale)
            assert online.tolist() in ([], [True, False]) and slots.tolist() in ([], [0, 0])
            assert len(times) == 0 or times[0] < times[1]


def test_slot_changes_to_client_changes() -> None:
    # Three slots, five clients: client k uses slot k mod 3, so slot 0 -> clients 0, 3;
    # slot 1 -> 1, 4; slot 2 -> 2. At t=1 slots 0 and 1 go on; at t=2 slot 2 goes off
    # and slot 0 on again (off first); slot 2's on at t=3.
    slot_changes = (
        np.array([1.0, 1.0, 2.0, 2.0, 3.0]),
        np.array([0, 1, 2, 0, 2]),
        np.array([True, True, False, True, True]),
    )
    times, ids, online = for_clients(slot_changes, 3, 5)
    assert list(zip(times.tolist(), ids.tolist(), online.tolist(), strict=True)) == [
        (1.0, 0, True),
        (1.0, 1, True),
        (1.0, 3, True),
        (1.0, 4, True),
        (2.0, 2, False),
        (2.0, 0, True),
        (2.0, 3, True),
        (3.0, 2, True),
    ]
    # two clients: slot 2 has none
    assert for_clients(slot_changes, 3, 2)[1].tolist() == [0, 1, 0]


def random_windows(rng: np.random.Generator, n: int) -> Windows:
    per_slot, origins, periods = [], [], []
    for j in range(n):
        period = float(rng.integers(20, 200))
        k = int(rng.integers(0, 6))
        starts = rng.integers(-30, 2 * int(period), k).astype(float)
        raw = np.stack([starts, starts + rng.integers(0, 80, k)], axis=1).reshape(-1, 2)
        if j % 7 == 0:  # a stretch across the wrap
            raw = np.concatenate([raw, [[period - 5, period + 3]]])
        per_slot.append(normalise_windows(raw, period))
        origins.append(float(rng.integers(-300, 300)))
        periods.append(period)
    return Windows(per_slot, np.array(origins), np.array(periods))


def slow_changes(w: Windows, tau0: float, tau1: float) -> list[tuple[float, int, bool]]:
    """Every boundary of every slot in (τ0, τ1] by Python loops over cycles and windows,
    the end and start that meet at a wrapping slot's period left out."""
    out = []
    for j in range(w.n):
        lo, hi = int(w.first[j]), int(w.first[j + 1])
        o, p = float(w.origin[j]), float(w.period[j])
        pts = []
        for i in range(lo, hi):
            pts += [(float(w.starts[i]), True), (float(w.ends[i]), False)]
        if pts and pts[0][0] <= 0 and pts[-1][0] >= p:
            pts = pts[1:-1]
        for m in range(math.floor((tau0 - o) / p) - 1, math.floor((tau1 - o) / p) + 2):
            for x, on in pts:
                tau = o + m * p + x
                if tau0 < tau <= tau1:
                    out.append((tau, j, on))
    return sorted(out, key=lambda c: (c[0], c[2], c[1]))


def test_window_changes_match_a_slow_reference() -> None:
    rng = np.random.default_rng(7)
    w = random_windows(rng, 80)
    for _ in range(40):
        # boundaries are whole seconds; the interval's ends are not, so no boundary is
        # within rounding of them
        tau0 = float(rng.uniform(-2000, 2000))
        tau1 = tau0 + float(rng.choice([3.3, 50.5, 400.7, 5000.1]))
        # virtual t = (τ - 10) / 0.5
        times, slots, online = w.changes((tau0 - 10) / 0.5, (tau1 - 10) / 0.5, 10.0, 0.5)
        expected = slow_changes(w, tau0, tau1)
        assert list(zip(slots.tolist(), online.tolist(), strict=True)) == [
            (j, on) for _, j, on in expected
        ]
        assert times == pytest.approx([(tau - 10) / 0.5 for tau, _, _ in expected], rel=1e-12)


def test_no_changes_without_availability_windows() -> None:
    system = TraceSystem(TraceConfig(availability="none", compute="none", bandwidth="constant"), 0)
    times, ids, online = system.availability_changes(0.0, 1e6, 1000)
    assert (times.dtype, ids.dtype, online.dtype) == (np.float64, np.int64, bool)
    assert len(times) == len(ids) == len(online) == 0
    # The base class: always available -> no change; a model with its own available() that
    # does not list its changes -> None.
    base = HomogeneousSystem(HomogeneousConfig()).availability_changes(0.0, 10.0, 5)
    assert base is not None and [len(a) for a in base] == [0, 0, 0]

    class Flaky(HomogeneousSystem):
        def available(self, client_ids: np.ndarray, t: float) -> np.ndarray:
            return np.asarray(client_ids) % 2 == 0

    assert Flaky(HomogeneousConfig()).availability_changes(0.0, 10.0, 5) is None
