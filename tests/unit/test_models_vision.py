"""The split-learning vision models (vgg5, vgg11, resnet): shapes, cut points, parameter
counts derived by hand, cuts that compose to the whole model, BatchNorm, and short runs."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from roost.data.base import DatasetInfo
from roost.models import MODELS, build_model
from roost.models.resnet import BasicBlock
from roost.registry import ConfigError

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)
CASES = [
    ("vgg5", {}, MNIST),
    ("vgg5", {}, CIFAR),
    ("vgg11", {}, MNIST),
    ("vgg11", {}, CIFAR),
    ("resnet", {}, MNIST),
    ("resnet", {}, CIFAR),
]
IDS = [f"{n}-{'x'.join(map(str, s))}" for n, _, s in CASES]


def build(
    name: str, params: dict[str, Any], shape: tuple[int, ...], classes: int = 10
) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, MODELS.config(name, params), DatasetInfo(shape, classes))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(c_in: int, c_out: int, bias: bool = True) -> int:
    """A 3x3 conv's parameters."""
    return c_in * c_out * 9 + (c_out if bias else 0)


def bn(c: int) -> int:
    return 2 * c  # weight and bias (running stats are buffers)


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


# VGG5: conv 32, 64, 64 (+BN each), two pools; the map after them is 7x7 on 28x28 and
# 8x8 on 32x32, so the first linear layer takes 64*7*7 = 3136 or 64*8*8 = 4096 features.
#   28x28x1: 320 + 64 + 18,496 + 128 + 36,928 + 128 + 401,536 + 1,290 = 458,890
#   32x32x3: 896 + 64 + 18,496 + 128 + 36,928 + 128 + 524,416 + 1,290 = 582,346
def vgg5_params(c: int, side: int) -> int:
    feat = conv(c, 32) + bn(32) + conv(32, 64) + bn(64) + conv(64, 64) + bn(64)
    return feat + linear(64 * (side // 4) ** 2, 128) + linear(128, 10)


# VGG11: convs 64, 128, 256, 256, 512, 512, 512, 512 (+BN each); five ceil-mode pools take
# both 28 (28-14-7-4-2-1) and 32 to 1x1, so the classifier is 512 -> 4096 -> 4096 -> 10.
#   convs: 1,792 (640 on 1 channel) + 73,856 + 295,168 + 590,080 + 1,180,160 + 3 x 2,359,808
#   BN: 2 x (64 + 128 + 256 + 256 + 4 x 512) = 5,504
#   classifier: 2,101,248 + 16,781,312 + 40,970 = 18,923,530
#   total 28,149,514 on 32x32x3, 28,148,362 on 28x28x1
def vgg11_params(c: int) -> int:
    widths = [c, 64, 128, 256, 256, 512, 512, 512, 512]
    feat = sum(conv(a, b) + bn(b) for a, b in itertools.pairwise(widths))
    return feat + linear(512, 4096) + linear(4096, 4096) + linear(4096, 10)


# ResNet-8 (option-A shortcuts: no parameters; convs without bias):
#   stem 3x3 conv c->16 + BN: 432 + 32 (144 + 32 on 1 channel)
#   block 16->16: 2,304 + 32 + 2,304 + 32 = 4,672
#   block 16->32: 4,608 + 64 + 9,216 + 64 = 13,952
#   block 32->64: 18,432 + 128 + 36,864 + 128 = 55,552
#   head linear 64->10: 650
#   total 75,290 on 32x32x3, 75,002 on 28x28x1 (any image size: global average pool)
def resnet_params(c: int, n: int) -> int:
    total = conv(c, 16, bias=False) + bn(16)
    for c_in, c_out in ((16, 16), (16, 32), (32, 64)):
        total += conv(c_in, c_out, False) + bn(c_out) + conv(c_out, c_out, False) + bn(c_out)
        total += (n - 1) * 2 * (conv(c_out, c_out, False) + bn(c_out))
    return total + linear(64, 10)


def test_hand_derived_parameter_counts() -> None:
    assert vgg5_params(1, 28) == 458_890 and vgg5_params(3, 32) == 582_346
    assert vgg11_params(1) == 28_148_362 and vgg11_params(3) == 28_149_514
    assert resnet_params(1, 1) == 75_002 and resnet_params(3, 1) == 75_290
    assert resnet_params(3, 3) == 269_722  # ResNet-20: the paper's 0.27 M
    assert num_params(build("vgg5", {}, MNIST)) == 458_890
    assert num_params(build("vgg5", {}, CIFAR)) == 582_346
    assert num_params(build("vgg11", {}, MNIST)) == 28_148_362
    assert num_params(build("vgg11", {}, CIFAR)) == 28_149_514
    assert num_params(build("resnet", {}, MNIST)) == 75_002
    assert num_params(build("resnet", {}, CIFAR)) == 75_290
    assert num_params(build("resnet", {"depth": 20}, CIFAR)) == 269_722
    # without BatchNorm VGG5 loses its 2 x (32 + 64 + 64) = 320 affine parameters
    assert num_params(build("vgg5", {"batch_norm": False}, CIFAR)) == 582_346 - 320


# The cut points, one top-level child each:
#   vgg5 (8):   conv32 | pool | conv64 | pool | conv64 | flatten | linear128 | linear10
#   vgg11 (17): 8 conv blocks and 5 pools (64 P 128 P 256 256 P 512 512 P 512 512 P),
#               flatten, linear 4096 block, linear 4096 block, linear10
#   resnet8 (5): stem | block 16 | block 32 | block 64 | head (pool, flatten, linear)
CB, P, FL, LIN, SEQ = "conv", "pool", "flatten", "linear", "block"
LAYOUT = {
    "vgg5": [CB, P, CB, P, CB, FL, LIN, LIN],
    "vgg11": [CB, P, CB, P, CB, CB, P, CB, CB, P, CB, CB, P, FL, SEQ, SEQ, LIN],
    "resnet": ["stem", "res", "res", "res", "head"],
}


def kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.MaxPool2d):
        return P
    if isinstance(layer, nn.Flatten):
        return FL
    if isinstance(layer, nn.Linear):
        return LIN
    if isinstance(layer, BasicBlock):
        return "res"
    assert isinstance(layer, nn.Sequential)
    types = [type(m) for m in layer]
    if types[-3:] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]:
        return "stem" if layer[-3].out_channels == 16 and len(layer) <= 4 else CB
    if types == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]:
        return "head"
    assert types == [nn.Linear, nn.ReLU, nn.Dropout], types
    return SEQ


