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

from torch import nn

from roost.data.base import DatasetInfo
from roost.models.cost import macs_per_example

__all__ = ["SMALL_MACS", "default_threads"]

SMALL_MACS = 1_000_000
"""Models with fewer multiply-adds per example than this train on one thread by default."""


def default_threads(module: nn.Module, info: DatasetInfo) -> int | None:
    """1 for a small model, None (torch's default) otherwise; see the module docstring."""
    try:
        macs = macs_per_example(module, info)
    except Exception:  # a model the count cannot run on one zero example: torch decides
        return None
    return 1 if macs < SMALL_MACS else None
