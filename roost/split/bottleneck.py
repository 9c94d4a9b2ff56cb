"""The compressing bottleneck at the cut: VCCprune's encoder, channel gate, top-b mask,
gate penalty, gate reset, the kept-channel messages and the deprune/prune schedules.

Compression-aware split learning (ALGORITHMS.md §2.7; the reference is
github:amudvari/VCCprune, ``deprune.py``, ``training.py``, ``models/vccModel.py`` and
``models/compressorVGG.py``, read for its facts) ends the device part with an
:class:`Encoder` and starts the server part with a :class:`Decoder`:

* ``Encoder``: ``Conv2d(C → C', kernel 2 + rc, stride rc, padding rc)``, ``BatchNorm2d``,
  sigmoid, then the channel gate ``z_c = s_c · sigmoid(p_c)`` with a learnable ``p ∈ R^{C'}``
  drawn as ``15 · U(0, 1)``. ``C' = C / feature_compression``, ``rc`` the resolution
  compression (1 = none).
* ``Decoder``: ``ConvTranspose2d(C' → C)`` with the encoder's kernel, stride and padding,
  ``BatchNorm2d``, ReLU. Both BatchNorms use ``momentum=0.03, eps=1e-4`` as the reference.

**Geometry.** The encoder maps a side ``H`` to ``H' = ⌊(H + rc - 2) / rc⌋ + 1`` and the
reference's transposed conv maps ``H'`` back to ``(H' - 2) · rc + 2``: with
``H - 2 = q · rc + r`` (``0 <= r < rc``) that is ``H - r``, so the reference restores ``H``
exactly only when ``(H - 2) % rc == 0`` (always for ``rc = 1``, even sides for ``rc = 2``;
VCCprune's 4x4 cut on CIFAR gives 4 → 3 → 4 for ``rc = 2`` but 4 → 2 → 2 for ``rc = 3``).
``Decoder(..., output_size=(H, W))`` asks the transposed conv for that size (it adds the
missing ``r`` as output padding), which restores every ``H``; without it the layer is the
reference's.

**Prune mode** (one step with budget ``b``): ``m_c = sigmoid(p_c)²``; the device keeps the
``b`` channels of largest ``m`` (:func:`top_b_mask`) and sends only those, in fp16
(:class:`KeptChannels`); the server computes ``L = CE(f_s(a), y)``, the device adds
:func:`gate_penalty` (``L`` total is :func:`prune_loss`), and the server's gradient on ``a``
travels back for the kept channels only (:class:`KeptGradient`).

What the reference does on the points the brief asked to check:

* *Mask values.* VCCprune's mask is ``m_c = sigmoid(p_c)²`` with the entries below the
  ``b``-th largest set to 0, and it multiplies the (already gated) activations by those
  ``m_c``, not by 1: a kept channel reaches the server as ``s_c · sigmoid(p_c)³``.
  :func:`weighted_top_b_mask` is that mask, :func:`top_b_mask` the 0/1 one; every message
  here takes either (``PhaseSchedule.weighted_mask`` says which the reference uses: the
  weighted one). The mask carries no gradient in the reference (it multiplies detached
  values); here both masks are detached too.
* *Ties.* The reference keeps every channel with ``m_c >=`` the ``b``-th largest value, so
  ties at the boundary keep more than ``b`` channels (common right after a gate reset,
  which sets many ``p_c`` to exactly 15). Here exactly ``b`` are kept (see
  :func:`top_b_mask`).
* *Order of rounding.* The reference casts the activations to fp16 *then* multiplies by
  the float32 mask, so the server's input is ``fp16(z) · m`` in float32, which is not an
  fp16 value; here the product is rounded, ``fp16(z ⊙ m)``, which is what an fp16 link
  carries (the same for the 0/1 mask).
* *Gradient back.* ``deprune.py`` (``pruneBackward=True``) multiplies the server's
  gradient by the same mask (the ``m_c`` values) and sends the **full** ``(N, C', H, W)``
  float32 tensor, zeros in the pruned channels; only the kept channels carry anything,
  so :class:`KeptGradient` sends just those (the device knows their indices). Sending
  ``∂L/∂a`` on the kept channels and multiplying by ``m`` at the device is the same
  ``∂L/∂a ⊙ m``. ``training.py``'s ``prune`` (the *prune* schedule) does **not** mask: it
  sends the full, unmasked gradient (``Phase.masked_backward``). The reference's
  gradient is not cast to fp16.
* *Gate reset.* ``resetdePrune`` compares the **raw** ``p_c`` (not ``sigmoid(p_c)`` or
  ``m_c``) with 0.9: ``p_c < 0.9`` is redrawn from ``U(0, rsv)``, the others become
  ``+15`` (:func:`reset_gates`). Its signature defaults ``rsv`` to 3 on the model and the
  encoder, and ``deprune.depruning`` passes ``rightSideValue=1`` by default, 3 from its
  ``__main__``.
* *Gate training.* The reference's encoder would freeze ``p`` when called with
  ``prune=False`` (``requires_grad_(False)``), but its ``VGG.forward`` never passes the
  flag on: the ``nn.Sequential`` calls the encoder with its default ``prune=True``. So
  ``p`` is trained in every phase, in normal phases (deprune's phase 3, the prune
  schedule's first) by the cross-entropy through the gate alone, with weight decay.
  ``Phase.train_gate`` is True in both schedules; False would be the evident intent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from roost.split.messages import WIRE_DTYPES, label_dtype

__all__ = [
    "GATE_RESET_THRESHOLD",
    "GATE_SCALE",
    "Decoder",
    "Encoder",
    "KeptActivations",
    "KeptChannels",
    "KeptGradient",
    "Phase",
    "PhaseSchedule",
    "deprune_schedule",
    "gate_penalty",
    "prune_loss",
    "prune_schedule",
    "reset_gates",
    "top_b_mask",
    "weighted_top_b_mask",
]

GATE_SCALE = 15.0
"""The gate's scale: ``p`` starts as ``15 · U(0, 1)`` and a reset sets kept gates to 15."""

