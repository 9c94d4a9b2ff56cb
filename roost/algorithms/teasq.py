"""TEASQ-Fed: time-efficient asynchronous FL with sparsification and quantisation.

Jia, Liu, Zhou, Tian, Dong, Dou, "Efficient Asynchronous Federated Learning with
Sparsification and Quantization" (TEASQ-Fed), Concurrency and Computation: Practice and
Experience, 2024 (doi 10.1002/cpe.8002; arXiv 2312.15186). The paper's body was not
read: only its abstract and third-party summaries (ALGORITHMS.md §2.8). The
structure below (devices apply for tasks under a concurrency cap, a proximal local
objective, compressed uploads, a server cache with staleness-weighted averaging) is the
summaries'; **every formula and default is inferred, paper-faithfulness not verified**.

Server state: the global model ``w``, its version ``t``, the tasks in flight ``A``, the
cache ``Q`` and the cap ``C``. Devices "actively apply for tasks": whenever a slot frees
(an arrival or a dropout) the engine dispatches an idle, available device from the
current model, so at most ``C`` tasks are in flight (:mod:`roost.engine.asynchronous`)::

    C = ⌈c · K⌉        (K clients, control parameter c in (0, 1]; ``concurrency`` overrides)

Device ``k``, given ``(w, t)``, runs ``E`` epochs of local SGD on the proximal objective
(the regularisation for non-IID data, as FedProx's, ALGORITHMS.md §4.2)::

    min_v  F_k(v) + (μ/2) ||v − w||²,        Δ_k = v − w

and uploads ``Δ_k`` compressed by :class:`~roost.compression.Compressed` (the library's
wrapper, not code in this module), top-k then QSGD with error feedback by default::

    p_k = Δ_k + e_k,   Δ̃_k = Q_{q_t}(TopK_{s_t}(p_k)),   e_k ← p_k − Δ̃_k

at the schedule's ``(s_t, q_t)`` for the version ``t`` the task started from
(:mod:`roost.compression.schedule`; e.g. ``tighten``: ``s_t = max(s_min, s_0 γ_s^t)``,
``q_t = max(q_min, q_0 − ⌊t / T_q⌋)``). The upload's size is the real message's,
:meth:`Compressor.nbytes <roost.compression.Compressor.nbytes>`.

The server, at version ``t`` when ``Δ̃_j`` arrives from a task that started at ``t_j``
(staleness ``d_j = t − t_j``, :attr:`Arrival.staleness
<roost.algorithms.asynchronous.Arrival.staleness>`), caches it; when ``|Q| >= M`` (or, with
``cache_timeout_s``, at the first arrival that finds the last step that long ago) it steps::

    ω_j = n_j s(d_j) / Σ_{i∈Q} n_i s(d_i),     s(d) = (1 + d)^(−a)
    w ← w + η_g Σ_{j∈Q} ω_j Δ̃_j,   t ← t + 1,   Q ← ∅

(``weighted=False`` drops the ``n_j``; ``staleness`` picks another ``s``,
:mod:`roost.algorithms.staleness`). Each step is one record; the engine records the
step's staleness, and its ``bytes_up`` (Σ of the delivered tasks' message sizes); the
wrapper adds the clients' mean ``client_upload_bytes`` and ``client_compression_error``.

Reduction (ALGORITHMS.md §5): with ``compression=none``, ``mu=0`` and ``cache_size`` =
concurrency, a step is FedBuff's buffered step with the weights ``ω_j`` above.

Inferred defaults [ALGORITHMS.md §2.8]: c = 0.1, M = 5, μ = 0.01, a = 0.5, s_0 = 0.1,
q_0 = 8, γ_s = 0.99, error feedback on. This module's own choices: the schedule's
direction (the summaries say the compression parameters decay; whether compression gets
stronger or weaker is unknown; the default is ``constant``: ``tighten``, the formula
ALGORITHMS.md writes, learned and then diverged on FEMNIST's CNN, docs/experiments.md),
s_min = 0.01, T_q = 50, q_min = 2 (the library's guesses), QSGD's buckets of 512 kept
values per norm (``bucket_size``, from QSGD's experiments: the sources do not say how
TEASQ-Fed scales its codes; a bucket of one model's size gives a single norm), the
``n_j`` factor of ω, η_g = 1 and no timer. Not modelled: the paper's latency models and
time-budget objective (the engine's system model provides the virtual time), compression
of the download.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from roost.algorithms.asynchronous import Arrival, AsyncStrategy, check_concurrency
from roost.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientOptimConfig,
    Contribution,
    Payload,
    Strategy,
    Tensors,
    UpdateOutput,
    UpdateReturn,
    register_algorithm,
)
from roost.algorithms.fedbuff import delta_update
from roost.algorithms.staleness import StalenessKind, check_staleness, staleness_weight
from roost.compression.config import CompressionConfig, Method
from roost.compression.quantize import DEFAULT_BUCKET_SIZE, Rounding
from roost.compression.schedule import Direction
from roost.data.base import ClientData
from roost.params import FlatModel
from roost.registry import ConfigError, check

if TYPE_CHECKING:
    from roost.compression.wrapper import Compressed

__all__ = [
    "TEASQ",
    "TEASQConfig",
    "TEASQDevice",
    "TEASQStrategy",
    "concurrency_cap",
]


@dataclass(frozen=True)
class TEASQConfig(ClientOptimConfig):
    """TEASQ-Fed's settings (module docstring; all inferred, paper-faithfulness not verified).

    Dispatch: concurrency_fraction c in (0, 1] (cap ⌈c · K⌉); concurrency, an explicit
    cap that overrides it (None: use c).
    Device: mu, the proximal coefficient μ >= 0 (0: plain local SGD).
    Compression (the fields of :class:`~roost.compression.CompressionConfig`, same names):
    compression, the method (none, topk, randk, qsgd, topk_qsgd); ratio s_0; bits q_0;
    rounding; bucket_size, the kept values per QSGD norm (512, QSGD's); rescale (randk
    only); error_feedback (ignored with compression=none);
    schedule (constant, tighten, relax); ratio_gamma γ_s; ratio_limit s_min / s_max;
    bits_period T_q; bits_limit q_min / q_max.
    Server: cache_size M; cache_timeout_s (None: no timer; else also step at the first
    arrival at least that many virtual seconds after the last step); staleness s(d)
    (polynomial (1 + d)^(−a) by default), staleness_a a, staleness_b (hinge only);
    weighted (ω ∝ n_j s(d_j), else ∝ s(d_j)); server_lr η_g.
    """

    concurrency_fraction: float = 0.1
    concurrency: int | None = None
    mu: float = 0.01
    compression: Method = "topk_qsgd"
    ratio: float = 0.1
    bits: int = 8
    rounding: Rounding = "stochastic"
    bucket_size: int = DEFAULT_BUCKET_SIZE
    rescale: bool = False
    error_feedback: bool = True
    schedule: Direction = "constant"
    ratio_gamma: float = 0.99
    ratio_limit: float = 0.01
    bits_period: int = 50
    bits_limit: int = 2
    cache_size: int = 5
    cache_timeout_s: float | None = None
    staleness: StalenessKind = "polynomial"
    staleness_a: float = 0.5
    staleness_b: float = 4.0
    weighted: bool = True
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            isinstance(self.concurrency_fraction, (int, float))
            and 0 < self.concurrency_fraction <= 1,
            "concurrency_fraction",
            self.concurrency_fraction,
            "must be a number in (0, 1]",
        )
        check_concurrency(self.concurrency)
        check(self.mu >= 0 and math.isfinite(self.mu), "mu", self.mu, "must be a number >= 0")
        check(self.cache_size >= 1, "cache_size", self.cache_size, "must be >= 1")
        check(
            self.cache_timeout_s is None or self.cache_timeout_s > 0,
            "cache_timeout_s",
            self.cache_timeout_s,
            "must be a number > 0 or none",
        )
        check_staleness(self.staleness, self.staleness_a, self.staleness_b)
        check(
            self.server_lr > 0 and math.isfinite(self.server_lr),
            "server_lr",
            self.server_lr,
            "must be a number > 0",
        )
        self.compression_config()  # validates the compression fields

    def compression_config(self) -> CompressionConfig:
        """The library's settings from this config's fields (error feedback only when
        something is compressed)."""
        try:
            return CompressionConfig(
                method=self.compression,
                ratio=self.ratio,
                bits=self.bits,
                rounding=self.rounding,
                bucket_size=self.bucket_size,
                rescale=self.rescale,
                error_feedback=self.error_feedback and self.compression != "none",
                schedule=self.schedule,
                ratio_gamma=self.ratio_gamma,
                ratio_limit=self.ratio_limit,
                bits_period=self.bits_period,
                bits_limit=self.bits_limit,
            )
        except ConfigError as e:
            if e.key != "method":
                raise
            raise ConfigError("compression", e.value, e.allowed) from None


def concurrency_cap(fraction: float, num_clients: int) -> int:
    """``C = ⌈c · K⌉`` (at least 1). ``c · K`` is rounded to 9 decimals first, so that a
    float product such as ``0.07 · 100 = 7.000000000000001`` gives 7, not 8."""
    return max(1, math.ceil(round(fraction * num_clients, 9)))


class TEASQStrategy(AsyncStrategy):
    """The cache and the step of the module docstring.

    The cache is kept as the running sums ``Σ n_j s(d_j) Δ̃_j`` (float64) and
    ``Σ n_j s(d_j)``: the normalised weights need nothing else, and memory stays one
    model whatever ``M``.
    """

    def __init__(self, cfg: TEASQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.concurrency = cfg.concurrency
        timer = cfg.cache_timeout_s is not None
        self.arrivals_per_step = None if timer else cfg.cache_size
        self.cache: torch.Tensor | None = None
        self.cache_weight = 0.0
        self.cached = 0
        self.last_step_s = 0.0

    def initialize(self, params: torch.Tensor, num_clients: int = 0) -> None:
        super().initialize(params, num_clients)
        if self.cfg.concurrency is None and num_clients > 0:
            self.concurrency = concurrency_cap(self.cfg.concurrency_fraction, num_clients)

    def weight(self, arrival: Arrival) -> float:
        """The unnormalised ``n_j s(d_j)`` (``s(d_j)`` with ``weighted=False``)."""
        c = self.cfg
        s = staleness_weight(c.staleness, arrival.staleness, c.staleness_a, c.staleness_b)
        return arrival.num_examples * s if c.weighted else s

    def accept(self, arrival: Arrival, contribution: Contribution) -> bool:
        weight = self.weight(arrival)
        delta = contribution.sums["delta"]  # float64: Σ w Δ̃ over this one result
        if self.cache is None:
            self.cache = torch.zeros_like(delta)
        self.cache.add_(delta, alpha=weight / contribution.weight)
        self.cache_weight += weight
        self.cached += 1
        timeout = self.cfg.cache_timeout_s
        full = self.cached >= self.cfg.cache_size
        if full or (timeout is not None and arrival.arrived_s - self.last_step_s >= timeout):
            self.last_step_s = arrival.arrived_s
            return True
        return False

    def arrivals_until_step(self) -> int | None:
        if self.cfg.cache_timeout_s is not None:
            return None
        return self.cfg.cache_size - self.cached

    def server_step(self, step: int) -> dict[str, float]:
        assert self.cache is not None
        if self.cache_weight > 0:
            scale = self.cfg.server_lr / self.cache_weight
            update = (self.cache * scale).to(torch.float32)
        else:  # every weight 0 (clients without examples): nothing to apply
            update = torch.zeros_like(self.params)
        self.params = self.params + update
        self.version += 1
        self.cache, self.cache_weight, self.cached = None, 0.0, 0
        return {"update_norm": float(torch.linalg.vector_norm(update))}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "cache": self.cache,
            "cache_weight": self.cache_weight,
            "cached": self.cached,
            "last_step_s": self.last_step_s,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        cache = state.get("cache")
        self.cache = None if cache is None else cache.clone()
        self.cache_weight = float(state.get("cache_weight", 0.0))
        self.cached = int(state.get("cached", 0))
        self.last_step_s = float(state.get("last_step_s", 0.0))


class TEASQDevice(Algorithm):
    """TEASQ-Fed without compression: the proximal delta update and the cache server.
    :class:`TEASQ` wraps it in :class:`~roost.compression.Compressed`."""

    Config = TEASQConfig
    config: TEASQConfig

    def make_strategy(self) -> Strategy:
        return TEASQStrategy(self.config)

    def update(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> UpdateOutput:
        cfg = self.task_config(ctx)
        return delta_update(ctx, model, data, payload, cfg, cfg.mu)


@register_algorithm("teasq")
class TEASQ(Algorithm):
    """TEASQ-Fed (Jia et al. 2024): capped async, proximal deltas, top-k + QSGD, cache."""

    compressible = False  # it compresses its own uploads (algorithm.compression=...)

    Config = TEASQConfig
    config: TEASQConfig

    def __init__(self, config: TEASQConfig) -> None:
        # imported here: roost.compression.wrapper imports roost.algorithms.base, so a
        # module-level import would make `import roost.compression` (first) circular
        from roost.compression.wrapper import Compressed

        super().__init__(config)
        self.device = TEASQDevice(config)
        self.compressed: Compressed = Compressed(self.device, config.compression_config())

    def __repr__(self) -> str:
        return f"TEASQ({self.compressed!r})"

    def make_strategy(self) -> Strategy:
        return self.compressed.make_strategy()

    def update(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> UpdateReturn:
        return self.compressed.update(ctx, model, data, payload, state)

    def client_state_spec(self, num_params: int) -> dict[str, int]:
        return self.compressed.client_state_spec(num_params)

    def upload_nbytes(self, num_params: int, version: int = 0) -> int:
        return self.compressed.upload_nbytes(num_params, version)

    def decode_upload(self, name: str, data: bytes, payload: Payload) -> torch.Tensor:
        return self.compressed.decode_upload(name, data, payload)

    def work_examples(self, num_examples: int, settings: Mapping[str, Any] | None = None) -> int:
        return self.compressed.work_examples(num_examples, settings)
