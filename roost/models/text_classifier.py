"""Bag-of-embeddings text classifier (fastText style) for token-id inputs.

Input: integer token ids shaped (batch, seq_len), such as ``data=leaf
data.features=token_ids`` gives, with ``DatasetInfo.vocab_size`` ids in all. Each id is
embedded in ``embed_dim`` dimensions, the embeddings of a text's tokens are averaged, and a
linear layer maps the mean to class logits. With ``padding`` (the default) id 0 is padding:
its embedding is fixed at zero and it is left out of the mean (a text of padding only gives
the zero vector, so its logits are the layer's bias); set ``padding=false`` for ids where 0
is a real token (``data=text``'s characters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from roost.data.base import DatasetInfo
from roost.registry import check

__all__ = ["TextClassifier", "TextClassifierConfig"]


@dataclass(frozen=True)
class TextClassifierConfig:
    """embed_dim: width of the token embeddings. padding: id 0 is padding (left out)."""

    embed_dim: int = 32
    padding: bool = True

    def __post_init__(self) -> None:
        check(self.embed_dim >= 1, "embed_dim", self.embed_dim, "must be >= 1")


class TextClassifier(nn.Module):
    def __init__(self, cfg: TextClassifierConfig, info: DatasetInfo) -> None:
        super().__init__()
        if not info.vocab_size:
            raise ValueError(
                "model=text_classifier needs token ids (e.g. data=leaf data.features=token_ids)"
            )
        self.padding = cfg.padding
        pad = 0 if cfg.padding else None
        self.embed = nn.Embedding(info.vocab_size, cfg.embed_dim, padding_idx=pad)
        self.head = nn.Linear(cfg.embed_dim, info.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vectors = self.embed(x)
        if not self.padding:
            return self.head(vectors.mean(dim=1))
        mask = (x != 0).unsqueeze(-1).to(vectors.dtype)
        mean = (vectors * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return self.head(mean)
