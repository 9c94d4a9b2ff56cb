"""Split learning: a model cut into a device part and a server part, the messages at the
cut, and one training iteration over micro-batches.

* :mod:`~roost.split.cut` — :func:`cut_module`, :class:`SplitLayout`;
* :mod:`~roost.split.messages` — :class:`Activations`, :class:`Gradient` and their bytes;
* :mod:`~roost.split.step` — :func:`split_iteration` (PiPar's micro-batch order).

Not built yet: the split-learning methods (vanilla split learning, SplitFed v1/v2, PiPar,
deprune/prune) on the engine, their virtual-time resources, and their deployment.
"""

from roost.split.cut import SplitLayout, SplitModule, cut_module, num_cut_points
from roost.split.messages import WIRE_DTYPES, Activations, Gradient, label_dtype, wire_dtype
from roost.split.step import IterationResult, micro_batch_size, split_iteration

__all__ = [
    "WIRE_DTYPES",
    "Activations",
    "Gradient",
    "IterationResult",
    "SplitLayout",
    "SplitModule",
    "cut_module",
    "label_dtype",
    "micro_batch_size",
    "num_cut_points",
    "split_iteration",
    "wire_dtype",
]
