"""A worker process of the ``workers`` runtime: join, build the job's parts, train tasks.

See :mod:`roost.runtime.workers` for the protocol of a round."""

from __future__ import annotations

import datetime
import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

from roost.algorithms.base import Payload
from roost.runtime.base import Job, Outcome
from roost.runtime.device import resolve_device, worker_slot_on_node
from roost.runtime.workers_protocol import (
    BACKEND,
    RELAY_RANK,
    RoundOrder,
    ShippedStates,
    SumHeader,
    Tensors,
    Transport,
    WorkerReply,
    WorkersRuntimeConfig,
    launched_by_torchrun,
    open_store_from,
)
from roost.state import ClientStateStore
from roost.track.resources import peak_rss_mb, use_mmap_for_large_allocations

__all__ = ["spawned_worker", "worker_loop"]


def spawned_worker(rank: int, world_size: int, init_method: str, cfg: WorkersRuntimeConfig) -> None:
    """The entry point of a worker process the server spawned: Ctrl-C in the terminal
    reaches the whole process group, and only the server should answer it (it kills its
    workers), so the worker ignores SIGINT instead of printing a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_loop(rank, world_size, init_method, cfg)


def worker_loop(rank: int, world_size: int, init_method: str, cfg: WorkersRuntimeConfig) -> None:
    """A worker's life: join, receive the job's parts builder, then execute batches until
    told to stop. Called in spawned processes and, under torchrun, by ranks >= 1.

    ``cfg`` is this process's own reading of the runtime options, used only for the join
    timeout: everything else (device, threads, slowdown) comes from the server's options,
    sent at join, so that a torchrun node that cannot read the run's config file still
    computes as the server asked.
    """
    from roost.runtime.local import LocalRuntime, LocalRuntimeConfig

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
        transport: Transport = setup["transport"]
        relay = _join_worker_group(world_size, transport)
        # After every collective of the join: a worker that fails from here on (a GPU
        # index this node lacks) is seen by the server at once, as a dead worker.
        options: WorkersRuntimeConfig = setup["runtime"]
        slot = rank - 1
        if launched_by_torchrun():
            slot = worker_slot_on_node(rank, int(os.environ.get("LOCAL_RANK", rank)))
        device = resolve_device(options.device, slot)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds each rank to its current device
        buffer_device = device if transport.on_device else torch.device("cpu")
        threads = options.threads or max(1, (os.cpu_count() or 1) // max(1, world_size - 1))
        torch.set_num_threads(threads)
        algorithm, dataset, build_module = setup["parts"]()
        shared_store = open_store_from(setup["store"]) if setup["store"] else None
        runtime = LocalRuntime(LocalRuntimeConfig(str(device)), sums_device=str(buffer_device))
        runtime.start(Job(algorithm, dataset, build_module, shared_store or ShippedStates({})))
        payload_buffers: dict[tuple[int, str], torch.Tensor] = {}
        while True:
            (message,) = _recv_object()
            if message is None:
                return
            order: RoundOrder = message
            payloads = _recv_payloads(order, payload_buffers, relay, buffer_device)
            if order.defer_state:  # the server commits each state when its task is delivered
                store: ClientStateStore = ShippedStates(order.shipped_states or {}, shared_store)
            else:
                store = shared_store or ShippedStates(order.shipped_states or {})
            runtime.use_state_store(store)
            t0 = time.perf_counter()
            runtime.discard(order.discard)
            answers = {key: payloads[v] for key, v in order.answers.items()}
            # deferred or not, new states go to ``store`` (collected there when deferred)
            outcome = runtime.execute(
                order.assignments[rank - 1], payloads, order.num_groups, answers=answers
            )
            busy = time.perf_counter() - t0
            if rank <= len(options.slowdown) and options.slowdown[rank - 1] > 1:
                time.sleep(busy * (options.slowdown[rank - 1] - 1))
                busy = time.perf_counter() - t0
            if shared_store is not None and not order.defer_state:
                shared_store.flush()  # durable before the server commits the round
            new_states = store.new if isinstance(store, ShippedStates) else {}
            _send_reply(order, busy, outcome, new_states, relay, buffer_device, str(device))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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
    else:  # whole contributions by gather, pickled: in host memory
        host = torch.device("cpu")
        reply = WorkerReply(
            busy_s,
            outcome.client_metrics,
            peak_rss_mb(),
            trained_on,
            None,
            [c.to(host) for c in outcome.contributions],
            new_states,
            outcome.requests,
        )
        dist.gather_object(reply, None, dst=0)
