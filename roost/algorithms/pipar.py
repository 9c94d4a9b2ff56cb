"""PiPar: pipelined split learning with an automated choice of cut and micro-batch count.

Zhang, Rana, Varghese et al., "PiPar: Pipeline Parallelism for Collaborative Machine
Learning", JPDC 2024 (arXiv 2302.12803); reference code github.com/blessonvar/PipeLearn;
ALGORITHMS.md §2.1. Each device ``k`` trains the device part ``W^c_k`` of the model and
the server keeps a replica ``W^s_k`` of the server part for it (as SplitFed v1 does). An
iteration on a batch of ``B`` cuts it into ``N_k`` micro-batches of ``⌊B/N_k⌋`` (the rest
dropped): the device forwards them all in order, sending each one's activations as soon
as it is computed; the replica forwards and back-propagates each as it arrives, with the
loss ``L_j = CE(f_s(a_j), y_j) / N_k``, and returns its gradient at once; the device
back-propagates the gradients in order; then both parts take one SGD step
(:func:`~roost.split.split_iteration`). So the gradients of an iteration are those of the
batch's mean loss, accumulated over the micro-batches: on a model without BatchNorm one
iteration is exactly SplitFed v1's with ``N``-way gradient accumulation, and with one
device and ``N = 1`` exactly centralised SGD on the batch (tests/unit/test_algorithms_pipar.py).
What the pipeline changes is time: the device, its links and the server overlap over
micro-batches (:mod:`roost.system.split_schedule` times it).

Every ``F`` iterations (``aggregation_iterations``; 0, the default, means once per epoch
as the reference's ``-1``, or once per ``local_epochs`` epochs) each device sends its
``W^c_k`` and the server averages the whole models ``[W^c_k; W^s_k]`` **with equal
weights** (the reference's ``get_average_model`` without weights; ``weighted=true``
weights by examples) and gives every device the new ``W^c``: one round of Roost's engine.
The reference creates each device's and replica's SGD optimiser (momentum 0.9) once and
loads the averaged weights into the same model, so the momentum buffers live across
aggregations: here they are client state (``momentum`` of the model's size per device).

**Automated parameter selection (APS)**, per device before its task (the reference runs
it once before training from profiles measured on the device and the server; here the
profile is the system model's, which does not change for the parametric systems, so the
choice does not either): with per-layer forward seconds ``B t share_ℓ / 3`` on the
device (``t`` its seconds of whole-model training per example, ``share_ℓ`` layer ``ℓ``'s
share of the forward multiply-adds) and on the server, backward twice those, and each
layer's output bytes, :func:`~roost.split.choose_split` picks the cut of least predicted
iteration time on PiPar's stage graph with its micro-batch count (the reference's
formula, its quirks fixed; ``reference_compat=true`` keeps them), among the cuts where
both parts have parameters (:func:`trained_cuts`: the reference's layers all have some,
but a cut after a flatten or a ReLU here would put no layer of its own on the device,
which then sends its raw input). ``cut=P`` fixes the
cut (APS then chooses ``N`` for it); ``micro_batches=N`` fixes ``N``. On a system model
without devices and links to profile (``system=constant``, ``w3``) nothing can be chosen:
the cut is half of the layers and ``N = 1``.

Defaults are the reference's (``config.py``/``config.json``): SGD lr 0.01, momentum 0.9,
batch 100, equal-weight averaging once per epoch, float32 messages.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from roost.algorithms.base import ClientContext, Tensors, register_algorithm
from roost.algorithms.local_sgd import SGDStepper, minibatches
from roost.algorithms.splitfed import SplitFed, SplitFedConfig
from roost.data.base import ClientData
from roost.models.cost import LayerCost
from roost.registry import check
from roost.split import choose_split, wire_dtype
from roost.split.pipeline import micro_batches_for
from roost.split.plan import DeviceLink, SplitPlan, aps_costs

__all__ = ["PiPar", "PiParConfig"]


@dataclass(frozen=True)
class PiParConfig(SplitFedConfig):
    """cut and micro_batches: 0 (the defaults) lets APS choose them per device;
    aggregation_iterations: ``F`` iterations per round (0: ``local_epochs`` epochs, once
    per epoch by default); reference_compat: APS with the reference code's stage graph;
    weighted: average by examples (False, the reference: equal weights)."""

    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 100
    weighted: bool = False
    micro_batches: int = 0
    aggregation_iterations: int = 0
    reference_compat: bool = False

    AUTOMATIC: ClassVar[str] = "chosen per device by APS"
    AUTOMATIC_MICRO_BATCHES: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        f = self.aggregation_iterations
        check(
            isinstance(f, int) and not isinstance(f, bool) and f >= 0,
            "aggregation_iterations",
            f,
            "iterations between averagings, >= 1 (0: once per local_epochs epochs)",
        )
        check(
            isinstance(self.reference_compat, bool),
            "reference_compat",
            self.reference_compat,
            "expected true or false",
        )


def _epochs_for(cfg: PiParConfig, num_examples: int) -> PiParConfig:
    """``cfg`` with as many epochs as ``F`` iterations need (``F = 0``: as it is)."""
    f = cfg.aggregation_iterations
    if not f:
        return cfg
    per_epoch = math.ceil(num_examples / cfg.batch_size)
    return dataclasses.replace(cfg, local_epochs=math.ceil(f / per_epoch))


def trained_cuts(layers: Sequence[LayerCost]) -> list[int]:
    """The cuts after which both parts have state to train: a device part without any
    would send the raw input (no split at all), a server part without any would return
    no gradient worth the trip. Every cut when no cut has both."""
    state = [c.state_elements for c in layers]
    both = [p for p in range(1, len(layers)) if sum(state[:p]) > 0 and sum(state[p:]) > 0]
    return both or list(range(1, len(layers)))


@register_algorithm("pipar")
class PiPar(SplitFed):
    """PiPar (Zhang et al. JPDC 2024): SplitFed v1's replicas, a micro-batch pipeline,
    equal-weight averaging every F iterations, cut and micro-batches chosen by APS."""

    Config = PiParConfig
    config: PiParConfig

    def client_state_spec(self, num_params: int) -> dict[str, int]:
        return {"momentum": num_params} if self.config.momentum else {}

    def split_plan(
        self,
        layers: Sequence[LayerCost],
        num_examples: int,
        settings: Mapping[str, Any],
        device: DeviceLink,
    ) -> SplitPlan:
        """The task at APS's choice for this device (module docstring), which the plan's
        settings carry to the client procedure."""
        cfg = self._config_with(settings)
        assert isinstance(cfg, PiParConfig)
        cut, n = self.choose(layers, num_examples, cfg, device)
        chosen = {**settings, "cut": cut, "micro_batches": n}
        planned = _epochs_for(dataclasses.replace(cfg, cut=cut, micro_batches=n), num_examples)
        return self._plan(layers, num_examples, planned, cut, chosen)

    def choose(
        self, layers: Sequence[LayerCost], num_examples: int, cfg: PiParConfig, device: DeviceLink
    ) -> tuple[int, int]:
        """APS's ``(cut, N)`` for a device with ``num_examples`` examples (a configured
        cut or ``N`` is kept)."""
        if cfg.cut and cfg.micro_batches:
            return self._cut(cfg, len(layers)), cfg.micro_batches
        batch = min(cfg.batch_size, num_examples)
        costs = aps_costs(layers, batch, device, wire_dtype(cfg.wire_dtype).itemsize)
        up, down = device.uplink_bps, device.downlink_bps
        if cfg.cut:
            cut = self._cut(cfg, len(layers))
            return cut, micro_batches_for(costs.totals(cut, up, down), batch)
        choice = choose_split(
            costs, batch, up, down, reference_compat=cfg.reference_compat, cuts=trained_cuts(layers)
        )
        return choice.cut, cfg.micro_batches or choice.micro_batches

    def _max_iterations(self, cfg: SplitFedConfig) -> int:
        assert isinstance(cfg, PiParConfig)
        return cfg.aggregation_iterations

    def work_examples(self, num_examples: int, settings: Mapping[str, Any] | None = None) -> int:
        """Examples of one task: ``F`` minibatches' worth when ``F`` is set."""
        cfg = self._config_with(settings or {})
        assert isinstance(cfg, PiParConfig)
        f = cfg.aggregation_iterations
        if not f:
            return num_examples * cfg.local_epochs
        full, rest = divmod(num_examples, cfg.batch_size)
        sizes = [cfg.batch_size] * full + ([rest] if rest else [])
        rounds, left = divmod(f, len(sizes))
        return rounds * num_examples + sum(sizes[:left])

    def _minibatches(
        self, ctx: ClientContext, data: ClientData, cfg: SplitFedConfig
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        assert isinstance(cfg, PiParConfig)
        batches = minibatches(ctx, data, _epochs_for(cfg, len(data)))
        f = cfg.aggregation_iterations
        return itertools.islice(batches, f) if f else batches

    def _state_after(self, stepper: SGDStepper) -> Tensors | None:
        return {"momentum": stepper.buf} if stepper.buf is not None else None
