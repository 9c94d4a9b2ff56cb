"""Split learning: Roost's SplitFed v1 and PiPar against a compute floor in plain PyTorch.

The workload is W1's synthetic 28x28x1 clients (``data=w1``: lognormal sizes,
Dirichlet(0.5) labels, generated per client on every task) on the reference VGG5
(``model=vgg5``, 458,890 parameters with BatchNorm), cut after its ``--cut``-th top-level
layer, ``clients_per_round`` clients a round, one local epoch of minibatches of
``batch_size`` in stored order (``shuffle=false``), float32 messages at the cut, evaluated
once after the last round (``eval_every=0``; Roost always evaluates the last round):

* ``splitfed``: one micro-batch per minibatch, SGD without momentum, both halves averaged
  by examples every round;
* ``pipar``: ``--pipar-micro-batches`` (N) micro-batches per minibatch (``⌊B/N⌋`` each, the
  rest dropped), SGD with momentum 0.9 kept per client across rounds, equal-weight
  averaging every round. ``algorithm.cut`` and ``algorithm.micro_batches`` are both set,
  so PiPar's automated selection (APS) chooses nothing and the floor can mirror the run.

Roost runs through its Python API in this process (``resolve(apply_overrides(PRESETS["w1"](),
...))`` and ``roost.runner.run`` without a run directory). The floor (:func:`run_floor`) is
one loop with no framework: it builds the same ``nn.Sequential`` (under
``torch.manual_seed(seed)``, as Roost does), slices it into the device part
``children[:cut]`` and the server part ``children[cut:]``, and per task: loads the global
weights (parameters and BatchNorm's running statistics), and per minibatch forwards every
micro-batch on the device, feeds each activation, detached into a float32 leaf, to the
server part (loss CE / N, backward), back-propagates the returned gradients through the
device part in order, and takes one SGD step (``b ← ρ b + g``, ``w ← w − η b``, PyTorch's
rule as Roost's ``SGDStepper`` writes it) on each part; after the cohort, both halves are
averaged. Clients are drawn as Roost draws them (``default_rng([seed, 4, r]).choice``),
the data is W1's generator (``roost/data/synthetic_w1.py``), re-generated per task as
Roost does.

The floor sums the cohort's models in float64 (``Σ w_k float64(x_k)`` then ``/ Σ w_k`` and
back to float32), as Roost's ``Contribution`` does: that is Roost's arithmetic, not
framework overhead (its cost here is about a millisecond per client), and it lets
the check require the two final models to be equal **bit for bit**. The check (before
timing unless ``--no-check``; it also warms both up) runs Roost once with a run directory,
reads the final global model from its checkpoint and compares it with the floor's.

Both sides train on one torch thread (``threads=1``, the run key Roost applies for the
run and restores after; the floor sets ``torch.set_num_threads(1)`` the same way), on a
shared 2-core machine. Both are timed warm, in this process: the check (or, with
``--no-check``, one tiny run of each) has paid the imports and the first backward's lazy
import of sympy first. Repetitions are interleaved (Roost, floor, floor, Roost, ...,
alternating which goes first), ``gc.collect()`` before each. Wall time runs from before
``resolve`` (Roost) or the data generation (floor) to the end of the final evaluation;
CPU time is the process's over the same span. Printed: the medians and their ratio (the
target's figure: Roost's wall <= 1.15x the floor's, issue 10), the median of the
per-repetition ratios (``pairs``: each pair runs seconds apart) and the ratio of the
median CPU seconds, which another process taking a core moves less than wall time.

    python benchmarks/split.py --reps 3
    python benchmarks/split.py --reps 1 --rounds 1 --clients-per-round 2   # about 15 s
    python benchmarks/split.py --reps 0 --profile pipar                    # where the time goes
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TARGET_WALL = 1.15
ALGORITHMS = ("splitfed", "pipar")


@dataclass(frozen=True)
class Setting:
    """The workload, shared by Roost's overrides and the floor."""

    rounds: int = 8
    clients: int = 50
    clients_per_round: int = 10
    batch_size: int = 32
    lr: float = 0.05
    cut: int = 2
    pipar_micro_batches: int = 4
    seed: int = 0


@dataclass(frozen=True)
class FloorRule:
    """What a task does, per algorithm: N micro-batches, SGD's momentum and weight decay,
    whether momentum is kept per client across rounds, and example-weighted averaging."""

    micro_batches: int
    momentum: float
    weight_decay: float
    keep_momentum: bool
    weighted: bool


def floor_rule(algorithm: str, s: Setting) -> FloorRule:
    if algorithm == "splitfed":
        return FloorRule(1, 0.0, 0.0, keep_momentum=False, weighted=True)
    return FloorRule(s.pipar_micro_batches, 0.9, 0.0, keep_momentum=True, weighted=False)


