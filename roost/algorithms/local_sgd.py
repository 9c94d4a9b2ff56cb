"""The local training loop shared by the SGD-family client updates.

One task runs ``E`` epochs of minibatch SGD over the client's examples on the resident
:class:`~roost.params.FlatModel`, in place. With momentum ρ and weight decay λ the step
is PyTorch's ``torch.optim.SGD`` (dampening 0, no Nesterov)::

    g ← ∇L(w) + λ w + correction(w)
    b ← g                  (first step)      b ← ρ b + g   (later steps)
    w ← w − η b

``correction`` adds an algorithm's term to the gradient in place (FedProx's μ(w − w_g),
SCAFFOLD's c − c_k, FedDyn's linear and proximal terms) without another pass over data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from roost.algorithms.base import ClientContext, ClientOptimConfig
from roost.data.base import ClientData
from roost.params import FlatModel

__all__ = ["LocalTrainResult", "local_sgd"]

GradCorrection = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass
class LocalTrainResult:
    steps: int
    mean_loss: float


def local_sgd(
    ctx: ClientContext,
    model: FlatModel,
    data: ClientData,
    cfg: ClientOptimConfig,
    correction: GradCorrection | None = None,
) -> LocalTrainResult:
    """Train ``model`` in place on ``data``; return the step count and the mean batch loss."""
    module = model.module
    module.train()
    params, grads = model.params, model.grads
    n = len(data)
    bs = cfg.batch_size
    lr, wd, rho = cfg.lr, cfg.weight_decay, cfg.momentum
    buf = model.scratch("momentum") if rho else None
    loss_sum = torch.zeros((), device=params.device)
    steps = 0
    for _ in range(cfg.local_epochs):
        if cfg.shuffle:
            order = torch.randperm(n, generator=ctx.generator)
            xs, ys = data.x[order], data.y[order]
        else:
            xs, ys = data.x, data.y
        for start in range(0, n, bs):
            xb, yb = xs[start : start + bs], ys[start : start + bs]
            grads.zero_()
            loss = F.cross_entropy(module(xb), yb)
            loss.backward()
            if wd:
                grads.add_(params, alpha=wd)
            if correction is not None:
                correction(params, grads)
            step = grads
            if buf is not None:
                if steps == 0:
                    buf.copy_(grads)
                else:
                    buf.mul_(rho).add_(grads)
                step = buf
            params.add_(step, alpha=-lr)
            loss_sum += loss.detach()
            steps += 1
    return LocalTrainResult(steps, float(loss_sum) / max(steps, 1))
