"""Sparsifiers: which ``k`` of the ``n`` coordinates of a vector are transmitted.

Top-k (Aji & Heafield 2017, "Sparse Communication for Distributed Gradient Descent";
Stich, Cordonnier, Jaggi 2018, "Sparsified SGD with Memory") keeps the ``k`` largest
magnitudes::

    TopK_k(x)_i = x_i  if i ∈ S,  0 otherwise,   S = the k indices of largest |x_i|

so ``||x − TopK_k(x)||² = Σ_{i∉S} x_i²  <=  (1 − k/n) ||x||²``: the dropped mass is exactly
the sum of the dropped squares, and at most the fraction ``1 − k/n`` of the total. Ties in
``|x_i|`` are broken towards the lowest index, so the choice is a pure function of ``x``.

Random-k (Stich et al. 2018; Wangni et al. 2018) keeps ``k`` indices drawn uniformly
without replacement, ``P(i ∈ S) = k/n``; scaled by ``n/k`` it is unbiased,
``E[(n/k) RandK(x)] = x``, with ``E||(n/k) RandK(x) − x||² = (n/k − 1) ||x||²``.

In both, ``k = ⌈ratio · n⌉`` (at least 1 coordinate of a non-empty vector for any
``ratio > 0``; the vector is sent dense when ``k = n``).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

__all__ = ["num_kept", "rand_k_indices", "top_k_indices"]


def num_kept(n: int, ratio: float) -> int:
    """``k = min(n, ⌈ratio · n⌉)`` coordinates kept of ``n`` (``0 < ratio <= 1``).

    The ratio is taken as the decimal it prints as (``repr``), exactly, so 0.07 with
    n = 100 keeps 7 (the binary product 0.07 · 100 is 7.000000000000001, whose ceiling
    would be 8).
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return min(n, math.ceil(Fraction(repr(float(ratio))) * n))


def top_k_indices(x: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` positions of largest ``|x_i|``, increasing; ties go to the lowest index.

    NaN counts as larger than any number (a diverged update is kept, so it reaches the
    server, whose divergence check then stops the run). O(n): one ``np.partition``.
    """
    n = x.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    mag = np.abs(x.astype(np.float32, copy=False))
    mag[np.isnan(mag)] = np.inf
    threshold = np.partition(mag, n - k)[n - k]  # the k-th largest magnitude
    above = np.flatnonzero(mag > threshold)
    ties = np.flatnonzero(mag == threshold)[: k - above.size]
    return np.sort(np.concatenate([above, ties])).astype(np.int64)


def rand_k_indices(n: int, k: int, generator: torch.Generator) -> np.ndarray:
    """``k`` of ``0 .. n − 1`` uniformly without replacement (the first ``k`` of a seeded
    ``torch.randperm``), increasing."""
    if k >= n:
        return np.arange(n, dtype=np.int64)
    perm = torch.randperm(n, generator=generator)[:k]
    return np.sort(perm.numpy()).astype(np.int64)
