"""Split-learning tasks in virtual time (roost.system.split_schedule), against schedules
computed by hand and against PiPar's stage graph (roost.split.pipeline.makespan)."""

from __future__ import annotations

import pytest

from roost.models.cost import LayerCost
from roost.split.pipeline import StageTotals, makespan
from roost.split.plan import SplitPlan, plan_for_cut
from roost.system.model import HomogeneousConfig, HomogeneousSystem
from roost.system.split_schedule import SplitTask, schedule_split_tasks

# One byte per second each way (8e-6 Mbps), one second per example on the device, the
# server twice as fast: with the plan below a micro-batch of one example takes
# cf = 1 s forward and cb = 2 s backward on the device, 2 s up (2 bytes), s = 0.5 s on the
# server (shares 0.25 + 0.75 of 1/2 s) and 1 s down (1 byte).
BYTE_PER_S = 8e-6


def _config(latency_s: float = 0.0) -> HomogeneousConfig:
    return HomogeneousConfig(
        seconds_per_example=1.0,
        uplink_mbps=BYTE_PER_S,
        downlink_mbps=BYTE_PER_S,
        latency_s=latency_s,
        server_speed=2.0,
    )


def _system(latency_s: float = 0.0) -> HomogeneousSystem:
    return HomogeneousSystem(_config(latency_s))


def _plan(batch: int = 2, micro_batches: int = 2, examples: int = 2, part_bytes: int = 0):
    return SplitPlan(
        num_examples=examples,
        batch_size=batch,
        epochs=1,
        micro_batches=micro_batches,
        device_forward=1.0,
        device_backward=2.0,
        server_forward=0.25,
        server_backward=0.75,
        up_bytes_per_example=2,
        down_bytes_per_example=1,
        part_bytes=part_bytes,
    )


def test_one_device_two_micro_batches_by_hand() -> None:
    # CF1 = 1, CF2 = 2; UP1 = 1 + 2 = 3, UP2 = max(2, 3) + 2 = 5; S1 = [3, 3.5],
    # S2 = [5, 5.5]; DN1 = 3.5 + 1 = 4.5, DN2 = max(5.5, 4.5) + 1 = 6.5;
    # CB1 = max(4.5, CF2 = 2) + 2 = 6.5, CB2 = max(6.5, 6.5) + 2 = 8.5
    out = schedule_split_tasks(_system(), [SplitTask(0, 0.0, _plan())], timeline=True)
    task = out.tasks[0]
    assert task.timing.compute_end_s == pytest.approx(8.5)
    assert task.timing.arrival_s == pytest.approx(8.5)  # no device part to upload
    assert out.server_busy_s == pytest.approx(1.0)
    assert task.device_compute_busy_s == pytest.approx(2 * (1 + 2))
    assert task.uplink_busy_s == pytest.approx(4.0)
    assert task.downlink_busy_s == pytest.approx(2.0)
    assert (task.up_bytes, task.down_bytes) == (4, 2)
    server = [(iv[3], iv[4]) for iv in out.timeline if iv[0] == "server_compute"]
    assert server == [pytest.approx((3.0, 3.5)), pytest.approx((5.0, 5.5))]
    backward = [(iv[3], iv[4]) for iv in out.timeline if iv[5] == "backward"]
    assert backward == [pytest.approx((4.5, 6.5)), pytest.approx((6.5, 8.5))]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 12])
def test_one_device_iteration_is_pipars_stage_graph(n: int) -> None:
    """Alone on the server, an iteration of a batch of 12 lasts the DAG model's makespan
    with the stage totals of the whole batch (server forward and backward as one stage:
    only their sum matters when the server has nothing else to do)."""
    out = schedule_split_tasks(
        _system(), [SplitTask(0, 0.0, _plan(batch=12, micro_batches=n, examples=12))]
    )
    totals = StageTotals(12.0, 24.0, 1.5, 4.5, 12.0, 24.0)
    assert out.tasks[0].timing.compute_end_s == pytest.approx(makespan(totals, n))


