"""A worker process of the ``workers`` runtime: join, build the job's parts, train tasks.

See :mod:`roost.runtime.workers` for the protocol. A worker the server started itself
(:func:`local_worker`) takes its orders from a pipe: streamed tasks, or "join the next
collective round"; under torchrun (:func:`worker_loop`) every order comes by collective."""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

import torch
import torch.distributed as dist

from roost.algorithms.base import Payload
from roost.runtime.base import Job, Outcome, Task
from roost.runtime.capture import CapturingAlgorithm
from roost.runtime.device import resolve_device, worker_slot_on_node
from roost.runtime.workers_protocol import (
    BACKEND,
    REFOLDABLE,
    RELAY_RANK,
    PackedContribution,
    ResultRing,
    RoundOrder,
    SharedSlots,
    ShippedStates,
    StreamResult,
    SumHeader,
    Tensors,
    Transport,
    WorkerNote,
    WorkerReply,
    WorkersRuntimeConfig,
    launched_by_torchrun,
    open_store_from,
    recv_tensor,
    result_to_wire,
    send_tensor,
    sums_to_wire,
    worker_threads,
)
from roost.state import ClientStateStore
from roost.track.resources import peak_rss_mb, use_mmap_for_large_allocations

__all__ = ["local_worker", "worker_loop"]

Parts = tuple[Any, Any, Callable[[], torch.nn.Module]]


@dataclass
class _Worker:
    """What a worker computes with, once set up."""

    rank: int
    world_size: int
    options: WorkersRuntimeConfig
    transport: Transport
    device: torch.device
    buffer_device: torch.device
    runtime: Any  # LocalRuntime
    shared_store: ClientStateStore | None
    capture: CapturingAlgorithm
    relay: Any = None
    ring: ResultRing | None = None
    ring_state: str = "new"  # new, offered (to the server), accepted, refused
    payload_slots: SharedSlots | None = None  # the server's model versions
    payload_buffers: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def slow_down(self, t0: float) -> float:
        """This worker's emulated slowdown (``options.slowdown``); the busy seconds."""
        busy = time.perf_counter() - t0
        factors = self.options.slowdown
        if self.rank <= len(factors) and factors[self.rank - 1] > 1:
            time.sleep(busy * (factors[self.rank - 1] - 1))
            busy = time.perf_counter() - t0
        return busy


def _device_of(rank: int, options: WorkersRuntimeConfig) -> torch.device:
    slot = rank - 1
    if launched_by_torchrun():
        slot = worker_slot_on_node(rank, int(os.environ.get("LOCAL_RANK", rank)))
    return resolve_device(options.device, slot)


def _set_up(rank: int, world_size: int, setup: dict[str, Any], parts: Parts) -> _Worker:
    from roost.runtime.local import LocalRuntime, LocalRuntimeConfig

    options: WorkersRuntimeConfig = setup["runtime"]
    transport: Transport = setup["transport"]
    device = _device_of(rank, options)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL binds each rank to its current device
    buffer_device = device if transport.on_device else torch.device("cpu")
    torch.set_num_threads(worker_threads(options.threads, world_size))
    algorithm, dataset, build_module = parts
    capture = CapturingAlgorithm(algorithm, REFOLDABLE)
    shared_store = open_store_from(setup["store"]) if setup["store"] else None
    runtime = LocalRuntime(LocalRuntimeConfig(str(device)), sums_device=str(buffer_device))
    runtime.start(Job(cast(Any, capture), dataset, build_module, shared_store or ShippedStates({})))
    return _Worker(
        rank, world_size, options, transport, device, buffer_device, runtime, shared_store, capture
    )


# --------------------------------------------------------------------------- torchrun


def worker_loop(rank: int, world_size: int, init_method: str, cfg: WorkersRuntimeConfig) -> None:
    """A torchrun worker's life (ranks >= 1): join, receive the job's parts builder, then
    execute rounds until told to stop, every message by collective.

    ``cfg`` is this process's own reading of the runtime options, used only for the join
    timeout: everything else (device, threads, slowdown) comes from the server's options,
    sent at join, so that a torchrun node that cannot read the run's config file still
    computes as the server asked.
    """
    use_mmap_for_large_allocations()
    dist.init_process_group(
        BACKEND,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=cfg.timeout_s),
    )
    try:
        (setup,) = _recv_object()
        relay = _join_worker_group(world_size, setup["transport"])
        # After every collective of the join: a worker that fails from here on (a GPU
        # index this node lacks) is seen by the server at once, as a dead worker.
        worker = _set_up(rank, world_size, setup, setup["parts"]())
        worker.relay = relay
        while True:
            (message,) = _recv_object()
            if message is None:
                return
            _serve_round(worker, message)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- local


