"""Device profiles and the system model that turns work and bytes into virtual seconds."""

from roost.system.model import (
    SYSTEMS,
    DeviceProfile,
    HeterogeneousConfig,
    HeterogeneousSystem,
    HomogeneousConfig,
    HomogeneousSystem,
    SystemModel,
    TaskTiming,
    build_system,
)

__all__ = [
    "SYSTEMS",
    "DeviceProfile",
    "HeterogeneousConfig",
    "HeterogeneousSystem",
    "HomogeneousConfig",
    "HomogeneousSystem",
    "SystemModel",
    "TaskTiming",
    "build_system",
]
import roost.system.traces  # noqa: F401  (registers system=trace)
