"""One split-learning iteration on a batch, over ``N`` micro-batches (PiPar's order).

With split point ``P`` and ``N`` micro-batches of a batch of ``B`` (ALGORITHMS.md §2.1,
PiPar's ``node/client.py`` and ``node/server_replica.py``):

1. the batch is cut into ``N`` micro-batches of ``m = ⌊B/N⌋`` examples (the remainder is
   dropped); the device computes ``a_j = f_c(x_j)`` for ``j = 1 .. N`` (keeping each graph)
   and sends each ``(a_j, y_j)`` (:class:`~roost.split.messages.Activations`);
2. the server, for each ``a_j`` in order: ``L_j = CE(f_s(a_j), y_j) / N``, backward
   (its gradients accumulate), and sends back ``g_j = ∂L_j/∂a_j``
   (:class:`~roost.split.messages.Gradient`);
3. the device back-propagates each ``g_j`` through ``a_j``, in order (its gradients
   accumulate). A device part without parameters (a cut after a flatten) has nothing to
   train: no gradient is sent back.

The gradients left in both parts' ``.grad`` are those of ``L = Σ_j L_j``, the mean of the
micro-batches' mean losses, which for ``N m = B`` is the batch's mean cross-entropy: one
iteration with ``N = 1`` and float32 messages computes exactly the gradients of the whole
model on the batch; with ``N > 1`` the same up to the order of the float32 sums (and
BatchNorm's statistics, which are per micro-batch). The caller steps the optimisers (and
zeroes the gradients first): SplitFed v1 and PiPar step both parts once per iteration.

The two halves are separate: :func:`device_iteration` is the device's, a generator that
yields a :class:`~roost.split.messages.SplitExchange` per micro-batch and receives the
server's :class:`~roost.split.messages.SplitReply`; :class:`ServerReplica` is the
server's, answering them. :func:`split_iteration` runs both in one process (simulation);
a deployment puts the network between them. The device forwards micro-batch ``j + 1``
after the server answered ``j``: each part computes the same operations in the same
order as when all forwards come first, so the bits are the same (a model whose parts
draw random numbers, dropout, draws them in another order).

The micro-batches are computed one after another here; *when* each would run on the
device, the links and the server is the engine's and the system model's business.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from roost.split.bottleneck import KeptActivations
from roost.split.messages import Activations, Gradient, SplitExchange, SplitReply, label_dtype

__all__ = [
    "IterationResult",
    "ServerReplica",
    "Stepper",
    "device_iteration",
    "device_trains",
    "drive_iteration",
    "micro_batch_size",
    "split_iteration",
]


@dataclass(frozen=True)
class IterationResult:
    """What one iteration computed and sent: ``loss`` is ``Σ_j L_j``; ``uplink_bytes`` and
    ``downlink_bytes`` are each micro-batch's message sizes, in order."""

    loss: float
    examples: int
    uplink_bytes: tuple[int, ...]
    downlink_bytes: tuple[int, ...]


def micro_batch_size(batch: int, micro_batches: int) -> int:
    """``⌊B/N⌋``; ValueError unless ``1 <= N <= B``."""
    if isinstance(micro_batches, bool) or not 1 <= micro_batches <= batch:
        raise ValueError(
            f"micro_batches={micro_batches!r}: a batch of {batch} examples splits into "
            f"1 .. {batch} micro-batches"
        )
    return batch // micro_batches


def device_iteration(
    device: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    micro_batches: int = 1,
    *,
    num_classes: int,
    wire: torch.dtype = torch.float32,
    iteration: int = 0,
) -> Generator[SplitExchange, SplitReply, IterationResult]:
    """The device's steps 1 and 3 of the module docstring: yields each micro-batch's
    activations, receives the server's reply, then back-propagates the gradients in
    order (into the device part's ``.grad``)."""
    n = micro_batches
    m = micro_batch_size(len(x), n)
    outputs: list[torch.Tensor] = []
    replies: list[SplitReply] = []
    up: list[int] = []
    for j in range(n):
        a = device(x[j * m : (j + 1) * m])
        message = SplitExchange(
            Activations.of(a, y[j * m : (j + 1) * m], wire, num_classes), iteration, j, n
        )
        reply = yield message
        outputs.append(a)
        replies.append(reply)
        up.append(message.nbytes)
    for a, reply in zip(outputs, replies, strict=True):
        if reply.gradient is not None:
            if not isinstance(reply.gradient, Gradient):
                raise TypeError("a micro-batch of every channel gets their whole gradient")
            a.backward(reply.gradient.received())
    return IterationResult(
        float(torch.stack([r.loss for r in replies]).sum()),
        n * m,
        tuple(up),
        tuple(r.gradient.nbytes for r in replies if r.gradient is not None),
    )