def local_worker(
    rank: int,
    world_size: int,
    cfg: WorkersRuntimeConfig,
    orders: Connection,
    results: Connection,
    parts: Callable[[], Parts] | None,
    close_fds: list[int],
) -> None:
    """A worker the server started (forked, forked by a forkserver, or spawned).

    It builds the job's parts from ``parts`` at once, while the server builds its own,
    then follows the orders of its pipe. Ctrl-C in the terminal reaches the whole process
    group, and only the server should answer it (it stops its workers), so the worker
    ignores SIGINT; it dies with the server (``PR_SET_PDEATHSIG`` on Linux, and the end
    of its pipe)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in close_fds:  # the server's ends of the pipes, inherited by a fork
        with contextlib.suppress(OSError):
            os.close(fd)
    _die_with_parent()
    _name_process(f"roost-worker-{rank}")
    torch.set_num_threads(worker_threads(cfg.threads, world_size))
    built: Parts | None = None
    failed: Exception | None = None
    try:
        built = parts() if parts is not None else None
    except Exception as e:  # raised if the server asks for these parts: it may fail first
        failed = e
    inbox = _Inbox(orders)
    outbox = _Outbox(results)
    try:
        message = inbox.get()
        if message[0] != "setup":
            return  # stopped before the run started
        setup = message[1]
        if setup["parts"] is not None:
            built = setup["parts"]()
        elif failed is not None:
            raise failed
        assert built is not None, "the server sent no parts to a worker started without"
        worker = _set_up(rank, world_size, setup, built)
        payloads: dict[int, Payload] = {}
        while True:
            message = inbox.get()
            kind = message[0]
            if kind == "stop":
                return
            if kind == "payload":
                payloads[message[1]] = message[2]
            elif kind == "drop":
                for version in message[1]:
                    payloads.pop(version, None)
            elif kind == "tasks":
                for seq, task in message[1]:
                    if inbox.stopping.is_set():
                        return
                    _stream_task(worker, seq, task, payloads, inbox, outbox)
            elif kind == "ring":
                worker.ring_state = "accepted" if message[1] else "refused"
            elif kind == "payload_slots":
                try:
                    worker.payload_slots = SharedSlots.open(*message[1])
                except OSError:
                    worker.payload_slots = None
                outbox.note(WorkerNote("payload_slots", worker.payload_slots is not None))
            elif kind == "payload_slot":
                _, version, slot, layout = message
                payloads[version] = _shared_payload(worker, version, slot, layout)
            elif kind == "collective":
                if not dist.is_initialized():
                    # rounds of model-sized sums: blocks of 1 MB and more are returned to
                    # the system when freed (peak memory). Not for streamed tasks: there
                    # it costs ~10% of a small model's training time, in page faults
                    use_mmap_for_large_allocations()
                    _join_group(worker, message[1])
                (order,) = _recv_object()
                _serve_round(worker, order)
            else:
                raise RuntimeError(f"unknown order {kind!r}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _shared_payload(
    worker: _Worker, version: int, slot: int, layout: list[tuple[str, str, tuple[int, ...]]]
) -> Payload:
    """The payload the server wrote in shared ``slot`` (views: no copy)."""
    assert worker.payload_slots is not None
    dtypes = [(getattr(torch, dtype), shape) for _, dtype, shape in layout]
    views = worker.payload_slots.views(slot, dtypes)
    tensors = dict(zip([name for name, _, _ in layout], views, strict=True))
    params = tensors.pop("params")
    return Payload(params, version, tensors)


def _join_group(worker: _Worker, address: tuple[str, int]) -> None:
    """Join the group of every rank (the server keeps its store), and for ``relay`` the
    workers' own group."""
    timeout = datetime.timedelta(seconds=worker.options.timeout_s)
    host, port = address
    store = dist.TCPStore(host, port, worker.world_size, is_master=False, timeout=timeout)
    dist.init_process_group(
        BACKEND, store=store, rank=worker.rank, world_size=worker.world_size, timeout=timeout
    )
    worker.relay = _join_worker_group(worker.world_size, worker.transport)


