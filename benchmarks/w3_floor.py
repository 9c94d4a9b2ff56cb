"""The floor of W3 (shared/bench/WORKLOADS.md): asynchronous FedBuff, plain PyTorch.

The least a sequential asynchronous simulator can do: a heap of arrivals in plain Python;
each task is trained when it arrives, from a snapshot of its starting version (one
snapshot per version that still has tasks in flight); its delta, weighted by
``1/sqrt(1 + staleness)``, goes into the buffer; every K = 10 deltas the server adds
their sum over K; after each arrival (and its step) one idle client is dispatched from
the current version. The run ends after the 50th server step; tasks still in flight are
never trained. Evaluated once, at the end, on W1's 2,000-sample test set.

This file deliberately imports nothing from Roost: it is written from WORKLOADS.md alone,
so that agreement with Roost's ``w3`` preset checks both.

Run: ``python benchmarks/w3_floor.py --model mlp`` prints one JSON line.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import heapq  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def _sizes(seed: int, clients: int) -> np.ndarray:
    raw = np.random.default_rng([seed, 0]).lognormal(mean=math.log(50), sigma=0.5, size=clients)
    return np.clip(raw, 10, 200).astype(np.int64)


def _client(seed: int, i: int, n: int, proto: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 2, i])
    mix = rng.dirichlet(0.5 * np.ones(10))
    y = rng.choice(10, size=n, p=mix)
    x = (proto[y] + rng.standard_normal((n, 28, 28))).astype(np.float32)
    return x, y


def _build(model: str) -> nn.Module:
    if model == "mlp":
        return nn.Sequential(
            nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10)
        )
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3136, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


def _shape(x: np.ndarray, model: str) -> torch.Tensor:
    t = torch.from_numpy(x)
    return t.reshape(len(x), 784) if model == "mlp" else t.reshape(len(x), 1, 28, 28)


def run_floor(
    model: str = "mlp",
    clients: int = 1000,
    concurrency: int = 100,
    buffer_size: int = 10,
    steps: int = 50,
    seed: int = 0,
) -> dict[str, float]:
    sizes = _sizes(seed, clients)
    proto = np.random.default_rng([seed, 1]).standard_normal((10, 28, 28)).astype(np.float32)
    speed = np.random.default_rng([seed, 5]).lognormal(0.0, 1.0, size=clients)
    duration = sizes * 0.01 / speed
    torch.manual_seed(seed)
    net = _build(model)
    params = list(net.parameters())
    version = 0
    snapshots = {0: [p.detach().clone() for p in params]}
    users = {0: 0}  # tasks in flight per version
    heap: list[tuple[float, int, int, int]] = []  # (arrival, dispatch order, client, version)
    in_flight: set[int] = set()
    order = 0

    def dispatch(t: float, client: int) -> None:
        nonlocal order
        if version not in snapshots:
            snapshots[version] = [g.clone() for g in global_w]
            users[version] = 0
        users[version] += 1
        heapq.heappush(heap, (t + float(duration[client]), order, client, version))
        order += 1
        in_flight.add(client)

    global_w = snapshots[0]
    for i in np.random.default_rng([seed, 4, 1]).choice(clients, size=concurrency, replace=False):
        dispatch(0.0, int(i))
    buffer = [torch.zeros_like(p) for p in params]
    buffered, done, j = 0, 0, 0
    staleness: list[int] = []
    while done < steps:
        t, _, i, v = heapq.heappop(heap)
        in_flight.discard(i)
        n = int(sizes[i])
        x_np, y_np = _client(seed, i, n, proto)
        x, y = _shape(x_np, model), torch.from_numpy(y_np)
        start = snapshots[v]
        with torch.no_grad():
            for p, g in zip(params, start, strict=True):
                p.copy_(g)
        for s in range(0, n, 20):
            F.cross_entropy(net(x[s : s + 20]), y[s : s + 20]).backward()
            with torch.no_grad():
                for p in params:
                    p.add_(p.grad, alpha=-0.05)  # type: ignore[arg-type]
                    p.grad = None
        tau = version - v
        staleness.append(tau)
        with torch.no_grad():
            for b, p, g in zip(buffer, params, start, strict=True):
                b.add_(p - g, alpha=1.0 / math.sqrt(1.0 + tau))
        users[v] -= 1
        if users[v] == 0 and v != version:
            del snapshots[v], users[v]
        buffered += 1
        if buffered == buffer_size:
            global_w = [g + b / buffer_size for g, b in zip(global_w, buffer, strict=True)]
            version += 1
            done += 1
            buffer = [torch.zeros_like(p) for p in params]
            buffered = 0
            if users.get(version - 1) == 0:
                del snapshots[version - 1], users[version - 1]
        if done == steps:
            break
        j += 1
        idle = sorted(set(range(clients)) - in_flight)
        dispatch(t, idle[int(np.random.default_rng([seed, 6, j]).integers(len(idle)))])
    rng = np.random.default_rng([seed, 3])
    y_test = rng.integers(0, 10, 2000)
    x_test = (proto[y_test] + rng.standard_normal((2000, 28, 28))).astype(np.float32)
    with torch.no_grad():
        for p, g in zip(params, global_w, strict=True):
            p.copy_(g)
        net.eval()
        logits = net(_shape(x_test, model))
        yt = torch.from_numpy(y_test)
        loss = float(F.cross_entropy(logits, yt))
        acc = float((logits.argmax(1) == yt).float().mean())
    return {
        "final_loss": loss,
        "final_accuracy": acc,
        "arrivals": len(staleness),
        "mean_staleness": float(np.mean(staleness)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1) if a.model == "mlp" else None
    out = run_floor(a.model, seed=a.seed)
    out["wall_s"] = time.perf_counter() - _T0
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
