"""Tasks that run on real nodes: what the engine asks of a deployment, and what it hears.

In simulation a task's arrival (or dropout) is known at dispatch, from the system model,
and the runtime computes its result. In deployment the same engine loop runs on a
:class:`~roost.clock.WallClock` and both come from the network: a :class:`RemoteFleet`
sends each launched task to the node of its client, and reports back, from the network's
threads, by posting a :class:`Delivery` and scheduling the task's event at the moment it
was received. The engine applies a delivery on its own thread when it pops that event
(:meth:`~roost.engine.core.Engine.pop_event`), so the policies see exactly what they see
in simulation: an arrival whose result is already computed, or a lost task.

A resumed deployment first replays, from its journal, the events consumed after its
checkpoint (:meth:`RemoteFleet.replay_next`), so the engine re-makes the decisions it made
before the restart; then it goes on live.

A launched task also gets a deadline event (``task_timeout_s`` after dispatch): if no
delivery came by then, the task is lost (a dropout), like a device that went offline.
Whichever of the two events pops second finds the task out of flight and is skipped.

Nothing here imports a transport: :mod:`roost.deploy` implements the protocol over gRPC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from roost.algorithms.base import ClientResult, Payload
from roost.system.model import DeviceProfile, SystemModel, TaskTiming

if TYPE_CHECKING:
    from roost.engine.flight import Flight

__all__ = ["ClientEvaluation", "ConnectedNodes", "Delivery", "RemoteFleet"]


@dataclass(frozen=True)
class Delivery:
    """A task's result as the network delivered it: the client update's own tensors,
    weight and scalars (the engine folds them exactly as the local runtime folds a task),
    the client's metrics (``train_loss`` ...), the seconds the node measured for its
    compute and, when known, the bytes its tensors took on the wire (they replace the
    task's predicted upload size in the run's ``bytes_up``), and the bytes the node was
    sent for it (``download_bytes``: a split-learning task's device part and gradients;
    they replace the predicted download in ``bytes_down``). A task with no delivery by
    its deadline is lost."""

    result: ClientResult
    metrics: dict[str, float]
    compute_s: float = 0.0
    upload_bytes: int | None = None
    download_bytes: int | None = None


@dataclass(frozen=True)
class ClientEvaluation:
    """A client's personal model measured on its node: the mean ``loss`` and the
    ``accuracy`` on its ``examples`` test examples."""

    client_id: int
    loss: float
    accuracy: float
    examples: int


class RemoteFleet(Protocol):
    """The nodes of a deployment, as the engine sees them (see the module docstring).

    The engine calls these on its own thread; implementations post deliveries and schedule
    events from any thread (the clock is thread-safe)."""

    task_timeout_s: float
    """Seconds after dispatch when a task with no delivery is declared lost."""

    def connected(self, num_clients: int) -> np.ndarray:
        """A bool mask over client ids: which clients have a node connected now."""
        ...

    def send(self, flight: Flight, payload: Payload) -> None:
        """Hand a launched task to its client's node (it pulls it when it asks for work)."""
        ...

    def answer(self, key: int, payload: Payload) -> None:
        """Answer the pending mid-task request of task ``key`` with ``payload``."""
        ...

    def cancel(self, key: int) -> None:
        """Task ``key`` no longer counts (its round closed without it, or it was lost):
        tell its node to drop it; a result that still comes is refused."""
        ...

    def take(self, key: int) -> Delivery | None:
        """The delivery posted for task ``key``, removed; None if none was posted."""
        ...

    def replay_next(self) -> tuple[str, int] | None:
        """While a resumed run replays what happened before its restart: the payload of the
        next event the engine consumed then (a refill is taken from the engine's own
        clock); None when there is nothing (more) to replay."""
        ...

    def replaying(self) -> bool:
        """True while the journal is being replayed (no checkpoint is taken then: the
        journal, relative to the checkpoint it follows, is what a restart needs)."""
        ...

    def consumed(self, kind: str, key: int, delivered: bool) -> None:
        """The engine consumed an event (for a task: with a delivery or as a loss)."""
        ...

    def checkpointed(self, step: int, in_flight: list[int]) -> None:
        """A checkpoint of ``step`` is on disk, with the tasks ``in_flight``."""
        ...

    def evaluate_clients(self, initial: Payload) -> list[ClientEvaluation]:
        """Every connected client's personal model measured on its node, on its own test
        split (a client with no state yet: ``initial``'s model); blocks until each has
        answered, left, or timed out. A resumed run replaying gets the measurements made
        before its restart."""
        ...


class ConnectedNodes(SystemModel):
    """The system model of a deployment: a client is available when its node is connected
    (:meth:`RemoteFleet.connected`); nothing is known ahead about durations (a task's
    times are measured when its result arrives), so :meth:`timing` says "unknown"
    (infinite) and the engine waits for the network instead. When no node is connected
    the engine does not poll: the fleet schedules a ``wake`` event when one connects."""

    def __init__(self, fleet: RemoteFleet, num_clients: int) -> None:
        self.fleet = fleet
        self.num_clients = num_clients

    def profile(self, client_id: int) -> DeviceProfile:
        raise NotImplementedError("a deployment measures its devices; it has no profiles")

    def available(self, client_ids: np.ndarray, t: float) -> np.ndarray:
        return self.fleet.connected(self.num_clients)[client_ids]

    def next_available_s(self, client_ids: np.ndarray, t: float) -> float:
        return math.inf

    def timing(
        self, client_id: int, start_s: float, work_examples: int, down_bytes: int, up_bytes: int
    ) -> TaskTiming:
        return TaskTiming(start_s, math.inf, math.inf, math.inf)

    def min_task_time_s(self, work_examples: np.ndarray, down_bytes: int, up_bytes: int) -> float:
        return 0.0
