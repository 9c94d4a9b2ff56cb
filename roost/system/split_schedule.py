"""Split-learning tasks in virtual time: four resources per device and one shared server.

Each task (a :class:`~roost.split.plan.SplitPlan` of device ``k`` dispatched at ``t0``)
uses its device's compute, uplink and downlink, and the server's compute, which every
device of the run shares (the server-side replica of each device runs on that one server,
PiPar and SplitFed v1's setting). With per-micro-batch seconds ``cf = c_k(m) φ_cf`` and
``cb = c_k(m) φ_cb`` on the device (``c_k(m)`` the system model's compute time of ``m``
examples on device ``k``, ``φ`` the plan's shares), ``s = c_S(m) (φ_sf + φ_sb)`` on the
server (``c_S`` the server's compute time, :meth:`SystemModel.server_compute_time_s`) and
transfers timed by the system model (:meth:`SystemModel.transfer_end_s`, so traces and
latency apply to every message), iteration ``i`` of a task starting at ``T`` runs::

    CF_j = T + j cf                                           j = 1 .. n, in order
    UP_j : from max(CF_j, UP_{j-1}), m u bytes up             the uplink sends in order
    S_j  : from max(UP_j, server free), s                     the server, first come first
                                                              served over all devices
    DN_j : from max(S_j, DN_{j-1}), m d bytes down
    CB_j : from max(DN_j, CB_{j-1}, CF_n), cb                 backward after the last forward

and the next iteration starts at ``CB_n`` (both parts then step). The task downloads the
device part before its first iteration and uploads it after its last; its arrival is the
end of that upload. The server serves jobs in order of arrival at the server (ties: the
task listed first, then the earlier micro-batch), so that on one device alone the
iteration is exactly PiPar's stage graph (:func:`roost.split.pipeline.makespan` with
``S_f + S_b`` as one server stage), and on several devices their micro-batches queue.

A device that goes offline (:meth:`SystemModel.offline_s`) stops there: its later
micro-batches never reach the server, which then serves the others sooner; the schedule
is recomputed until the set of lost tasks no longer changes (each pass can only make the
other tasks earlier).

Per task it records when each phase ends (a :class:`TaskTiming`), the busy seconds of the
device's three resources and of the server for it, and the bytes each way; for the round,
the server's busy seconds; on request, every interval of each task's first iteration
and its download of the device part before it (a Gantt chart's data).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from roost.split.plan import SplitPlan
from roost.system.model import SystemModel, TaskTiming

__all__ = [
    "RESOURCES",
    "Interval",
    "RoundSchedule",
    "SplitTask",
    "TaskSchedule",
    "schedule_split_tasks",
]

RESOURCES = ("device_compute", "uplink", "server_compute", "downlink")
"""The resources a split task uses, as named in the timeline."""

Interval = tuple[str, int, int, float, float, str]
"""``(resource, client, micro_batch, start_s, end_s, what)``: micro_batch ``-1`` for the
device part's transfers; ``what`` is ``forward``/``backward`` on the device's compute,
``activations``/``gradient``/``model`` on a link, ``micro_batch`` on the server."""


@dataclass(frozen=True)
class SplitTask:
    client_id: int
    start_s: float
    plan: SplitPlan


@dataclass
class TaskSchedule:
    """One task's timeline: its phases, busy seconds per resource, bytes each way."""

    timing: TaskTiming
    device_compute_busy_s: float = 0.0
    uplink_busy_s: float = 0.0
    downlink_busy_s: float = 0.0
    server_busy_s: float = 0.0
    up_bytes: int = 0
    down_bytes: int = 0


@dataclass
class RoundSchedule:
    tasks: list[TaskSchedule]
    server_busy_s: float
    timeline: list[Interval] = field(default_factory=list)


@dataclass
class _Run:
    """A task's progress through the simulation."""

    task: SplitTask
    iterations: list[tuple[int, int]]
    cutoff: float
    out: TaskSchedule
    iteration: int = -1
    cf_last: float = 0.0  # end of the iteration's last forward
    dn: float = 0.0  # end of the previous gradient's download
    cb: float = 0.0  # end of the previous backward
    done: bool = False
    end_s: float = 0.0  # end of its last backward (or where it stopped)


