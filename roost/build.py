"""Build a run's parts from its resolved config: the dataset, the algorithm, the model.

The server process and every worker process call the same functions on the same config,
so they agree on the clients' data, the algorithm and the parameter layout without any of
it being shipped between processes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from roost.algorithms.base import ALGORITHMS, Algorithm
from roost.compression.component import compression_config
from roost.compression.wrapper import Compressed
from roost.config import ResolvedConfig
from roost.data import build_dataset
from roost.data.base import DatasetInfo, FederatedDataset
from roost.models import build_model
from roost.params import ParamLayout
from roost.registry import ConfigError

__all__ = [
    "RunParts",
    "WorkerParts",
    "build_algorithm",
    "build_module",
    "build_parts",
    "initial_params",
]


def build_module(name: str, config: Any, info: DatasetInfo) -> nn.Module:
    """Build a model architecture (module-level, so that a partial of it pickles)."""
    return build_model(name, config, info)


def build_adapted_module(
    algorithm: Algorithm, name: str, config: Any, info: DatasetInfo
) -> nn.Module:
    """The model ``name`` as ``algorithm`` trains it (:meth:`Algorithm.adapt_model`)."""
    return algorithm.adapt_model(build_model(name, config, info), info)


def _fields(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


@dataclass
class RunParts:
    dataset: FederatedDataset
    algorithm: Algorithm
    build_module: Callable[[], nn.Module]


def build_algorithm(cfg: ResolvedConfig) -> Algorithm:
    """The run's algorithm, wrapped in :class:`Compressed` when ``compression`` is set."""
    algorithm = ALGORITHMS.get(cfg.name("algorithm")).factory(cfg.config("algorithm"))
    if cfg.name("compression") == "none":
        return algorithm
    if not algorithm.compressible:
        raise ConfigError(
            "compression",
            cfg.name("compression"),
            f"algorithm={cfg.name('algorithm')} cannot be wrapped: it uploads neither "
            "a model nor a delta, or compresses its own uploads (see roost list "
            "algorithm); use compression=none",
        )
    settings = compression_config(cfg.name("compression"), cfg.config("compression"))
    return Compressed(algorithm, settings)


def build_parts(cfg: ResolvedConfig) -> RunParts:
    rc = cfg.run
    dataset = build_dataset(
        cfg.name("data"),
        _fields(cfg.config("data")),
        cfg.name("partition"),
        _fields(cfg.config("partition")),
        rc.clients,
        rc.seed,
    )
    if rc.clients_per_round > dataset.num_clients:
        raise ConfigError(
            "clients_per_round",
            rc.clients_per_round,
            f"must be <= the number of clients ({dataset.num_clients})",
        )
    algorithm = build_algorithm(cfg)
    model = (cfg.name("model"), cfg.config("model"), dataset.info)
    if type(algorithm).adapt_model is Algorithm.adapt_model:
        builder: Callable[[], nn.Module] = functools.partial(build_module, *model)
    else:  # the algorithm changes the architecture (deprune's bottleneck at the cut)
        builder = functools.partial(build_adapted_module, algorithm, *model)
    return RunParts(dataset, algorithm, builder)


@dataclass(frozen=True)
class WorkerParts:
    """The picklable builder a worker process runs (``Job.parts``): the run's parts from
    its resolved config tree, so only the tree is pickled."""

    tree: dict[str, Any]

    def __call__(self) -> tuple[Algorithm, FederatedDataset, Callable[[], nn.Module]]:
        from roost.config import resolve

        parts = build_parts(resolve(self.tree))
        return parts.algorithm, parts.dataset, parts.build_module


def initial_params(cfg: ResolvedConfig, parts: RunParts) -> torch.Tensor:
    """The initial global parameters (and floating-point buffers): ``torch.manual_seed(seed)``
    right before building the model (W1's rule), flattened."""
    torch.manual_seed(cfg.run.seed)
    module = parts.build_module()
    return ParamLayout.of(module).flatten_module(module)