class _Inbox:
    """The server's orders, read by a thread of their own so that the server's writes
    never wait for the worker to finish a task (a payload is larger than a pipe holds).
    A payload's tensors follow its header as raw messages; they are received here into
    tensors, so the main thread gets ``("payload", version, Payload)``."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.stopping = threading.Event()
        threading.Thread(target=self._run, name="roost-orders", daemon=True).start()

    def get(self) -> tuple[Any, ...]:
        return self.queue.get()

    def _run(self) -> None:
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "payload":
                    _, version, layout = message
                    tensors = {
                        name: recv_tensor(self.conn, getattr(torch, dtype), shape)
                        for name, dtype, shape in layout
                    }
                    params = tensors.pop("params")
                    message = ("payload", version, Payload(params, version, tensors))
                elif message[0] == "stop":
                    break
                self.queue.put(message)
        except (EOFError, OSError):
            pass  # the server is gone
        self.stopping.set()
        self.queue.put(("stop",))


class _Outbox:
    """Results, written by a thread of their own when they carry tensors: the worker goes
    on to its next task while the server, busy with its event loop, has not read the last
    one yet. A result in the ring is a small message, written at once unless the thread
    is still writing an earlier result (the pipe keeps them in order)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.queue: queue.SimpleQueue[tuple[bytes, list[torch.Tensor]] | None] = queue.SimpleQueue()
        self.writing = threading.Lock()  # held while a result is written
        self.counting = threading.Lock()  # held while ``waiting`` changes
        self.waiting = 0  # results queued for the thread and not written yet
        threading.Thread(target=self._run, name="roost-results", daemon=True).start()

    def note(self, note: WorkerNote) -> None:
        self.put(note, [])

    def put(self, header: StreamResult | WorkerNote, tensors: list[torch.Tensor]) -> None:
        data = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
        with self.counting:
            direct = not tensors and not self.waiting and self.writing.acquire(blocking=False)
            if not direct:
                self.waiting += 1
                self.queue.put((data, tensors))
        if direct:  # nothing queued before it, and the thread is not writing
            try:
                self.conn.send_bytes(data)
            finally:
                self.writing.release()

    def _run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                header, tensors = item
                with self.writing:
                    self.conn.send_bytes(header)
                    for t in tensors:
                        send_tensor(self.conn, t)
                with self.counting:
                    self.waiting -= 1
        except OSError:
            pass  # the server is gone


RING_BYTES = 8 << 20
"""About how much shared memory a worker's :class:`ResultRing` takes (2 to 4 slots)."""


