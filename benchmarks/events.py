"""Engine overhead per event: 100,000 clients, 1,000 tasks in flight, a no-op update.

An :class:`~roost.engine.Engine` is assembled by hand (as ``tests/unit/_async_helpers.py``
does) from parts that cost nothing themselves, so that what is timed is the event loop:

* a no-op algorithm registered here (``bench_noop``): its update returns an empty
  :class:`ClientResult` of weight 1 without touching the model or the data;
* its :class:`AsyncStrategy`: ``concurrency`` tasks in flight, a server step on every
  arrival that only bumps the version;
* a minimal runtime that calls the update and folds its result (no resident model, no
  data loading: the ``local`` runtime loads a client's examples before its update, which
  would time W1's data generation instead of the engine; ``--runtime local`` measures
  that runtime anyway, with clients that hold no examples);
* W1's synthetic dataset with N clients, generated lazily (only sizes at construction;
  the benchmark checks that no client's examples are ever generated);
* ``system=trace`` on the staged FedScale-free traces (FLASH ``flash_loose``
  availability read at 03:00 of the trace's second day, when 30% of the devices are
  online, FLASH/AI-Benchmark compute, HSDPA bandwidth); W3's lognormal devices
  (``system=w3``) when the shared data folder is missing, which the output says.

One *event* is one task ending (an arrival, or a dropout when a device goes offline)
with what follows it (the arrival delivered to the strategy, the server step and its
record, and the refill event that dispatches one idle client: selection, timing, seed,
snapshot), or one availability change the engine applies to its pool of idle clients (a
device going online or offline while it is not in flight; the issue lists "device goes
offline" among the events). The number of changes per virtual second grows with N, the
number of task ends does not (1,000 in flight), so both are reported: µs per event
(task ends and changes) and µs per task end. Each is timed over ``--events`` task ends
after ``--warmup`` (in a fresh process per measurement), at N = 10k, 30k and 100k
clients, repetitions interleaved.

The floor is the same number of heap operations in plain Python: per event two
``heapq.heappush`` and two ``heapq.heappop`` of ``(time, seq, client)`` tuples on a heap
of ``concurrency`` entries (the arrival popped, the refill pushed and popped, the next
arrival pushed), nothing else.

Target (the issue): <= 20 µs per event, flat from 10k to 100k clients (here: the median
at 100k within 10% of the one at 10k). ``--profile N`` runs one measurement under
cProfile and prints the top costs per event, then times the hot spots alone.

    python benchmarks/events.py --reps 3 --events 5000
    python benchmarks/events.py --profile 100000 --events 5000
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import json
import math
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from roost.algorithms.asynchronous import Arrival, AsyncStrategy
from roost.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    ClientResult,
    Contribution,
    Payload,
    Strategy,
    UpdateOutput,
    register_algorithm,
)
from roost.config import RunConfig
from roost.data import W1Dataset
from roost.data.base import ClientData
from roost.engine import Engine
from roost.engine.draws import StreamDraws
from roost.runtime.base import Job, Outcome, Runtime, task_seed
from roost.runtime.local import LocalRuntime
from roost.state import InMemoryStateStore
from roost.system.model import SystemModel, W3Config, W3System

HERE = Path(__file__).resolve().parent
CLIENTS = (10_000, 30_000, 100_000)
CONCURRENCY = 1000
NUM_PARAMS = 10
TARGET_US = 20.0
FLAT = 1.10
TRACE_OFFSET_S = 27 * 3600.0  # 03:00 on the trace's second day: 30% of devices online

_EMPTY = ClientResult({}, 1.0)
_METRICS = {"train_loss": 0.0}


class NoopStrategy(AsyncStrategy):
    """``concurrency`` in flight; a server step on every arrival that bumps the version."""

    arrivals_per_step = 1

    def __init__(self, concurrency: int) -> None:
        super().__init__()
        self.concurrency = concurrency

    def accept(self, arrival: Arrival, contribution: Contribution) -> bool:
        return True

    def arrivals_until_step(self) -> int:
        return 1

    def server_step(self, step: int) -> dict[str, float]:
        self.version += 1
        return {}


@register_algorithm("bench_noop")
class NoopAlgorithm(Algorithm):
    """An update that trains nothing and reads neither the model nor the data."""

    def make_strategy(self) -> Strategy:
        return NoopStrategy(CONCURRENCY)

    def update(self, ctx, model, data, payload, state):  # type: ignore[no-untyped-def]
        return UpdateOutput(_EMPTY, None, _METRICS)


class NoopRuntime(Runtime):
    """Calls each task's update and folds its result; nothing else."""

    def start(self, job: Job) -> None:
        self.job = job

    def execute(  # type: ignore[override]
        self, tasks, payloads, num_groups=1, defer_state=False, answers=None
    ) -> Outcome:
        alg = self.job.algorithm
        contributions = [Contribution() for _ in range(num_groups)]
        metrics = []
        for task in tasks:
            out = alg.update(None, None, None, payloads[task.version], None)
            contributions[task.group].fold(out.result, task.client_id)
            metrics.append((task.client_id, out.metrics))
        return Outcome(contributions, metrics)

    def evaluate(self, params: torch.Tensor, data: ClientData) -> tuple[float, float]:
        return 0.0, 0.0


