"""Split learning on the wire: a micro-batch's activations as an
:class:`~roost.deploy.protocol.Exchange`, the server's gradient as an
:class:`~roost.deploy.protocol.Answer`, and what each side needs of the method.

A split task's payload is the device part of the global model alone, ``device_params``
(the server part never leaves the server); its result is the trained device part under
the same name. During the task the node sends, per micro-batch, an Exchange of kind
``SPLIT_ACTIVATIONS`` with the tensors ``activations`` (in the task's wire dtype: float16
is half the bytes) and ``labels`` (the smallest integer dtype of the class ids) and the
integer fields ``iteration``, ``micro_batch``, ``micro_batches`` and ``examples``; the
answer holds ``loss`` (one float32) and, when the device part has parameters,
``gradient`` (the activations' shape and dtype). The server checks the manifest against
the exact spec the task allows (:meth:`SplitTaskLike.spec`) before it reads a byte, the
values for NaN and Inf, and the message against the replica's order and labels
(:class:`~roost.split.step.ServerReplica`), and answers a resent message (same digest)
with the answer it gave.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from roost.algorithms.base import Payload
from roost.deploy.errors import MalformedMessage
from roost.deploy.protocol import SettingValue
from roost.deploy.tensors import DTYPES, TensorSpec, WireValue
from roost.split.messages import Activations, Gradient, SplitExchange, SplitReply

__all__ = [
    "DEVICE_PARAMS",
    "FIELDS",
    "SplitServingLike",
    "SplitTaskLike",
    "exchange_from_wire",
    "exchange_spec",
    "exchange_to_wire",
    "read_fields",
    "reply_from_wire",
    "reply_to_wire",
]

DEVICE_PARAMS = "device_params"
"""The name of a split task's payload and result tensor: the device part's flat entries."""

FIELDS = ("iteration", "micro_batch", "micro_batches", "examples")
"""The integer fields of a split Exchange, all required."""

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SplitTaskLike(Protocol):
    """The server's side of one split task
    (:class:`~roost.algorithms.split_serving.SplitTask`)."""

    bytes_up: int

    def answer(self, message: SplitExchange) -> SplitReply: ...

    def join(self, device_params: torch.Tensor) -> torch.Tensor: ...

    def spec(self, examples: int) -> tuple[torch.dtype, tuple[int, ...], torch.dtype]: ...


class SplitServingLike(Protocol):
    """A split method's deployment (:class:`~roost.algorithms.split_serving.SplitServing`)."""

    def device_trains(self, settings: Mapping[str, Any]) -> bool: ...

    def device_params(self, params: torch.Tensor, settings: Mapping[str, Any]) -> torch.Tensor: ...

    def whole_params(
        self, device_params: torch.Tensor, settings: Mapping[str, Any]
    ) -> torch.Tensor: ...

    def open(
        self, client_id: int, payload: Payload, settings: Mapping[str, Any]
    ) -> SplitTaskLike: ...


def read_fields(fields: Mapping[str, SettingValue]) -> dict[str, int]:
    """The four integer fields (MalformedMessage naming the missing or bad one)."""
    out: dict[str, int] = {}
    for name in FIELDS:
        value = fields.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MalformedMessage(
                f"split exchange field {name!r} is {value!r}; it must be an integer >= 0 "
                f"(fields: {', '.join(FIELDS)})"
            )
        out[name] = value
    extra = sorted(set(fields) - set(FIELDS))
    if extra:
        raise MalformedMessage(f"split exchange fields {extra} are not among {', '.join(FIELDS)}")
    return out


def exchange_spec(
    wire: torch.dtype, shape: tuple[int, ...], labels: torch.dtype, examples: int
) -> dict[str, TensorSpec]:
    """The exact tensors of a micro-batch of ``examples`` activations of one example's
    ``shape`` in ``wire``, with their ``labels``."""
    return {
        "activations": TensorSpec(dtype=_DTYPE_NAMES[wire], shape=(examples, *shape)),
        "labels": TensorSpec(dtype=_DTYPE_NAMES[labels], shape=(examples,)),
    }


def exchange_to_wire(
    message: SplitExchange,
) -> tuple[dict[str, SettingValue], dict[str, WireValue]]:
    """The fields and tensors a node sends for ``message``."""
    fields: dict[str, SettingValue] = {
        "iteration": message.iteration,
        "micro_batch": message.micro_batch,
        "micro_batches": message.micro_batches,
        "examples": message.examples,
    }
    a = message.activations
    return fields, {"activations": a.values.contiguous(), "labels": a.labels.contiguous()}


def exchange_from_wire(
    fields: Mapping[str, SettingValue], tensors: Mapping[str, WireValue]
) -> SplitExchange:
    """The message a node sent (its tensors already checked against the spec)."""
    f = read_fields(fields)
    values, labels = tensors.get("activations"), tensors.get("labels")
    if not isinstance(values, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise MalformedMessage("a split exchange holds the tensors 'activations' and 'labels'")
    return SplitExchange(
        Activations(values, labels), f["iteration"], f["micro_batch"], f["micro_batches"]
    )


def reply_to_wire(reply: SplitReply) -> dict[str, WireValue]:
    """The answer's tensors: ``loss`` and, if any, ``gradient``."""
    out: dict[str, WireValue] = {"loss": reply.loss.detach().reshape(1).to(torch.float32)}
    if reply.gradient is not None:
        out["gradient"] = reply.gradient.values.contiguous()
    return out


def reply_from_wire(
    tensors: Mapping[str, WireValue], message: SplitExchange, gradient: bool
) -> SplitReply:
    """The server's answer to ``message`` as the node received it: MalformedMessage unless
    it is one float32 loss and, when the device part trains (``gradient``), a gradient
    of the activations' shape and dtype (finite: the decoder checked)."""
    loss = tensors.get("loss")
    if not isinstance(loss, torch.Tensor) or loss.dtype != torch.float32 or loss.shape != (1,):
        raise MalformedMessage("a split answer's 'loss' must be one float32 value")
    allowed = {"loss", "gradient"} if gradient else {"loss"}
    if set(tensors) != allowed:
        raise MalformedMessage(f"a split answer holds {sorted(allowed)}, got {sorted(tensors)}")
    if not gradient:
        return SplitReply(loss.reshape(()), None)
    g = tensors["gradient"]
    values = message.activations.values
    if not isinstance(g, torch.Tensor) or g.shape != values.shape or g.dtype != values.dtype:
        raise MalformedMessage(
            f"a split answer's gradient must have the activations' shape "
            f"{tuple(values.shape)} and dtype {values.dtype}"
        )
    return SplitReply(loss.reshape(()), Gradient(g))
