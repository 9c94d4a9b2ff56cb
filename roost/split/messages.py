"""The two messages of split learning at the cut, with the bytes they really take.

Uplink, the device's *activations* at the cut ("smashed data") with the labels of the
micro-batch they came from; downlink, the server's *gradient* of the loss with respect to
those activations. Each travels in a wire dtype: ``float32``, or ``float16`` /
``bfloat16`` at half the bytes (the receiver computes in float32 from the rounded values,
as VCCprune's fp16 transmission does). Labels travel as the smallest integer type that
holds every class id (:func:`label_dtype`: uint8 up to 256 classes).

``nbytes`` is the payload: elements times their size, activations plus labels; the
framing of a transport (protobuf, gRPC, TCP) comes on top and is not counted here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from roost.split.bottleneck import KeptActivations, KeptGradient

__all__ = [
    "WIRE_DTYPES",
    "Activations",
    "Gradient",
    "SplitExchange",
    "SplitReply",
    "label_dtype",
    "wire_dtype",
]

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""The dtypes activations and gradients may travel in, by name."""


def wire_dtype(name: str) -> torch.dtype:
    """The dtype called ``name``; ValueError naming the allowed ones."""
    try:
        return WIRE_DTYPES[name]
    except KeyError:
        raise ValueError(f"wire dtype {name!r} is not one of {', '.join(WIRE_DTYPES)}") from None


def label_dtype(num_classes: int) -> torch.dtype:
    """The smallest dtype holding class ids ``0 .. num_classes - 1``: uint8 (up to 256
    classes), int16 (32,768), int32, else int64."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for dtype, top in ((torch.uint8, 255), (torch.int16, 2**15 - 1), (torch.int32, 2**31 - 1)):
        if num_classes - 1 <= top:
            return dtype
    return torch.int64


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class Activations:
    """Device to server: the activations at the cut (in their wire dtype) and the labels."""

    values: torch.Tensor
    labels: torch.Tensor

    @staticmethod
    def of(
        activations: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype, num_classes: int
    ) -> Activations:
        """What a device sends: ``activations`` cast to ``dtype`` (detached from its graph),
        ``labels`` cast to :func:`label_dtype`."""
        return Activations(
            activations.detach().to(dtype), labels.detach().to(label_dtype(num_classes))
        )

    @property
    def nbytes(self) -> int:
        return _nbytes(self.values) + _nbytes(self.labels)

    def received(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The server's float32 leaf (gradients are taken with respect to it) and the
        labels as int64 (what the loss takes)."""
        leaf = self.values.detach().to(torch.float32).requires_grad_(True)  # a new leaf
        return leaf, self.labels.to(torch.int64)


@dataclass(frozen=True)
class Gradient:
    """Server to device: the loss's gradient with respect to the activations it received."""

    values: torch.Tensor

    @staticmethod
    def of(grad: torch.Tensor, dtype: torch.dtype) -> Gradient:
        return Gradient(grad.detach().to(dtype))

    @property
    def nbytes(self) -> int:
        return _nbytes(self.values)

    def received(self) -> torch.Tensor:
        """The float32 gradient the device back-propagates."""
        return self.values.to(torch.float32)


@dataclass(frozen=True)
class SplitExchange:
    """What a device's procedure sends the server for one micro-batch: its activations
    and labels, and where they are in the task (micro-batch ``micro_batch`` of
    ``micro_batches`` of iteration ``iteration``, counted from 0), so that the server's
    replica knows when an iteration starts and ends. In deprune's prune mode the
    activations are the kept channels alone (:class:`~roost.split.bottleneck.
    KeptActivations`)."""

    activations: Activations | KeptActivations
    iteration: int
    micro_batch: int
    micro_batches: int

    @property
    def examples(self) -> int:
        return int(self.activations.labels.numel())

    @property
    def nbytes(self) -> int:
        return self.activations.nbytes


@dataclass(frozen=True)
class SplitReply:
    """The server's answer to a :class:`SplitExchange`: the micro-batch's loss ``L_j``
    (a float32 scalar) and the gradient at the cut (None when the device part has
    nothing to train; deprune's prune mode may send the kept channels' alone)."""

    loss: torch.Tensor
    gradient: Gradient | KeptGradient | None

    @property
    def nbytes(self) -> int:
        """What travels back: the gradient (the loss is bookkeeping, not counted)."""
        return self.gradient.nbytes if self.gradient is not None else 0
