"""Client state stores: per-client tensors kept between the rounds a client takes part in.

Stateful algorithms (SCAFFOLD's control variate, FedDyn's gradient, Ditto's personal
model) declare a state spec (tensor name -> number of float32 elements, see
``Algorithm.client_state_spec``); the runtime loads a client's state before its task
(:meth:`~ClientStateStore.get`, None while the client has none) and writes the new state
back after it (:meth:`~ClientStateStore.put`).

Rounds and rollback. Every put is stamped with the store's current round
(:meth:`~ClientStateStore.begin_round`). :meth:`~ClientStateStore.commit` makes every put
up to that round durable; the runner calls it right before it writes the round's
checkpoint, and puts the small dict of :meth:`~ClientStateStore.checkpoint_state` in the
checkpoint. On resume, :meth:`~ClientStateStore.restore` rolls the store back to the
checkpoint's round: puts made after it (by the run that was killed) are never seen again.
The order for a run is::

    store = make_state_store(kind, spec, num_clients, run_dir)           # new run
    store = make_state_store(kind, spec, num_clients, run_dir,
                             checkpoint=ckpt["client_state"])            # resume
    for r in rounds:
        store.begin_round(r)          # before the round's tasks
        ...                           # tasks: store.get / store.put (any process, disk)
        store.commit(r)               # after all of the round's puts, before the checkpoint
        save_checkpoint({..., "client_state": store.checkpoint_state()})
    store.close()

Two stores:

* :class:`InMemoryStateStore` keeps the states in this process (its checkpoint state holds
  them all), memory O(clients with state).
* :class:`DiskStateStore` keeps them in one sparse file of fixed-size, double-buffered
  slots; its checkpoint state is a few hundred bytes and resident memory stays O(one state)
  whatever the number of clients. Worker processes open the same file
  (:meth:`DiskStateStore.share` / :func:`open_shared_store`) and read and write the states
  of the clients they train themselves.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from roost.state.base import (
    STATE_FILE_NAME,
    ClientStateStore,
    Spec,
    _check_spec,
    _spec_from,
)
from roost.state.disk import DiskStateStore, _close_file
from roost.state.memory import InMemoryStateStore

__all__ = [
    "STATE_FILE_NAME",
    "ClientStateStore",
    "DiskStateStore",
    "InMemoryStateStore",
    "make_state_store",
    "open_shared_store",
]


def open_shared_store(info: Mapping[str, Any]) -> DiskStateStore:
    """Open, in a worker process, the store another process described with ``share()``."""
    if info.get("kind") != "disk":
        raise ValueError(f"cannot open a {info.get('kind')!r} client state store from a share")
    return DiskStateStore(info["path"], _spec_from(info["spec"]), int(info["num_clients"]))


def make_state_store(
    kind: str,
    spec: Spec,
    num_clients: int,
    directory: str | os.PathLike[str] | None = None,
    *,
    checkpoint: Mapping[str, Any] | None = None,
) -> ClientStateStore:
    """The store of a run: ``kind`` "memory" or "disk" (a file ``client_state.bin`` in
    ``directory``; a temporary directory, removed on close, when None).

    With ``checkpoint`` (the checkpoint's ``checkpoint_state()``), the existing store is
    reopened and rolled back to it (resume); without, a new one is made. An empty spec
    (a stateless algorithm) always gets an in-memory store: there is nothing to keep.
    """
    if kind not in ("memory", "disk"):
        raise ValueError(f"client state store kind {kind!r}: expected 'memory' or 'disk'")
    spec = _check_spec(spec)
    store: ClientStateStore
    if kind == "memory" or not spec:
        store = InMemoryStateStore(spec, num_clients)
        if checkpoint is not None:
            store.restore(checkpoint)
        return store
    if checkpoint is not None:
        if directory is None:
            raise ValueError("resuming a disk client state store needs its directory")
        name = str(checkpoint.get("file", STATE_FILE_NAME))
        store = DiskStateStore(Path(directory) / name, spec, num_clients)
        store.restore(checkpoint)
        return store
    remove = None
    if directory is None:
        directory = remove = tempfile.mkdtemp(prefix="roost-state-")
    try:
        disk = DiskStateStore(Path(directory) / STATE_FILE_NAME, spec, num_clients, create=True)
    except BaseException:
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)
        raise
    if remove is not None:
        disk._finalizer.detach()
        disk._finalizer = weakref.finalize(disk, _close_file, disk._fd, remove)
    return disk
