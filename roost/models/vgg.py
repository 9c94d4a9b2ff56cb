"""VGG5 and VGG11 for split learning, as ``nn.Sequential`` whose top-level layers are the cuts.

A split method cuts a model after its top-level layer P (``children[:P]`` on the device,
``children[P:]`` on the server), so every natural cut point is its own child: a conv block
(``Conv2d`` 3x3, padding 1, + ``BatchNorm2d`` + ``ReLU``), a 2x2 max-pool, the flatten and
each linear block. On (H, W) inputs the first conv block starts with an ``Unflatten`` to
(1, H, W), so a cut index names the same layer on every dataset.

Sources (read for their layer lists):

- ``vgg5`` follows PipeLearn/PiPar (github:blessonvar/PipeLearn, ``config.py`` ``'VGG5'``)
  and agrees with the same group's FedAdapt (github:qub-blesson/FedAdapt, ``config.py``
  and ``vgg.py``): conv32, pool, conv64, pool, conv64, then linear 128 and linear to the
  classes. Both use BatchNorm after every conv (conv biases kept) and **no nonlinearity
  between the two linear layers** (their dense layers are a bare ``nn.Linear``); this
  follows them. 8 children::

      conv32 | pool | conv64 | pool | conv64 | flatten | linear128 | linear(classes)

- ``vgg11`` is VGG "A" with BatchNorm: convs 64, pool, 128, pool, 256, 256, pool, 512,
  512, pool, 512, 512, pool, then linear 4096, 4096 and the classes, with the
  classifier widths of PipeLearn's ``'VGG11'`` (the first linear layer takes the
  flattened 512 x 1 x 1 map on 32x32 inputs). PipeLearn's dense layers carry
  ``Dropout(0.5)`` but no ReLU, and its ``Dense.forward`` returns ``dropout(x)`` of the
  layer's *input*, so its VGG11 cannot run as written; the two hidden linear blocks here
  are ``Linear + ReLU + Dropout(0.5)`` as in VCCprune (github:amudvari/VCCprune,
  ``models/vccModel.py``, cfg ``'A'`` with ``batch_norm=True``) and the VGG paper.
  VCCprune's own classifier differs: torchvision's ``AdaptiveAvgPool2d((7, 7))`` and a
  first linear layer of 512 * 7 * 7 = 25088 inputs (102.8 M weights on 32x32 inputs,
  where the 1x1 map is copied 49 times); not followed. 17 children: 8 conv blocks, 5
  pools, flatten, two hidden linear blocks and the output layer.

Deviations from both sources, for other image sizes: pools use ``ceil_mode=True``, the
same as floor mode on even sizes (all of 32x32's, and 28x28's first two), so VGG11 maps
28x28 to 28-14-7-4-2-1 and keeps its 512-wide classifier input (floor mode would reach 0
at the fifth pool). The first linear layer's input is computed from the map's shape, as
``cnn.py`` does. Every pool must halve a map of at least 2x2: an input smaller than
``2 ** (pools - 1) + 1`` on a side (3x3 for VGG5, 17x17 for VGG11) raises ``ValueError``,
so VGG11 refuses 8x8 digits.

Initial weights: PyTorch's default inits (PipeLearn uses Xavier-uniform, FedAdapt and
VCCprune's optional init Kaiming-normal), drawn from torch's global generator.
``batch_norm=false`` drops the BatchNorm layers (the conv block is then conv + ReLU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from roost.data.base import DatasetInfo
from roost.models.images import image_input
from roost.registry import check

__all__ = ["VGG", "VGG5Config", "VGG11Config"]

VGG5_FEATURES: tuple[int | str, ...] = (32, "M", 64, "M", 64)
VGG11_FEATURES: tuple[int | str, ...] = (
    64,
    "M",
    128,
    "M",
    256,
    256,
    "M",
    512,
    512,
    "M",
    512,
    512,
    "M",
)


@dataclass(frozen=True)
class VGG5Config:
    """batch_norm: a BatchNorm2d after every conv (as PipeLearn and FedAdapt have)."""

    batch_norm: bool = True


@dataclass(frozen=True)
class VGG11Config:
    """batch_norm: a BatchNorm2d after every conv; dropout: after each hidden linear block."""

    batch_norm: bool = True
    dropout: float = 0.5

    def __post_init__(self) -> None:
        check(0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)")


class VGG(nn.Sequential):
    """Conv blocks and pools from ``features`` (ints are conv widths, ``"M"`` a pool), a
    flatten, hidden linear blocks of widths ``hidden`` and a linear output layer."""

    def __init__(
        self,
        model: str,
        features: tuple[int | str, ...],
        hidden: tuple[int, ...],
        info: DatasetInfo,
        *,
        batch_norm: bool,
        hidden_relu: bool,
        dropout: float,
    ) -> None:
        (c_in, h, w), first = image_input(info, model)
        pools = features.count("M")
        smallest = 2 ** (pools - 1) + 1
        layers: list[nn.Module] = []
        for f in features:
            if f == "M":
                if h < 2 or w < 2:
                    raise ValueError(
                        f"model={model} needs images of at least {smallest}x{smallest} (each of "
                        f"its {pools} max-pools halves the map); got input shape "
                        f"{info.input_shape}"
                    )
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                h, w = math.ceil(h / 2), math.ceil(w / 2)
                continue
            assert isinstance(f, int)
            block: list[nn.Module] = [*first, nn.Conv2d(c_in, f, 3, padding=1)]
            if batch_norm:
                block.append(nn.BatchNorm2d(f))
            block.append(nn.ReLU())
            layers.append(nn.Sequential(*block))
            first, c_in = [], f
        layers.append(nn.Flatten())
        width = c_in * h * w
        for hdim in hidden:
            lin: list[nn.Module] = [nn.Linear(width, hdim)]
            if hidden_relu:
                lin.append(nn.ReLU())
            if dropout:
                lin.append(nn.Dropout(dropout))
            layers.append(lin[0] if len(lin) == 1 else nn.Sequential(*lin))
            width = hdim
        layers.append(nn.Linear(width, info.num_classes))
        super().__init__(*layers)


def vgg5(cfg: VGG5Config, info: DatasetInfo) -> VGG:
    return VGG(
        "vgg5",
        VGG5_FEATURES,
        (128,),
        info,
        batch_norm=cfg.batch_norm,
        hidden_relu=False,
        dropout=0.0,
    )


def vgg11(cfg: VGG11Config, info: DatasetInfo) -> VGG:
    return VGG(
        "vgg11",
        VGG11_FEATURES,
        (4096, 4096),
        info,
        batch_norm=cfg.batch_norm,
        hidden_relu=True,
        dropout=cfg.dropout,
    )
