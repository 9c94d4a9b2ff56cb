"""Compression of client updates, as pieces any algorithm can use.

* :mod:`~roost.compression.sparsify` — top-k and random-k index selection;
* :mod:`~roost.compression.quantize` — QSGD ``q``-bit quantisation (stochastic / nearest);
* :mod:`~roost.compression.wire` — the real message format and its exact size formula;
* :mod:`~roost.compression.compressors` — :class:`Compressor` (``Q_q ∘ S_k``) with
  ``encode`` / ``decode`` / ``nbytes`` and the constructors :func:`topk`, :func:`randk`,
  :func:`qsgd`, :func:`topk_qsgd`;
* :mod:`~roost.compression.error_feedback` — ``e_k ← Δ + e_k − C(Δ + e_k)``;
* :mod:`~roost.compression.schedule` — TEASQ-Fed's decaying kept fraction and bits;
* :mod:`~roost.compression.config` — :class:`CompressionConfig`, the validated settings;
* :mod:`~roost.compression.wrapper` — :class:`Compressed`, which compresses the upload of
  any algorithm whose client result is a model (``"params"``) or a ``"delta"``.
"""

from __future__ import annotations

from roost.compression.compressors import Compressor, qsgd, randk, topk, topk_qsgd
from roost.compression.config import METHODS, CompressionConfig
from roost.compression.error_feedback import EF_MEMORY, ErrorFeedbackStep, error_feedback_step
from roost.compression.schedule import CompressionSchedule
from roost.compression.wrapper import Compressed, compression_generator

__all__ = [
    "EF_MEMORY",
    "METHODS",
    "Compressed",
    "CompressionConfig",
    "CompressionSchedule",
    "Compressor",
    "ErrorFeedbackStep",
    "compression_generator",
    "error_feedback_step",
    "qsgd",
    "randk",
    "topk",
    "topk_qsgd",
]