class QuietLocalRuntime(LocalRuntime):
    """The ``local`` runtime (resident model, seeding, data loading per task), without
    the final evaluation of its stand-in model."""

    def evaluate(self, params: torch.Tensor, data: ClientData) -> tuple[float, float]:
        return 0.0, 0.0


class LazyW1(W1Dataset):
    """W1's clients, counting how many times a client's examples are generated."""

    def __init__(self, num_clients: int, empty: bool = False) -> None:
        super().__init__(num_clients, 0)
        self.generated = 0
        self.empty = empty  # --runtime local: every client's data is empty
        self._none = ClientData(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.int64))

    def client_data(self, client_id: int) -> ClientData:
        if self.empty:
            return self._none
        self.generated += 1
        return super().client_data(client_id)


def build_system(kind: str, clients: int, time_scale: float = 1.0) -> tuple[SystemModel, str]:
    """The trace system on the staged files (or W3's devices); and what was used.
    ``time_scale``: trace seconds per virtual second (> 1 makes windows open and close, and
    devices drop out, within the few virtual seconds a run covers)."""
    if kind in ("auto", "trace"):
        try:
            from roost.system.traces import TraceConfig, TraceSystem

            cfg = TraceConfig(
                availability="flash_loose",
                availability_offset_s=TRACE_OFFSET_S,
                availability_time_scale=time_scale,
                compute="flash",
                bandwidth="hsdpa",
                reference_seconds_per_example=0.01,
            )
            return TraceSystem(cfg, seed=0), (
                "trace (flash_loose availability from 27 h"
                + (f", {time_scale:g} trace s per virtual s" if time_scale != 1 else "")
                + ", flash compute, hsdpa bandwidth, 0.01 s/example)"
            )
        except Exception as e:  # the shared data folder or the trace system is missing
            if kind == "trace":
                raise
            note = f"w3 (fallback: system=trace unusable: {type(e).__name__}: {e})"
            return W3System(W3Config(), 0, clients), note
    return W3System(W3Config(), 0, clients), "w3 (lognormal speeds)"


def changes_applied(engine: Engine) -> int:
    """Availability changes the engine's pool of idle clients has applied so far."""
    pool = engine._pool
    return 0 if pool is None else pool.applied


