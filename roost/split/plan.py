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
* device backward of layers ``1 .. P``, once its last forward of the iteration is done
  (a device part without parameters gets no gradient back).

Compute is given as *shares* of one example's whole-model training (forward plus backward)
so that a system model's seconds per example times the shares gives seconds. By default
(``split_costs=macs``), with ``F_ℓ`` layer ``ℓ``'s forward multiply-adds
(:func:`~roost.models.cost.layer_costs`) and a backward costing twice its forward
(FedScale's and the usual 1 : 2 rule)::

    device_forward = Σ_{ℓ<=P} F_ℓ / (3 Σ_ℓ F_ℓ)     device_backward = 2 device_forward
    server_forward = Σ_{ℓ>P}  F_ℓ / (3 Σ_ℓ F_ℓ)     server_backward = 2 server_forward

so the four shares add up to 1, the whole model's training on one example. With
``split_costs=profile`` the shares are the layers' forward and backward seconds measured
on this host (:func:`~roost.split.profile_layers`) over their sum instead
(:func:`training_shares`). Nothing here knows time: :mod:`roost.system.split_schedule`
turns a plan into seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from roost.models.cost import LayerCost
from roost.split.pipeline import LayerCosts

__all__ = ["DeviceLink", "SplitPlan", "aps_costs", "plan_for_cut", "training_shares"]


@dataclass(frozen=True)
class DeviceLink:
    """What a device and the server know of each other before training (PiPar profiles
    both once): seconds of whole-model training (forward and backward) per example on the
    device and on the server, and the device's bandwidths in bits per second."""

    seconds_per_example: float
    server_seconds_per_example: float
    uplink_bps: float
    downlink_bps: float


@dataclass(frozen=True)
class SplitPlan:
    """One split task, time-free (module docstring). ``settings`` are the task's settings
    as the client procedure will see them (a method that picks the cut per device adds
    its choice there). ``up_bytes_per_message``: bytes every uplink message carries
    whatever its size (deprune's kept-channel indices); ``smallest_batch``: minibatches
    with fewer examples are skipped (deprune's BatchNorm on 1 x 1 maps needs two)."""

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
    max_iterations: int = 0
    up_bytes_per_message: int = 0
    smallest_batch: int = 1

    def iterations(self) -> Iterator[tuple[int, int]]:
        """``(n, m)`` of each iteration in order: micro-batches and their size (the first
        ``max_iterations`` of them when that is set)."""
        n_k, b = self.num_examples, self.batch_size
        full, rest = divmod(n_k, b)
        sizes = [b] * full + ([rest] if rest else [])
        left = self.num_iterations
        smallest = self.smallest_batch
        for _ in range(self.epochs):
            for size in sizes:
                if left == 0:
                    return
                left -= 1
                if size < smallest:
                    continue
                n = min(self.micro_batches, size)
                yield n, size // n

    @property
    def num_iterations(self) -> int:
        every = self.epochs * math.ceil(self.num_examples / self.batch_size)
        return min(every, self.max_iterations) if self.max_iterations else every

    def cut_bytes(self) -> tuple[int, int]:
        """Bytes of every activation message up and every gradient down, in a task."""
        up = down = 0
        for n, m in self.iterations():
            up += n * (m * self.up_bytes_per_example + self.up_bytes_per_message)
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
    max_iterations: int = 0,
) -> SplitPlan:
    """The plan of a task cut after top-level layer ``cut`` (1 .. L - 1) of a model with
    these per-layer costs; ``wire_bytes`` per activation element, ``label_bytes`` per
    label, ``part_bytes`` for the device part each way, at most ``max_iterations``
    iterations (0: every one of its epochs); the compute shares are
    :func:`training_shares`."""
    if not 1 <= cut < len(layers):
        raise ValueError(
            f"cut={cut}: a model of {len(layers)} layers cuts at 1 .. {len(layers) - 1}"
        )
    forward, backward = training_shares(layers)
    elements = layers[cut - 1].output_elements
    trains = sum(c.state_elements for c in layers[:cut]) > 0  # else no gradient goes back
    return SplitPlan(
        num_examples=num_examples,
        batch_size=batch_size,
        epochs=epochs,
        micro_batches=micro_batches,
        device_forward=sum(forward[:cut]),
        device_backward=sum(backward[:cut]),
        server_forward=sum(forward[cut:]),
        server_backward=sum(backward[cut:]),
        up_bytes_per_example=elements * wire_bytes + label_bytes,
        down_bytes_per_example=elements * wire_bytes if trains else 0,
        part_bytes=part_bytes,
        settings=dict(settings or {}),
        max_iterations=max_iterations,
    )


def training_shares(layers: Sequence[LayerCost]) -> tuple[list[float], list[float]]:
    """Each layer's forward and backward shares of one example's whole training (all of
    them adding up to 1): from the measured seconds when every layer has them,
    ``f_ℓ / Σ (f + b)`` and ``b_ℓ / Σ (f + b)``; else from the multiply-adds with a
    backward twice its forward, ``F_ℓ / 3 Σ F`` and ``2 F_ℓ / 3 Σ F`` (equal shares per
    layer when no layer counts any)."""
    if all(c.forward_s is not None and c.backward_s is not None for c in layers):
        f = [float(c.forward_s or 0.0) for c in layers]
        b = [float(c.backward_s or 0.0) for c in layers]
        total = sum(f) + sum(b)
        if total > 0:
            return [x / total for x in f], [x / total for x in b]
    macs = [float(c.macs) for c in layers]
    if sum(macs) <= 0:
        macs = [1.0] * len(layers)
    total = 3.0 * sum(macs)
    return [m / total for m in macs], [2.0 * m / total for m in macs]


def aps_costs(
    layers: Sequence[LayerCost], batch: int, device: DeviceLink, wire_bytes: int
) -> LayerCosts:
    """The per-layer costs PiPar's APS takes (:func:`~roost.split.pipeline.choose_split`)
    for a batch of ``batch`` on ``device``: forward seconds ``B t φ_ℓ`` on the device
    (``t`` its seconds per example, ``φ_ℓ`` the layer's forward share,
    :func:`training_shares`) and on the server, backward likewise, and each layer's
    output bytes for the batch at ``wire_bytes`` per element (what a cut after it sends;
    labels are left out, as in PiPar's model)."""
    forward, backward = training_shares(layers)
    t_dev, t_srv = batch * device.seconds_per_example, batch * device.server_seconds_per_example
    return LayerCosts(
        [t_dev * x for x in forward],
        [t_dev * x for x in backward],
        [t_srv * x for x in forward],
        [t_srv * x for x in backward],
        [batch * c.output_elements * wire_bytes for c in layers],
    )
