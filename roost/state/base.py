"""The client state store protocol and the helpers its implementations share."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]
Spec = Mapping[str, int]

STATE_FILE_NAME = "client_state.bin"
CHECKPOINT_FORMAT = 1


class ClientStateStore:
    """State by client id: the interface the runtime and the runner use.

    ``get`` returns None for a client that has no state yet, else a fresh dict the caller
    may modify. ``put`` validates the state against the spec (ValueError naming the client,
    the tensor and the expected size) and stamps it with the current round. The round
    methods default to no-ops so that a transient view (a worker's box of shipped states)
    only needs ``get`` and ``put``.
    """

    def get(self, client_id: int) -> Tensors | None:
        raise NotImplementedError

    def put(self, client_id: int, state: Tensors) -> None:
        raise NotImplementedError

    def begin_round(self, round: int) -> None:
        """Puts from now on are stamped with ``round`` (> the committed round)."""

    def commit(self, round: int) -> None:
        """Everything put up to and including ``round`` becomes durable."""

    def flush(self) -> None:
        """Make this handle's puts durable (a no-op where commit already does it)."""

    def checkpoint_state(self) -> dict[str, Any]:
        """What goes into the checkpoint: enough for :meth:`restore` to roll back to the
        last committed round."""
        raise NotImplementedError

    def restore(self, checkpoint_state: Mapping[str, Any]) -> None:
        """Roll back to the committed round of ``checkpoint_state``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release files and memory; safe to call twice."""

    def __enter__(self) -> ClientStateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- validation


def _check_spec(spec: Spec) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, size in spec.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"client state spec: tensor names must be non-empty strings: {name!r}")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise ValueError(
                f"client state spec: tensor {name!r} has size {size!r}, expected an int >= 0"
            )
        out[name] = int(size)
    return out


def _spec_list(spec: Mapping[str, int]) -> list[list[Any]]:
    return [[name, size] for name, size in spec.items()]


def _spec_from(value: Any) -> dict[str, int]:
    """A spec from a checkpoint (list of [name, size]) or a mapping."""
    if isinstance(value, Mapping):
        return _check_spec(value)
    return _check_spec({str(n): int(s) for n, s in value})


def _client_index(client_id: int, num_clients: int | None) -> int:
    try:
        cid = operator.index(client_id)
    except TypeError:
        raise ValueError(f"client id {client_id!r} is not an integer") from None
    if cid < 0 or (num_clients is not None and cid >= num_clients):
        bound = f"[0, {num_clients})" if num_clients is not None else ">= 0"
        raise ValueError(f"client id {cid} is out of range {bound}")
    return cid


def _flat_tensors(
    spec: Mapping[str, int], client_id: int, state: Mapping[str, torch.Tensor]
) -> list[torch.Tensor]:
    """The tensors of ``state`` in spec order, as contiguous CPU float32 vectors (no copy
    when they already are); ValueError naming the client and tensor if they do not match."""
    if not isinstance(state, Mapping):
        raise ValueError(f"client {client_id}: state must be a dict of tensors, not {type(state)}")
    missing = [n for n in spec if n not in state]
    extra = sorted(str(n) for n in state if n not in spec)
    if missing or extra:
        raise ValueError(
            f"client {client_id}: state tensors {sorted(map(str, state))} do not match the "
            f"spec {dict(spec)} (missing {missing}, unexpected {extra})"
        )
    out = []
    for name, size in spec.items():
        t = state[name]
        expected = f"expected a flat float32 vector of {size} elements"
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"client {client_id}: state {name!r} is a {type(t)}; {expected}")
        if t.dtype != torch.float32:
            raise ValueError(f"client {client_id}: state {name!r} has dtype {t.dtype}; {expected}")
        if t.dim() != 1 or t.numel() != size:
            raise ValueError(
                f"client {client_id}: state {name!r} has shape {tuple(t.shape)}; {expected}"
            )
        out.append(t.detach().to("cpu").contiguous())
    return out


def _infer_spec(client_id: int, state: Mapping[str, Any]) -> dict[str, int]:
    """The spec of a store made without one, from its first state."""
    if not isinstance(state, Mapping) or not all(
        isinstance(t, torch.Tensor) for t in state.values()
    ):
        raise ValueError(f"client {client_id}: state must be a dict of tensors")
    return _check_spec({k: t.numel() for k, t in state.items()})


def _check_kind(checkpoint_state: Mapping[str, Any], kind: str) -> None:
    got = checkpoint_state.get("kind")
    if got != kind:
        raise ValueError(f"checkpoint client state is of a {got!r} store, not a {kind!r} one")
    fmt = checkpoint_state.get("format")
    if fmt != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint client state format {fmt!r} is not {CHECKPOINT_FORMAT}")


class _Rounds:
    """The round bookkeeping both stores share: committed round C, current round R > C."""

    def __init__(self) -> None:
        self.committed = 0
        self.current = 1

    def begin(self, round: int) -> None:
        r = operator.index(round)
        if r <= self.committed:
            raise ValueError(f"begin_round({r}): round {self.committed} is already committed")
        if r < self.current:
            raise ValueError(f"begin_round({r}): the store is already at round {self.current}")
        self.current = r

    def commit(self, round: int) -> None:
        r = operator.index(round)
        if r < self.committed:
            raise ValueError(f"commit({r}): round {self.committed} is already committed")
        self.committed = r
        self.current = max(self.current, r + 1)


# --------------------------------------------------------------------------- in memory
