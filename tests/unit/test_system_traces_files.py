"""Trace loaders: malformed files give one-line errors naming the file and the fault; the
real files in /work/shared/data (PROVENANCE.md) load with the counts PROVENANCE states.

Tests of the real files skip cleanly when the shared data folder is absent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from roost.system.traces import (
    TraceConfig,
    TraceFileMissing,
    TraceFormatError,
    TraceSystem,
    load_fedscale_behave,
    load_fedscale_capacity,
    load_flash_ready,
    load_flash_speed_distri,
    load_flash_speeds,
    load_flhetbench_speeds,
    load_flhetbench_timers,
    load_hsdpa,
    load_mobiperf,
)
from roost.system.traces.bandwidth import FLASH_STEPS, flash_series
from roost.system.traces.files import ENV_VAR
from roost.system.traces.pools import slot_order

SHARED = Path(os.environ.get(ENV_VAR) or "/work/shared/data")
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- malformed input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("[1, 2]", "expected a JSON object {user: [[start_s, end_s], ...]}"),
        ('{"u": [[1, 2], [3]]}', "user 'u'[1]: expected [start_s, end_s], got [3]"),
        ('{"u": [[1, "noon"]]}', "user 'u'[0]: expected a number, got 'noon'"),
        ('{"u": [[1, NaN]]}', "user 'u'[0]: [1, nan] is not a finite window"),
        ('{"u": 5}', "user 'u': expected a list of [start_s, end_s] pairs"),
        ('{"u": [[1, 2]', "not valid JSON"),
    ],
)
def test_malformed_flash_windows(tmp_path: Path, text: str, fault: str) -> None:
    path = write(tmp_path, "ready.json", text)
    with pytest.raises(TraceFormatError) as err:
        load_flash_ready(path)
    assert str(err.value).startswith(f"{path.resolve()}: ")
    assert fault in str(err.value)


def test_malformed_flhetbench_timers(tmp_path: Path) -> None:
    good = {"isSuccess": True, "trace_start": 10.0, "trace_end": 20.0, "ready_time": [[11, 12]]}
    cases = [
        ({"7": {"isSuccess": True}}, "device '7': expected an object with isSuccess"),
        ({"7": {**good, "trace_end": 5.0}}, "device '7': trace_end 5.0 is not after"),
        ({"7": {**good, "trace_start": None}}, "device '7'.trace_start: expected a number"),
        ({"7": {**good, "ready_time": [[1, 2, 3]]}}, "device '7'.ready_time[0]: expected"),
    ]
    for i, (data, fault) in enumerate(cases):
        path = write(tmp_path, f"timers{i}.json", json.dumps(data))
        with pytest.raises(TraceFormatError, match=r"timers\d\.json: ") as err:
            load_flhetbench_timers(path)
        assert fault in str(err.value)


def test_fedscale_files_are_plain_pickles(tmp_path: Path) -> None:
    # A pickle that names a class or function is refused before anything runs.
    evil = tmp_path / "behave"
    evil.write_bytes(pickle.dumps({1: OrderedDict(active=[0], inactive=[1], finish_time=2)}))
    with pytest.raises(TraceFormatError, match=r"collections\.OrderedDict"):
        load_fedscale_behave(evil)
    bad = tmp_path / "behave2"
    bad.write_bytes(pickle.dumps({1: {"active": [0, 5], "inactive": [1], "finish_time": 9}}))
    with pytest.raises(TraceFormatError, match="client 1: 2 active times but 1 inactive"):
        load_fedscale_behave(bad)
    bad.write_bytes(pickle.dumps({1: {"active": [0], "inactive": [1], "finish_time": 0}}))
    with pytest.raises(TraceFormatError, match=r"client 1.finish_time: expected a finite "):
        load_fedscale_behave(bad)
    cap = tmp_path / "cap"
    cap.write_bytes(pickle.dumps({3: {"computation": 5.0}}))
    with pytest.raises(TraceFormatError, match="client 3: expected a dict with computation"):
        load_fedscale_capacity(cap)
    cap.write_bytes(b"not a pickle")
    with pytest.raises(TraceFormatError, match="not a pickle of plain dicts"):
        load_fedscale_capacity(cap)


def test_fedscale_behave_shape(tmp_path: Path) -> None:
    # FedScale's documented fields; "duration" and "model" are ignored. Windows
    # [active[i], inactive[i]] relative to 0, cycled with period finish_time.
    trace = {
        5: {
            "duration": 300,
            "active": [10, 200],
            "inactive": [50, 260],
            "finish_time": 300,
            "model": "SM-G930F",
        },
        9: {"duration": 100, "active": [], "inactive": [], "finish_time": 100, "model": "x"},
    }
    path = tmp_path / "client_behave_trace"
    path.write_bytes(pickle.dumps(trace))
    dw = load_fedscale_behave(path)
    assert dw.names == ("5", "9") and dw.period.tolist() == [300.0, 100.0]
    assert dw.normalised()[0].tolist() == [[10.0, 50.0], [200.0, 260.0]]
    assert dw.nonempty().tolist() == [0]  # client 9 is never active
    # The same shape as JSON works too.
    as_json = write(tmp_path, "behave.json", json.dumps({str(k): v for k, v in trace.items()}))
    assert load_fedscale_behave(as_json).normalised()[0].tolist() == dw.normalised()[0].tolist()


def test_malformed_bandwidth_and_compute(tmp_path: Path) -> None:
    folder = tmp_path / "cooked"
    folder.mkdir()
    f = write(folder, "trace_a", "0 1.5\n1 2.5\nabc 3\n")
    with pytest.raises(TraceFormatError, match="trace_a: line 3: expected 'time_s throughput"):
        load_hsdpa(folder)
    f.write_text("0 1\n2 1\n2 3\n")
    with pytest.raises(TraceFormatError, match=r"trace_a: line 3: time 2\.0 does not increase"):
        load_hsdpa(folder)
    f.write_text("0 1\n1 0\n2 0\n")
    with pytest.raises(TraceFormatError, match="every throughput is 0"):
        load_hsdpa(folder)
    lat = write(tmp_path, "latency.json", '{"Phone Model": "x"}')
    with pytest.raises(TraceFormatError, match=r"latency\.json: expected a JSON list"):
        load_flhetbench_speeds(lat)
    lat.write_text('[{"Phone Model": "x", "ResNet Latency": 0}]')
    with pytest.raises(TraceFormatError, match="no row has a ResNet Latency > 0"):
        load_flhetbench_speeds(lat)
    distri = write(tmp_path, "speed.json", '{"g": {"down_u": 1, "down_sigma": 1, "up_u": 2}}')
    with pytest.raises(TraceFormatError, match="device 'g': expected down_u, down_sigma"):
        load_flash_speed_distri(distri)
    case = write(tmp_path, "case1.json", '[{"id": "1", "tcp_speed_results": [0, -1]}]')
    with pytest.raises(TraceFormatError, match="record 0: no positive throughput sample"):
        load_mobiperf(case)


def test_edits_are_seen_despite_the_cache(tmp_path: Path) -> None:
    path = write(tmp_path, "ready.json", '{"a": [[0, 10]]}')
    assert load_flash_ready(path) is load_flash_ready(path)  # parsed once per process
    path.write_text('{"a": [[0, 10]], "b": [[5, 6]]}')
    assert load_flash_ready(path).names == ("a", "b")  # new size: parsed again


def test_missing_data_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(TraceFileMissing) as err:
        TraceSystem(TraceConfig(), 0)
    assert str(err.value).startswith(
        f"system=trace needs {tmp_path / 'flash_availability/ready_loose.json'} "
    )
    assert "system.data_dir" in str(err.value)
    with pytest.raises(TraceFileMissing, match=r"needs /nonexistent/folder \(the shared data"):
        TraceSystem(TraceConfig(data_dir="/nonexistent/folder"), 0)
    # Sources that need no file need no data folder.
    TraceSystem(TraceConfig(availability="none", compute="none", bandwidth="constant"), 0)


def test_flash_bandwidth_series_are_seeded() -> None:
    distri = {"g1": (100.0, 80.0, 50.0, 60.0), "g2": (2000.0, 10.0, 900.0, 5.0)}
    a, b = flash_series(distri, 1, uplink=False), flash_series(distri, 1, uplink=False)
    assert all(np.array_equal(x.rates, y.rates) for x, y in zip(a, b, strict=True))
    other = flash_series(distri, 2, uplink=False)
    assert not np.array_equal(a[0].rates, other[0].rates)
    # one draw per minute for a day, all > 0 (a sigma of 80% of the mean draws negatives,
    # which are redrawn as FLASH does), in KiB/s -> bytes/s
    assert len(a[0].rates) == FLASH_STEPS and (a[0].rates > 0).all()
    assert np.mean(a[1].rates) == pytest.approx(2000 * 1024, rel=0.01)


# ---- the real files ------------------------------------------------------------------------


@needs_shared
def test_real_flash_availability() -> None:
    loose = load_flash_ready(SHARED / "flash_availability/ready_loose.json")
    strict = load_flash_ready(SHARED / "flash_availability/ready_strict.json")
    # PROVENANCE: 3,454 and 3,477 users; 34,870 and 38,116 intervals.
    assert (len(loose), len(strict)) == (3454, 3477)
    assert sum(map(len, loose.raw)) == 34870 and sum(map(len, strict.raw)) == 38116
    # PROVENANCE counts 2,870 and 2,889 users with an interval; clipping the pre-reference
    # artefacts to 0 and dropping zero-length (and the 4 inverted) windows leaves 2,849 and
    # 2,869 users with a window of positive length.
    assert (len(loose.nonempty()), len(strict.nonempty())) == (2849, 2869)
    # 99% of the ready time lies in the first two days: period 172,800 s.
    assert loose.period[0] == strict.period[0] == 2 * 86400.0


@needs_shared
def test_real_flhetbench_and_its_cases() -> None:
    timers = load_flhetbench_timers(SHARED / "flhetbench/cached_timers.json")
    # PROVENANCE: 1,000 devices, 710 with isSuccess; 6 of those have only zero-length windows.
    assert len(timers) == 1000 and len(timers.nonempty()) == 704
    # Spans 1-10 days (FLASH's cycle per device).
    assert 86400 <= timers.period[timers.nonempty()].min() <= timers.period.max() <= 864000
    cfg = TraceConfig(
        availability="flhetbench",
        compute="none",
        bandwidth="flhetbench",
        flhetbench_case=1,
        mapping="identity",
        data_dir=str(SHARED),
    )
    system = TraceSystem(cfg, 0)
    states = json.loads((SHARED / "flhetbench/state/case1.json").read_text())
    records = json.loads((SHARED / "flhetbench/device_mobiperf/case1.json").read_text())
    # identity: client k gets the case's entry k (FLHetBench's pairing), k mod 100 beyond.
    for k in (0, 1, 57, 99, 100, 257):
        assert system.devices(k).availability == states[k % 100]
        assert system.devices(k).bandwidth == records[k % 100]["id"]
    # seeded: one permutation of the case's 100 entries serves both pools, so client k
    # still gets the state and the record FLHetBench paired (entry perm[k mod 100] of each)
    seeded = TraceSystem(dataclasses.replace(cfg, mapping="seeded"), 0)
    perm = slot_order(100, "flhetbench_case1", 0, "seeded")
    for k in (0, 1, 57, 99, 100, 257):
        assert seeded.devices(k).availability == states[perm[k % 100]]
        assert seeded.devices(k).bandwidth == records[perm[k % 100]]["id"]


@needs_shared
def test_real_compute_pools() -> None:
    flash = load_flash_speeds(SHARED / "flash_device_profiles")
    # 162 phone strings map to a benchmark name; 2 of those names lack a score: 160 devices.
    assert len(flash) == 160
    # AI scores 511..31,725, median 3,542.5: relative speeds 0.144..8.96
    assert flash.measure.min() == 511 and flash.measure.max() == 31725
    assert np.median(flash.speed) == pytest.approx(1.0)
    lat = load_flhetbench_speeds(SHARED / "flhetbench/training_latency.json")
    # 997 rows, 19 with latency 0: 978 devices, median latency 172
    assert len(lat) == 978 and np.median(lat.measure) == 172.0


@needs_shared
def test_real_bandwidth_traces() -> None:
    hsdpa = load_hsdpa(SHARED / "hsdpa_3g_norway/cooked_3gp")
    # 80 files, 16,475 lines; each file's first line only marks time 0: 16,395 segments.
    assert len(hsdpa) == 80 and sum(len(s.rates) for s in hsdpa) == 16395
    # Traces last 68-317 s.
    spans = [s.durations.sum() for s in hsdpa]
    assert min(spans) >= 68 and max(spans) <= 317
    assert len(load_flash_speed_distri(SHARED / "flash_device_profiles/speed_distri.json")) == 19
    # 4 cases of 100 records; 24 + 29 + 28 + 30 distinct ids, 91 distinct over all cases.
    assert len(load_mobiperf(SHARED / "flhetbench/device_mobiperf")) == 91


@needs_shared
def test_default_system_on_the_real_files() -> None:
    # The defaults: FLASH loose availability, FLASH compute, HSDPA bandwidth.
    system = TraceSystem(TraceConfig(data_dir=str(SHARED)), 0)
    system.set_model_cost(1e7)  # 3e7 / 1e9 = 30 ms per example on the median phone
    assert system.windows is not None and system.windows.n == 2849
    # the same 400 kB at different start times takes different times (the trace varies)
    durations = {
        round(system.transfer_end_s(3, t0, 400_000, False) - t0, 6) for t0 in range(0, 300, 30)
    }
    assert len(durations) > 5
    ids = np.arange(10_000)
    # At trace hour 26 (02:00 on the second day) ~840 of the 2,849 devices are online.
    share = system.available(ids, 26 * 3600.0).mean()
    assert 0.2 < share < 0.4
    timing = system.timing(0, 26 * 3600.0, 100, 400_000, 400_000)
    assert timing.arrival_s > timing.compute_end_s > timing.download_end_s > 26 * 3600.0