GATE_RESET_THRESHOLD = 0.9
""":func:`reset_gates` redraws the raw gates ``p_c`` below this value."""

_BN_MOMENTUM = 0.03
_BN_EPS = 1e-4


# --- validation -----------------------------------------------------------------------


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value <= high)
    ):
        return value
    allowed = f"an integer in {low} .. {high}" if high is not None else f"an integer >= {low}"
    raise ValueError(f"{name}={value!r}: must be {allowed}")


def _check_float(
    name: str, value: object, low: float, *, strict: bool = True, high: float | None = None
) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        if math.isfinite(v) and (v > low if strict else v >= low) and (high is None or v < high):
            return v
    lower = f"> {low}" if strict else f">= {low}"
    upper = f" and < {high}" if high is not None else ""
    raise ValueError(f"{name}={value!r}: must be a finite number {lower}{upper}")


def _check_gates(p: torch.Tensor) -> None:
    if p.dim() != 1 or p.numel() == 0:
        raise ValueError(
            f"gate parameters p must be a non-empty 1-D tensor (one per channel), "
            f"got shape {tuple(p.shape)}"
        )


def _check_mask(mask: torch.Tensor, channels: int) -> None:
    if mask.dim() != 1 or mask.numel() != channels:
        raise ValueError(
            f"mask must be a 1-D tensor of {channels} channel values, got shape {tuple(mask.shape)}"
        )


# --- the layers -----------------------------------------------------------------------


def _geometry(resolution_compression: int, flat: bool = False) -> tuple[int, int, int]:
    """Kernel, stride and padding of the encoder's conv (and the decoder's transposed
    conv) for resolution compression ``rc``: ``(2 + rc, rc, rc)``; on features (1 x 1
    maps, ``flat``) a pointwise ``(1, 1, 0)``, the same map without the weights a 3 x 3
    kernel would hold outside its centre."""
    if flat:
        return 1, 1, 0
    rc = resolution_compression
    return 2 + rc, rc, rc


def _compressed_channels(channels: int, feature_compression: int) -> int:
    _check_int("feature_compression", feature_compression, 1)
    if channels % feature_compression:
        raise ValueError(
            f"feature_compression={feature_compression}: must divide the {channels} "
            f"channels at the cut (C' = C / feature_compression)"
        )
    return channels // feature_compression


