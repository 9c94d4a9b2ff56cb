"""Two torchrun "nodes" on one machine (loopback rendezvous) run one workers-runtime job.

Each node is its own ``torchrun --nnodes=2 --node-rank=K`` launch with 2 processes, as it
would be on two machines: global rank 0 (node 0) is the server and writes the run
directory, ranks 1-3 are workers. The run must match the local runtime (see
test_workers_parity.py for the tolerance), in both topologies: ``relay`` makes the
workers' own group span the two nodes, as NCCL's does on a GPU cluster.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from roost.config import apply_overrides, load_config_source, resolve
from roost.runner import run

OVERRIDES = ["rounds=2", "clients=20", "clients_per_round=6", "model.hidden=16"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("topology", ["star", "relay"])
def test_two_node_torchrun_matches_local(tmp_path, topology):
    port = _port()
    out = tmp_path / "cluster"
    nodes = []
    for node_rank in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node-rank={node_rank}",
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
            "roost",
            "run",
            "quickstart",
            *OVERRIDES,
            "runtime=workers",
            f"runtime.topology={topology}",
            "--out",
            str(out),
            "--quiet",
        ]
        nodes.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    for p in nodes:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["worker_busy_s"]) for r in records] == [3, 3]  # 4 processes: 1 server

    run(resolve(apply_overrides(load_config_source("quickstart"), OVERRIDES)), tmp_path / "local")
    a = torch.load(out / "checkpoint.pt", weights_only=True)["strategy"]["params"]
    b = torch.load(tmp_path / "local" / "checkpoint.pt", weights_only=True)["strategy"]["params"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
