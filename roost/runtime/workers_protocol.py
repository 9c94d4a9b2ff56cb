"""What the server and its worker processes agree on: options, messages, helpers.

See :mod:`roost.runtime.workers` for the protocol of a round."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from roost.algorithms.base import Contribution, Payload
from roost.registry import check
from roost.runtime.base import Task
from roost.state import ClientStateStore

Tensors = dict[str, torch.Tensor]

BACKEND = "gloo"
"""The process group's backend. Tensors travel through host memory (gloo); GPU
computation with NCCL transport is not implemented yet."""


@dataclass(frozen=True)
class WorkersRuntimeConfig:
    """workers: worker processes. timeout_s: the longest a collective
    may wait (a round's compute included) before the run is declared failed.
    threads: torch threads per worker (0: the machine's cores shared evenly).
    smoothing: the scheduler's moving-average weight for measured worker speeds.
    placement: ``lpt`` (longest predicted task first, to the earliest-finishing worker)
    or ``round_robin`` (task i to worker i mod N; the baseline).
    slowdown: per-worker factors that stretch each worker's compute time by sleeping
    (``1,2`` makes worker 2 take twice as long): emulates a heterogeneous cluster for
    scheduling experiments. Empty: no slowdown."""

    workers: int = 2
    timeout_s: float = 1800.0
    threads: int = 0
    smoothing: float = 0.3
    placement: Literal["lpt", "round_robin"] = "lpt"
    slowdown: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        check(self.workers >= 1, "workers", self.workers, "must be >= 1")
        check(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be > 0")
        check(self.threads >= 0, "threads", self.threads, "must be >= 0 (0: automatic)")
        check(0 < self.smoothing <= 1, "smoothing", self.smoothing, "must be in (0, 1]")
        check(
            all(f >= 1 for f in self.slowdown),
            "slowdown",
            self.slowdown,
            "factors must be >= 1 (1 = full speed)",
        )


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- messages


@dataclass
class RoundOrder:
    """What the server broadcasts before each execute."""

    assignments: list[list[Task]]
    payload_layout: dict[int, list[tuple[str, int]]]
    num_groups: int
    shipped_states: dict[int, Tensors] | None


@dataclass
class SumHeader:
    """A contribution without its tensors: their sizes, and the small fields."""

    sizes: dict[str, int]
    scalar_sums: dict[str, float]
    weight: float
    count: int
    clients: list[int]

    @staticmethod
    def of(c: Contribution) -> SumHeader:
        sizes = {k: v.numel() for k, v in c.sums.items()}
        return SumHeader(sizes, c.scalar_sums, c.weight, c.count, c.clients)


@dataclass
class WorkerReply:
    """What a worker sends back by gather. On the reduce path (one group) it carries the
    :class:`SumHeader` and the tensors follow in one reduce; otherwise it carries the
    per-group contributions whole."""

    busy_s: float
    client_metrics: list[tuple[int, dict[str, float]]]
    peak_rss_mb: float
    header: SumHeader | None = None
    contributions: list[Contribution] = field(default_factory=list)
    new_states: dict[int, Tensors] = field(default_factory=dict)


def shared_store_info(store: ClientStateStore) -> dict[str, Any] | None:
    """How another process opens ``store`` (None: it lives in this process's memory)."""
    share = getattr(store, "share", None)
    return share() if share is not None else None


def open_store_from(info: dict[str, Any]) -> Any:
    from roost.state import open_shared_store

    return open_shared_store(info)


def payload_tensors(payload: Payload) -> list[tuple[str, torch.Tensor]]:
    return [("params", payload.params), *sorted(payload.extras.items())]


class ShippedStates(ClientStateStore):
    """A worker's view of an in-memory store: states shipped with the tasks, new states
    collected to be sent back."""

    def __init__(self, states: Mapping[int, Tensors]) -> None:
        self.states = dict(states)
        self.new: dict[int, Tensors] = {}

    def get(self, client_id: int) -> Tensors | None:
        return self.states.get(client_id)

    def put(self, client_id: int, state: Tensors) -> None:
        self.new[client_id] = {k: v.detach().clone() for k, v in state.items()}
