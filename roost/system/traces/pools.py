"""Which trace device each client gets: every source's pool, read from its files, in slot order.

Each source has a pool of n devices, in file order. Client k uses slot ``k mod n``; slot j
holds device ``perm[j]``::

    perm = default_rng([seed, 9, crc32(pool_name)]).permutation(n)   (mapping=seeded)
    perm = [0, 1, ..., n - 1]                                         (mapping=identity)

so clients 0..n-1 get distinct devices and clients beyond n reuse them in the same order;
the same seed gives the same devices in every process, and nothing depends on the number
of clients. ``identity`` is the sources' own rule (FedScale and FLHetBench give client k
the k-th entry). Sources that read the same pool share its name, hence its permutation,
and stay paired per device: FedScale's capacity file used for compute and bandwidth
(``fedscale_capacity:<path>``), and a FLHetBench case's states and MobiPerf records
(``flhetbench_caseN``). The per-slot arrays are built in slot order, so a query for
clients 0, 1, 2, ... reads the flattened arrays nearly in order.

Availability pools leave out devices with no window (FLASH: 584 of 3,454 loose users;
FLHetBench: 290 of 1,000 with ``isSuccess = false``) unless ``keep_unavailable_devices``;
a FLHetBench case keeps its 100 entries as they are (they pair with MobiPerf records).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from roost.system.traces import availability as av
from roost.system.traces import bandwidth as bw
from roost.system.traces import devices as dv
from roost.system.traces.files import TraceFileMissing, TraceFormatError, data_dir, read_json
from roost.system.traces.options import TraceConfig
from roost.system.traces.windows import Windows

__all__ = [
    "DEFAULT_PATHS",
    "SlotTable",
    "availability_pool",
    "bandwidth_pool",
    "compute_pool",
    "slot_order",
]

DEFAULT_PATHS = {
    "flash_loose": "flash_availability/ready_loose.json",
    "flash_strict": "flash_availability/ready_strict.json",
    "flhetbench_timers": "flhetbench/cached_timers.json",
    "flash_profiles": "flash_device_profiles",
    "flhetbench_latency": "flhetbench/training_latency.json",
    "hsdpa": "hsdpa_3g_norway/cooked_3gp",
    "flash_speed": "flash_device_profiles/speed_distri.json",
    "flhetbench_mobiperf": "flhetbench/device_mobiperf",
}

Names = tuple[str, ...]


def slot_order(n: int, pool: str, seed: int, mapping: str) -> np.ndarray:
    """``perm``: the device index of each slot (see the module docstring)."""
    if mapping == "identity":
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, 9, zlib.crc32(pool.encode())]).permutation(n)


class SlotTable:
    """Client id -> slot ``id mod n``, by table lookup: ``np.take`` of a cached
    ``arange(m) % n`` costs a tenth of an int64 ``%`` per id. Ids must be >= 0."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._table = np.zeros(0, dtype=np.int64)

    def __call__(self, client_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(client_ids, dtype=np.int64)
        if len(ids) and int(ids.max()) >= len(self._table):
            size = max(int(ids.max()) + 1, 2 * len(self._table), 1024)
            self._table = np.arange(size, dtype=np.int64) % self.n
        return self._table.take(ids)


def _path(cfg: TraceConfig, given: str | None, default: str, what: str) -> Path:
    if given:
        return Path(given).expanduser()
    return data_dir(cfg.data_dir, what) / DEFAULT_PATHS[default]


def _case_states(dw: av.DeviceWindows, timers: Path, case: int) -> av.DeviceWindows:
    state = timers.parent / "state" / f"case{case}.json"
    keys = read_json(state) if state.exists() else None
    if not isinstance(keys, list):
        raise TraceFileMissing(state, "FLHetBench's list of 100 state keys")
    index = {name: i for i, name in enumerate(dw.names)}
    missing = [k for k in keys if str(k) not in index]
    if missing:
        raise TraceFormatError(state, f"keys not in {timers}: {missing[:5]}")
    return dw.take([index[str(k)] for k in keys])


def availability_pool(cfg: TraceConfig, seed: int) -> tuple[Windows | None, Names]:
    """The availability windows in slot order (None for ``availability=none``)."""
    c = cfg
    if c.availability == "none":
        return None, ("",)
    if c.availability in ("flash_loose", "flash_strict"):
        path = _path(c, c.availability_path, c.availability, "FLASH availability")
        dw, pool = av.load_flash_ready(path), f"flash_{c.availability}"
    elif c.availability == "flhetbench":
        path = _path(c, c.availability_path, "flhetbench_timers", "FLHetBench states")
        dw, pool = av.load_flhetbench_timers(path), "flhetbench_timers"
    else:
        path = Path(str(c.availability_path)).expanduser()
        dw, pool = av.load_fedscale_behave(path), f"fedscale_behave:{path.resolve()}"
    if c.availability == "flhetbench" and c.flhetbench_case:
        dw, pool = _case_states(dw, path, c.flhetbench_case), f"flhetbench_case{c.flhetbench_case}"
    elif not c.keep_unavailable_devices:
        keep = dw.nonempty(c.availability_period_s)
        if not len(keep):
            raise TraceFormatError(path, "no device has an availability window")
        dw = dw.take(keep)
    order = slot_order(len(dw), pool, seed, c.mapping)
    return dw.windows(order, c.availability_period_s), tuple(dw.names[i] for i in order)


def compute_pool(cfg: TraceConfig, seed: int) -> tuple[np.ndarray, Names]:
    """Relative compute speeds (1.0 = the pool's median device) in slot order."""
    c = cfg
    name: str = c.compute
    if c.compute == "flash":
        pool = dv.load_flash_speeds(_path(c, c.compute_path, "flash_profiles", "compute"))
    elif c.compute == "flhetbench":
        path = _path(c, c.compute_path, "flhetbench_latency", "compute")
        pool = dv.load_flhetbench_speeds(path)
    elif c.compute == "fedscale":
        path = Path(str(c.compute_path)).expanduser()
        pool = dv.fedscale_speeds(dv.load_fedscale_capacity(path))
        name = f"fedscale_capacity:{path.resolve()}"
    else:
        pool = dv.reference_speeds()
    order = slot_order(len(pool), name, seed, c.mapping)
    return pool.speed[order], tuple(pool.names[i] for i in order)


def bandwidth_pool(cfg: TraceConfig, seed: int) -> tuple[bw.Rates, bw.Rates, Names]:
    """Downlink and uplink rate series in slot order."""
    c = cfg
    up: tuple[bw.RateSeries, ...] = ()
    if c.bandwidth == "hsdpa":
        down, pool = bw.load_hsdpa(_path(c, c.bandwidth_path, "hsdpa", "bandwidth")), "hsdpa"
    elif c.bandwidth == "flash":
        distri = bw.load_flash_speed_distri(_path(c, c.bandwidth_path, "flash_speed", "bandwidth"))
        down = bw.flash_series(distri, seed, uplink=False)
        up, pool = bw.flash_series(distri, seed, uplink=True), "flash_speed"
    elif c.bandwidth == "flhetbench":
        path = _path(c, c.bandwidth_path, "flhetbench_mobiperf", "bandwidth")
        if c.flhetbench_case and path.is_dir():
            path = path / f"case{c.flhetbench_case}.json"
        down = bw.load_mobiperf(path)
        pool = f"flhetbench_case{c.flhetbench_case}" if c.flhetbench_case else "mobiperf"
    elif c.bandwidth == "fedscale":
        path = Path(str(c.bandwidth_path or c.compute_path)).expanduser()
        cap = dv.load_fedscale_capacity(path)
        kbit = 1024.0 / 8.0  # bytes per FedScale kbit
        down = tuple(
            bw.RateSeries.constant(n, r * kbit)
            for n, r in zip(cap.names, cap.communication_kbps, strict=True)
        )
        pool = f"fedscale_capacity:{path.resolve()}"
    else:
        down = (bw.RateSeries.constant("constant", c.downlink_mbps * 1e6 / 8.0),)
        up, pool = (bw.RateSeries.constant("constant", c.uplink_mbps * 1e6 / 8.0),), "constant"
    if not up:
        up = tuple(s.scaled(c.uplink_scale) for s in down)
    order = slot_order(len(down), pool, seed, c.mapping)
    return bw.Rates(down, order), bw.Rates(up, order), tuple(down[i].name for i in order)