class Encoder(nn.Module):
    """The device's last layer: ``C → C'`` channels, resolution ``H → H'``, values in (0, 1).
    ``(N, C)`` features are taken as ``C`` channels of ``1 x 1`` (``flat``: with a
    pointwise conv).

    ``forward(x) = sigmoid(BN(conv(x))) · sigmoid(gate)`` (the gate broadcast over H, W),
    times, in prune mode (the buffer ``budget`` set to ``b > 0``), the reference's mask
    :func:`weighted_top_b_mask` (``weighted_mask = False``: the 0/1 :func:`top_b_mask`),
    detached: the channels left out are 0 in training and in evaluation alike. ``gate``
    is the learnable ``p ∈ R^{C'}``, drawn as ``15 · U(0, 1)`` from ``generator``
    (torch's global generator if None).
    """

    budget: torch.Tensor

    def __init__(
        self,
        in_channels: int,
        feature_compression: int = 1,
        resolution_compression: int = 1,
        *,
        generator: torch.Generator | None = None,
        flat: bool = False,
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        out = _compressed_channels(in_channels, feature_compression)
        _check_int("resolution_compression", resolution_compression, 1)
        if flat and resolution_compression != 1:
            raise ValueError(
                f"resolution_compression={resolution_compression}: features have no "
                "resolution to compress (1)"
            )
        kernel, stride, padding = _geometry(resolution_compression, flat)
        self.flat = flat
        self.in_channels = in_channels
        self.feature_compression = feature_compression
        self.resolution_compression = resolution_compression
        self.conv = nn.Conv2d(in_channels, out, kernel, stride=stride, padding=padding)
        self.bn = nn.BatchNorm2d(out, momentum=_BN_MOMENTUM, eps=_BN_EPS)
        self.gate = nn.Parameter(GATE_SCALE * torch.rand(out, generator=generator))
        self.weighted_mask = True
        # prune mode's budget b (0: no mask); a buffer, so the model carries its mode
        # to wherever it runs, evaluation included
        self.register_buffer("budget", torch.zeros(()))

    @property
    def out_channels(self) -> int:
        """``C' = C / feature_compression``."""
        return self.conv.out_channels

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H', W')`` of an ``H x W`` input: ``⌊(H + rc - 2) / rc⌋ + 1`` per side."""
        rc = self.resolution_compression
        return (height + rc - 2) // rc + 1, (width + rc - 2) // rc + 1

    def decoder(self, output_size: tuple[int, int] | None = None) -> Decoder:
        """The matching :class:`Decoder` (same ``C``, compressions)."""
        return Decoder(
            self.in_channels,
            self.feature_compression,
            self.resolution_compression,
            output_size=output_size,
            flat=self.flat,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # features (N, C) as C channels of 1 x 1 (a cut in an MLP)
            x = x[:, :, None, None]
        z = torch.sigmoid(self.bn(self.conv(x)))
        z = z * torch.sigmoid(self.gate).view(1, -1, 1, 1)
        b = self.kept
        if b:
            mask = (weighted_top_b_mask if self.weighted_mask else top_b_mask)(self.gate, b)
            z = z * mask.view(1, -1, 1, 1)
        return z

    @property
    def kept(self) -> int:
        """The budget ``b`` of prune mode, 0 in normal mode."""
        return round(float(self.budget))


class Decoder(nn.Module):
    """The server's first layer: ``C' → C`` channels, ``ConvTranspose2d`` + BN + ReLU.

    ``channels`` is ``C``, the channel count the matching :class:`Encoder` takes. Without
    ``output_size`` the transposed conv is the reference's and restores a side ``H`` only
    when ``(H - 2) % rc == 0`` (module docstring); with ``output_size=(H, W)`` every
    output is ``H x W``. ``flat``: return ``(N, C)`` features (a cut in an MLP, whose
    encoder took them as ``C`` channels of ``1 x 1``).
    """

    def __init__(
        self,
        channels: int,
        feature_compression: int = 1,
        resolution_compression: int = 1,
        *,
        output_size: tuple[int, int] | None = None,
        flat: bool = False,
    ) -> None:
        super().__init__()
        _check_int("channels", channels, 1)
        self.flat = flat
        compressed = _compressed_channels(channels, feature_compression)
        _check_int("resolution_compression", resolution_compression, 1)
        if output_size is not None:
            if len(output_size) != 2:
                raise ValueError(f"output_size={output_size!r}: must be (height, width)")
            for side in output_size:
                _check_int("output_size", side, 1)
        kernel, stride, padding = _geometry(resolution_compression, flat)
        self.resolution_compression = resolution_compression
        self.target_size = None if output_size is None else (output_size[0], output_size[1])
        self.conv = nn.ConvTranspose2d(compressed, channels, kernel, stride=stride, padding=padding)
        self.bn = nn.BatchNorm2d(channels, momentum=_BN_MOMENTUM, eps=_BN_EPS)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H, W)`` of an ``H' x W'`` input: ``output_size`` if given, else
        ``(H' - 2) · rc + 2`` per side."""
        if self.target_size is not None:
            return self.target_size
        rc = self.resolution_compression
        return (height - 2) * rc + 2, (width - 2) * rc + 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.target_size is None:
            y = self.conv(x)
        else:
            y = self.conv(x, output_size=list(self.target_size))
        y = torch.relu(self.bn(y))
        return y.flatten(1) if self.flat else y


