"""Which torch thread count to use by default: idle and with one other busy process.

For each workload (the quickstart demo, W1 with the MLP, W1 with the CNN), each machine
state (``idle``; ``busy``: one other process spinning on a core, as on a shared machine)
and each thread setting, runs ``roost run`` as a fresh process and measures its wall time
from process start to the final accuracy line. The W1 compute floor
(``benchmarks/w1_floor.py``, torch's default threads) is timed in the same states, so
every figure is also printed as a ratio to the floor. Settings, machine states and
repetitions are interleaved; figures are medians.

Settings (``--settings``): ``THREADS/POLICY``, where THREADS is Roost's ``threads=``
(``none``: Roost's default) and POLICY the OpenMP wait policy of torch's thread pool
(``OMP_WAIT_POLICY``: ``active`` threads spin between parallel regions, ``passive`` ones
sleep; ``default`` leaves the environment as it is). Spinning threads are what makes a
second busy process so costly: each parallel region waits for a thread that shares its
core with the other process.

    python benchmarks/threads.py --reps 3
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from w1 import _measure, floor_once

WORKLOADS = {
    "quickstart": ["quickstart"],
    "w1-mlp": ["w1", "model=mlp"],
    "w1-cnn": ["w1", "model=cnn"],
}
FLOOR = {"w1-mlp": "mlp", "w1-cnn": "cnn"}


@contextlib.contextmanager
def machine(state: str) -> Iterator[None]:
    """``busy``: one other process spinning on a core for the duration."""
    if state == "idle":
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def roost_wall(workload: str, setting: str) -> float:
    threads, _, policy = setting.partition("/")
    env = {} if policy in ("", "default") else {"OMP_WAIT_POLICY": policy.upper()}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "roost", "run", *WORKLOADS[workload], f"threads={threads}"]
        out = ["--out", str(Path(tmp) / "run"), "--quiet"]
        wall, _, _ = _measure([*cmd, *out], "final accuracy", env)
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description="torch threads: idle vs one busy process")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workloads", default="quickstart,w1-mlp,w1-cnn")
    p.add_argument(
        "--settings",
        default="none/active,1/active,none/passive",
        help="THREADS/POLICY settings to compare (see the module docstring)",
    )
    p.add_argument("--states", default="idle,busy")
    args = p.parse_args()
    workloads = args.workloads.split(",")
    settings = args.settings.split(",")
    states = args.states.split(",")
    walls: dict[tuple[str, str, str], list[float]] = {}
    floors: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.reps):
        for workload, state in itertools.product(workloads, states):
            order = settings if rep % 2 == 0 else settings[::-1]
            with machine(state):
                if workload in FLOOR:
                    floors.setdefault((workload, state), []).append(
                        floor_once(FLOOR[workload])["wall_s"]
                    )
                for threads in order:
                    wall = roost_wall(workload, threads)
                    walls.setdefault((workload, state, threads), []).append(wall)
                    print(f"rep {rep} {workload} {state} {threads}: {wall:.2f}s", flush=True)
    print(
        f"\n{'workload':11s} {'machine':7s} {'floor':>7s} "
        + " ".join(f"{t:>14s}" for t in settings)
    )
    results = []
    for workload, state in itertools.product(workloads, states):
        floor = statistics.median(floors[(workload, state)]) if workload in FLOOR else None
        row = {"workload": workload, "machine": state, "floor_wall_s": floor}
        cells = []
        for t in settings:
            wall = statistics.median(walls[(workload, state, t)])
            row[t] = wall
            ratio = f" ({wall / floor:4.2f}x)" if floor else ""
            cells.append(f"{wall:7.2f}s{ratio}" if floor else f"{wall:13.2f}s")
        results.append(row)
        shown = f"{floor:6.2f}s" if floor else f"{'-':>7s}"
        print(f"{workload:11s} {state:7s} {shown} " + " ".join(f"{c:>14s}" for c in cells))
    print(
        json.dumps(
            {"benchmark": "threads", "reps": args.reps, "cpus": os.cpu_count(), "results": results}
        )
    )


if __name__ == "__main__":
    main()
