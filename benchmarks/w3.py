"""W3 benchmark: Roost's asynchronous FedBuff against the W3 floor, in one invocation.

For each model (mlp, cnn) and each repetition, runs as fresh processes, interleaved, the
order rotated from one repetition to the next so that every variant sees the same
machine state on average:

* ``floor``: ``benchmarks/w3_floor.py --model M`` (plain PyTorch, WORKLOADS.md alone);
* ``local``: ``roost run w3 model=M --quiet --out TMP``, as a user runs it (a run
  directory: every step's metrics line, and checkpoints as ``checkpoint_every_s``
  (default 10 s) asks: after the first step and the last);
* ``local-nodir``: the same run through the Python API without a run directory
  (``benchmarks/w3_api.py``: ``roost.runner.run(resolve(...))`` with no ``out``);
* ``workers``: ``roost run w3 model=M runtime=workers workers=2 --quiet --out TMP``;
* ``workers-nodir``: the API run on two workers, without a run directory;
* ``floor-gc``: the floor started as ``roost run`` starts (``roost.cli.imports_without_gc``:
  torch imported with the garbage collector off, then ``gc.freeze()``). Not a Roost
  variant: it says how much of a Roost ratio below the floor's is that start-up policy,
  which the floor as written does not have (each variant's ``wall_ratio_floor_gc``).

Measured per process, as in ``benchmarks/w1.py``:

* wall: from just before the process is started to the moment it prints its final line
  (imports, data generation and evaluation included);
* peak RSS: the child's ``ru_maxrss`` from ``wait4``; with worker processes the sum over
  the server and its workers (``summary.json``'s ``peak_rss_mb_total``);
* CPU: the child's user + system seconds from ``wait4`` (with the worker processes it
  waited for): less sensitive than wall time to a shared machine's other load, so a
  second view of the same ratios (the targets are on wall time).

Prints a table and one JSON line with the medians and the ratios to the floor, and which
targets are met (it asserts nothing). Targets (the issue): ``mlp``'s final loss equal to
the floor's to 1e-5; wall <= 1.10x the floor on both models on ``local``, < 1.0x on
``workers``; peak RSS <= the floor's.

    python benchmarks/w3.py --reps 3
    python benchmarks/w3.py --reps 1 --models cnn --variants local,workers
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from precompile import compile_roost

HERE = Path(__file__).resolve().parent

TARGET_LOSS = {"mlp": 1e-5}  # the cnn's max-pooling turns last-bit differences into others
TARGET_WALL = {"local": 1.10, "local-nodir": 1.10, "workers": 1.0, "workers-nodir": 1.0}
TARGET_RSS = 1.0
WORKERS = ("runtime=workers", "workers=2")
VARIANTS = ("local", "local-nodir", "workers", "workers-nodir", "floor-gc")
FLOOR_GC = (
    "import gc, runpy, sys; gc.disable(); import numpy, torch; gc.freeze(); gc.enable(); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)
"""The floor under ``roost run``'s start-up policy (``roost.cli.imports_without_gc``)."""


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children of every thread, recursively)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def _hwm_mb(pid: int) -> tuple[float, str] | None:
    """A process's peak RSS so far (VmHWM, MiB) and its command line, or None if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, StopIteration, ValueError):
        return None
    return hwm / 1024, cmd


def _measure(cmd: list[str], marker: str) -> tuple[float, float, str, dict[str, float]]:
    """Run ``cmd``; return (seconds until its last stdout line containing ``marker``, its
    peak RSS MiB from ``wait4``, that line, and the peak RSS of each process it started,
    read from ``/proc/PID/status``'s VmHWM every 20 ms while they live).

    ``wait4`` reports one process (and at most the largest of its children), so worker
    processes are added from the polled high-water marks; multiprocessing's resource
    tracker (a bare interpreter) is reported apart, as ``summary.json`` leaves it out."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    peaks: dict[int, tuple[float, str]] = {}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for kid in _descendants(proc.pid):
                seen = _hwm_mb(kid)
                if seen is not None:
                    peaks[kid] = seen
            done.wait(0.02)

    errs: list[str] = []
    drain = threading.Thread(target=lambda: errs.append(proc.stderr.read()), daemon=True)
    watcher = threading.Thread(target=poll, daemon=True)
    drain.start()
    watcher.start()
    wall, line = float("nan"), ""
    for out_line in proc.stdout:
        if marker in out_line:
            wall, line = time.perf_counter() - t0, out_line.strip()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    watcher.join()
    drain.join()
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0 or not line:
        err = "".join(errs)
        raise RuntimeError(f"{' '.join(cmd)} failed ({returncode}):\n{err[-2000:]}")
    kids = {"workers": 0.0, "tracker": 0.0, "count": 0.0}
    for mb, kid_cmd in peaks.values():
        if "resource_tracker" in kid_cmd:
            kids["tracker"] += mb
        else:
            kids["workers"] += mb
            kids["count"] += 1
    kids["cpu_s"] = usage.ru_utime + usage.ru_stime  # with the workers it waited for
    return wall, usage.ru_maxrss / 1024, line, kids


def floor_once(model: str) -> dict[str, float]:
    wall, rss, line, kids = _measure(
        [sys.executable, str(HERE / "w3_floor.py"), "--model", model], "final_loss"
    )
    loss = json.loads(line)["final_loss"]
    return {"wall_s": wall, "rss_mb": rss, "cpu_s": kids["cpu_s"], "final_loss": loss}


def floor_gc_once(model: str) -> dict[str, float]:
    cmd = [sys.executable, "-c", FLOOR_GC, str(HERE / "w3_floor.py"), "--model", model]
    wall, rss, line, kids = _measure(cmd, "final_loss")
    return _result(wall, rss, kids, None, json.loads(line)["final_loss"])


def cli_once(model: str, *overrides: str) -> dict[str, float]:
    """``roost run w3 model=MODEL [overrides] --out TMP --quiet``; RSS summed over all
    processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "roost", "run", "w3", f"model={model}", *overrides]
        wall, rss, _, kids = _measure([*cmd, "--out", str(out), "--quiet"], "final accuracy")
        summary = json.loads((out / "summary.json").read_text())
    return _result(wall, rss, kids, summary.get("peak_rss_mb_total"), summary["final_loss"])


def api_once(model: str, *overrides: str) -> dict[str, float]:
    """``benchmarks/w3_api.py model=MODEL [overrides]``: no run directory."""
    cmd = [sys.executable, str(HERE / "w3_api.py"), f"model={model}", *overrides]
    wall, rss, line, kids = _measure(cmd, "final_loss")
    out = json.loads(line)
    return _result(wall, rss, kids, out.get("peak_rss_mb_total"), out["final_loss"])


def _result(
    wall: float, rss: float, kids: dict[str, float], total: float | None, loss: float
) -> dict[str, float]:
    """RSS over all processes: Roost's own sum when it reports one (``summary.json``'s
    ``peak_rss_mb_total``), else the server's ``wait4`` peak plus its workers' polled
    peaks. (On 2026-12-02 Roost writes no ``peak_rss_mb_total`` for asynchronous runs:
    the asynchronous policy drops the runtime's batch metrics, ``worker_peak_rss_mb``
    among them.)"""
    polled = rss + kids["workers"]
    return {
        "wall_s": wall,
        "rss_mb": total if total is not None else polled,
        "rss_server_mb": rss,
        "rss_workers_mb": kids["workers"],
        "workers_seen": kids["count"],
        "rss_tracker_mb": kids["tracker"],
        "rss_source": "summary" if total is not None else "wait4+proc",
        "cpu_s": kids["cpu_s"],
        "final_loss": loss,
    }


RUNNERS: dict[str, Callable[[str], dict[str, float]]] = {
    "floor": floor_once,
    "local": lambda m: cli_once(m),
    "local-nodir": lambda m: api_once(m),
    "workers": lambda m: cli_once(m, *WORKERS),
    "workers-nodir": lambda m: api_once(m, *WORKERS),
    "floor-gc": floor_gc_once,
}


def compare(model: str, reps: int, variants: list[str]) -> dict[str, dict[str, float]]:
    """The floor and every variant, interleaved ``reps`` times (the order rotated each
    repetition); medians, and ratios to the floor's medians."""
    names = ["floor", *variants]
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for rep in range(reps):
        k = rep % len(names)
        order = names[k:] + names[:k]
        if rep % 2:
            order.reverse()
        for name in order:
            runs[name].append(RUNNERS[name](model))
            r = runs[name][-1]
            split = (
                f" (server {r['rss_server_mb']:.0f} + workers {r['rss_workers_mb']:.0f})"
                if r.get("workers_seen")
                else ""
            )
            print(
                f"  [{model} rep {rep + 1}] {name:13s} {r['wall_s']:7.2f}s "
                f"{r['rss_mb']:6.0f}MB{split} loss {r['final_loss']:.9f}",
                file=sys.stderr,
                flush=True,
            )
    fw = statistics.median(r["wall_s"] for r in runs["floor"])
    fm = statistics.median(r["rss_mb"] for r in runs["floor"])
    fl = runs["floor"][0]["final_loss"]
    fc = statistics.median(r["cpu_s"] for r in runs["floor"])
    out: dict[str, dict[str, float]] = {
        "floor": {
            "wall_s": fw,
            "rss_mb": fm,
            "cpu_s": fc,
            "final_loss": fl,
            "walls_s": [r["wall_s"] for r in runs["floor"]],
            "reps": len(runs["floor"]),
        }
    }
    floor_gc = (
        statistics.median(r["wall_s"] for r in runs["floor-gc"]) if "floor-gc" in runs else None
    )
    for name in variants:
        w = statistics.median(r["wall_s"] for r in runs[name])
        m = statistics.median(r["rss_mb"] for r in runs[name])
        diffs = [abs(r["final_loss"] - fl) for r in runs[name]]
        res: dict[str, float] = {
            "wall_s": w,
            "rss_mb": m,
            "wall_ratio": w / fw,
            "rss_ratio": m / fm,
            "cpu_s": statistics.median(r["cpu_s"] for r in runs[name]),
            "cpu_ratio": statistics.median(r["cpu_s"] for r in runs[name]) / fc,
            "rss_server_mb": statistics.median(r["rss_server_mb"] for r in runs[name]),
            "rss_workers_mb": statistics.median(r["rss_workers_mb"] for r in runs[name]),
            "rss_source": runs[name][0]["rss_source"],
            "final_loss": runs[name][0]["final_loss"],
            "walls_s": [r["wall_s"] for r in runs[name]],
            "loss_abs_diff": max(diffs),
            "reps": len(runs[name]),
            "wall_target": TARGET_WALL.get(name),
            "wall_met": None
            if name not in TARGET_WALL
            else w / fw <= TARGET_WALL[name]
            if name.startswith("local")
            else w / fw < TARGET_WALL[name],
            "rss_met": m / fm <= TARGET_RSS if name in TARGET_WALL else None,
        }
        if floor_gc is not None:
            res["wall_ratio_floor_gc"] = w / floor_gc
        if model in TARGET_LOSS:
            res["loss_target"] = TARGET_LOSS[model]
            res["loss_met"] = max(diffs) <= TARGET_LOSS[model]
        out[name] = res
    return out


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "NOT met")


