"""W2 benchmark: stateful clients at scale, and W1 on the workers runtime.

Part 1 (W2, shared/bench/WORKLOADS.md): SCAFFOLD (a model-size control variate per client)
on W1's data with the CNN, 10 rounds, 2 worker processes, client state in the on-disk
store (the ``w2`` preset). Run with 1,000 clients, then 10,000 and 100,000 clients holding
the same total examples (W1's 1,000-client total, rescaled: ``data.total_examples``).
Reported: peak RSS summed over all processes (the server's and each worker's
``ru_maxrss``, from summary.json), against the model size. Targets (issue #3): <= 1.5 GB
on 2 workers at 1,000 clients, and within 10% of that at 10,000 and 100,000.

Part 2: W1 (FedAvg, 1000 clients, 100 per round, 5 rounds) on ``runtime=workers
workers=2`` against the compute floor (``benchmarks/w1_floor.py``), interleaved, wall
from process start to the final accuracy line and peak RSS (summed over processes for
Roost), for each ``--w1-topologies`` value (``star``, the CPU default; ``relay``, the
GPU default, here over gloo: its cost on the CPU is one more hop for the model and sums).

    python benchmarks/w2.py --reps 3
    python benchmarks/w2.py --reps 3 --clients '' --w1-topologies star,relay
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from w1 import _measure, compare  # noqa: E402

MODEL_MB = 1_663_370 * 4 / 2**20  # the CNN's float32 parameters


def w2_once(clients: int, total_examples: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        wall, _, _ = _measure(
            [
                sys.executable,
                "-m",
                "roost",
                "run",
                "w2",
                f"clients={clients}",
                f"data.total_examples={total_examples}",
                "--out",
                str(out),
                "--quiet",
            ],
            "final accuracy",
        )
        summary = json.loads((out / "summary.json").read_text())
    return {
        "clients": clients,
        "wall_s": wall,
        "rss_total_mb": summary["peak_rss_mb_total"],
        "rss_server_mb": summary["peak_rss_mb"],
        "rss_workers_mb": summary["peak_rss_mb_workers"],
        "final_accuracy": summary["final_accuracy"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description="W2 memory at scale; W1 on 2 workers vs floor")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the W1 comparison")
    p.add_argument("--clients", default="1000,10000,100000", help="W2 sizes ('' to skip)")
    p.add_argument("--w1-models", default="mlp,cnn")
    p.add_argument(
        "--w1-topologies", default="star", help="runtime.topology values for W1, e.g. star,relay"
    )
    args = p.parse_args()

    from roost.data.synthetic_w1 import W1Dataset

    total = int(W1Dataset(1000, 0).sizes.sum())
    w2 = []
    for clients in [int(c) for c in args.clients.split(",") if c]:
        r = w2_once(clients, total)
        w2.append(r)
        print(
            f"W2 clients={clients:>6d}  peak RSS (all processes) {r['rss_total_mb']:7.0f} MB"
            f"  = {r['rss_total_mb'] / MODEL_MB:5.0f} x model ({MODEL_MB:.1f} MB)"
            f"  server {r['rss_server_mb']:.0f} + workers "
            + " + ".join(f"{w:.0f}" for w in r["rss_workers_mb"])
            + f"  wall {r['wall_s']:.1f}s",
            flush=True,
        )
    for r in w2:
        r["vs_first"] = r["rss_total_mb"] / w2[0]["rss_total_mb"]

    w1 = {}
    for model, topology in itertools.product(
        args.w1_models.split(","), args.w1_topologies.split(",")
    ):
        workers = ("runtime=workers", "workers=2", f"runtime.topology={topology}")
        r = w1[f"{model}/{topology}"] = compare(model, args.reps, *workers)
        print(
            f"W1 {model} workers=2 {topology}: wall {r['roost_wall_s']:.2f}s vs floor "
            f"{r['floor_wall_s']:.2f}s = {r['wall_ratio']:.3f}x; RSS (all processes) "
            f"{r['roost_rss_mb']:.0f} MB vs {r['floor_rss_mb']:.0f} MB = {r['rss_ratio']:.2f}x",
            flush=True,
        )
    print(json.dumps({"benchmark": "w2", "model_mb": MODEL_MB, "w2": w2, "w1_workers": w1}))


if __name__ == "__main__":
    main()
