"""system=trace: hand-computed oracles, a slow reference for availability, offline detection,
the seeded client -> device mapping and the lower bound on task time.

Every trace here is a tiny file written by the test (FLASH's, FedScale's and the HSDPA
"cooked" shapes), so nothing needs /work/shared/data; test_system_traces_files.py reads the
real files.
"""

from __future__ import annotations

import json
import math
import pickle
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from roost.registry import ConfigError
from roost.system import SYSTEMS, build_system
from roost.system.traces import Rates, RateSeries, TraceConfig, TraceSystem
from roost.system.traces.pools import SlotTable
from roost.system.traces.trace_system import GOLDEN
from roost.system.traces.windows import Windows, normalise_windows

MBPS = 1e6 / 8.0  # bytes per second in one Mbit/s


def one_series(mbps: list[float]) -> Rates:
    """One device whose rate is mbps[i] over [i, i + 1), cyclic with period len(mbps)."""
    series = RateSeries("x", np.ones(len(mbps)), np.array(mbps) * MBPS)
    return Rates([series], np.array([0]))


# ---- bandwidth: the piecewise-constant integral ------------------------------------------


def test_one_megabyte_over_1_2_4_mbps_from_half_a_second() -> None:
    # 1 MB = 8e6 bits. From t=0.5: [0.5, 1) at 1 Mbit/s gives 0.5e6 bits, [1, 2) at 2 gives
    # 2e6 (2.5e6 so far), [2, 3) at 4 gives 4e6 (6.5e6 at t=3). The trace wraps: [3, 4) at
    # 1 gives 1e6 (7.5e6 at t=4), and the last 0.5e6 bits take 0.25 s at 2 Mbit/s: t=4.25.
    rates = one_series([1, 2, 4])
    assert rates.end_after(0, 0.5, 1_000_000) == pytest.approx(4.25, abs=1e-12)
    # From t=0: 1e6 + 2e6 + 4e6 = 7e6 bits by t=3, the last 1e6 bits fill [3, 4): t=4.0,
    # exactly one period plus one segment (the boundary case of the inverse).
    assert rates.end_after(0, 0.0, 1_000_000) == pytest.approx(4.0, abs=1e-12)
    # From t=2: [2, 3) at 4 Mbit/s carries 4e6 bits, [3, 4) 1e6, [4, 5) 2e6 (7e6 at t=5),
    # the last 1e6 bits take 0.25 s at 4 Mbit/s: t=5.25. Same bytes, another start, another
    # duration (3.25 s instead of 3.75 s).
    assert rates.end_after(0, 2.0, 1_000_000) == pytest.approx(5.25, abs=1e-12)
    # Starting at t=3.5 is starting at 0.5 one period later: 4.25 + 3.
    assert rates.end_after(0, 3.5, 1_000_000) == pytest.approx(7.25, abs=1e-12)
    # Ten periods and a bit: 70e6 bits (8.75 MB) take exactly 10 periods from t=0.5.
    assert rates.end_after(0, 0.5, 8_750_000) == pytest.approx(30.5, abs=1e-9)
    assert rates.end_after(0, 1.7, 0) == 1.7


def test_zero_rate_seconds_are_skipped() -> None:
    # [0, 1) at 0 Mbit/s, [1, 2) at 8 Mbit/s: 1 MB from t=0 waits 1 s, then takes 1 s.
    rates = one_series([0, 8])
    assert rates.end_after(0, 0.0, 1_000_000) == pytest.approx(2.0)
    # 2 MB from t=0: the first MB by t=2, [2, 3) carries nothing, the second by t=4.
    assert rates.end_after(0, 0.0, 2_000_000) == pytest.approx(4.0)


