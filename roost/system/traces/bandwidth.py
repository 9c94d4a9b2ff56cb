"""Time-varying bandwidth: piecewise-constant rate series, cyclic, integrated exactly.

A device's series is segments ``[b_j, b_{j+1})`` of rate ``r_j`` bytes/s over one period
``P = b_m``, repeated forever. The bytes delivered by trace time ``x`` (from 0) are::

    F(x) = floor(x / P) * B + C_j + r_j * (x mod P - b_j),   b_j <= x mod P < b_{j+1}

with ``C_j = sum_{i<j} r_i (b_{i+1} - b_i)`` (cumulative sums) and ``B = C_m`` the bytes
of one period. A transfer of ``N`` bytes starting at ``τ`` ends at the smallest ``x`` with
``F(x) = F(τ) + N``: split ``G = F(τ) + N`` into ``q`` whole periods and a remainder
``g``, find the segment where the cumulative bytes reach ``g`` (a binary search) and
solve inside it linearly. So the same bytes take different times at different start
times, and a transfer may wrap past the end of the trace any number of times.

Sources (shared/data/PROVENANCE.md §2-§4; FedScale's device_info README):

* ``hsdpa``: the 80 ``cooked_3gp`` files (Riiser et al., MMSys 2013, via
  confiwent/Real-world-bandwidth-traces, MIT: cite the paper). Each line is
  ``time_s throughput_Mbps``; as Pensieve reads this format, line i's throughput holds over
  ``[time_{i-1}, time_i)`` (it was measured over that interval), so the first line only
  marks time 0 and the period is ``time_last - time_first``. 1 Mbit = 1e6 bits.
* ``flash``: FLASH's ``speed_distri.json``, 19 devices with a normal distribution of
  download and upload speed in KiB/s (FLASH divides the model's bytes by 1024 and by the
  speed). FLASH draws one speed per transfer; here each device gets a seeded series of
  draws, one per minute over a day (``FLASH_STEP_S``, ``FLASH_STEPS``), drawn from
  ``default_rng([seed, 9, 2, device, direction])``, redrawing values <= 0 as FLASH does.
* ``flhetbench``: FLHetBench's MobiPerf records (``device_mobiperf/caseN.json``;
  no licence, internal use): each record's ``tcp_speed_results`` (kbit/s, 1 kbit = 1000
  bits) become a series of 1-second segments (the sampling interval is not in the file:
  an assumption). Samples <= 0 are dropped, and records with no positive sample.
* ``fedscale``: ``client_device_capacity``'s ``communication`` in kbit/s, constant; the
  kbit is 1024 bits, as FedScale sizes the model as ``bytes / 1024 * 8`` kbit.
* ``constant``: ``downlink_mbps`` and ``uplink_mbps`` for every client.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from roost.system.traces.files import (
    FileKey,
    TraceFileMissing,
    TraceFormatError,
    cached_per_file,
    file_key,
    finite_number,
    read_json,
)

__all__ = [
    "FLASH_STEPS",
    "FLASH_STEP_S",
    "RateSeries",
    "Rates",
    "flash_series",
    "load_flash_speed_distri",
    "load_hsdpa",
    "load_mobiperf",
]

FLASH_STEP_S = 60.0
FLASH_STEPS = 1440
KIB = 1024.0


@dataclass(frozen=True)
class RateSeries:
    """One device's cyclic series: segment durations (s) and rates (bytes/s)."""

    name: str
    durations: np.ndarray
    rates: np.ndarray

    @staticmethod
    def constant(name: str, bytes_per_s: float) -> RateSeries:
        return RateSeries(name, np.ones(1), np.array([float(bytes_per_s)]))

    def scaled(self, factor: float) -> RateSeries:
        return RateSeries(self.name, self.durations, self.rates * factor)


