"""System models: when a client's task finishes, in virtual time.

A task dispatched at ``t0`` downloads the payload, computes, and uploads its result; the
system model says when each phase ends (:class:`TaskTiming`), whether the device goes
offline before the upload is done (the task is then lost: a dropout), and which devices
are available at a time (one vectorised query, :meth:`SystemModel.available`).

The parametric models here are time-invariant::

    compute_s  = work_examples * seconds_per_example / speed_k
    transfer_s = latency_s + 8 * bytes / (bandwidth_mbps_k * 1e6)

where ``speed_k`` is the device's compute speed relative to the reference device
(1.0 = reference) and bandwidths are in megabits per second. The server computes
``server_speed`` times as fast as the reference device (default 10: a server an order of
magnitude faster than a device, a choice, not a measurement); only split learning puts
compute on it (:mod:`roost.system.split_schedule`). Trace-driven models
(:mod:`roost.system.traces`) override :meth:`SystemModel.timing` and
:meth:`SystemModel.available` with bandwidth that varies over time and availability
windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from roost.registry import Registry, check

__all__ = [
    "SYSTEMS",
    "ConstantConfig",
    "ConstantSystem",
    "DeviceProfile",
    "HeterogeneousConfig",
    "HeterogeneousSystem",
    "HomogeneousConfig",
    "HomogeneousSystem",
    "SystemModel",
    "TaskTiming",
    "W3Config",
    "W3System",
    "build_system",
]


@dataclass(frozen=True)
class DeviceProfile:
    speed: float
    uplink_mbps: float
    downlink_mbps: float


class TaskTiming(NamedTuple):
    """The phases of one task dispatched at ``start_s`` (absolute virtual seconds).

    ``offline_s`` is when the device goes offline before ``arrival_s`` (the task is lost
    then, a dropout); None when it stays online until its result has arrived. (A tuple:
    the engine makes one per dispatch.)
    """

    start_s: float
    download_end_s: float
    compute_end_s: float
    arrival_s: float
    offline_s: float | None = None

    @property
    def duration_s(self) -> float:
        return self.arrival_s - self.start_s


class SystemModel:
    """Device profiles -> compute and transfer times, and availability.

    The engine calls :meth:`timing` once per dispatched task, :meth:`available` whenever
    it selects clients, :meth:`next_available_s` when no client is available, and
    :meth:`min_task_time_s` once (a lower bound on any task's duration, which tells it
    which in-flight tasks are certain to arrive before any task not yet dispatched).
    """

    seconds_per_example: float = 1e-3
    latency_s: float = 0.0
    server_speed: float = 10.0
    times_split_tasks: bool = True
    """Whether split-learning tasks are timed per micro-batch on this model's devices and
    server (:mod:`roost.system.split_schedule`); models without per-device compute and
    links (``constant``, ``w3``) time them as whole tasks."""

    def profile(self, client_id: int) -> DeviceProfile:
        raise NotImplementedError

    def set_model_cost(self, macs_per_example: float) -> None:
        """The model's multiply-adds per example (forward pass), for models whose compute
        time follows the model; the parametric models use ``seconds_per_example``."""

    def available(self, client_ids: np.ndarray, t: float) -> np.ndarray:
        """A boolean mask: which of ``client_ids`` are online at virtual time ``t``."""
        return np.ones(len(client_ids), dtype=bool)

    def availability_changes(
        self, t0: float, t1: float, num_clients: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The changes of availability of clients ``0..num_clients-1`` in the virtual-time
        interval ``(t0, t1]``: (times float64 ascending, client ids int64, online bool),
        ordered by (time, online=False first, client id). Applying every change with time
        ``<= t`` to ``available(ids, t0)`` gives ``available(ids, t)``.

        None: this model cannot list its changes (the caller then queries
        :meth:`available` each time). The default: a model that keeps the base
        :meth:`available` (every client always online) has no change, three empty arrays;
        one that overrides :meth:`available` without overriding this returns None."""
        if type(self).available is SystemModel.available:
            return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        return None

    def next_available_s(self, client_ids: np.ndarray, t: float) -> float:
        """The earliest time ``>= t`` at which one of ``client_ids`` is online (inf if
        none ever is again)."""
        return t if len(client_ids) else math.inf

    def timing(
        self, client_id: int, start_s: float, work_examples: int, down_bytes: int, up_bytes: int
    ) -> TaskTiming:
        """When each phase of a task dispatched at ``start_s`` ends."""
        p = self.profile(client_id)
        down = start_s + self.latency_s + 8.0 * down_bytes / (p.downlink_mbps * 1e6)
        compute = down + work_examples * self.seconds_per_example / p.speed
        arrival = compute + self.latency_s + 8.0 * up_bytes / (p.uplink_mbps * 1e6)
        return TaskTiming(start_s, down, compute, arrival)

    def offline_s(self, client_id: int, start_s: float, arrival_s: float) -> float | None:
        """The first time in ``[start_s, arrival_s)`` the device is offline, else None
        (used for tasks whose timeline the engine extends, e.g. by a mid-task download)."""
        return None

    def transfer_end_s(self, client_id: int, start_s: float, nbytes: int, uplink: bool) -> float:
        """When a transfer of ``nbytes`` that starts at ``start_s`` ends (a mid-task
        download of a fresher model, a split-learning activation)."""
        p = self.profile(client_id)
        mbps = p.uplink_mbps if uplink else p.downlink_mbps
        return start_s + self.latency_s + 8.0 * nbytes / (mbps * 1e6)

    def min_task_time_s(self, work_examples: np.ndarray, down_bytes: int, up_bytes: int) -> float:
        """A lower bound on the duration of any client's task, at any start time;
        ``work_examples[k]`` is client k's work. The default evaluates every client at
        t = 0, which is exact for time-invariant models."""
        return min(
            (
                self.timing(k, 0.0, int(w), down_bytes, up_bytes).duration_s
                for k, w in enumerate(work_examples)
            ),
            default=0.0,
        )

    def compute_time_s(self, client_id: int, work_examples: int) -> float:
        return work_examples * self.seconds_per_example / self.profile(client_id).speed

    def server_compute_time_s(self, work_examples: int) -> float:
        """The server's compute time for ``work_examples`` examples of whole-model training
        (split learning's server part takes its share of it): ``server_speed`` times the
        reference device's speed."""
        return work_examples * self.seconds_per_example / self.server_speed

    def download_time_s(self, client_id: int, nbytes: int) -> float:
        return self.latency_s + 8.0 * nbytes / (self.profile(client_id).downlink_mbps * 1e6)

    def upload_time_s(self, client_id: int, nbytes: int) -> float:
        return self.latency_s + 8.0 * nbytes / (self.profile(client_id).uplink_mbps * 1e6)

    def task_time_s(
        self, client_id: int, work_examples: int, down_bytes: int, up_bytes: int
    ) -> float:
        """The duration of a task dispatched at t = 0."""
        return self.timing(client_id, 0.0, work_examples, down_bytes, up_bytes).duration_s


