"""Deployment on loopback against simulating the same work (issue 9, item 6).

Four measurements, each printed as a table, then one JSON line with every figure (and the
commit measured, the files under roost/ that differ from it, the load average before and
after). Every served run uses TLS (``roost.deploy.keys.make_federation`` in a temporary
folder, no client certificates), ``roost.deployment.serve`` with a run directory in a
temporary folder (so its journal too), and ``checkpoint_every_s=3600`` (no checkpoint
inside the timed rounds). A round's wall time is the difference of consecutive records'
``wall_time_s``; every figure covers rounds 3 .. R-1 only: round 1 waits for the nodes to
start and register, round 2 follows the simulated run's only checkpoint (after round
1; a served run checkpoints once, before round 1), round R evaluates the model.

1. **Per-round overhead** (``overhead``). The same synchronous FedAvg run (digits, ``mlp``
   hidden 64, 4 clients all in every round, batch 10, one epoch, ``eval_every=0``)
   simulated with ``roost.runner.run`` and served with ``serve`` to 4 nodes
   (``run_node``), all in this process on threads (as tests/deploy/_serving.py does).
   Served with the default ``retry_after_s`` (1 s: how soon an idle node asks again for
   work) and with 0.01 s. Variants interleaved, the order rotated every repetition;
   medians; overhead = served - simulated, per round.
2. **Accepted results per second** (``throughput``). The server alone in a fresh process
   (``--serve-helper``), 100 node identities in another (``--nodes-helper``: one
   ``run_node`` thread each, each its own ``NodeClient`` and TLS channel, torch on one
   thread), tasks nearly free (digits over 100 clients, ~14 examples each, ``mlp``
   hidden 16). Results accepted in rounds 3 .. R-1 / those rounds' wall seconds. Also:
   the server's and the nodes' process CPU seconds over the same rounds
   (``time.process_time`` in the server; ``/proc/PID/stat`` of the nodes' process, read
   when the server prints its marks), i.e. which side is busy; PullTask calls that found
   no task (polls) per result; the wall seconds spent in the journal's ``add_result``
   per result (summed over the gRPC threads, lock waits included) and the share of the
   rounds' wall time the engine thread spent in ``add_event``; the most results accepted
   but not yet taken by the engine at once (``waiting``, over the whole run).
3. **Server memory against model size and nodes** (``memory``). Same two processes;
   W1's synthetic data with N clients (``total_examples = 20 N``), all N in every round;
   ``mlp`` hidden 64 (50,890 parameters, 0.19 MiB) and the ``cnn`` (1,663,370, 6.35 MiB)
   at N = 10, 50, 100. Read by the server process from its own ``/proc/self/status``:
   ``VmRSS`` once the server is bound and the run built, before any node registered
   (*ready*), and the peak RSS over rounds 3 .. R-1 (``VmHWM`` after the high-water mark
   was reset through ``/proc/self/clear_refs`` at round 2's record, read at round
   R-1's). *Growth* = peak - ready, also in model sizes (4 x parameters) and per node.
   The nodes' memory is in the other process and not counted. The ``cnn`` cells are also
   run with ``MALLOC_MMAP_THRESHOLD_=1048576`` (``mmap1M``: every block of 1 MiB or more
   its own mmap, returned when freed) so that the peak is nearer the peak of live
   memory than with glibc's defaults, which may keep freed model-size blocks in the heap.
   One more run (``cnn``, 50 nodes, ``mmap1M``) under tracemalloc says how much of the
   growth Python's allocators hold and where (tracemalloc does not see torch's tensors or
   gRPC's C buffers; it slows the run, so its timings are not used).
4. **Bytes on the wire per task.** Counted in the server of every served run: download =
   the PullTask frames of each task sent (serialized protobuf messages: header and
   chunks) and its payload's tensor bytes; upload = the server's ``WireStats`` of each
   accepted result (``Result.wire``: ``message_bytes`` and ``payload_bytes``); each per
   task and divided by 4 x the model's parameters. Not included: gRPC's 5-byte prefix per
   message, HTTP/2 and TLS framing, the signature metadata, polls and heartbeats. The
   records' ``bytes_down``/``bytes_up`` (the engine's accounting, as in simulation) are
   shown next to them.

The counters wrap, in the process that serves, ``EngineCoordinator.next_task`` and
``accept_result``, ``DeployServicer.pull_task`` and ``push_result``, and
``Journal.add_result`` and ``add_event`` (a count, a sum or a timer each; nothing under
roost/ is changed). ``serve`` gets the serve helper's round callback through a wrapper
of ``roost.runner.run`` (which ``serve`` calls).

    python benchmarks/deploy.py --reps 3
    python benchmarks/deploy.py --quick          # 1 repetition, smaller: under a minute
    python benchmarks/deploy.py --reps 3 --parts overhead,throughput
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")

DIGITS = {"name": "digits"}
FEDAVG = {"name": "fedavg", "lr": 0.1, "batch_size": 10, "local_epochs": 1}


def run_tree(data: dict[str, Any], model: dict[str, Any], clients: int, rounds: int) -> dict:
    """A synchronous FedAvg run of ``clients`` clients, all in every round (digits split
    iid; W1's data is generated per client: partition natural)."""
    return {
        "rounds": rounds,
        "clients": clients,
        "clients_per_round": clients,
        "eval_every": 0,
        "checkpoint_every_s": 3600.0,
        "seed": 0,
        "algorithm": dict(FEDAVG),
        "data": data,
        "partition": {"name": "natural" if data["name"] == "w1" else "iid"},
        "model": model,
    }


# ---- the server's counters (installed in whichever process serves) --------------------


class Counters:
    """What the server sent and accepted: tasks, polls, bytes (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.tasks = self.polls = self.results = 0
            self.down_payload = self.down_message = 0
            self.up_payload = self.up_message = self.up_chunks = 0
            self.num_params = 0
            self.pushing = self.max_pushing = self.max_waiting = 0
            self.journal_result_s = self.journal_event_s = 0.0

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {
                k: getattr(self, k)
                for k in (
                    "tasks",
                    "polls",
                    "results",
                    "down_payload",
                    "down_message",
                    "up_payload",
                    "up_message",
                    "up_chunks",
                    "num_params",
                    "max_pushing",
                    "max_waiting",
                    "journal_result_s",
                    "journal_event_s",
                )
            }


COUNTERS = Counters()
_installed = False


def install_counters() -> None:
    """Wrap the three server methods once (class attributes: every server made after this
    counts)."""
    global _installed
    if _installed:
        return
    _installed = True
    from roost.deploy._proto import pb
    from roost.deploy.coordinator import EngineCoordinator
    from roost.deploy.server import DeployServicer

    next_task = EngineCoordinator.next_task
    accept_result = EngineCoordinator.accept_result
    pull_task = DeployServicer.pull_task
    push_result = DeployServicer.push_result
    c = COUNTERS

    def counted_next_task(self: Any, node_id: str, wait_s: float = 0.0) -> Any:
        spec = next_task(self, node_id, wait_s)
        with c.lock:
            if spec is None:
                c.polls += 1
            else:
                c.tasks += 1
                c.down_payload += sum(v.numel() * v.element_size() for v in spec.payload.values())
                c.num_params = int(spec.payload["params"].numel())
        return spec

    def counted_accept_result(self: Any, node_id: str, result: Any) -> Any:
        ack = accept_result(self, node_id, result)
        # results accepted and not yet taken by the engine (a private dict: 0 if renamed)
        waiting = len(getattr(self, "_deliveries", ()))
        if ack.accepted:
            with c.lock:
                c.results += 1
                c.up_payload += result.wire.payload_bytes
                c.up_message += result.wire.message_bytes
                c.up_chunks += result.wire.chunks
                c.max_waiting = max(c.max_waiting, waiting)
        return ack

    def counted_push_result(self: Any, request_iterator: Any, context: Any) -> Any:
        with c.lock:
            c.pushing += 1
            c.max_pushing = max(c.max_pushing, c.pushing)
        try:
            return push_result(self, request_iterator, context)
        finally:
            with c.lock:
                c.pushing -= 1

    def counted_pull_task(self: Any, raw: bytes, context: Any) -> Iterator[bytes]:
        frames = pull_task(self, raw, context)
        first = next(frames, None)
        if first is None:
            return
        task = pb.TaskFrame.FromString(first).WhichOneof("frame") == "header"
        size = len(first)
        yield first
        for frame in frames:
            size += len(frame)
            yield frame
        if task:
            with c.lock:
                c.down_message += size

    try:  # the served run's journal (roost/deploy/journal.py), where there is one
        from roost.deploy.journal import Journal
    except ImportError:
        Journal = None
    if Journal is not None:
        for method, total in (("add_result", "journal_result_s"), ("add_event", "journal_event_s")):
            inner = getattr(Journal, method, None)
            if inner is not None:
                setattr(Journal, method, _timed(inner, total))

    EngineCoordinator.next_task = counted_next_task  # type: ignore[method-assign]
    EngineCoordinator.accept_result = counted_accept_result  # type: ignore[method-assign]
    DeployServicer.pull_task = counted_pull_task  # type: ignore[method-assign]
    DeployServicer.push_result = counted_push_result  # type: ignore[method-assign]


def _timed(inner: Callable[..., Any], total: str) -> Callable[..., Any]:
    """``inner`` adding its wall seconds to ``COUNTERS.<total>``."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            with COUNTERS.lock:
                setattr(COUNTERS, total, getattr(COUNTERS, total) + time.perf_counter() - t0)

    return timed


def wire_per_task(counts: dict[str, int], records: list[dict[str, Any]]) -> dict[str, float]:
    """Bytes per task (download, upload) and per model size (4 x parameters)."""
    model = 4 * counts["num_params"]
    tasks, results = max(counts["tasks"], 1), max(counts["results"], 1)
    clients = max(sum(r["clients"] for r in records), 1)
    out = {
        "num_params": counts["num_params"],
        "model_bytes": model,
        "down_message_per_task": counts["down_message"] / tasks,
        "down_payload_per_task": counts["down_payload"] / tasks,
        "up_message_per_task": counts["up_message"] / results,
        "up_payload_per_task": counts["up_payload"] / results,
        "record_down_per_task": sum(r["bytes_down"] for r in records) / clients,
        "record_up_per_task": sum(r["bytes_up"] for r in records) / clients,
    }
    for k in list(out):
        if k.endswith("_per_task"):
            out[k.replace("_per_task", "_x_model")] = out[k] / model if model else float("nan")
    return out


# ---- /proc -----------------------------------------------------------------------------


def _status_kb(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ---- 1. in this process: simulated and served on threads -------------------------------


def _window(records: list[dict[str, Any]], first: int, last: int) -> tuple[float, int]:
    """Wall seconds from record ``first``'s end to record ``last``'s, and the rounds between."""
    by_round = {r["round"]: r for r in records}
    return by_round[last]["wall_time_s"] - by_round[first]["wall_time_s"], last - first


def simulate_once(tree: dict[str, Any], tmp: Path) -> dict[str, Any]:
    from roost.config import resolve
    from roost.runner import run

    out = Path(tempfile.mkdtemp(dir=tmp))
    t0 = time.perf_counter()
    history = run(resolve(tree), out / "run")
    wall = time.perf_counter() - t0
    seconds, rounds = _window(history.records, 2, tree["rounds"] - 1)
    return {"per_round_s": seconds / rounds, "total_s": wall, "records": history.records}


def serve_threads_once(
    tree: dict[str, Any], tmp: Path, keys: Path, retry_after_s: float
) -> dict[str, Any]:
    """``serve`` on a thread (127.0.0.1:0, TLS) and one ``run_node`` thread per client."""
    from roost.config import resolve
    from roost.deployment import NodeOptions, ServeOptions, run_node, serve

    install_counters()
    COUNTERS.reset()
    out = Path(tempfile.mkdtemp(dir=tmp))
    options = ServeOptions(
        address="127.0.0.1:0", keys=keys, retry_after_s=retry_after_s, finish_grace_s=10.0
    )
    ready: queue.Queue[str] = queue.Queue()
    outcome: dict[str, Any] = {}
    cfg = resolve(tree)

    def server() -> None:
        try:
            outcome["history"] = serve(cfg, out / "run", options, on_ready=ready.put)
        except BaseException as e:
            outcome["error"] = e
            ready.put("")

    t0 = time.perf_counter()
    main = threading.Thread(target=server, name="roost-serve", daemon=True)
    main.start()
    address = ready.get(timeout=120)
    if not address:
        raise outcome["error"]
    stop = threading.Event()
    errors: list[BaseException] = []

    def node(i: int) -> None:
        try:
            run_node(NodeOptions(server=address, key=keys / "nodes" / f"node-{i}"), stop)
        except BaseException as e:
            errors.append(e)

    nodes = [threading.Thread(target=node, args=(i,), daemon=True) for i in range(tree["clients"])]
    for t in nodes:
        t.start()
    main.join(600)
    stop.set()
    for t in nodes:
        t.join(30)
    wall = time.perf_counter() - t0
    if main.is_alive():
        raise RuntimeError("the served run did not finish in 600 s")
    if "error" in outcome:
        raise outcome["error"]
    if errors:
        raise errors[0]
    records = outcome["history"].records
    seconds, rounds = _window(records, 2, tree["rounds"] - 1)
    counts = COUNTERS.snapshot()
    return {
        "per_round_s": seconds / rounds,
        "total_s": wall,
        "records": records,
        "counts": counts,
        "wire": wire_per_task(counts, records),
    }


def overhead(reps: int, clients: int, rounds: int, retries: list[float]) -> dict[str, Any]:
    """Part 1: simulated against served, interleaved, the order rotated each repetition."""
    from roost.deploy.keys import make_federation

    tree = run_tree(DIGITS, {"name": "mlp", "hidden": [64]}, clients, rounds)
    names = ["simulated", *(f"served, retry_after_s {r:g}" for r in retries)]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        make_federation(tmp / "keys", clients, client_certs=False)
        simulate_once(run_tree(DIGITS, {"name": "mlp", "hidden": [64]}, clients, 4), tmp)  # warm
        for rep in range(reps):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                if name == "simulated":
                    r = simulate_once(tree, tmp)
                else:
                    retry = retries[names.index(name) - 1]
                    r = serve_threads_once(tree, tmp, tmp / "keys", retry)
                runs[name].append(r)
                print(
                    f"  [overhead rep {rep + 1}] {name:26s} {r['per_round_s'] * 1000:8.1f} "
                    f"ms/round (whole run {r['total_s']:.2f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    sim = statistics.median(r["per_round_s"] for r in runs["simulated"])
    out: dict[str, Any] = {
        "clients": clients,
        "rounds": rounds,
        "reps": reps,
        "simulated": {
            "per_round_s": sim,
            "per_round_all_s": [r["per_round_s"] for r in runs["simulated"]],
        },
        "variants": {},
    }
    for name, retry in zip(names[1:], retries, strict=True):
        rs = runs[name]
        per = statistics.median(r["per_round_s"] for r in rs)
        out["variants"][name] = {
            "retry_after_s": retry,
            "per_round_s": per,
            "per_round_all_s": [r["per_round_s"] for r in rs],
            "overhead_per_round_s": per - sim,
            "ratio": per / sim,
            "polls_per_task": _median(rs, lambda r: r["counts"]["polls"] / r["counts"]["tasks"]),
            "journal_result_s_per_result": _median(
                rs, lambda r: r["counts"]["journal_result_s"] / r["counts"]["results"]
            ),
            "wire": rs[-1]["wire"],
        }
    return out


# ---- 2 and 3: the server in one process, the nodes in another --------------------------


class _Tracer:
    """tracemalloc over the timed rounds (diagnosis only: it slows every allocation): the
    peak of memory allocated through Python's allocators (bytes objects such as frames
    and chunks; not torch's tensors, not gRPC's C buffers), the largest RSS sampled, and
    the allocation sites holding most at the largest traced total sampled (every 50 ms)."""

    def __init__(self) -> None:
        import tracemalloc

        self.tm = tracemalloc
        tracemalloc.start(6)
        self.active = threading.Event()
        self.best = 0
        self.top: list[dict[str, Any]] = []
        self.max_rss_kb = 0
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def mark(self, first: bool) -> None:
        if first:
            self.tm.reset_peak()
            self.active.set()
        else:
            self.active.clear()
            self.peak = self.tm.get_traced_memory()[1]

    def _sample(self) -> None:
        while True:
            time.sleep(0.05)
            if not self.active.is_set():
                continue
            self.max_rss_kb = max(self.max_rss_kb, _status_kb("VmRSS"))
            current = self.tm.get_traced_memory()[0]
            if current > self.best * 1.05:
                self.best = current
                stats = self.tm.take_snapshot().statistics("traceback")[:6]
                self.top = [
                    {"mb": st.size / MIB, "count": st.count, "where": st.traceback.format()[-6:]}
                    for st in stats
                ]

    def report(self) -> dict[str, Any]:
        return {
            "traced_peak_mb": getattr(self, "peak", 0) / MIB,
            "traced_at_sample_mb": self.best / MIB,
            "max_rss_sampled_mb": self.max_rss_kb / 1024,
            "top": self.top,
        }


def serve_helper(spec: dict[str, Any]) -> None:
    """``--serve-helper``: ``roost.deployment.serve`` of ``spec['tree']`` with a run
    directory in a temporary folder; print ``READY address``, ``MARK round`` at the marked
    records, and ``RESULT {json}`` at the end (stdout). The marks are taken by a callback
    added to the run: ``serve`` calls ``roost.runner.run``, which is wrapped here to pass it."""
    import roost.runner
    from roost.config import resolve
    from roost.deployment import ServeOptions, serve

    install_counters()
    tree = spec["tree"]
    marks = spec["marks"]
    probe: dict[str, Any] = {"ready_rss_kb": None, "marks": {}, "hwm_reset": None}
    tracer = _Tracer() if spec.get("trace") else None

    def on_ready(address: str) -> None:
        probe["ready_rss_kb"] = _status_kb("VmRSS")
        probe["ready_hwm_kb"] = _status_kb("VmHWM")
        print(f"READY {address}", flush=True)

    def callback(record: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        r = record["round"]
        if r in marks:
            probe["marks"][r] = {
                "wall_s": record["wall_time_s"],
                "cpu_s": time.process_time(),
                "rss_kb": _status_kb("VmRSS"),
                "hwm_kb": _status_kb("VmHWM"),
                "counts": COUNTERS.snapshot(),
            }
            probe["hwm_reset"] = _reset_hwm()
            if tracer is not None:
                tracer.mark(r == marks[0])
            print(f"MARK {r}", flush=True)
        return False, {}

    original = roost.runner.run

    def run_with_probe(*args: Any, **kwargs: Any) -> Any:
        kwargs["callbacks"] = [*kwargs.get("callbacks", ()), callback]
        return original(*args, **kwargs)

    roost.runner.run = run_with_probe  # type: ignore[assignment]
    options = ServeOptions(
        address="127.0.0.1:0",
        keys=Path(spec["keys"]),
        retry_after_s=spec["retry_after_s"],
        finish_grace_s=30.0,
    )
    with tempfile.TemporaryDirectory() as out:
        history = serve(resolve(tree), Path(out) / "run", options, on_ready=on_ready)
    probe["end_hwm_kb"] = _status_kb("VmHWM")
    if tracer is not None:
        probe["trace"] = tracer.report()
    clean = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in history.records]
    print("RESULT " + json.dumps({**probe, "records": clean, "counts": COUNTERS.snapshot()}))


def nodes_helper(spec: dict[str, Any]) -> None:
    """``--nodes-helper``: one ``run_node`` thread per node in ``spec['nodes']``; print
    ``NODES {json}`` when all are done."""
    import torch

    from roost.deployment import NodeOptions, run_node

    torch.set_num_threads(1)  # many small devices, not one process's thread pool each
    keys = Path(spec["keys"])
    trained: dict[int, int] = {}
    errors: list[str] = []

    def node(i: int) -> None:
        try:
            trained[i] = run_node(
                NodeOptions(server=spec["address"], key=keys / "nodes" / f"node-{i}")
            )
        except BaseException as e:
            errors.append(f"node {i}: {type(e).__name__}: {e}")
            print(f"NODE-ERROR {errors[-1]}", file=sys.stderr, flush=True)

    threads = [threading.Thread(target=node, args=(i,), daemon=True) for i in spec["nodes"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rss = _status_kb("VmHWM")
    print(
        "NODES " + json.dumps({"trained": sum(trained.values()), "errors": errors, "hwm_kb": rss})
    )


def _helper(
    mode: str, spec: dict[str, Any], log: Path, env_extra: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """This file as a helper process (``env_extra`` added to its environment); its stderr
    goes to ``log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    with open(log, "w") as err:
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), mode, json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )


def _tail(paths: list[Path]) -> str:
    return "\n".join(f"--- {p.name}:\n{p.read_text()[-2000:]}" for p in paths if p.exists())


def served_processes(
    tree: dict[str, Any],
    keys: Path,
    retry_after_s: float,
    node_processes: int = 1,
    timeout_s: float = 900.0,
    server_env: dict[str, str] | None = None,
    trace: bool = False,
) -> dict[str, Any]:
    """The server in a ``--serve-helper`` process, the nodes in ``node_processes``
    ``--nodes-helper`` processes; the server's figures over rounds 3 .. R-1 (marks at
    records 2 and R-1), and the nodes' processes' CPU seconds over the same rounds (read
    when the server prints its marks).
    Every helper is killed after ``timeout_s`` (a node that failed to register leaves
    the server waiting for it)."""
    rounds, n = tree["rounds"], tree["clients"]
    marks = [2, rounds - 1]
    spec = {
        "tree": tree,
        "keys": str(keys),
        "retry_after_s": retry_after_s,
        "marks": marks,
        "trace": trace,
    }
    logs = Path(tempfile.mkdtemp(prefix="roost-deploy-bench-"))
    t0 = time.perf_counter()
    server = _helper("--serve-helper", spec, logs / "server.err", server_env)
    assert server.stdout is not None
    procs = [server]
    expired = threading.Event()

    def kill_all() -> None:
        expired.set()
        for proc in procs:  # each helper's threads' stacks into its log (faulthandler)
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGUSR1)
        time.sleep(2.0)
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.kill()

    finished = threading.Event()

    def watch() -> None:  # a node that failed would leave the server waiting for it
        deadline = time.monotonic() + timeout_s
        while not finished.wait(1.0):
            failed = any(
                "NODE-ERROR" in log.read_text() for log in logs.glob("nodes-*.err") if log.exists()
            )
            if failed or time.monotonic() > deadline:
                kill_all()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    node_cpu: dict[int, float] = {}
    result: dict[str, Any] | None = None
    node_out: list[dict[str, Any]] = []
    try:
        for line in server.stdout:
            if line.startswith("READY "):
                address = line.split()[1]
                ids = list(range(n))
                for p in range(node_processes):
                    node_spec = {
                        "address": address,
                        "keys": str(keys),
                        "nodes": ids[p::node_processes],
                    }
                    procs.append(_helper("--nodes-helper", node_spec, logs / f"nodes-{p}.err"))
            elif line.startswith("MARK "):
                with contextlib.suppress(OSError):
                    node_cpu[int(line.split()[1])] = sum(_cpu_s(p.pid) for p in procs[1:])
            elif line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
        server.wait()
        for proc in procs[1:]:
            out, _ = proc.communicate()
            node_out.extend(
                json.loads(x[len("NODES ") :]) for x in out.splitlines() if x.startswith("NODES ")
            )
    finally:
        finished.set()
        watcher.join()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.perf_counter() - t0
    errors = [e for o in node_out for e in o["errors"]]
    if expired.is_set() or server.returncode != 0 or result is None or errors:
        why = (
            "killed (a node failed, or timeout)" if expired.is_set() else f"rc {server.returncode}"
        )
        raise RuntimeError(
            f"served run failed ({why}); nodes: {errors[:3]}\n{_tail(sorted(logs.iterdir()))}"
        )
    for log in logs.iterdir():
        log.unlink()
    logs.rmdir()
    a, b = (result["marks"][str(m)] for m in marks)
    seconds = b["wall_s"] - a["wall_s"]
    accepted = b["counts"]["results"] - a["counts"]["results"]
    counts = result["counts"]
    return {
        "nodes": n,
        "timed_rounds": marks[1] - marks[0],
        "window_s": seconds,
        "results": accepted,
        "results_per_s": accepted / seconds,
        "per_round_s": seconds / (marks[1] - marks[0]),
        "server_cpu_s": b["cpu_s"] - a["cpu_s"],
        "nodes_cpu_s": node_cpu.get(marks[1], float("nan")) - node_cpu.get(marks[0], float("nan")),
        "polls": b["counts"]["polls"] - a["counts"]["polls"],
        "ready_rss_mb": result["ready_rss_kb"] / 1024,
        "peak_before_mb": a["hwm_kb"] / 1024,
        "steady_peak_mb": b["hwm_kb"] / 1024 if result["hwm_reset"] else float("nan"),
        "steady_end_rss_mb": b["rss_kb"] / 1024,
        "hwm_reset": result["hwm_reset"],
        "end_peak_mb": result["end_hwm_kb"] / 1024,
        "nodes_peak_mb": sum(o["hwm_kb"] for o in node_out) / 1024,
        "round1_s": result["records"][0]["wall_time_s"],
        "max_pushing": counts["max_pushing"],
        "journal_result_s": b["counts"]["journal_result_s"] - a["counts"]["journal_result_s"],
        "journal_event_s": b["counts"]["journal_event_s"] - a["counts"]["journal_event_s"],
        "max_waiting": counts["max_waiting"],
        "total_s": wall,
        "wire": wire_per_task(counts, result["records"]),
        "trace": result.get("trace"),
    }


def _keys(tmp: Path, n: int) -> Path:
    from roost.deploy.keys import make_federation

    root = tmp / f"keys-{n}"
    if not root.exists():
        make_federation(root, n, client_certs=False)
    return root


def _median(runs: list[dict[str, Any]], f: Callable[[dict[str, Any]], float]) -> float:
    return statistics.median(f(r) for r in runs)


def _server_figures(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of what every served-processes run measures besides memory."""
    return {
        "results_per_s": _median(rs, lambda r: r["results_per_s"]),
        "results_per_s_all": [r["results_per_s"] for r in rs],
        "per_round_s": _median(rs, lambda r: r["per_round_s"]),
        "server_cpu_per_result_ms": _median(rs, lambda r: 1000 * r["server_cpu_s"] / r["results"]),
        "server_cores": _median(rs, lambda r: r["server_cpu_s"] / r["window_s"]),
        "nodes_cores": _median(rs, lambda r: r["nodes_cpu_s"] / r["window_s"]),
        "polls_per_result": _median(rs, lambda r: r["polls"] / r["results"]),
        "journal_result_s_per_result": _median(rs, lambda r: r["journal_result_s"] / r["results"]),
        "journal_event_share": _median(rs, lambda r: r["journal_event_s"] / r["window_s"]),
        "max_waiting": _median(rs, lambda r: r["max_waiting"]),
        "max_pushing": _median(rs, lambda r: r["max_pushing"]),
        "round1_s": _median(rs, lambda r: r["round1_s"]),
        "wire": rs[-1]["wire"],
    }


def throughput(reps: int, nodes: int, rounds: int, retries: list[float]) -> dict[str, Any]:
    """Part 2: accepted results per second with ``nodes`` nodes and nearly free tasks."""
    tree = run_tree(DIGITS, {"name": "mlp", "hidden": [16]}, nodes, rounds)
    runs: dict[float, list[dict[str, Any]]] = {r: [] for r in retries}
    with tempfile.TemporaryDirectory() as tmp_name:
        keys = _keys(Path(tmp_name), nodes)
        for rep in range(reps):
            order = retries if rep % 2 == 0 else retries[::-1]
            for retry in order:
                r = served_processes(tree, keys, retry)
                runs[retry].append(r)
                print(
                    f"  [throughput rep {rep + 1}] retry {retry:g}s: {r['results_per_s']:7.1f} "
                    f"results/s, {r['per_round_s']:.3f} s/round, server "
                    f"{r['server_cpu_s'] / r['window_s']:.2f} cores, nodes "
                    f"{r['nodes_cpu_s'] / r['window_s']:.2f} cores, polls/result "
                    f"{r['polls'] / max(r['results'], 1):.2f} (whole run {r['total_s']:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    out: dict[str, Any] = {"nodes": nodes, "rounds": rounds, "reps": reps, "variants": {}}
    for retry, rs in runs.items():
        out["variants"][f"{retry:g}"] = {"retry_after_s": retry, **_server_figures(rs)}
    return out


MODELS = {
    "mlp64": {"name": "mlp", "hidden": [64]},
    "cnn": {"name": "cnn"},
    "cnn2048": {"name": "cnn", "hidden": 2048},  # 6.5 M parameters, 24.8 MiB
}
ALLOCATORS = {
    "glibc": {},
    "mmap1M": {"MALLOC_MMAP_THRESHOLD_": str(MIB)},
    "mmap1M-arena1": {"MALLOC_MMAP_THRESHOLD_": str(MIB), "MALLOC_ARENA_MAX": "1"},
}
"""The server's allocator settings: glibc's defaults (a freed large block may stay in the
heap: the mmap threshold rises to the largest block freed, up to 32 MiB), or every block
of 1 MiB or more its own mmap, returned to the OS when freed (so peak RSS is nearer the
peak of live memory), and that with a single malloc arena for all threads (freed small
blocks are reused by every thread instead of staying in per-thread arenas)."""


def memory(
    reps: int,
    cells: list[tuple[str, int, str]],
    rounds: int,
    trace: tuple[str, int, str] | None = None,
) -> dict[str, Any]:
    """Part 3: the server's memory per (model, nodes, allocator) cell, interleaved (the
    order rotated each repetition); ``trace``: one more run of that cell under
    tracemalloc."""
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {c: [] for c in cells}
    out: dict[str, Any] = {"rounds": rounds, "reps": reps, "cells": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        keys = _keys(Path(tmp_name), max(n for _, n, _ in cells))  # nodes 0 .. n-1 of it
        for rep in range(reps):
            k = rep % len(cells)
            for model, n, alloc in cells[k:] + cells[:k]:
                tree = run_tree({"name": "w1", "total_examples": 20 * n}, MODELS[model], n, rounds)
                r = served_processes(tree, keys, 0.05, server_env=ALLOCATORS[alloc])
                runs[(model, n, alloc)].append(r)
                print(
                    f"  [memory rep {rep + 1}] {model:5s} {n:3d} nodes {alloc:6s}: ready "
                    f"{r['ready_rss_mb']:6.1f} MB, peak rounds 3..{rounds - 1} "
                    f"{r['steady_peak_mb']:6.1f} MB (through round 2 {r['peak_before_mb']:.1f}, "
                    f"whole run {r['end_peak_mb']:.1f}); waiting <= {r['max_waiting']}; nodes' "
                    f"process {r['nodes_peak_mb']:.0f} MB (whole run {r['total_s']:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
        if trace is not None:
            model, n, alloc = trace
            tree = run_tree({"name": "w1", "total_examples": 20 * n}, MODELS[model], n, rounds)
            r = served_processes(tree, keys, 0.05, server_env=ALLOCATORS[alloc], trace=True)
            out["trace"] = {"model": model, "nodes": n, "allocator": alloc, **r["trace"]}
            out["trace"]["steady_peak_mb"] = r["steady_peak_mb"]
            out["trace"]["ready_rss_mb"] = r["ready_rss_mb"]
    for model, n, alloc in cells:
        rs = runs[(model, n, alloc)]
        model_mb = rs[0]["wire"]["model_bytes"] / MIB
        growth = _median(rs, lambda r: r["steady_peak_mb"] - r["ready_rss_mb"])
        out["cells"].append(
            {
                "model": model,
                "nodes": n,
                "allocator": alloc,
                "num_params": rs[0]["wire"]["num_params"],
                "model_mb": model_mb,
                "ready_rss_mb": _median(rs, lambda r: r["ready_rss_mb"]),
                "steady_peak_mb": _median(rs, lambda r: r["steady_peak_mb"]),
                "growth_mb": growth,
                "growth_mb_all": [r["steady_peak_mb"] - r["ready_rss_mb"] for r in rs],
                "growth_x_model": growth / model_mb,
                "growth_x_model_per_node": growth / model_mb / n,
                "peak_through_round2_mb": _median(rs, lambda r: r["peak_before_mb"]),
                "end_rss_mb": _median(rs, lambda r: r["steady_end_rss_mb"]),
                "nodes_process_peak_mb": _median(rs, lambda r: r["nodes_peak_mb"]),
                **_server_figures(rs),
            }
        )
    return out


# ---- output ----------------------------------------------------------------------------


def wire_rows(res: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """One row of bytes per task for each model measured."""
    rows = []
    served = [v for v in res.get("overhead", {}).get("variants", {}).values()]
    if served:
        rows.append(("digits mlp64 (part 1)", served[0]["wire"]))
    variants = list(res.get("throughput", {}).get("variants", {}).values())
    if variants:
        rows.append(("digits mlp16 (part 2)", variants[0]["wire"]))
    seen = set()
    for c in res.get("memory", {}).get("cells", []):
        if c["model"] not in seen:
            seen.add(c["model"])
            rows.append((f"w1 {c['model']} (part 3)", c["wire"]))
    return rows


def print_tables(res: dict[str, Any]) -> None:
    if "overhead" in res:
        o = res["overhead"]
        print(
            f"\n1. Wall seconds per round, {o['clients']} clients all per round, rounds "
            f"3..{o['rounds'] - 1}, medians of {o['reps']}"
        )
        print(
            f"{'variant':26s} {'s/round':>9s} {'overhead/round':>15s} {'ratio':>6s} "
            f"{'polls/task':>10s}"
        )
        print(f"{'simulated':26s} {o['simulated']['per_round_s']:9.4f}")
        for name, r in o["variants"].items():
            print(
                f"{name:26s} {r['per_round_s']:9.4f} {r['overhead_per_round_s']:14.4f}s "
                f"{r['ratio']:6.2f} {r['polls_per_task']:10.2f}"
            )
    if "throughput" in res:
        t = res["throughput"]
        print(
            f"\n2. Accepted results per second, {t['nodes']} nodes, rounds 3..{t['rounds'] - 1}, "
            f"medians of {t['reps']}"
        )
        print(
            f"{'retry_after_s':>13s} {'results/s':>9s} {'s/round':>8s} {'server ms CPU/res':>17s} "
            f"{'server cores':>12s} {'nodes cores':>11s} {'polls/res':>9s} {'journal s/res':>13s} "
            f"{'engine in journal':>17s}"
        )
        for r in t["variants"].values():
            print(
                f"{r['retry_after_s']:13g} {r['results_per_s']:9.1f} {r['per_round_s']:8.3f} "
                f"{r['server_cpu_per_result_ms']:17.2f} {r['server_cores']:12.2f} "
                f"{r['nodes_cores']:11.2f} {r['polls_per_result']:9.2f} "
                f"{r['journal_result_s_per_result']:13.4f} {r['journal_event_share']:17.1%}"
            )
    if "memory" in res:
        m = res["memory"]
        print(
            f"\n3. Server RSS (MB), peak over rounds 3..{m['rounds'] - 1} against ready, "
            f"medians of {m['reps']}"
        )
        print(
            f"{'model':6s} {'MiB':>6s} {'alloc':>6s} {'nodes':>5s} {'ready':>7s} {'peak':>7s} "
            f"{'growth':>7s} {'x model':>8s} {'x model/node':>12s} {'waiting':>7s} "
            f"{'results/s':>9s}"
        )
        for c in m["cells"]:
            print(
                f"{c['model']:6s} {c['model_mb']:6.2f} {c['allocator']:>6s} {c['nodes']:5d} "
                f"{c['ready_rss_mb']:7.1f} {c['steady_peak_mb']:7.1f} {c['growth_mb']:7.1f} "
                f"{c['growth_x_model']:8.1f} {c['growth_x_model_per_node']:12.2f} "
                f"{c['max_waiting']:7.0f} {c['results_per_s']:9.1f}"
            )
        if "trace" in m:
            tr = m["trace"]
            print(
                f"   tracemalloc, {tr['model']} {tr['nodes']} nodes {tr['allocator']}: Python "
                f"allocations peak {tr['traced_peak_mb']:.1f} MB over the rounds (RSS growth "
                f"{tr['steady_peak_mb'] - tr['ready_rss_mb']:.1f} MB); largest at "
                f"{tr['traced_at_sample_mb']:.1f} MB:"
            )
            for site in tr["top"][:3]:
                where = site["where"][-1].strip() if site["where"] else "?"
                print(f"     {site['mb']:7.1f} MB in {site['count']} blocks: {where}")
    rows = wire_rows(res)
    if rows:
        print("\n4. Bytes per task on the wire / (4 x parameters)")
        print(
            f"{'run':22s} {'params':>9s} {'down msg':>9s} {'down data':>9s} {'up msg':>9s} "
            f"{'up data':>9s} {'record down':>11s} {'record up':>9s}"
        )
        for name, w in rows:
            print(
                f"{name:22s} {w['num_params']:9d} {w['down_message_x_model']:9.4f} "
                f"{w['down_payload_x_model']:9.4f} {w['up_message_x_model']:9.4f} "
                f"{w['up_payload_x_model']:9.4f} {w['record_down_x_model']:11.4f} "
                f"{w['record_up_x_model']:9.4f}"
            )


def _code_state() -> dict[str, Any]:
    """The commit measured, and the files under roost/ that differ from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True)
        return done.stdout.strip()

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "roost_changed": git("status", "--porcelain", "roost").splitlines(),
    }


PLANS: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "overhead": {"clients": 4, "rounds": 13, "retries": [1.0, 0.01]},
        "throughput": {"nodes": 100, "rounds": 8, "retries": [1.0, 0.05]},
        "memory": {
            "cells": [
                *((m, n, "glibc") for m in ("mlp64", "cnn") for n in (10, 50, 100)),
                *(("cnn", n, "mmap1M") for n in (10, 50, 100)),
            ],
            "rounds": 4,
            "trace": ("cnn", 50, "mmap1M"),
        },
    },
    "quick": {
        "overhead": {"clients": 4, "rounds": 6, "retries": [0.01]},
        "throughput": {"nodes": 20, "rounds": 5, "retries": [0.05]},
        "memory": {
            "cells": [("mlp64", 8, "glibc"), ("cnn", 3, "glibc"), ("cnn", 8, "glibc")],
            "rounds": 4,
        },
    },
}


def _cells(p: argparse.ArgumentParser, text: str) -> list[tuple[str, int, str]]:
    cells = []
    for item in text.split(","):
        model, _, rest = item.partition(":")
        nodes, _, alloc = rest.partition(":")
        if model not in MODELS or alloc not in ALLOCATORS or not nodes.isdigit():
            p.error(
                f"--cells: {item!r} is not MODEL:NODES:ALLOCATOR with MODEL one of "
                f"{', '.join(MODELS)} and ALLOCATOR one of {', '.join(ALLOCATORS)}"
            )
        cells.append((model, int(nodes), alloc))
    return cells


def main() -> None:
    p = argparse.ArgumentParser(description="Deployment on loopback against simulation")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 repetition, fewer rounds, nodes and cells: under a minute",
    )
    p.add_argument("--parts", default="overhead,throughput,memory")
    p.add_argument(
        "--cells",
        default="",
        help="part 3's cells instead of the plan's, as MODEL:NODES:ALLOCATOR,... "
        f"(models {', '.join(MODELS)}; allocators {', '.join(ALLOCATORS)}); no trace run",
    )
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    from precompile import compile_roost

    print(compile_roost(), flush=True)
    reps = 1 if args.quick else args.reps
    plan = PLANS["quick" if args.quick else "full"]
    if args.cells:
        plan = {**plan, "memory": {**plan["memory"], "cells": _cells(p, args.cells), "trace": None}}
    runners: dict[str, Callable[..., dict[str, Any]]] = {
        "overhead": overhead,
        "throughput": throughput,
        "memory": memory,
    }
    parts = [x for x in args.parts.split(",") if x]
    for part in parts:
        if part not in runners:
            p.error(f"unknown part {part!r} (known: {', '.join(runners)})")
    load_before = _loadavg()
    t0 = time.perf_counter()
    res: dict[str, Any] = {}
    for part in parts:
        res[part] = runners[part](reps, **plan[part])
    print_tables(res)
    res["wire"] = dict(wire_rows(res))
    wall = time.perf_counter() - t0
    load_after = _loadavg()
    print(f"\nbenchmark wall {wall:.1f} s; load average before {load_before}, after {load_after}")
    print(
        json.dumps(
            {
                "benchmark": "deploy",
                "quick": args.quick,
                "reps": reps,
                "cpus": os.cpu_count(),
                "code": _code_state(),
                "wall_s": wall,
                "loadavg_before": load_before,
                "loadavg_after": load_after,
                "results": res,
            }
        )
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1].endswith("-helper"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-helper":
        serve_helper(json.loads(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--nodes-helper":
        nodes_helper(json.loads(sys.argv[2]))
    else:
        main()
