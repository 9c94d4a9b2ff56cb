"""Scheduling benchmark: workload-aware placement against round-robin on real workers.

Clients with lognormal sizes (sigma 1.0: a few clients hold many times the median's
examples) are trained on the ``workers`` runtime with two worker processes, one of them
slowed to half speed (``runtime.slowdown=1,2``: it sleeps as long again as it computed).
For each round the runtime records each worker's busy seconds and assigned work (examples
x epochs); from these:

* makespan = the slowest worker's busy time;
* each worker's speed = its work / its busy time, measured in that round;
* ideal = total work / total speed (a perfect split of this round's work).

Printed: makespan / ideal per round and the mean after the warm-up rounds, for the
scheduler (``placement=lpt``: longest predicted task first, to the worker that would
finish it earliest, with speeds learned online) and for round-robin. Target (issue #3):
within 15% of ideal after warm-up.

    python benchmarks/schedule.py --rounds 8 --warmup 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def ratios(records: list[dict]) -> list[float]:
    out = []
    for rec in records:
        busy, units = rec["worker_busy_s"], rec["worker_units"]
        speeds = [u / b for u, b in zip(units, busy, strict=True) if b > 0]
        ideal = sum(units) / sum(speeds)
        out.append(max(busy) / ideal)
    return out


def run_placement(placement: str, args: argparse.Namespace) -> list[float]:
    from roost.config import apply_overrides, load_config_source, resolve
    from roost.runner import run

    overrides = [
        "model=cnn",
        "data.size_sigma=1.0",
        f"clients={args.clients}",
        f"clients_per_round={args.clients_per_round}",
        f"rounds={args.rounds}",
        "runtime=workers",
        "workers=2",
        "runtime.threads=1",
        "runtime.slowdown=1,2",
        f"runtime.placement={placement}",
    ]
    cfg = resolve(apply_overrides(load_config_source("w1"), overrides))
    with tempfile.TemporaryDirectory() as tmp:
        history = run(cfg, Path(tmp) / placement)
    return ratios(history.records)


def main() -> None:
    p = argparse.ArgumentParser(description="LPT placement vs round-robin on real workers")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--clients-per-round", type=int, default=40)
    args = p.parse_args()
    results = {}
    for placement in ("lpt", "round_robin"):
        r = run_placement(placement, args)
        ratios_after = r[args.warmup :]
        results[placement] = {
            "per_round": [round(x, 3) for x in r],
            "mean_after_warmup": statistics.mean(ratios_after),
            "max_after_warmup": max(ratios_after),
        }
        print(
            f"{placement:12s} makespan/ideal per round: "
            + " ".join(f"{x:.3f}" for x in r)
            + f"   mean after warm-up {statistics.mean(ratios_after):.3f}",
            flush=True,
        )
    print(
        json.dumps(
            {"benchmark": "schedule", "target": 1.15, "warmup": args.warmup, "results": results}
        )
    )


if __name__ == "__main__":
    main()
