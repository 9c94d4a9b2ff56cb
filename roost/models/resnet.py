"""The CIFAR ResNet of He et al. 2016 (§4.2), as an ``nn.Sequential`` of cut points.

Depth ``6n + 2`` (``model.depth``, default 8: ResNet-8, n = 1; 20, 32, 44, 56, 110 are
the paper's): a stem conv3x3 of 16 channels, three stages of n basic blocks with 16, 32
and 64 channels (the first block of stages 2 and 3 has stride 2), global average pooling
and a linear layer to the classes. Each basic block is conv3x3-BN-ReLU-conv3x3-BN plus
its shortcut, then ReLU. Shortcuts are the paper's option A for CIFAR: the identity,
subsampled by the stride and padded with zero channels where the width grows, so they
have no parameters (ResNet-20 has 0.27 M parameters, as in the paper's Table 6).

Top-level children, the cut points of a split method: the stem (conv + BN + ReLU, with
an ``Unflatten`` in front on (H, W) inputs), one :class:`BasicBlock` per block, and the
head (average pool, flatten, linear): ``3n + 2`` children, 5 for ResNet-8.

Convs have no bias (a BatchNorm follows each). Initial weights: PyTorch's default inits
(the paper uses He et al. 2015's), drawn from torch's global generator. Any image size
works (28x28 maps to 28-14-7 in the three stages, 32x32 to 32-16-8, 8x8 to 8-4-2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from roost.data.base import DatasetInfo
from roost.models.images import image_input
from roost.registry import check

__all__ = ["BasicBlock", "ResNet", "ResNetConfig"]

STAGE_WIDTHS = (16, 32, 64)


@dataclass(frozen=True)
class ResNetConfig:
    """depth: 6n + 2 layers with weights (8, 14, 20, ...), n blocks per stage."""

    depth: int = 8

    def __post_init__(self) -> None:
        check(
            self.depth >= 8 and (self.depth - 2) % 6 == 0,
            "depth",
            self.depth,
            "must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)",
        )


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the option-A shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride = stride
        self.extra_channels = c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride != 1 else x
        if self.extra_channels:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return torch.relu(out + shortcut)


class ResNet(nn.Sequential):
    def __init__(self, cfg: ResNetConfig, info: DatasetInfo) -> None:
        (c_in, _, _), first = image_input(info, "resnet")
        n = (cfg.depth - 2) // 6
        width = STAGE_WIDTHS[0]
        layers: list[nn.Module] = [
            nn.Sequential(
                *first,
                nn.Conv2d(c_in, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            )
        ]
        for stage, c_out in enumerate(STAGE_WIDTHS):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(width, c_out, stride))
                width = c_out
        layers.append(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, info.num_classes))
        )
        super().__init__(*layers)