class Rates:
    """The series of the devices ``series[order[j]]`` for slots j, flattened."""

    def __init__(self, series: Sequence[RateSeries], order: np.ndarray) -> None:
        chosen = [series[i] for i in np.asarray(order, dtype=np.int64)]
        counts = np.array([len(s.rates) for s in chosen], dtype=np.int64)
        self.n = len(chosen)
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.rates = np.concatenate([s.rates for s in chosen]).astype(np.float64)
        self.bounds = np.concatenate(
            [np.concatenate([[0.0], np.cumsum(s.durations)[:-1]]) for s in chosen]
        )
        self.period = np.array([float(s.durations.sum()) for s in chosen])
        # cumulative bytes of each slot's series at each segment's end, and at its start
        self.cum_end = np.concatenate([np.cumsum(s.durations * s.rates) for s in chosen])
        self.cum = np.concatenate(
            [np.concatenate([[0.0], np.cumsum(s.durations * s.rates)[:-1]]) for s in chosen]
        )
        self.total = self.cum_end[self.first[1:] - 1].copy()
        self.max_rate = np.maximum.reduceat(self.rates, self.first[:-1])
        self.mean_rate = self.total / self.period
        self.period_list: list[float] = self.period.tolist()
        # per slot, built on its first end_after: (bounds, rates, cum, cum_end, period, total)
        self._one: list[
            tuple[list[float], list[float], list[float], list[float], float, float] | None
        ] = [None] * self.n

    def end_after(self, slot: int, tau: float, nbytes: float) -> float:
        """The trace time at which ``nbytes`` sent from trace time ``tau`` have arrived
        (the module docstring's inverse of ``F``), in plain Python: the slot's bounds
        ``b``, rates ``r``, cumulative bytes ``C`` and ``C_end`` as lists (built on the
        slot's first query and kept) and ``bisect`` for ``np.searchsorted``.

        ``rel = τ mod P``; ``j``: the last segment with ``b_j <= rel``; ``G = C_j + r_j
        (rel - b_j) + N``; ``q = floor(G / B)`` whole periods and ``g = G - q B``, taking
        ``g = B`` rather than 0 when ``G`` is a whole number of periods (the bytes are
        reached at the period's end, not its start); ``k``: the first segment with
        ``C_end_k >= g``, so ``r_k > 0``; the end is ``τ + q P + b_k + (g - C_k) / r_k -
        rel``. When rounding puts ``g`` past the last positive segment (``k`` clamped to a
        last segment of rate 0), ``k`` steps back to the last segment with ``r_k > 0``."""
        if nbytes <= 0:
            return tau
        entry = self._one[slot]
        if entry is None:
            lo, hi = int(self.first[slot]), int(self.first[slot + 1])
            entry = (
                self.bounds[lo:hi].tolist(),
                self.rates[lo:hi].tolist(),
                self.cum[lo:hi].tolist(),
                self.cum_end[lo:hi].tolist(),
                float(self.period[slot]),
                float(self.total[slot]),
            )
            self._one[slot] = entry
        b, r, c, c_end, p, total = entry
        rel = tau - math.floor(tau / p) * p
        if rel >= p:
            rel = 0.0
        j = bisect_right(b, rel) - 1
        g = c[j] + r[j] * (rel - b[j]) + nbytes
        q = math.floor(g / total)
        g -= q * total
        if g <= 0.0 and q > 0:
            q, g = q - 1, g + total
        k = min(bisect_left(c_end, g), len(b) - 1)
        while r[k] == 0.0 and k > 0:
            k -= 1
        x = b[k] + (g - c[k]) / r[k]
        return tau + (q * p + x - rel)


def _hsdpa_file(path: Path) -> RateSeries:
    times: list[float] = []
    mbps: list[float] = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        words = line.split()
        if not words:
            continue
        try:
            t, v = (float(w) for w in words) if len(words) == 2 else (math.nan, math.nan)
        except ValueError:
            t = v = math.nan
        if not (math.isfinite(t) and math.isfinite(v)) or v < 0:
            raise TraceFormatError(
                path,
                f"line {no}: expected 'time_s throughput_Mbps' "
                f"(two numbers, throughput >= 0), got {line.strip()!r}",
            )
        if times and t <= times[-1]:
            raise TraceFormatError(path, f"line {no}: time {t} does not increase")
        times.append(t)
        mbps.append(v)
    if len(times) < 2:
        raise TraceFormatError(path, "needs at least two lines 'time_s throughput_Mbps'")
    rates = np.array(mbps[1:]) * 1e6 / 8.0
    if not (rates > 0).any():
        raise TraceFormatError(path, "every throughput is 0: nothing can be sent")
    return RateSeries(path.name, np.diff(np.array(times)), rates)


def load_hsdpa(folder: str | Path) -> tuple[RateSeries, ...]:
    """Every file of a ``cooked_3gp`` folder (name order), or one such file."""
    p = Path(folder)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    if p.is_dir() and not files:
        raise TraceFileMissing(p / "norway_*", "HSDPA throughput traces")
    return _load_hsdpa(tuple(file_key(f, "HSDPA throughput trace") for f in files))


