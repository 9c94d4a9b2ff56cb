"""W1 benchmark: Roost's local runtime against the compute floor, in one invocation.

For each model (mlp, cnn) and each repetition, runs the floor (``benchmarks/w1_floor.py``)
and ``roost run w1`` as fresh processes, interleaved and alternating which goes first, so
both see the same machine state. Measured per process:

* wall: from just before the process is started to the moment it prints its final
  accuracy line (imports, data generation and evaluation included);
* peak RSS: the child's ``ru_maxrss`` from ``wait4``.

Prints a table and one JSON line with the median ratios Roost/floor. Targets (issue #2):
wall <= 1.10x for cnn and <= 1.15x for mlp; peak RSS <= 1.2x.

    python benchmarks/w1.py --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from precompile import compile_roost

HERE = Path(__file__).resolve().parent
TARGET_WALL = {"cnn": 1.10, "mlp": 1.15}
TARGET_RSS = 1.2


def _measure(
    cmd: list[str], marker: str, extra_env: dict[str, str] | None = None
) -> tuple[float, float, str]:
    """Run ``cmd`` (with ``extra_env`` added to the environment); return (seconds until a
    stdout line containing marker, peak RSS MiB, that line)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    wall, line = float("nan"), ""
    for out_line in proc.stdout:
        if marker in out_line:
            wall, line = time.perf_counter() - t0, out_line.strip()
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024, line


def floor_once(model: str) -> dict[str, float]:
    wall, rss, line = _measure(
        [sys.executable, str(HERE / "w1_floor.py"), "--model", model], "final_loss"
    )
    return {"wall_s": wall, "rss_mb": rss, "final_loss": json.loads(line)["final_loss"]}


def roost_once(model: str, *overrides: str) -> dict[str, float]:
    """``roost run w1 model=MODEL [overrides]``; RSS is summed over all processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "roost", "run", "w1", f"model={model}", *overrides]
        wall, rss, _ = _measure([*cmd, "--out", str(out), "--quiet"], "final accuracy")
        summary = json.loads((out / "summary.json").read_text())
    rss = summary.get("peak_rss_mb_total", rss)
    return {"wall_s": wall, "rss_mb": rss, "final_loss": summary["final_loss"]}


def compare(model: str, reps: int, *overrides: str) -> dict[str, float]:
    """Floor and Roost interleaved ``reps`` times (alternating which goes first); medians."""
    floor, roost = [], []
    for rep in range(reps):
        runs = [
            ("floor", lambda: floor_once(model)),
            ("roost", lambda: roost_once(model, *overrides)),
        ]
        for name, fn in runs if rep % 2 == 0 else runs[::-1]:
            (floor if name == "floor" else roost).append(fn())
    fw = statistics.median(r["wall_s"] for r in floor)
    rw = statistics.median(r["wall_s"] for r in roost)
    fm = statistics.median(r["rss_mb"] for r in floor)
    rm = statistics.median(r["rss_mb"] for r in roost)
    return {
        "floor_wall_s": fw,
        "roost_wall_s": rw,
        "wall_ratio": rw / fw,
        "floor_rss_mb": fm,
        "roost_rss_mb": rm,
        "rss_ratio": rm / fm,
        "loss_abs_diff": abs(floor[0]["final_loss"] - roost[0]["final_loss"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description="W1: Roost local runtime vs the compute floor")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--models", default="mlp,cnn")
    args = p.parse_args()
    print(compile_roost(), flush=True)
    results: dict[str, dict[str, float]] = {}
    print(
        f"{'model':5s} {'floor wall':>10s} {'roost wall':>10s} {'ratio':>6s} "
        f"{'floor RSS':>10s} {'roost RSS':>10s} {'ratio':>6s}  loss |diff|"
    )
    for model in args.models.split(","):
        r = compare(model, args.reps)
        r.update(wall_target=TARGET_WALL[model], rss_target=TARGET_RSS)
        results[model] = r
        print(
            f"{model:5s} {r['floor_wall_s']:9.2f}s {r['roost_wall_s']:9.2f}s "
            f"{r['wall_ratio']:6.3f} {r['floor_rss_mb']:8.0f}MB {r['roost_rss_mb']:8.0f}MB "
            f"{r['rss_ratio']:6.3f}  {r['loss_abs_diff']:.2e}",
            flush=True,
        )
    print(
        json.dumps(
            {"benchmark": "w1", "reps": args.reps, "cpus": os.cpu_count(), "results": results}
        )
    )


if __name__ == "__main__":
    main()
