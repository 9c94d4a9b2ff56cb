"""The input of an image model: (C, H, W) images, or (H, W) ones given a channel."""

from __future__ import annotations

from torch import nn

from roost.data.base import DatasetInfo

__all__ = ["image_input"]


def image_input(info: DatasetInfo, model: str) -> tuple[tuple[int, int, int], list[nn.Module]]:
    """The (C, H, W) an image model sees, and the layers that make a (H, W) input so."""
    if info.vocab_size or len(info.input_shape) not in (2, 3):
        raise ValueError(
            f"model={model} needs images shaped (C, H, W) or (H, W); got {info.input_shape}"
        )
    if len(info.input_shape) == 3:
        c, h, w = info.input_shape
        return (c, h, w), []
    h, w = info.input_shape
    return (1, h, w), [nn.Unflatten(1, (1, h))]
