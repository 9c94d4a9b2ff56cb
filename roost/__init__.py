"""Roost: federated learning simulation at scale, and the same algorithms in deployment.

The public API (loaded lazily, so ``import roost`` is cheap)::

    import roost
    cfg = roost.resolve(roost.apply_overrides(roost.load_config_source("quickstart"),
                                              ["algorithm=fedprox", "algorithm.mu=0.01"]))
    history = roost.run(cfg, "runs/prox")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "run": "roost.runner",
    "resume": "roost.runner",
    "resolve": "roost.config",
    "apply_overrides": "roost.config",
    "load_config_source": "roost.config",
    "RunConfig": "roost.config",
    "ResolvedConfig": "roost.config",
    "PRESETS": "roost.config",
    "ConfigError": "roost.registry",
    "Algorithm": "roost.algorithms.base",
    "Strategy": "roost.algorithms.base",
    "ClientResult": "roost.algorithms.base",
    "ClientContext": "roost.algorithms.base",
    "ClientOptimConfig": "roost.algorithms.base",
    "Contribution": "roost.algorithms.base",
    "Payload": "roost.algorithms.base",
    "UpdateOutput": "roost.algorithms.base",
    "register_algorithm": "roost.algorithms.base",
    "ALGORITHMS": "roost.algorithms",
    "local_sgd": "roost.algorithms.local_sgd",
    "ClientData": "roost.data.base",
    "DatasetInfo": "roost.data.base",
    "FederatedDataset": "roost.data.base",
    "FlatModel": "roost.params",
    "Engine": "roost.engine",
    "History": "roost.engine",
    "VirtualClock": "roost.clock",
    "WallClock": "roost.clock",
    "SystemModel": "roost.system",
    "Runtime": "roost.runtime",
    "LocalRuntime": "roost.runtime",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'roost' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