def _stream_task(
    worker: _Worker,
    seq: int,
    task: Task,
    payloads: dict[int, Payload],
    inbox: _Inbox,
    outbox: _Outbox,
) -> None:
    """Train one streamed task and send its result (one result: float32), in the
    worker's ring when the server took it, else on the pipe."""
    t0 = time.perf_counter()
    capture = worker.capture
    capture.last, capture.streaming = None, True
    try:
        outcome = worker.runtime.execute(
            [task], {task.version: payloads[task.version]}, 1, defer_state=True
        )
    finally:
        capture.streaming = False
    if outcome.requests or outcome.new_states or len(outcome.client_metrics) != 1:
        raise RuntimeError(
            f"client {task.client_id}'s task returned client state or a request to the "
            "server: such tasks are not streamed"
        )
    c = outcome.contributions[0]
    if capture.last is not None:
        header, tensors = result_to_wire(c, capture.last.tensors, copy=False)
    else:
        header, tensors = sums_to_wire(c)
    capture.last = None
    slot, offer = -1, None
    if worker.ring_state == "accepted":
        assert worker.ring is not None
        slot = worker.ring.put(tensors, inbox.stopping)
    elif worker.ring_state == "new":
        slot_bytes = ResultRing.slot_size(tensors)
        worker.ring = ResultRing.create(slot_bytes, max(2, min(4, RING_BYTES // slot_bytes)))
        worker.ring_state = "refused" if worker.ring is None else "offered"
        offer = worker.ring.offer() if worker.ring is not None else None
    if slot < 0:  # on the pipe, from another thread: copies (they may alias the model)
        tensors = [t.detach().to("cpu", copy=True) for t in tensors]
    busy = worker.slow_down(t0)
    ((_, metrics),) = outcome.client_metrics
    result = StreamResult(
        seq, header, dict(metrics), busy, peak_rss_mb(), str(worker.device), slot, offer
    )
    outbox.put(result, tensors if slot < 0 else [])


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that started it dies."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _name_process(name: str) -> None:
    """Linux: the name ``ps -o comm``, ``top`` and ``psutil.Process.name()`` show."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


# --------------------------------------------------------------------------- rounds


def _serve_round(worker: _Worker, order: RoundOrder) -> None:
    """One collective round: receive the payloads, train this worker's share, reply."""
    payloads = _recv_payloads(order, worker.payload_buffers, worker.relay, worker.buffer_device)
    shared_store = worker.shared_store
    if order.defer_state:  # the server commits each state when its task is delivered
        store: ClientStateStore = ShippedStates(order.shipped_states or {}, shared_store)
    else:
        store = shared_store or ShippedStates(order.shipped_states or {})
    runtime = worker.runtime
    runtime.use_state_store(store)
    t0 = time.perf_counter()
    runtime.discard(order.discard)
    answers = {key: payloads[v] for key, v in order.answers.items()}
    # deferred or not, new states go to ``store`` (collected there when deferred)
    outcome = runtime.execute(
        order.assignments[worker.rank - 1], payloads, order.num_groups, answers=answers
    )
    busy = worker.slow_down(t0)
    if shared_store is not None and not order.defer_state:
        shared_store.flush()  # durable before the server commits the round
    new_states = store.new if isinstance(store, ShippedStates) else {}
    _send_reply(
        order, busy, outcome, new_states, worker.relay, worker.buffer_device, str(worker.device)
    )


def _join_worker_group(world_size: int, transport: Transport) -> Any:
    """The workers' own group for ``relay`` (every rank, the server too, must call
    ``new_group``), or None for ``star``."""
    if transport.topology != "relay":
        return None
    return dist.new_group(ranks=list(range(1, world_size)), backend=transport.worker_backend)


def _recv_object() -> list[Any]:
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    return box


def _recv_payloads(
    order: RoundOrder,
    buffers: dict[tuple[int, str], torch.Tensor],
    relay: Any,
    device: torch.device,
) -> dict[int, Payload]:
    """Star: each tensor arrives by the server's broadcast. Relay: worker 1 (global rank
    1) receives it from the server and broadcasts it over the workers' group."""
    payloads: dict[int, Payload] = {}
    for version, layout in sorted(order.payload_layout.items()):
        tensors: Tensors = {}
        for name, numel in layout:
            key = (0, name)  # one buffer per name, reused round after round
            buf = buffers.get(key)
            if buf is None or buf.numel() != numel or len(order.payload_layout) > 1:
                buf = torch.empty(numel, dtype=torch.float32, device=device)
                if len(order.payload_layout) == 1:
                    buffers[key] = buf
            if relay is None:
                dist.broadcast(buf, src=0)
            else:
                if dist.get_rank() == RELAY_RANK:
                    _recv_from_server(buf)
                dist.broadcast(buf, src=RELAY_RANK, group=relay)
            tensors[name] = buf
        params = tensors.pop("params")
        payloads[version] = Payload(params, version, tensors)
    return payloads


def _recv_from_server(buf: torch.Tensor) -> None:
    if buf.device.type == "cpu":
        dist.recv(buf, src=0)
    else:  # the server's group is gloo: stage in host memory
        staging = torch.empty(buf.shape, dtype=buf.dtype)
        dist.recv(staging, src=0)
        buf.copy_(staging)


def _send_reply(
    order: RoundOrder,
    busy_s: float,
    outcome: Outcome,
    new_states: dict[int, Tensors],
    relay: Any,
    device: torch.device,
    trained_on: str,
) -> None:
    """Star: each sum is reduced straight to the server. Relay: the sums are reduced over
    the workers' group to worker 1, which sends the total to the server. ``device``
    holds the sums (the transport's), ``trained_on`` names the worker's compute device."""
    if order.num_groups == 1:
        contribution = outcome.contributions[0]
        header = SumHeader.of(contribution)
        reply = WorkerReply(
            busy_s,
            outcome.client_metrics,
            peak_rss_mb(),
            trained_on,
            header,
            new_states=new_states,
            requests=outcome.requests,
        )
        dist.gather_object(reply, None, dst=0)
        (layout,) = _recv_object()
        for name, numel in layout:  # each sum in place: no packed copy of the model
            t = contribution.sums.get(name)
            if t is None:
                t = torch.zeros(numel, dtype=torch.float64, device=device)
            t = t.reshape(-1)
            if relay is None:
                dist.reduce(t, dst=0, op=dist.ReduceOp.SUM)
            else:
                dist.reduce(t, dst=RELAY_RANK, op=dist.ReduceOp.SUM, group=relay)
                if dist.get_rank() == RELAY_RANK:
                    dist.send(t.cpu(), dst=0)
    else:  # whole contributions by gather, pickled compactly (one result: float32)
        reply = WorkerReply(
            busy_s,
            outcome.client_metrics,
            peak_rss_mb(),
            trained_on,
            None,
            [PackedContribution.of(c) for c in outcome.contributions],
            new_states,
            outcome.requests,
        )
        dist.gather_object(reply, None, dst=0)
