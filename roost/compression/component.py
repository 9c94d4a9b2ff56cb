"""``compression=NAME``: compress any algorithm's uploads from the command line.

    roost run quickstart compression=topk_qsgd compression.ratio=0.1 compression.bits=8
    roost run quickstart compression=qsgd compression.bits=4 compression.bucket_size=512

Each name is a compression method with only the fields it uses; the runner wraps the
algorithm in :class:`~roost.compression.wrapper.Compressed` with the resulting
:class:`~roost.compression.config.CompressionConfig` (``none``, the default, leaves it
untouched). Upload bytes, and so upload times, are the compressed message's real size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from roost.compression.config import CompressionConfig
from roost.compression.quantize import DEFAULT_BUCKET_SIZE, Rounding
from roost.compression.schedule import Direction
from roost.registry import Registry

__all__ = ["COMPRESSIONS", "compression_config"]


@dataclass(frozen=True)
class NoCompression:
    """Updates travel as float32, exactly."""


@dataclass(frozen=True)
class _Validated:
    """Options checked as the :class:`CompressionConfig` they give, when built, so that a
    bad value is reported as ``compression.KEY=VALUE`` before the run starts."""

    method: ClassVar[str]

    def __post_init__(self) -> None:
        compression_config(self.method, self)


@dataclass(frozen=True)
class _Sparsified(_Validated):
    """ratio: kept fraction s_0. error_feedback: keep e_k ← Δ + e_k − C(Δ + e_k) per
    client. schedule: constant, tighten or relax the kept fraction by ratio_gamma per
    version, down to (or up to) ratio_limit."""

    ratio: float = 0.1
    error_feedback: bool = False
    schedule: Direction = "constant"
    ratio_gamma: float = 0.99
    ratio_limit: float = 0.01


@dataclass(frozen=True)
class TopK(_Sparsified):
    """Top-k: the ceil(ratio n) largest |Δ_i| as float32 values with their indices."""

    method: ClassVar[str] = "topk"


@dataclass(frozen=True)
class RandK(_Sparsified):
    """Random-k: ceil(ratio n) indices drawn per task; rescale multiplies by n/k
    (unbiased)."""

    method: ClassVar[str] = "randk"
    rescale: bool = False


@dataclass(frozen=True)
class QSGD(_Validated):
    """QSGD (Alistarh et al. 2017): bits q_0 per value (32: float32), stochastic
    (unbiased) or nearest rounding, one norm per bucket_size consecutive values (512, as
    QSGD's experiments; the variance grows with √bucket_size); schedule lowers (tighten)
    or raises (relax) the bits by one every bits_period versions, to bits_limit."""

    method: ClassVar[str] = "qsgd"
    bits: int = 8
    rounding: Rounding = "stochastic"
    bucket_size: int = DEFAULT_BUCKET_SIZE
    error_feedback: bool = False
    schedule: Direction = "constant"
    bits_period: int = 50
    bits_limit: int = 2


@dataclass(frozen=True)
class TopKQSGD(QSGD):
    """Top-k, then QSGD on the kept values (TEASQ-Fed's Q_q(TopK_s(Δ))), bucket_size
    consecutive kept values per norm."""

    method: ClassVar[str] = "topk_qsgd"

    ratio: float = 0.1
    ratio_gamma: float = 0.99
    ratio_limit: float = 0.01


COMPRESSIONS: Registry[Any] = Registry("compression")
for _name, _cls, _what in (
    ("none", NoCompression, "updates sent exactly"),
    ("topk", TopK, "the largest ratio of the update's entries"),
    ("randk", RandK, "a random ratio of the update's entries"),
    ("qsgd", QSGD, "every entry at q bits (QSGD)"),
    ("topk_qsgd", TopKQSGD, "top-k, then q-bit values (TEASQ-Fed)"),
):
    COMPRESSIONS.register(_name, _cls, _what)(_cls)


def compression_config(name: str, options: Any) -> CompressionConfig:
    """The validated :class:`CompressionConfig` of ``compression=name`` with its options."""
    fields: dict[str, Any] = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    return CompressionConfig(method=name, **fields)  # type: ignore[arg-type]
