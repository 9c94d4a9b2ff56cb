"""Split learning's building blocks (issue 10, item 1): the cut, the layouts of the two
parts, the messages at the cut and their bytes, and one iteration over micro-batches
against the whole model's gradients (ALGORITHMS.md §2.1: with one device and one
micro-batch, split learning is centralised SGD on the batch)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from roost.params import ParamLayout
from roost.split import (
    Activations,
    Gradient,
    cut_module,
    label_dtype,
    num_cut_points,
    split_iteration,
    wire_dtype,
)


def _mlp(batch_norm: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(6, 5), nn.ReLU()]
    if batch_norm:
        layers.append(nn.BatchNorm1d(5))
    layers += [nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)]
    return nn.Sequential(*layers)


def _batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_a_cut_leaves_a_layer_on_each_side_and_names_the_allowed_cuts() -> None:
    model = _mlp()  # 5 top-level layers: cuts 1 .. 4
    assert num_cut_points(model) == 4
    for bad in (0, 5, True, "2"):
        with pytest.raises(
            ValueError, match=r"5 top-level layers, so the cuts allowed are 1 \.\. 4"
        ):
            cut_module(model, bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"cuts an nn\.Sequential"):
        cut_module(nn.Linear(2, 2), 1)


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_the_server_part_after_the_device_part_is_the_model(cut: int) -> None:
    model = _mlp(batch_norm=True).eval()
    x, _ = _batch(7)
    parts = cut_module(model, cut)
    assert len(parts.device) == cut and len(parts.server) == 6 - cut
    assert torch.equal(parts.server(parts.device(x)), model(x))


@pytest.mark.parametrize("cut", [1, 2, 3, 5])
def test_the_layouts_map_the_whole_vector_onto_each_parts_own(cut: int) -> None:
    """The whole model's vector (parameters, then BatchNorm's two running statistics at its
    end) split into the parts' vectors equals each part flattened on its own, and joins
    back bit for bit. Sizes: 6·5+5 = 35, BatchNorm 5+5 weights and 5+5 statistics,
    5·4+4 = 24, 4·3+3 = 15: 35 + 10 + 10 + 24 + 15 = 94 in all."""
    model = _mlp(batch_norm=True)
    with torch.no_grad():  # statistics that are not the defaults 0 and 1
        model[2].running_mean.uniform_(-1, 1)
        model[2].running_var.uniform_(1, 2)
    parts = cut_module(model, cut)
    whole = ParamLayout.of(model).flatten_module(model)
    assert whole.numel() == 94 == parts.layout.device.numel + parts.layout.server.numel
    device, server = parts.layout.split(whole)
    assert torch.equal(device, ParamLayout.of(parts.device).flatten_module(parts.device))
    assert torch.equal(server, ParamLayout.of(parts.server).flatten_module(parts.server))
    assert torch.equal(parts.layout.join(device, server), whole)
    with pytest.raises(ValueError, match="94 values, not 93"):
        parts.layout.split(whole[:-1])


def _grads(module: nn.Module, prefix_shift: int = 0) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in module.named_parameters():
        head, _, rest = name.partition(".")
        assert p.grad is not None
        out[f"{int(head) + prefix_shift}.{rest}"] = p.grad.clone()
    return out


def _split_grads(model: nn.Sequential, cut: int, x, y, n: int, wire=torch.float32):  # type: ignore[no-untyped-def]
    parts = cut_module(model, cut)
    result = split_iteration(parts.device, parts.server, x, y, n, num_classes=3, wire=wire)
    return result, {**_grads(parts.device), **_grads(parts.server, cut)}


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_one_micro_batch_gives_exactly_the_whole_models_gradients(cut: int) -> None:
    whole = _mlp()
    x, y = _batch(8)
    loss = F.cross_entropy(whole(x), y)
    loss.backward()
    result, grads = _split_grads(copy.deepcopy(_mlp()), cut, x, y, 1)
    assert result.loss == float(loss.detach()) and result.examples == 8
    want = _grads(whole)
    assert grads.keys() == want.keys()
    assert all(torch.equal(grads[k], want[k]) for k in want)


def test_micro_batches_give_the_batch_gradient_up_to_float_sums_and_drop_the_remainder() -> None:
    """18 examples in 4 micro-batches of ⌊18/4⌋ = 4: the last 2 are dropped, and the
    gradients are those of the mean loss over the first 16 (to 1e-6: the sum of four
    means of 4 is the mean of 16 up to float32 rounding)."""
    whole = _mlp()
    x, y = _batch(18)
    F.cross_entropy(whole(x[:16]), y[:16]).backward()
    result, grads = _split_grads(_mlp(), 2, x, y, 4)
    assert result.examples == 16 and len(result.uplink_bytes) == 4
    want = _grads(whole)
    assert max((grads[k] - want[k]).abs().max().item() for k in want) <= 1e-6


def test_message_bytes_follow_the_wire_dtype() -> None:
    """Cut after Linear(6, 5)+ReLU: 5 activations per example. 16 examples in 4
    micro-batches of 4, 3 classes (uint8 labels, 1 byte): in float32 the uplink is
    4·5·4 + 4 = 84 bytes per micro-batch and the downlink 4·5·4 = 80; in float16 44 and
    40. The float16 gradients are the float32 ones up to float16 rounding of the two
    messages (a relative 2^-11 each, here well under 1%)."""
    x, y = _batch(16)
    full, g32 = _split_grads(_mlp(), 2, x, y, 4, torch.float32)
    half, g16 = _split_grads(_mlp(), 2, x, y, 4, torch.float16)
    assert full.uplink_bytes == (84,) * 4 and full.downlink_bytes == (80,) * 4
    assert half.uplink_bytes == (44,) * 4 and half.downlink_bytes == (40,) * 4
    for k in g32:
        scale = g32[k].abs().max().item()
        assert (g16[k] - g32[k]).abs().max().item() <= 1e-2 * scale


def test_messages_carry_labels_in_the_smallest_type_and_received_values_are_float32() -> None:
    assert label_dtype(10) is torch.uint8 and label_dtype(256) is torch.uint8
    assert label_dtype(257) is torch.int16 and label_dtype(40_000) is torch.int32
    a = Activations.of(torch.ones(2, 3), torch.tensor([0, 9]), torch.bfloat16, 10)
    assert a.nbytes == 2 * 3 * 2 + 2 * 1
    leaf, labels = a.received()
    assert leaf.dtype is torch.float32 and leaf.requires_grad and labels.dtype is torch.int64
    assert leaf is not a.received()[0]  # each reception is its own leaf
    g = Gradient.of(torch.ones(2, 3), torch.float16)
    assert g.nbytes == 12 and g.received().dtype is torch.float32
    with pytest.raises(ValueError, match="'float8' is not one of float32, float16, bfloat16"):
        wire_dtype("float8")
    with pytest.raises(ValueError, match=r"1 \.\. 4 micro-batches"):
        split_iteration(
            nn.Identity(), nn.Identity(), torch.ones(4, 2), torch.zeros(4), 5, num_classes=2
        )
