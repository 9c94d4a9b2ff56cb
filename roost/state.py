"""Client state stores: per-client tensors kept between the rounds a client takes part in.

Stateful algorithms (SCAFFOLD's control variate, FedDyn's gradient, Ditto's personal
model) declare a state size; the runtime loads a client's state before its task and writes
the new state back after. The in-memory store keeps only the clients that have state.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["ClientStateStore", "InMemoryStateStore"]

Tensors = dict[str, torch.Tensor]


class ClientStateStore:
    """State by client id. ``get`` returns None for a client that has none yet."""

    def get(self, client_id: int) -> Tensors | None:
        raise NotImplementedError

    def put(self, client_id: int, state: Tensors) -> None:
        raise NotImplementedError

    def items(self) -> Iterator[tuple[int, Tensors]]:
        raise NotImplementedError

    def state_dict(self) -> dict[int, Tensors]:
        return {cid: {k: v.clone() for k, v in s.items()} for cid, s in self.items()}

    def load_state_dict(self, state: dict[int, Tensors]) -> None:
        for cid, s in state.items():
            self.put(int(cid), s)


class InMemoryStateStore(ClientStateStore):
    def __init__(self) -> None:
        self._states: dict[int, Tensors] = {}

    def get(self, client_id: int) -> Tensors | None:
        return self._states.get(client_id)

    def put(self, client_id: int, state: Tensors) -> None:
        self._states[client_id] = {k: v.detach().clone() for k, v in state.items()}

    def items(self) -> Iterator[tuple[int, Tensors]]:
        return iter(sorted(self._states.items()))

    def __len__(self) -> int:
        return len(self._states)