def insert_bottleneck(
    module: nn.Module,
    cut: int,
    example: torch.Tensor,
    feature_compression: int = 1,
    resolution_compression: int = 1,
) -> nn.Sequential:
    """``module`` (an ``nn.Sequential``) with an :class:`Encoder` after its ``cut``-th
    top-level layer and the matching :class:`Decoder` (restoring the activations' size)
    right after it, so the model cut after the encoder (``cut + 1``) sends the encoder's
    output. The activations' shape at the cut comes from ``example`` (a batch of inputs):
    ``(N, C, H, W)``, or ``(N, C)`` features (an MLP), taken as ``C`` channels of 1 x 1
    with pointwise convolutions.
    The gate is drawn from torch's global generator."""
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"a bottleneck goes into an nn.Sequential, not {type(module).__name__}")
    children = list(module.children())
    _check_int("cut", cut, 1, len(children) - 1)
    head = nn.Sequential(*children[:cut])
    training = module.training
    module.eval()
    with torch.no_grad():
        a = head(example[:1])
    module.train(training)
    if a.dim() == 4:
        channels, size, flat = a.shape[1], (a.shape[2], a.shape[3]), False
    elif a.dim() == 2:
        if resolution_compression != 1:
            raise ValueError(
                f"resolution_compression={resolution_compression}: the activations at cut "
                f"{cut} are features {tuple(a.shape[1:])}, with no resolution to compress (1)"
            )
        channels, size, flat = a.shape[1], (1, 1), True
    else:
        raise ValueError(
            f"the activations at cut {cut} have shape {tuple(a.shape[1:])}; a bottleneck "
            "takes (C, H, W) maps or (C,) features"
        )
    encoder = Encoder(channels, feature_compression, resolution_compression, flat=flat)
    decoder = Decoder(
        channels, feature_compression, resolution_compression, output_size=size, flat=flat
    )
    return nn.Sequential(*children[:cut], encoder, decoder, *children[cut:])


# --- mask, penalty, reset -------------------------------------------------------------


def top_b_mask(p: torch.Tensor, b: int) -> torch.Tensor:
    """The 0/1 float mask (shape ``(C',)``, detached) keeping the ``b`` channels of
    largest ``m_c = sigmoid(p_c)²``.

    Exactly ``b`` entries are 1. Channels are ranked by the raw ``p_c`` (``sigmoid²`` is
    increasing, so it is the same order as ``m``, without ``m``'s float32 saturation:
    ``sigmoid(p)`` rounds to 1.0 for ``p`` above about 16.6); equal ``p_c`` are ranked by
    **lower channel index first**. ValueError unless ``p`` is 1-D and ``1 <= b <= C'``.
    """
    _check_gates(p)
    _check_int("b", b, 1, p.numel())
    p = p.detach()
    order = torch.sort(p, descending=True, stable=True).indices[:b]
    mask = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    mask[order] = 1.0
    return mask


