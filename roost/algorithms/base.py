"""The protocols every algorithm implements, and the algorithm registry.

An algorithm is one file holding both halves of a federated method:

* the server half, a :class:`Strategy`: selects clients, says what to send them
  (:class:`Payload`), and steps the global model from the clients' aggregated results;
* the client half, :meth:`Algorithm.update`: a plain function
  ``(ctx, model, data, payload, state) -> UpdateOutput(result, state, metrics)``.

Results are combined through :class:`Contribution`, a weighted sum
``(Σ_k w_k x_k, Σ_k w_k)`` over named tensors and scalars. Sums are associative, so a
runtime may fold many clients on one worker and the server then adds the workers' partial
sums (FedML Parrot's local + global aggregation) without the algorithm knowing. A strategy
whose rule is not a weighted mean (median, Krum) sets ``Strategy.aggregation =
"per_client"`` and is handed one Contribution per client instead.

Client procedures that must talk to the server mid-task (FedASMU's fetch of a fresher
global model, split learning) may be generator functions: they ``yield`` a request such as
:class:`FetchModel` and receive the answer. The algorithm declares when, as fractions of the
task's compute (:meth:`Algorithm.request_points`), so that the engine knows every task's
timeline at dispatch; it then suspends the procedure at that virtual time and resumes it
with the server's answer (the download charged on the device's link). Plain functions never
see this.

Algorithms never import a runtime, clock or transport.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch

from roost.registry import Registry, check

if TYPE_CHECKING:
    from torch import nn

    from roost.data.base import ClientData, DatasetInfo
    from roost.models.cost import LayerCost
    from roost.params import FlatModel
    from roost.split.plan import DeviceLink, SplitPlan

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "ClientContext",
    "ClientOptimConfig",
    "ClientResult",
    "Contribution",
    "FetchModel",
    "Payload",
    "Strategy",
    "UpdateOutput",
    "drive",
    "register_algorithm",
]

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientOptimConfig:
    """Local training shared by the SGD-family algorithms (Flower's names where they exist).

    Attributes:
        local_epochs: passes over the client's examples per task.
        batch_size: minibatch size; the last minibatch of an epoch may be short.
        lr: local learning rate η_l.
        momentum: heavy-ball momentum ρ of local SGD (0 = plain SGD).
        weight_decay: L2 coefficient added to the gradient.
        shuffle: reshuffle the client's examples every epoch (seeded per task); False visits
            them in stored order, as W1 prescribes.
    """

    local_epochs: int = 1
    batch_size: int = 20
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    shuffle: bool = True

    def __post_init__(self) -> None:
        check(self.local_epochs >= 1, "local_epochs", self.local_epochs, "must be >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "must be a number > 0")
        check(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")


@dataclass
class Payload:
    """What the server sends to a client: the flat global parameters and named extras
    (e.g. SCAFFOLD's server control variate), stamped with the model version."""

    params: torch.Tensor
    version: int
    extras: Tensors = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return 4 * (self.params.numel() + sum(t.numel() for t in self.extras.values()))

    def to(self, device: torch.device) -> Payload:
        """This payload on ``device`` (``self`` when it is already there)."""
        tensors = [self.params, *self.extras.values()]
        if all(t.device == device for t in tensors):
            return self
        extras = {k: v.to(device) for k, v in self.extras.items()}
        return Payload(self.params.to(device), self.version, extras)


@dataclass
class ClientResult:
    """One client's output: tensors and scalars to be averaged with weight ``weight``.

    The tensors may alias the runtime's resident model; they are valid until the runtime
    starts its next task, so a runtime folds them into a :class:`Contribution` at once.

    ``encoded`` holds, for some tensor names, the bytes a client really uploads in place
    of that tensor (a compressed update, :class:`~roost.compression.Compressed`); the
    receiver rebuilds the tensor with :meth:`Algorithm.decode_upload`. A simulation folds
    ``tensors`` (already what the receiver would rebuild) and ignores ``encoded``; a
    deployed node sends ``encoded`` instead.
    """

    tensors: Tensors
    weight: float
    scalars: dict[str, float] = field(default_factory=dict)
    encoded: dict[str, bytes] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return 4 * sum(t.numel() for t in self.tensors.values())


class Contribution:
    """A running weighted sum of client results: ``sums[k] = Σ w_i x_i[k]``, ``weight = Σ w_i``.

    ``fold`` adds one client, ``merge`` adds another partial sum; both are associative and
    commutative, which is what lets a runtime pre-reduce. Sums are kept in float64: a
    float32 product ``w_i x_i`` is exact in float64 and the rounding of the sum is ~1e-16
    relative, so the float32 mean is the same whichever way the clients were grouped
    (local runtime, 2 or 3 workers) except at rare rounding ties. In float32 the grouping
    would change the last bits, which optimisers such as FedAdam (``Δ / (sqrt(v) + τ)``,
    visibly so with a small τ such as Flower's 1e-9) turn into different models.

    A contribution that has folded one result only, of weight 1 and float32 tensors (an
    asynchronous method's task), keeps that result's tensors as float32 copies and makes
    the float64 sums from them when :attr:`sums` is first read (exactly: float32 values
    are float64 values), so that :meth:`mean` with ``copy=False`` hands the result to a
    strategy without the float64 round trip (W3 with the MLP: about 0.3 ms per task,
    0.15 s of a 1.5 s run, measured in one process).
    """

    __slots__ = ("_one", "_scratch", "_sums", "clients", "count", "scalar_sums", "weight")

    def __init__(self) -> None:
        self._sums: Tensors = {}
        self._one: Tensors | None = None  # the lone weight-1 float32 result, not yet summed
        self.scalar_sums: dict[str, float] = {}
        self.weight = 0.0
        self.count = 0
        self.clients: list[int] = []
        self._scratch: Tensors = {}

    @property
    def sums(self) -> Tensors:
        """``Σ w_i x_i`` per tensor name, float64."""
        if self._one is not None:
            self._sums = {k: v.to(torch.float64) for k, v in self._one.items()}
            self._one = None
        return self._sums

    @sums.setter
    def sums(self, value: Tensors) -> None:
        self._one = None
        self._sums = value

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("clients", "count", "scalar_sums", "sums", "weight")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._one = None
        for k, v in state.items():
            setattr(self, k, v)
        self._scratch = {}

    def fold(self, result: ClientResult, client_id: int) -> None:
        w = float(result.weight)
        if (
            self.count == 0
            and w == 1.0
            and not self._sums
            and all(t.dtype == torch.float32 for t in result.tensors.values())
        ):
            self._one = {name: t.detach().clone() for name, t in result.tensors.items()}
            self._add_small_fields(result, w, client_id)
            return
        sums = self.sums
        for name, t in result.tensors.items():
            acc = sums.get(name)
            if acc is None:
                sums[name] = self.first_sum(t.detach(), w)
            else:
                # copy to a float64 buffer, then one same-dtype add (a mixed-dtype add_
                # is ~6x slower on CPU)
                scratch = self._scratch.get(name)
                if scratch is None:
                    scratch = self._scratch[name] = torch.empty_like(acc)
                scratch.copy_(t.detach())
                acc.add_(scratch, alpha=w)
        self._add_small_fields(result, w, client_id)

    def _add_small_fields(self, result: ClientResult, w: float, client_id: int) -> None:
        for name, v in result.scalars.items():
            self.scalar_sums[name] = self.scalar_sums.get(name, 0.0) + w * float(v)
        self.weight += w
        self.count += 1
        self.clients.append(client_id)

    @staticmethod
    def first_sum(t: torch.Tensor, w: float) -> torch.Tensor:
        """``float64(t) * w``, a new tensor: the sum of a single result of weight ``w``
        (the multiply skipped for weight 1)."""
        acc = t.to(torch.float64, copy=True)
        if w != 1.0:
            acc.mul_(w)
        return acc

    def merge(self, other: Contribution) -> None:
        for name, t in other.sums.items():
            acc = self.sums.get(name)
            if acc is None:
                self.sums[name] = t.to(torch.float64, copy=True)
            else:
                acc.add_(t)
        for name, v in other.scalar_sums.items():
            self.scalar_sums[name] = self.scalar_sums.get(name, 0.0) + v
        self.weight += other.weight
        self.count += other.count
        self.clients.extend(other.clients)

    def to(self, device: torch.device) -> Contribution:
        """This sum with its tensors on ``device`` (``self`` when they are already there)."""
        held = self._one if self._one is not None else self._sums
        if all(t.device == device for t in held.values()):
            return self
        moved = Contribution()
        moved.sums = {k: v.to(device) for k, v in self.sums.items()}
        moved.scalar_sums = dict(self.scalar_sums)
        moved.weight, moved.count, moved.clients = self.weight, self.count, list(self.clients)
        return moved

    def mean(self, name: str, copy: bool = True) -> torch.Tensor:
        """The weighted mean ``Σ w_i x_i / Σ w_i`` of tensor ``name``, as float32; a new
        tensor, unless ``copy=False`` and this contribution holds one weight-1 float32
        result: then that result's tensor itself (the same values), which the caller
        must not modify."""
        if self._one is not None:
            x = self._one[name]
            return x.clone() if copy else x
        return (self._sums[name] / self.weight).to(torch.float32)

    def scalar_mean(self, name: str) -> float:
        return self.scalar_sums[name] / self.weight


@dataclass
class ClientContext:
    """Everything about one client task that is not the model, data, payload or state.

    ``test_data`` is the client's own held-out split, loaded only for algorithms that set
    ``Algorithm.uses_client_test_data`` (personalised methods such as Ditto). ``settings``
    are this task's overrides of the algorithm's config fields, chosen by the strategy
    (:meth:`Strategy.configure_tasks`); :meth:`Algorithm.task_config` applies them.
    ``server``, when set, answers the messages a split-learning task sends the server
    half of the model during the task (a deployed node: over the network); None: the
    algorithm answers them in the same process (simulation).
    """

    client_id: int
    round: int
    seed: int
    num_examples: int
    generator: torch.Generator
    test_data: ClientData | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    server: Callable[[Any], Any] | None = None


class UpdateOutput(NamedTuple):
    result: ClientResult
    state: Tensors | None
    metrics: dict[str, float]


UpdateReturn = UpdateOutput | Generator[Any, Any, UpdateOutput]


@dataclass(frozen=True)
class FetchModel:
    """A client procedure's request for the global model as it is when the request
    reaches the server; the answer is that :class:`Payload` (its ``version`` says how
    fresh it is)."""


def drive(out: UpdateReturn, respond: Callable[[Any], Any]) -> UpdateOutput:
    """Run a client procedure to completion.

    A plain update returns its :class:`UpdateOutput` directly. A generator procedure yields
    requests to the server; ``respond(request)`` answers each one (in simulation by the
    engine at the right virtual time, in deployment over the network).
    """
    if isinstance(out, UpdateOutput):
        return out
    try:
        request = next(out)
        while True:
            request = out.send(respond(request))
    except StopIteration as stop:
        value = stop.value
        if not isinstance(value, UpdateOutput):
            raise TypeError("a client procedure must return an UpdateOutput") from None
        return value


class Strategy:
    """Server half of an algorithm. Subclasses override :meth:`step` at least.

    The default selection draws the cohort uniformly without replacement from the
    candidates with the engine's per-round generator (W1's stream ``default_rng([seed, 4,
    r])``), in the drawn order.
    """

    aggregation: ClassVar[Literal["sum", "per_client"]] = "sum"

    def __init__(self) -> None:
        self.params = torch.empty(0)
        self.version = 0
        self.num_clients = 0
        self.clients_per_round = 0  # the run's, set by the runner (0: not known)

    def initialize(self, params: torch.Tensor, num_clients: int = 0) -> None:
        """Take the initial global parameters (flat, owned by the strategy from now on)
        and the total number of clients N (SCAFFOLD and FedDyn scale by it)."""
        self.params = params.detach().clone()
        self.version = 0
        self.num_clients = num_clients

    def select(
        self, round: int, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> list[int]:
        k = min(k, len(candidates))
        return [int(c) for c in candidates[rng.choice(len(candidates), size=k, replace=False)]]

    def payload(self, round: int) -> Payload:
        return Payload(self.params, self.version)

    def configure_tasks(
        self, round: int, clients: Sequence[int], rng: np.random.Generator
    ) -> dict[int, dict[str, Any]]:
        """Per-client overrides of the local training for these clients' tasks (Flower's
        ``configure_fit``): ``{client: {"local_epochs": 3, ...}}`` with any field of the
        algorithm's config; clients not in the result train with the config as it is.
        ``rng`` is the round's (or, asynchronously, the dispatch's) own stream. The
        engine charges each task's work and bytes from its settings."""
        return {}

    def observe(self, arrivals: Sequence[Any]) -> None:
        """The :class:`~roost.algorithms.asynchronous.Arrival` of every result delivered
        in this round, in arrival order, before :meth:`step` (methods that learn the
        devices' speeds, such as AMBLE, use it)."""

    @property
    def eval_params(self) -> torch.Tensor:
        """The model the central evaluation measures: the global model by default; a
        strategy whose papers report another one (FedDyn: the mean of the round's client
        models) overrides this."""
        return self.params

    def step(self, round: int, contributions: Sequence[Contribution]) -> dict[str, float]:
        """Update :attr:`params` from this round's results; return server metrics.

        With ``aggregation == "sum"`` there is exactly one contribution (all clients folded);
        with ``"per_client"`` one per client, in arrival order.
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the global model plus any server optimiser state."""
        return {"params": self.params, "version": self.version}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.params = state["params"].clone()
        self.version = int(state["version"])


class Algorithm:
    """One federated method: its config, server strategy and client update rule.

    Subclasses set ``Config`` and implement :meth:`make_strategy` and :meth:`update`.
    :meth:`client_state_spec` declares the per-client state a stateful method keeps
    (name -> number of float32 elements; empty for stateless ones); the runtime keeps it
    in a ClientStateStore between the tasks of a client, in fixed-size slots.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[ClientOptimConfig]] = ClientOptimConfig
    uses_client_test_data: ClassVar[bool] = False
    compressible: ClassVar[bool] = True
    """Whether ``compression=...`` can wrap it: its result is a model (``"params"``) or a
    ``"delta"`` (FedNova's normalised ``"d"`` is not), and it does not compress its own
    uploads already (TEASQ-Fed does)."""
    splits_the_model: ClassVar[bool] = False
    """Whether it trains the model cut between the device and the server (split
    learning): a deployment would have to run the two parts on different machines, and
    the engine times its tasks per micro-batch from :meth:`split_plan`."""

    def __init__(self, config: ClientOptimConfig) -> None:
        self.config = config

    def make_strategy(self) -> Strategy:
        raise NotImplementedError

    def update(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> UpdateReturn:
        raise NotImplementedError

    def client_state_spec(self, num_params: int) -> dict[str, int]:
        """Per-client state: tensor name -> number of float32 elements (flat vectors)."""
        return {}

    def evaluates_personal_models(self) -> bool:
        """True for a personalised method whose official metric is every client's
        personal model on its own test split (Ditto); the engine then calls
        :meth:`personal_params` for every client at each evaluation."""
        return False

    def personal_params(self, state: Tensors) -> torch.Tensor:
        """The flat parameters of a client's personal model, from its state. Clients with
        no state yet are evaluated at the initial global model ``w^0`` instead."""
        raise NotImplementedError(f"{type(self).__name__} keeps no personal model")

    def request_points(self, settings: Mapping[str, Any] | None = None) -> tuple[float, ...]:
        """When a task's procedure yields its requests, as increasing fractions in (0, 1)
        of its compute (empty: a plain update that never asks the server anything), for
        a task with the strategy's ``settings`` (e.g. a per-device request time)."""
        return ()

    def task_config(self, ctx: ClientContext) -> Any:
        """The config one task trains with: :attr:`config` with the task's settings."""
        if not ctx.settings:
            return self.config
        return dataclasses.replace(self.config, **ctx.settings)

    def work_examples(self, num_examples: int, settings: Mapping[str, Any] | None = None) -> int:
        """Examples processed by one task (for the system model's compute time), with
        the task's settings (its ``local_epochs``)."""
        epochs = (settings or {}).get("local_epochs", self.config.local_epochs)
        return num_examples * int(epochs)

    def upload_nbytes(self, num_params: int, version: int = 0) -> int:
        """Bytes a client uploads per task that starts from model ``version`` (default:
        one float32 model; a compressed upload may depend on the version through its
        schedule)."""
        return 4 * num_params

    def adapt_model(self, module: nn.Module, info: DatasetInfo) -> nn.Module:
        """The model this method trains, from the run's ``module`` (for data described by
        ``info``): the same by default; deprune inserts its bottleneck at the cut. Every
        process of a run builds its model through this, so all agree on the layout."""
        return module

    def bind_model(self, module: nn.Module) -> None:
        """Called once by the runner with a freshly built model of the run, before
        :meth:`make_strategy`, for methods whose server half needs the model's structure
        (SplitFed v2 averages only the device part's entries). Default: nothing."""

    def split_serving(self, build_module: Callable[[], nn.Module], info: DatasetInfo) -> Any:
        """For a method that splits the model (:attr:`splits_the_model`): what deploying
        it needs, a :class:`~roost.algorithms.split_serving.SplitServing` for models made
        by ``build_module``; None when its deployment is not built (default)."""
        return None

    def split_plan(
        self,
        layers: Sequence[LayerCost],
        num_examples: int,
        settings: Mapping[str, Any],
        device: DeviceLink,
    ) -> SplitPlan:
        """What a split-learning task of a client with ``num_examples`` examples computes
        and sends (:class:`~roost.split.plan.SplitPlan`), for a model with these
        per-layer costs, a task with the strategy's ``settings``, on a device that
        reports ``device`` (a method choosing its cut per device, PiPar's APS, adds the
        choice to the plan's settings). Only methods that set :attr:`splits_the_model`."""
        raise NotImplementedError(f"{type(self).__name__} does not split the model")

    def decode_upload(self, name: str, data: bytes, payload: Payload) -> torch.Tensor:
        """Result tensor ``name`` rebuilt from the bytes a client uploaded for it
        (:attr:`ClientResult.encoded`) for a task given ``payload``. Raises ValueError
        naming what is wrong with ``data``. Methods whose uploads are plain tensors (the
        default) refuse every encoded upload."""
        raise ValueError(
            f"{type(self).__name__} uploads plain float32 tensors; {name!r} arrived encoded"
        )


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")


def register_algorithm(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: register an :class:`Algorithm` subclass under ``name``."""

    def deco(cls: type[Algorithm]) -> type[Algorithm]:
        cls.name = name
        assert dataclasses.is_dataclass(cls.Config)
        return ALGORITHMS.register(name, cls.Config)(cls)

    return deco
