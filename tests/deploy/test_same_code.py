"""Same code, proved (issue 9, item 5): every shipped algorithm, simulated and served to
real nodes (loopback gRPC with TLS, one identity and channel per node), with the same
participation and seeds, ends on the same model.

Participation: the server waits until all 4 nodes are connected (``min_nodes``), each
node declares its client id, and then the engine selects exactly as in simulation
(synchronous methods take all 4 clients in each of 3 rounds; asynchronous ones keep one
task in flight, so the order of arrivals is the order of dispatch, and each dispatch
draws from the same stream among the same idle clients). Each node trains its task with
the algorithm's own update on its client's data and state, as the simulation does; the
server folds the results in float64 in arrival order where the simulation folds them in
selection order, so the float32 models agree to 1e-6 (max absolute difference). AMBLE
sets each round's batch size, epochs and learning rate from the speeds it measured, which
on real nodes are not the simulated devices' speeds: its first round (nothing measured
yet) is compared, and what it learned from the nodes' measured compute times is checked.
Ditto's personal models, kept in client state on the nodes, are measured by the nodes.
The split-learning methods train the device part on the nodes and the server part on a
replica per task on the server, with the activations and gradients of every micro-batch
crossing the network (their bytes up are the device parts and those messages, which is
what the simulation's plan counts; deprune's kept channels in its prune rounds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

from _serving import SMALL, serve_to_nodes

from roost.runner import run
from roost.track.rundir import RunDir

TOLERANCE = 1e-6

SYNCHRONOUS = {
    "fedavg": {},
    "fedprox": {"mu": 0.01},
    "fednova": {},
    "fedadam": {},
    "fedyogi": {},
    "fedadagrad": {},
    "scaffold": {},
    "feddyn": {},
    "splitfed": {"micro_batches": 2},
    "pipar": {"cut": 2, "micro_batches": 2},
    "deprune": {
        "prune_1_budget": 4,
        "prune_2_budget": 2,
        "prune_1_epochs": 1,
        "prune_2_epochs": 1,
        "training_epochs": 1,
    },
}
ASYNCHRONOUS = {
    "fedasync": {"concurrency": 1},
    "fedbuff": {"concurrency": 1, "buffer_size": 2},
    "fedasmu": {"concurrency": 1},
    "teasq": {"concurrency": 1},
    "vanilla_sl": {"micro_batches": 2},
    "splitfed_v2": {"micro_batches": 2},
}


def _tree(name: str, params: dict[str, Any], asynchronous: bool) -> dict[str, Any]:
    algorithm = {"name": name, "lr": 0.1, "batch_size": 10, **params}
    tree = {**SMALL, "algorithm": algorithm}
    if asynchronous:
        tree.update(clients_per_round=1, rounds=4)
    return tree


def _served(tree: dict[str, Any], tmp_path: Path) -> Path:
    out, trained = serve_to_nodes(tree, tmp_path, min_nodes=4)
    assert all(isinstance(n, int) for n in trained.values()), trained
    return out


@dataclass(frozen=True)
class Outcome:
    """A run served and simulated: the final versions, the largest difference of the
    final models, and per step (clients, train loss, bytes uploaded) on each side."""

    versions: tuple[int, int]
    model_diff: float
    served: list[tuple[int, float, int]]
    simulated: list[tuple[int, float, int]]
    out: Path


def _serve_and_simulate(tree: dict[str, Any], tmp_path: Path) -> Outcome:
    sim = tmp_path / "sim"
    run(tree, sim)
    out = _served(tree, tmp_path)
    want = RunDir(sim).load_checkpoint()["strategy"]
    got = RunDir(out).load_checkpoint()["strategy"]

    def steps(d: Path) -> list[tuple[int, float, int]]:
        records = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [(r["clients"], r["train_loss"], r["bytes_up"]) for r in records]

    diff = (got["params"] - want["params"]).abs().max().item()
    return Outcome((got["version"], want["version"]), diff, steps(out), steps(sim), out)


def _same_steps(o: Outcome) -> bool:
    """The same clients per step, train losses equal to 1e-5, and the same bytes uploaded:
    served, the bytes the server received on the wire; simulated, the algorithm's
    predicted upload size (TEASQ-Fed's compressed messages included)."""
    return len(o.served) == len(o.simulated) and all(
        c == d and abs(g - w) <= 1e-5 and up == predicted
        for (c, g, up), (d, w, predicted) in zip(o.served, o.simulated, strict=False)
    )


@pytest.mark.parametrize("name", sorted(SYNCHRONOUS))
def test_a_synchronous_algorithm_served_ends_on_the_simulated_model(
    name: str, tmp_path: Path
) -> None:
    tree = _tree(name, SYNCHRONOUS[name], asynchronous=False)
    o = _serve_and_simulate(tree, tmp_path)
    assert o.versions == (3, 3)  # 3 rounds on both sides
    assert o.model_diff <= TOLERANCE, o.model_diff
    assert _same_steps(o), (o.served, o.simulated)


@pytest.mark.parametrize("name", sorted(ASYNCHRONOUS))
def test_an_asynchronous_algorithm_served_ends_on_the_simulated_model(
    name: str, tmp_path: Path
) -> None:
    tree = _tree(name, ASYNCHRONOUS[name], asynchronous=True)
    o = _serve_and_simulate(tree, tmp_path)
    assert o.versions == (4, 4)  # 4 server steps on both sides
    assert o.model_diff <= TOLERANCE, o.model_diff
    assert _same_steps(o), (o.served, o.simulated)


def test_amble_served_first_round_is_the_simulated_one_and_it_learns_real_speeds(
    tmp_path: Path,
) -> None:
    """Round 1 of AMBLE runs every device at the configured B, E and lr (no speed is known
    yet), so one served round ends on the simulated model; the strategy then holds, for
    each of the 4 clients, a rate (examples per second) from the compute seconds its node
    measured, and the example count of its client (digits' 1,437 training examples split
    in 4 IID parts: 359 or 360)."""
    tree = {**_tree("amble", {}, asynchronous=False), "rounds": 1}
    o = _serve_and_simulate(tree, tmp_path)
    assert o.versions == (1, 1)
    assert o.model_diff <= TOLERANCE, o.model_diff
    assert _same_steps(o), (o.served, o.simulated)
    learned = RunDir(o.out).load_checkpoint()["strategy"]["learned"]
    assert [int(k) for k, *_ in learned] == [0, 1, 2, 3]
    assert all(rate > 0 and size in (359, 360) for _, rate, _, size in learned)


def _digits_as_leaf(folder: Path) -> Path:
    """scikit-learn's digits as a LEAF folder of 4 users with 240 training examples each;
    users 0-2 also have 60 test examples, user 3 none."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    folder.mkdir()
    train, test = {}, {}
    for u in range(4):
        block = slice(300 * u, 300 * u + 300)
        xs, ys = x[block].tolist(), y[block].tolist()
        train[f"u{u}"] = {"x": xs[:240], "y": ys[:240]}
        if u < 3:
            test[f"u{u}"] = {"x": xs[240:], "y": ys[240:]}
    for name, users in (("digits_train_0.json", train), ("digits_test_0.json", test)):
        doc = {
            "users": list(users),
            "num_samples": [len(d["y"]) for d in users.values()],
            "user_data": users,
        }
        (folder / name).write_text(json.dumps(doc))
    return folder


def test_ditto_served_ends_on_the_simulated_model_and_its_nodes_measure_the_personal_ones(
    tmp_path: Path,
) -> None:
    """Ditto keeps each client's personal model in the client's state, on its node. At
    each evaluation the server sends every connected node an evaluation task; the node
    measures its personal model on its own test split. Same global model (to 1e-6), and
    per step the same personal accuracy (a count of correct predictions over the same
    test examples: equal models give equal counts unless a logit ties within 1e-6) and
    personal loss to 1e-5, over the 3 clients that have a test split (of 60 examples;
    the fourth has none: its node answers with 0 examples and is not counted, as the
    simulation skips it)."""
    tree = {**_tree("ditto", {}, asynchronous=False), "partition": {"name": "natural"}}
    tree["data"] = {"name": "leaf", "path": str(_digits_as_leaf(tmp_path / "leaf"))}
    o = _serve_and_simulate(tree, tmp_path)
    assert o.versions == (3, 3)
    assert o.model_diff <= TOLERANCE, o.model_diff
    assert _same_steps(o), (o.served, o.simulated)

    def personal(d: Path) -> list[tuple[float, float, int]]:
        records = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [
            (r["personal_accuracy"], r["personal_loss"], r["personal_clients"]) for r in records
        ]

    served, simulated = personal(o.out), personal(tmp_path / "sim")
    assert [c for _, _, c in served] == [3, 3, 3] == [c for _, _, c in simulated]
    assert [a for a, _, _ in served] == [a for a, _, _ in simulated]
    for (_, got, _), (_, want, _) in zip(served, simulated, strict=True):
        assert abs(got - want) <= 1e-5, (served, simulated)
    # and they learn: accuracy rises each round from chance (0.1 for 10 digits) and the
    # loss falls from about ln 10 = 2.30 (measured: 0.21, 0.27, 0.46; 2.30, 2.19, 2.03)
    accuracies, losses = [a for a, _, _ in served], [loss for _, loss, _ in served]
    assert accuracies == sorted(accuracies) and accuracies[-1] > 0.3
    assert losses == sorted(losses, reverse=True) and losses[-1] < 2.2