class Stepper(Protocol):
    """An optimiser stepped once per iteration: ``begin`` zeroes the gradients, ``finish``
    applies the step (:class:`~roost.algorithms.local_sgd.SGDStepper`)."""

    def begin(self) -> None: ...

    def finish(self, loss: torch.Tensor) -> None: ...


class ServerReplica:
    """The server's step 2 for one device's task: answers each
    :class:`~roost.split.messages.SplitExchange` with ``L_j``'s gradient at the cut.

    ``returns_gradient``: False when the device part has nothing to train (no gradient
    goes back). ``stepper``: when given, the replica steps its own optimiser, beginning
    at an iteration's first micro-batch and finishing after its last (a deployed server
    part); without one the gradients accumulate for the caller to step (in simulation,
    one optimiser steps the whole model). ``batch_size`` and ``activation_shape`` (one
    example's activations at the cut), when given, bound what is accepted. ``reply``
    makes the gradient message from the activations message and the gradient at the cut
    (default: a :class:`~roost.split.messages.Gradient` in the activations' dtype;
    deprune's sends the kept channels' alone). A prune-mode message
    (:class:`~roost.split.bottleneck.KeptActivations`) must keep exactly ``budget``
    channels (when given), ids increasing below the cut's channel count.

    A message is checked before anything is computed (ValueError naming what was wrong):
    the micro-batches of a task come in order (iteration ``i``'s ``0 .. N-1``, then
    ``i + 1``'s), ``N`` stays the same within an iteration and ``N m`` is at most the
    batch, the labels are ``m`` class ids below ``num_classes`` in
    :func:`~roost.split.messages.label_dtype`, and the activations are ``m`` examples of
    ``activation_shape`` in a floating dtype."""

    def __init__(
        self,
        server: nn.Module,
        *,
        num_classes: int,
        returns_gradient: bool = True,
        stepper: Stepper | None = None,
        batch_size: int | None = None,
        activation_shape: tuple[int, ...] | None = None,
        reply: Callable[[Any, torch.Tensor], Any] | None = None,
        budget: int | None = None,
        validate: bool = True,
    ) -> None:
        self.server = server
        self.validate = validate
        self.reply = reply or _same_dtype_gradient
        self.budget = budget
        self.num_classes = num_classes
        self.returns_gradient = returns_gradient
        self.stepper = stepper
        self.batch_size = batch_size
        self.activation_shape = activation_shape
        self.iteration = 0  # the iteration of the next micro-batch due
        self.micro_batch = 0  # and its index in it
        self.micro_batches = 0  # N of the iteration in progress (0: none is)
        self.answered = 0
        self._losses: list[torch.Tensor] = []

    def expects(self, iteration: int, micro_batch: int) -> bool:
        """Whether ``(iteration, micro_batch)`` is the next micro-batch in order."""
        return (iteration, micro_batch) == (self.iteration, self.micro_batch)

    def check(self, message: SplitExchange) -> None:
        """ValueError unless ``message`` is acceptable now (class docstring)."""
        i, j, n = message.iteration, message.micro_batch, message.micro_batches
        if not self.expects(i, j):
            raise ValueError(
                f"got iteration {i}'s micro-batch {j}; expected iteration "
                f"{self.iteration}'s micro-batch {self.micro_batch}"
            )
        if self.micro_batches and n != self.micro_batches:
            raise ValueError(f"iteration {i} has {self.micro_batches} micro-batches, not {n}")
        m = message.examples
        values, labels = message.activations.values, message.activations.labels
        if not (0 <= j < n) or m < 1 or (self.batch_size is not None and n * m > self.batch_size):
            top = f" with N m <= the batch size {self.batch_size}" if self.batch_size else ""
            raise ValueError(
                f"micro-batch {j} of {n} with {m} examples; allowed: 0 <= j < N, m >= 1{top}"
            )
        if labels.shape != (m,) or labels.dtype != label_dtype(self.num_classes):
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} in {labels.dtype}; expected ({m},) in "
                f"{label_dtype(self.num_classes)}"
            )
        ids = labels.to(torch.int64)
        if int(ids.max()) >= self.num_classes or int(ids.min()) < 0:
            raise ValueError(f"a label is not in 0 .. {self.num_classes - 1} (the classes)")
        shape = self.activation_shape
        want_shape = (m, *shape) if shape is not None else None
        if isinstance(message.activations, KeptActivations):
            self._check_kept(message.activations)
            b = len(message.activations.kept.indices)
            want_shape = (m, b, *shape[1:]) if shape is not None else None
        elif self.budget:
            raise ValueError(f"this task sends {self.budget} kept channels, not all of them")
        if not values.is_floating_point() or (
            want_shape is not None and tuple(values.shape) != want_shape
        ):
            raise ValueError(
                f"activations of shape {tuple(values.shape)} in {values.dtype}; expected "
                f"{want_shape or 'a floating tensor'} in a floating dtype"
            )

    def _check_kept(self, kept: KeptActivations) -> None:
        ids = kept.kept.indices.to(torch.int64)
        channels = self.activation_shape[0] if self.activation_shape else kept.kept.num_channels
        if self.budget is not None and len(ids) != self.budget:
            raise ValueError(f"{len(ids)} kept channels; this task keeps {self.budget}")
        if len(ids) and (
            bool((ids[1:] <= ids[:-1]).any()) or int(ids[0]) < 0 or int(ids[-1]) >= channels
        ):
            raise ValueError(f"kept channel ids must increase within 0 .. {channels - 1}")

    def answer(self, message: SplitExchange) -> SplitReply:
        """Check ``message`` (unless ``validate`` is off: a replica in the device's own
        process, fed by its own procedure), forward and back-propagate its micro-batch,
        and answer."""
        if self.validate:
            self.check(message)
        i, j, n = message.iteration, message.micro_batch, message.micro_batches
        if j == 0 and self.stepper is not None:
            self.stepper.begin()
            self._losses = []
        leaf, labels = message.activations.received()
        loss = F.cross_entropy(self.server(leaf), labels) / n
        loss.backward()
        assert leaf.grad is not None
        gradient = self.reply(message.activations, leaf.grad) if self.returns_gradient else None
        self._losses.append(loss.detach())
        self.answered += 1
        if j + 1 < n:
            self.iteration, self.micro_batch, self.micro_batches = i, j + 1, n
        else:  # the iteration is over: the next one's first micro-batch is due
            self.iteration, self.micro_batch, self.micro_batches = i + 1, 0, 0
            if self.stepper is not None:
                self.stepper.finish(torch.stack(self._losses).sum())
            self._losses = []
        return SplitReply(loss.detach(), gradient)


