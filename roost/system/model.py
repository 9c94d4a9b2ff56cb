"""System models: how long a client's task takes in virtual time.

A task's duration is ``download + compute + upload``::

    compute_s  = work_examples * seconds_per_example / speed_k
    transfer_s = latency_s + 8 * bytes / (bandwidth_mbps_k * 1e6)

where ``speed_k`` is the device's compute speed relative to the reference device
(1.0 = reference) and bandwidths are in megabits per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from roost.registry import Registry, check

__all__ = [
    "SYSTEMS",
    "DeviceProfile",
    "HeterogeneousConfig",
    "HeterogeneousSystem",
    "HomogeneousConfig",
    "HomogeneousSystem",
    "SystemModel",
]


@dataclass(frozen=True)
class DeviceProfile:
    speed: float
    uplink_mbps: float
    downlink_mbps: float


class SystemModel:
    """Device profiles -> compute and transfer times, and availability."""

    seconds_per_example: float = 1e-3
    latency_s: float = 0.0

    def profile(self, client_id: int) -> DeviceProfile:
        raise NotImplementedError

    def is_available(self, client_id: int, t: float) -> bool:
        return True

    def compute_time_s(self, client_id: int, work_examples: int) -> float:
        return work_examples * self.seconds_per_example / self.profile(client_id).speed

    def download_time_s(self, client_id: int, nbytes: int) -> float:
        return self.latency_s + 8.0 * nbytes / (self.profile(client_id).downlink_mbps * 1e6)

    def upload_time_s(self, client_id: int, nbytes: int) -> float:
        return self.latency_s + 8.0 * nbytes / (self.profile(client_id).uplink_mbps * 1e6)

    def task_time_s(
        self, client_id: int, work_examples: int, down_bytes: int, up_bytes: int
    ) -> float:
        p = self.profile(client_id)
        return (
            2 * self.latency_s
            + 8.0 * down_bytes / (p.downlink_mbps * 1e6)
            + work_examples * self.seconds_per_example / p.speed
            + 8.0 * up_bytes / (p.uplink_mbps * 1e6)
        )


def _check_common(seconds_per_example: float, latency_s: float) -> None:
    check(
        seconds_per_example > 0 and math.isfinite(seconds_per_example),
        "seconds_per_example",
        seconds_per_example,
        "must be a number > 0",
    )
    check(latency_s >= 0, "latency_s", latency_s, "must be >= 0")


@dataclass(frozen=True)
class HomogeneousConfig:
    """Every device is the reference device."""

    seconds_per_example: float = 1e-3
    uplink_mbps: float = 10.0
    downlink_mbps: float = 50.0
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        _check_common(self.seconds_per_example, self.latency_s)
        check(self.uplink_mbps > 0, "uplink_mbps", self.uplink_mbps, "must be > 0")
        check(self.downlink_mbps > 0, "downlink_mbps", self.downlink_mbps, "must be > 0")


class HomogeneousSystem(SystemModel):
    def __init__(self, cfg: HomogeneousConfig) -> None:
        self.seconds_per_example = cfg.seconds_per_example
        self.latency_s = cfg.latency_s
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

    def __post_init__(self) -> None:
        _check_common(self.seconds_per_example, self.latency_s)
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

    def profile(self, client_id: int) -> DeviceProfile:
        c = self.cfg
        rng = np.random.default_rng([self.seed, 7, client_id])
        speed = float(rng.lognormal(0.0, c.speed_sigma))
        up = float(rng.uniform(c.uplink_mbps_min, c.uplink_mbps_max))
        down = float(rng.uniform(c.downlink_mbps_min, c.downlink_mbps_max))
        return DeviceProfile(speed, up, down)


SYSTEMS: Registry[object] = Registry("system")
SYSTEMS.register("homogeneous", HomogeneousConfig, "every device identical")(
    lambda cfg, seed: HomogeneousSystem(cfg)
)
SYSTEMS.register(
    "heterogeneous", HeterogeneousConfig, "seeded lognormal speed, uniform bandwidths"
)(lambda cfg, seed: HeterogeneousSystem(cfg, seed))


def build_system(name: str, config: object, seed: int) -> SystemModel:
    model = SYSTEMS.get(name).factory(config, seed)  # type: ignore[operator]
    assert isinstance(model, SystemModel)
    return model
