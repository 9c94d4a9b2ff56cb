"""A minimal in-process stand-in for the runtime, for algorithm unit tests.

It does what a runtime does for one synchronous round and nothing more: load the payload
into the resident :class:`FlatModel`, run the client update with a seeded
:class:`ClientContext`, fold each result into one :class:`Contribution` at once (results may
alias the resident model), then step the strategy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from roost.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientResult,
    Contribution,
    Strategy,
    drive,
)
from roost.data.base import ClientData
from roost.params import FlatModel


def no_server_requests(request: Any) -> Any:
    raise AssertionError(f"a plain client update made a server request: {request!r}")


def task_seed(client_id: int, round: int) -> int:
    return 1000 * round + client_id


def linear_model(in_features: int = 4, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(in_features, classes)


def make_clients(
    sizes: Sequence[int], in_features: int = 4, classes: int = 3, seed: int = 0
) -> list[ClientData]:
    """Client ``k`` gets ``sizes[k]`` Gaussian examples with random labels."""
    g = torch.Generator().manual_seed(seed)
    return [
        ClientData(
            torch.randn(n, in_features, generator=g),
            torch.randint(0, classes, (n,), generator=g),
        )
        for n in sizes
    ]


def client_round(
    alg: Algorithm,
    strategy: Strategy,
    model: FlatModel,
    clients: Sequence[tuple[int, ClientData]],
    round: int,
) -> tuple[Contribution, list[dict[str, float]]]:
    """Run the selected ``(client_id, data)`` tasks of one round; return the folded sum."""
    payload = strategy.payload(round)
    contribution = Contribution()
    metrics = []
    for cid, data in clients:
        seed = task_seed(cid, round)
        ctx = ClientContext(cid, round, seed, len(data), torch.Generator().manual_seed(seed))
        model.load_(payload.params)
        out = drive(alg.update(ctx, model, data, payload, None), no_server_requests)
        contribution.fold(out.result, cid)
        metrics.append(out.metrics)
    return contribution, metrics


def run_rounds(
    alg: Algorithm,
    module: nn.Module,
    clients: Sequence[ClientData],
    rounds: int,
    order: Sequence[int] | None = None,
) -> Strategy:
    """``rounds`` full-participation rounds of ``alg`` from ``module``'s weights."""
    model = FlatModel(module)
    strategy = alg.make_strategy()
    strategy.initialize(model.params)
    ids = list(order) if order is not None else list(range(len(clients)))
    for r in range(1, rounds + 1):
        contribution, _ = client_round(
            alg, strategy, model, [(cid, clients[cid]) for cid in ids], r
        )
        strategy.step(r, [contribution])
    return strategy


def contribution_of(results: Sequence[tuple[Sequence[float], float]]) -> Contribution:
    """Fold ``(params, weight)`` pairs, as clients would have returned them, in order."""
    c = Contribution()
    for i, (params, weight) in enumerate(results):
        c.fold(ClientResult({"params": torch.tensor(params, dtype=torch.float32)}, weight), i)
    return c
