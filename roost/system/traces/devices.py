"""Device compute speeds from real measurements, relative to the pool's median device.

Every source gives a pool of devices and a measure per device; a device's relative speed
is (1.0 = the pool's median device, the *reference device*)::

    speed_d = score_d / median(score)             (a higher score is faster: AI-Benchmark)
    speed_d = median(latency) / latency_d         (a lower latency is faster)

and a client on device d spends ``reference_seconds_per_example / speed_d`` seconds per
example (:mod:`roost.system.traces.trace_system` says where the reference comes from).

Sources (shared/data/PROVENANCE.md §2, §3; FedScale's device_info README):

* ``flash``: FLASH's chain ``real2benchmark.json`` (a phone's reported model string ->
  AI-Benchmark name or "unknown") -> ``benchmark2score.json`` (AI-Benchmark name -> AI
  score). The pool is every phone model string of FLASH's user trace that maps to a
  scored benchmark device (160 of 772: 610 are "unknown", 2 map to names the score table
  lacks), in file order; the score is its AI score (Yang et al., WWW 2021, BSD-2-Clause;
  scores from the public AI-Benchmark ranking, cite AI-Benchmark).
* ``flhetbench``: ``training_latency.json``, measured on-device training latency of a
  ResNet per phone model (FLHetBench, CVPR 2024; no licence, internal use). Rows whose
  latency is not > 0 (19 of 997 are 0) are dropped; each remaining row is one device.
  The unit (presumably ms per step) does not matter: only ratios are used.
* ``fedscale``: FedScale's ``client_device_capacity``, ``{client_id: {"computation": ms
  per sample (inference), "communication": kbit/s}}``; a lower ``computation`` is faster.
  FedScale's own rule is ``3 * computation / 1000`` seconds per training example, which
  this gives with ``reference_seconds_per_example = 3 * median(computation) / 1000``.
* ``none``: one device, the reference (speed 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from roost.system.traces.files import (
    FileKey,
    TraceFormatError,
    cached_per_file,
    file_key,
    finite_number,
    frozen,
    read_json,
    read_mapping,
)

__all__ = [
    "DeviceSpeeds",
    "FedScaleCapacity",
    "fedscale_speeds",
    "load_fedscale_capacity",
    "load_flash_speeds",
    "load_flhetbench_speeds",
    "reference_speeds",
]


@dataclass(frozen=True)
class DeviceSpeeds:
    """A pool of devices: names (file order), the source's raw measure, relative speeds."""

    source: str
    names: tuple[str, ...]
    measure: np.ndarray
    speed: np.ndarray

    def __len__(self) -> int:
        return len(self.names)


def _pool(source: str, names: list[str], measure: np.ndarray, faster_high: bool) -> DeviceSpeeds:
    med = float(np.median(measure))
    speed = measure / med if faster_high else med / measure
    return DeviceSpeeds(source, tuple(names), frozen(measure), frozen(speed.astype(np.float64)))


def reference_speeds() -> DeviceSpeeds:
    """``compute=none``: every client is the reference device."""
    return DeviceSpeeds("none", ("reference",), np.ones(1), np.ones(1))


def load_flash_speeds(folder: str | Path) -> DeviceSpeeds:
    """FLASH's device profiles folder (``real2benchmark.json``, ``benchmark2score.json``)."""
    folder = Path(folder)
    k1 = file_key(folder / "real2benchmark.json", "FLASH phone model -> AI-Benchmark name")
    k2 = file_key(folder / "benchmark2score.json", "FLASH AI-Benchmark name -> AI score")
    return _load_flash(k1, k2)


@cached_per_file
def _load_flash(k_real: FileKey, k_score: FileKey) -> DeviceSpeeds:
    real, scores = read_json(k_real[0]), read_json(k_score[0])
    if not isinstance(real, dict) or not all(isinstance(v, str) for v in real.values()):
        raise TraceFormatError(k_real[0], 'expected a JSON object {phone model: "benchmark name"}')
    if not isinstance(scores, dict):
        raise TraceFormatError(k_score[0], "expected a JSON object {benchmark name: AI score}")
    names, values = [], []
    for model, bench in real.items():
        if bench == "unknown" or bench not in scores:
            continue
        names.append(str(model))
        values.append(finite_number(k_score[0], scores[bench], f"score of {bench!r}", True))
    if not names:
        raise TraceFormatError(k_real[0], "no phone model maps to a scored benchmark device")
    return _pool("flash", names, np.array(values), faster_high=True)


def load_flhetbench_speeds(path: str | Path) -> DeviceSpeeds:
    """FLHetBench ``training_latency.json``: a list of ``{"Phone Model", "ResNet Latency",
    ...}`` rows."""
    return _load_latency(file_key(path, "FLHetBench on-device training latency"))


@cached_per_file
def _load_latency(key: FileKey) -> DeviceSpeeds:
    path = key[0]
    rows = read_json(path)
    if not isinstance(rows, list):
        raise TraceFormatError(path, 'expected a JSON list of {"Phone Model", "ResNet Latency"}')
    names, values = [], []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "ResNet Latency" not in row:
            raise TraceFormatError(path, f'row {i}: expected an object with "ResNet Latency"')
        lat = finite_number(path, row["ResNet Latency"], f'row {i} "ResNet Latency"')
        if lat > 0:
            names.append(str(row.get("Phone Model", f"row {i}")))
            values.append(lat)
    if not names:
        raise TraceFormatError(path, "no row has a ResNet Latency > 0")
    return _pool("flhetbench", names, np.array(values), faster_high=False)


@dataclass(frozen=True)
class FedScaleCapacity:
    """FedScale's ``client_device_capacity``: per client (file order) the inference
    latency in ms per sample and the bandwidth in kbit/s."""

    names: tuple[str, ...]
    computation_ms: np.ndarray
    communication_kbps: np.ndarray


def load_fedscale_capacity(path: str | Path) -> FedScaleCapacity:
    """FedScale ``client_device_capacity`` (pickle, or JSON of the same shape)."""
    return _load_capacity(file_key(path, "FedScale client_device_capacity"))


@cached_per_file
def _load_capacity(key: FileKey) -> FedScaleCapacity:
    path = key[0]
    data = read_mapping(path)
    if not isinstance(data, dict) or not data:
        raise TraceFormatError(
            path, "expected a non-empty dict {client_id: {computation, communication}}"
        )
    names, comp, comm = [], [], []
    for cid, rec in data.items():
        where = f"client {cid!r}"
        if not isinstance(rec, dict) or not {"computation", "communication"} <= set(rec):
            raise TraceFormatError(
                path, f"{where}: expected a dict with computation and communication"
            )
        names.append(str(cid))
        comp.append(finite_number(path, rec["computation"], f"{where}.computation", True))
        comm.append(finite_number(path, rec["communication"], f"{where}.communication", True))
    return FedScaleCapacity(tuple(names), frozen(np.array(comp)), frozen(np.array(comm)))


def fedscale_speeds(cap: FedScaleCapacity) -> DeviceSpeeds:
    return _pool("fedscale", list(cap.names), cap.computation_ms, faster_high=False)
