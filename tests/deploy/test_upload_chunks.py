"""The server asks nodes for small result chunks, so that what gRPC keeps per connection
does not grow with the model (issue 9, item 6).

gRPC's TCP endpoint keeps, for each connection, read buffers about as large as the largest
message received on it, also while the connection is idle (measured on grpcio 1.85: about
0.9 MiB of small blocks per connection after results in 1 MiB chunks, 0.1 MiB after 64 KiB
chunks, whatever the total uploaded). So the size of the messages a server receives, not
only their number at once, sets its memory per node: the server tells each node, at
registration, the chunk size to send results and exchanges in."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

import torch
from _deploy_helpers import FAST, Federation, RecordingCoordinator, client, running_server, spec

from roost.deploy._proto import FRAME_OVERHEAD
from roost.deploy.client import ClientConfig
from roost.deploy.protocol import Result
from roost.deploy.server import ServerConfig
from roost.deploy.tensors import DEFAULT_CHUNK_BYTES, TensorSpec

KiB = 1 << 10
N = 300_000  # 1,200,000 bytes of float32: 2 chunks of 1 MiB, 19 of 64 KiB


def push_one(node_config: ClientConfig, server_config: ServerConfig | None = None) -> tuple:
    """A task of N floats pulled and its result pushed by a node with ``node_config``;
    the node's ServerInfo, the task as received and the result as the server received it."""
    payload = torch.arange(N, dtype=torch.float32)
    fed, coord = Federation(), RecordingCoordinator()
    coord.add("alice", spec("t-1", {"params": payload}, {"params": TensorSpec("float32", (N,))}))
    with (
        running_server(coord, fed, config=server_config) as server,
        client(server, fed.alice, config=node_config) as node,
    ):
        info = node.register()
        task = node.pull_task()
        assert task is not None
        update = task.payload["params"] * 2.0 + 1.0
        ack = node.push_result(Result("t-1", {"params": update}, 3.0, {"loss": 0.5}))
    assert ack.accepted
    ((_, received),) = coord.accepted
    assert torch.equal(received.tensors["params"], payload * 2.0 + 1.0)  # bit-exact
    return info, task, received


def test_results_arrive_in_the_chunks_the_server_asked_for_not_the_nodes_1_MiB():
    """The node's own chunk size is 1 MiB (the default); the server asks 64 KiB, so the
    result arrives in ceil(1,200,000 / 65,536) = 19 chunk frames (with 1 MiB chunks it
    would be 2, each a 1 MiB message that gRPC then keeps a buffer of per connection)."""
    config = ClientConfig(backoff=FAST)
    assert config.chunk_bytes == DEFAULT_CHUNK_BYTES == 1024 * KiB
    info, task, received = push_one(config)  # both sides with their defaults
    assert received.wire.payload_bytes == 4 * N
    assert received.wire.chunks == math.ceil(4 * N / (64 * KiB)) == 19
    assert info.upload_chunk_bytes == ServerConfig().upload_chunk_bytes == 64 * KiB
    # a chunk frame carries its data and at most FRAME_OVERHEAD bytes more; the header
    # frame is small: no received message is larger than 64 KiB + FRAME_OVERHEAD
    assert received.wire.message_bytes <= 4 * N + 20 * FRAME_OVERHEAD
    # tasks still travel in the server's own 1 MiB chunks (the node keeps what it gets)
    assert task.wire.chunks == math.ceil(4 * N / DEFAULT_CHUNK_BYTES) == 2


def test_a_node_with_smaller_chunks_keeps_them_and_the_server_can_ask_for_other_sizes():
    """A node sends at most its own chunk size and at most the server's: 16 KiB of its
    own under the default server gives ceil(1,200,000 / 16,384) = 74 chunks; a server
    asking 256 KiB of a default node gives ceil(1,200,000 / 262,144) = 5."""
    _, _, received = push_one(ClientConfig(backoff=FAST, chunk_bytes=16 * KiB))
    assert received.wire.chunks == 74
    asks = ServerConfig(upload_chunk_bytes=256 * KiB)
    info, _, received = push_one(ClientConfig(backoff=FAST), asks)
    assert info.upload_chunk_bytes == 256 * KiB
    assert received.wire.chunks == 5


@pytest.mark.parametrize("size", [0, (4 << 20) - FRAME_OVERHEAD + 1])
def test_the_upload_chunk_size_must_fit_in_a_message(size):
    with pytest.raises(ValueError, match="upload_chunk_bytes"):
        ServerConfig(upload_chunk_bytes=size)
