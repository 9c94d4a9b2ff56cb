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

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from roost.algorithms.base import ClientContext, ClientOptimConfig
from roost.data.base import ClientData
from roost.params import FlatModel

__all__ = ["Backward", "LocalTrainResult", "SGDStepper", "local_sgd", "minibatches", "num_steps"]

GradCorrection = Callable[[torch.Tensor, torch.Tensor], None]
Backward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x, y) -> loss``: fills the model's gradients for a minibatch and returns its loss
(detached); the default is the whole model's cross-entropy, ``F.cross_entropy(f(x), y)``."""


@dataclass
class LocalTrainResult:
    steps: int
    mean_loss: float


def minibatches(
    ctx: ClientContext, data: ClientData, cfg: ClientOptimConfig
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The task's minibatches: ``E`` epochs of batches of ``B`` (the last one of an epoch
    possibly short), each epoch reshuffled with the task's generator unless
    ``shuffle=False``. A procedure may stop consuming it (at a request) and go on later."""
    n, bs = len(data), cfg.batch_size
    for _ in range(cfg.local_epochs):
        if cfg.shuffle:
            order = torch.randperm(n, generator=ctx.generator)
            xs, ys = data.x[order], data.y[order]
        else:
            xs, ys = data.x, data.y
        for start in range(0, n, bs):
            yield xs[start : start + bs], ys[start : start + bs]


def num_steps(num_examples: int, cfg: ClientOptimConfig) -> int:
    """Local steps of one task: ``E * ceil(n / B)``."""
    return cfg.local_epochs * math.ceil(num_examples / cfg.batch_size)


class SGDStepper:
    """One SGD step at a time on the resident model (the rule of the module docstring);
    keeps the step count and the summed loss. ``momentum_buffer``: a heavy-ball buffer
    ``b`` carried from the client's previous task, updated in place from the first step
    (``b ← ρ b + g``), for methods whose devices keep their optimiser across rounds."""

    def __init__(
        self,
        model: FlatModel,
        cfg: ClientOptimConfig,
        correction: GradCorrection | None = None,
        backward: Backward | None = None,
        momentum_buffer: torch.Tensor | None = None,
    ) -> None:
        self.model, self.cfg, self.correction = model, cfg, correction
        self.backward = backward
        # a buffer carried from an earlier task goes on (b <- ρ b + g from the first step)
        self.resumed = momentum_buffer is not None and bool(cfg.momentum)
        if self.resumed:
            self.buf: torch.Tensor | None = momentum_buffer
        else:
            self.buf = model.scratch("momentum") if cfg.momentum else None
        self.loss_sum = torch.zeros((), device=model.params.device)
        self.steps = 0
        model.train_mode()

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """One minibatch: :meth:`begin`, the loss's backward, :meth:`finish`."""
        self.begin()
        if self.backward is None:
            loss = F.cross_entropy(self.model.module(xb), yb)
            loss.backward()
        else:
            loss = self.backward(xb, yb)
        self.finish(loss)

    def begin(self) -> None:
        """Zero the gradients before a step's backward passes."""
        self.model.grads.zero_()

    def finish(self, loss: torch.Tensor) -> None:
        """Apply the step's rule to the gradients accumulated since :meth:`begin`; ``loss``
        is the step's (for the mean loss). The rule is elementwise (so is the correction of
        every method that splits the model: it has none), so stepping two parts of a
        model separately, a split model's device and server, gives each entry the bits
        stepping the whole gives it."""
        model, cfg = self.model, self.cfg
        params, grads = model.params, model.grads
        if cfg.weight_decay:
            grads.add_(params, alpha=cfg.weight_decay)
        if self.correction is not None:
            self.correction(params, grads)
        step = grads
        if self.buf is not None:
            if self.steps == 0 and not self.resumed:
                self.buf.copy_(grads)
            else:
                self.buf.mul_(cfg.momentum).add_(grads)
            step = self.buf
        p = model.trainable  # buffers (BatchNorm statistics) change in forward passes only
        if p == params.numel():
            params.add_(step, alpha=-cfg.lr)
        else:
            params[:p].add_(step[:p], alpha=-cfg.lr)
        self.loss_sum += loss.detach()
        self.steps += 1

    def result(self) -> LocalTrainResult:
        return LocalTrainResult(self.steps, float(self.loss_sum) / max(self.steps, 1))


def local_sgd(
    ctx: ClientContext,
    model: FlatModel,
    data: ClientData,
    cfg: ClientOptimConfig,
    correction: GradCorrection | None = None,
) -> LocalTrainResult:
    """Train ``model`` in place on ``data``; return the step count and the mean batch loss."""
    stepper = SGDStepper(model, cfg, correction)
    for xb, yb in minibatches(ctx, data, cfg):
        stepper.step(xb, yb)
    return stepper.result()