def weighted_top_b_mask(p: torch.Tensor, b: int) -> torch.Tensor:
    """VCCprune's mask: ``m_c = sigmoid(p_c)²`` on the :func:`top_b_mask` channels, 0 on
    the others (float32, detached)."""
    keep = top_b_mask(p, b)
    return torch.sigmoid(p.detach().to(torch.float32)).square() * keep


def gate_penalty(p: torch.Tensor, b: int, eps: float = 1000.0, delta: float = 1e-3) -> torch.Tensor:
    """``eps · (exp(δ(S - b)) + exp(-δ(S - b)))`` with ``S = Σ_c sigmoid(p_c)²``: a
    ``2 eps cosh`` well whose minimum ``2 eps`` is at ``S = b`` (differentiable in ``p``).
    """
    _check_gates(p)
    _check_int("b", b, 1, p.numel())
    _check_float("eps", eps, 0.0)
    _check_float("delta", delta, 0.0)
    excess = delta * (torch.sigmoid(p).square().sum() - b)
    return eps * (torch.exp(excess) + torch.exp(-excess))


def prune_loss(
    ce: torch.Tensor, p: torch.Tensor, b: int, eps: float = 1000.0, delta: float = 1e-3
) -> torch.Tensor:
    """Prune mode's loss ``CE + gate_penalty(p, b, eps, delta)`` (the reference's default
    ``eps = 1000, δ = 0.001``; ``deprune.py``'s ``__main__`` runs ``δ = 0.1``)."""
    return ce + gate_penalty(p, b, eps, delta)


def reset_gates(
    p: torch.Tensor,
    right_side_value: float = 1.0,
    generator: torch.Generator | None = None,
) -> None:
    """VCCprune's ``resetdePrune``, in place: raw gates ``p_c < 0.9`` are redrawn from
    ``U(0, right_side_value)`` (in channel order, one ``torch.rand`` draw of their count
    from ``generator``), the others set to ``+15``. ``p`` keeps its ``requires_grad``;
    reset optimiser state that refers to it yourself (the reference builds new optimisers).
    """
    _check_gates(p)
    rsv = _check_float("right_side_value", right_side_value, 0.0)
    with torch.no_grad():
        low = p < GATE_RESET_THRESHOLD
        count = int(low.sum())
        drawn = torch.rand(count, generator=generator, dtype=torch.float32) * rsv
        p.masked_fill_(~low, GATE_SCALE)
        p[low] = drawn.to(dtype=p.dtype, device=p.device)


# --- the messages ---------------------------------------------------------------------


def _wire(dtype: torch.dtype) -> torch.dtype:
    if dtype not in WIRE_DTYPES.values():
        raise ValueError(f"dtype={dtype}: wire dtypes are {', '.join(WIRE_DTYPES)}")
    return dtype


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _kept_indices(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask.detach(), as_tuple=True)[0]


@dataclass(frozen=True)
class KeptChannels:
    """Device to server in prune mode: the kept channels of ``(N, C', H, W)`` activations.

    ``values`` is ``(N, b, H, W)`` in the wire dtype (fp16 by default), ``indices`` the
    ``b`` kept channel ids in increasing order, as the smallest integer type holding
    ``0 .. C' - 1`` (:func:`~roost.split.messages.label_dtype`: uint8 up to 256 channels,
    int16 up to 32,768). ``nbytes = N·b·H·W·2 + b·(index size)`` for fp16: the payload,
    without the labels (they travel as in :class:`~roost.split.messages.Activations`) and
    without ``C'``, which both ends know from the model.
    """

    values: torch.Tensor
    indices: torch.Tensor
    num_channels: int

    @staticmethod
    def of(
        activations: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype = torch.float16
    ) -> KeptChannels:
        """What the device sends: the channels where ``mask`` is nonzero, multiplied by
        the mask (1 for :func:`top_b_mask`, ``m_c`` for :func:`weighted_top_b_mask`),
        then cast to ``dtype`` (detached)."""
        if activations.dim() != 4:
            raise ValueError(
                f"activations must be (N, C', H, W), got shape {tuple(activations.shape)}"
            )
        channels = activations.shape[1]
        _check_mask(mask, channels)
        kept = _kept_indices(mask)
        scale = mask.detach().to(torch.float32)[kept].view(1, -1, 1, 1)
        values = (activations.detach().to(torch.float32)[:, kept] * scale).to(_wire(dtype))
        return KeptChannels(values, kept.to(label_dtype(channels)), channels)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.values) + _nbytes(self.indices)

    def received(self) -> torch.Tensor:
        """The server's float32 leaf ``(N, C', H, W)`` (gradients are taken with respect
        to it): the sent values in their channels, zeros in the pruned ones."""
        n, _, h, w = self.values.shape
        full = torch.zeros(
            n, self.num_channels, h, w, dtype=torch.float32, device=self.values.device
        )
        full[:, self.indices.to(torch.int64)] = self.values.to(torch.float32)
        return full.requires_grad_(True)  # a new leaf


