"""FedASMU: asynchronous staleness-aware model update, on the server and on the device.

Liu, Jia, Che, Huo, Ren, Zhou, Dai, Dou, "FedASMU: Efficient Asynchronous Federated
Learning with Dynamic Staleness-aware Model Update", AAAI 2024 (arXiv 2312.05770). The
paper's body was not reachable; the rules below follow ALGORITHMS.md §2.2, where the two
third-party re-implementations agree. Paper-faithfulness of every formula and default:
**not verified** ([code, third-party] and [inferred] in ALGORITHMS.md).

Device ``i`` starts from ``w^o`` (version ``o``) and runs local SGD. After
``round(request_fraction · τ)`` of its ``τ`` steps it asks the server for the current
global model ``w^{t'}`` (a :class:`~roost.algorithms.base.FetchModel` request; the engine
answers it at that virtual time and charges the download on the device's link) and merges
it when it is fresher (``t' > o``)::

    φ = γ_i / sqrt(t') · (1 - υ_i / sqrt(t' - o + 1))
    β = μ_β φ / (1 + μ_β φ)   (β = 0 if φ <= 0)
    w_local ← (1 - β) w_local + β w^{t'}

then finishes its steps. The server, at version ``t - 1`` when the model arrives, with
``d = t - o`` (staleness + 1), mixes it in at once::

    ξ_i = λ_i / (sqrt(t) · d^{σ_i}) + ι_i      (exponent σ_i/2 with staleness_exponent=half)
    α_i = μ_α ξ_i / (1 + μ_α ξ_i)
    w^t = (1 - α_i) w^{t-1} + α_i w_i

Controls, adapted online with the re-implementations' reward rule [inferred; the paper
derives them from loss gradients]: the device measures the loss of one probe minibatch
(its first ``batch_size`` examples) before and after the merge, ``r_β = L_before -
L_after``, and updates its own ``γ_i += η r_β``, ``υ_i -= η r_β`` (client state); it also
reports ``r = L(w^o) - L(w_i)`` on the same minibatch, and the server updates
``λ_i += η r``, ``σ_i -= η r``, ``ι_i += η r / d`` (``σ_i, λ_i, ι_i`` kept >= 0).
``control_lr = 0`` freezes every control: the server is then FedAsync with the weight
schedule ``α(t, d)`` above.

Defaults: the re-implementations' λ0 = 1, σ0 = 0.5, ι0 = 0, γ0 = 1, υ0 = 0.5, μ_β = 1,
meta learning rate 0.01, request at half of the local steps (``request_policy=fixed``),
and **μ_α = 10** [inferred, Roost's
choice]: with the re-implementations' μ_α = 1 the weight decays with ``sqrt(t)`` to 0.01-0.03
after a few hundred steps and the global model stops moving (FEMNIST's CNN under FLASH
traces: 0.28 accuracy against 0.70 with μ_α = 10, docs/experiments.md; quickstart after 300
steps: 0.861 against 0.894). Optional staleness cap: a result with ``d > max_staleness + 1``
is dropped.

Learned request time (``request_policy=qlearning``; the paper learns it per device, the
DirBridge re-implementation with ε-greedy Q-learning over request slots; ALGORITHMS.md
§2.2) [inferred details]: device i's request point is slot ``s_i`` of ``q_slots`` evenly
spaced fractions ``(k + 1/2) / q_slots``, starting at the middle one. At each dispatch an
action ``a ∈ {-1, 0, +1}`` moves the slot (clipped to the grid): the greedy one for
``Q_i(s_i, ·)`` (ties: stay, then earlier, then later), a uniformly random one with
probability ``q_epsilon``, from the dispatch's own random stream. When the result
arrives, its reward ``r`` is the merge's probe-loss drop ``r_β`` (0 when nothing was
merged) and::

    Q_i(s, a) ← Q_i(s, a) + q_lr (r + q_discount · max_a' Q_i(s', a') − Q_i(s, a)),   s ← s'

A lost task leaves ``Q_i`` and ``s_i`` as they were. The tables are server state here (the
simulation's stand-in for the device's own: the same numbers, since the device reports
``r``); the slot becomes the task's ``request_fraction`` setting, so the engine charges the
fetch at that point of the task's compute.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from roost.algorithms.asynchronous import Arrival, AsyncStrategy, check_concurrency
from roost.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientOptimConfig,
    ClientResult,
    Contribution,
    FetchModel,
    Payload,
    Strategy,
    Tensors,
    UpdateOutput,
    register_algorithm,
)
from roost.algorithms.local_sgd import SGDStepper, minibatches, num_steps
from roost.data.base import ClientData
from roost.params import FlatModel
from roost.registry import check

__all__ = ["FedASMU", "FedASMUConfig", "FedASMUStrategy", "device_merge_weight", "server_weight"]


@dataclass(frozen=True)
class FedASMUConfig(ClientOptimConfig):
    """Server: lambda0, sigma0, iota0 (initial per-device controls), mu_alpha,
    staleness_exponent (full: d^σ, variant A; half: d^(σ/2), variant B), max_staleness
    (None: keep every result). Device: request_fraction (of the local steps, in (0, 1)),
    device_merge (False: never merge the fetched model, no request at all), gamma0,
    upsilon0, mu_beta. Both: control_lr η (0 freezes the controls), concurrency (None:
    the run's clients_per_round)."""

    lambda0: float = 1.0
    sigma0: float = 0.5
    iota0: float = 0.0
    mu_alpha: float = 10.0
    staleness_exponent: Literal["full", "half"] = "full"
    max_staleness: int | None = None
    request_fraction: float = 0.5
    device_merge: bool = True
    gamma0: float = 1.0
    upsilon0: float = 0.5
    mu_beta: float = 1.0
    control_lr: float = 0.01
    concurrency: int | None = None
    request_policy: Literal["fixed", "qlearning"] = "fixed"
    q_slots: int = 10
    q_epsilon: float = 0.1
    q_lr: float = 0.1
    q_discount: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lambda0", "sigma0", "iota0", "gamma0", "upsilon0", "control_lr"):
            v = getattr(self, name)
            check(v >= 0 and math.isfinite(v), name, v, "must be a number >= 0")
        for name in ("mu_alpha", "mu_beta"):
            v = getattr(self, name)
            check(v > 0 and math.isfinite(v), name, v, "must be a number > 0")
        check(
            self.staleness_exponent in ("full", "half"),
            "staleness_exponent",
            self.staleness_exponent,
            "must be full or half",
        )
        check(
            self.max_staleness is None or self.max_staleness >= 0,
            "max_staleness",
            self.max_staleness,
            "must be >= 0 or none",
        )
        check(
            0 < self.request_fraction < 1,
            "request_fraction",
            self.request_fraction,
            "must be in (0, 1)",
        )
        check(
            self.request_policy in ("fixed", "qlearning"),
            "request_policy",
            self.request_policy,
            "must be fixed or qlearning",
        )
        check(self.q_slots >= 1, "q_slots", self.q_slots, "must be >= 1")
        for name in ("q_epsilon", "q_lr", "q_discount"):
            v = getattr(self, name)
            check(0 <= v <= 1, name, v, "must be in [0, 1]")
        check_concurrency(self.concurrency)


def server_weight(
    t: int, d: int, lam: float, sigma: float, iota: float, mu_alpha: float, half: bool = False
) -> float:
    """``α = μ_α ξ / (1 + μ_α ξ)`` with ``ξ = λ / (sqrt(t) d^σ) + ι`` (``d^(σ/2)`` if half)."""
    xi = lam / (math.sqrt(t) * d ** (sigma / 2 if half else sigma)) + iota
    return mu_alpha * xi / (1.0 + mu_alpha * xi)


def device_merge_weight(
    t_fresh: int, o: int, gamma: float, upsilon: float, mu_beta: float
) -> float:
    """``β`` of the module docstring (0 when the fetched model is not fresher)."""
    if t_fresh <= o:
        return 0.0
    phi = gamma / math.sqrt(t_fresh) * (1.0 - upsilon / math.sqrt(t_fresh - o + 1))
    return mu_beta * phi / (1.0 + mu_beta * phi) if phi > 0 else 0.0


def _probe_loss(model: FlatModel, x: torch.Tensor, y: torch.Tensor) -> float:
    """The loss on one probe minibatch, in eval mode (BatchNorm statistics untouched)."""
    was_training = model.module.training
    model.module.eval()
    try:
        with torch.no_grad():
            return float(F.cross_entropy(model.module(x), y))
    finally:
        model.module.train(was_training)


class FedASMUStrategy(AsyncStrategy):
    """Staleness-aware mixing with per-device controls (module docstring)."""

    arrivals_per_step = 1

    def __init__(self, cfg: FedASMUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.concurrency = cfg.concurrency
        self.controls = torch.empty(0, 3, dtype=torch.float64)  # λ, σ, ι per device
        self._pending: tuple[Arrival, torch.Tensor, float] | None = None

    def initialize(self, params: torch.Tensor, num_clients: int = 0) -> None:
        super().initialize(params, num_clients)
        c = self.cfg
        self.controls = torch.tensor(
            [[c.lambda0, c.sigma0, c.iota0]] * num_clients, dtype=torch.float64
        )

    def accept(self, arrival: Arrival, contribution: Contribution) -> bool:
        cap = self.cfg.max_staleness
        if cap is not None and arrival.staleness > cap:
            return False
        reward = contribution.scalar_mean("reward") if "reward" in contribution.scalar_sums else 0.0
        self._pending = (arrival, contribution.mean("params"), reward)
        return True

    def arrivals_until_step(self) -> int | None:
        return None if self.cfg.max_staleness is not None else 1

    def server_step(self, step: int) -> dict[str, float]:
        assert self._pending is not None
        arrival, new, reward = self._pending
        self._pending = None
        c = self.cfg
        t, d = self.version + 1, arrival.staleness + 1
        lam, sigma, iota = (float(v) for v in self.controls[arrival.client_id])
        a = server_weight(t, d, lam, sigma, iota, c.mu_alpha, c.staleness_exponent == "half")
        mixed = torch.lerp(self.params, new, a)
        update_norm = float(torch.linalg.vector_norm(mixed - self.params))
        self.params = mixed
        self.version += 1
        if c.control_lr:
            eta = c.control_lr
            self.controls[arrival.client_id] = torch.tensor(
                [
                    max(0.0, lam + eta * reward),
                    max(0.0, sigma - eta * reward),
                    max(0.0, iota + eta * reward / d),
                ],
                dtype=torch.float64,
            )
        return {"update_norm": update_norm, "mixing_weight": a}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "controls": self.controls.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.controls = state["controls"].clone()


ACTIONS = (0, -1, 1)  # stay, earlier, later: the tie-break order of the greedy choice


class FedASMUQStrategy(FedASMUStrategy):
    """:class:`FedASMUStrategy` with each device's request slot learned by ε-greedy
    Q-learning (the module docstring's ``request_policy=qlearning``)."""

    def initialize(self, params: torch.Tensor, num_clients: int = 0) -> None:
        super().initialize(params, num_clients)
        c = self.cfg
        self.q = torch.zeros(num_clients, c.q_slots, len(ACTIONS), dtype=torch.float64)
        self.slot = torch.full((num_clients,), c.q_slots // 2, dtype=torch.int64)
        self.chosen: dict[int, tuple[int, int, int]] = {}  # client -> (slot, action, next)

    def fraction(self, slot: int) -> float:
        return (slot + 0.5) / self.cfg.q_slots

    def configure_tasks(
        self, round: int, clients: Sequence[int], rng: np.random.Generator
    ) -> dict[int, dict[str, Any]]:
        c = self.cfg
        out: dict[int, dict[str, Any]] = {}
        for cid in clients:
            s = int(self.slot[cid])
            if rng.random() < c.q_epsilon:
                a = int(rng.integers(len(ACTIONS)))
            else:
                a = int(torch.argmax(self.q[cid, s]))  # the first maximum: ACTIONS' order
            nxt = min(max(s + ACTIONS[a], 0), c.q_slots - 1)
            self.chosen[cid] = (s, a, nxt)
            out[cid] = {"request_fraction": self.fraction(nxt)}
        return out

    def accept(self, arrival: Arrival, contribution: Contribution) -> bool:
        chosen = self.chosen.pop(arrival.client_id, None)
        if chosen is not None:
            c = self.cfg
            s, a, nxt = chosen
            r = contribution.scalar_mean("merge_reward")
            q = self.q[arrival.client_id]
            q[s, a] += c.q_lr * (r + c.q_discount * float(q[nxt].max()) - float(q[s, a]))
            self.slot[arrival.client_id] = nxt
        return super().accept(arrival, contribution)

    def state_dict(self) -> dict[str, Any]:
        chosen = sorted(self.chosen.items())
        return {
            **super().state_dict(),
            "q": self.q.clone(),
            "slot": self.slot.clone(),
            "chosen": torch.tensor([[k, *v] for k, v in chosen], dtype=torch.int64).reshape(-1, 4),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.q = state["q"].clone()
        self.slot = state["slot"].clone()
        self.chosen = {int(k): (int(s), int(a), int(n)) for k, s, a, n in state["chosen"].tolist()}


@register_algorithm("fedasmu")
class FedASMU(Algorithm):
    """FedASMU (Liu et al. 2024): staleness-aware server mixing, device-side merge."""

    Config = FedASMUConfig
    config: FedASMUConfig

    def make_strategy(self) -> Strategy:
        c = self.config
        if c.device_merge and c.request_policy == "qlearning":
            return FedASMUQStrategy(c)
        return FedASMUStrategy(c)

    def request_points(self, settings: Mapping[str, Any] | None = None) -> tuple[float, ...]:
        if not self.config.device_merge:
            return ()
        return (float((settings or {}).get("request_fraction", self.config.request_fraction)),)

    def client_state_spec(self, num_params: int) -> dict[str, int]:
        return {"merge_controls": 2} if self.config.device_merge else {}

    def update(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> Generator[Any, Any, UpdateOutput] | UpdateOutput:
        if not self.config.device_merge:
            return self._train(ctx, model, data, payload)
        return self._train_and_merge(ctx, model, data, payload, state)

    def _train(
        self, ctx: ClientContext, model: FlatModel, data: ClientData, payload: Payload
    ) -> UpdateOutput:
        cfg = self.task_config(ctx)
        probe = data.x[: cfg.batch_size], data.y[: cfg.batch_size]
        before = _probe_loss(model, *probe) if cfg.control_lr else 0.0
        stepper = SGDStepper(model, cfg)
        for xb, yb in minibatches(ctx, data, cfg):
            stepper.step(xb, yb)
        return self._output(model, stepper, before, probe, None, {})

    def _train_and_merge(
        self,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Payload,
        state: Tensors | None,
    ) -> Generator[Any, Any, UpdateOutput]:
        cfg = self.task_config(ctx)
        gamma, upsilon = (
            (cfg.gamma0, cfg.upsilon0) if state is None else state["merge_controls"].tolist()
        )
        probe = data.x[: cfg.batch_size], data.y[: cfg.batch_size]
        before = _probe_loss(model, *probe) if cfg.control_lr else 0.0
        stepper = SGDStepper(model, cfg)
        batches = minibatches(ctx, data, cfg)
        request_at = round(cfg.request_fraction * num_steps(len(data), cfg))
        for _ in range(request_at):
            xb, yb = next(batches)
            stepper.step(xb, yb)
        fresh: Payload = yield FetchModel()
        beta = device_merge_weight(fresh.version, payload.version, gamma, upsilon, cfg.mu_beta)
        learns = cfg.request_policy == "qlearning"
        merge_reward = 0.0
        if beta > 0:
            pre = _probe_loss(model, *probe) if cfg.control_lr or learns else 0.0
            model.params.mul_(1.0 - beta).add_(fresh.params, alpha=beta)
            if cfg.control_lr or learns:
                merge_reward = pre - _probe_loss(model, *probe)
            if cfg.control_lr:
                r = merge_reward
                gamma, upsilon = (
                    max(0.0, gamma + cfg.control_lr * r),
                    max(0.0, upsilon - cfg.control_lr * r),
                )
        for xb, yb in batches:
            stepper.step(xb, yb)
        new_state = {"merge_controls": torch.tensor([gamma, upsilon], dtype=torch.float32)}
        extra = {
            "merge_beta": beta,
            "fetched_versions_ahead": float(fresh.version - payload.version),
            "request_fraction": float(cfg.request_fraction),
        }
        scalars = {"merge_reward": merge_reward} if learns else {}
        return self._output(model, stepper, before, probe, new_state, extra, scalars)

    def _output(
        self,
        model: FlatModel,
        stepper: SGDStepper,
        before: float,
        probe: tuple[torch.Tensor, torch.Tensor],
        state: Tensors | None,
        extra: dict[str, float],
        scalars: Mapping[str, float] | None = None,
    ) -> UpdateOutput:
        res = stepper.result()
        reward = before - _probe_loss(model, *probe) if self.config.control_lr else 0.0
        return UpdateOutput(
            ClientResult({"params": model.params}, 1.0, {"reward": reward, **(scalars or {})}),
            state,
            {"train_loss": res.mean_loss, "local_steps": float(res.steps), **extra},
        )
