"""Per-layer costs of a sequential model, measured on this host: forward and backward
seconds of each top-level layer for one batch, and the size of its output.

PiPar's APS (:mod:`roost.split.pipeline`) needs, for every top-level layer ``ℓ``, its
forward and backward time on the device and on the server and the size ``o_ℓ`` of its
output (what a cut after ``ℓ`` sends). :func:`profile_layers` measures the times on this
host: layer by layer, the input is a detached leaf that requires a gradient, so the
backward time of ``ℓ`` is the time to back-propagate a gradient of its output's shape
through ``ℓ`` alone (parameters' gradients included); each figure is the median of
``repeats`` runs after ``warmup`` unmeasured ones. A device ``r`` times slower than this
host then takes ``r`` times the host's seconds (:meth:`LayerProfile.costs`), the model
of a device's speed the system model uses for whole tasks.

Sizes are exact: ``output_elements`` per example, times the wire dtype's bytes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from roost.split.pipeline import LayerCosts

__all__ = ["LayerProfile", "profile_layers"]


@dataclass(frozen=True)
class LayerProfile:
    """Measured on this host for a batch of ``batch``: per top-level layer, forward and
    backward seconds and output elements per example."""

    batch: int
    forward_s: tuple[float, ...]
    backward_s: tuple[float, ...]
    output_elements: tuple[int, ...]

    def costs(
        self,
        device_slowdown: float,
        server_slowdown: float,
        *,
        wire_bytes: int = 4,
        batch: int | None = None,
    ) -> LayerCosts:
        """The per-layer costs APS takes: the device's times ``device_slowdown`` times the
        host's and the server's ``server_slowdown`` times (both scaled linearly to
        ``batch`` examples when given), and each output's bytes for the batch at
        ``wire_bytes`` per element."""
        if device_slowdown <= 0 or server_slowdown <= 0:
            raise ValueError(f"slowdowns must be > 0, got {device_slowdown} and {server_slowdown}")
        b = self.batch if batch is None else batch
        scale = b / self.batch
        return LayerCosts(
            [t * device_slowdown * scale for t in self.forward_s],
            [t * device_slowdown * scale for t in self.backward_s],
            [t * server_slowdown * scale for t in self.forward_s],
            [t * server_slowdown * scale for t in self.backward_s],
            [e * b * wire_bytes for e in self.output_elements],
        )


def _timed(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def profile_layers(
    module: nn.Module,
    example: torch.Tensor,
    *,
    repeats: int = 5,
    warmup: int = 1,
) -> LayerProfile:
    """Profile every top-level layer of ``module`` (an ``nn.Sequential``) on ``example``,
    a batch of inputs (module docstring). The module is left in training mode with its
    gradients zeroed; BatchNorm statistics move as in training."""
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"profile_layers takes an nn.Sequential, not {type(module).__name__}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    module.train()
    batch = len(example)
    forward: list[float] = []
    backward: list[float] = []
    elements: list[int] = []
    x: torch.Tensor = example.detach()
    layers: Sequence[nn.Module] = list(module.children())
    for layer in layers:
        leaf = x.detach().requires_grad_(x.is_floating_point())

        def run_forward(layer: nn.Module = layer, leaf: torch.Tensor = leaf) -> torch.Tensor:
            return layer(leaf)

        forward.append(_timed(run_forward, repeats, warmup))
        out = run_forward()
        grad = torch.ones_like(out)

        def run_backward(
            layer: nn.Module = layer, leaf: torch.Tensor = leaf, grad: torch.Tensor = grad
        ) -> None:
            y = layer(leaf)
            if y.requires_grad:
                y.backward(grad)

        # a backward needs its forward: time both, subtract the forward
        both = _timed(run_backward, repeats, warmup)
        backward.append(max(0.0, both - forward[-1]))
        elements.append(out[0].numel() if out.dim() > 0 else 1)
        x = out.detach()
    module.zero_grad(set_to_none=False)
    return LayerProfile(batch, tuple(forward), tuple(backward), tuple(elements))