def schedule_split_tasks(
    system: SystemModel, tasks: Sequence[SplitTask], *, timeline: bool = False
) -> RoundSchedule:
    """The timelines of ``tasks``, which share the server (module docstring)."""
    lost: dict[int, float] = {}
    while True:
        schedule = _simulate(system, tasks, lost, timeline)
        found: dict[int, float] = {}
        for i, (task, out) in enumerate(zip(tasks, schedule.tasks, strict=True)):
            off = system.offline_s(task.client_id, task.start_s, out.timing.arrival_s)
            if off is not None:
                found[i] = off
        if found == lost:
            for i, off in lost.items():
                schedule.tasks[i].timing = schedule.tasks[i].timing._replace(offline_s=off)
            return schedule
        lost = found


def _simulate(
    system: SystemModel, tasks: Sequence[SplitTask], lost: dict[int, float], timeline: bool
) -> RoundSchedule:
    runs: list[_Run] = []
    intervals: list[Interval] = []
    jobs: list[tuple[float, int, int, int]] = []  # (ready at the server, task, seq, j)
    seq = 0

    def start_iteration(i: int, at: float) -> None:
        """Device forwards and uploads of task ``i``'s next iteration, from ``at``."""
        nonlocal seq
        run = runs[i]
        run.iteration += 1
        if run.iteration >= len(run.iterations) or at >= run.cutoff:
            run.done, run.end_s = True, at
            return
        n, m = run.iterations[run.iteration]
        k, plan, out = run.task.client_id, run.task.plan, run.out
        cf = system.compute_time_s(k, m) * plan.device_forward
        up_bytes = m * plan.up_bytes_per_example + plan.up_bytes_per_message
        up = at
        for j in range(n):
            cf_end = at + (j + 1) * cf
            up_start = max(cf_end, up)
            up = system.transfer_end_s(k, up_start, up_bytes, uplink=True)
            out.device_compute_busy_s += cf
            out.uplink_busy_s += up - up_start
            out.up_bytes += up_bytes
            if up < run.cutoff:
                heapq.heappush(jobs, (up, i, seq, j))
                seq += 1
            if timeline and run.iteration == 0:
                intervals.append(("device_compute", k, j, cf_end - cf, cf_end, "forward"))
                intervals.append(("uplink", k, j, up_start, up, "activations"))
        run.cf_last = at + n * cf
        run.dn = run.cb = at

    for i, task in enumerate(tasks):
        plan = task.plan
        k, t0 = task.client_id, task.start_s
        down = system.transfer_end_s(k, t0, plan.part_bytes, uplink=False)
        out = TaskSchedule(TaskTiming(t0, down, down, down), down_bytes=plan.part_bytes)
        out.downlink_busy_s += down - t0
        runs.append(_Run(task, list(plan.iterations()), lost.get(i, math.inf), out))
        if timeline:
            intervals.append(("downlink", k, -1, t0, down, "model"))
        start_iteration(i, down)

    server_free = -math.inf
    server_busy = 0.0
    while jobs:
        ready, i, _, j = heapq.heappop(jobs)
        run = runs[i]
        k, plan, out = run.task.client_id, run.task.plan, run.out
        n, m = run.iterations[run.iteration]
        start = max(ready, server_free)
        s = system.server_compute_time_s(m) * (plan.server_forward + plan.server_backward)
        server_free = start + s
        server_busy += s
        out.server_busy_s += s
        down_bytes = m * plan.down_bytes_per_example
        dn_start = max(server_free, run.dn)
        run.dn = system.transfer_end_s(k, dn_start, down_bytes, uplink=False)
        cb = system.compute_time_s(k, m) * plan.device_backward
        cb_start = max(run.dn, run.cb, run.cf_last)
        run.cb = cb_start + cb
        out.downlink_busy_s += run.dn - dn_start
        out.down_bytes += down_bytes
        out.device_compute_busy_s += cb
        if timeline and run.iteration == 0:
            intervals.append(("server_compute", k, j, start, server_free, "micro_batch"))
            intervals.append(("downlink", k, j, dn_start, run.dn, "gradient"))
            intervals.append(("device_compute", k, j, cb_start, run.cb, "backward"))
        if j == n - 1:
            start_iteration(i, run.cb)

    for run in runs:
        if not run.done:  # offline mid-iteration: its last micro-batches never returned
            run.done, run.end_s = True, max(run.cb, run.cf_last)
        k, plan, out = run.task.client_id, run.task.plan, run.out
        arrival = system.transfer_end_s(k, run.end_s, plan.part_bytes, uplink=True)
        out.uplink_busy_s += arrival - run.end_s
        out.up_bytes += plan.part_bytes
        t = out.timing
        out.timing = TaskTiming(t.start_s, t.download_end_s, run.end_s, arrival)
    return RoundSchedule([r.out for r in runs], server_busy, intervals)