@dataclass(frozen=True)
class KeptActivations:
    """A prune-mode message as it travels: the :class:`KeptChannels` and the labels of
    the examples they came from (in :func:`~roost.split.messages.label_dtype`).
    ``nbytes`` counts both."""

    kept: KeptChannels
    labels: torch.Tensor

    @staticmethod
    def of(
        activations: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor,
        dtype: torch.dtype,
        num_classes: int,
    ) -> KeptActivations:
        kept = KeptChannels.of(activations, mask, dtype)
        return KeptActivations(kept, labels.detach().to(label_dtype(num_classes)))

    @property
    def values(self) -> torch.Tensor:
        return self.kept.values

    @property
    def nbytes(self) -> int:
        return self.kept.nbytes + _nbytes(self.labels)

    def received(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The server's float32 leaf (:meth:`KeptChannels.received`) and int64 labels."""
        return self.kept.received(), self.labels.to(torch.int64)


@dataclass(frozen=True)
class KeptGradient:
    """Server to device in prune mode: ``∂L/∂a`` on the kept channels only.

    ``values`` is ``(N, b, H, W)`` in the wire dtype (float32 by default, as the
    reference's gradient); ``indices`` and ``num_channels`` are the uplink's, which the
    device chose and knows, so ``nbytes`` counts ``values`` only.
    """

    values: torch.Tensor
    indices: torch.Tensor
    num_channels: int

    @staticmethod
    def of(
        grad: torch.Tensor, sent: KeptChannels, dtype: torch.dtype = torch.float32
    ) -> KeptGradient:
        """The server's reply to ``sent``: ``grad`` (``(N, C', H, W)``, the gradient on
        :meth:`KeptChannels.received`) on the kept channels, cast to ``dtype``."""
        expected = (sent.values.shape[0], sent.num_channels, *sent.values.shape[2:])
        if tuple(grad.shape) != expected:
            raise ValueError(
                f"grad must have the received activations' shape {expected}, got "
                f"{tuple(grad.shape)}"
            )
        index = sent.indices.to(torch.int64)
        return KeptGradient(grad.detach()[:, index].to(_wire(dtype)), index, sent.num_channels)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.values)

    def received(self, mask: torch.Tensor) -> torch.Tensor:
        """The float32 ``(N, C', H, W)`` gradient the device back-propagates through its
        encoder output ``z``: ``∂L/∂a ⊙ mask`` (``a = z ⊙ mask``), zeros in the pruned
        channels — the reference's ``pruneBackward`` gradient. ``mask`` is the one the
        uplink used."""
        _check_mask(mask, self.num_channels)
        n, _, h, w = self.values.shape
        full = torch.zeros(
            n, self.num_channels, h, w, dtype=torch.float32, device=self.values.device
        )
        scale = mask.detach().to(torch.float32)[self.indices].view(1, -1, 1, 1)
        full[:, self.indices] = self.values.to(torch.float32) * scale
        return full


# --- the schedules --------------------------------------------------------------------

Mode = Literal["prune", "normal"]