class Marks:
    """Callback: the time after step ``warmup``, the dropouts after it, and the
    availability changes applied by then."""

    def __init__(self, warmup: int, engine: Engine) -> None:
        self.warmup = warmup
        self.engine = engine
        self.t0 = math.nan
        self.dropped = 0
        self.changes0 = 0

    def __call__(self, record: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        r = record["round"]
        if r == self.warmup:
            self.changes0 = changes_applied(self.engine)
            self.t0 = time.perf_counter()
        elif r > self.warmup:
            self.dropped += record["dropped"]
        return False, {}


def make_engine(
    clients: int,
    steps: int,
    system_kind: str,
    runtime_kind: str,
    batch_hint: int,
    time_scale: float = 1.0,
) -> tuple[Engine, LazyW1, str]:
    data = LazyW1(clients, empty=runtime_kind == "local")
    alg = ALGORITHMS.get("bench_noop").factory(ALGORITHMS.config("bench_noop", {}))
    strategy = alg.make_strategy()
    strategy.initialize(torch.zeros(NUM_PARAMS), clients)
    if runtime_kind == "local":
        runtime: Runtime = QuietLocalRuntime()

        def build() -> torch.nn.Module:
            return torch.nn.Linear(NUM_PARAMS - 1, 1)
    else:
        runtime = NoopRuntime()

        def build() -> torch.nn.Module:
            raise AssertionError("the no-op runtime builds no model")

    runtime.batch_hint = batch_hint
    store = InMemoryStateStore()
    runtime.start(Job(alg, data, build, store))
    system, note = build_system(system_kind, clients, time_scale)
    engine = Engine(
        run=RunConfig(
            rounds=steps, clients=clients, clients_per_round=CONCURRENCY, seed=0, eval_every=0
        ),
        algorithm=alg,
        strategy=strategy,
        runtime=runtime,
        dataset=data,
        system=system,
        num_params=NUM_PARAMS,
        state_store=store,
    )
    return engine, data, note


def heap_floor(events: int, concurrency: int, clients: int) -> float:
    """Seconds per event of 2 pushes and 2 pops on a heap of ``concurrency`` tuples."""
    rng = np.random.default_rng([0, 5])
    durations = (rng.lognormal(0.0, 1.0, size=clients) ** -1 * 0.5).tolist()
    heap = [(durations[i], i, i) for i in range(concurrency)]
    heapq.heapify(heap)
    push, pop = heapq.heappush, heapq.heappop
    seq, nxt = concurrency, concurrency
    t0 = time.perf_counter()
    for _ in range(events):
        t, _, _c = pop(heap)  # the arrival
        push(heap, (t, seq, -1))  # its refill, at the same time
        seq += 1
        pop(heap)
        nxt = (nxt + 7919) % clients
        push(heap, (t + durations[nxt], seq, nxt))  # the new task's arrival
        seq += 1
    return (time.perf_counter() - t0) / events


def measure(args: argparse.Namespace, clients: int) -> dict[str, Any]:
    """One measurement in this process."""
    engine, data, note = make_engine(
        clients,
        args.warmup + args.events,
        args.system,
        args.runtime,
        args.batch_hint,
        args.availability_time_scale,
    )
    marks = Marks(args.warmup, engine)
    engine.callbacks = [marks]
    history = engine.run()
    t1 = time.perf_counter()
    steps = len(history.records) - args.warmup
    changes = changes_applied(engine) - marks.changes0
    events = steps + marks.dropped + changes
    wall = t1 - marks.t0
    floor = heap_floor(events, CONCURRENCY, clients)
    return {
        "clients": clients,
        "system": note,
        "runtime": args.runtime,
        "batch_hint": args.batch_hint,
        "arrivals": steps,
        "dropouts": marks.dropped,
        "availability_changes": changes,
        "events": events,
        "virtual_s": engine.clock.now,
        "us_per_event": wall / events * 1e6,
        "us_per_task": wall / (steps + marks.dropped) * 1e6,
        "floor_us_per_event": floor * 1e6,
        "ratio": wall / events / floor,
        "client_data_generated": data.generated,
    }


def micro(args: argparse.Namespace, clients: int) -> None:
    """The engine's hot spots timed alone, on an engine left with 1,000 tasks in flight."""
    engine, _, _ = make_engine(clients, args.warmup, args.system, args.runtime, 1)
    engine.run()
    e = engine
    flights = e.flights
    now = e.clock.now
    payload = e.strategy.payload(e.strategy.version)
    pool = e.dispatchable(now)
    fl = next(iter(flights.flights.values()))
    work = e.algorithm.work_examples(e.dataset.num_examples(fl.client_id))
    ids = np.arange(clients)
    draws = StreamDraws(0, 6)
    rows: list[tuple[str, Any]] = [
        ("Engine.dispatchable(t) (the pool, advanced to t)", lambda: e.dispatchable(now)),
        (
            "  the O(N) list it replaces: system.available(ids, t)",
            lambda: e.system.available(ids, now),
        ),
        ("pool[k] (Fenwick descent + bit scan)", lambda: pool[len(pool) // 2]),
        ("pool.set_busy(c, True/False)", lambda: (pool.set_busy(3, True), pool.set_busy(3, False))),
        (
            "default_rng([seed, 6, j]).integers(n) (numpy)",
            lambda: np.random.default_rng([0, 6, 12345]).integers(70000),
        ),
        ("  the same from StreamDraws (batched)", lambda: draws.integers(12345, 70000)),
        ("task_seed(seed, client, dispatch)", lambda: task_seed(0, 123, 4)),
        (
            "system.timing(...)",
            lambda: e.system.timing(fl.client_id, now, work, payload.nbytes, 4 * NUM_PARAMS),
        ),
        (
            "Engine.snapshot of a new version (a Payload with a clone of 10 params)",
            lambda: Payload(payload.params.clone(), payload.version, dict(payload.extras)),
        ),
        (
            "VirtualClock.schedule + pop",
            lambda: (e.clock.schedule(now, ("x", -1), 9), e.clock.pop()),
        ),
        ("Engine.check_finite", lambda: e.check_finite(1, 0.0, {})),
    ]
    print(f"hot spots alone, N = {clients:,}, {len(flights)} in flight, {len(pool):,} idle:")
    for name, fn in rows:
        n = 2000
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        print(f"  {(time.perf_counter() - t0) / n * 1e6:8.2f} µs  {name}")


def profile(args: argparse.Namespace, clients: int, top: int) -> None:
    engine, _, note = make_engine(
        clients,
        args.warmup + args.events,
        args.system,
        args.runtime,
        args.batch_hint,
        args.availability_time_scale,
    )
    marks = Marks(args.warmup, engine)
    engine.callbacks = [marks]
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    history = engine.run()
    prof.disable()
    wall = time.perf_counter() - t0
    events = len(history.records) + marks.dropped  # the warm-up's dropouts are not counted
    stats = pstats.Stats(prof)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _) in raw.items():
        short = f"{Path(file).name}:{line}({fn})" if file != "~" else fn
        if "roost" in file:
            short = f"{file.split('roost/')[-1]}:{line}({fn})"
        rows.append((tt, ct, nc, short))
    print(
        f"cProfile, N = {clients:,}, system {note}: {events} events (warm-up included), "
        f"{wall / events * 1e6:.1f} µs/event under the profiler"
    )
    print(f"{'tottime µs/ev':>13s} {'cumtime µs/ev':>13s} {'calls/ev':>8s}  function")
    for tt, ct, nc, name in sorted(rows, reverse=True)[:top]:
        print(f"{tt / events * 1e6:13.2f} {ct / events * 1e6:13.2f} {nc / events:8.2f}  {name}")
    print("\nby cumulative time (the engine's own functions):")
    for tt, ct, nc, name in sorted(rows, key=lambda r: -r[1]):
        if name.startswith(("engine/", "system/", "algorithms/", "runtime/", "clock")):
            print(f"{tt / events * 1e6:13.2f} {ct / events * 1e6:13.2f} {nc / events:8.2f}  {name}")
    print()
    micro(args, clients)


def child(args: argparse.Namespace, clients: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(clients),
        "--events",
        str(args.events),
        "--warmup",
        str(args.warmup),
        "--system",
        args.system,
        "--runtime",
        args.runtime,
        "--batch-hint",
        str(args.batch_hint),
        "--availability-time-scale",
        str(args.availability_time_scale),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description="Engine overhead per event (no-op updates)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--events", type=int, default=5000, help="timed events per measurement")
    p.add_argument("--warmup", type=int, default=1000, help="server steps before timing")
    p.add_argument("--clients", default=",".join(str(c) for c in CLIENTS))
    p.add_argument("--system", choices=["auto", "trace", "w3"], default="auto")
    p.add_argument("--runtime", choices=["noop", "local"], default="noop")
    p.add_argument("--batch-hint", type=int, default=1, help="the runtime's batch_hint")
    p.add_argument(
        "--availability-time-scale",
        type=float,
        default=1.0,
        help="trace seconds per virtual second (e.g. 600: windows open and close, devices "
        "drop out during the run)",
    )
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--profile", type=int, metavar="N", help="profile one run with N clients")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args, args.child)), flush=True)
        return
    if args.profile is not None:
        profile(args, args.profile, args.top)
        return
    sizes = [int(c) for c in args.clients.split(",")]
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    for rep in range(args.reps):
        k = rep % len(sizes)
        order = sizes[k:] + sizes[:k]
        for n in order if rep % 2 == 0 else order[::-1]:
            r = child(args, n)
            runs[n].append(r)
            print(
                f"  [rep {rep + 1}] N={n:>7,}: {r['us_per_event']:6.1f} µs/event, "
                f"{r['us_per_task']:6.1f} µs/task (floor {r['floor_us_per_event']:.2f}), "
                f"{r['arrivals']} arrivals, {r['dropouts']} dropouts, "
                f"{r['availability_changes']} availability changes",
                file=sys.stderr,
                flush=True,
            )
    note = runs[sizes[0]][0]["system"]
    print(f"system: {note}; runtime: {args.runtime}; batch_hint {args.batch_hint}")
    print(
        f"{'clients':>8s} {'µs/event':>9s} {'µs/task':>8s} {'floor µs':>9s} {'ratio':>7s} "
        f"{'events':>7s} {'changes':>8s}"
    )
    results = {}
    for n in sizes:
        us = statistics.median(r["us_per_event"] for r in runs[n])
        fl = statistics.median(r["floor_us_per_event"] for r in runs[n])
        per_task = statistics.median(r["us_per_task"] for r in runs[n])
        results[n] = {
            "us_per_event": us,
            "us_per_task": per_task,
            "availability_changes": runs[n][0]["availability_changes"],
            "floor_us_per_event": fl,
            "ratio": us / fl,
            "events": runs[n][0]["events"],
            "dropouts": runs[n][0]["dropouts"],
            "all_us_per_event": [r["us_per_event"] for r in runs[n]],
            "client_data_generated": max(r["client_data_generated"] for r in runs[n]),
        }
        print(
            f"{n:8,d} {us:9.1f} {per_task:8.1f} {fl:9.2f} {us / fl:7.0f}x "
            f"{runs[n][0]['events']:7d} {runs[n][0]['availability_changes']:8d}"
        )
    worst = max(r["us_per_event"] for r in results.values())
    flat = results[sizes[-1]]["us_per_event"] / results[sizes[0]]["us_per_event"]
    met_us, met_flat = worst <= TARGET_US, flat <= FLAT
    print(
        f"target <= {TARGET_US:g} µs/event at every N: {'met' if met_us else 'NOT met'} "
        f"(worst {worst:.1f}); flat ({sizes[-1]:,} vs {sizes[0]:,} within "
        f"{FLAT - 1:.0%}): {'met' if met_flat else 'NOT met'} ({flat:.2f}x)"
    )
    generated = max(r["client_data_generated"] for r in results.values())
    if generated:
        print(f"warning: {generated} clients' examples were generated", file=sys.stderr)
    print(
        json.dumps(
            {
                "benchmark": "events",
                "reps": args.reps,
                "cpus": os.cpu_count(),
                "system": note,
                "runtime": args.runtime,
                "batch_hint": args.batch_hint,
                "concurrency": CONCURRENCY,
                "results": results,
                "target_us": TARGET_US,
                "target_met": met_us,
                "flat_ratio": flat,
                "flat_met": met_flat,
            }
        )
    )


if __name__ == "__main__":
    main()
