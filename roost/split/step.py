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

The micro-batches are computed one after another here; *when* each would run on the
device, the links and the server is the engine's and the system model's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from roost.split.messages import Activations, Gradient

__all__ = ["IterationResult", "micro_batch_size", "split_iteration"]


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
    """Steps 1-3 of the module docstring; accumulates into both parts' ``.grad``."""
    n = micro_batches
    m = micro_batch_size(len(x), n)
    outputs: list[torch.Tensor] = []
    sent: list[Activations] = []
    for j in range(n):
        a = device(x[j * m : (j + 1) * m])
        outputs.append(a)
        sent.append(Activations.of(a, y[j * m : (j + 1) * m], wire, num_classes))
    returned: list[Gradient] = []
    losses: list[torch.Tensor] = []
    trains = outputs[0].requires_grad  # False: the device part has nothing to train
    for message in sent:
        leaf, labels = message.received()
        loss = F.cross_entropy(server(leaf), labels) / n
        loss.backward()
        assert leaf.grad is not None
        losses.append(loss.detach())
        if trains:
            returned.append(Gradient.of(leaf.grad, wire))
    for a, g in zip(outputs, returned, strict=False):
        a.backward(g.received())
    return IterationResult(
        float(torch.stack(losses).sum()),
        n * m,
        tuple(s.nbytes for s in sent),
        tuple(g.nbytes for g in returned),
    )