def roost_overrides(algorithm: str, s: Setting) -> list[str]:
    """``roost run w1 OVERRIDES`` of the benchmark's run."""
    rule = floor_rule(algorithm, s)
    return [
        "model=vgg5",
        f"algorithm={algorithm}",
        f"algorithm.batch_size={s.batch_size}",
        f"algorithm.lr={s.lr}",
        "algorithm.local_epochs=1",
        "algorithm.shuffle=false",
        f"algorithm.cut={s.cut}",
        f"algorithm.micro_batches={rule.micro_batches}",
        f"algorithm.momentum={rule.momentum}",
        f"algorithm.weight_decay={rule.weight_decay}",
        f"algorithm.weighted={str(rule.weighted).lower()}",
        "algorithm.wire_dtype=float32",
        f"rounds={s.rounds}",
        f"clients={s.clients}",
        f"clients_per_round={s.clients_per_round}",
        f"seed={s.seed}",
        "eval_every=0",
        "threads=1",
        "system=homogeneous",
    ]


def run_roost(algorithm: str, s: Setting, out: str | None = None) -> dict[str, Any]:
    """One Roost run through the Python API; wall from before ``resolve`` to its return."""
    from roost.config import PRESETS, apply_overrides, resolve
    from roost.runner import run

    t0, c0 = time.perf_counter(), time.process_time()
    cfg = resolve(apply_overrides(PRESETS["w1"](), roost_overrides(algorithm, s)))
    history = run(cfg, out)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    final = history.final
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "final_loss": final["loss"],
        "final_accuracy": final["accuracy"],
    }


# --- the floor: plain PyTorch, one loop --------------------------------------------------


def _w1_sizes(seed: int, clients: int) -> np.ndarray:
    raw = np.random.default_rng([seed, 0]).lognormal(mean=math.log(50), sigma=0.5, size=clients)
    return np.clip(raw, 10, 200).astype(np.int64)


