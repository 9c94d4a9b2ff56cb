"""Tasks, results, mid-task requests and heartbeats through a real gRPC server on loopback."""

from __future__ import annotations

import dataclasses
import math

import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

import torch
from _deploy_helpers import (
    Federation,
    RecordingCoordinator,
    client,
    running_server,
    spec,
)

from roost.deploy.client import RemoteRefusal
from roost.deploy.protocol import Answer, RequestKind, Result
from roost.deploy.tensors import DEFAULT_CHUNK_BYTES, Encoded, TensorSpec

MiB = 1 << 20
CNN_PARAMS = 1_663_370  # the FedAvg CNN on 28x28x1, 10 classes (roost.models.cnn)


def varint_len(n: int) -> int:
    return max(1, math.ceil(n.bit_length() / 7))


def chunk_frame_bytes(index: int, offset: int, size: int) -> int:
    """The serialized size of one chunk frame by protobuf's encoding rules: field 1
    ``protocol_version = 1`` (2 bytes), field 3 ``chunk`` (tag, length, body); the body has
    ``tensor_index`` and ``offset`` (omitted when 0, as proto3 does) and ``data``."""
    body = (1 + varint_len(index) if index else 0) + (1 + varint_len(offset) if offset else 0)
    body += 1 + varint_len(size) + size
    return 2 + 1 + varint_len(body) + body


def expected_chunks(nbytes: int) -> list[tuple[int, int]]:
    return [
        (o, min(DEFAULT_CHUNK_BYTES, nbytes - o)) for o in range(0, nbytes, DEFAULT_CHUNK_BYTES)
    ]


def cnn_params() -> torch.Tensor:
    from roost.data.base import DatasetInfo
    from roost.models.cnn import CNN, CNNConfig

    torch.manual_seed(0)
    model = CNN(CNNConfig(), DatasetInfo((28, 28), 10))
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    assert flat.numel() == CNN_PARAMS
    return flat


@pytest.mark.parametrize(
    "numel, nbytes, nchunks",
    [
        # the 6.6 MB CNN: 1,663,370 float32 = 6,653,480 bytes = 6 chunks of 1 MiB + 362,024
        (CNN_PARAMS, 6_653_480, 7),
        # a 50 MB model: 12,500,000 float32 = 50,000,000 bytes = 47 chunks of 1 MiB + 716,928
        (12_500_000, 50_000_000, 48),
    ],
    ids=["cnn-6.6MB", "50MB"],
)
def test_a_model_larger_than_the_grpc_limit_travels_bit_exact_both_ways(numel, nbytes, nchunks):
    """gRPC's default message limit is 4 MiB and the server sets exactly that; the model
    crosses it because it is chunked, and the byte counts are what the chunks carry."""
    if numel == CNN_PARAMS:
        params = cnn_params()
    else:
        params = torch.randn(numel, generator=torch.Generator().manual_seed(1))
    assert 4 * params.numel() == nbytes
    fed, coord = Federation(), RecordingCoordinator()
    result_spec = {"params": TensorSpec("float32", (numel,))}
    coord.add("alice", spec("t-big", {"params": params}, result_spec))
    with running_server(coord, fed) as server:
        assert server.servicer.config.max_message_bytes == 4 * MiB
        with client(server, fed.alice) as node:
            task = node.pull_task()
            assert task is not None
            got = task.payload["params"]
            assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
            assert torch.equal(got, params)  # bit-exact
            assert task.wire.payload_bytes == nbytes
            assert task.wire.chunks == nchunks > 1
            chunk_bytes = sum(chunk_frame_bytes(0, o, s) for o, s in expected_chunks(nbytes))
            header_bytes = task.wire.message_bytes - chunk_bytes
            assert 0 < header_bytes < 200  # ids, version, seed, one manifest entry

            update = got * 0.5 - 1.0
            ack = node.push_result(Result("t-big", {"params": update}, 10.0, {"loss": 0.25}))
    assert ack.accepted and not ack.duplicate
    assert len(coord.accepted) == 1
    node_id, result = coord.accepted[0]
    assert node_id == "alice"
    assert torch.equal(result.tensors["params"], update)  # type: ignore[arg-type]
    assert (result.weight, dict(result.metrics)) == (10.0, {"loss": 0.25})
    # the node sends in the chunks the server asks (64 KiB: see ServerConfig), not 1 MiB
    upload_chunk = server.servicer.config.upload_chunk_bytes
    assert upload_chunk == 64 << 10
    assert result.wire.payload_bytes == nbytes
    assert result.wire.chunks == math.ceil(nbytes / upload_chunk)


