"""Where a runtime computes: the ``device`` option, and which GPU each worker takes.

A runtime's ``device`` is one of::

    auto      the first GPU when CUDA is available, else the CPU
    cpu       the CPU
    cuda      GPUs (one per worker process: worker i takes GPU i mod #GPUs)
    cuda:K    GPU K (every worker shares it)

The server's strategy, the checkpoints and the client-state stores always live in host
memory. A runtime moves what a task touches to its device at the task's boundary: the
payload once per round, each client's examples and state per task, and brings back what
leaves it (new client state, the round's sums). On the CPU every move is a no-op, so the
CPU path and the GPU path are the same code.

The functions take the number of visible GPUs as an argument (``available_gpus()`` by
default) so that the choices can be tested on a machine without one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from roost.registry import ConfigError, check

__all__ = [
    "DEVICE_HELP",
    "available_gpus",
    "check_device_spec",
    "default_worker_count",
    "resolve_device",
    "seed_device_rng",
    "tensors_to",
    "worker_slot_on_node",
]

DEVICE_HELP = "must be auto, cpu, cuda or cuda:K (K a GPU index)"
_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")

Tensors = dict[str, torch.Tensor]


def available_gpus() -> int:
    """GPUs this process can use (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device_spec(key: str, spec: str) -> None:
    """Reject a malformed ``device`` value at config time (availability is checked when
    the runtime starts, on the machine that computes)."""
    check(_SPEC.fullmatch(spec) is not None, key, spec, DEVICE_HELP)


def _gpu_or_error(key: str, spec: str, index: int, gpus: int) -> torch.device:
    if gpus == 0:
        raise ConfigError(key, spec, "no CUDA GPU is visible here; use device=cpu or auto")
    if index >= gpus:
        raise ConfigError(
            key, spec, f"GPU index out of range: {gpus} GPU(s) visible (0..{gpus - 1})"
        )
    return torch.device("cuda", index)


def resolve_device(
    spec: str, slot: int = 0, gpus: int | None = None, key: str = "runtime.device"
) -> torch.device:
    """The device of the process in ``slot`` (0-based among the workers on its machine; a
    single-process runtime is slot 0): GPU ``slot mod #GPUs`` for ``auto`` and ``cuda``,
    so that N workers on N GPUs take one each; GPU K for ``cuda:K``."""
    check_device_spec(key, spec)
    gpus = available_gpus() if gpus is None else gpus
    if spec == "cpu" or (spec == "auto" and gpus == 0):
        return torch.device("cpu")
    if spec in ("auto", "cuda"):
        return _gpu_or_error(key, spec, slot % max(gpus, 1), gpus)
    return _gpu_or_error(key, spec, int(spec.split(":")[1]), gpus)


def worker_slot_on_node(rank: int, local_rank: int) -> int:
    """A torchrun worker's 0-based slot among the workers of its node.

    The server is global rank 0, which is local rank 0 of its node; the workers sharing
    that node start at local rank 1, so their slots are shifted down by one. On every
    other node the slot is the local rank.
    """
    if rank < 1 or local_rank < 0 or local_rank > rank:
        raise ValueError(f"not a worker's ranks: rank {rank}, local rank {local_rank}")
    on_server_node = rank == local_rank  # this node's local rank 0 is global rank 0
    return local_rank - 1 if on_server_node else local_rank


def default_worker_count(spec: str, gpus: int | None = None) -> int:
    """``workers=0`` (automatic): one worker per GPU when the workers use GPUs, else 2."""
    gpus = available_gpus() if gpus is None else gpus
    if spec in ("auto", "cuda") and gpus > 0:
        return gpus
    return 2


def tensors_to(tensors: Mapping[str, torch.Tensor], device: torch.device) -> Tensors:
    """The tensors on ``device`` (the same tensor objects for those already there)."""
    return {k: v.to(device) for k, v in tensors.items()}


def seed_device_rng(device: torch.device, seed: int) -> None:
    """Seed the random generators a task's modules use on ``device`` (dropout).

    Not ``torch.manual_seed``: on every call it also queues a seeding of every CUDA device
    with a captured stack trace (~1 ms a task).
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        if not torch.cuda.is_initialized():
            torch.cuda.init()  # fills torch.cuda.default_generators
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)
