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
from roost.runtime.device import check_device_spec
from roost.state import ClientStateStore

Tensors = dict[str, torch.Tensor]

BACKEND = "gloo"
"""The backend of the group of all ranks (server and workers): objects, and tensors in
host memory. Workers on GPUs also form a group of their own over NCCL (``relay``)."""

RELAY_RANK = 1
"""The worker that relays between the server and the workers' group (``relay``)."""


@dataclass(frozen=True)
class WorkersRuntimeConfig:
    """workers: worker processes (0: one per GPU when the workers use GPUs, else 2).
    device: where each worker trains: auto (GPUs if CUDA is available, else the CPU), cpu,
    cuda (worker i on GPU i mod #GPUs) or cuda:K (all on GPU K).
    topology: how the round's model and sums travel. ``star``: the server broadcasts the
    payload to every worker and the workers' sums are reduced straight to it, all in host
    memory over gloo. ``relay``: the server sends the payload once to worker 1, which
    broadcasts it over the workers' own group, and the workers reduce their sums to worker
    1, which sends the total to the server; that group is NCCL when the workers use GPUs
    (the server, which has no GPU of its own in it, stays out). ``auto``: relay on GPUs,
    star on the CPU.
    timeout_s: the longest a collective
    may wait (a round's compute included) before the run is declared failed.
    threads: torch threads per worker (0: the machine's cores shared evenly).
    smoothing: the scheduler's moving-average weight for measured worker speeds.
    placement: ``lpt`` (longest predicted task first, to the earliest-finishing worker)
    or ``round_robin`` (task i to worker i mod N; the baseline).
    slowdown: per-worker factors that stretch each worker's compute time by sleeping
    (``1,2`` makes worker 2 take twice as long): emulates a heterogeneous cluster for
    scheduling experiments. Empty: no slowdown."""

    workers: int = 0
    device: str = "auto"
    topology: Literal["auto", "star", "relay"] = "auto"
    timeout_s: float = 1800.0
    threads: int = 0
    smoothing: float = 0.3
    placement: Literal["lpt", "round_robin"] = "lpt"
    slowdown: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        check(self.workers >= 0, "workers", self.workers, "must be >= 1 (0: automatic)")
        check_device_spec("device", self.device)
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


@dataclass(frozen=True)
class Transport:
    """How a run's workers exchange tensors, decided by the server and sent at join.

    ``worker_backend`` is the backend of the workers' own group (relay only): ``nccl``
    when they compute on GPUs, else ``gloo``. With NCCL the payload buffers and the sums
    live on each worker's GPU; otherwise in host memory.
    """

    topology: Literal["star", "relay"]
    worker_backend: Literal["gloo", "nccl"]

    @staticmethod
    def choose(topology: str, workers_use_gpus: bool, nccl_available: bool) -> Transport:
        chosen = topology if topology != "auto" else ("relay" if workers_use_gpus else "star")
        nccl = chosen == "relay" and workers_use_gpus and nccl_available
        return Transport("relay" if chosen == "relay" else "star", "nccl" if nccl else "gloo")

    @property
    def on_device(self) -> bool:
        """Whether payloads and sums travel between workers in GPU memory."""
        return self.worker_backend == "nccl"


# --------------------------------------------------------------------------- messages


@dataclass
class RoundOrder:
    """What the server broadcasts before each execute."""

    assignments: list[list[Task]]
    payload_layout: dict[int, list[tuple[str, int]]]
    num_groups: int
    shipped_states: dict[int, Tensors] | None
    defer_state: bool = False
    answers: dict[int, int] = field(default_factory=dict)  # task key -> payload version
    discard: list[int] = field(default_factory=list)  # suspended task keys to forget


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
    device: str
    header: SumHeader | None = None
    contributions: list[Contribution] = field(default_factory=list)
    new_states: dict[int, Tensors] = field(default_factory=dict)
    requests: dict[int, Any] = field(default_factory=dict)


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
    """A worker's view of the client states: read from states shipped with the tasks (an
    in-memory store) or from the shared store ``base``; new states collected to be sent
    back (the server commits them)."""

    def __init__(self, states: Mapping[int, Tensors], base: ClientStateStore | None = None) -> None:
        self.states = dict(states)
        self.base = base
        self.new: dict[int, Tensors] = {}

    def get(self, client_id: int) -> Tensors | None:
        if self.base is not None:
            return self.base.get(client_id)
        return self.states.get(client_id)

    def put(self, client_id: int, state: Tensors) -> None:
        self.new[client_id] = {k: v.detach().clone() for k, v in state.items()}
