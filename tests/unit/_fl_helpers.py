"""A minimal in-process stand-in for the runtime, for algorithm unit tests.

It does what a runtime does for one synchronous round and nothing more: load the payload
into the resident :class:`FlatModel`, run the client update with a seeded
:class:`ClientContext`, fold each result into one :class:`Contribution` at once (results may
alias the resident model), then step the strategy. Stateful algorithms get a plain dict as
their state store (states are copied on the way in, as a store does).

It also holds the float64 numpy oracle of a linear softmax classifier (the gradient and
local SGD written out independently of torch), and :func:`check_state_survives`, which
runs a stateful algorithm through the real runner and runtime and checks each client's
state is handed back exactly between the rounds it takes part in.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from roost.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientResult,
    Contribution,
    Strategy,
    Tensors,
    UpdateOutput,
    drive,
)
from roost.data.base import ClientData
from roost.params import FlatModel


def no_server_requests(request: Any) -> Any:
    raise AssertionError(f"a plain client update made a server request: {request!r}")


def task_seed(client_id: int, round: int) -> int:
    return 1000 * round + client_id


def linear_model(in_features: int = 4, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(in_features, classes)


def make_clients(
    sizes: Sequence[int], in_features: int = 4, classes: int = 3, seed: int = 0
) -> list[ClientData]:
    """Client ``k`` gets ``sizes[k]`` Gaussian examples with random labels."""
    g = torch.Generator().manual_seed(seed)
    return [
        ClientData(
            torch.randn(n, in_features, generator=g),
            torch.randint(0, classes, (n,), generator=g),
        )
        for n in sizes
    ]


def client_round(
    alg: Algorithm,
    strategy: Strategy,
    model: FlatModel,
    clients: Sequence[tuple[int, ClientData]],
    round: int,
    states: dict[int, Tensors] | None = None,
    test_data: dict[int, ClientData] | None = None,
) -> tuple[Contribution, list[dict[str, float]]]:
    """Run the selected ``(client_id, data)`` tasks of one round; return the folded sum.

    With ``states`` (client id -> state), each task gets its client's state (None before
    the first task) and the state it returns is stored back, copied, as a store would.
    ``test_data`` gives clients their own test split (``ctx.test_data``).
    """
    payload = strategy.payload(round)
    contribution = Contribution()
    metrics = []
    for cid, data in clients:
        out = client_task(alg, model, data, payload, cid, round, states, test_data)
        contribution.fold(out.result, cid)
        metrics.append(out.metrics)
    return contribution, metrics


def client_task(
    alg: Algorithm,
    model: FlatModel,
    data: ClientData,
    payload: Any,
    cid: int,
    round: int,
    states: dict[int, Tensors] | None = None,
    test_data: dict[int, ClientData] | None = None,
) -> UpdateOutput:
    """One task as the local runtime runs it (see :func:`client_round`). The result's
    tensors may alias the resident model: fold or copy them before the next task."""
    seed = task_seed(cid, round)
    test = test_data.get(cid) if test_data is not None else None
    ctx = ClientContext(cid, round, seed, len(data), torch.Generator().manual_seed(seed), test)
    model.load_(payload.params)
    state = states.get(cid) if states is not None else None
    out = drive(alg.update(ctx, model, data, payload, state), no_server_requests)
    if states is not None and out.state is not None:
        states[cid] = {k: v.detach().clone() for k, v in out.state.items()}
    return out


def run_rounds(
    alg: Algorithm,
    module: nn.Module,
    clients: Sequence[ClientData],
    rounds: int,
    order: Sequence[int] | None = None,
) -> Strategy:
    """``rounds`` full-participation rounds of ``alg`` from ``module``'s weights (N =
    ``len(clients)``; client state, if any, kept between rounds)."""
    model = FlatModel(module)
    strategy = alg.make_strategy()
    strategy.initialize(model.params, len(clients))
    ids = list(order) if order is not None else list(range(len(clients)))
    states: dict[int, Tensors] = {}
    for r in range(1, rounds + 1):
        contribution, _ = client_round(
            alg, strategy, model, [(cid, clients[cid]) for cid in ids], r, states
        )
        strategy.step(r, [contribution])
    return strategy


def contribution_of(results: Sequence[tuple[Sequence[float], float]]) -> Contribution:
    """Fold ``(params, weight)`` pairs, as clients would have returned them, in order."""
    c = Contribution()
    for i, (params, weight) in enumerate(results):
        c.fold(ClientResult({"params": torch.tensor(params, dtype=torch.float32)}, weight), i)
    return c


# --------------------------------------------------------------------- hand-sized problems


def zero_linear(in_features: int = 2, classes: int = 2) -> nn.Module:
    """A linear classifier with all weights and biases 0: its softmax is uniform, so the
    first gradient step can be written by hand. Flat layout: ``W`` row-major, then ``b``."""
    module = nn.Linear(in_features, classes)
    with torch.no_grad():
        module.weight.zero_()
        module.bias.zero_()
    return module


def hand_clients() -> list[ClientData]:
    """Three tiny clients for hand-derived rounds (2 features, 2 classes):

    * A: one example x = (1, 2), y = 0;
    * B: two examples x = (2, 0), (0, −2), both y = 1;
    * C: three examples x = (1, −1), (−1, 0), (0, 1), y = 1, 0, 0.

    At θ = 0 (softmax (1/2, 1/2)) the mean cross-entropy gradients, flat (W00, W01, W10,
    W11, b0, b1) with W_cj = mean (p_c − [y = c]) x_j, are
    g_A = (−1/2, −1, 1/2, 1, −1/2, 1/2) and g_B = (1/2, −1/2, −1/2, 1/2, 1/2, −1/2).
    """
    return [
        ClientData(torch.tensor([[1.0, 2.0]]), torch.tensor([0])),
        ClientData(torch.tensor([[2.0, 0.0], [0.0, -2.0]]), torch.tensor([1, 1])),
        ClientData(torch.tensor([[1.0, -1.0], [-1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 0, 0])),
    ]


def _np(data: ClientData) -> tuple[np.ndarray, np.ndarray]:
    return data.x.double().numpy(), data.y.numpy()


def np_linear_grad(theta: np.ndarray, data: ClientData, classes: int = 2) -> np.ndarray:
    """∇ of the mean cross-entropy of ``softmax(W x + b)`` at flat ``theta`` (float64)."""
    x, y = _np(data)
    d = x.shape[1]
    w, b = theta[: classes * d].reshape(classes, d), theta[classes * d :]
    z = x @ w.T + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return np.concatenate([(p.T @ x).ravel(), p.sum(axis=0)])


def np_linear_loss_acc(
    theta: np.ndarray, data: ClientData, classes: int = 2
) -> tuple[float, float]:
    x, y = _np(data)
    d = x.shape[1]
    z = x @ theta[: classes * d].reshape(classes, d).T + theta[classes * d :]
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean()), float((z.argmax(axis=1) == y).mean())


def np_local_sgd(
    theta: np.ndarray,
    data: ClientData,
    lr: float,
    batch_size: int,
    epochs: int,
    correction: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, int]:
    """Plain minibatch SGD in stored order: ``θ ← θ − lr (∇L_batch(θ) + correction(θ))``.
    Returns the final θ and the number of steps K."""
    theta = theta.copy()
    steps = 0
    for _ in range(epochs):
        for s in range(0, len(data), batch_size):
            batch = ClientData(data.x[s : s + batch_size], data.y[s : s + batch_size])
            g = np_linear_grad(theta, batch)
            if correction is not None:
                g = g + correction(theta)
            theta = theta - lr * g
            steps += 1
    return theta, steps


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


# ------------------------------------------------------------ state across real rounds

RECORDED = ("scaffold", "feddyn", "ditto")


def _recording(base: type[Algorithm]) -> Callable[..., UpdateOutput]:
    def update(
        self: Any,
        ctx: ClientContext,
        model: FlatModel,
        data: ClientData,
        payload: Any,
        state: Tensors | None,
    ) -> UpdateOutput:
        out = drive(base.update(self, ctx, model, data, payload, state), no_server_requests)
        record = {
            "client": ctx.client_id,
            "round": ctx.round,
            "num_params": model.numel,
            "in": None if state is None else {k: v.clone() for k, v in state.items()},
            "out": {k: v.detach().clone() for k, v in (out.state or {}).items()},
        }
        torch.save(record, Path(self.config.record_dir) / f"{ctx.client_id}-{ctx.round}.pt")
        return out

    return update


def register_recorders() -> None:
    """Register ``recorded_<name>`` for each stateful algorithm in :data:`RECORDED`: the
    same algorithm with a ``record_dir`` config field, whose every task saves the state it
    was given and the state it returned to ``record_dir/<client>-<round>.pt``. Files work
    from any process, so the check holds for multi-process runtimes too."""
    from roost.algorithms.base import ALGORITHMS, register_algorithm

    for name in RECORDED:
        if f"recorded_{name}" in ALGORITHMS:
            continue
        base = ALGORITHMS.get(name).factory
        config_cls = dataclasses.make_dataclass(
            f"Recorded{base.Config.__name__}",
            [("record_dir", str, dataclasses.field(default=""))],
            bases=(base.Config,),
            frozen=True,
        )
        cls = type(f"Recorded{base.__name__}", (base,), {"Config": config_cls})
        cls.update = _recording(base)  # type: ignore[method-assign]
        register_algorithm(f"recorded_{name}")(cls)


def check_state_survives(
    name: str, runtime: str, tmp_path: Path, monkeypatch: Any, state_store: str = "memory"
) -> None:
    """Run algorithm ``name`` for 5 rounds of the quickstart (10 clients, 3 a round) through
    :func:`roost.runner.run` on ``runtime``, as its recording twin (:func:`register_recorders`,
    loaded by a plugin file so that worker processes, which rebuild the algorithm from the
    config, record too), and check for every client: its first task gets no state; each
    later task gets exactly (``torch.equal``) the state its previous task returned, also
    across rounds it sat out; a task changes the state; the final checkpoint holds its last
    returned state; every state is flat float32 of the declared sizes.
    """
    from roost.algorithms.base import ALGORITHMS
    from roost.config import apply_overrides, load_config_source, resolve
    from roost.runner import run

    # The plugin registers into ALGORITHMS; the copy is dropped after the test.
    monkeypatch.setattr(ALGORITHMS, "_entries", dict(ALGORITHMS._entries))
    plugin = tmp_path / "state_recorder.py"
    plugin.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from _fl_helpers import register_recorders\n"
        "register_recorders()\n"
    )
    records = tmp_path / "records"
    records.mkdir()
    overrides = [
        f"imports={plugin}",
        f"algorithm=recorded_{name}",
        f"algorithm.record_dir={records}",
        "algorithm.local_epochs=1",
        "clients=10",
        "clients_per_round=3",
        "rounds=5",
        "model.hidden=8",
        "eval_every=0",
        f"runtime={runtime}",
        f"state_store={state_store}",
    ]
    try:
        cfg = resolve(apply_overrides(load_config_source("quickstart"), overrides))
        history = run(cfg, tmp_path / "run")
    finally:
        sys.modules.pop("roost_plugin_state_recorder", None)
    assert [r["clients"] for r in history.records] == [3] * 5

    entry = ALGORITHMS.get(name)
    algorithm = entry.factory(entry.config_cls())
    tasks: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for path in records.glob("*.pt"):
        rec = torch.load(path, weights_only=True)
        tasks[int(rec["client"])].append(rec)
    assert sum(len(t) for t in tasks.values()) == 5 * 3
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    if state_store == "memory":
        stored = {int(k): v for k, v in checkpoint["client_state"]["states"].items()}
    else:  # the run's disk store, reopened from its checkpoint as a resume would
        from roost.state import make_state_store

        spec = algorithm.client_state_spec(next(iter(tasks.values()))[0]["num_params"])
        store = make_state_store(
            "disk", spec, 10, tmp_path / "run", checkpoint=checkpoint["client_state"]
        )
        stored = {cid: store.get(cid) for cid in range(10)}
        stored = {cid: st for cid, st in stored.items() if st is not None}
        store.close()
    assert set(stored) == set(tasks)

    gaps = 0
    for cid, recs in tasks.items():
        recs.sort(key=lambda r: int(r["round"]))
        assert recs[0]["in"] is None, f"client {cid} had state before its first task"
        for prev, nxt in itertools.pairwise(recs):
            gaps += int(nxt["round"]) - int(prev["round"]) > 1
            assert set(nxt["in"]) == set(prev["out"])
            for key, value in prev["out"].items():
                assert torch.equal(nxt["in"][key], value), (cid, prev["round"], key)
        for rec in recs:
            declared = algorithm.client_state_spec(rec["num_params"])
            assert {k: (v.dtype, v.shape) for k, v in rec["out"].items()} == {
                k: (torch.float32, torch.Size([n])) for k, n in declared.items()
            }
            if rec["in"] is not None:
                assert any(not torch.equal(rec["in"][k], rec["out"][k]) for k in declared)
        last = recs[-1]["out"]
        assert set(stored[cid]) == set(last)
        for key, value in last.items():
            assert torch.equal(stored[cid][key], value), (cid, key)
    # some client sat out at least one round between two of its tasks
    assert gaps > 0
    return sum(len(t) for t in tasks.values())
