"""The compute floor of W1 (shared/bench/WORKLOADS.md): plain PyTorch, no framework.

One process, one model: for each round, for each sampled client in order, load the global
weights, run one local epoch (minibatches of 20 in generation order, SGD lr 0.05), add
n_i * weights to a running sum; the new global weights are the sum over the total n.
Evaluated once, after the last round, on the 2,000-sample test set.

The SGD step is written out (``p -= lr * grad``) rather than taken from ``torch.optim``:
the first ``Optimizer.step`` imports ``torch._dynamo``, about a second of work that is not
compute, and the floor is meant to be the least work a sequential simulator can do.

This file deliberately imports nothing from Roost: it is written from WORKLOADS.md alone,
so that agreement with Roost's W1 checks both.

Run: ``python benchmarks/w1_floor.py --model mlp`` prints one JSON line.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
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
    clients_per_round: int = 100,
    rounds: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    sizes = _sizes(seed, clients)
    proto = np.random.default_rng([seed, 1]).standard_normal((10, 28, 28)).astype(np.float32)
    torch.manual_seed(seed)
    net = _build(model)
    params = list(net.parameters())
    global_w = [p.detach().clone() for p in params]
    for r in range(1, rounds + 1):
        cohort = np.random.default_rng([seed, 4, r]).choice(
            clients, size=clients_per_round, replace=False
        )
        sums = [torch.zeros_like(p) for p in params]
        total = 0
        for i in cohort:
            n = int(sizes[i])
            x_np, y_np = _client(seed, int(i), n, proto)
            x, y = _shape(x_np, model), torch.from_numpy(y_np)
            with torch.no_grad():
                for p, g in zip(params, global_w, strict=True):
                    p.copy_(g)
            for s in range(0, n, 20):
                F.cross_entropy(net(x[s : s + 20]), y[s : s + 20]).backward()
                with torch.no_grad():
                    for p in params:
                        p.add_(p.grad, alpha=-0.05)  # type: ignore[arg-type]
                        p.grad = None
            with torch.no_grad():
                for acc, p in zip(sums, params, strict=True):
                    acc.add_(p, alpha=n)
            total += n
        global_w = [acc / total for acc in sums]
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
    return {"final_loss": loss, "final_accuracy": acc}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--clients-per-round", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = run_floor(a.model, a.clients, a.clients_per_round, a.rounds, a.seed)
    out["wall_s"] = time.perf_counter() - _T0
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
