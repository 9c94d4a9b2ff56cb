"""deprune and prune: compression-aware split learning with a learnable channel gate.

Mudvari, Vainio, Tassiulas et al., "Adaptive Compression-Aware Split Learning and
Inference for Enhanced Network Efficiency" (arXiv 2311.05739); reference code
github.com/amudvari/VCCprune; ALGORITHMS.md §2.7. The model, cut after its ``cut``-th
top-level layer, gets a bottleneck there (:func:`~roost.split.bottleneck.insert_bottleneck`):
the device part ends with an encoder (conv to ``C' = C / feature_compression`` channels,
BatchNorm, sigmoid, then the channel gate ``z_c ← z_c σ(p_c)`` with learnable ``p``) and
the server part starts with the matching decoder. Training runs in *phases*
(:func:`~roost.split.bottleneck.deprune_schedule`, ``schedule=deprune``, or
:func:`~roost.split.bottleneck.prune_schedule`, ``schedule=prune``):

* **prune mode**, budget ``b``: the device keeps the ``b`` channels of largest
  ``m_c = σ(p_c)²`` (the reference's weighted mask ``m``: ``m_c`` on them, 0 elsewhere),
  sends only those, ``a = z ⊙ m`` in fp16 with their indices
  (:class:`~roost.split.bottleneck.KeptChannels`), and the loss is
  ``CE(f_s(a), y) + ε (exp(δ(Σ_c σ(p_c)² − b)) + exp(−δ(Σ_c σ(p_c)² − b)))``: the server
  back-propagates the cross-entropy and returns ``∂L/∂a`` on the kept channels (deprune,
  float32; ``prune`` sends the whole unmasked gradient, as ``training.py`` does: the
  device's chain rule through ``a = z ⊙ m`` makes the two the same gradient), the device
  adds the penalty's gradient on ``p``;
* **normal mode**: no mask, every channel travels (in the phase's wire dtype), plain CE;
* between deprune's phases the server resets the gates (raw ``p_c < 0.9`` redrawn from
  ``U(0, right_side_value)``, the others set to 15;
  :func:`~roost.split.bottleneck.reset_gates`, from a generator seeded with the round).

Federated, each round is one epoch of the schedule: every selected device trains
``local_epochs`` epochs (1 by default) with that epoch's mode, budget, learning rate and
momentum, through its own server replica, and the round averages both parts as SplitFed
v1 does (``weighted``: by examples). After the schedule's last epoch training goes on as
its last epoch (an MLP's cut, whose bottleneck's BatchNorm sees 1 x 1 maps, skips
minibatches of a single example: BatchNorm needs two values per channel). Defaults are
the reference's: batch 16, SGD with weight decay 5e-4,
fp16 activations, ``b1 = 16`` for 15 epochs at lr 1e-2, ``b2 = 4`` for 15 epochs (5e-2
for 3, then 1e-2), 50 normal epochs, ``ε = 1000``, ``δ = 0.001``, ``rsv = 1``; a budget
must not exceed the encoder's ``C'`` (a bottleneck at a cut of 64 channels, as the
quickstart's MLP, keeps 16 then 4 of them).

The client metrics say what travelled: ``kept_channels`` (``b``, or ``C'`` in normal
mode), ``cut_bytes_up`` and ``cut_bytes_down`` per task, and ``gate_penalty``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from roost.algorithms.base import (
    ClientContext,
    ClientResult,
    Payload,
    Strategy,
    Tensors,
    UpdateOutput,
    register_algorithm,
)
from roost.algorithms.fedavg import FedAvgStrategy
from roost.algorithms.local_sgd import SGDStepper, minibatches
from roost.algorithms.splitfed import SplitFed, SplitFedConfig
from roost.data.base import ClientData, DatasetInfo
from roost.models.cost import LayerCost, example_input
from roost.params import FlatModel, ParamLayout
from roost.registry import ConfigError, check
from roost.split import Activations, Gradient, cut_module, label_dtype, wire_dtype
from roost.split.bottleneck import (
    Encoder,
    KeptActivations,
    KeptGradient,
    Phase,
    PhaseSchedule,
    deprune_schedule,
    gate_penalty,
    insert_bottleneck,
    prune_schedule,
    reset_gates,
    top_b_mask,
)
from roost.split.messages import WIRE_DTYPES, SplitExchange, SplitReply
from roost.split.plan import DeviceLink, SplitPlan

__all__ = ["Deprune", "DepruneConfig", "DepruneStrategy"]

_PHASE_KEYS = ("budget", "masked_backward")  # task settings that are not config fields


@dataclass(frozen=True)
class DepruneConfig(SplitFedConfig):
    """schedule: deprune or prune (module docstring); feature_compression and
    resolution_compression: the encoder's ``C / C'`` and stride; prune_1_budget,
    prune_1_epochs, prune_2_budget, prune_2_epochs, training_epochs: the phases; lr,
    boost_lr, boost_epochs: their learning rates (prune: lr after ``boost_epochs`` at
    boost_lr in every prune phase); training_lr, training_momentum: prune's first,
    normal phase; right_side_value: the gate reset's range; eps, delta: the penalty's;
    wire_dtype: ``schedule`` (the default), each phase's own as the reference sends it
    (float16, except float32 in prune's first, normal phase), or one of float32, float16,
    bfloat16 for every phase."""

    WIRE_CHOICES: ClassVar[tuple[str, ...]] = ("schedule", *WIRE_DTYPES)

    schedule: Literal["deprune", "prune"] = "deprune"
    batch_size: int = 16
    lr: float = 1e-2
    weight_decay: float = 5e-4
    wire_dtype: str = "schedule"
    feature_compression: int = 1
    resolution_compression: int = 1
    prune_1_budget: int = 16
    prune_1_epochs: int = 15
    prune_2_budget: int = 4
    prune_2_epochs: int = 15
    training_epochs: int = 50
    boost_lr: float = 5e-2
    boost_epochs: int = 3
    right_side_value: float = 1.0
    eps: float = 1000.0
    delta: float = 1e-3
    training_lr: float = 1e-3
    training_momentum: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.schedule in ("deprune", "prune"),
            "schedule",
            self.schedule,
            "deprune or prune",
        )
        check(
            self.micro_batches == 1,
            "micro_batches",
            self.micro_batches,
            "1 (deprune sends each minibatch whole)",
        )
        for key in ("feature_compression", "resolution_compression"):
            value = getattr(self, key)
            check(isinstance(value, int) and value >= 1, key, value, "an integer >= 1")
        try:
            self.phases()
        except ValueError as err:
            raise ConfigError("algorithm", self.schedule, str(err)) from None

    def phases(self) -> PhaseSchedule:
        """The configured schedule, every phase in ``wire_dtype`` unless it is
        ``schedule``."""
        schedule = self._schedule()
        if self.wire_dtype == "schedule":
            return schedule
        phases = tuple(dataclasses.replace(p, wire=self.wire_dtype) for p in schedule.phases)
        return dataclasses.replace(schedule, phases=phases)

    def _schedule(self) -> PhaseSchedule:
        if self.schedule == "deprune":
            return deprune_schedule(
                prune_1_budget=self.prune_1_budget,
                prune_1_epochs=self.prune_1_epochs,
                prune_2_budget=self.prune_2_budget,
                prune_2_epochs=self.prune_2_epochs,
                training_epochs=self.training_epochs,
                lr=self.lr,
                boost_lr=self.boost_lr,
                boost_epochs=self.boost_epochs,
                right_side_value=self.right_side_value,
                batch_size=self.batch_size,
                eps=self.eps,
                delta=self.delta,
                weight_decay=self.weight_decay,
            )
        return prune_schedule(
            training_epochs=self.training_epochs,
            prune_phases=((self.prune_1_budget, self.prune_1_epochs),)
            + (((self.prune_2_budget, self.prune_2_epochs),) if self.prune_2_epochs else ()),
            training_lr=self.training_lr,
            training_momentum=self.training_momentum,
            lr=self.lr,
            boost_lr=self.boost_lr,
            lr_boost_epoch=self.boost_epochs,
            batch_size=self.batch_size,
            eps=self.eps,
            delta=self.delta,
            weight_decay=self.weight_decay,
        )


def phase_of(schedule: PhaseSchedule, round: int) -> tuple[Phase, int, bool]:
    """Round ``round``'s phase, its learning rate, and whether the round starts a phase
    that resets the gates first (round ``r`` is the schedule's epoch ``r - 1``; after the
    last epoch, the last epoch again; phases of no epoch are skipped, their resets kept)."""
    epoch, start, reset = round - 1, 0, False
    last = schedule.phases[-1]
    for phase in schedule.phases:
        if phase.epochs == 0:
            reset = reset or phase.reset_gates_before
            continue
        if epoch < start + phase.epochs:
            begins = epoch == start
            return phase, epoch - start, begins and (reset or phase.reset_gates_before)
        start += phase.epochs
        reset = False
        last = phase
    return last, last.epochs - 1, False


class DepruneStrategy(FedAvgStrategy):
    """FedAvg of both parts, each round's phase in the tasks' settings, and the gate reset
    at the start of a phase that asks for it (module docstring)."""

    def __init__(
        self, schedule: PhaseSchedule, gate_index: torch.Tensor, budget_index: int
    ) -> None:
        super().__init__()
        self.schedule = schedule
        self.gate_index = gate_index
        self.budget_index = budget_index
        self.reset_at: list[int] = []  # rounds whose payload reset the gates

    def payload(self, round: int) -> Payload:
        """The model with the round's budget in its encoder (0: normal mode), its gates
        reset first when the round starts a phase that asks for it."""
        phase, _, reset = phase_of(self.schedule, round)
        budget = float(phase.budget or 0)
        resets = reset and round not in self.reset_at
        if resets or float(self.params[self.budget_index]) != budget:
            params = self.params.clone()  # never change a model a payload already holds
            if resets:
                gates = params[self.gate_index]
                generator = torch.Generator().manual_seed(round)
                reset_gates(gates, self.schedule.right_side_value, generator)
                params[self.gate_index] = gates
                self.reset_at.append(round)
            params[self.budget_index] = budget
            self.params = params
        return super().payload(round)

    def configure_tasks(
        self, round: int, clients: Sequence[int], rng: np.random.Generator
    ) -> dict[int, dict[str, Any]]:
        phase, epoch, _ = phase_of(self.schedule, round)
        settings = {
            "lr": phase.lrs[epoch],
            "momentum": phase.momentum,
            "weight_decay": phase.weight_decay,
            "wire_dtype": phase.wire,
            "budget": phase.budget or 0,
            "masked_backward": phase.masked_backward,
        }
        return {c: dict(settings) for c in clients}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "reset_at": list(self.reset_at)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.reset_at = [int(r) for r in state.get("reset_at", [])]


def _encoder_at(module: nn.Module) -> int:
    """The index of the model's encoder among its top-level layers."""
    for i, child in enumerate(module.children()):
        if isinstance(child, Encoder):
            return i
    raise ValueError("the model has no bottleneck encoder (was it built through adapt_model?)")


def _num_classes(module: nn.Module, data: ClientData) -> int:
    """The model's number of classes, from one example's logits (in eval mode)."""
    with torch.no_grad():
        n = int(module.eval()(data.x[:1]).shape[-1])
    module.train()
    return n


@register_algorithm("deprune")
class Deprune(SplitFed):
    """deprune / prune (Mudvari et al. 2023): a gated bottleneck at the cut, top-b
    channels sent in fp16, phased training (module docstring)."""

    Config = DepruneConfig
    config: DepruneConfig
    compressible = False

    def __init__(self, config: DepruneConfig) -> None:
        super().__init__(config)
        self._gate_index: torch.Tensor | None = None
        self._budget_index = 0
        self._channels = 0  # C' of the encoder (known after bind_model)
        self._smallest_batch = 1
        self._after_encoder = 0  # the cut of the adapted model: after its encoder

    def adapt_model(self, module: nn.Module, info: DatasetInfo) -> nn.Module:
        """The model with its bottleneck after layer ``cut`` (0: half of its layers)."""
        cfg = self.config
        layers = len(list(module.children()))
        cut = cfg.cut or layers // 2
        check(cut < layers, "cut", cfg.cut, f"at most {layers - 1} (the model's layers - 1)")
        adapted = insert_bottleneck(
            module, cut, example_input(info, 2), cfg.feature_compression, cfg.resolution_compression
        )
        channels = adapted[cut].out_channels
        for key in ("prune_1_budget", "prune_2_budget"):
            budget = getattr(cfg, key)
            check(
                budget <= channels,
                key,
                budget,
                f"at most the {channels} channels of the bottleneck at cut {cut}",
            )
        return adapted

    def bind_model(self, module: nn.Module) -> None:
        """Where the gate sits in the flat model, and the encoder's channels."""
        at = _encoder_at(module)
        encoder = list(module.children())[at]
        assert isinstance(encoder, Encoder)
        slots = {s.name: s for s in ParamLayout.of(module).slots}
        gate = slots[f"{at}.gate"]
        self._gate_index = torch.arange(gate.offset, gate.offset + gate.numel)
        self._budget_index = slots[f"{at}.budget"].offset
        self._channels = encoder.out_channels
        self._after_encoder = at + 1
        self._smallest_batch = 2 if encoder.flat else 1

    def make_strategy(self) -> Strategy:
        if self._gate_index is None:
            raise RuntimeError("Deprune.bind_model(module) must come before make_strategy")
        return DepruneStrategy(self.config.phases(), self._gate_index, self._budget_index)

    def task_config(self, ctx: ClientContext) -> Any:
        settings = {k: v for k, v in ctx.settings.items() if k not in _PHASE_KEYS}
        return dataclasses.replace(self.config, **settings) if settings else self.config

    def _config_with(self, settings: Mapping[str, Any]) -> SplitFedConfig:
        fields = {k: v for k, v in settings.items() if k not in _PHASE_KEYS}
        return dataclasses.replace(self.config, **fields) if fields else self.config

    def _cut(self, cfg: SplitFedConfig, layers: int) -> int:
        return self._after_encoder

    def split_plan(
        self,
        layers: Sequence[LayerCost],
        num_examples: int,
        settings: Mapping[str, Any],
        device: DeviceLink,
    ) -> SplitPlan:
        """SplitFed's plan at the encoder, with the phase's bytes: ``b`` (or ``C'``)
        channels up in the wire dtype plus the labels and, in prune mode, the ``b``
        indices per message; their float32 gradient down (all ``C'`` channels when the
        phase sends it unmasked)."""
        cfg = self._config_with(settings)
        cut = self._after_encoder
        plan = self._plan(layers, num_examples, cfg, cut, settings)
        per_channel = layers[cut - 1].output_elements // self._channels
        budget = int(settings.get("budget", 0))
        masked = bool(settings.get("masked_backward", True))
        sent = budget or self._channels
        label = label_dtype(layers[-1].output_elements).itemsize
        back = budget if budget and masked else self._channels
        return dataclasses.replace(
            plan,
            up_bytes_per_example=sent * per_channel * wire_dtype(cfg.wire_dtype).itemsize + label,
            up_bytes_per_message=budget * label_dtype(self._channels).itemsize,
            down_bytes_per_example=back * per_channel * 4,
            smallest_batch=self._smallest_batch,
        )

    def _server_part(
        self, ctx: ClientContext, model: FlatModel, data: ClientData
    ) -> tuple[nn.Module, int, bool]:
        """The part after the encoder (the decoder and the rest)."""
        module = model.module
        parts = cut_module(module, _encoder_at(module) + 1)
        return parts.server, _num_classes(module, data), True

    def _reply_rule(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The round's phase: the replica expects its ``b`` kept channels (all of them in
        normal mode) and answers with their float32 gradient, on the kept channels alone
        in prune mode when ``masked_backward``."""
        masked = bool(settings.get("masked_backward", True))

        def reply(sent: Any, grad: torch.Tensor) -> Gradient | KeptGradient:
            if isinstance(sent, KeptActivations) and masked:
                return KeptGradient.of(grad, sent.kept)
            return Gradient.of(grad, torch.float32)  # z = z' ⊙ m masks it in the chain rule

        return {"reply": reply, "budget": int(settings.get("budget", 0))}

    def device_procedure(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> Generator[SplitExchange, SplitReply, UpdateOutput]:
        """Per minibatch: the encoder's output ``z`` goes to the server (in prune mode
        only the top-``b`` channels of the gate, in fp16, with their ids), its gradient
        comes back and is back-propagated through ``z``, the gate penalty's too, and the
        model takes an SGD step. Minibatches below two examples are skipped on an MLP's
        features (BatchNorm over 1 x 1 maps needs two)."""
        cfg = self.task_config(ctx)
        assert isinstance(cfg, DepruneConfig)
        module = model.module
        at = _encoder_at(module)
        parts = cut_module(module, at + 1)
        encoder = list(module.children())[at]
        assert isinstance(encoder, Encoder)
        encoder.weighted_mask = cfg.phases().weighted_mask
        budget = encoder.kept  # the round's mode, in the model the server sent
        wire = wire_dtype(cfg.wire_dtype)
        num_classes = _num_classes(module, data)
        up = down = 0
        penalty_sum = 0.0
        smallest = 2 if encoder.flat else 1
        stepper = SGDStepper(model, cfg)
        iteration = 0
        for xb, yb in minibatches(ctx, data, cfg):
            if len(xb) < smallest:
                continue
            stepper.begin()
            z = parts.device(xb)  # masked by the encoder in prune mode
            sent: Activations | KeptActivations
            if budget:
                keep = top_b_mask(encoder.gate, budget)  # which channels travel
                sent = KeptActivations.of(z, keep, yb, wire, num_classes)
            else:
                sent = Activations.of(z, yb, wire, num_classes)
            reply = yield SplitExchange(sent, iteration, 0, 1)
            iteration += 1
            g = reply.gradient
            assert g is not None
            z.backward(g.received(keep) if isinstance(g, KeptGradient) else g.received())
            if budget:
                penalty = gate_penalty(encoder.gate, budget, cfg.eps, cfg.delta)
                penalty.backward()
                penalty_sum += float(penalty.detach())
            up += sent.nbytes
            down += reply.nbytes
            stepper.finish(reply.loss)
        res = stepper.result()
        device_bytes = 4 * parts.layout.device.numel
        weight = float(ctx.num_examples) if cfg.weighted else 1.0
        return UpdateOutput(
            ClientResult({"params": model.params}, weight),
            None,
            {
                "train_loss": res.mean_loss,
                "local_steps": float(res.steps),
                "cut_bytes_up": float(up + device_bytes),
                "cut_bytes_down": float(down + device_bytes),
                "kept_channels": float(budget or encoder.out_channels),
                "gate_penalty": penalty_sum / max(res.steps, 1),
            },
        )