@cached_per_file
def _load_hsdpa(keys: tuple[FileKey, ...]) -> tuple[RateSeries, ...]:
    return tuple(_hsdpa_file(Path(k[0])) for k in keys)


def load_flash_speed_distri(path: str | Path) -> dict[str, tuple[float, float, float, float]]:
    """FLASH ``speed_distri.json``: guid -> (down_u, down_sigma, up_u, up_sigma), KiB/s."""
    return _load_distri(file_key(path, "FLASH network speed distributions"))


@cached_per_file
def _load_distri(key: FileKey) -> dict[str, tuple[float, float, float, float]]:
    path = key[0]
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise TraceFormatError(
            path, "expected a JSON object {guid: {down_u, down_sigma, up_u, up_sigma}}"
        )
    out = {}
    for guid, rec in data.items():
        fields = ("down_u", "down_sigma", "up_u", "up_sigma")
        if not isinstance(rec, dict) or not set(fields) <= set(rec):
            raise TraceFormatError(path, f"device {guid!r}: expected {', '.join(fields)}")
        du, ds, uu, us = (finite_number(path, rec[f], f"device {guid!r}.{f}") for f in fields)
        if du <= 0 or uu <= 0 or ds < 0 or us < 0:
            raise TraceFormatError(path, f"device {guid!r}: means must be > 0, sigmas >= 0")
        out[str(guid)] = (du, ds, uu, us)
    return out


def flash_series(
    distri: dict[str, tuple[float, float, float, float]], seed: int, uplink: bool
) -> tuple[RateSeries, ...]:
    """One seeded series of speed draws per FLASH device (see the module docstring)."""
    out = []
    for d, (guid, (du, ds, uu, us)) in enumerate(distri.items()):
        mu, sigma = (uu, us) if uplink else (du, ds)
        rng = np.random.default_rng([seed, 9, 2, d, int(uplink)])
        draws = rng.normal(mu, sigma, FLASH_STEPS)
        for _ in range(1000):
            bad = draws <= 0
            if not bad.any():
                break
            draws[bad] = rng.normal(mu, sigma, int(bad.sum()))
        draws[draws <= 0] = mu
        out.append(RateSeries(guid, np.full(FLASH_STEPS, FLASH_STEP_S), draws * KIB))
    return tuple(out)


def load_mobiperf(path: str | Path) -> tuple[RateSeries, ...]:
    """MobiPerf records from one ``caseN.json`` (in order), or from every ``case*.json`` of
    a folder (each record ``id`` once, first occurrence)."""
    p = Path(path)
    files = sorted(p.glob("case*.json")) if p.is_dir() else [p]
    if not files:
        raise TraceFileMissing(p / "case1.json", "FLHetBench MobiPerf records")
    keys = tuple(file_key(f, "FLHetBench MobiPerf records") for f in files)
    return _load_mobiperf(keys, p.is_dir())


@cached_per_file
def _load_mobiperf(keys: tuple[FileKey, ...], distinct: bool) -> tuple[RateSeries, ...]:
    out: list[RateSeries] = []
    seen: set[str] = set()
    for key in keys:
        path = key[0]
        records = read_json(path)
        if not isinstance(records, list):
            raise TraceFormatError(path, "expected a JSON list of MobiPerf records")
        for i, rec in enumerate(records):
            if not isinstance(rec, dict) or not isinstance(rec.get("tcp_speed_results"), list):
                raise TraceFormatError(path, f"record {i}: expected tcp_speed_results (a list)")
            name = str(rec.get("id", f"{Path(path).name}[{i}]"))
            if distinct and name in seen:
                continue
            seen.add(name)
            kbps = np.array(
                [
                    finite_number(path, v, f"record {i}.tcp_speed_results")
                    for v in rec["tcp_speed_results"]
                ]
            )
            kbps = kbps[kbps > 0]
            if not len(kbps) and not distinct:  # a case file pairs records with states
                raise TraceFormatError(path, f"record {i}: no positive throughput sample")
            if len(kbps):
                out.append(RateSeries(name, np.ones(len(kbps)), kbps * 1000.0 / 8.0))
    if not out:
        raise TraceFormatError(keys[0][0], "no record has a positive throughput sample")
    return tuple(out)
