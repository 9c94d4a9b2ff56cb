"""Error feedback: remember what compression dropped and send it later.

Seide, Fu, Droppo, Li, Yu, "1-Bit Stochastic Gradient Descent and its Application to
Data-Parallel Distributed Training of Speech DNNs", Interspeech 2014; Karimireddy, Rebjock,
Stich, Jaggi, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes",
ICML 2019 (EF-SGD); Stich et al. 2018 ("memory"). Client ``k`` keeps a residual ``e_k``
(initially 0). With compressor ``C`` and this task's update ``Δ``::

    p      = Δ + e_k            (the corrected update)
    Δ̃      = C(p)               (what is transmitted; the server sees only Δ̃)
    e_k   ← p − Δ̃              (what was not transmitted, carried to the next task)

Telescoping over tasks ``t = 1..T`` gives the conservation law ::

    Σ_t Δ̃_t + e_T = Σ_t Δ_t + e_0,

i.e. nothing is ever lost, only delayed; with float32 arithmetic it holds up to the
rounding of each sum ``Δ_t + e_{t−1}`` (exactly for top-k, whose ``Δ̃`` copies ``p`` on
the kept coordinates, when those sums are exact). In TEASQ-Fed's notation (ALGORITHMS.md
§2.8) ``Δ̃ = Q_q(TopK_s(Δ + e_k))``, ``e_k ← Δ + e_k − Δ̃``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["EF_MEMORY", "ErrorFeedbackStep", "error_feedback_step"]

EF_MEMORY = "ef_memory"
"""The name of the residual ``e_k`` in a client's state (a float32 vector of the model's size)."""


class ErrorFeedbackStep(NamedTuple):
    """One step's corrected input ``p = Δ + e``, its reconstruction ``Δ̃ = C(p)`` and the
    new residual ``e' = p − Δ̃``."""

    corrected: torch.Tensor
    transmitted: torch.Tensor
    memory: torch.Tensor


def error_feedback_step(
    delta: torch.Tensor,
    memory: torch.Tensor | None,
    compress: Callable[[torch.Tensor], torch.Tensor],
) -> ErrorFeedbackStep:
    """``p = Δ + e``, ``Δ̃ = compress(p)``, ``e' = p − Δ̃`` (``memory=None`` means ``e = 0``).

    ``compress`` must return what the receiver reconstructs (``decode(encode(p))``), so
    that the residual is measured against what the server really got. New tensors are
    returned; ``delta`` and ``memory`` are not modified.
    """
    corrected = delta.detach().clone() if memory is None else delta.detach() + memory
    transmitted = compress(corrected)
    if transmitted.shape != corrected.shape:
        raise ValueError(
            f"compress returned shape {tuple(transmitted.shape)}, expected {tuple(corrected.shape)}"
        )
    return ErrorFeedbackStep(corrected, transmitted, corrected - transmitted)
