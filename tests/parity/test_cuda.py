"""The GPU path on real GPUs: skipped on machines without CUDA (CI has none).

What runs here is the code the CPU tests run, with tensors on GPUs: the local runtime
with ``device=cuda``, and the workers runtime with its default of one worker per GPU and
``relay`` over NCCL. Tolerances:

* GPU against CPU: different kernels (cuBLAS, cuDNN) sum in other orders, ~1e-6 relative
  per step; after 3 rounds of local SGD we allow rtol 1e-4, atol 1e-5 on the parameters
  and accuracies within two test examples (of 360).
* workers on GPUs against local on GPU 0: the same kernels; only the summation order of
  the (float64) sums differs, as on the CPU: rtol 1e-5, atol 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from _runs import TEST_EXAMPLES, final_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold", "ditto"])
def test_local_runtime_on_gpu_matches_cpu(tmp_path, algorithm):
    cpu_h, cpu_p = final_run(tmp_path, "cpu", [f"algorithm={algorithm}", "runtime.device=cpu"])
    gpu_h, gpu_p = final_run(tmp_path, "gpu", [f"algorithm={algorithm}", "runtime.device=cuda"])
    assert gpu_p.device.type == "cpu"  # the strategy and checkpoints stay in host memory
    torch.testing.assert_close(gpu_p, cpu_p, rtol=1e-4, atol=1e-5)
    for a, b in zip(gpu_h.records, cpu_h.records, strict=True):
        assert abs(a["accuracy"] - b["accuracy"]) <= 2 / TEST_EXAMPLES


@pytest.mark.parametrize(("algorithm", "state_store"), [("fedavg", "memory"), ("scaffold", "disk")])
def test_one_worker_per_gpu_over_nccl_matches_local_gpu(tmp_path, algorithm, state_store):
    common = [f"algorithm={algorithm}", f"state_store={state_store}"]
    local_h, local_p = final_run(tmp_path, "local", [*common, "runtime.device=cuda"])
    gpus = torch.cuda.device_count()
    for topology in ("relay", "star"):
        workers = ["runtime=workers", "runtime.device=cuda", f"runtime.topology={topology}"]
        h, p = final_run(tmp_path, topology, [*common, *workers])
        assert h.final["worker_devices"] == [f"cuda:{i}" for i in range(gpus)]
        torch.testing.assert_close(p, local_p, rtol=1e-5, atol=1e-6)
        for a, b in zip(h.records, local_h.records, strict=True):
            assert abs(a["accuracy"] - b["accuracy"]) <= 1 / TEST_EXAMPLES


def test_missing_gpu_index_is_a_config_error(tmp_path):
    from roost.registry import ConfigError

    index = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"runtime.device=cuda:{index}: GPU index out of range"):
        final_run(tmp_path, "bad", [f"runtime.device=cuda:{index}"])