def _check_common(seconds_per_example: float, latency_s: float) -> None:
    check(
        seconds_per_example > 0 and math.isfinite(seconds_per_example),
        "seconds_per_example",
        seconds_per_example,
        "must be a number > 0",
    )
    check(latency_s >= 0, "latency_s", latency_s, "must be >= 0")


def _check_server_speed(server_speed: float) -> None:
    check(
        server_speed > 0 and math.isfinite(server_speed),
        "server_speed",
        server_speed,
        "must be a number > 0 (the server's compute speed, 1.0 = the reference device)",
    )


@dataclass(frozen=True)
class HomogeneousConfig:
    """Every device is the reference device."""

    seconds_per_example: float = 1e-3
    uplink_mbps: float = 10.0
    downlink_mbps: float = 50.0
    latency_s: float = 0.0
    server_speed: float = 10.0

    def __post_init__(self) -> None:
        _check_common(self.seconds_per_example, self.latency_s)
        _check_server_speed(self.server_speed)
        check(self.uplink_mbps > 0, "uplink_mbps", self.uplink_mbps, "must be > 0")
        check(self.downlink_mbps > 0, "downlink_mbps", self.downlink_mbps, "must be > 0")


class HomogeneousSystem(SystemModel):
    def __init__(self, cfg: HomogeneousConfig) -> None:
        self.seconds_per_example = cfg.seconds_per_example
        self.latency_s = cfg.latency_s
        self.server_speed = cfg.server_speed
        self._profile = DeviceProfile(1.0, cfg.uplink_mbps, cfg.downlink_mbps)

    def profile(self, client_id: int) -> DeviceProfile:
        return self._profile


@dataclass(frozen=True)
class HeterogeneousConfig:
    """Seeded parametric devices (ALGORITHMS.md §3 defaults).

    speed ~ lognormal(0, speed_sigma); uplink ~ U(uplink_mbps_min, uplink_mbps_max);
    downlink ~ U(downlink_mbps_min, downlink_mbps_max). Client k's draws come from
    ``default_rng([seed, 7, k])``, so a profile is computed alone, in O(1), by any process.
    """

    seconds_per_example: float = 1e-3
    speed_sigma: float = 0.5
    uplink_mbps_min: float = 1.0
    uplink_mbps_max: float = 20.0
    downlink_mbps_min: float = 5.0
    downlink_mbps_max: float = 50.0
    latency_s: float = 0.0
    server_speed: float = 10.0

    def __post_init__(self) -> None:
        _check_common(self.seconds_per_example, self.latency_s)
        _check_server_speed(self.server_speed)
        check(self.speed_sigma >= 0, "speed_sigma", self.speed_sigma, "must be >= 0")
        check(
            0 < self.uplink_mbps_min <= self.uplink_mbps_max,
            "uplink_mbps_min",
            self.uplink_mbps_min,
            "must be > 0 and <= uplink_mbps_max",
        )
        check(
            0 < self.downlink_mbps_min <= self.downlink_mbps_max,
            "downlink_mbps_min",
            self.downlink_mbps_min,
            "must be > 0 and <= downlink_mbps_max",
        )


