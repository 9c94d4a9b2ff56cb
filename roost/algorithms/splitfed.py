"""SplitFed v1: split learning with a server-side replica per device, averaged each round.

Thapa, Arachchige, Camtepe, Sun, "SplitFed: When Federated Learning Meets Split
Learning", AAAI 2022 (arXiv 2004.12088); ALGORITHMS.md §4.10.

The model ``[W^c; W^s]`` (an ``nn.Sequential``) is cut after its ``cut``-th top-level layer
(:func:`~roost.split.cut_module`). In a round each selected device ``k`` starts from the
global ``W^c`` and the main server gives it a replica of the global ``W^s``; for each
minibatch of its ``E`` epochs the device forwards, sends the activations at the cut, the
server forwards, back-propagates and returns their gradient, and the device
back-propagates (:func:`~roost.split.split_iteration`, over ``micro_batches``
micro-batches); then both parts take an SGD step (:class:`SGDStepper`'s rule). At the
round's end the fed server averages the ``W^c_k`` and the main server the ``W^s_k``::

    [W^c; W^s]^{t+1} = Σ_k ω_k [W^c_k; W^s_k] / Σ_k ω_k,   ω_k = n_k (or 1: weighted=False)

The paper aggregates as FedAvg does, by examples (the default); the official code
(``SFLV1_ResNet_HAM10000.py``) takes the plain mean, ``weighted=false`` (on the quickstart
preset's unequal clients that mean learns more slowly: 0.49 accuracy after 3 rounds
against 0.59 weighted, exactly unweighted and weighted FedAvg's). Since each replica
trains only on its device's data and
both halves are averaged together, SplitFed v1 computes FedAvg's model: with float32
messages and one micro-batch a minibatch's gradients are exactly the whole model's
(tests/unit/test_split.py), so a round is FedAvg's round bit for bit
(tests/unit/test_algorithms_splitfed.py). What it changes is where the compute runs and
what crosses the network: per minibatch the activations and labels up and their gradient
down (``wire_dtype``: float16 halves them, at float16's rounding), per round the device
part each way. The client metrics ``cut_bytes_up`` and ``cut_bytes_down`` give that
traffic, in bytes per task, and ``cut`` and ``micro_batches`` the task's split.

In virtual time a task is timed per micro-batch on its device's compute, uplink and
downlink and on the one server all devices share (:meth:`SplitFed.split_plan`,
:mod:`roost.system.split_schedule`); the run's ``bytes_up`` and ``bytes_down`` are those
messages and the device part each way. Deployed (``roost serve``), the nodes train the
device part and the server a replica of the server part per task, the messages crossing
the network (:meth:`SplitFed.split_serving`, :mod:`roost.algorithms.split_serving`).

``cut=0`` (the default) cuts after the middle top-level layer, ``L // 2``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from roost.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientResult,
    Payload,
    Strategy,
    Tensors,
    UpdateOutput,
    drive,
    register_algorithm,
)
from roost.algorithms.fedavg import FedAvgConfig, FedAvgStrategy
from roost.algorithms.local_sgd import SGDStepper, minibatches
from roost.data.base import ClientData, DatasetInfo
from roost.models.cost import LayerCost
from roost.params import FlatModel
from roost.registry import check
from roost.split import SplitModule, cut_module, num_cut_points, wire_dtype
from roost.split.messages import WIRE_DTYPES, SplitExchange, SplitReply, label_dtype
from roost.split.plan import DeviceLink, SplitPlan, plan_for_cut
from roost.split.step import ServerReplica, Stepper, device_iteration, device_trains

__all__ = ["SplitFed", "SplitFedConfig"]


@dataclass(frozen=True)
class SplitFedConfig(FedAvgConfig):
    """cut: top-level layers on the device (0: half of them, ``L // 2``); micro_batches:
    ``N`` per minibatch (``⌊B/N⌋`` examples each, the rest dropped); wire_dtype: float32,
    float16 or bfloat16 for the activations and gradients at the cut; weighted: average
    by examples (False: the official code's plain mean)."""

    cut: int = 0
    micro_batches: int = 1
    wire_dtype: str = "float32"

    AUTOMATIC: ClassVar[str] = "half of the model's"
    """What ``cut=0`` means (and, when it names a choice, ``micro_batches=0`` too)."""
    AUTOMATIC_MICRO_BATCHES: ClassVar[bool] = False
    WIRE_CHOICES: ClassVar[tuple[str, ...]] = tuple(WIRE_DTYPES)
    """The values ``wire_dtype`` may take."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            isinstance(self.cut, int) and not isinstance(self.cut, bool) and self.cut >= 0,
            "cut",
            self.cut,
            f"a number of top-level layers >= 1 (0: {self.AUTOMATIC})",
        )
        low = 0 if self.AUTOMATIC_MICRO_BATCHES else 1
        check(
            isinstance(self.micro_batches, int)
            and not isinstance(self.micro_batches, bool)
            and low <= self.micro_batches <= self.batch_size,
            "micro_batches",
            self.micro_batches,
            f"an integer in {low} .. batch_size ({self.batch_size})"
            + (f" (0: {self.AUTOMATIC})" if low == 0 else ""),
        )
        check(
            self.wire_dtype in self.WIRE_CHOICES,
            "wire_dtype",
            self.wire_dtype,
            f"one of {', '.join(self.WIRE_CHOICES)}",
        )


@register_algorithm("splitfed")
class SplitFed(Algorithm):
    """SplitFed v1 (Thapa et al. 2022): the model cut between device and server, a server
    replica per device, both halves averaged each round."""

    Config = SplitFedConfig
    config: SplitFedConfig
    compressible = False  # its uploads are activations, not a model or a delta
    splits_the_model = True

    def __init__(self, config: SplitFedConfig) -> None:
        super().__init__(config)
        # the resident model's parts, its number of classes and the cut they were made at
        self._parts: tuple[nn.Module, SplitModule, int, int] | None = None

    def make_strategy(self) -> Strategy:
        return FedAvgStrategy()

    def split_plan(
        self,
        layers: Sequence[LayerCost],
        num_examples: int,
        settings: Mapping[str, Any],
        device: DeviceLink,
    ) -> SplitPlan:
        """The task's micro-batches at the configured cut (the same for every device)."""
        cfg = self._config_with(settings)
        return self._plan(layers, num_examples, cfg, self._cut(cfg, len(layers)), settings)

    def _config_with(self, settings: Mapping[str, Any]) -> SplitFedConfig:
        return dataclasses.replace(self.config, **settings) if settings else self.config

    def _cut(self, cfg: SplitFedConfig, layers: int) -> int:
        """The task's cut: the configured one, or half of the ``layers``."""
        cut = cfg.cut or layers // 2
        check(
            cut < layers,
            "cut",
            cfg.cut,
            f"at most {layers - 1} (the model has {layers} top-level layers)",
        )
        return cut

    def _max_iterations(self, cfg: SplitFedConfig) -> int:
        """Iterations of a task (0: every minibatch of its epochs)."""
        return 0

    def _plan(
        self,
        layers: Sequence[LayerCost],
        num_examples: int,
        cfg: SplitFedConfig,
        cut: int,
        settings: Mapping[str, Any],
    ) -> SplitPlan:
        return plan_for_cut(
            layers,
            cut,
            num_examples=num_examples,
            batch_size=cfg.batch_size,
            epochs=cfg.local_epochs,
            micro_batches=cfg.micro_batches or 1,
            wire_bytes=wire_dtype(cfg.wire_dtype).itemsize,
            label_bytes=label_dtype(layers[-1].output_elements).itemsize,
            part_bytes=4 * sum(layer.state_elements for layer in layers[:cut]),
            settings=settings,
            max_iterations=self._max_iterations(cfg),
        )

    def _split(
        self, model: FlatModel, x: torch.Tensor, cfg: SplitFedConfig
    ) -> tuple[SplitModule, int]:
        """The resident model's two parts at the task's cut and its number of classes
        (from one example's logits), made once per resident model and cut."""
        module = model.module
        layers = num_cut_points(module) + 1
        cut = cfg.cut or layers // 2  # cut_module refuses a cut the model does not have
        if self._parts is not None and self._parts[0] is module and self._parts[3] == cut:
            return self._parts[1], self._parts[2]
        parts = cut_module(module, cut)
        training = module.training
        module.eval()
        with torch.no_grad():
            num_classes = int(module(x[:1]).shape[-1])
        module.train(training)
        self._parts = (module, parts, num_classes, cut)
        return parts, num_classes

    def update(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> UpdateOutput:
        """The device's procedure (:meth:`device_procedure`) with its messages answered by
        ``ctx.server`` (deployed: the server's replica across the network) or, in
        simulation, by a replica of the server part of this same model: its gradients
        accumulate into the model's, and one SGD step per iteration steps both parts."""
        procedure = self.device_procedure(ctx, model, data, payload, state)
        if ctx.server is not None:
            return drive(procedure, ctx.server)
        server, num_classes, trains = self._server_part(ctx, model, data)
        replica = self.server_replica(
            server, ctx.settings, num_classes=num_classes, trains=trains, validate=False
        )
        return drive(procedure, replica.answer)

    def _server_part(
        self, ctx: ClientContext, model: FlatModel, data: ClientData
    ) -> tuple[nn.Module, int, bool]:
        """The task's server part of the resident ``model``, the number of classes, and
        whether the device part trains (a gradient goes back)."""
        parts, num_classes = self._split(model, data.x, self.task_config(ctx))
        return parts.server, num_classes, device_trains(parts.device)

    def server_replica(
        self,
        server: nn.Module,
        settings: Mapping[str, Any],
        *,
        num_classes: int,
        trains: bool,
        stepper: Stepper | None = None,
        batch_size: int | None = None,
        activation_shape: tuple[int, ...] | None = None,
        validate: bool = True,
    ) -> ServerReplica:
        """The server part's replica for a task with ``settings`` (none goes back when
        the device part does not ``trains``), answering as :meth:`_reply_rule` says;
        ``validate``: check every message (off in simulation, where the device's own
        procedure in this process sends them)."""
        return ServerReplica(
            server,
            num_classes=num_classes,
            returns_gradient=trains,
            stepper=stepper,
            batch_size=batch_size,
            activation_shape=activation_shape,
            validate=validate,
            **self._reply_rule(settings),
        )

    def _reply_rule(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """:class:`ServerReplica`'s ``reply`` and ``budget`` for a task with
        ``settings``; none here: the gradient in the wire dtype, every channel."""
        return {}

    def device_procedure(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> Generator[SplitExchange, SplitReply, UpdateOutput]:
        """The device's half of a task: per minibatch, the micro-batches' activations go
        to the server one :class:`~roost.split.messages.SplitExchange` at a time
        (:func:`~roost.split.step.device_iteration`), their gradients come back, and the
        model takes an SGD step (:class:`SGDStepper`'s rule; in a deployment only the
        device part's entries of it matter). Returns the task's update: the whole model
        (its server part is the replica's, which a deployment joins in) and the traffic."""
        cfg = self.task_config(ctx)
        assert isinstance(cfg, SplitFedConfig)
        parts, num_classes = self._split(model, data.x, cfg)
        wire = wire_dtype(cfg.wire_dtype)
        micro = cfg.micro_batches or 1
        up = down = 0
        momentum = state["momentum"] if state is not None and "momentum" in state else None
        stepper = SGDStepper(model, cfg, momentum_buffer=momentum)
        for iteration, (xb, yb) in enumerate(self._minibatches(ctx, data, cfg)):
            stepper.begin()
            n = min(micro, len(xb))  # an epoch's last, short minibatch
            it = yield from device_iteration(
                parts.device, xb, yb, n, num_classes=num_classes, wire=wire, iteration=iteration
            )
            up += sum(it.uplink_bytes)
            down += sum(it.downlink_bytes)
            stepper.finish(torch.tensor(it.loss))
        res = stepper.result()
        device_bytes = 4 * parts.layout.device.numel
        weight = float(ctx.num_examples) if cfg.weighted else 1.0
        return UpdateOutput(
            ClientResult({"params": model.params}, weight),
            self._state_after(stepper),
            {
                "train_loss": res.mean_loss,
                "local_steps": float(res.steps),
                "cut_bytes_up": float(up + device_bytes),
                "cut_bytes_down": float(down + device_bytes),
                "cut": float(parts.cut),
                "micro_batches": float(micro),
            },
        )

    def split_serving(self, build_module: Callable[[], nn.Module], info: DatasetInfo) -> Any:
        """The device part for nodes and a server replica per task
        (:class:`~roost.algorithms.split_serving.SplitServing`)."""
        from roost.algorithms.split_serving import SplitServing

        return SplitServing(self, build_module, info)

    def task_cut(self, module: nn.Module, settings: Mapping[str, Any]) -> int:
        """The cut a task with ``settings`` trains at (the configured one, or half of the
        model's top-level layers)."""
        cfg = self._config_with(settings)
        return self._cut(cfg, num_cut_points(module) + 1)

    def _minibatches(
        self, ctx: ClientContext, data: ClientData, cfg: SplitFedConfig
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return minibatches(ctx, data, cfg)

    def _state_after(self, stepper: SGDStepper) -> Tensors | None:
        """The client state a task leaves (none: SplitFed keeps no optimiser state)."""
        return None
