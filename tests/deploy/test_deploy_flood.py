"""About 1,000 hostile messages from two threads while an honest node completes 20 tasks:
every hostile one refused with its status, the honest results accepted exactly once and
identical to a run without the attack."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

import grpc
import torch
from _deploy_helpers import (
    Federation,
    RecordingCoordinator,
    call,
    client,
    heartbeat_body,
    running_server,
    signed,
    spec,
)
from _hostile import GOOD_DELTA, HOSTILE, SPEC_NUMEL, Hostile, Scene, _good, _push

from roost.deploy.protocol import Result
from roost.deploy.server import ServerConfig
from roost.deploy.tensors import TensorSpec

TASKS = 20
N = 300_000  # 1.2 MB of float32 per payload and result: two chunks each way
PER_THREAD = 500
HONEST_SPEC = {"delta": TensorSpec("float32", (N,))}
MALLORY_SPEC = {"delta": TensorSpec("float32", (SPEC_NUMEL,))}


def honest_tasks():
    base = torch.linspace(-3, 3, N)
    return [
        spec(f"t-{i}", {"params": base * (i + 1)}, HONEST_SPEC, client_id=100 + i)
        for i in range(TASKS)
    ]


def train(task) -> Result:
    """The honest node's deterministic update rule."""
    delta = task.payload["params"] * 0.5 + float(task.client_id)
    return Result(task.task_id, {"delta": delta}, float(task.client_id), {"loss": task.seed / 7})


def run_federation(attack: bool):
    fed, coord = Federation(), RecordingCoordinator()
    coord.add("alice", spec("a-1", {"p": torch.zeros(1)}, MALLORY_SPEC))  # held, never done
    coord.add("alice", *honest_tasks())
    coord.add("mallory", spec("m-done", {"p": torch.zeros(1)}, MALLORY_SPEC))
    coord.add("mallory", spec("m-1", {"p": torch.zeros(1)}, MALLORY_SPEC))
    outcomes: list[tuple[Hostile, grpc.StatusCode, str]] = []
    times: dict[str, float] = {}
    # alice's a-1 must stay "given to alice" through her 20 tasks, so that a result for it
    # from mallory is WrongTask: the table remembers more than its default 16 per node
    # (past them a-1 is forgotten and TaskNotFound, tests/deploy/test_task_records.py)
    with running_server(coord, fed, config=ServerConfig(tasks_per_node=TASKS + 1)) as server:
        mallory = client(server, fed.mallory)
        mallory.pull_task()
        mallory.push_result(Result("m-done", {"delta": GOOD_DELTA}, 1.0))
        mallory.pull_task()
        alice = client(server, fed.alice)
        assert alice.pull_task().task_id == "a-1"  # type: ignore[union-attr]
        scene = Scene(fed)
        # a replay: a valid request, sent once now, then sent again during the flood
        replay_body = heartbeat_body("mallory", "m-1")
        replay_md = signed(scene.mallory, "Heartbeat", replay_body)
        channel = grpc.insecure_channel(server.address)
        assert call(channel, "Heartbeat", replay_body, replay_md).code == grpc.StatusCode.OK
        kinds = [
            *HOSTILE,
            Hostile(
                "replay",
                lambda s: ("Heartbeat", replay_body, replay_md),
                grpc.StatusCode.UNAUTHENTICATED,
                "ReplayedNonce",
            ),
            Hostile(  # a fake result for one of alice's real tasks (given yet or not)
                "forged honest result",
                lambda s: _push(s, _good(s, task=f"t-{int(time.time() * 1e6) % TASKS}")),
                grpc.StatusCode.PERMISSION_DENIED,  # or NOT_FOUND before it is given
                "WrongTask",
            ),
        ]
        lock = threading.Lock()

        def attacker(offset: int) -> None:
            ch = grpc.insecure_channel(server.address)
            times.setdefault("attack_start", time.monotonic())
            for hostile in itertools.islice(itertools.cycle(kinds), offset, offset + PER_THREAD):
                o = call(ch, *hostile.make(scene))
                with lock:
                    outcomes.append((hostile, o.code, o.kind))
            times["attack_end"] = time.monotonic()
            ch.close()

        threads = [threading.Thread(target=attacker, args=(k * 7,)) for k in range(2)]
        if attack:
            for t in threads:
                t.start()
        times["honest_start"] = time.monotonic()
        acks = []
        for _ in range(TASKS):
            task = alice.pull_task()
            assert task is not None
            acks.append(alice.push_result(train(task)))
        times["honest_end"] = time.monotonic()
        alice.close()
        if attack:
            for t in threads:
                t.join()
        channel.close()
        mallory.close()
    return coord, acks, outcomes, times, len(kinds)


def test_a_flood_of_hostile_messages_changes_nothing_for_the_honest_node(caplog):
    caplog.set_level("ERROR", logger="roost.deploy")  # 1,000 refusal lines: keep them out
    coord, acks, outcomes, times, nkinds = run_federation(attack=True)
    assert len(outcomes) == 2 * PER_THREAD == 1000
    assert {h.label for h, _, _ in outcomes} == {h.label for h in HOSTILE} | {
        "replay",
        "forged honest result",
    }
    assert nkinds == len(HOSTILE) + 2
    # the attack ran while the honest node worked
    assert (
        times["attack_start"] < times["honest_end"] and times["attack_end"] > times["honest_start"]
    )
    wrong = []
    for hostile, code, kind in outcomes:
        if hostile.label == "forged honest result":
            ok = (code, kind) in {
                (grpc.StatusCode.PERMISSION_DENIED, "WrongTask"),
                (grpc.StatusCode.NOT_FOUND, "TaskNotFound"),
            }
        else:
            ok = (code, kind) == (hostile.code, hostile.kind)
        if not ok:
            wrong.append((hostile.label, code, kind))
    assert wrong == []  # every hostile message refused, with its own status
    assert all(o[1] != grpc.StatusCode.OK for o in outcomes)

    # honest results: each accepted exactly once, and exactly what training computes
    assert [(a.accepted, a.duplicate) for a in acks] == [(True, False)] * TASKS
    honest = [(n, r) for n, r in coord.accepted if n == "alice"]
    assert [r.task_id for _, r in honest] == [f"t-{i}" for i in range(TASKS)]
    assert [n for n, _ in coord.accepted] == ["mallory"] + ["alice"] * TASKS  # m-done first
    for (_, result), task_spec in zip(honest, honest_tasks(), strict=True):
        want = task_spec.payload["params"] * 0.5 + float(task_spec.client_id)
        assert torch.equal(result.tensors["delta"], want)  # type: ignore[arg-type]
        assert result.weight == task_spec.client_id

    # and identical to the same run without the attack
    calm, _, none, _, _ = run_federation(attack=False)
    assert none == []
    calm_honest = [r for n, r in calm.accepted if n == "alice"]
    for attacked, quiet in zip(honest, calm_honest, strict=True):
        assert attacked[1].task_id == quiet.task_id
        assert torch.equal(attacked[1].tensors["delta"], quiet.tensors["delta"])  # type: ignore[arg-type]
        assert (attacked[1].weight, attacked[1].metrics) == (quiet.weight, quiet.metrics)
