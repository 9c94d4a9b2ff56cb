"""Device availability windows from real traces: the loaders, one device per trace entry.

Each loader returns a :class:`DeviceWindows`: per device (file order) its raw windows
relative to its origin, its origin and its period, in trace seconds; the flattened query
structure and the availability rule are in :mod:`roost.system.traces.windows`. The sources
use closed windows (``s <= τ <= e``) and Roost half-open ones: the difference has measure
zero, except that a zero-length window (FLASH has ~6,000) is never available here.

Sources (shared/data/PROVENANCE.md §1, §3; FedScale's device_info README):

* FLASH ``ready_{loose,strict}.json`` (Yang et al., WWW 2021; BSD-2-Clause):
  ``{user: [[start_s, end_s], ...]}`` relative to 2018-03-06 00:00 local time. Origin 0
  for every device and one period for all: the smallest whole number of days that holds
  99% of the windows' total length (2 days for both files: the users' traces are staggered
  over the first ~2.5 days, so a longer cycle would be mostly empty). Negative times
  (about 300 pre-reference artefacts per file) are clipped to 0; 42 users per file list
  overlapping or unsorted windows, which are sorted and merged; 4 windows per file end
  before they start (by 1-25 s) and, like any window with ``end <= start``, are empty.
* FLHetBench ``cached_timers.json`` (FLASH's default state trace; no licence, internal
  use): ``{guid: {"isSuccess", "trace_start", "trace_end", "ready_time": [[s, e], ...]}}``.
  Origin ``trace_start`` and period ``trace_end - trace_start`` per device, as FLASH's
  ``Timer.ready``: ``now = (t - trace_start) mod (trace_end - trace_start) +
  trace_start``. ``isSuccess = false`` devices have no windows.
* FedScale ``client_behave_trace``: ``{client_id: {"active": [...], "inactive": [...],
  "finish_time": s, ...}}``, window i = ``[active[i], inactive[i]]``, origin 0, period
  ``finish_time`` (FedScale's ``ClientMetadata.is_active``: ``cur_time % finish_time``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from roost.system.traces.files import (
    FileKey,
    TraceFormatError,
    cached_per_file,
    file_key,
    finite_number,
    read_json,
    read_mapping,
)
from roost.system.traces.windows import Windows, normalise_windows

__all__ = [
    "DeviceWindows",
    "load_fedscale_behave",
    "load_flash_ready",
    "load_flhetbench_timers",
]

DAY_S = 86400.0
COVERAGE = 0.99  # share of the windows' total length the derived FLASH period must hold


class DeviceWindows:
    """One availability file: per device (file order) its raw windows relative to its
    origin, its origin and its period in trace seconds."""

    def __init__(
        self,
        source: str,
        names: Sequence[str],
        raw: Sequence[np.ndarray],
        origin: np.ndarray,
        period: np.ndarray,
    ) -> None:
        self.source = source
        self.names = tuple(names)
        self.raw = tuple(raw)
        self.origin = origin
        self.period = period
        self._normalised: dict[float | None, tuple[np.ndarray, ...]] = {}

    def __len__(self) -> int:
        return len(self.names)

    def periods(self, override: float | None) -> np.ndarray:
        return self.period if override is None else np.full(len(self), float(override))

    def normalised(self, override: float | None = None) -> tuple[np.ndarray, ...]:
        """Every device's windows folded into its period (``override`` for all, if set)."""
        if override not in self._normalised:
            periods = self.periods(override)
            self._normalised[override] = tuple(
                normalise_windows(r, float(p)) for r, p in zip(self.raw, periods, strict=True)
            )
        return self._normalised[override]

    def take(self, indices: Sequence[int] | np.ndarray) -> DeviceWindows:
        idx = np.asarray(indices, dtype=np.int64)
        return DeviceWindows(
            self.source,
            [self.names[i] for i in idx],
            [self.raw[i] for i in idx],
            self.origin[idx],
            self.period[idx],
        )

    def windows(self, order: np.ndarray, period: float | None = None) -> Windows:
        """The flattened windows of slots ``j -> device order[j]``."""
        lists = self.normalised(period)
        order = np.asarray(order, dtype=np.int64)
        return Windows([lists[i] for i in order], self.origin[order], self.periods(period)[order])

    def nonempty(self, override: float | None = None) -> np.ndarray:
        """Indices of the devices with at least one window."""
        return np.array([i for i, w in enumerate(self.normalised(override)) if len(w)], int)


def _pairs(path: str, value: Any, where: str) -> np.ndarray:
    """``[[start, end], ...]`` -> float array (k, 2), or a TraceFormatError naming ``where``."""
    if not isinstance(value, (list, tuple)):
        raise TraceFormatError(path, f"{where}: expected a list of [start_s, end_s] pairs")
    if not value:
        return np.zeros((0, 2))
    try:
        a = np.array(value, dtype=np.float64).reshape(len(value), -1)
        ok = a.shape[1] == 2
    except (ValueError, TypeError):
        ok = False
    if not ok:
        for i, pair in enumerate(value):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise TraceFormatError(
                    path, f"{where}[{i}]: expected [start_s, end_s], got {pair!r}"
                )
            for x in pair:
                finite_number(path, x, f"{where}[{i}]")
        raise TraceFormatError(path, f"{where}: expected a list of [start_s, end_s] pairs")
    a = a.reshape(-1, 2)
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TraceFormatError(path, f"{where}[{i}]: {value[i]!r} is not a finite window")
    return a