@dataclass(frozen=True)
class Phase:
    """One phase of a schedule, as data.

    * ``mode``: ``"prune"`` (top-``budget`` mask, :func:`prune_loss`, :class:`KeptChannels`)
      or ``"normal"`` (gate applied, no mask, all ``C'`` channels travel, plain CE);
    * ``lrs``: the learning rate of each epoch (``len(lrs)`` epochs; SGD, optimisers new
      at the phase's start);
    * ``train_gate``: whether ``p`` is trained (always, in the reference: module docstring);
    * ``reset_gates_before``: :func:`reset_gates` runs before the phase's first epoch;
    * ``wire``: the activations' wire dtype (a name of
      :data:`~roost.split.messages.WIRE_DTYPES`);
    * ``masked_backward``: prune mode sends the gradient masked (:class:`KeptGradient`,
      ``deprune.py``) or full and unmasked (``training.py``).
    """

    mode: Mode
    budget: int | None
    lrs: tuple[float, ...]
    momentum: float = 0.0
    weight_decay: float = 5e-4
    train_gate: bool = True
    reset_gates_before: bool = False
    wire: str = "float16"
    masked_backward: bool = True

    def __post_init__(self) -> None:
        if self.mode == "prune":
            _check_int("budget", self.budget, 1)
        elif self.mode == "normal":
            if self.budget is not None:
                raise ValueError(f"budget={self.budget!r}: a normal phase has no budget (None)")
        else:
            raise ValueError(f"mode={self.mode!r}: must be 'prune' or 'normal'")
        object.__setattr__(self, "lrs", tuple(self.lrs))
        for lr in self.lrs:
            _check_float("lr", lr, 0.0)
        _check_float("momentum", self.momentum, 0.0, strict=False, high=1.0)
        _check_float("weight_decay", self.weight_decay, 0.0, strict=False)
        if self.wire not in WIRE_DTYPES:
            raise ValueError(f"wire={self.wire!r}: must be one of {', '.join(WIRE_DTYPES)}")

    @property
    def epochs(self) -> int:
        return len(self.lrs)


@dataclass(frozen=True)
class PhaseSchedule:
    """A deprune or prune run: its phases in order and the settings they share
    (``right_side_value`` is :func:`reset_gates`'s; ``weighted_mask`` says whether prune
    mode multiplies by :func:`weighted_top_b_mask`, as the reference, or the 0/1 mask)."""

    phases: tuple[Phase, ...]
    batch_size: int = 16
    eps: float = 1000.0
    delta: float = 1e-3
    right_side_value: float = 1.0
    weighted_mask: bool = True

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("phases: a schedule has at least one phase")
        _check_int("batch_size", self.batch_size, 1)
        _check_float("eps", self.eps, 0.0)
        _check_float("delta", self.delta, 0.0)
        _check_float("right_side_value", self.right_side_value, 0.0)

    @property
    def epochs(self) -> int:
        """All phases' epochs."""
        return sum(phase.epochs for phase in self.phases)

    @property
    def lrs(self) -> tuple[float, ...]:
        """The learning rate of every epoch, phase after phase."""
        return tuple(lr for phase in self.phases for lr in phase.lrs)


def _boosted(epochs: int, boost_lr: float, boost_epochs: int, lr: float) -> tuple[float, ...]:
    return tuple(boost_lr if t < boost_epochs else lr for t in range(epochs))


