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
Ditto is refused: it measures personal models from client state that a deployment keeps
on the nodes (not built yet).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

from _serving import SMALL, federation, serve_to_nodes, start_server

from roost.registry import ConfigError
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
}
ASYNCHRONOUS = {
    "fedasync": {"concurrency": 1},
    "fedbuff": {"concurrency": 1, "buffer_size": 2},
    "fedasmu": {"concurrency": 1},
    "teasq": {"concurrency": 1},
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


def test_ditto_is_refused_with_the_reason(tmp_path: Path) -> None:
    """Ditto's personal models are measured on the server from client state; deployed,
    that state is on the nodes, so serving Ditto says so instead of measuring nothing."""
    keys = federation(tmp_path / "keys", 1)
    with pytest.raises(ConfigError, match="keeps on the nodes; deploying it is not built yet"):
        start_server(_tree("ditto", {}, False), tmp_path / "served", keys).join(30)
