"""Presets: named starting configurations (``roost run NAME``), plain Python functions
returning the same tree a config file holds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["PRESETS"]


def _quickstart() -> dict[str, Any]:
    """The README demo: real handwritten digits, 100 non-IID clients on heterogeneous devices."""
    return {
        "rounds": 30,
        "clients": 100,
        "clients_per_round": 10,
        "eval_every": 1,
        "algorithm": {"name": "fedavg", "lr": 0.2, "batch_size": 10, "local_epochs": 5},
        "data": {"name": "digits"},
        "partition": {"name": "dirichlet", "alpha": 0.5},
        "model": {"name": "mlp", "hidden": [64]},
        "system": {"name": "heterogeneous"},
    }


def _w1() -> dict[str, Any]:
    """WORKLOADS.md W1: 1000 synthetic clients, 100 per round, 5 rounds of FedAvg."""
    return {
        "rounds": 5,
        "clients": 1000,
        "clients_per_round": 100,
        "eval_every": 0,
        "algorithm": {
            "name": "fedavg",
            "lr": 0.05,
            "batch_size": 20,
            "local_epochs": 1,
            "momentum": 0.0,
            "weight_decay": 0.0,
            "shuffle": False,
        },
        "data": {"name": "w1"},
        "partition": {"name": "natural"},
        "model": {"name": "mlp"},
        "system": {"name": "homogeneous"},
    }


def _w2() -> dict[str, Any]:
    """WORKLOADS.md W2: W1 with SCAFFOLD (a model-size control variate per client), 10 rounds
    of the CNN on two worker processes, client state in the on-disk store."""
    tree = _w1()
    tree.update(
        {
            "rounds": 10,
            "state_store": "disk",
            "algorithm": {
                "name": "scaffold",
                "lr": 0.05,
                "batch_size": 20,
                "local_epochs": 1,
                "shuffle": False,
            },
            "model": {"name": "cnn"},
            "runtime": {"name": "workers", "workers": 2},
        }
    )
    return tree


def _w3() -> dict[str, Any]:
    """WORKLOADS.md W3: W1's data, model and local training, trained asynchronously with
    FedBuff (100 tasks in flight, K = 10, weight 1/sqrt(1 + τ)) for 50 server steps on
    W3's devices (task of client i: n_i * 0.01 / lognormal(0, 1) speed virtual seconds)."""
    tree = _w1()
    tree.update(
        {
            "rounds": 50,
            "algorithm": {
                "name": "fedbuff",
                "lr": 0.05,
                "batch_size": 20,
                "local_epochs": 1,
                "shuffle": False,
                "buffer_size": 10,
                "concurrency": 100,
                "server_lr": 1.0,
                "staleness": "polynomial",
                "staleness_a": 0.5,
            },
            "system": {"name": "w3"},
        }
    )
    return tree


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "quickstart": _quickstart,
    "w1": _w1,
    "w2": _w2,
    "w3": _w3,
}