def _w1_images(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(x.astype(np.float32).reshape(len(y), 1, 28, 28))
    return images, torch.from_numpy(y.astype(np.int64))


def _w1_client(seed: int, i: int, n: int, proto: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng([seed, 2, i])
    mix = rng.dirichlet(0.5 * np.ones(10))
    y = rng.choice(10, size=n, p=mix)
    return _w1_images(proto[y] + rng.standard_normal((n, 28, 28)), y)


def vgg5_plain(num_classes: int = 10) -> nn.Sequential:
    """VGG5 on 1x28x28, layer for layer as roost/models/vgg.py builds it (so the same
    draws of torch's global generator give the same initial weights)."""

    def conv(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())

    return nn.Sequential(
        conv(1, 32),
        nn.MaxPool2d(2, 2, ceil_mode=True),
        conv(32, 64),
        nn.MaxPool2d(2, 2, ceil_mode=True),
        conv(64, 64),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.Linear(128, num_classes),
    )


def run_floor(algorithm: str, s: Setting) -> dict[str, Any]:
    """The floor of the module docstring. Returns wall seconds, the final loss and
    accuracy, and the final global model as one flat vector (parameters, then the float
    buffers, in ``named_parameters`` / ``named_buffers`` order: Roost's layout)."""
    rule = floor_rule(algorithm, s)
    t0, c0 = time.perf_counter(), time.process_time()
    sizes = _w1_sizes(s.seed, s.clients)
    proto = np.random.default_rng([s.seed, 1]).standard_normal((10, 28, 28)).astype(np.float32)
    torch.manual_seed(s.seed)
    net = vgg5_plain()
    children = list(net.children())
    device, server = nn.Sequential(*children[: s.cut]), nn.Sequential(*children[s.cut :])
    params = [p for part in (device, server) for p in part.parameters()]
    # what is loaded and averaged: the parameters, then BatchNorm's running statistics
    carried = [*net.parameters(), *(b for b in net.buffers() if b.is_floating_point())]
    global_w = [t.detach().clone() for t in carried]
    momenta: dict[int, list[torch.Tensor]] = {}
    net.train()
    for r in range(1, s.rounds + 1):
        cohort = np.random.default_rng([s.seed, 4, r]).choice(
            s.clients, size=s.clients_per_round, replace=False
        )
        sums: list[torch.Tensor] = []
        total = 0.0
        for i in (int(c) for c in cohort):
            n = int(sizes[i])
            x, y = _w1_client(s.seed, i, n, proto)
            with torch.no_grad():
                for t, g in zip(carried, global_w, strict=True):
                    t.copy_(g)
            bufs = momenta.get(i) if rule.keep_momentum else None
            for start in range(0, n, s.batch_size):
                xb, yb = x[start : start + s.batch_size], y[start : start + s.batch_size]
                k = min(rule.micro_batches, len(xb))
                m = len(xb) // k
                acts = [device(xb[j * m : (j + 1) * m]) for j in range(k)]
                returned = []
                for j, a in enumerate(acts):
                    leaf = a.detach().requires_grad_(True)
                    (F.cross_entropy(server(leaf), yb[j * m : (j + 1) * m]) / k).backward()
                    returned.append(leaf.grad)
                for a, g in zip(acts, returned, strict=True):
                    a.backward(g)
                with torch.no_grad():
                    grads = [p.grad for p in params]
                    if rule.weight_decay:
                        for p, gr in zip(params, grads, strict=True):
                            gr.add_(p, alpha=rule.weight_decay)  # type: ignore[union-attr]
                    if rule.momentum:
                        if bufs is None:
                            bufs = [gr.clone() for gr in grads]  # type: ignore[union-attr]
                        else:
                            for b, gr in zip(bufs, grads, strict=True):
                                b.mul_(rule.momentum).add_(gr)  # type: ignore[arg-type]
                        steps: Sequence[Any] = bufs
                    else:
                        steps = grads
                    for p, st in zip(params, steps, strict=True):
                        p.add_(st, alpha=-s.lr)
                        p.grad = None
            if rule.keep_momentum and bufs is not None:
                momenta[i] = bufs
            w = float(n) if rule.weighted else 1.0
            with torch.no_grad():
                if not sums:
                    sums = [t.to(torch.float64, copy=True) for t in carried]
                    if w != 1.0:
                        for acc in sums:
                            acc.mul_(w)
                else:
                    for acc, t in zip(sums, carried, strict=True):
                        acc.add_(t.to(torch.float64), alpha=w)
            total += w
        global_w = [(acc / total).to(torch.float32) for acc in sums]
    rng = np.random.default_rng([s.seed, 3])
    y_test = rng.integers(0, 10, 2000)
    x_test, yt = _w1_images(proto[y_test] + rng.standard_normal((2000, 28, 28)), y_test)
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for t, g in zip(carried, global_w, strict=True):
            t.copy_(g)
        net.eval()
        for start in range(0, 2000, 500):
            logits = net(x_test[start : start + 500])
            loss_sum += float(F.cross_entropy(logits, yt[start : start + 500], reduction="sum"))
            correct += int((logits.argmax(1) == yt[start : start + 500]).sum())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "final_loss": loss_sum / 2000,
        "final_accuracy": correct / 2000,
        "params": torch.cat([g.reshape(-1) for g in global_w]),
    }


@contextmanager
def one_thread() -> Iterator[None]:
    """The floor on one torch thread, as ``threads=1`` runs Roost (and restores after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def floor_once(algorithm: str, s: Setting) -> dict[str, Any]:
    with one_thread():
        return run_floor(algorithm, s)


# --- the check, the comparison, the profile ----------------------------------------------


def check(algorithm: str, s: Setting) -> dict[str, Any]:
    """Roost's final global model (from a run directory's last checkpoint) against the
    floor's: equal bit for bit, and the largest absolute difference."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        roost = run_roost(algorithm, s, str(out))
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    theirs = ckpt["strategy"]["params"]
    floor = floor_once(algorithm, s)
    ours = floor["params"]
    same_shape = theirs.shape == ours.shape
    diff = float((theirs - ours).abs().max()) if same_shape else math.inf
    return {
        "bit_for_bit": bool(same_shape and torch.equal(theirs, ours)),
        "max_abs_diff": diff,
        "numel": int(ours.numel()),
        "loss_abs_diff": abs(roost["final_loss"] - floor["final_loss"]),
        "roost_final_loss": roost["final_loss"],
        "floor_final_loss": floor["final_loss"],
    }


def warm_up(algorithm: str, s: Setting) -> None:
    """One tiny run of each side, untimed: the first backward of a process imports
    sympy (``torch.fx.experimental.symbolic_shapes``, about 1 s) and Roost's first run
    imports its components; neither belongs to either side's figures."""
    tiny = replace(s, rounds=1, clients_per_round=1)
    run_roost(algorithm, tiny)
    floor_once(algorithm, tiny)


