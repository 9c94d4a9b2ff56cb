"""Config validation of the FedAvg family: bad values raise ConfigError naming the key."""

from __future__ import annotations

import dataclasses

import pytest

from roost.algorithms import (
    ALGORITHMS,
    FedAdagradConfig,
    FedAdamConfig,
    FedAvgConfig,
    FedNovaConfig,
    FedProxConfig,
    FedYogiConfig,
)
from roost.registry import ConfigError

NAMES = ["fedavg", "fedprox", "fednova", "fedadagrad", "fedadam", "fedyogi"]


@pytest.mark.parametrize(
    ("cls", "key", "value"),
    [
        (FedProxConfig, "mu", -1.0),
        (FedProxConfig, "mu", float("inf")),
        (FedNovaConfig, "server_lr", 0.0),
        (FedNovaConfig, "server_lr", -0.5),
        (FedAdagradConfig, "server_lr", 0.0),
        (FedAdagradConfig, "beta1", 1.0),
        (FedAdagradConfig, "tau", 0.0),
        (FedAdamConfig, "beta1", -0.1),
        (FedAdamConfig, "beta2", 1.0),
        (FedAdamConfig, "tau", -1e-9),
        (FedYogiConfig, "beta2", -0.01),
        (FedYogiConfig, "server_lr", float("nan")),
        # the shared local-training fields are still checked (super().__post_init__())
        (FedProxConfig, "lr", 0.0),
        (FedNovaConfig, "momentum", 1.0),
        (FedYogiConfig, "batch_size", 0),
        (FedAvgConfig, "local_epochs", 0),
    ],
)
def test_bad_value_names_its_key(cls, key: str, value) -> None:
    with pytest.raises(ConfigError) as err:
        cls(**{key: value})
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}=")


def test_registry_prefixes_the_key() -> None:
    # What the command line shows for ``algorithm=fedprox algorithm.mu=-1``.
    with pytest.raises(ConfigError) as err:
        ALGORITHMS.config("fedprox", {"mu": "-1"})
    assert err.value.key == "algorithm.mu"
    with pytest.raises(ConfigError) as err:
        ALGORITHMS.config("fedavg", {"weighted": "maybe"})
    assert err.value.key == "algorithm.weighted"
    # FedAdagrad has no β2 (Flower never reads it): an unknown key, not silently ignored
    with pytest.raises(ConfigError) as err:
        ALGORITHMS.config("fedadagrad", {"beta2": "0.9"})
    assert err.value.key == "algorithm.beta2"


def test_registry_builds_typed_configs() -> None:
    cfg = ALGORITHMS.config("fedyogi", {"server_lr": "0.02", "beta2": "0.9", "lr": "0.0316"})
    assert isinstance(cfg, FedYogiConfig)
    assert (cfg.server_lr, cfg.beta1, cfg.beta2, cfg.tau, cfg.lr) == (0.02, 0.9, 0.9, 1e-3, 0.0316)
    cfg = ALGORITHMS.config("fedprox", {"mu": "0", "weighted": "false"})
    assert cfg == FedProxConfig(mu=0.0, weighted=False)


@pytest.mark.parametrize("name", NAMES)
def test_defaults_valid_and_frozen(name: str) -> None:
    entry = ALGORITHMS.get(name)
    cfg = entry.config_cls()
    alg = entry.factory(cfg)
    assert alg.name == name
    assert alg.config is cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


def test_defaults() -> None:
    assert FedAvgConfig().weighted is True
    assert FedProxConfig().mu == 0.01
    assert FedNovaConfig().server_lr == 1.0
