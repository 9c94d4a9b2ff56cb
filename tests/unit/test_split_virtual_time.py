"""Split learning in the engine's virtual time (issue 10 item 2): a SplitFed round lasts
its micro-batch schedule, its bytes are its messages, its record carries the resources'
busy and idle seconds, and a run on worker processes gives the local run's history."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from roost.build import build_parts
from roost.config import resolve
from roost.runner import run
from roost.split.pipeline import StageTotals, makespan

# digits (64 features, 10 classes) on mlp hidden [8]: Flatten, Linear(64, 8), ReLU,
# Linear(8, 10); default cut 4 // 2 = 2, after Linear(64, 8): 8 activations per example.
# Forward multiply-adds 0, 512, 0, 80 (592 in all; a backward costs twice its forward)
DEVICE_SHARE = 512 / (3 * 592)
SERVER_SHARE = 80 / (3 * 592)
PART_BYTES = 4 * (64 * 8 + 8)  # Linear(64, 8), float32


def _tree(**algorithm: Any) -> dict[str, Any]:
    return {
        "rounds": 2,
        "clients": 1,
        "clients_per_round": 1,
        "eval_every": 0,
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [8]},
        "algorithm": {"name": "splitfed", "batch_size": 64, "lr": 0.1, **algorithm},
        # 1 ms per example, 1 Mbps up, 2 Mbps down, a server 4x the device
        "system": {
            "name": "homogeneous",
            "seconds_per_example": 1e-3,
            "uplink_mbps": 1.0,
            "downlink_mbps": 2.0,
            "server_speed": 4.0,
        },
    }


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_a_round_on_one_device_lasts_pipars_stage_graph(micro_batches: int) -> None:
    """One device alone on the server: the device part's download, then each iteration's
    makespan on the stage graph (roost.split.pipeline.makespan, hand-checked in
    test_split_pipeline.py) with this model's totals, then the upload."""
    tree = _tree(micro_batches=micro_batches)
    cfg = resolve(tree)
    n_k = build_parts(cfg).dataset.num_examples(0)
    history = run(cfg)
    first = history.records[0]
    up_bps, down_bps = 1e6, 2e6
    expected = 8 * PART_BYTES / down_bps + 8 * PART_BYTES / up_bps
    sizes = [64] * (n_k // 64) + ([n_k % 64] if n_k % 64 else [])
    for b in sizes:
        n = min(micro_batches, b)
        used = n * (b // n)  # the remainder of b / n is dropped
        up = used * (8 * 4 + 1)  # float32 activations, uint8 labels
        totals = StageTotals(
            used * 1e-3 * DEVICE_SHARE,
            8 * up / up_bps,
            used * 1e-3 / 4 * SERVER_SHARE,
            used * 1e-3 / 4 * 2 * SERVER_SHARE,
            8 * used * 8 * 4 / down_bps,
            used * 1e-3 * 2 * DEVICE_SHARE,
        )
        expected += makespan(totals, n)
    assert first["round_span_s"] == pytest.approx(expected, rel=1e-9)
    assert first["virtual_time_s"] == pytest.approx(expected, rel=1e-9)
    # the server computed only the server part: 1/4 of the device's time per example
    examples = sum(min(micro_batches, b) * (b // min(micro_batches, b)) for b in sizes)
    assert first["server_busy_s"] == pytest.approx(examples * 1e-3 / 4 * 3 * SERVER_SHARE)
    assert first["server_idle_s"] == pytest.approx(expected - first["server_busy_s"])
    assert first["device_compute_busy_s"] == pytest.approx(examples * 1e-3 * 3 * DEVICE_SHARE)


def test_bytes_are_the_cut_messages_and_the_device_part() -> None:
    """The run's bytes_up are the activations, labels and device part each client sent,
    exactly the client metric cut_bytes_up (the split procedure's own count); a whole
    float32 model would be 4 * 610 = 2440 bytes a task."""
    tree = _tree()
    tree.update(clients=5, clients_per_round=3)
    history = run(resolve(tree))
    for r in history.records:
        assert r["bytes_up"] == pytest.approx(r["clients"] * r["client_cut_bytes_up"])
        assert r["bytes_down"] == pytest.approx(r["clients"] * r["client_cut_bytes_down"])
        assert r["bytes_up"] != r["clients"] * 4 * 610


def test_the_first_round_keeps_its_timeline() -> None:
    """Round 1's record holds every interval of each device's first iteration: per
    device the part's download, N forwards, uplinks, server jobs, downlinks, backwards."""
    tree = _tree(micro_batches=2)
    tree.update(clients=4, clients_per_round=2)
    records = run(resolve(tree)).records
    timeline = records[0]["split_timeline"]
    assert len(timeline) == 2 * (1 + 5 * 2)
    assert "split_timeline" not in records[1]
    server = sorted((iv[3], iv[4]) for iv in timeline if iv[0] == "server_compute")
    for (_, end), (start, _) in itertools.pairwise(server):
        assert start >= end - 1e-12  # one server: its jobs never overlap


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("splitfed", {"micro_batches": 2}),
        ("pipar", {}),  # APS per device, momentum as client state
        (
            "deprune",
            {"prune_1_budget": 4, "prune_1_epochs": 1, "prune_2_budget": 2, "prune_2_epochs": 1},
        ),
    ],
)
def test_split_runs_on_workers_give_the_local_history(
    name: str, extra: dict[str, Any], tmp_path: Path
) -> None:
    """The same split run on two worker processes: every record field but wall time and
    the workers' own measurements (their busy seconds, memory, devices)."""
    tree = _tree(**extra)
    tree["algorithm"]["name"] = name
    tree.update(clients=6, clients_per_round=4, rounds=3, eval_every=1)
    local = run(resolve(tree)).records
    tree["runtime"] = {"name": "workers", "workers": 2}
    workers = run(resolve(tree), tmp_path / "w").records

    def strip(r: dict[str, Any]) -> dict[str, Any]:
        own = ("wall", "worker_", "makespan_s", "predicted_makespan_s")
        return {k: v for k, v in r.items() if not k.startswith(own)}

    assert [strip(r) for r in workers] == [strip(r) for r in local]


def test_measured_seconds_give_the_shares() -> None:
    """split_costs=profile: forward seconds 1, 0, 3 and backward 2, 1, 3 (10 in all):
    cut 1 puts forward 1/10 and backward 2/10 of an example's training on the device,
    forward 3/10 and backward 4/10 on the server (the multiply-adds are then unused)."""
    from roost.models.cost import LayerCost
    from roost.split.plan import plan_for_cut, training_shares

    layers = [
        LayerCost(5, 4, 1, forward_s=1.0, backward_s=2.0),
        LayerCost(0, 4, 0, forward_s=0.0, backward_s=1.0),
        LayerCost(9, 2, 1, forward_s=3.0, backward_s=3.0),
    ]
    assert training_shares(layers) == ([0.1, 0.0, 0.3], [0.2, 0.1, 0.3])
    plan = plan_for_cut(
        layers, 1, num_examples=1, batch_size=1, epochs=1, micro_batches=1,
        wire_bytes=4, label_bytes=1, part_bytes=0,
    )  # fmt: skip
    got = (plan.device_forward, plan.device_backward, plan.server_forward, plan.server_backward)
    assert got == pytest.approx((0.1, 0.2, 0.3, 0.4))


def test_a_resumed_profiled_run_times_with_the_seconds_it_measured(tmp_path: Path) -> None:
    """split_costs=profile measures the layers once; the checkpoint keeps the seconds, and
    a resumed run uses them rather than measuring again (two measurements of the same
    layers never agree to the last bit)."""
    import torch

    from roost.runner import resume

    tree = _tree()
    tree.update(rounds=3, split_costs="profile")

    def stop_after_first(record: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        return record["round"] == 1, {}

    run(resolve(tree), tmp_path / "run", callbacks=[stop_after_first])
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    first = torch.load(checkpoint, weights_only=True)["engine"]["split_seconds"]
    assert len(first) == 4 and all(f > 0 for f, _ in first[1:2])  # Linear(64, 8) took time
    records = resume(tmp_path / "run").records
    assert [r["round"] for r in records] == [1, 2, 3]
    assert torch.load(checkpoint, weights_only=True)["engine"]["split_seconds"] == first
