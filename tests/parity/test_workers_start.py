"""How the workers runtime starts its processes, and how streamed results travel.

* Workers are forked from the server when that is safe (roost/runtime/launch.py), at the
  earliest point the run's config is known: the runner's prestart, which the runtime then
  claims; a server whose OpenMP pool is alive releases it first (a forked child would hang
  in its first parallel region otherwise). ``start_method=forkserver`` forks them from a
  forkserver that preloaded torch instead.
* Asynchronous methods without client state stream their tasks: each result comes back
  as the float32 tensor the client computed, which the server folds into the same float64
  sum the local runtime makes, bit for bit.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time

import psutil
import pytest
import torch
from _async_helpers_path import make_engine
from _runs import final_run

import roost.runtime.workers as workers_module
from roost.algorithms.base import ClientResult, Contribution, Payload
from roost.config import RunConfig
from roost.errors import WorkerFailure
from roost.runtime import launch
from roost.runtime.base import Task
from roost.runtime.local import LocalRuntime
from roost.runtime.workers import StreamedContribution, WorkersRuntime, WorkersRuntimeConfig
from roost.runtime.workers_protocol import (
    PackedContribution,
    ResultRing,
    result_to_wire,
    sums_from_wire,
    sums_to_wire,
)
from roost.system import HeterogeneousConfig, HeterogeneousSystem

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is used on Linux")

ASYNC = ["algorithm=fedbuff", "algorithm.buffer_size=3", "rounds=8", "threads=1"]
ON_WORKERS = ["runtime=workers", "workers=2", "runtime.threads=1"]


def _children_named_workers() -> list[psutil.Process]:
    """This process's worker processes still alive (named by roost/runtime/worker_process)."""
    out = []
    for c in psutil.Process().children(recursive=True):
        try:
            if c.name().startswith("roost-worker") and c.status() != psutil.STATUS_ZOMBIE:
                out.append(c)
        except psutil.NoSuchProcess:
            pass
    return out


def _parallel_op() -> float:
    x = torch.randn(600, 600)
    return float((x @ x).exp().sum())


def _parallel_op_in_child(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    torch.set_num_threads(2)
    queue.put(_parallel_op())


@linux
def test_fork_is_safe_after_the_server_ran_parallel_ops():
    """A server whose OpenMP pool is alive (it ran a large op on 2 threads) releases it
    before forking, and the forked child runs parallel ops of its own (without the
    release it would wait forever for pool threads that do not exist)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _parallel_op()
        safe, why = launch.fork_is_safe()
        assert safe, why
        queue: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()  # type: ignore[type-arg]
        child = multiprocessing.get_context("fork").Process(
            target=_parallel_op_in_child, args=(queue,)
        )
        child.start()
        child.join(timeout=60)
        assert child.exitcode == 0, "the forked child did not finish its parallel op"
        assert queue.get(timeout=5) != 0.0
        _parallel_op()  # and the server makes a new pool
    finally:
        torch.set_num_threads(before)


@linux
def test_workers_are_forked_at_prestart_and_claimed_by_the_run(tmp_path, monkeypatch):
    """``run`` starts the workers before it builds the run (forked: they share torch's
    import with the server) and the runtime takes those processes; the asynchronous run
    streams its tasks on them and ends with the local runtime's model, bit for bit (one
    thread everywhere: the only difference left would be float summation order, and
    there is none, each result is folded alone in delivery order)."""
    claimed: list[launch.Launched | None] = []
    real_claim = workers_module.claim

    def spy(config):
        got = real_claim(config)
        claimed.append(got)
        return got

    monkeypatch.setattr(workers_module, "claim", spy)
    local_h, local_p = final_run(tmp_path, "local", ASYNC)
    h, p = final_run(tmp_path, "w2", [*ASYNC, *ON_WORKERS])
    assert len(claimed) == 1 and claimed[0] is not None, "the runtime started its own workers"
    assert claimed[0].method == "fork"
    assert torch.equal(p, local_p)
    assert [r["staleness_mean"] for r in h.records] == [
        r["staleness_mean"] for r in local_h.records
    ]
    assert h.final["worker_tasks"] and sum(h.final["worker_tasks"]) >= 8 * 3
    assert len(h.final["worker_peak_rss_mb"]) == 2
    assert not _children_named_workers()  # closed with the run


def test_prestarted_workers_are_released_when_the_run_fails_first(tmp_path):
    """A run that fails while it is built (before its runtime starts) leaves no worker."""
    from roost.config import apply_overrides, load_config_source, resolve
    from roost.registry import ConfigError
    from roost.runner import run

    cfg = resolve(
        apply_overrides(
            load_config_source("quickstart"),
            ["clients=10", "clients_per_round=11", *ON_WORKERS],
        )
    )
    with pytest.raises(ConfigError, match="clients_per_round"):
        run(cfg)
    assert not _children_named_workers()


def _engine_run(runtime):
    run = RunConfig(rounds=4, clients=12, clients_per_round=4, eval_every=0)
    system = HeterogeneousSystem(HeterogeneousConfig(), seed=0)
    engine, _ = make_engine(run, system, "fedbuff", {"buffer_size": 2}, runtime=runtime)
    engine.run()
    return engine


def test_workers_from_a_forkserver_train_like_local():
    """``start_method=forkserver``: the workers are children of the forkserver (not of
    this process), which imported torch once; the asynchronous run on them ends with
    the local runtime's model."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = _engine_run(None)
        runtime = WorkersRuntime(
            WorkersRuntimeConfig(workers=2, device="cpu", threads=1, start_method="forkserver")
        )
        try:
            workers = _engine_run(runtime)
            assert runtime.start_method == "forkserver"
            parents = {psutil.Process(pid).ppid() for pid in runtime.worker_pids}
            assert os.getpid() not in parents
        finally:
            runtime.close()
    finally:
        torch.set_num_threads(before)
    assert torch.equal(workers.strategy.params, local.strategy.params)