def deprune_schedule(
    *,
    prune_1_budget: int = 16,
    prune_1_epochs: int = 15,
    prune_2_budget: int = 4,
    prune_2_epochs: int = 15,
    training_epochs: int = 50,
    lr: float = 1e-2,
    boost_lr: float = 5e-2,
    boost_epochs: int = 3,
    right_side_value: float = 1.0,
    eps: float = 1000.0,
    delta: float = 1e-3,
    batch_size: int = 16,
    weight_decay: float = 5e-4,
) -> PhaseSchedule:
    """``deprune.depruning``'s defaults: prune with ``b1`` for ``e1`` epochs at ``lr``;
    reset the gates; prune with ``b2`` for ``e2`` epochs, ``boost_lr`` for the first
    ``boost_epochs`` then ``lr``; reset again; normal training (gate applied and trained,
    no mask: all ``C'`` channels travel, fp16) for ``e3`` epochs at ``lr``. SGD without
    momentum, weight decay 5e-4, batch 16, masked gradient back. Epoch counts may be 0
    (the resets still happen)."""
    _check_int("prune_1_budget", prune_1_budget, 1)
    _check_int("prune_2_budget", prune_2_budget, 1)
    _check_int("prune_1_epochs", prune_1_epochs, 0)
    _check_int("prune_2_epochs", prune_2_epochs, 0)
    _check_int("training_epochs", training_epochs, 0)
    _check_float("lr", lr, 0.0)
    _check_float("boost_lr", boost_lr, 0.0)
    _check_int("boost_epochs", boost_epochs, 0)
    phases = (
        Phase("prune", prune_1_budget, (lr,) * prune_1_epochs, weight_decay=weight_decay),
        Phase(
            "prune",
            prune_2_budget,
            _boosted(prune_2_epochs, boost_lr, boost_epochs, lr),
            weight_decay=weight_decay,
            reset_gates_before=True,
        ),
        Phase(
            "normal",
            None,
            (lr,) * training_epochs,
            weight_decay=weight_decay,
            reset_gates_before=True,
        ),
    )
    return PhaseSchedule(phases, batch_size, eps, delta, right_side_value, weighted_mask=True)


def prune_schedule(
    *,
    training_epochs: int = 50,
    prune_phases: Sequence[tuple[int, int]] = ((16, 15), (4, 15)),
    training_lr: float = 1e-3,
    training_momentum: float = 0.9,
    lr: float = 1e-2,
    boost_lr: float = 5e-2,
    lr_boost_epoch: int = 3,
    masked_backward: bool = False,
    eps: float = 1000.0,
    delta: float = 1e-3,
    batch_size: int = 16,
    weight_decay: float = 5e-4,
) -> PhaseSchedule:
    """``training.training`` with ``lr_boost=True``: normal split training (gate applied
    and trained, no mask, float32 wire as its ``train``) for ``training_epochs`` at
    ``training_lr`` with momentum 0.9; then one prune phase per ``(budget, epochs)`` of
    ``prune_phases``, SGD without momentum at ``boost_lr`` for the first
    ``lr_boost_epoch`` epochs then ``lr``.
    No gate resets. ``masked_backward=False`` is the reference's (its ``prune`` sends the
    full, unmasked gradient).

    The reference's second prune phase differs: it switches to ``lr_boost_lr`` (default
    5e-2, so no drop; 5e-3 in its ``__main__``) at ``lr_boost_epoch``; here every prune
    phase follows the first's ``5e-2 → 1e-2``. With ``lr_boost=False`` (its default) the
    prune phases keep the training optimiser (1e-3, momentum 0.9).
    """
    _check_int("training_epochs", training_epochs, 0)
    _check_float("training_lr", training_lr, 0.0)
    _check_float("training_momentum", training_momentum, 0.0, strict=False, high=1.0)
    _check_float("lr", lr, 0.0)
    _check_float("boost_lr", boost_lr, 0.0)
    _check_int("lr_boost_epoch", lr_boost_epoch, 0)
    if not prune_phases:
        raise ValueError("prune_phases: give at least one (budget, epochs) pair")
    phases = [
        Phase(
            "normal",
            None,
            (training_lr,) * training_epochs,
            momentum=training_momentum,
            weight_decay=weight_decay,
            wire="float32",
        )
    ]
    for i, pair in enumerate(prune_phases):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"prune_phases[{i}]={pair!r}: must be a (budget, epochs) pair")
        budget, epochs = pair
        _check_int(f"prune_phases[{i}] budget", budget, 1)
        _check_int(f"prune_phases[{i}] epochs", epochs, 0)
        phases.append(
            Phase(
                "prune",
                budget,
                _boosted(epochs, boost_lr, lr_boost_epoch, lr),
                momentum=0.0,
                weight_decay=weight_decay,
                wire="float16",
                masked_backward=masked_backward,
            )
        )
    return PhaseSchedule(tuple(phases), batch_size, eps, delta, weighted_mask=True)