def compare(algorithm: str, s: Setting, reps: int) -> dict[str, Any]:
    """Roost and the floor interleaved ``reps`` times (alternating which goes first).

    ``wall_ratio`` is the ratio of the medians (the target's figure); ``pair_ratio`` the
    median of each repetition's Roost/floor, whose two runs are seconds apart, and
    ``cpu_ratio`` the ratio of the median process CPU seconds: both move less than the
    medians when another process takes a core for part of the run."""
    runs: dict[str, list[dict[str, Any]]] = {"roost": [], "floor": []}
    fns: dict[str, Callable[[], dict[str, Any]]] = {
        "roost": lambda: run_roost(algorithm, s),
        "floor": lambda: floor_once(algorithm, s),
    }
    for rep in range(reps):
        order = ["roost", "floor"] if rep % 2 == 0 else ["floor", "roost"]
        for name in order:
            gc.collect()
            r = fns[name]()
            r.pop("params", None)
            runs[name].append(r)
            print(
                f"  [{algorithm} rep {rep + 1}] {name:5s} {r['wall_s']:7.2f}s "
                f"(cpu {r['cpu_s']:6.2f}s) loss {r['final_loss']:.9f}",
                file=sys.stderr,
                flush=True,
            )
    roost, floor = runs["roost"], runs["floor"]
    rw = statistics.median(r["wall_s"] for r in roost)
    fw = statistics.median(r["wall_s"] for r in floor)
    rc = statistics.median(r["cpu_s"] for r in roost)
    fc = statistics.median(r["cpu_s"] for r in floor)
    return {
        "roost_wall_s": rw,
        "floor_wall_s": fw,
        "wall_ratio": rw / fw,
        "wall_target": TARGET_WALL,
        "wall_met": rw / fw <= TARGET_WALL,
        "pair_ratio": statistics.median(
            a["wall_s"] / b["wall_s"] for a, b in zip(roost, floor, strict=True)
        ),
        "roost_cpu_s": rc,
        "floor_cpu_s": fc,
        "cpu_ratio": rc / fc,
        "roost_walls_s": [r["wall_s"] for r in roost],
        "floor_walls_s": [r["wall_s"] for r in floor],
        "loss_abs_diff": max(
            abs(a["final_loss"] - b["final_loss"]) for a, b in zip(roost, floor, strict=True)
        ),
        "final_loss": roost[0]["final_loss"],
    }


def profile(algorithm: str, s: Setting, top: int) -> None:
    """cProfile of one Roost run and one floor run (cumulative and own time)."""
    for name, fn in (
        ("roost", lambda: run_roost(algorithm, s)),
        ("floor", lambda: floor_once(algorithm, s)),
    ):
        prof = cProfile.Profile()
        gc.collect()
        prof.enable()
        fn()
        prof.disable()
        for key in ("cumulative", "tottime"):
            print(f"--- {name} {algorithm}: top {top} by {key}", flush=True)
            pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats(key).print_stats(top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    defaults = Setting()
    for field, value in asdict(defaults).items():
        p.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--no-check", action="store_true", help="skip the bit-for-bit check")
    p.add_argument("--profile", metavar="ALGORITHM", help="profile one run of each side")
    p.add_argument("--profile-top", type=int, default=30)
    a = p.parse_args()
    s = Setting(**{f: getattr(a, f) for f in asdict(defaults)})
    algorithms = [x for x in a.algorithms.split(",") if x]
    for alg in algorithms:
        if alg not in ALGORITHMS:
            p.error(f"--algorithms: {alg!r} is not one of {', '.join(ALGORITHMS)}")
    print(f"setting: {json.dumps(asdict(s))}; torch {torch.__version__}, threads=1", flush=True)
    for alg in algorithms:
        print(f"{alg}, as a command: roost run w1 {' '.join(roost_overrides(alg, s))}")
    checks: dict[str, dict[str, Any]] = {}
    if a.no_check:
        for alg in algorithms:
            warm_up(alg, s)
    else:  # the check warms both sides up
        for alg in algorithms:
            checks[alg] = c = check(alg, s)
            verdict = "bit for bit" if c["bit_for_bit"] else f"max |diff| {c['max_abs_diff']:.3e}"
            print(
                f"check {alg}: final model ({c['numel']} values) equal to the floor's: "
                f"{verdict}; final loss |diff| {c['loss_abs_diff']:.2e}",
                flush=True,
            )
    if a.profile:
        profile(a.profile, s, a.profile_top)
    results: dict[str, dict[str, Any]] = {}
    if a.reps > 0:
        print(
            f"{'algorithm':9s} {'floor wall':>10s} {'roost wall':>10s} {'ratio':>6s} "
            f"{'pairs':>6s} {'floor cpu':>10s} {'roost cpu':>10s} {'ratio':>6s}  loss |diff|"
        )
        for alg in algorithms:
            r = results[alg] = compare(alg, s, a.reps)
            print(
                f"{alg:9s} {r['floor_wall_s']:9.2f}s {r['roost_wall_s']:9.2f}s "
                f"{r['wall_ratio']:6.3f} {r['pair_ratio']:6.3f} {r['floor_cpu_s']:9.2f}s "
                f"{r['roost_cpu_s']:9.2f}s {r['cpu_ratio']:6.3f}  {r['loss_abs_diff']:.2e}",
                flush=True,
            )
    print(
        json.dumps(
            {
                "benchmark": "split",
                "reps": a.reps,
                "cpus": os.cpu_count(),
                "setting": asdict(s),
                "checks": checks,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
