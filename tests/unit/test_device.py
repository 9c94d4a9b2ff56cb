"""Device choice and worker counts: which device a runtime and each worker take, how
many workers there are, and the moves at task boundaries. The GPU count is passed in, so
every rule is checked on a machine without one; tests/parity/test_cuda.py runs the same
code on real GPUs where there are some."""

from __future__ import annotations

import pytest
import torch

from roost.algorithms.base import ClientResult, Contribution, Payload
from roost.data.base import ClientData
from roost.params import FlatModel
from roost.registry import ConfigError
from roost.runtime.device import (
    default_worker_count,
    resolve_device,
    tensors_to,
    worker_slot_on_node,
)
from roost.runtime.local import LocalRuntimeConfig
from roost.runtime.workers_protocol import Transport, WorkersRuntimeConfig

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("spec", "gpus", "expected"),
    [
        ("auto", 0, "cpu"),
        ("auto", 2, "cuda:0"),
        ("cpu", 4, "cpu"),
        ("cuda", 1, "cuda:0"),
        ("cuda:1", 2, "cuda:1"),
    ],
)
def test_single_process_device(spec, gpus, expected):
    assert resolve_device(spec, gpus=gpus) == torch.device(expected)


@pytest.mark.parametrize(
    ("spec", "gpus", "message"),
    [
        ("cuda", 0, "no CUDA GPU is visible here"),
        ("cuda:2", 2, "GPU index out of range: 2 GPU(s) visible (0..1)"),
        ("gpu", 1, "must be auto, cpu, cuda or cuda:K"),
        ("cuda:", 1, "must be auto, cpu, cuda or cuda:K"),
    ],
)
def test_unusable_devices_are_config_errors_naming_the_key(spec, gpus, message):
    with pytest.raises(ConfigError) as e:
        resolve_device(spec, gpus=gpus)
    assert e.value.key == "runtime.device"
    assert message in str(e.value)


def test_malformed_device_is_rejected_when_the_config_is_built():
    with pytest.raises(ConfigError, match="device=GPU0: must be auto, cpu, cuda or cuda:K"):
        LocalRuntimeConfig(device="GPU0")
    with pytest.raises(ConfigError, match="device=tpu"):
        WorkersRuntimeConfig(device="tpu")


def test_workers_take_one_gpu_each_and_wrap_around():
    # 3 GPUs, 5 workers: slots 0..4 -> GPUs 0,1,2,0,1.
    assert [resolve_device("auto", s, 3).index for s in range(5)] == [0, 1, 2, 0, 1]
    assert [resolve_device("cuda", s, 2).index for s in range(3)] == [0, 1, 0]
    # cuda:K pins every worker to GPU K; cpu and auto-without-GPU stay on the CPU.
    assert {resolve_device("cuda:1", s, 2).index for s in range(4)} == {1}
    assert resolve_device("auto", 3, 0) == CPU
    assert resolve_device("cpu", 3, 8) == CPU


def test_torchrun_slots_skip_the_server_on_its_node():
    # 2 nodes x 3 processes: node 0 holds ranks 0 (server), 1, 2; node 1 holds 3, 4, 5.
    assert [worker_slot_on_node(r, r) for r in (1, 2)] == [0, 1]
    assert [worker_slot_on_node(r, r - 3) for r in (3, 4, 5)] == [0, 1, 2]
    with pytest.raises(ValueError, match="not a worker"):
        worker_slot_on_node(0, 0)


def test_default_worker_count_is_one_per_gpu_else_two():
    assert default_worker_count("auto", 4) == 4
    assert default_worker_count("cuda", 3) == 3
    assert default_worker_count("auto", 0) == 2
    assert default_worker_count("cpu", 4) == 2  # GPUs present but not used
    assert default_worker_count("cuda:1", 4) == 2  # one pinned GPU: no per-GPU fan-out
    assert WorkersRuntimeConfig().workers == 0  # automatic unless set


@pytest.mark.parametrize(
    ("topology", "gpus", "nccl", "expected"),
    [
        ("auto", False, True, ("star", "gloo")),
        ("auto", True, True, ("relay", "nccl")),
        ("auto", True, False, ("relay", "gloo")),  # a torch built without NCCL
        ("relay", False, True, ("relay", "gloo")),
        ("star", True, True, ("star", "gloo")),
    ],
)
def test_transport_choice(topology, gpus, nccl, expected):
    t = Transport.choose(topology, gpus, nccl)
    assert (t.topology, t.worker_backend) == expected
    assert t.on_device == (expected[1] == "nccl")


def test_moves_are_free_when_already_there():
    data = ClientData(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    assert data.to(CPU) is data
    payload = Payload(torch.zeros(4), 7, {"control": torch.ones(4)})
    assert payload.to(CPU) is payload
    state = {"control": torch.ones(4)}
    assert tensors_to(state, CPU)["control"] is state["control"]


def test_moves_to_another_device_copy_every_field():
    # The meta device stands in for a GPU: tensors move, shapes and metadata are kept.
    meta = torch.device("meta")
    payload = Payload(torch.zeros(4), 7, {"control": torch.ones(4)})
    moved = payload.to(meta)
    assert moved.version == 7
    assert moved.params.device == meta and moved.extras["control"].device == meta
    assert payload.params.device == CPU  # the original is untouched

    c = Contribution()
    c.fold(ClientResult({"w": torch.ones(4)}, 3.0, {"loss": 2.0}), client_id=5)
    m = c.to(meta)
    assert m.sums["w"].device == meta and m.sums["w"].dtype == torch.float64
    assert (m.weight, m.count, m.clients, m.scalar_sums) == (3.0, 1, [5], {"loss": 6.0})
    assert c.to(CPU) is c

    data = ClientData(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)).to(meta)
    assert data.x.device == meta and data.y.device == meta and len(data) == 3


def test_flat_model_buffers_and_module_live_on_its_device():
    flat = FlatModel(torch.nn.Linear(3, 2), "meta")
    assert flat.device == torch.device("meta")
    assert flat.params.device == flat.grads.device == flat.scratch("m").device == flat.device
    assert all(p.device == flat.device for p in flat.module.parameters())


def test_workers_set_against_torchrun_world_size_is_a_config_error(monkeypatch):
    from roost.runtime.workers import WorkersRuntime

    # What torchrun sets on rank 0 of 3 processes: 1 server + 2 workers.
    for k, v in {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match="torchrun launched 3 processes, so there are 2"):
        WorkersRuntime(WorkersRuntimeConfig(workers=4)).start(None)  # type: ignore[arg-type]