def _covering_days(raw: Sequence[np.ndarray]) -> float:
    """The smallest whole number of days that holds COVERAGE of the windows' length."""
    rows = np.concatenate([*raw, np.zeros((0, 2))])
    s, e = np.maximum(rows[:, 0], 0.0), rows[:, 1]
    keep = e > s
    s, e = s[keep], e[keep]
    if not len(s):
        return DAY_S
    total = float((e - s).sum())
    lo, hi = 1, max(1, math.ceil(float(e.max()) / DAY_S))
    while lo < hi:
        mid = (lo + hi) // 2
        held = float(np.clip(np.minimum(e, mid * DAY_S) - s, 0.0, None).sum())
        lo, hi = (lo, mid) if held >= COVERAGE * total else (mid + 1, hi)
    return lo * DAY_S


def load_flash_ready(path: str | Path) -> DeviceWindows:
    """FLASH ``ready_loose.json`` / ``ready_strict.json``: one device per user key."""
    return _load_flash_ready(file_key(path, "FLASH availability {user: [[start_s, end_s]]}"))


@cached_per_file
def _load_flash_ready(key: FileKey) -> DeviceWindows:
    path = key[0]
    data = read_json(path)
    if not isinstance(data, dict):
        raise TraceFormatError(path, "expected a JSON object {user: [[start_s, end_s], ...]}")
    names = [str(k) for k in data]
    raw = [_pairs(path, v, f"user {k!r}") for k, v in data.items()]
    period = _covering_days(raw)
    n = len(names)
    return DeviceWindows("flash", names, raw, np.zeros(n), np.full(n, period))


def load_flhetbench_timers(path: str | Path) -> DeviceWindows:
    """FLHetBench ``cached_timers.json``: one device per guid (file order)."""
    return _load_timers(file_key(path, "FLHetBench state windows {guid: {ready_time, ...}}"))


@cached_per_file
def _load_timers(key: FileKey) -> DeviceWindows:
    path = key[0]
    data = read_json(path)
    if not isinstance(data, dict):
        raise TraceFormatError(path, "expected a JSON object {guid: {isSuccess, ...}}")
    names, raw, origin, period = [], [], [], []
    for guid, rec in data.items():
        where = f"device {guid!r}"
        if not isinstance(rec, dict) or not {"isSuccess", "ready_time"} <= set(rec):
            raise TraceFormatError(
                path,
                f"{where}: expected an object with isSuccess, "
                "trace_start, trace_end and ready_time",
            )
        names.append(str(guid))
        if not rec["isSuccess"]:
            raw.append(np.zeros((0, 2)))
            origin.append(0.0)
            period.append(DAY_S)
            continue
        t0 = finite_number(path, rec.get("trace_start"), f"{where}.trace_start")
        t1 = finite_number(path, rec.get("trace_end"), f"{where}.trace_end")
        if t1 <= t0:
            raise TraceFormatError(path, f"{where}: trace_end {t1} is not after trace_start {t0}")
        raw.append(_pairs(path, rec["ready_time"], f"{where}.ready_time") - t0)
        origin.append(t0)
        period.append(t1 - t0)
    return DeviceWindows("flhetbench", names, raw, np.array(origin), np.array(period))


def load_fedscale_behave(path: str | Path) -> DeviceWindows:
    """FedScale ``client_behave_trace`` (pickle, or JSON of the same shape)."""
    return _load_behave(file_key(path, "FedScale client_behave_trace"))


@cached_per_file
def _load_behave(key: FileKey) -> DeviceWindows:
    path = key[0]
    data = read_mapping(path)
    if not isinstance(data, dict):
        raise TraceFormatError(path, "expected a dict {client_id: {active, inactive, finish_time}}")
    names, raw, period = [], [], []
    for cid, rec in data.items():
        where = f"client {cid!r}"
        if not isinstance(rec, dict) or not {"active", "inactive", "finish_time"} <= set(rec):
            raise TraceFormatError(
                path, f"{where}: expected a dict with active, inactive and finish_time"
            )
        act, inact = rec["active"], rec["inactive"]
        if not isinstance(act, (list, tuple)) or not isinstance(inact, (list, tuple)):
            raise TraceFormatError(path, f"{where}: active and inactive must be lists")
        if len(act) != len(inact):
            raise TraceFormatError(
                path, f"{where}: {len(act)} active times but {len(inact)} inactive times"
            )
        names.append(str(cid))
        raw.append(
            _pairs(
                path, [[a, b] for a, b in zip(act, inact, strict=True)], f"{where}.active/inactive"
            )
        )
        period.append(finite_number(path, rec["finish_time"], f"{where}.finish_time", True))
    n = len(names)
    return DeviceWindows("fedscale", names, raw, np.zeros(n), np.array(period))