@pytest.mark.parametrize(("name", "params", "shape"), CASES, ids=IDS)
def test_output_shape_and_cut_points(
    name: str, params: dict[str, Any], shape: tuple[int, ...]
) -> None:
    model = build(name, params, shape, classes=7)
    assert isinstance(model, nn.Sequential)
    assert len(model) == {"vgg5": 8, "vgg11": 17, "resnet": 5}[name]
    assert [kind(layer) for layer in model] == LAYOUT[name]
    model.eval()
    assert model(torch.randn(3, *shape)).shape == (3, 7)
    # (H, W) images: the same cut points, the first block unflattens to (1, H, W)
    if shape[0] == 1:
        flat = build(name, params, shape[1:], classes=7).eval()
        assert len(flat) == len(model) and isinstance(flat[0][0], nn.Unflatten)
        x = torch.randn(3, *shape)
        assert torch.equal(flat(x[:, 0]), model(x))  # same seed, same weights


@pytest.mark.parametrize(("name", "params", "shape"), CASES, ids=IDS)
def test_every_cut_composes_to_the_whole_model(
    name: str, params: dict[str, Any], shape: tuple[int, ...]
) -> None:
    model = build(name, params, shape).eval()
    x = torch.randn(4, *shape)
    with torch.no_grad():
        whole = model(x)
        children = list(model.children())
        for cut in range(len(children) + 1):
            device, server = nn.Sequential(*children[:cut]), nn.Sequential(*children[cut:])
            assert torch.equal(server(device(x)), whole), cut


@pytest.mark.parametrize(("name", "params", "shape"), CASES, ids=IDS)
def test_backward_reaches_every_parameter(
    name: str, params: dict[str, Any], shape: tuple[int, ...]
) -> None:
    model = build(name, params, shape).train()
    x, y = torch.randn(4, *shape), torch.randint(0, 10, (4,))
    F.cross_entropy(model(x), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)


