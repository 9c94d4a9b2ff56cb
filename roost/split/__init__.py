"""Split learning: a model cut into a device part and a server part, the messages at the
cut, and one training iteration over micro-batches.

* :mod:`~roost.split.cut` — :func:`cut_module`, :class:`SplitLayout`;
* :mod:`~roost.split.messages` — :class:`Activations`, :class:`Gradient` and their bytes;
* :mod:`~roost.split.step` — :func:`split_iteration` (PiPar's micro-batch order);
* :mod:`~roost.split.pipeline` — PiPar's stage graph (:func:`makespan`) and its automated
  choice of cut and micro-batch count (:func:`choose_split`);
* :mod:`~roost.split.profile` — per-layer forward and backward seconds and output sizes,
  measured on this host (:func:`profile_layers`);
* :mod:`~roost.split.plan` — what one split task computes and sends (:class:`SplitPlan`),
  which :mod:`roost.system.split_schedule` times per micro-batch on the device's compute
  and links and on the one shared server;
* :mod:`~roost.split.bottleneck` — deprune's gated encoder and decoder at the cut, its
  top-b mask, penalty, gate reset, kept-channel messages and phase schedules.

The methods built on these: ``algorithm=vanilla_sl``, ``splitfed``, ``splitfed_v2``,
``pipar`` and ``deprune`` (:mod:`roost.algorithms`). Not built yet: deploying them.
"""

from roost.split.cut import SplitLayout, SplitModule, cut_module, num_cut_points
from roost.split.messages import WIRE_DTYPES, Activations, Gradient, label_dtype, wire_dtype
from roost.split.pipeline import LayerCosts, SplitChoice, StageTotals, choose_split, makespan
from roost.split.plan import DeviceLink, SplitPlan, plan_for_cut
from roost.split.profile import LayerProfile, profile_layers
from roost.split.step import IterationResult, micro_batch_size, split_iteration

__all__ = [
    "WIRE_DTYPES",
    "Activations",
    "DeviceLink",
    "Gradient",
    "IterationResult",
    "LayerCosts",
    "LayerProfile",
    "SplitChoice",
    "SplitLayout",
    "SplitModule",
    "SplitPlan",
    "StageTotals",
    "choose_split",
    "cut_module",
    "label_dtype",
    "makespan",
    "micro_batch_size",
    "num_cut_points",
    "plan_for_cut",
    "profile_layers",
    "split_iteration",
    "wire_dtype",
]
