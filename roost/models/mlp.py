"""Multi-layer perceptron: the FedAvg paper's "2NN" (784-200-200-10) by default."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from roost.data.base import DatasetInfo
from roost.registry import check


@dataclass(frozen=True)
class MLPConfig:
    """hidden: widths of the hidden ReLU layers, e.g. ``model.hidden=200,200``."""

    hidden: tuple[int, ...] = (200, 200)

    def __post_init__(self) -> None:
        check(all(h >= 1 for h in self.hidden), "hidden", self.hidden, "widths must be >= 1")


class MLP(nn.Sequential):
    def __init__(self, cfg: MLPConfig, info: DatasetInfo) -> None:
        if info.vocab_size:
            raise ValueError("model=mlp needs float features; this data holds tokens")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(info.input_shape)
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, info.num_classes))
        super().__init__(*layers)