def main() -> None:
    p = argparse.ArgumentParser(description="W3: Roost's FedBuff vs the W3 floor")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--variants", default=",".join(VARIANTS), help=", ".join(VARIANTS))
    args = p.parse_args()
    print(compile_roost(), flush=True)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for model in args.models.split(","):
        results[model] = compare(model, args.reps, variants)
    print(
        f"{'model':5s} {'variant':13s} {'floor wall':>10s} {'wall':>8s} {'ratio':>6s} "
        f"{'floor RSS':>9s} {'RSS':>7s} {'ratio':>6s} {'CPU ratio':>9s} {'loss |diff|':>11s}  "
        "targets (wall, RSS, loss)"
    )
    for model, res in results.items():
        f = res["floor"]
        for name in variants:
            r = res[name]
            print(
                f"{model:5s} {name:13s} {f['wall_s']:9.2f}s {r['wall_s']:7.2f}s "
                f"{r['wall_ratio']:6.3f} {f['rss_mb']:7.0f}MB {r['rss_mb']:5.0f}MB "
                f"{r['rss_ratio']:6.3f} {r['cpu_ratio']:9.3f} {r['loss_abs_diff']:11.2e}  "
                f"{_mark(r['wall_met'])}, {_mark(r['rss_met'])}, {_mark(r.get('loss_met'))}"
            )
    print(
        json.dumps(
            {"benchmark": "w3", "reps": args.reps, "cpus": os.cpu_count(), "results": results}
        )
    )


if __name__ == "__main__":
    main()
