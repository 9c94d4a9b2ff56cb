"""Federated algorithms, registered by name for ``algorithm=NAME``.

Importing this package registers every algorithm in :data:`ALGORITHMS`; each lives in one
module holding its config, server strategy and client update rule.
"""

from __future__ import annotations

from roost.algorithms.base import ALGORITHMS, Algorithm, Strategy
from roost.algorithms.ditto import Ditto, DittoConfig
from roost.algorithms.fedavg import FedAvg, FedAvgConfig, FedAvgStrategy
from roost.algorithms.feddyn import FedDyn, FedDynConfig, FedDynStrategy
from roost.algorithms.fednova import FedNova, FedNovaConfig, FedNovaStrategy
from roost.algorithms.fedopt import (
    FedAdagrad,
    FedAdagradConfig,
    FedAdam,
    FedAdamConfig,
    FedOptStrategy,
    FedYogi,
    FedYogiConfig,
)
from roost.algorithms.fedprox import FedProx, FedProxConfig
from roost.algorithms.scaffold import Scaffold, ScaffoldConfig, ScaffoldStrategy

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Ditto",
    "DittoConfig",
    "FedAdagrad",
    "FedAdagradConfig",
    "FedAdam",
    "FedAdamConfig",
    "FedAvg",
    "FedAvgConfig",
    "FedAvgStrategy",
    "FedDyn",
    "FedDynConfig",
    "FedDynStrategy",
    "FedNova",
    "FedNovaConfig",
    "FedNovaStrategy",
    "FedOptStrategy",
    "FedProx",
    "FedProxConfig",
    "FedYogi",
    "FedYogiConfig",
    "Scaffold",
    "ScaffoldConfig",
    "ScaffoldStrategy",
    "Strategy",
]