# --------------------------------------------------------------------------- results


@pytest.mark.parametrize("weight", [1.0, 0.3, 1 / 3, 7.25, 1e-3])
def test_one_result_travels_as_float32_and_folds_to_the_same_sum(weight):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    c = Contribution()
    c.fold(ClientResult({"delta": x, "v": x[:10] * 3}, weight, {"loss": 0.25}), 7)
    for header, tensors in (sums_to_wire(c), result_to_wire(c, {"delta": x, "v": x[:10] * 3})):
        assert [kind for _, kind, _ in header.names] == ["float32", "float32"]
        assert all(t.dtype == torch.float32 for t in tensors)
        back = sums_from_wire(header, tensors)
        for name in c.sums:
            assert torch.equal(back.sums[name], c.sums[name])
        assert (back.weight, back.count, back.clients) == (c.weight, 1, [7])
        assert back.scalar_sums == c.scalar_sums
    back = PackedContribution.of(c).unpack()
    assert all(torch.equal(back.sums[n], c.sums[n]) for n in c.sums)


def test_sums_that_cannot_travel_as_float32_travel_as_float64():
    """Several results, or a result that was not float32: the float64 sum itself. What
    is sent always folds back to the sum (a weight so small that the sum underflows may
    take another float32 to the same sum)."""
    x = torch.randn(100, generator=torch.Generator().manual_seed(2))
    several = Contribution()
    several.fold(ClientResult({"d": x}, 1.0), 1)
    several.fold(ClientResult({"d": x}, 2.0), 2)
    wide = Contribution()
    wide.fold(ClientResult({"d": x.double() / 3}, 1.0), 1)
    tiny = Contribution()
    tiny.fold(ClientResult({"d": x}, 1e-320), 1)
    for c in (several, wide, tiny):
        header, tensors = sums_to_wire(c)
        if c is not tiny:
            assert [kind for _, kind, _ in header.names] == ["sum"]
        assert torch.equal(sums_from_wire(header, tensors).sums["d"], c.sums["d"])


def _tasks_and_payloads(num_params: int) -> tuple[list[Task], dict[int, Payload]]:
    gen = torch.Generator().manual_seed(3)
    payloads = {v: Payload(torch.randn(num_params, generator=gen) * 0.1, v) for v in (0, 1, 2)}
    tasks = [
        Task(client_id=c, round=1, version=c % 3, seed=100 + c, group=i, key=i)
        for i, c in enumerate([3, 0, 7, 5, 1, 9, 11])
    ]
    return tasks, payloads


