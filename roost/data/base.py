"""Client data and the federated dataset protocol.

A :class:`FederatedDataset` maps a client id (``0 .. num_clients-1``) to that client's
examples, built lazily: a simulation of 100,000 clients touches only the clients it trains,
and ``num_examples`` is cheap so schedulers and weights never load data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ClientData", "DatasetInfo", "FederatedDataset"]


@dataclass
class ClientData:
    """Examples ``x`` (float features or integer tokens) and integer labels ``y``."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} examples but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device) -> ClientData:
        """These examples on ``device`` (``self`` when they are already there)."""
        if self.x.device == device and self.y.device == device:
            return self
        return ClientData(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class DatasetInfo:
    """What a model builder needs to know: one example's shape and the number of classes.

    ``vocab_size`` is set for token inputs (``x`` holds integer ids), 0 otherwise.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    vocab_size: int = 0


class FederatedDataset:
    """Client id -> examples. Subclasses implement the three lookups below."""

    info: DatasetInfo
    num_clients: int

    def num_examples(self, client_id: int) -> int:
        raise NotImplementedError

    def client_data(self, client_id: int) -> ClientData:
        raise NotImplementedError

    def test_data(self) -> ClientData | None:
        """The central held-out split, or None when the data has none."""
        raise NotImplementedError

    def client_test_data(self, client_id: int) -> ClientData | None:
        """A client's own held-out split (for personalised evaluation), if the data has one."""
        return None

    def check_client(self, client_id: int) -> None:
        if not 0 <= client_id < self.num_clients:
            raise IndexError(f"client {client_id} out of range 0..{self.num_clients - 1}")