class HeterogeneousSystem(SystemModel):
    def __init__(self, cfg: HeterogeneousConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self.seconds_per_example = cfg.seconds_per_example
        self.latency_s = cfg.latency_s
        self.server_speed = cfg.server_speed

    def profile(self, client_id: int) -> DeviceProfile:
        c = self.cfg
        rng = np.random.default_rng([self.seed, 7, client_id])
        speed = float(rng.lognormal(0.0, c.speed_sigma))
        up = float(rng.uniform(c.uplink_mbps_min, c.uplink_mbps_max))
        down = float(rng.uniform(c.downlink_mbps_min, c.downlink_mbps_max))
        return DeviceProfile(speed, up, down)


@dataclass(frozen=True)
class ConstantConfig:
    """Every task lasts ``duration_s`` virtual seconds, whatever its work and bytes (for
    tests and for comparing methods at equal latencies)."""

    duration_s: float = 1.0

    def __post_init__(self) -> None:
        check(
            self.duration_s > 0 and math.isfinite(self.duration_s),
            "duration_s",
            self.duration_s,
            "must be a number > 0",
        )


class ConstantSystem(SystemModel):
    times_split_tasks = False

    def __init__(self, cfg: ConstantConfig) -> None:
        self.duration_s = cfg.duration_s

    def timing(
        self, client_id: int, start_s: float, work_examples: int, down_bytes: int, up_bytes: int
    ) -> TaskTiming:
        end = start_s + self.duration_s
        return TaskTiming(start_s, start_s, end, end)

    def transfer_end_s(self, client_id: int, start_s: float, nbytes: int, uplink: bool) -> float:
        return start_s

    def min_task_time_s(self, work_examples: np.ndarray, down_bytes: int, up_bytes: int) -> float:
        return self.duration_s


@dataclass(frozen=True)
class W3Config:
    """WORKLOADS.md W3's devices: client i's task lasts ``n_i * seconds_per_example /
    speed_i`` (its work, epochs included, over its speed), with ``speed =
    default_rng([seed, 5]).lognormal(0, speed_sigma, size=clients)``; no network time."""

    seconds_per_example: float = 0.01
    speed_sigma: float = 1.0

    def __post_init__(self) -> None:
        _check_common(self.seconds_per_example, 0.0)
        check(self.speed_sigma >= 0, "speed_sigma", self.speed_sigma, "must be >= 0")


class W3System(SystemModel):
    times_split_tasks = False

    def __init__(self, cfg: W3Config, seed: int, num_clients: int) -> None:
        self.seconds_per_example = cfg.seconds_per_example
        rng = np.random.default_rng([seed, 5])
        self.speeds = rng.lognormal(0.0, cfg.speed_sigma, size=num_clients)

    def timing(
        self, client_id: int, start_s: float, work_examples: int, down_bytes: int, up_bytes: int
    ) -> TaskTiming:
        end = start_s + work_examples * self.seconds_per_example / float(self.speeds[client_id])
        return TaskTiming(start_s, start_s, end, end)

    def transfer_end_s(self, client_id: int, start_s: float, nbytes: int, uplink: bool) -> float:
        return start_s

    def min_task_time_s(self, work_examples: np.ndarray, down_bytes: int, up_bytes: int) -> float:
        n = len(work_examples)
        return float(np.min(work_examples * self.seconds_per_example / self.speeds[:n]))


SYSTEMS: Registry[object] = Registry("system")
SYSTEMS.register("homogeneous", HomogeneousConfig, "every device identical")(
    lambda cfg, seed, num_clients: HomogeneousSystem(cfg)
)
SYSTEMS.register(
    "heterogeneous", HeterogeneousConfig, "seeded lognormal speed, uniform bandwidths"
)(lambda cfg, seed, num_clients: HeterogeneousSystem(cfg, seed))
SYSTEMS.register("constant", ConstantConfig, "every task lasts duration_s")(
    lambda cfg, seed, num_clients: ConstantSystem(cfg)
)
SYSTEMS.register("w3", W3Config, "W3: n_i * seconds_per_example / lognormal speed")(W3System)


def build_system(name: str, config: object, seed: int, num_clients: int) -> SystemModel:
    """The system model ``name`` for a run of ``num_clients`` clients."""
    model = SYSTEMS.get(name).factory(config, seed, num_clients)  # type: ignore[operator]
    assert isinstance(model, SystemModel)
    return model