def test_two_devices_queue_on_the_server() -> None:
    # both devices send micro-batch 1 at t = 3 and 2 at t = 5; first come first served,
    # ties to the task listed first: A1 [3, 3.5], B1 [3.5, 4], A2 [5, 5.5], B2 [5.5, 6].
    # A as alone: 8.5. B: DN1 = 4 + 1 = 5, DN2 = max(6, 5) + 1 = 7; CB1 = max(5, 2) + 2 = 7,
    # CB2 = max(7, 7) + 2 = 9
    out = schedule_split_tasks(
        _system(), [SplitTask(0, 0.0, _plan()), SplitTask(1, 0.0, _plan())], timeline=True
    )
    assert [t.timing.arrival_s for t in out.tasks] == [pytest.approx(8.5), pytest.approx(9.0)]
    assert out.server_busy_s == pytest.approx(2.0)
    order = [
        (iv[1], iv[2])
        for iv in sorted(out.timeline, key=lambda iv: iv[3])
        if iv[0] == "server_compute"
    ]
    assert order == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_device_part_transfers_and_latency() -> None:
    # 3 bytes of device part at 1 byte/s plus 0.5 s latency: downloaded at 3.5; every
    # message pays the latency too: CF1 = 4.5, CF2 = 5.5; UP1 = 4.5 + 2.5 = 7,
    # UP2 = 9.5; S1 = [7, 7.5], S2 = [9.5, 10]; DN1 = 9, DN2 = 11.5; CB1 = 11,
    # CB2 = max(11.5, 11) + 2 = 13.5; uploaded at 13.5 + 3.5 = 17
    plan = _plan(part_bytes=3)
    out = schedule_split_tasks(_system(latency_s=0.5), [SplitTask(0, 0.0, plan)])
    t = out.tasks[0].timing
    assert (t.download_end_s, t.compute_end_s, t.arrival_s) == pytest.approx((3.5, 13.5, 17.0))
    assert (out.tasks[0].up_bytes, out.tasks[0].down_bytes) == (4 + 3, 2 + 3)


class _Offline(HomogeneousSystem):
    """Client 1 goes offline at t = 4.5 (if its task lasts that long)."""

    def offline_s(self, client_id: int, start_s: float, arrival_s: float) -> float | None:
        return 4.5 if client_id == 1 and arrival_s > 4.5 else None


def test_a_lost_device_frees_the_server() -> None:
    # B (listed first) sends micro-batch 1 at 3 and would send 2 at 5, after it went
    # offline at 4.5: only B1 is served, [3, 3.5]; A1 waits, [3.5, 4]; A2 is served as
    # soon as it arrives, [5, 5.5] (behind B2 it would have been [5.5, 6])
    system = _Offline(_config())
    out = schedule_split_tasks(
        system, [SplitTask(1, 0.0, _plan()), SplitTask(0, 0.0, _plan())], timeline=True
    )
    lost, kept = out.tasks
    assert lost.timing.offline_s == 4.5
    assert kept.timing.offline_s is None
    served = sorted((iv[3], iv[4], iv[1]) for iv in out.timeline if iv[0] == "server_compute")
    assert served == [
        pytest.approx((3.0, 3.5, 1)),
        pytest.approx((3.5, 4.0, 0)),
        pytest.approx((5.0, 5.5, 0)),
    ]
    assert out.server_busy_s == pytest.approx(1.5)


def test_plan_for_cut_shares_and_bytes() -> None:
    # forward multiply-adds 100, 0, 300 (a ReLU between): cut 2 puts 100 of 400 on the
    # device: device forward 100 / 1200, backward twice that; server 300 / 1200 and 600 /
    # 1200; the shares add up to one example's whole training
    layers = [LayerCost(100, 8, 30), LayerCost(0, 8, 0), LayerCost(300, 3, 27)]
    plan = plan_for_cut(
        layers,
        2,
        num_examples=10,
        batch_size=4,
        epochs=2,
        micro_batches=3,
        wire_bytes=2,
        label_bytes=1,
        part_bytes=120,
    )
    assert (plan.device_forward, plan.device_backward) == pytest.approx((1 / 12, 2 / 12))
    assert (plan.server_forward, plan.server_backward) == pytest.approx((3 / 12, 6 / 12))
    total = plan.device_forward + plan.device_backward + plan.server_forward
    assert total + plan.server_backward == pytest.approx(1.0)
    # 8 elements at 2 bytes + a 1-byte label up, 16 bytes down, per example
    assert (plan.up_bytes_per_example, plan.down_bytes_per_example) == (17, 16)
    # batches 4, 4, 2 per epoch: 3 micro-batches of 1 (4 // 3), then 2 of 1 (2 < 3)
    assert list(plan.iterations()) == [(3, 1), (3, 1), (2, 1)] * 2
    assert plan.num_iterations == 6
    assert plan.cut_bytes() == (16 * 17, 16 * 16)  # 16 examples sent per task
    with pytest.raises(ValueError, match=r"cuts at 1 \.\. 2"):
        plan_for_cut(
            layers,
            3,
            num_examples=1,
            batch_size=1,
            epochs=1,
            micro_batches=1,
            wire_bytes=4,
            label_bytes=1,
            part_bytes=0,
        )