def test_streamed_results_equal_the_local_runtime_bit_for_bit(monkeypatch):
    """A batch of per-task groups on 2 workers: each result arrives as float32 (what
    travels, through the worker's shared-memory ring or its pipe), is waited for only
    when read, and equals the local runtime's: sums, weight, scalars and metrics."""
    received: list[tuple[str, torch.dtype]] = []  # what each result's tensors came as
    real_from_wire = workers_module.sums_from_wire

    def spy(header, tensors, copy=False):
        received.extend(
            (kind, t.dtype) for (_, kind, _), t in zip(header.names, tensors, strict=True)
        )
        return real_from_wire(header, tensors, copy)

    monkeypatch.setattr(workers_module, "sums_from_wire", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    runtime = WorkersRuntime(WorkersRuntimeConfig(workers=2, device="cpu", threads=1))
    try:
        engine = _engine_run(runtime)  # starts it, on a job of its own
        local = LocalRuntime()
        local.start(runtime._job)  # type: ignore[arg-type]
        tasks, payloads = _tasks_and_payloads(runtime._num_params())
        want = local.execute(tasks, payloads, len(tasks), defer_state=True)
        received.clear()
        got = runtime.execute(tasks, payloads, len(tasks), defer_state=True)
        assert all(isinstance(c, StreamedContribution) for c in got.contributions)
        for a, b, (ca, ma), (cb, mb) in zip(
            got.contributions,
            want.contributions,
            got.client_metrics,
            want.client_metrics,
            strict=True,
        ):
            assert set(a.sums) == set(b.sums)
            for name in b.sums:
                assert a.sums[name].dtype == torch.float64
                assert torch.equal(a.sums[name], b.sums[name])
            assert (a.weight, a.count, a.clients, a.scalar_sums) == (
                b.weight,
                b.count,
                b.clients,
                b.scalar_sums,
            )
            assert ca == cb and dict(ma) == dict(mb)
        assert len(received) == len(tasks) and set(received) == {("float32", torch.float32)}
        if ResultRing.supported():  # the workers' rings were taken (after a first result)
            assert runtime._stream is not None
            assert all(ring is not None for ring in runtime._stream.rings)
            assert runtime._stream.shared_ok == [True, True]  # and the shared versions
        assert engine.strategy.version == 4
    finally:
        runtime.close()
        torch.set_num_threads(before)


@linux
def test_a_worker_killed_while_tasks_stream_is_named():
    runtime = WorkersRuntime(WorkersRuntimeConfig(workers=2, device="cpu", threads=1))
    try:
        _engine_run(runtime)
        tasks, payloads = _tasks_and_payloads(runtime._num_params())
        victim = runtime.worker_pids[1]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10  # dead (a zombie: the runtime reaps it)
        while psutil.Process(victim).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(
            WorkerFailure, match=rf"worker 2 \(pid {victim}\) died \(killed by SIGKILL\)"
        ):
            got = runtime.execute(tasks, payloads, len(tasks), defer_state=True)
            for c in got.contributions:
                c.sums  # noqa: B018 - reading a result waits for it
    finally:
        runtime.close()
    assert not _children_named_workers()


def test_the_server_computes_on_one_thread_while_tasks_stream(monkeypatch):
    """The server's own ops overlap the workers' training, which takes the cores: one
    thread while tasks stream, evaluations on the run's threads, and the caller's threads
    given back at close."""
    seen: list[int] = []
    real_evaluate = workers_module.evaluate

    def spy(module, data):
        seen.append(torch.get_num_threads())
        return real_evaluate(module, data)

    monkeypatch.setattr(workers_module, "evaluate", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    runtime = WorkersRuntime(WorkersRuntimeConfig(workers=2, device="cpu", threads=1))
    try:
        _engine_run(runtime)
        assert torch.get_num_threads() == 1
        job = runtime._job
        assert job is not None
        test = job.dataset.test_data()
        assert test is not None
        runtime.evaluate(torch.zeros(runtime._num_params()), test)
        assert seen[-1] == 2 and torch.get_num_threads() == 1
        runtime.close()
        assert torch.get_num_threads() == 2
    finally:
        runtime.close()
        torch.set_num_threads(before)
