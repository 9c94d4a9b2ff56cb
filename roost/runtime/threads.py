"""The default torch thread count of a run (``threads=none``).

torch's own default, one intra-op thread per core, pays off only when each step has
enough arithmetic to split: measured on 2 cores (``benchmarks/threads.py``, docs/benchmarks.md),

* small models (the quickstart's MLP, W1's 784-200-200-10 MLP: under 1 M multiply-adds per
  example) run as fast or faster on one thread on an idle machine, and 1.4-2.4x faster
  when another process keeps a core busy, since every parallel region then waits for the
  thread that shares its core;
* W1's CNN (12 M multiply-adds per example) runs 1.4x faster on two threads when the
  machine is idle, and 2.3x slower when a core is busy.

So the default is one thread for models under :data:`SMALL_MACS` multiply-adds per
example, and torch's default otherwise. The rule looks only at the model, never at the
machine's load, so a run (and its ``--resume``) computes with the same thread count, and
the same float rounding, every time on the same machine. On a shared machine set
``threads=1`` for large models too.
"""

from __future__ import annotations

import torch
from torch import nn

from roost.data.base import DatasetInfo

__all__ = ["SMALL_MACS", "default_threads", "macs_per_example"]

SMALL_MACS = 1_000_000
"""Models with fewer multiply-adds per example than this train on one thread by default."""


def macs_per_example(module: nn.Module, info: DatasetInfo) -> int:
    """Multiply-adds of one forward pass on one example, over the module's linear,
    convolution and recurrent layers (counted from their output shapes by hooks; a
    recurrent layer as its parameters once per output step)."""
    total = 0

    def count(layer: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, tuple):  # recurrent layers return (output, state)
            output = output[0]
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(layer, nn.Linear):
            total += layer.in_features * layer.out_features * (output.numel() // output.shape[-1])
        elif isinstance(layer, nn.Conv2d):
            per_output = (layer.in_channels // layer.groups) * layer.kernel_size[0]
            total += per_output * layer.kernel_size[1] * output.numel()
        elif isinstance(layer, (nn.LSTM, nn.GRU, nn.RNN)):
            total += sum(p.numel() for p in layer.parameters()) * output.shape[1]

    hooks = [m.register_forward_hook(count) for m in module.modules()]
    try:
        if info.vocab_size:
            example = torch.zeros((1, *info.input_shape), dtype=torch.long)
        else:
            example = torch.zeros((1, *info.input_shape))
        was_training = module.training
        module.eval()
        with torch.no_grad():
            module(example)
        module.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return total


def default_threads(module: nn.Module, info: DatasetInfo) -> int | None:
    """1 for a small model, None (torch's default) otherwise; see the module docstring."""
    try:
        macs = macs_per_example(module, info)
    except Exception:  # a model the count cannot run on one zero example: torch decides
        return None
    return 1 if macs < SMALL_MACS else None
