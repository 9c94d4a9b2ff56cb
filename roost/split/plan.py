"""What one split-learning task computes and sends, for the system model to time.

A split task of device ``k`` (cut ``P``, ``N`` micro-batches, batch ``B``, ``E`` epochs over
its ``n_k`` examples) is, in order: the download of the device part ``W^c`` (its float32
parameters and buffers), then ``E ⌈n_k / B⌉`` iterations (the last of an epoch on the
``n_k mod B`` examples left, when there are), each cut into ``n = min(N, b)`` micro-batches
of ``m = ⌊b / n⌋`` examples (:func:`~roost.split.step.micro_batch_size`), and finally the
upload of the trained ``W^c_k``. Per micro-batch:

* device forward of layers ``1 .. P`` on ``m`` examples, then the activations and labels up
  (``m`` times :attr:`SplitPlan.up_bytes_per_example`);
* server forward and backward of layers ``P+1 .. L``, then the activations' gradient down
  (``m`` times :attr:`SplitPlan.down_bytes_per_example`);
* device backward of layers ``1 .. P``, once its last forward of the iteration is done.

Compute is given as *shares* of one example's whole-model training (forward plus backward)
so that a system model's seconds per example times the shares gives seconds: with ``F_ℓ``
layer ``ℓ``'s forward multiply-adds (:func:`~roost.models.cost.layer_costs`) and a
backward costing twice its forward (FedScale's and the usual 1 : 2 rule)::

    device_forward = Σ_{ℓ<=P} F_ℓ / (3 Σ_ℓ F_ℓ)     device_backward = 2 device_forward
    server_forward = Σ_{ℓ>P}  F_ℓ / (3 Σ_ℓ F_ℓ)     server_backward = 2 server_forward

so the four shares add up to 1, the whole model's training on one example. Nothing here
knows time: :mod:`roost.system.split_schedule` turns a plan into seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from roost.models.cost import LayerCost

__all__ = ["DeviceLink", "SplitPlan", "plan_for_cut"]


@dataclass(frozen=True)
class DeviceLink:
    """What a device tells the server about itself before training (PiPar profiles its
    devices once): compute speed relative to the reference device, bandwidths in bits per
    second."""

    speed: float
    uplink_bps: float
    downlink_bps: float


@dataclass(frozen=True)
class SplitPlan:
    """One split task, time-free (module docstring). ``settings`` are the task's settings
    as the client procedure will see them (a method that picks the cut per device adds
    its choice there)."""

    num_examples: int
    batch_size: int
    epochs: int
    micro_batches: int
    device_forward: float
    device_backward: float
    server_forward: float
    server_backward: float
    up_bytes_per_example: int
    down_bytes_per_example: int
    part_bytes: int
    settings: Mapping[str, Any] = field(default_factory=dict)

    def iterations(self) -> Iterator[tuple[int, int]]:
        """``(n, m)`` of each iteration in order: micro-batches and their size."""
        n_k, b = self.num_examples, self.batch_size
        full, rest = divmod(n_k, b)
        sizes = [b] * full + ([rest] if rest else [])
        for _ in range(self.epochs):
            for size in sizes:
                n = min(self.micro_batches, size)
                yield n, size // n

    @property
    def num_iterations(self) -> int:
        return self.epochs * math.ceil(self.num_examples / self.batch_size)

    def cut_bytes(self) -> tuple[int, int]:
        """Bytes of every activation message up and every gradient down, in a task."""
        up = down = 0
        for n, m in self.iterations():
            up += n * m * self.up_bytes_per_example
            down += n * m * self.down_bytes_per_example
        return up, down


def plan_for_cut(
    layers: Sequence[LayerCost],
    cut: int,
    *,
    num_examples: int,
    batch_size: int,
    epochs: int,
    micro_batches: int,
    wire_bytes: int,
    label_bytes: int,
    part_bytes: int,
    settings: Mapping[str, Any] | None = None,
) -> SplitPlan:
    """The plan of a task cut after top-level layer ``cut`` (1 .. L - 1) of a model with
    these per-layer costs; ``wire_bytes`` per activation element, ``label_bytes`` per
    label, ``part_bytes`` for the device part each way. A model whose layers count no
    multiply-adds at all shares its compute equally among its layers."""
    if not 1 <= cut < len(layers):
        raise ValueError(
            f"cut={cut}: a model of {len(layers)} layers cuts at 1 .. {len(layers) - 1}"
        )
    macs = [float(c.macs) for c in layers]
    if sum(macs) <= 0:
        macs = [1.0] * len(layers)
    total = 3.0 * sum(macs)
    device = sum(macs[:cut]) / total
    server = sum(macs[cut:]) / total
    elements = layers[cut - 1].output_elements
    return SplitPlan(
        num_examples=num_examples,
        batch_size=batch_size,
        epochs=epochs,
        micro_batches=micro_batches,
        device_forward=device,
        device_backward=2.0 * device,
        server_forward=server,
        server_backward=2.0 * server,
        up_bytes_per_example=elements * wire_bytes + label_bytes,
        down_bytes_per_example=elements * wire_bytes,
        part_bytes=part_bytes,
        settings=dict(settings or {}),
    )
