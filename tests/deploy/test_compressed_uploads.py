"""Compressed updates travel compressed (issue 9, item 2): a node sends the compressor's
message itself, the server rebuilds the update from it before acknowledging, refuses a
message that is not exactly what the task's compressor sends, and counts the real bytes.

The sizes are derived by hand from :mod:`roost.compression.wire`'s layout. The served
model is ``mlp`` with one hidden layer of 16 on digits: ``n = 64·16 + 16 + 16·10 + 10 =
1,210`` parameters. Top-k with ratio 0.1 keeps ``k = ⌈121.0⌉ = 121``; the kept positions
as uint16 would take 242 bytes, the bitmap ``⌈1210/8⌉ = 152``, so the bitmap is sent; the
values are 121 float32 (484 bytes); with the 32-byte header a message is ``32 + 152 + 484
= 668`` bytes, against ``4 · 1210 = 4,840`` uncompressed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

from _deploy_helpers import FAST
from _serving import SMALL, serve_to_nodes

from roost.algorithms import FedAvg, FedAvgConfig
from roost.algorithms.base import ClientResult, Payload
from roost.clock import WallClock
from roost.compression import Compressed, CompressionConfig
from roost.compression.compressors import topk
from roost.deploy.auth import AllowList, NodeKey, Verifier
from roost.deploy.client import ClientConfig, NodeClient
from roost.deploy.coordinator import (
    ENCODED_UPLOAD,
    EngineCoordinator,
    ResultRefused,
    result_from_wire,
    result_to_wire,
)
from roost.deploy.errors import NonFinite
from roost.deploy.protocol import Result
from roost.deploy.server import DeployServer
from roost.deploy.tensors import Encoded
from roost.engine.flight import Flight
from roost.runner import run
from roost.runtime.base import Task
from roost.system.model import TaskTiming
from roost.track.rundir import RunDir

N = 1210
MESSAGE_BYTES = 668  # 32 header + 152 bitmap + 121 · 4 values (module docstring)


def _compressed_fedavg() -> Compressed:
    return Compressed(FedAvg(FedAvgConfig(lr=0.1)), CompressionConfig(method="topk", ratio=0.1))


def _a_compressed_result(version: int = 3) -> tuple[ClientResult, Payload, bytes]:
    """What Compressed returns for a trained model: ``params = w + decode(message)``,
    with the message kept in ``encoded``."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N, generator=g)
    delta = torch.randn(N, generator=g)
    message = topk(0.1).encode(delta)
    received = base + topk(0.1).decode(message)
    return (
        ClientResult({"params": received}, 2.0, {}, {"params": message}),
        Payload(base, version),
        message,
    )


def test_a_compressed_result_travels_as_its_message_and_is_rebuilt_exactly() -> None:
    result, payload, message = _a_compressed_result()
    assert len(message) == MESSAGE_BYTES
    wire = result_to_wire("t1", result, {"train_loss": 0.5}, 1.0)
    assert wire.tensors["params"] == Encoded(ENCODED_UPLOAD, message)
    rebuilt, metrics, _ = result_from_wire(wire, payload, _compressed_fedavg().decode_upload)
    # the server's w + decode(message) is the client's, bit for bit
    assert torch.equal(rebuilt.tensors["params"], result.tensors["params"])
    assert rebuilt.weight == 2.0 and metrics == {"train_loss": 0.5}


