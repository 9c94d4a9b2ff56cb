"""The FedAvg paper's CNN: conv5x5(32)+pool, conv5x5(64)+pool, linear(512), linear(classes).

On 28x28x1 inputs it has 1.66 M parameters (WORKLOADS.md W1). Other image sizes work: the
first linear layer takes ``64 * (H // 4) * (W // 4)`` features.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from roost.data.base import DatasetInfo
from roost.models.images import image_input
from roost.registry import check


@dataclass(frozen=True)
class CNNConfig:
    channels: tuple[int, ...] = (32, 64)
    hidden: int = 512

    def __post_init__(self) -> None:
        check(
            len(self.channels) >= 1 and all(c >= 1 for c in self.channels),
            "channels",
            self.channels,
            "one or more widths >= 1",
        )
        check(self.hidden >= 1, "hidden", self.hidden, "must be >= 1")


class CNN(nn.Sequential):
    def __init__(self, cfg: CNNConfig, info: DatasetInfo) -> None:
        (c_in, h, w), layers = image_input(info, "cnn")
        for c in cfg.channels:
            layers += [nn.Conv2d(c_in, c, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, h, w = c, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"input {info.input_shape} is too small for {len(cfg.channels)} pools")
        layers += [
            nn.Flatten(),
            nn.Linear(c_in * h * w, cfg.hidden),
            nn.ReLU(),
            nn.Linear(cfg.hidden, info.num_classes),
        ]
        super().__init__(*layers)