def device_trains(device: nn.Module) -> bool:
    """Whether a device part has parameters to train (else no gradient goes back)."""
    return any(p.requires_grad for p in device.parameters())


def _same_dtype_gradient(activations: Any, grad: torch.Tensor) -> Gradient:
    """The default reply: the gradient in the activations' own (wire) dtype."""
    return Gradient.of(grad, activations.values.dtype)


def drive_iteration(
    iteration: Generator[SplitExchange, SplitReply, IterationResult],
    answer: Callable[[SplitExchange], SplitReply],
) -> IterationResult:
    """Run a device iteration to its end, each message answered by ``answer``."""
    try:
        message = next(iteration)
        while True:
            message = iteration.send(answer(message))
    except StopIteration as stop:
        result: IterationResult = stop.value
        return result


def split_iteration(
    device: nn.Module,
    server: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    micro_batches: int = 1,
    *,
    num_classes: int,
    wire: torch.dtype = torch.float32,
) -> IterationResult:
    """Steps 1-3 of the module docstring in one process; accumulates into both parts'
    ``.grad``."""
    replica = ServerReplica(
        server, num_classes=num_classes, returns_gradient=device_trains(device), validate=False
    )
    steps = device_iteration(device, x, y, micro_batches, num_classes=num_classes, wire=wire)
    return drive_iteration(steps, replica.answer)
