"""A worker process of the ``workers`` runtime: join, rebuild the run, train rounds.

See :mod:`roost.runtime.workers` for the protocol of a round."""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from roost.algorithms.base import Payload
from roost.runtime.base import Job, Outcome
from roost.runtime.workers_protocol import (
    BACKEND,
    RoundOrder,
    ShippedStates,
    SumHeader,
    Tensors,
    WorkerReply,
    WorkersRuntimeConfig,
    open_store_from,
)
from roost.track.resources import peak_rss_mb, use_mmap_for_large_allocations

__all__ = ["worker_loop"]


def worker_loop(rank: int, world_size: int, init_method: str, cfg: WorkersRuntimeConfig) -> None:
    """A worker's life: join, receive the run config, then execute rounds until told to
    stop. Called in spawned processes and, under torchrun, by ranks >= 1."""
    from roost.build import build_parts
    from roost.config import resolve
    from roost.runtime.local import LocalRuntime

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
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // max(1, world_size - 1))
        torch.set_num_threads(threads)
        parts = build_parts(resolve(setup["config"]))
        shared_store = open_store_from(setup["store"]) if setup["store"] else None
        runtime = LocalRuntime()
        runtime.start(
            Job(
                parts.algorithm,
                parts.dataset,
                parts.build_module,
                shared_store or ShippedStates({}),
            )
        )
        payload_buffers: dict[tuple[int, str], torch.Tensor] = {}
        while True:
            (message,) = _recv_object()
            if message is None:
                return
            order: RoundOrder = message
            payloads = _recv_payloads(order, payload_buffers)
            store = shared_store or ShippedStates(order.shipped_states or {})
            runtime.use_state_store(store)
            t0 = time.perf_counter()
            outcome = runtime.execute(order.assignments[rank - 1], payloads, order.num_groups)
            busy = time.perf_counter() - t0
            if rank <= len(cfg.slowdown) and cfg.slowdown[rank - 1] > 1:
                time.sleep(busy * (cfg.slowdown[rank - 1] - 1))
                busy = time.perf_counter() - t0
            if shared_store is not None:
                shared_store.flush()  # durable before the server commits the round
            new_states = store.new if isinstance(store, ShippedStates) else {}
            _send_reply(order, busy, outcome, new_states)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _recv_object() -> list[Any]:
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    return box


def _recv_payloads(
    order: RoundOrder, buffers: dict[tuple[int, str], torch.Tensor]
) -> dict[int, Payload]:
    payloads: dict[int, Payload] = {}
    for version, layout in sorted(order.payload_layout.items()):
        tensors: Tensors = {}
        for name, numel in layout:
            key = (0, name)  # one buffer per name, reused round after round
            buf = buffers.get(key)
            if buf is None or buf.numel() != numel or len(order.payload_layout) > 1:
                buf = torch.empty(numel, dtype=torch.float32)
                if len(order.payload_layout) == 1:
                    buffers[key] = buf
            dist.broadcast(buf, src=0)
            tensors[name] = buf
        params = tensors.pop("params")
        payloads[version] = Payload(params, version, tensors)
    return payloads


def _send_reply(
    order: RoundOrder, busy_s: float, outcome: Outcome, new_states: dict[int, Tensors]
) -> None:
    if order.num_groups == 1:
        contribution = outcome.contributions[0]
        header = SumHeader.of(contribution)
        reply = WorkerReply(
            busy_s, outcome.client_metrics, peak_rss_mb(), header, new_states=new_states
        )
        dist.gather_object(reply, None, dst=0)
        (layout,) = _recv_object()
        for name, numel in layout:  # each sum in place: no packed copy of the model
            t = contribution.sums.get(name)
            if t is None:
                t = torch.zeros(numel, dtype=torch.float64)
            dist.reduce(t.reshape(-1), dst=0, op=dist.ReduceOp.SUM)
    else:
        reply = WorkerReply(
            busy_s,
            outcome.client_metrics,
            peak_rss_mb(),
            None,
            outcome.contributions,
            new_states,
        )
        dist.gather_object(reply, None, dst=0)
