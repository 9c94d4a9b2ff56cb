"""Starting the ``workers`` runtime's processes, as early and as cheaply as possible.

A worker needs torch imported before it can do anything, and importing it takes about as
long as a whole small run (1.0-1.5 s on a 2-core machine: half of W3's ``mlp`` floor).
A worker started by ``spawn`` imports it again after the server did, so the run waits for
it. Here workers are *forked from the server* when that is safe, at the earliest point the
run's config is known: the runner calls :func:`prestart` right after resolving it, before
it builds its dataset and model, and :class:`~roost.runtime.workers.WorkersRuntime` claims
the processes when it starts (:func:`claim`). They inherit torch and Roost already
imported, and build the run's parts (the job's picklable builder) while the server builds
its own.

Forking is safe when the forking thread is the only one that may hold a lock the child
needs, and no OpenMP thread pool is alive. GNU OpenMP's pool does not survive a fork: the
child's first parallel region waits forever for pool threads that do not exist (tested:
torch 2.13 hangs). Torch runs its intra-op parallel regions on that pool, so a server that
ran a large tensor op has one; it is released first with OpenMP 5.0's
``omp_pause_resource_all``, which joins the pool's threads (the server's next parallel
region makes a new pool). Other native thread pools (OpenBLAS, torch's inter-op pool)
re-create themselves after fork. So the server forks when:

* no other Python thread runs,
* CUDA is not initialised in it (a forked child cannot use the parent's CUDA context),
* every OpenMP runtime loaded in it could be paused (or none is loaded),
* and it is Linux (``/proc`` tells which OpenMP runtime is loaded).

Otherwise the workers are forked from a ``forkserver`` that preloads torch and Roost
(a fresh interpreter that never ran a parallel op, started at :func:`prestart` too), or,
with ``runtime.start_method=spawn``, spawned as before.

Each worker gets two pipes to the server (:class:`WorkerPipes`), which carry its control
messages and, for asynchronous methods, its tasks and results (see
:mod:`roost.runtime.workers`); ``torch.distributed`` is joined only when a round needs a
collective.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch

from roost.runtime.device import default_worker_count
from roost.runtime.workers_protocol import (
    WorkersRuntimeConfig,
    enlarge_pipe,
    launched_by_torchrun,
)

__all__ = [
    "Launched",
    "WorkerPipes",
    "claim",
    "fork_is_safe",
    "launch",
    "prestart",
    "release",
]

PRELOAD = ["torch", "torch.distributed", "roost.runtime.worker_process"]
"""What the forkserver imports before it forks any worker."""


@dataclass
class WorkerPipes:
    """A worker's two one-way pipes: ``orders`` from the server, ``results`` to it.

    The server keeps ``send`` and ``recv``; the worker ``orders`` and ``results``."""

    orders: Connection  # worker end: read
    send: Connection  # server end of orders: write
    recv: Connection  # server end of results: read
    results: Connection  # worker end: write

    def close_worker_ends(self) -> None:
        self.orders.close()
        self.results.close()


@dataclass
class Launched:
    """Worker processes started for one run (not yet, or already, joined)."""

    config: WorkersRuntimeConfig
    world_size: int
    parts: Any  # the builder the workers were given at start (None: none)
    method: str  # "fork", "forkserver" or "spawn"
    processes: list[Any] = field(default_factory=list)
    pipes: list[WorkerPipes] = field(default_factory=list)
    starting: threading.Thread | None = None  # starts the processes in the background
    error: BaseException | None = None

    @property
    def num_workers(self) -> int:
        return self.world_size - 1

    def wait_started(self) -> None:
        """Wait until every process has started (a forkserver's first fork waits for
        it to import torch); raise what stopped them."""
        if self.starting is not None:
            self.starting.join()
            self.starting = None
        if self.error is not None:
            raise RuntimeError(f"the worker processes did not start: {self.error}")

    def kill(self) -> None:
        if self.starting is not None:
            self.starting.join()
            self.starting = None
        for p in self.processes:
            if p.is_alive():
                p.kill()
        for p in self.processes:
            p.join(timeout=10)
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send.close()
            with contextlib.suppress(OSError):
                pipe.recv.close()
        self.processes = []


_prestarted: Launched | None = None
_lock = threading.Lock()


def prestart(runtime: str, config: Any, parts: Callable[[], Any] | None) -> None:
    """Start the worker processes of a ``runtime=workers`` run now (nothing for another
    runtime, or under torchrun, whose processes exist already). ``parts`` is the job's
    builder the workers call right away. Best effort: if anything fails here, the
    runtime starts its workers itself."""
    global _prestarted
    if runtime != "workers" or not isinstance(config, WorkersRuntimeConfig):
        return
    if launched_by_torchrun():
        return
    release()
    try:
        world = (config.workers or default_worker_count(config.device)) + 1
        launched = launch(config, parts, world, background=True)
    except Exception as e:  # the runtime will start them at its start, and say why then
        warnings.warn(f"could not start the worker processes early ({e})", stacklevel=2)
        return
    with _lock:
        _prestarted = launched


def claim(config: WorkersRuntimeConfig) -> Launched | None:
    """The processes :func:`prestart` started for ``config`` (then this process owns
    them), or None; a prestart for another config is released."""
    global _prestarted
    with _lock:
        launched, _prestarted = _prestarted, None
    if launched is None:
        return None
    try:
        launched.wait_started()
    except RuntimeError:
        launched.kill()
        return None
    if launched.config != config or not all(p.is_alive() for p in launched.processes):
        launched.kill()
        return None
    return launched


def release() -> None:
    """Stop prestarted processes that no runtime claimed (the run failed before its
    runtime started, or it never starts one: a finished run resumed)."""
    global _prestarted
    with _lock:
        launched, _prestarted = _prestarted, None
    if launched is not None:
        launched.kill()


# --------------------------------------------------------------------------- starting


def launch(
    config: WorkersRuntimeConfig,
    parts: Callable[[], Any] | None,
    world: int,
    background: bool = False,
) -> Launched:
    """Start ``world - 1`` worker processes (ranks 1..) running
    :func:`~roost.runtime.worker_process.local_worker`. With ``background``, a
    forkserver's processes are started by a thread (the forkserver first imports torch,
    which the caller need not wait for: :meth:`Launched.wait_started`)."""
    method: str = config.start_method
    if method == "auto":
        safe, _ = fork_is_safe()
        method = "fork" if safe else "forkserver"
    if method == "forkserver" and "forkserver" not in multiprocessing.get_all_start_methods():
        method = "spawn"
    ctx: Any
    if method == "spawn":
        ctx = torch.multiprocessing.get_context("spawn")
    else:
        ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(PRELOAD)
    launched = Launched(config, world, parts, method)
    if background and method == "forkserver":
        launched.starting = threading.Thread(
            target=_start_all, args=(launched, ctx), name="roost-start-workers", daemon=True
        )
        launched.starting.start()
    else:
        _start_all(launched, ctx)
        launched.wait_started()
    return launched


def _start_all(launched: Launched, ctx: Any) -> None:
    from roost.runtime.worker_process import local_worker

    try:
        for rank in range(1, launched.world_size):
            orders, send = ctx.Pipe(duplex=False)
            recv, results = ctx.Pipe(duplex=False)
            pipes = WorkerPipes(orders, send, recv, results)
            enlarge_pipe(send)
            enlarge_pipe(recv)
            # a forked child inherits the server's ends of its pipes and of the pipes of
            # the workers before it: it closes them, so that it sees the server go away
            servers_ends = [
                fd for p in [*launched.pipes, pipes] for fd in (p.send.fileno(), p.recv.fileno())
            ]
            to_close: list[int] = servers_ends if launched.method == "fork" else []
            args = (rank, launched.world_size, launched.config, orders, results, launched.parts)
            process = ctx.Process(
                target=local_worker,
                args=(*args, to_close),
                daemon=True,
                name=f"roost-worker-{rank}",
            )
            with warnings.catch_warnings():  # Python >= 3.12 warns of any OS thread
                warnings.filterwarnings("ignore", ".*multi-threaded.*fork", DeprecationWarning)
                process.start()
            pipes.close_worker_ends()
            launched.processes.append(process)
            launched.pipes.append(pipes)
    except Exception as e:
        launched.error = e
        for p in launched.processes:
            p.kill()


def fork_is_safe() -> tuple[bool, str]:
    """Whether this process may fork its workers now (see the module docstring); if not,
    why. Releases the OpenMP thread pools it finds, which makes it safe."""
    if not sys.platform.startswith("linux"):
        return False, f"fork is used on Linux only ({sys.platform})"
    if threading.active_count() > 1:
        return False, f"{threading.active_count()} Python threads run"
    if torch.cuda.is_initialized():
        return False, "CUDA is initialised in the server"
    for path in _openmp_libraries():
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            return False, f"{path} cannot release its thread pool"
        pause.restype = ctypes.c_int
        if pause(ctypes.c_int(2)) != 0:  # omp_pause_hard: threads joined, pool freed
            return False, f"{path} refused to release its thread pool"
    return True, ""


def _openmp_libraries() -> list[str]:
    """OpenMP runtimes mapped into this process (GNU, LLVM, Intel)."""
    names = ("libgomp", "libomp", "libiomp5")
    found: set[str] = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rstrip("\n").split(maxsplit=5)[-1]
            if path.startswith("/") and os.path.basename(path).startswith(names):
                found.add(path)
    return sorted(found)
