"""The ``system=trace`` config: which source drives each part of a device, and how.

Every field (docs/system-traces.md has the full table, with the sources' licences):

* ``availability``: ``none`` (always online), ``flash_loose`` / ``flash_strict`` (FLASH
  ready windows), ``flhetbench`` (FLHetBench ``cached_timers.json``), ``fedscale`` (a
  FedScale ``client_behave_trace``, named by ``availability_path``).
* ``availability_path``: the availability file; default the source's file under
  ``data_dir``. Required for ``fedscale``.
* ``availability_time_scale``: trace seconds per virtual second (> 0; 24 replays a day
  of the trace in an hour). ``availability_offset_s``: the trace time at virtual time 0.
* ``availability_period_s``: one cycle length for every device, overriding each
  source's own (FLASH: whole days holding 99% of the windows; FLHetBench: each device's
  trace span; FedScale: each client's ``finish_time``).
* ``keep_unavailable_devices``: keep devices without any window in the pool (their
  clients are never available); by default they are left out.
* ``compute``: ``flash`` (AI-Benchmark scores), ``flhetbench`` (on-device training
  latency), ``fedscale`` (``client_device_capacity``, named by ``compute_path``),
  ``none`` (every client is the reference device). ``compute_path``: its file or folder.
* ``reference_seconds_per_example``: seconds per example on the reference device (the
  pool's median); none (the default) derives it from the model as
  ``3 * macs_per_example / reference_macs_per_s``. ``reference_macs_per_s``: the
  reference device's multiply-adds per second (default 1e9).
* ``bandwidth``: ``hsdpa`` (3G throughput traces), ``flash`` (FLASH speed
  distributions), ``flhetbench`` (MobiPerf records), ``fedscale`` (the capacity file's
  ``communication``; ``bandwidth_path``, else ``compute_path``), ``constant``.
  ``bandwidth_path``: its file or folder.
* ``downlink_mbps`` / ``uplink_mbps``: the ``constant`` source's rates (Mbit/s).
* ``uplink_scale``: uplink rate = this * the trace's rate, for sources that measure one
  direction only (``hsdpa``, ``flhetbench``, ``fedscale``).
* ``flhetbench_case``: 0 = every FLHetBench device; 1-4 = FLHetBench's sampled case:
  its 100 state keys (``state/caseN.json``) and 100 MobiPerf records
  (``device_mobiperf/caseN.json``), paired per client as FLHetBench pairs them.
* ``mapping``: ``seeded`` (a permutation per pool from the run seed) or ``identity``
  (client k gets the pool's entry k mod n): :mod:`roost.system.traces.pools`.
* ``latency_s``: a fixed latency added before each transfer.
* ``server_speed``: the server's compute speed relative to the reference device (split
  learning's server part; default 10).
* ``data_dir``: the shared data folder; none = ``$ROOST_SHARED_DATA``, else
  ``/work/shared/data``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from roost.registry import check

__all__ = ["Availability", "Bandwidth", "Compute", "TraceConfig"]

Availability = Literal["none", "flash_loose", "flash_strict", "flhetbench", "fedscale"]
Compute = Literal["flash", "flhetbench", "fedscale", "none"]
Bandwidth = Literal["hsdpa", "flash", "flhetbench", "fedscale", "constant"]


def _positive(value: float, key: str) -> None:
    check(value > 0 and math.isfinite(value), key, value, "must be a number > 0")


@dataclass(frozen=True)
class TraceConfig:
    """Trace-driven devices (the module docstring describes every field)."""

    availability: Availability = "flash_loose"
    availability_path: str | None = None
    availability_time_scale: float = 1.0
    availability_offset_s: float = 0.0
    availability_period_s: float | None = None
    keep_unavailable_devices: bool = False
    compute: Compute = "flash"
    compute_path: str | None = None
    reference_seconds_per_example: float | None = None
    reference_macs_per_s: float = 1e9
    bandwidth: Bandwidth = "hsdpa"
    bandwidth_path: str | None = None
    downlink_mbps: float = 50.0
    uplink_mbps: float = 10.0
    uplink_scale: float = 1.0
    flhetbench_case: int = 0
    mapping: Literal["seeded", "identity"] = "seeded"
    latency_s: float = 0.0
    server_speed: float = 10.0
    data_dir: str | None = None

    def __post_init__(self) -> None:
        _positive(self.availability_time_scale, "availability_time_scale")
        offset = self.availability_offset_s
        check(math.isfinite(offset), "availability_offset_s", offset, "must be a finite number")
        if self.availability_period_s is not None:
            _positive(self.availability_period_s, "availability_period_s")
        if self.reference_seconds_per_example is not None:
            _positive(self.reference_seconds_per_example, "reference_seconds_per_example")
        keys = ("reference_macs_per_s", "downlink_mbps", "uplink_mbps", "uplink_scale")
        for key in (*keys, "server_speed"):
            _positive(getattr(self, key), key)
        ok = self.latency_s >= 0 and math.isfinite(self.latency_s)
        check(ok, "latency_s", self.latency_s, "must be a number >= 0")
        case = self.flhetbench_case
        check(case in (0, 1, 2, 3, 4), "flhetbench_case", case, "must be 0 (all) or a case 1-4")
        uses = "flhetbench" in (self.availability, self.bandwidth)
        check(
            case == 0 or uses,
            "flhetbench_case",
            case,
            "needs availability=flhetbench or bandwidth=flhetbench",
        )
        check(
            self.availability != "fedscale" or bool(self.availability_path),
            "availability_path",
            self.availability_path,
            "must name FedScale's client_behave_trace when availability=fedscale",
        )
        check(
            self.compute != "fedscale" or bool(self.compute_path),
            "compute_path",
            self.compute_path,
            "must name FedScale's client_device_capacity when compute=fedscale",
        )
        check(
            self.bandwidth != "fedscale" or bool(self.bandwidth_path or self.compute_path),
            "bandwidth_path",
            self.bandwidth_path,
            "must name FedScale's client_device_capacity when bandwidth=fedscale",
        )
        check(
            self.data_dir is None or bool(self.data_dir),
            "data_dir",
            self.data_dir,
            "must be a folder or none",
        )
