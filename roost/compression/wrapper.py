"""``Compressed(algorithm, config)``: any model- or delta-uploading algorithm, compressed.

How to wrap::

    from roost.algorithms import FedAvg, FedAvgConfig
    from roost.compression import Compressed, CompressionConfig

    alg = Compressed(
        FedAvg(FedAvgConfig(lr=0.05)),
        CompressionConfig(method="topk_qsgd", ratio=0.1, bits=8, error_feedback=True),
    )
    # use `alg` wherever an Algorithm goes: make_strategy, update, client_state_spec, ...

The inner algorithm's client result must hold a ``"params"`` tensor (the trained model,
as FedAvg, FedProx, FedDyn, Ditto return) or a ``"delta"`` tensor (SCAFFOLD). Each task

1. runs the inner update unchanged (plain or generator procedure);
2. forms the update ``Δ = params − payload.params`` (or takes ``delta``);
3. with error feedback adds the client's residual, ``p = Δ + e_k`` (else ``p = Δ``);
4. encodes ``p`` into the real wire message and decodes it: ``Δ̃ = decode(encode(p))``
   is exactly what the server would receive;
5. returns ``payload.params + Δ̃`` as ``"params"`` (or ``Δ̃`` as ``"delta"``), so the
   inner server strategy aggregates it unchanged, and keeps ``e_k ← p − Δ̃``.

Other result tensors (SCAFFOLD's ``control_delta``) and scalars pass through uncompressed
and are counted as float32. Metrics added to the inner ones: ``upload_bytes`` (the real
length of the message plus 4 bytes per uncompressed element) and ``compression_error``
``||p − Δ̃|| / ||p||`` (0 for a zero update).

Exactness: with ``method="none"`` the inner result is returned untouched. A lossless
compressor (top-k with ratio 1, float32 values) transmits ``Δ`` bit for bit; the server's
``payload.params + Δ`` then equals the client's model exactly wherever the float32
subtraction ``params − payload.params`` was exact (Sterbenz: whenever the two are within
a factor 2 of each other, the usual case for one round of training), and is within one
rounding of it elsewhere.

The compressor at a task is the schedule's at the payload's model version ``t``
(:meth:`CompressionConfig.compressor`); its random draws come from a generator seeded by
the task seed alone, a stream separate from local training's.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from roost.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientResult,
    Payload,
    Strategy,
    Tensors,
    UpdateOutput,
    UpdateReturn,
)
from roost.compression.compressors import Compressor
from roost.compression.config import CompressionConfig
from roost.compression.error_feedback import EF_MEMORY, error_feedback_step

if TYPE_CHECKING:
    from roost.data.base import ClientData
    from roost.params import FlatModel

__all__ = ["Compressed", "compression_generator"]

_STREAM = 0x636F6D70  # "comp": the compression stream of a task seed


def compression_generator(seed: int) -> torch.Generator:
    """The CPU generator of a task's compression draws, from its seed only."""
    state = np.random.SeedSequence([seed % 2**64, _STREAM]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


class Compressed(Algorithm):
    """``algorithm`` whose uploaded update is compressed per ``compression`` (module doc).

    Delegates the strategy, local work, personal models and test-data needs to the inner
    algorithm; adds ``"ef_memory"`` (one float32 vector of the model's size) to its
    client state when error feedback is on.
    """

    def __init__(self, algorithm: Algorithm, compression: CompressionConfig) -> None:
        super().__init__(algorithm.config)
        if compression.error_feedback and EF_MEMORY in algorithm.client_state_spec(1):
            raise ValueError(f"{type(algorithm).__name__} already keeps a state named {EF_MEMORY}")
        self.inner = algorithm
        self.compression = compression
        # instance attributes shadowing the class-level ones, so callers see the inner's
        vars(self).update(
            name=algorithm.name, uses_client_test_data=algorithm.uses_client_test_data
        )

    def __repr__(self) -> str:
        return f"Compressed({self.inner!r}, {self.compression!r})"

    # ------------------------------------------------------------------ delegation

    def make_strategy(self) -> Strategy:
        return self.inner.make_strategy()

    def client_state_spec(self, num_params: int) -> dict[str, int]:
        spec = dict(self.inner.client_state_spec(num_params))
        if self.compression.error_feedback:
            spec[EF_MEMORY] = num_params
        return spec

    def evaluates_personal_models(self) -> bool:
        return self.inner.evaluates_personal_models()

    def personal_params(self, state: Tensors) -> torch.Tensor:
        return self.inner.personal_params({k: v for k, v in state.items() if k != EF_MEMORY})

    def work_examples(self, num_examples: int, settings: Mapping[str, Any] | None = None) -> int:
        return self.inner.work_examples(num_examples, settings)

    def request_points(self, settings: Mapping[str, Any] | None = None) -> tuple[float, ...]:
        return self.inner.request_points(settings)

    # ------------------------------------------------------------------ compression

    def compressor_at(self, version: int) -> Compressor | None:
        """The compressor of a task starting from model version ``version``."""
        return self.compression.compressor(version)

    def upload_nbytes(self, num_params: int, version: int = 0) -> int:
        """The inner upload with its model-sized float32 tensor replaced by the compressed
        message: ``inner − 4 n + compressor.nbytes(n)``, exact before compressing.

        With a decaying schedule the size depends on the model version; callers that do
        not pass ``version`` get the size at version 0.
        """
        inner = self.inner.upload_nbytes(num_params, version)
        compressor = self.compressor_at(version)
        if compressor is None:
            return inner
        return inner - 4 * num_params + compressor.nbytes(num_params)

    def decode_upload(self, name: str, data: bytes, payload: Payload) -> torch.Tensor:
        """The update's tensor rebuilt from its message, as the client rebuilt it in step 5:
        ``payload.params + decode(data)`` for ``"params"``, ``decode(data)`` for
        ``"delta"``. The message must be exactly the length of the task's compressor's
        message for the model (:meth:`Compressor.nbytes`) and pass its checks (header,
        CRC, settings, the model's length)."""
        compressor = self.compressor_at(payload.version)
        if compressor is None:
            return self.inner.decode_upload(name, data, payload)
        if name not in ("params", "delta"):
            raise ValueError(f"only 'params' or 'delta' travel compressed, not {name!r}")
        n = payload.params.numel()
        expected = compressor.nbytes(n)
        if len(data) != expected:
            raise ValueError(
                f"compressed {name!r} is {len(data)} bytes; {compressor.describe()} sends "
                f"{expected} for the model's {n} parameters"
            )
        received = compressor.decode(data)
        if received.numel() != n:
            raise ValueError(f"compressed {name!r} holds {received.numel()} values, not {n}")
        return payload.params + received if name == "params" else received

    def update(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> UpdateReturn:
        inner_state = None
        if state is not None:
            inner_state = {k: v for k, v in state.items() if k != EF_MEMORY} or None
        out = self.inner.update(ctx, model, data, payload, inner_state)
        if isinstance(out, UpdateOutput):
            return self._compress(ctx, payload, state, inner_state, out)
        return self._after(out, ctx, payload, state, inner_state)

    def _after(
        self,
        procedure: Generator[Any, Any, UpdateOutput],
        ctx: ClientContext,
        payload: Payload,
        state: Tensors | None,
        inner_state: Tensors | None,
    ) -> Generator[Any, Any, UpdateOutput]:
        out = yield from procedure
        return self._compress(ctx, payload, state, inner_state, out)

    def _compress(
        self,
        ctx: ClientContext,
        payload: Payload,
        state: Tensors | None,
        inner_state: Tensors | None,
        out: UpdateOutput,
    ) -> UpdateOutput:
        tensors = out.result.tensors
        if "params" in tensors:
            key = "params"
        elif "delta" in tensors:
            key = "delta"
        else:
            raise TypeError(
                f"Compressed needs a client result holding 'params' or 'delta'; "
                f"{type(self.inner).__name__} returns {sorted(tensors)}"
            )
        others = 4 * sum(t.numel() for name, t in tensors.items() if name != key)
        compressor = self.compressor_at(payload.version)
        if compressor is None:
            metrics = {
                **out.metrics,
                "upload_bytes": float(others + 4 * tensors[key].numel()),
                "compression_error": 0.0,
            }
            return UpdateOutput(out.result, out.state, metrics)

        x = tensors[key].detach()
        delta = x - payload.params if key == "params" else x
        memory = state.get(EF_MEMORY) if state is not None else None
        generator = compression_generator(ctx.seed) if compressor.randomized else None
        sent: list[bytes] = []

        def transmit(p: torch.Tensor) -> torch.Tensor:
            message = compressor.encode(p, generator)
            sent.append(message)
            return compressor.decode(message).to(p.device)

        step = error_feedback_step(delta, memory, transmit)
        norm = float(torch.linalg.vector_norm(step.corrected.double()))
        error = float(torch.linalg.vector_norm((step.corrected - step.transmitted).double()))
        received = payload.params + step.transmitted if key == "params" else step.transmitted
        result = ClientResult(
            {**tensors, key: received}, out.result.weight, out.result.scalars, {key: sent[0]}
        )

        new_state = out.state
        if self.compression.error_feedback:
            base = out.state if out.state is not None else (inner_state or {})
            new_state = {**base, EF_MEMORY: step.memory}
        metrics = {
            **out.metrics,
            "upload_bytes": float(others + len(sent[0])),
            "compression_error": error / norm if norm > 0 else 0.0,
        }
        return UpdateOutput(result, new_state, metrics)
