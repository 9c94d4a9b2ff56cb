"""Federated algorithms, registered by name for ``algorithm=NAME``.

Importing this package registers every algorithm in :data:`ALGORITHMS`; each lives in one
module holding its config, server strategy and client update rule.
"""

from __future__ import annotations

from roost.algorithms.amble import AMBLE, AMBLEConfig, AMBLEStrategy
from roost.algorithms.asynchronous import Arrival, AsyncStrategy
from roost.algorithms.base import ALGORITHMS, Algorithm, Strategy
from roost.algorithms.deprune import Deprune, DepruneConfig
from roost.algorithms.ditto import Ditto, DittoConfig
from roost.algorithms.fedasmu import FedASMU, FedASMUConfig, FedASMUStrategy
from roost.algorithms.fedasync import FedAsync, FedAsyncConfig, FedAsyncStrategy
from roost.algorithms.fedavg import FedAvg, FedAvgConfig, FedAvgStrategy
from roost.algorithms.fedbuff import FedBuff, FedBuffConfig, FedBuffStrategy
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
from roost.algorithms.pipar import PiPar, PiParConfig
from roost.algorithms.scaffold import Scaffold, ScaffoldConfig, ScaffoldStrategy
from roost.algorithms.splitfed import SplitFed, SplitFedConfig
from roost.algorithms.splitfed_v2 import SplitFedV2, SplitFedV2Config
from roost.algorithms.teasq import TEASQ, TEASQConfig, TEASQStrategy
from roost.algorithms.vanilla_sl import VanillaSL, VanillaSLConfig

__all__ = [
    "ALGORITHMS",
    "AMBLE",
    "TEASQ",
    "AMBLEConfig",
    "AMBLEStrategy",
    "Algorithm",
    "Arrival",
    "AsyncStrategy",
    "Deprune",
    "DepruneConfig",
    "Ditto",
    "DittoConfig",
    "FedASMU",
    "FedASMUConfig",
    "FedASMUStrategy",
    "FedAdagrad",
    "FedAdagradConfig",
    "FedAdam",
    "FedAdamConfig",
    "FedAsync",
    "FedAsyncConfig",
    "FedAsyncStrategy",
    "FedAvg",
    "FedAvgConfig",
    "FedAvgStrategy",
    "FedBuff",
    "FedBuffConfig",
    "FedBuffStrategy",
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
    "PiPar",
    "PiParConfig",
    "Scaffold",
    "ScaffoldConfig",
    "ScaffoldStrategy",
    "SplitFed",
    "SplitFedConfig",
    "SplitFedV2",
    "SplitFedV2Config",
    "Strategy",
    "TEASQConfig",
    "TEASQStrategy",
    "VanillaSL",
    "VanillaSLConfig",
]
