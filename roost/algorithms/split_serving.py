"""What a deployment needs of a split-learning method: the device part of the model for
a node, and the server part's replica for each task on the server.

In simulation a split task trains both parts in one process (:meth:`SplitFed.update
<roost.algorithms.splitfed.SplitFed.update>`). Deployed, the node holds only the device
part ``W^c``: its task's payload is ``W^c`` of the global model (:meth:`SplitServing.
device_params`; the node fills the server part's entries of its model with zeros,
:meth:`SplitServing.whole_params`, which its procedure never reads), it sends each
micro-batch's activations to the server and back-propagates the gradient that comes back,
and it returns its trained ``W^c_k``. The server opens a :class:`SplitTask` for the task
when it sends it: a replica of the global server part ``W^s`` on a model of its own, with
its own SGD stepper of the task's config (the task's settings applied), that answers the
activations (:class:`~roost.split.step.ServerReplica`) and steps once per iteration; the
task's update is ``[W^c_k; W^s_k]`` (:meth:`SplitTask.join`), which the engine folds as
it folds a simulated task's.

Both parts step with :class:`~roost.algorithms.local_sgd.SGDStepper`'s rule, which is
elementwise, so every entry of the joined model has the bits the simulated task gives it
(tests/deploy/test_deploy_split.py). A method that keeps SGD momentum across tasks
(PiPar) keeps the device part's in the node's client state and the server part's here,
per client, in memory (a server restarted from its journal starts those from zero).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from roost.algorithms.base import Payload
from roost.algorithms.local_sgd import SGDStepper
from roost.models.cost import example_input
from roost.params import FlatModel, ParamLayout
from roost.split.cut import SplitLayout, cut_module
from roost.split.messages import SplitExchange, SplitReply, label_dtype, wire_dtype
from roost.split.step import ServerReplica, device_trains

if TYPE_CHECKING:
    from roost.algorithms.splitfed import SplitFed
    from roost.data.base import DatasetInfo

__all__ = ["SplitServing", "SplitTask"]


class SplitTask:
    """The server's side of one deployed split task (module docstring)."""

    def __init__(
        self,
        layout: SplitLayout,
        model: FlatModel,
        replica: ServerReplica,
        stepper: SGDStepper,
        on_keep: Callable[[torch.Tensor | None], None],
        wire: torch.dtype = torch.float32,
    ) -> None:
        self.layout = layout
        self.wire = wire
        self.model = model
        self.replica = replica
        self.stepper = stepper
        self._on_keep = on_keep
        self.bytes_up = 0  # activations and labels received
        self.bytes_down = 0  # gradients sent

    @property
    def channels(self) -> int:
        """The channels of the activations at the cut (``C'``; an MLP's features)."""
        shape = self.replica.activation_shape
        assert shape is not None
        return shape[0]

    def spec(self, examples: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The exact tensors of a micro-batch of ``examples``, by name (dtype, shape):
        ``activations`` in the task's wire dtype, of one example's shape at the cut (in
        prune mode, ``b`` kept channels of ``C'``, and their ids ``channels``), and
        ``labels``."""
        shape = self.replica.activation_shape
        assert shape is not None
        labels = (label_dtype(self.replica.num_classes), (examples,))
        b = self.replica.budget
        if not b:
            return {"activations": (self.wire, (examples, *shape)), "labels": labels}
        return {
            "activations": (self.wire, (examples, b, *shape[1:])),
            "channels": (label_dtype(shape[0]), (b,)),
            "labels": labels,
        }

    def answer(self, message: SplitExchange) -> SplitReply:
        """The replica's answer (ValueError for a message it does not accept)."""
        reply = self.replica.answer(message)
        self.bytes_up += message.nbytes
        self.bytes_down += reply.nbytes
        return reply

    def join(self, device_params: torch.Tensor) -> torch.Tensor:
        """``[W^c_k; W^s_k]``: the node's trained device part with the replica's server
        part; ValueError if the device part is not a vector of the device part's size or
        the replica has not finished its last iteration."""
        want = self.layout.device.numel
        if device_params.shape != (want,):
            raise ValueError(
                f"the device part has shape {tuple(device_params.shape)}; expected ({want},)"
            )
        if self.replica.micro_batches:
            raise ValueError(
                f"iteration {self.replica.iteration} is not over: micro-batch "
                f"{self.replica.micro_batch} of {self.replica.micro_batches} never came"
            )
        _, server = self.layout.split(self.model.params)
        return self.layout.join(device_params.to(torch.float32), server)

    def keep_state(self) -> None:
        """The task's update was accepted: keep what the server part carries to the
        client's next task (PiPar's momentum), as the simulation keeps client state."""
        buf = self.stepper.buf
        self._on_keep(self.layout.split(buf)[1].clone() if buf is not None else None)


class SplitServing:
    """A split method's deployment (module docstring), for models made by
    ``build_module`` on data described by ``info``."""

    def __init__(
        self, algorithm: SplitFed, build_module: Callable[[], nn.Module], info: DatasetInfo
    ) -> None:
        self.algorithm = algorithm
        self.build_module = build_module
        self.info = info
        self._module = build_module()  # the structure every layout is read from
        algorithm.bind_model(self._module)  # deprune: where its encoder is
        self._layouts: dict[int, tuple[SplitLayout, tuple[int, ...], bool]] = {}
        numel = ParamLayout.of(self._module).numel
        self.keeps_momentum = "momentum" in algorithm.client_state_spec(numel)
        self._momentum: dict[int, torch.Tensor] = {}  # client -> its server part's buffer

    def _layout(self, cut: int) -> tuple[SplitLayout, tuple[int, ...], bool]:
        """The layout at ``cut``, one example's activations' shape there, and whether the
        device part has parameters to train."""
        known = self._layouts.get(cut)
        if known is None:
            parts = cut_module(self._module, cut)
            training = self._module.training
            self._module.eval()
            with torch.no_grad():
                shape = tuple(parts.device(example_input(self.info)).shape[1:])
            self._module.train(training)
            trains = device_trains(parts.device)
            known = self._layouts[cut] = (parts.layout, shape, trains)
        return known

    def layout(self, settings: Mapping[str, Any]) -> SplitLayout:
        """The layout of a task with ``settings`` (its cut)."""
        return self._layout(self.algorithm.task_cut(self._module, settings))[0]

    def device_trains(self, settings: Mapping[str, Any]) -> bool:
        """Whether the device part of a task with ``settings`` has parameters (then a
        gradient comes back for every micro-batch)."""
        return self._layout(self.algorithm.task_cut(self._module, settings))[2]

    def device_params(self, params: torch.Tensor, settings: Mapping[str, Any]) -> torch.Tensor:
        """The device part's entries of the whole model's flat ``params``."""
        return self.layout(settings).split(params)[0].contiguous()

    def whole_params(
        self, device_params: torch.Tensor, settings: Mapping[str, Any]
    ) -> torch.Tensor:
        """A whole flat vector with the device part's entries ``device_params`` and zeros
        for the server part's (a node's model; ValueError for a wrong length)."""
        layout = self.layout(settings)
        if device_params.shape != (layout.device.numel,):
            raise ValueError(
                f"the device part has shape {tuple(device_params.shape)}; expected "
                f"({layout.device.numel},) at cut {self.algorithm.task_cut(self._module, settings)}"
            )
        return layout.join(device_params, torch.zeros(layout.server.numel))

    def open(self, client_id: int, payload: Payload, settings: Mapping[str, Any]) -> SplitTask:
        """The replica of ``payload``'s server part for a task of ``client_id`` with the
        strategy's ``settings``."""
        cfg = self.algorithm._config_with(settings)
        cut = self.algorithm.task_cut(self._module, settings)
        layout, shape, trains = self._layout(cut)
        model = FlatModel(self.build_module())
        model.load_(payload.params)
        parts = cut_module(model.module, cut)
        saved = self._momentum.get(client_id) if self.keeps_momentum else None
        buffer = None
        if saved is not None:
            buffer = layout.join(torch.zeros(layout.device.numel), saved)
        stepper = SGDStepper(model, cfg, momentum_buffer=buffer)
        replica = self.algorithm.server_replica(
            parts.server,
            settings,
            num_classes=self.info.num_classes,
            trains=trains,
            stepper=stepper,
            batch_size=cfg.batch_size,
            activation_shape=shape,
        )

        def keep(server_buffer: torch.Tensor | None) -> None:
            if self.keeps_momentum and server_buffer is not None:
                self._momentum[client_id] = server_buffer

        return SplitTask(layout, model, replica, stepper, keep, wire_dtype(cfg.wire_dtype))