def test_hsdpa_file_through_the_system(tmp_path: Path) -> None:
    # Pensieve's reading of a cooked line: throughput i holds over [time_{i-1}, time_i),
    # so the first line's 9.9 is never used and the series is [1, 2, 4] Mbit/s, period 3 s.
    folder = tmp_path / "cooked"
    folder.mkdir()
    (folder / "norway_x").write_text("0.0 9.9\n1.0 1\n2.0 2\n3.0 4\n")
    cfg = TraceConfig(
        availability="none",
        compute="none",
        bandwidth="hsdpa",
        bandwidth_path=str(folder),
        reference_seconds_per_example=0.5,
        uplink_scale=0.5,
    )
    system = TraceSystem(cfg, seed=3)
    u0 = float(np.random.default_rng([3, 9]).random())
    for k in (0, 1, 7):
        phase = ((u0 + k * GOLDEN) % 1.0) * 3.0  # client k's documented offset in the trace
        for t0 in (0.0, 0.5, 2.0, 100.25):
            down = one_series([1, 2, 4]).end_after(0, t0 + phase, 1_000_000) - phase
            assert system.transfer_end_s(k, t0, 1_000_000, uplink=False) == pytest.approx(down)
            up = one_series([0.5, 1, 2]).end_after(0, t0 + phase, 1_000_000) - phase
            assert system.transfer_end_s(k, t0, 1_000_000, uplink=True) == pytest.approx(up)
            timing = system.timing(k, t0, 10, 1_000_000, 1_000_000)
            assert timing.download_end_s == pytest.approx(down)
            # compute: 10 examples * 0.5 s on the reference device (compute=none)
            assert timing.compute_end_s == pytest.approx(down + 5.0)
            up_end = one_series([0.5, 1, 2]).end_after(0, down + 5.0 + phase, 1_000_000)
            assert timing.arrival_s == pytest.approx(up_end - phase)
            assert timing.offline_s is None
    # The mean rate (7/3 Mbit/s) is what profile() reports.
    assert system.profile(0).downlink_mbps == pytest.approx(7 / 3)


def test_constant_bandwidth_and_latency() -> None:
    # 1.25e6 bytes = 1e7 bits: 1 s at 10 Mbit/s down, 2 s at 5 Mbit/s up, plus 0.1 s of
    # latency before each; 20 examples * 0.1 s compute. 0 + 1.1 = 1.1, + 2 = 3.1, + 2.1 = 5.2.
    cfg = TraceConfig(
        availability="none",
        compute="none",
        bandwidth="constant",
        downlink_mbps=10,
        uplink_mbps=5,
        latency_s=0.1,
        reference_seconds_per_example=0.1,
    )
    timing = TraceSystem(cfg, 0).timing(4, 0.0, 20, 1_250_000, 1_250_000)
    assert (timing.download_end_s, timing.compute_end_s, timing.arrival_s) == pytest.approx(
        (1.1, 3.1, 5.2)
    )


def test_model_cost_gives_the_reference_time() -> None:
    # reference_seconds_per_example=None: 3 * macs / reference_macs_per_s = 3 * 2e6 / 1e9
    # = 6 ms per example, so 100 examples take 0.6 s.
    cfg = TraceConfig(availability="none", compute="none", bandwidth="constant")
    system = TraceSystem(cfg, 0)
    with pytest.raises(ConfigError, match="reference_seconds_per_example"):
        system.timing(0, 0.0, 100, 0, 0)
    # Without a cost the lower bound drops the (unknown) compute: 0 bytes, 0 latency -> 0.
    assert system.min_task_time_s(np.array([100]), 0, 0) == 0.0
    system.set_model_cost(2e6)
    assert system.compute_time_s(0, 100) == pytest.approx(0.6)


# ---- availability: windows against a slow reference ---------------------------------------