def bn_layers(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def test_batchnorm_where_expected() -> None:
    vgg5 = build("vgg5", {}, CIFAR)
    assert list(bn_layers(vgg5)) == ["0.1", "2.1", "4.1"]  # in each conv block
    assert [m.num_features for m in bn_layers(vgg5).values()] == [32, 64, 64]
    assert not bn_layers(build("vgg5", {"batch_norm": False}, CIFAR))
    vgg11 = build("vgg11", {}, MNIST)
    assert [int(n.split(".")[0]) for n in bn_layers(vgg11)] == [0, 2, 4, 5, 7, 8, 10, 11]
    resnet = build("resnet", {}, CIFAR)
    assert list(bn_layers(resnet)) == ["0.1", "1.bn1", "1.bn2", "2.bn1", "2.bn2", "3.bn1", "3.bn2"]
    assert len(bn_layers(build("resnet", {"depth": 20}, CIFAR))) == 1 + 2 * 9
    for model in (vgg5, vgg11, resnet):
        buffers = dict(model.named_buffers())
        for n in bn_layers(model):
            assert {"running_mean", "running_var", "num_batches_tracked"} <= {
                b.rpartition(".")[2] for b in buffers if b.rpartition(".")[0] == n
            }
    # training updates the running statistics; evaluation uses them
    before = {n: m.running_mean.clone() for n, m in bn_layers(vgg5).items()}
    vgg5.train()(torch.randn(4, *CIFAR) + 1)
    assert all(not torch.equal(before[n], m.running_mean) for n, m in bn_layers(vgg5).items())
    assert all(int(m.num_batches_tracked) == 1 for m in bn_layers(vgg5).values())


def test_weights_come_from_the_global_generator() -> None:
    for name in ("vgg5", "resnet"):
        a, b = build(name, {}, CIFAR).state_dict(), build(name, {}, CIFAR).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        torch.manual_seed(1)
        c = build_model(name, MODELS.config(name, {}), DatasetInfo(CIFAR, 10)).state_dict()
        assert not torch.equal(a["0.0.weight"], c["0.0.weight"])


def test_input_size_limits_and_bad_inputs() -> None:
    # vgg11's five pools each need a map of at least 2x2: 17 -> 9 -> 5 -> 3 -> 2 -> 1
    assert build("vgg11", {}, (3, 17, 17)).eval()(torch.randn(1, 3, 17, 17)).shape == (1, 10)
    for shape in ((3, 16, 16), (1, 8, 8), (8, 8)):
        with pytest.raises(ValueError, match=r"vgg11 needs images of at least 17x17") as e:
            build("vgg11", {}, shape)
        assert str(shape) in str(e.value)
    with pytest.raises(ValueError, match=r"vgg5 needs images of at least 3x3.*\(1, 2, 2\)"):
        build("vgg5", {}, (1, 2, 2))
    for name in ("vgg5", "vgg11", "resnet"):
        with pytest.raises(ValueError, match=rf"model={name} needs images shaped"):
            build(name, {}, (64,))
        with pytest.raises(ValueError, match="needs images shaped"):
            build_model(name, MODELS.config(name, {}), DatasetInfo((4, 4), 2, vocab_size=5))
    with pytest.raises(ConfigError, match="6n"):
        MODELS.config("resnet", {"depth": 10})
    with pytest.raises(ConfigError):
        MODELS.config("vgg11", {"dropout": 1.0})


def tree(model: dict[str, Any]) -> dict[str, Any]:
    return {
        "rounds": 1,
        "clients": 2,
        "clients_per_round": 2,
        "eval_every": 1,
        "data": {"name": "digits"},
        "partition": {"name": "iid"},
        "model": model,
        "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 10, "local_epochs": 1},
    }


@pytest.mark.parametrize("model", [{"name": "vgg5"}, {"name": "resnet", "depth": 8}])
def test_a_run_on_digits(model: dict[str, Any]) -> None:
    from roost.runner import run

    history = run(tree(model))
    assert history.num_clients == 2 and history.final["round"] == 1
    evaluated = history.last_evaluated()
    assert math.isfinite(evaluated["loss"]) and 0 <= evaluated["accuracy"] <= 1
    assert math.isfinite(history.final["train_loss"])


def test_vgg11_refuses_8x8_digits() -> None:
    from roost.runner import run

    with pytest.raises(ValueError, match=r"at least 17x17.*got input shape \(1, 8, 8\)"):
        run(tree({"name": "vgg11"}))