def test_task_fields_and_typed_settings_arrive_as_sent():
    fed, coord = Federation(), RecordingCoordinator()
    payload = {
        "params": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "control": torch.tensor([1.5, -2.0], dtype=torch.float64),
        "mask": torch.tensor([0, 1, 255], dtype=torch.uint8),
        "half": torch.tensor([0.5, 1.0], dtype=torch.bfloat16),
        "empty": torch.zeros(0, dtype=torch.int64),
    }
    settings = {"epochs": 2, "lr": 0.05, "shuffle": False, "optimizer": "sgd", "big": -(2**62)}
    task_spec = spec("t-1", payload, client_id=42, model_version=9, seed=2**40, round=3)
    task_spec = dataclasses.replace(task_spec, settings=settings)
    coord.add("alice", task_spec)
    with running_server(coord, fed) as server, client(server, fed.alice, num_examples=600) as node:
        task = node.pull_task()
    assert task is not None
    assert (task.task_id, task.client_id, task.model_version, task.seed, task.round) == (
        "t-1",
        42,
        9,
        2**40,
        3,
    )
    assert task.settings == settings
    assert all(type(task.settings[k]) is type(v) for k, v in settings.items())  # typed
    assert list(task.payload) == list(payload)
    for name, t in payload.items():
        got = task.payload[name]
        assert isinstance(got, torch.Tensor)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
    assert [n.num_examples for n in coord.registered] == [600]


def test_a_compressed_update_travels_as_its_bytes_and_is_counted_by_them():
    """A top-k (10%) 8-bit QSGD message of a 100,000-float update: its length is
    ``Compressor.nbytes(n)``, and that, not 400,000 bytes, is what crosses the wire."""
    from roost.compression.compressors import topk_qsgd

    n = 100_000
    comp = topk_qsgd(ratio=0.1, bits=8)
    delta = torch.randn(n, generator=torch.Generator().manual_seed(3))
    message = comp.encode(delta, torch.Generator().manual_seed(4))
    assert len(message) == comp.nbytes(n) < 4 * n // 3
    fed, coord = Federation(), RecordingCoordinator()
    codec = "roost.compression.wire"
    coord.add("alice", spec("t-c", {"params": torch.zeros(n)}, {"delta": TensorSpec(codec=codec)}))
    with running_server(coord, fed) as server, client(server, fed.alice) as node:
        task = node.pull_task()
        assert task is not None
        ack = node.push_result(Result("t-c", {"delta": Encoded(codec, message)}, 1.0))
    assert ack.accepted
    result = coord.accepted[0][1]
    got = result.tensors["delta"]
    assert got == Encoded(codec, message)
    assert result.wire.payload_bytes == len(message) == comp.nbytes(n)
    assert result.wire.chunks == 1  # 23,858 bytes: one chunk of at most 64 KiB
    assert torch.equal(comp.decode(got.data), comp.decode(message))  # type: ignore[union-attr]


def test_mid_task_fetch_streams_a_fresher_model_and_heartbeats_reach_the_coordinator():
    fed, coord = Federation(), RecordingCoordinator()
    fresh = torch.randn(786_432)  # 3 MiB: three chunks
    coord.answer = Answer(8, {"params": fresh})
    coord.add("alice", spec("t-a", {"params": torch.zeros(4)}))
    with running_server(coord, fed) as server, client(server, fed.alice) as node:
        task = node.pull_task()
        assert task is not None
        assert node.heartbeat("t-a") is True
        answer = node.request("t-a", RequestKind.FETCH_MODEL)
        coord.keep_going = False
        assert node.heartbeat("t-a") is False  # the coordinator no longer wants the task
        assert node.heartbeat() is False  # idle heartbeat: task_id None
        with pytest.raises(RemoteRefusal) as refused:
            node.request("t-unknown")
    assert answer.model_version == 8
    assert torch.equal(answer.tensors["params"], fresh)  # type: ignore[arg-type]
    assert answer.wire.payload_bytes == 3 * MiB and answer.wire.chunks == 3
    assert [(n, r.task_id, r.kind) for n, r in coord.requests] == [
        ("alice", "t-a", RequestKind.FETCH_MODEL)
    ]
    assert coord.heartbeats == [("alice", "t-a"), ("alice", "t-a"), ("alice", None)]
    assert (refused.value.code, refused.value.kind) == ("NOT_FOUND", "TaskNotFound")


def test_no_task_tells_the_node_when_to_ask_again():
    """Without waiting on the server (long_poll_s=0) the node is told retry_after_s; after
    a pull that could wait there (the coordinator was given the wait), at once (0)."""
    from roost.deploy.server import ServerConfig

    fed, coord = Federation(), RecordingCoordinator()
    config = ServerConfig(retry_after_s=2.5, long_poll_s=0.0)
    with running_server(coord, fed, config) as server, client(server, fed.alice) as node:
        assert node.pull_task() is None
        assert node.retry_after_s == 2.5
    assert coord.pulls == ["alice"]
    config = ServerConfig(retry_after_s=2.5, long_poll_s=0.5)
    with running_server(coord, fed, config) as server, client(server, fed.alice) as node:
        assert node.pull_task() is None
        assert node.retry_after_s == 0.0


def test_keep_alive_heartbeats_in_the_background_and_reports_a_dropped_task():
    fed, coord = Federation(), RecordingCoordinator()
    coord.add("alice", spec("t-k", {"params": torch.zeros(2)}))
    with running_server(coord, fed) as server, client(server, fed.alice) as node:
        node.pull_task()
        coord.keep_going = False
        with node.keep_alive("t-k", interval_s=0.02) as drop:
            assert drop.wait(5.0)  # set by the first heartbeat answered False
    assert coord.heartbeats[0] == ("alice", "t-k")
