"""Trace-driven system models: real device traces drive heterogeneity (``system=trace``).

One concept per module: :mod:`~roost.system.traces.files` (finding, caching and checking
files), :mod:`~roost.system.traces.availability` (availability windows),
:mod:`~roost.system.traces.devices` (compute speeds), :mod:`~roost.system.traces.bandwidth`
(time-varying bandwidth) and :mod:`~roost.system.traces.trace_system` (the registered
model). docs/system-traces.md describes the sources, their licences and the options.
"""

from roost.system.model import SYSTEMS
from roost.system.traces.availability import (
    DeviceWindows,
    Windows,
    load_fedscale_behave,
    load_flash_ready,
    load_flhetbench_timers,
)
from roost.system.traces.bandwidth import (
    Rates,
    RateSeries,
    load_flash_speed_distri,
    load_hsdpa,
    load_mobiperf,
)
from roost.system.traces.devices import (
    DeviceSpeeds,
    FedScaleCapacity,
    load_fedscale_capacity,
    load_flash_speeds,
    load_flhetbench_speeds,
)
from roost.system.traces.files import TraceFileMissing, TraceFormatError
from roost.system.traces.trace_system import TraceConfig, TraceDevices, TraceSystem

__all__ = [
    "DeviceSpeeds",
    "DeviceWindows",
    "FedScaleCapacity",
    "RateSeries",
    "Rates",
    "TraceConfig",
    "TraceDevices",
    "TraceFileMissing",
    "TraceFormatError",
    "TraceSystem",
    "Windows",
    "load_fedscale_behave",
    "load_fedscale_capacity",
    "load_flash_ready",
    "load_flash_speed_distri",
    "load_flash_speeds",
    "load_flhetbench_speeds",
    "load_flhetbench_timers",
    "load_hsdpa",
    "load_mobiperf",
]


def _build(cfg: TraceConfig, seed: int, num_clients: int | None = None) -> TraceSystem:
    """The registry's factory; the model does not depend on the number of clients."""
    return TraceSystem(cfg, seed)


SYSTEMS.register(
    "trace",
    TraceConfig,
    "real device traces: availability windows, compute speeds, time-varying bandwidth",
)(_build)
