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
from roost.split.bottleneck import KeptActivations, KeptChannels, KeptGradient
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
    bytes_down: int
    channels: int

    def answer(self, message: SplitExchange) -> SplitReply: ...

    def join(self, device_params: torch.Tensor) -> torch.Tensor: ...

    def keep_state(self) -> None: ...

    def spec(self, examples: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]: ...


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


def exchange_spec(spec: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict[str, TensorSpec]:
    """The wire spec of a task's exact tensors (:meth:`SplitTaskLike.spec`)."""
    return {
        name: TensorSpec(dtype=_DTYPE_NAMES[dtype], shape=tuple(shape))
        for name, (dtype, shape) in spec.items()
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
    tensors: dict[str, WireValue] = {"activations": a.values.contiguous()}
    if isinstance(a, KeptActivations):
        tensors["channels"] = a.kept.indices.contiguous()
    tensors["labels"] = a.labels.contiguous()
    return fields, tensors


def exchange_from_wire(
    fields: Mapping[str, SettingValue], tensors: Mapping[str, WireValue], channels: int
) -> SplitExchange:
    """The message a node sent (its tensors already checked against the spec); with
    ``channels`` (kept channel ids), a prune-mode message of the cut's ``channels``."""
    f = read_fields(fields)
    values, labels = tensors.get("activations"), tensors.get("labels")
    ids = tensors.get("channels")
    if not isinstance(values, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise MalformedMessage("a split exchange holds the tensors 'activations' and 'labels'")
    message: Activations | KeptActivations = Activations(values, labels)
    if isinstance(ids, torch.Tensor):
        message = KeptActivations(KeptChannels(values, ids, channels), labels)
    return SplitExchange(message, f["iteration"], f["micro_batch"], f["micro_batches"])


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
    it is one float32 loss and, when the device part trains (``gradient``), a floating
    gradient of the activations' shape (finite: the decoder checked); for a prune-mode
    message, of the kept channels (the kept channels' gradient) or of all ``C'``."""
    loss = tensors.get("loss")
    if not isinstance(loss, torch.Tensor) or loss.dtype != torch.float32 or loss.shape != (1,):
        raise MalformedMessage("a split answer's 'loss' must be one float32 value")
    allowed = {"loss", "gradient"} if gradient else {"loss"}
    if set(tensors) != allowed:
        raise MalformedMessage(f"a split answer holds {sorted(allowed)}, got {sorted(tensors)}")
    if not gradient:
        return SplitReply(loss.reshape(()), None)
    g = tensors["gradient"]
    a = message.activations
    full = tuple(a.values.shape)
    if isinstance(a, KeptActivations):
        full = (full[0], a.kept.num_channels, *full[2:])
    if not isinstance(g, torch.Tensor) or not g.is_floating_point():
        raise MalformedMessage("a split answer's gradient must be a floating tensor")
    if isinstance(a, KeptActivations) and tuple(g.shape) == tuple(a.values.shape):
        kept = KeptGradient(g, a.kept.indices.to(torch.int64), a.kept.num_channels)
        return SplitReply(loss.reshape(()), kept)
    if tuple(g.shape) != full:
        raise MalformedMessage(
            f"a split answer's gradient must have the activations' shape {full}, got "
            f"{tuple(g.shape)}"
        )
    return SplitReply(loss.reshape(()), Gradient(g))
