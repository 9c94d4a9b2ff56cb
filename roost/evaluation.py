"""Evaluation of a model on a held-out split: mean cross-entropy and top-1 accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from roost.data.base import ClientData

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(module: nn.Module, data: ClientData, batch_size: int = 500) -> tuple[float, float]:
    """Return ``(mean loss, accuracy)`` of ``module`` over ``data`` (example-weighted).

    Batches bound the memory of evaluation: a CNN's activations on thousands of examples
    at once would otherwise set the run's peak memory. Each batch is moved to the module's
    device, so ``data`` may stay in host memory.
    """
    module.eval()
    device = next(module.parameters()).device
    n = len(data)
    if n == 0:
        raise ValueError("cannot evaluate on an empty split")
    loss_sum = 0.0
    correct = 0
    for start in range(0, n, batch_size):
        xb = data.x[start : start + batch_size].to(device)
        yb = data.y[start : start + batch_size].to(device)
        logits = module(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(dim=1) == yb).sum())
    return loss_sum / n, correct / n
