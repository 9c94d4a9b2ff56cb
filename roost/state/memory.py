"""InMemoryStateStore: client states kept in this process, committed and pending."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from roost.state.base import (
    CHECKPOINT_FORMAT,
    ClientStateStore,
    Spec,
    Tensors,
    _check_kind,
    _check_spec,
    _client_index,
    _flat_tensors,
    _infer_spec,
    _Rounds,
    _spec_from,
    _spec_list,
)


class InMemoryStateStore(ClientStateStore):
    """States in this process's memory: committed ones, and the pending ones put since the
    last commit (so that :meth:`restore` can drop them).

    ``spec`` may be omitted: the first put (or restore) then fixes it. ``get`` returns
    clones; the store keeps its own copies of what is put.
    """

    def __init__(self, spec: Spec | None = None, num_clients: int | None = None) -> None:
        self.spec: dict[str, int] | None = _check_spec(spec) if spec is not None else None
        self.num_clients = num_clients
        self._committed: dict[int, Tensors] = {}
        self._pending: dict[int, tuple[int, Tensors]] = {}
        self._rounds = _Rounds()

    @property
    def committed_round(self) -> int:
        return self._rounds.committed

    @property
    def current_round(self) -> int:
        return self._rounds.current

    def _latest(self, cid: int) -> Tensors | None:
        pending = self._pending.get(cid)
        return pending[1] if pending is not None else self._committed.get(cid)

    def get(self, client_id: int) -> Tensors | None:
        state = self._latest(_client_index(client_id, self.num_clients))
        return None if state is None else {k: v.clone() for k, v in state.items()}

    def put(self, client_id: int, state: Mapping[str, torch.Tensor]) -> None:
        cid = _client_index(client_id, self.num_clients)
        if self.spec is None:
            self.spec = _infer_spec(cid, state)
        tensors = _flat_tensors(self.spec, cid, state)
        copies = {n: t.clone() for n, t in zip(self.spec, tensors, strict=True)}
        self._pending[cid] = (self._rounds.current, copies)

    def begin_round(self, round: int) -> None:
        self._rounds.begin(round)

    def commit(self, round: int) -> None:
        self._rounds.commit(round)
        done = [cid for cid, (stamp, _) in self._pending.items() if stamp <= round]
        for cid in done:
            self._committed[cid] = self._pending.pop(cid)[1]

    def checkpoint_state(self) -> dict[str, Any]:
        """All committed states (the stored tensors themselves: they are never modified)."""
        return {
            "kind": "memory",
            "format": CHECKPOINT_FORMAT,
            "spec": _spec_list(self.spec) if self.spec is not None else None,
            "round": self._rounds.committed,
            "states": dict(self._committed),
        }

    def restore(self, checkpoint_state: Mapping[str, Any]) -> None:
        _check_kind(checkpoint_state, "memory")
        spec = checkpoint_state["spec"]
        if spec is not None:
            spec = _spec_from(spec)
            if self.spec is not None and spec != self.spec:
                raise ValueError(
                    f"checkpoint client state spec {spec} does not match the store's {self.spec}"
                )
            self.spec = spec
        self._restore_states(checkpoint_state["states"], int(checkpoint_state["round"]))

    def _restore_states(self, states: Mapping[Any, Any], round: int) -> None:
        committed: dict[int, Tensors] = {}
        for key, state in states.items():
            cid = _client_index(key, self.num_clients)
            if self.spec is None:
                self.spec = _infer_spec(cid, state)
            tensors = _flat_tensors(self.spec, cid, state)
            committed[cid] = dict(zip(self.spec, tensors, strict=True))
        self._committed, self._pending = committed, {}
        self._rounds = _Rounds()
        self._rounds.commit(round)

    def close(self) -> None:
        self._committed, self._pending = {}, {}

    # ---- accounting and inspection
    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held (committed and pending states)."""
        held = [*self._committed.values(), *(s for _, s in self._pending.values())]
        return sum(t.nbytes for state in held for t in state.values())

    def __len__(self) -> int:
        return len({*self._committed, *self._pending})


# --------------------------------------------------------------------------- on disk
#
# File layout (little- or big-endian as the machine that made it; recorded and checked):
#
#   [0, 64 KiB)        file header: magic b"ROOSTST\x01", u32 length, JSON {format, spec,
#                      num_clients, byteorder, copy_stride, data_offset, payload_nbytes}
#   [64 KiB, 1 MiB)    control block (see _Control): current session, committed round,
#                      current round, lineage; CRC32-protected; rewritten by the owner
#   [1 MiB, ...)       num_clients slots of two copies each; copy j of client i at
#                      data_offset + (2 i + j) * copy_stride, copy_stride = 64 + payload
#                      rounded up to 4 KiB, so that the copies never share a page
#
# A copy: a 64-byte header (magic b"ROOSTCP\x01", u64 session, i64 round, i64 client id,
# u64 payload bytes, u32 CRC32 of the header's first 40 bytes and the payload) followed by
# the payload: the spec's tensors concatenated in spec order, float32.
