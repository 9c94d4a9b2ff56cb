"""What a model costs per example: forward multiply-adds and output sizes, by layer.

Counted from output shapes by forward hooks on one zero example (in eval mode, without
gradients): a linear layer costs ``in * out`` multiply-adds per output row, a convolution
``(C_in / groups) k_h k_w`` per output element, a recurrent layer its parameters once per
output step; other layers (activations, pooling, normalisation) count 0. The counts are
exact functions of the architecture, so everything timed from them (a trace system's
compute time, split learning's per-layer times) is the same on every machine and run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from roost.data.base import DatasetInfo

__all__ = ["LayerCost", "layer_costs", "macs_per_example"]


def _macs(layer: nn.Module, inputs: object, output: object) -> int:
    """Multiply-adds of ``layer``'s own computation (not its children's) from its
    ``inputs`` (the hook's tuple) to ``output``."""
    if isinstance(output, tuple):  # recurrent layers return (output, state)
        output = output[0]
    if not isinstance(output, torch.Tensor):
        return 0
    if isinstance(layer, nn.Linear):
        return layer.in_features * layer.out_features * (output.numel() // output.shape[-1])
    if isinstance(layer, nn.Conv2d):
        per_output = (layer.in_channels // layer.groups) * layer.kernel_size[0]
        return per_output * layer.kernel_size[1] * output.numel()
    if isinstance(layer, nn.ConvTranspose2d):  # every input element feeds C_out/g k_h k_w
        channels = layer.out_channels // layer.groups
        return channels * layer.kernel_size[0] * layer.kernel_size[1] * _first_numel(inputs)
    if isinstance(layer, (nn.LSTM, nn.GRU, nn.RNN)):
        return sum(p.numel() for p in layer.parameters()) * output.shape[1]
    return 0


def _first_numel(inputs: object) -> int:
    first = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
    return first.numel() if isinstance(first, torch.Tensor) else 0


def example_input(info: DatasetInfo, batch: int = 1) -> torch.Tensor:
    """``batch`` zero examples of the data ``info`` describes (token ids for text), for
    running a model once to read its shapes or costs."""
    dtype = torch.long if info.vocab_size else torch.float32
    return torch.zeros((batch, *info.input_shape), dtype=dtype)


def _run_once(module: nn.Module, info: DatasetInfo) -> torch.Tensor:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out: torch.Tensor = module(example_input(info))
    finally:
        module.train(was_training)
    return out


def macs_per_example(module: nn.Module, info: DatasetInfo) -> int:
    """Multiply-adds of one forward pass on one example, over all of ``module``'s layers."""
    total = 0

    def count(layer: nn.Module, inputs: object, output: object) -> None:
        nonlocal total
        total += _macs(layer, inputs, output)

    hooks = [m.register_forward_hook(count) for m in module.modules()]
    try:
        _run_once(module, info)
    finally:
        for h in hooks:
            h.remove()
    return total


@dataclass(frozen=True)
class LayerCost:
    """One top-level layer of an ``nn.Sequential``: forward multiply-adds per example (of
    everything inside it), the number of elements of its output per example, and the
    number of its state elements (parameters and floating-point buffers, what a
    :class:`~roost.params.FlatModel` holds of it); ``forward_s`` and ``backward_s``: its
    seconds for a batch when they were measured (:func:`roost.split.profile_layers`)."""

    macs: int
    output_elements: int
    state_elements: int = 0
    forward_s: float | None = None
    backward_s: float | None = None


def layer_costs(module: nn.Sequential, info: DatasetInfo) -> tuple[LayerCost, ...]:
    """:class:`LayerCost` of each top-level layer of ``module``, in order."""
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"layer_costs takes an nn.Sequential, not {type(module).__name__}")
    children = list(module.children())
    macs = [0] * len(children)
    elements = [0] * len(children)
    owner: dict[nn.Module, int] = {}
    for i, child in enumerate(children):
        for m in child.modules():
            owner.setdefault(m, i)

    def count(layer: nn.Module, inputs: object, output: object) -> None:
        macs[owner[layer]] += _macs(layer, inputs, output)

    def size(i: int) -> Callable[[nn.Module, object, object], None]:
        def hook(_layer: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, tuple):
                output = output[0]
            if isinstance(output, torch.Tensor):
                elements[i] = output[0].numel() if output.dim() > 0 else 1

        return hook

    hooks = [m.register_forward_hook(count) for m in owner]
    hooks += [child.register_forward_hook(size(i)) for i, child in enumerate(children)]
    try:
        _run_once(module, info)
    finally:
        for h in hooks:
            h.remove()
    state = [
        sum(p.numel() for p in child.parameters())
        + sum(b.numel() for b in child.buffers() if b.is_floating_point())
        for child in children
    ]
    return tuple(LayerCost(*c) for c in zip(macs, elements, state, strict=True))
