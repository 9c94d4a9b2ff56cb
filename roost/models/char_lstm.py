"""Character LSTM for next-character prediction (LEAF Shakespeare style, smaller).

Input: integer token ids shaped (batch, seq_len); output: logits over the vocabulary for
the character that follows the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from roost.data.base import DatasetInfo
from roost.registry import check


@dataclass(frozen=True)
class CharLSTMConfig:
    embed_dim: int = 8
    hidden: int = 128
    layers: int = 1

    def __post_init__(self) -> None:
        check(self.embed_dim >= 1, "embed_dim", self.embed_dim, "must be >= 1")
        check(self.hidden >= 1, "hidden", self.hidden, "must be >= 1")
        check(self.layers >= 1, "layers", self.layers, "must be >= 1")


class CharLSTM(nn.Module):
    def __init__(self, cfg: CharLSTMConfig, info: DatasetInfo) -> None:
        super().__init__()
        if not info.vocab_size:
            raise ValueError("model=char_lstm needs token data (e.g. data=text)")
        self.embed = nn.Embedding(info.vocab_size, cfg.embed_dim)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden, num_layers=cfg.layers, batch_first=True)
        self.head = nn.Linear(cfg.hidden, info.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1])