def test_over_grpc_the_server_receives_the_message_bytes_and_delivers_the_rebuilt_model() -> None:
    """A node pushes a compressed result to a real server: the delivery the engine takes
    holds ``w + decode(message)`` and counts the 668 bytes the tensors took on the wire
    (the server's own count of the chunks it received, not a prediction)."""
    result, payload, _ = _a_compressed_result(version=0)
    clock = WallClock()
    coordinator = EngineCoordinator(clock, 1, decode_upload=_compressed_fedavg().decode_upload)
    key = NodeKey.generate("node-0")
    allow = AllowList({key.node_id: key.public_bytes})
    with DeployServer(coordinator, Verifier(allow)) as server:
        client = NodeClient(
            server.address, key, properties={"client_id": 0}, config=ClientConfig(backoff=FAST)
        )
        client.register()
        task = Task(0, 1, 0, 7, key=1)
        coordinator.send(Flight(1, task, TaskTiming(0.0, 0.0, 0.0, 1.0), 1, 10, 0, 0), payload)
        wire_task = client.pull_task()
        assert wire_task is not None and wire_task.task_id.endswith("-1")
        ack = client.push_result(result_to_wire(wire_task.task_id, result, {}, 0.1))
        assert ack.accepted, ack
        delivery = coordinator.take(1)
        client.close()
    assert delivery is not None
    assert delivery.upload_bytes == MESSAGE_BYTES
    assert torch.equal(delivery.result.tensors["params"], result.tensors["params"])


def _refusal(message: bytes, codec: str = ENCODED_UPLOAD, decoder: object = None) -> str:
    _, payload, _ = _a_compressed_result()
    wire = Result("t1", {"params": Encoded(codec, message)}, 1.0, {})
    decode = _compressed_fedavg().decode_upload if decoder is None else decoder
    with pytest.raises((ResultRefused, NonFinite)) as caught:
        result_from_wire(wire, payload, decode)  # type: ignore[arg-type]
    return str(caught.value)


def test_a_message_that_is_not_the_tasks_compressors_is_refused_naming_why() -> None:
    _, _, message = _a_compressed_result()
    assert "667 bytes; topk(ratio=0.1) sends 668" in _refusal(message[:-1])
    assert "669 bytes" in _refusal(message + b"\0")
    corrupt = bytearray(message)
    corrupt[100] ^= 0xFF  # a bitmap byte: the CRC no longer matches
    assert "CRC" in _refusal(bytes(corrupt))
    assert "arrived encoded as 'zlib'" in _refusal(message, codec="zlib")
    # an algorithm whose uploads are plain tensors takes no encoded tensor at all
    plain = FedAvg(FedAvgConfig(lr=0.1)).decode_upload
    assert "FedAvg uploads plain float32 tensors" in _refusal(message, decoder=plain)
    # the message of another model's size: 1,000 parameters keep 100 (32 + 125 + 400)
    other = topk(0.1).encode(torch.randn(1000))
    assert "557 bytes; topk(ratio=0.1) sends 668" in _refusal(other)


def test_a_message_that_decodes_to_nan_is_refused() -> None:
    """Top-k keeps the largest magnitudes; a NaN among the values is sent as float32."""
    delta = torch.zeros(N)
    delta[:121] = float("nan")
    assert "NaN or Inf" in _refusal(topk(0.1).encode(delta))


def _bytes_up(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [int(json.loads(line)["bytes_up"]) for line in lines]


def test_a_served_compressed_run_counts_the_messages_bytes_and_ends_on_the_simulated_model(
    tmp_path: Path,
) -> None:
    """FedAvg with top-k 0.1, 4 clients a round for 3 rounds: each round uploads 4
    messages of 668 bytes (measured on the wire by the server, and predicted by the
    simulation), and the served model is the simulated one (folded in arrival order, so
    to 1e-6 as in test_same_code)."""
    tree = {**SMALL, "compression": {"name": "topk", "ratio": 0.1}}
    run(tree, tmp_path / "sim")
    out, trained = serve_to_nodes(tree, tmp_path, min_nodes=4)
    assert trained == {0: 3, 1: 3, 2: 3, 3: 3}
    assert _bytes_up(out) == [4 * MESSAGE_BYTES] * 3
    assert _bytes_up(tmp_path / "sim") == [4 * MESSAGE_BYTES] * 3
    got = RunDir(out).load_checkpoint()["strategy"]["params"]
    want = RunDir(tmp_path / "sim").load_checkpoint()["strategy"]["params"]
    assert got.numel() == N
    assert (got - want).abs().max().item() <= 1e-6