def slow_available(raw: np.ndarray, origin: float, period: float, tau: float) -> bool:
    """The rule stated independently of the implementation: online at τ when for some whole
    number of periods m, start <= rel + m * period < end, with rel = (τ - origin) mod period,
    starts clipped to 0; a window at least a period long covers every time."""
    rel = (tau - origin) % period
    for s, e in raw:
        s = max(s, 0.0)
        if e - s >= period:
            return True
        for m in range(int(e // period) + 2):
            if s <= rel + m * period < e:
                return True
    return False


def random_devices(
    rng: np.random.Generator, n: int
) -> tuple[list[np.ndarray], list[float], list[float]]:
    raws, origins, periods = [], [], []
    for _ in range(n):
        period = float(rng.integers(50, 400))
        k = int(rng.integers(0, 6))
        starts = rng.integers(-60, 2 * int(period), k).astype(float)
        raw = np.stack([starts, starts + rng.integers(0, 120, k)], axis=1).reshape(-1, 2)
        raws.append(raw)
        origins.append(float(rng.integers(-500, 500)))
        periods.append(period)
    return raws, origins, periods


def test_windows_match_a_slow_reference() -> None:
    rng = np.random.default_rng(0)
    raws, origins, periods = random_devices(rng, 60)
    # Two hand-made devices: one always online, one [0, 10) + [90, 100) of period 100.
    raws += [np.array([[0.0, 500.0]]), np.array([[90.0, 100.0], [0.0, 10.0]])]
    origins += [0.0, 0.0]
    periods += [100.0, 100.0]
    windows = Windows(
        [normalise_windows(r, p) for r, p in zip(raws, periods, strict=True)],
        np.array(origins),
        np.array(periods),
    )
    slots = rng.integers(0, len(raws), 1000)
    # integer and half-integer times hit window boundaries exactly; the rest are generic
    taus = np.concatenate([rng.integers(-1000, 3000, 500) * 0.5, rng.uniform(-1e4, 1e4, 500)])
    for j, tau in zip(slots, taus, strict=True):
        expect = slow_available(raws[j], origins[j], periods[j], tau)
        assert bool(windows.available(np.array([j]), tau)[0]) == expect, (j, tau)
        until = float(windows.online_until(np.array([j]), tau)[0])
        nxt = float(windows.next_online(np.array([j]), tau)[0])
        if expect:
            assert nxt == tau and until > tau
            if math.isfinite(until):  # online just before the stretch ends, offline at it
                assert slow_available(raws[j], origins[j], periods[j], until - 1e-6)
                assert not slow_available(raws[j], origins[j], periods[j], until)
        else:
            assert until == tau
            if math.isfinite(nxt):  # offline just before the next window, online at it
                assert nxt > tau and slow_available(raws[j], origins[j], periods[j], nxt)
                assert not slow_available(raws[j], origins[j], periods[j], nxt - 1e-6)
    # One call for all 1000 (slot, time) pairs at one time equals the per-slot answers.
    tau = 123.0
    every = windows.available(slots, tau)
    assert every.tolist() == [slow_available(raws[j], origins[j], periods[j], tau) for j in slots]
    # The always-online device never goes offline; the other's stretch [90, 110) spans the
    # wrap: at τ=95 it is online until 110 (10 s into the next cycle).
    assert windows.online_until(np.array([60]), 7.0)[0] == math.inf
    assert windows.online_until(np.array([61]), 95.0)[0] == pytest.approx(110.0)
    assert windows.next_online(np.array([61]), 50.0)[0] == pytest.approx(90.0)


def flash_file(tmp_path: Path, users: dict[str, list[list[float]]]) -> str:
    path = tmp_path / "ready.json"
    path.write_text(json.dumps(users))
    return str(path)


def test_system_available_is_one_vectorised_query(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    users = {}
    for u in range(300):
        starts = np.sort(rng.uniform(0, 2 * 86400, 8))
        users[f"u{u}"] = [[s, s + rng.uniform(0, 20000)] for s in starts]
    users["empty"] = []  # left out of the pool: 300 devices remain
    path = flash_file(tmp_path, users)
    cfg = TraceConfig(
        availability="flash_loose",
        availability_path=path,
        compute="none",
        bandwidth="constant",
        reference_seconds_per_example=1e-3,
    )
    system = TraceSystem(cfg, seed=5)
    assert system.windows is not None and system.windows.n == 300
    # Period: the windows reach past day 2, but 99% of their length lies within 3 days.
    period = float(system.windows.period[0])
    assert period in (2 * 86400.0, 3 * 86400.0)
    ids = rng.integers(0, 5000, 1000)
    for t in rng.uniform(0, 4e5, 20):
        mask = system.available(ids, t)
        slow = [
            slow_available(np.array(users[system.devices(int(k)).availability]), 0.0, period, t)
            for k in ids
        ]
        assert mask.tolist() == slow
    # 100,000 clients in one call: about 0.3 ms on the project machine; 20 ms leaves room for
    # a loaded machine but not for a Python loop over clients (~100 ms).
    many = np.arange(100_000)
    system.available(many, 1.0)
    start = time.perf_counter()
    for t in range(10):
        system.available(many, 1000.0 * t + 0.5)
    assert (time.perf_counter() - start) / 10 < 0.02


def test_next_available_is_the_earliest_window_start(tmp_path: Path) -> None:
    # Two users, period 1 day: a online [100, 200), b online [150, 400) and [86000, 86400).
    path = flash_file(tmp_path, {"a": [[100, 200]], "b": [[150, 400], [86000, 86400]]})
    cfg = TraceConfig(
        availability="flash_loose",
        availability_path=path,
        compute="none",
        bandwidth="constant",
        mapping="identity",
        availability_time_scale=2.0,
        availability_offset_s=10.0,
        reference_seconds_per_example=1.0,
    )
    system = TraceSystem(cfg, 0)
    both = np.array([0, 1])
    # virtual t maps to trace time 10 + 2 t: t=0 -> 10, offline; a starts at trace 100,
    # i.e. virtual (100 - 10) / 2 = 45.
    assert system.available(both, 0.0).tolist() == [False, False]
    assert system.next_available_s(both, 0.0) == pytest.approx(45.0)
    # t=50 -> trace 110: a online, b not yet (it starts at 150).
    assert system.available(both, 50.0).tolist() == [True, False]
    assert system.next_available_s(both, 50.0) == 50.0
    # t=300 -> trace 610: nobody; b's window at 86000 comes first: (86000 - 10) / 2 = 42995.
    assert system.next_available_s(both, 300.0) == pytest.approx(42995.0)
    # b's window [86000, 86400) runs into next day's [0, ...)? No: b's first window starts
    # at 150, not 0, so at t=43100 (trace 86210) b is online until trace 86400 (t=43195).
    assert system.offline_s(1, 43100.0, 1e9) == pytest.approx(43195.0)
    assert system.next_available_s(np.array([], dtype=np.int64), 0.0) == math.inf


# ---- offline detection mid-task -------------------------------------------------------------


def behave_file(tmp_path: Path) -> str:
    """FedScale's client_behave_trace shape, pickled: client 1 online [0, 100) of every
    1000 s; client 2 online [0, 100) and [900, 1000), i.e. [900, 1100) across the wrap."""
    trace = {
        1: {"duration": 1000, "active": [0], "inactive": [100], "finish_time": 1000, "model": "x"},
        2: {
            "duration": 1000,
            "active": [0, 900],
            "inactive": [100, 1000],
            "finish_time": 1000,
            "model": "y",
        },
    }
    path = tmp_path / "client_behave_trace"
    path.write_bytes(pickle.dumps(trace))
    return str(path)


def test_offline_detection_mid_task(tmp_path: Path) -> None:
    # Constant 10 Mbit/s both ways: 1.25e6 bytes take 1 s; 50 examples at 1 s each take 50 s.
    # A task lasts 52 s. identity mapping: client 0 -> trace client 1, client 1 -> client 2.
    cfg = TraceConfig(
        availability="fedscale",
        availability_path=behave_file(tmp_path),
        compute="none",
        bandwidth="constant",
        downlink_mbps=10,
        uplink_mbps=10,
        reference_seconds_per_example=1.0,
        mapping="identity",
    )
    system = TraceSystem(cfg, 0)
    assert system.devices(0).availability == "1" and system.devices(1).availability == "2"

    def task(k: int, t0: float):
        return system.timing(k, t0, 50, 1_250_000, 1_250_000)

    # Dispatched at 10: arrives at 62, inside [0, 100): survives.
    assert task(0, 10.0).arrival_s == pytest.approx(62.0) and task(0, 10.0).offline_s is None
    # Dispatched at 48 it arrives at 100.0 exactly: online throughout [48, 100), survives.
    assert task(0, 48.0).offline_s is None
    # Dispatched at 60: would arrive at 112, but the window closes at 100: lost at 100.
    assert task(0, 60.0).offline_s == pytest.approx(100.0)
    # Dispatched at 150, offline already: lost at once.
    assert task(0, 150.0).offline_s == 150.0
    # Client 1 (trace 2) at 950 arrives at 1002: its stretch [900, 1100) spans the wrap.
    assert task(1, 950.0).offline_s is None
    # ... at 1070 (cycle 2, rel 70, inside the same stretch that ends at 1100): lost at 1100.
    assert task(1, 1070.0).offline_s == pytest.approx(1100.0)
    # ... and one cycle later the same: 2070 -> 2100.
    assert task(1, 2070.0).offline_s == pytest.approx(2100.0)


# ---- mapping clients to devices -------------------------------------------------------------


def test_mapping_is_a_seeded_permutation(tmp_path: Path) -> None:
    users = {f"u{i}": [[0, 10 + i]] for i in range(7)}
    path = flash_file(tmp_path, users)

    def system(seed: int, mapping: str = "seeded") -> TraceSystem:
        cfg = TraceConfig(
            availability="flash_loose",
            availability_path=path,
            compute="none",
            bandwidth="constant",
            mapping=mapping,
        )
        return TraceSystem(cfg, seed)

    names = list(users)
    # The documented rule: slot j = device perm[j], perm from default_rng([seed, 9, crc32]).
    perm = np.random.default_rng([42, 9, zlib.crc32(b"flash_flash_loose")]).permutation(7)
    a = system(42)
    assert [a.devices(k).availability for k in range(7)] == [names[i] for i in perm]
    # Clients 0..6 get distinct devices; client k + 7 reuses client k's.
    assert len({a.devices(k).availability for k in range(7)}) == 7
    assert all(a.devices(k) == a.devices(k + 7) == a.devices(k + 70) for k in range(7))
    # Deterministic: a second system (another process would do the same) agrees.
    assert [system(42).devices(k) for k in range(20)] == [a.devices(k) for k in range(20)]
    # Another seed, another permutation; identity is file order.
    assert [system(43).devices(k) for k in range(7)] != [a.devices(k) for k in range(7)]
    assert [system(42, "identity").devices(k).availability for k in range(8)] == [*names, "u0"]


def test_fedscale_capacity_pairs_compute_and_bandwidth(tmp_path: Path) -> None:
    # {client: {computation: ms/sample, communication: kbit/s}}; median computation 20 ms.
    cap = {i: {"computation": 10.0 * (i + 1), "communication": 1000.0 * (i + 1)} for i in range(3)}
    path = tmp_path / "client_device_capacity"
    path.write_bytes(pickle.dumps(cap))
    cfg = TraceConfig(
        availability="none",
        compute="fedscale",
        compute_path=str(path),
        bandwidth="fedscale",
        reference_seconds_per_example=0.06,
    )
    system = TraceSystem(cfg, 11)
    for k in range(6):
        dev = system.devices(k)
        assert dev.compute == dev.bandwidth  # one permutation for the one capacity file
        i = int(dev.compute)
        # speed = median / computation = 20 / (10 (i + 1)); 0.06 s on the median device is
        # FedScale's 3 * 20 ms: 3 * computation / 1000 per example.
        assert system.compute_time_s(k, 1) == pytest.approx(3 * cap[i]["computation"] / 1000)
        # 1000 (i + 1) kbit/s of 1024 bits: 1e6 bytes take 8e6 / (1024000 (i + 1)) s
        seconds = system.transfer_end_s(k, 5.0, 1_000_000, uplink=False) - 5.0
        assert seconds == pytest.approx(8e6 / (1024 * cap[i]["communication"]))


def test_slot_table() -> None:
    table = SlotTable(7)
    ids = np.array([0, 6, 7, 13, 5000, 3])
    assert table(ids).tolist() == (ids % 7).tolist()
    assert table(np.array([], dtype=np.int64)).tolist() == []


# ---- the lower bound ------------------------------------------------------------------------


def test_min_task_time_is_a_lower_bound(tmp_path: Path) -> None:
    folder = tmp_path / "cooked"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for f in range(5):
        times = np.cumsum(rng.uniform(0.2, 3.0, 40)) - 0.2
        lines = [f"{t:.3f} {v:.3f}" for t, v in zip(times, rng.uniform(0, 6, 40), strict=True)]
        (folder / f"trace_{f}").write_text("\n".join(lines) + "\n")
    cap = {i: {"computation": float(rng.uniform(5, 80)), "communication": 1.0} for i in range(9)}
    (tmp_path / "cap.json").write_text(json.dumps(cap))
    cfg = TraceConfig(
        availability="none",
        compute="fedscale",
        compute_path=str(tmp_path / "cap.json"),
        bandwidth="hsdpa",
        bandwidth_path=str(folder),
        latency_s=0.05,
        uplink_scale=0.3,
    )
    system = TraceSystem(cfg, 4)
    system.set_model_cost(5e6)
    work = rng.integers(1, 200, 40)
    bound = system.min_task_time_s(work, 400_000, 400_000)
    durations = [
        system.timing(k, float(t0), int(work[k]), 400_000, 400_000).duration_s
        for k in range(40)
        for t0 in rng.uniform(0, 1e4, 25)
    ]
    assert bound > 0 and min(durations) >= bound


def test_registered_and_validated() -> None:
    cfg = SYSTEMS.config(
        "trace", {"availability": "none", "compute": "none", "bandwidth": "constant"}
    )
    assert isinstance(build_system("trace", cfg, 0, 10), TraceSystem)
    # Each bad value names its field, as typed on the command line.
    bad = [
        ({"availability_time_scale": "0"}, "system.availability_time_scale"),
        ({"availability_period_s": "-1"}, "system.availability_period_s"),
        ({"reference_seconds_per_example": "0"}, "system.reference_seconds_per_example"),
        ({"availability": "fedscale"}, "system.availability_path"),
        ({"compute": "fedscale"}, "system.compute_path"),
        ({"flhetbench_case": "2"}, "system.flhetbench_case"),
        ({"flhetbench_case": "5", "availability": "flhetbench"}, "system.flhetbench_case"),
        ({"bandwidth": "wifi"}, "system.bandwidth"),
        ({"latency_s": "-0.1"}, "system.latency_s"),
    ]
    for values, key in bad:
        with pytest.raises(ConfigError) as err:
            SYSTEMS.config("trace", values)
        assert err.value.key == key, values
