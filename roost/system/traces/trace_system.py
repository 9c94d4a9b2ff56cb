"""``system=trace``: real device traces drive availability, compute speed and bandwidth.

A task dispatched to client k at virtual time ``t0`` (seconds)::

    download_end = end of a transfer of down_bytes starting at t0 + latency_s
    compute_end  = download_end + work_examples * ref_s / speed_k
    arrival      = end of a transfer of up_bytes starting at compute_end + latency_s
    offline_s    = the first time in [t0, arrival) at which k is not available, else None

Transfers integrate k's bandwidth series (:mod:`~roost.system.traces.bandwidth`) from their
start, at trace time ``t + phase_k``; ``phase_k = frac(u0 + k * 0.618...) * period`` with
``u0 = default_rng([seed, 9]).random()``, so that clients sharing a trace do not move in
lock-step. Availability (:mod:`~roost.system.traces.availability`) is read at trace time
``τ = availability_offset_s + availability_time_scale * t``.

``ref_s`` is ``reference_seconds_per_example`` when set, else ``3 * macs /
reference_macs_per_s`` from the model's forward multiply-adds per example given to
:meth:`TraceSystem.set_model_cost` (3 = forward + backward, FedScale's factor). The
default reference device does ``1e9`` MAC/s, the median of a pool
(:mod:`~roost.system.traces.devices`): an order of magnitude for a 2018-19 mid-range
phone training on CPU, not a measurement; calibrate it with
``reference_seconds_per_example``.

Client k uses slot ``k mod n`` of each source's pool of n devices, slot j holding device
``perm[j]`` from ``default_rng([seed, 9, crc32(pool)])`` (:mod:`~roost.system.traces.pools`).
The config and its fields: :mod:`~roost.system.traces.options`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from roost.registry import ConfigError, check
from roost.system.model import DeviceProfile, SystemModel, TaskTiming
from roost.system.traces.options import TraceConfig
from roost.system.traces.pools import SlotTable, availability_pool, bandwidth_pool, compute_pool
from roost.system.traces.windows import for_clients

__all__ = ["TraceConfig", "TraceDevices", "TraceSystem"]

GOLDEN = 0.6180339887498949


class TraceDevices(NamedTuple):
    """The trace devices a client was given (names as in the files; "" for none)."""

    availability: str
    compute: str
    bandwidth: str


class TraceSystem(SystemModel):
    """The ``system=trace`` model (see the module docstring for every formula)."""

    def __init__(self, cfg: TraceConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.latency_s = cfg.latency_s
        self.server_speed = cfg.server_speed
        self._macs: float | None = None
        self.windows, self._avail_names = availability_pool(cfg, seed)
        self._speed, self._speed_names = compute_pool(cfg, seed)
        self.down, self.up, self._bw_names = bandwidth_pool(cfg, seed)
        self._u0 = float(np.random.default_rng([seed, 9]).random())
        self._avail_slots = SlotTable(self.windows.n if self.windows is not None else 1)
        # the scalar paths (one client per call) read plain Python floats
        self._speed_list: list[float] = self._speed.tolist()
        self._offset = float(cfg.availability_offset_s)
        self._scale = float(cfg.availability_time_scale)

    # ---- the SystemModel interface ------------------------------------------------------
    def set_model_cost(self, macs_per_example: float) -> None:
        check(
            macs_per_example > 0 and math.isfinite(macs_per_example),
            "macs_per_example",
            macs_per_example,
            "must be a number > 0",
        )
        self._macs = float(macs_per_example)

    def reference_seconds_per_example(self) -> float:
        """Seconds per example on the reference device (speed 1.0)."""
        if self.cfg.reference_seconds_per_example is not None:
            return self.cfg.reference_seconds_per_example
        if self._macs is None:
            raise ConfigError(
                "system.reference_seconds_per_example",
                None,
                "must be a number > 0 when the model's cost is unknown "
                "(set_model_cost was not called)",
            )
        return 3.0 * self._macs / self.cfg.reference_macs_per_s

    def devices(self, client_id: int) -> TraceDevices:
        """Which trace devices client ``client_id`` was mapped to."""
        return TraceDevices(
            self._avail_names[client_id % len(self._avail_names)],
            self._speed_names[client_id % len(self._speed_names)],
            self._bw_names[client_id % self.down.n],
        )

    def speed(self, client_id: int) -> float:
        speeds = self._speed_list
        return speeds[client_id % len(speeds)]

    def profile(self, client_id: int) -> DeviceProfile:
        """Relative speed and *mean* bandwidths (the actual ones vary with time)."""
        s = client_id % self.down.n
        return DeviceProfile(
            self.speed(client_id),
            float(self.up.mean_rate[s]) * 8e-6,
            float(self.down.mean_rate[s]) * 8e-6,
        )

    def _tau(self, t: float) -> float:
        return self._offset + self._scale * t

    def available(self, client_ids: np.ndarray, t: float) -> np.ndarray:
        """One vectorised query; for many clients, every slot is queried once (cached per
        time) and the clients' answers gathered from it."""
        if self.windows is None:
            return np.ones(len(client_ids), dtype=bool)
        slots, tau = self._avail_slots(client_ids), self._tau(t)
        if 4 * len(slots) >= self.windows.n:
            return self.windows.every_slot("available", tau).take(slots)
        return self.windows.available(slots, tau)

    def next_available_s(self, client_ids: np.ndarray, t: float) -> float:
        if not len(client_ids):
            return math.inf
        if self.windows is None:
            return t
        slots, tau = self._avail_slots(client_ids), self._tau(t)
        if 4 * len(slots) >= self.windows.n:
            nxt = float(self.windows.every_slot("next_online", tau).take(slots).min())
        else:
            nxt = float(self.windows.next_online(slots, tau).min())
        return math.inf if nxt == math.inf else t + (nxt - tau) / self.cfg.availability_time_scale

    def availability_changes(
        self, t0: float, t1: float, num_clients: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The switches on and off of clients ``0..num_clients-1`` in ``(t0, t1]``, from the
        windows (:meth:`Windows.changes <roost.system.traces.windows.Windows.changes>`: per
        slot, vectorised, then repeated for the clients ``k`` with ``k mod n`` = that slot,
        :func:`~roost.system.traces.windows.for_clients`), ordered by (time, off before on,
        client id). A stretch online across a slot's wrap (last window ending at the period,
        first starting at 0) gives no switch there. A switch's time is its trace boundary
        ``τ`` mapped back as ``(τ - availability_offset_s) / availability_time_scale``: it
        may differ by a few ulps from where :meth:`available` flips, but the switches up to
        ``t1`` applied to ``available(ids, t0)`` give ``available(ids, t1)`` exactly.
        Without availability windows, none (empty arrays). The interval must be finite
        (ValueError): the changes are listed, so their number grows with ``t1 - t0``."""
        windows = self.windows
        if windows is None or not t1 > t0 or num_clients <= 0:
            return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        n = int(num_clients)
        changes = windows.changes(float(t0), float(t1), self._offset, self._scale, n)
        return for_clients(changes, windows.n, n)

    def offline_s(self, client_id: int, start_s: float, arrival_s: float) -> float | None:
        """The first time in ``[start_s, arrival_s)`` the client is offline, else None."""
        windows = self.windows
        if windows is None:
            return None
        tau = self._offset + self._scale * start_s
        until = windows.online_until_one(client_id % windows.n, tau)
        off = start_s + (until - tau) / self._scale
        return off if off < arrival_s else None

    def transfer_end_s(self, client_id: int, start_s: float, nbytes: int, uplink: bool) -> float:
        rates = self.up if uplink else self.down
        s = client_id % rates.n
        begin = start_s + self.latency_s
        phase = ((self._u0 + client_id * GOLDEN) % 1.0) * rates.period_list[s]
        return begin + (rates.end_after(s, begin + phase, float(nbytes)) - (begin + phase))

    def timing(
        self, client_id: int, start_s: float, work_examples: int, down_bytes: int, up_bytes: int
    ) -> TaskTiming:
        down = self.transfer_end_s(client_id, start_s, down_bytes, uplink=False)
        compute = down + self.compute_time_s(client_id, work_examples)
        arrival = self.transfer_end_s(client_id, compute, up_bytes, uplink=True)
        return TaskTiming(
            start_s, down, compute, arrival, self.offline_s(client_id, start_s, arrival)
        )

    def min_task_time_s(self, work_examples: np.ndarray, down_bytes: int, up_bytes: int) -> float:
        """A sound lower bound: each client's compute time plus its bytes at its series'
        highest rate (compute counts 0 while the model's cost is unknown), less 1e-6 of
        itself so that float rounding of absolute times (``arrival - start``) cannot make
        a task look shorter than the bound."""
        w = np.asarray(work_examples, dtype=np.float64)
        if not len(w):
            return 0.0
        ids = np.arange(len(w))
        try:
            ref = self.reference_seconds_per_example()
        except ConfigError:
            ref = 0.0
        compute = w * ref / self._speed[ids % len(self._speed)]
        down = down_bytes / self.down.max_rate[ids % self.down.n]
        up = up_bytes / self.up.max_rate[ids % self.up.n]
        return float((compute + down + up).min() + 2 * self.latency_s) * (1.0 - 1e-6)

    def compute_time_s(self, client_id: int, work_examples: int) -> float:
        speeds = self._speed_list
        ref = self.cfg.reference_seconds_per_example
        if ref is None:
            ref = self.reference_seconds_per_example()
        return work_examples * ref / speeds[client_id % len(speeds)]

    def server_compute_time_s(self, work_examples: int) -> float:
        return work_examples * self.reference_seconds_per_example() / self.server_speed

    def download_time_s(self, client_id: int, nbytes: int) -> float:
        return self.transfer_end_s(client_id, 0.0, nbytes, uplink=False)

    def upload_time_s(self, client_id: int, nbytes: int) -> float:
        return self.transfer_end_s(client_id, 0.0, nbytes, uplink=True)
