"""Flat parameter layout: one contiguous float32 vector per model.

A module's parameters are re-pointed at views of one flat buffer, and their gradients at
views of a second one, so that loading weights, averaging, optimiser steps, checkpoints and
state slots are single contiguous operations with no per-tensor Python loop::

    flat = FlatModel(module)
    flat.load_(global_params)          # one memcpy, the module sees the new weights
    loss.backward()                    # autograd accumulates into flat.grads in place
    flat.params.add_(flat.grads, alpha=-lr)

The layout (names, shapes, offsets) is fixed at construction and identical on every process
that builds the same architecture, which is what lets a worker and the server exchange a
model as a bare tensor.

Floating-point *buffers* (BatchNorm's running mean and variance) are part of the model too:
they follow the parameters in the same flat vector (``layout.trainable`` elements of
parameters, then the buffers), so every payload carries them, every client starts from the
global model's statistics instead of the previous client's, and aggregation averages them
like any other entry (as Flower does with a ``state_dict``). Only the forward pass changes
them: an optimiser step touches the first ``trainable`` elements alone. Integer buffers
(BatchNorm's ``num_batches_tracked``) stay in the module and are not carried.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FlatModel", "ParamLayout", "ParamSlot", "float_buffers"]


@dataclass(frozen=True)
class ParamSlot:
    """Where one named tensor lives inside the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


def float_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's floating-point buffers, in ``named_buffers`` order."""
    return [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]


@dataclass(frozen=True)
class ParamLayout:
    """The fixed mapping between a module's named parameters (then its floating-point
    buffers) and one flat vector; the first ``trainable`` elements are the parameters."""

    slots: tuple[ParamSlot, ...]
    numel: int
    trainable: int = -1

    def __post_init__(self) -> None:
        if self.trainable < 0:
            object.__setattr__(self, "trainable", self.numel)

    @staticmethod
    def of(module: nn.Module) -> ParamLayout:
        slots: list[ParamSlot] = []
        offset = 0
        for name, p in module.named_parameters():
            slots.append(ParamSlot(name, tuple(p.shape), offset, p.numel()))
            offset += p.numel()
        trainable = offset
        for name, b in float_buffers(module):
            slots.append(ParamSlot(name, tuple(b.shape), offset, b.numel()))
            offset += b.numel()
        return ParamLayout(tuple(slots), offset, trainable)

    def flatten_module(self, module: nn.Module) -> torch.Tensor:
        """The module's parameters and floating-point buffers as one new flat vector."""
        return self.flatten({**dict(module.named_parameters()), **dict(float_buffers(module))})

    @property
    def nbytes(self) -> int:
        """Bytes of one float32 copy of the parameters (what a transfer of the model costs)."""
        return 4 * self.numel

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views (no copies) of ``flat`` shaped like the module's tensors."""
        if flat.numel() != self.numel:
            raise ValueError(f"flat vector has {flat.numel()} elements, layout needs {self.numel}")
        return {s.name: flat[s.offset : s.offset + s.numel].view(s.shape) for s in self.slots}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Copy named tensors (e.g. a ``state_dict``) into a new flat float32 vector, with no
        autograd history (copying a module's parameters must not tie the copy to them)."""
        missing = [s.name for s in self.slots if s.name not in tensors]
        if missing:
            raise KeyError(f"tensors are missing parameters {missing}")
        flat = torch.empty(self.numel, dtype=torch.float32)
        for s in self.slots:
            flat[s.offset : s.offset + s.numel].copy_(tensors[s.name].detach().reshape(-1))
        return flat


class FlatModel:
    """A module whose parameters and gradients are views of two flat float32 buffers.

    The module is moved to ``device`` and the buffers live there; :meth:`load_` accepts a
    vector on any device (one copy across).

    ``params`` and ``grads`` stay the same tensors for the life of the object; every
    per-client operation writes into them in place, so training thousands of clients on
    one ``FlatModel`` allocates nothing per client.
    """

    def __init__(self, module: nn.Module, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.layout = ParamLayout.of(module)
        self.params = torch.empty(self.layout.numel, dtype=torch.float32, device=self.device)
        self.grads = torch.zeros(self.layout.numel, dtype=torch.float32, device=self.device)
        self._scratch: dict[str, torch.Tensor] = {}
        self._submodules = tuple(self.module.modules())
        param_views = self.layout.views(self.params)
        grad_views = self.layout.views(self.grads)
        with torch.no_grad():
            for name, p in module.named_parameters():
                param_views[name].copy_(p.detach())
                p.data = param_views[name]
                p.grad = grad_views[name]
            for name, b in float_buffers(self.module):  # BatchNorm statistics: views too
                owner_name, _, attr = name.rpartition(".")
                owner = self.module.get_submodule(owner_name) if owner_name else self.module
                param_views[name].copy_(b.detach())
                owner._buffers[attr] = param_views[name]

    def train_mode(self) -> None:
        """Put the module in training mode (dropout on, BatchNorm updating its statistics).

        ``module.train()`` walks the whole tree and sets every ``training`` flag through
        ``nn.Module.__setattr__``, about 30 µs for a five-layer MLP, once per task; when
        every flag is already set (no evaluation since the last task) it is skipped."""
        if not all(m.training for m in self._submodules):
            self.module.train()

    @property
    def trainable(self) -> int:
        """How many leading elements of :attr:`params` are parameters (the rest are
        buffers, which no optimiser step touches)."""
        return self.layout.trainable

    @property
    def numel(self) -> int:
        return self.layout.numel

    def scratch(self, name: str) -> torch.Tensor:
        """A flat float32 buffer of the model's size, allocated on first use and then
        reused by every later task (momentum, proximal terms): its contents are left over
        from the previous user, so initialise it before reading."""
        buf = self._scratch.get(name)
        if buf is None:
            buf = self._scratch[name] = torch.empty(
                self.layout.numel, dtype=torch.float32, device=self.device
            )
        return buf

    def save_resident(self) -> dict[str, torch.Tensor]:
        """Copies of what a task has in the resident model: its parameters and every
        scratch buffer (momentum, proximal terms), so that a suspended task can give the
        model to other tasks and later :meth:`restore_resident` to continue."""
        saved = {f"scratch/{k}": v.clone() for k, v in self._scratch.items()}
        saved["params"] = self.params.clone()
        return saved

    def restore_resident(self, saved: dict[str, torch.Tensor]) -> None:
        self.params.copy_(saved["params"])
        for key, value in saved.items():
            if key.startswith("scratch/"):
                self.scratch(key[len("scratch/") :]).copy_(value)

    def load_(self, flat: torch.Tensor) -> None:
        """Overwrite the weights in place with ``flat`` (one contiguous copy).

        ``flat`` must not be :attr:`params` itself: client updates keep reading the payload
        (FedProx's anchor, SCAFFOLD's x) while they train the resident model in place.
        """
        if flat.device == self.params.device and flat.data_ptr() == self.params.data_ptr():
            raise ValueError(
                "the payload aliases the resident model; pass the global "
                "parameters as a separate tensor"
            )
        self.params.copy_(flat.detach())

    def zero_grad_(self) -> None:
        self.grads.zero_()

    def check_grads_bound(self) -> bool:
        """True while every parameter's ``.grad`` is still a view of :attr:`grads`.

        Autograd accumulates into an existing ``.grad`` in place, so the binding holds as
        long as nobody sets ``.grad = None`` (``optimizer.zero_grad()`` would).
        """
        base = self.grads.data_ptr()
        end = base + 4 * self.layout.numel
        for p in self.module.parameters():
            if p.grad is None or not (base <= p.grad.data_ptr() < end):
                return False
        return True
