"""Array-backed data: a central train/test set and its partitioned, per-client view.

Loaders of real data sets (digits, MNIST, LEAF, text) read everything into one
:class:`CentralData`; a partitioner then turns its train split into per-client index arrays,
and :class:`ArrayFederatedDataset` serves client ``i`` as ``train[partition[i]]``, built only
when that client is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from roost.data.base import ClientData, DatasetInfo, FederatedDataset

__all__ = ["ArrayFederatedDataset", "CentralData", "split_train_test", "subset"]


@dataclass
class CentralData:
    """A whole data set before partitioning.

    ``groups`` holds one natural client key per train example (the LEAF user, the speaker)
    or is None when the data has no natural partition; ``test_groups`` likewise for ``test``.
    ``central_test`` optionally selects (by index into ``test``) the subset used as the
    central held-out split, when evaluating on every test example would be too slow; the
    full ``test`` still provides the per-client test splits.
    """

    train: ClientData
    test: ClientData | None
    info: DatasetInfo
    groups: np.ndarray | None = None
    test_groups: np.ndarray | None = None
    central_test: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.groups is not None and len(self.groups) != len(self.train):
            raise ValueError(
                f"groups has {len(self.groups)} keys but train has {len(self.train)} examples"
            )
        if self.test_groups is not None and (
            self.test is None or len(self.test_groups) != len(self.test)
        ):
            n_test = 0 if self.test is None else len(self.test)
            raise ValueError(
                f"test_groups has {len(self.test_groups)} keys but test has {n_test} examples"
            )
        if self.central_test is not None and self.test is None:
            raise ValueError("central_test selects test examples but there is no test split")


def subset(data: ClientData, index: np.ndarray) -> ClientData:
    """The examples of ``data`` at ``index`` (a copy, in index order)."""
    idx = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
    return ClientData(data.x[idx], data.y[idx])


def split_train_test(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into (train, test), each sorted ascending.

    With ``stratify`` every label contributes ``round(test_fraction * count)`` of its
    examples (drawn at random) to the test split, so both splits keep the label mix;
    otherwise ``round(test_fraction * n)`` examples are drawn from all of them.
    """
    n = len(labels)
    if stratify:
        test_parts = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            k = round(test_fraction * len(members))
            test_parts.append(rng.permutation(members)[:k])
        test = np.concatenate(test_parts) if test_parts else np.zeros(0, np.int64)
    else:
        test = rng.permutation(n)[: round(test_fraction * n)]
    mask = np.zeros(n, dtype=bool)
    mask[test] = True
    return np.flatnonzero(~mask).astype(np.int64), np.flatnonzero(mask).astype(np.int64)


def _check_indices(name: str, parts: Sequence[np.ndarray], size: int) -> list[np.ndarray]:
    out = []
    for i, part in enumerate(parts):
        arr = np.asarray(part)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{name}[{i}] must be a 1-d integer index array, got {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        if arr.size and (arr.min() < 0 or arr.max() >= size):
            raise ValueError(f"{name}[{i}] has indices outside 0..{size - 1}")
        out.append(arr)
    return out


class ArrayFederatedDataset(FederatedDataset):
    """Clients as index arrays into one in-memory train split.

    Client ``i``'s data is ``train[partition[i]]``, copied out when asked for and not
    kept: memory stays at one copy of the data plus the index arrays. ``client_tests``
    optionally gives each client its own held-out examples, as indices into
    ``test_source`` (default: ``test``); a client with none gets None, like data without
    per-client splits. ``test`` is the central held-out split.
    """

    def __init__(
        self,
        train: ClientData,
        partition: list[np.ndarray],
        info: DatasetInfo,
        test: ClientData | None,
        client_tests: list[np.ndarray] | None = None,
        test_source: ClientData | None = None,
    ) -> None:
        if not partition:
            raise ValueError("partition must give at least one client")
        self.train = train
        self.partition = _check_indices("partition", partition, len(train))
        self.info = info
        self.num_clients = len(self.partition)
        self._test = test
        self._test_source = test_source if test_source is not None else test
        self._client_tests: list[np.ndarray] | None = None
        if client_tests is not None:
            if self._test_source is None:
                raise ValueError("client_tests given but there is no test split to index")
            if len(client_tests) != self.num_clients:
                raise ValueError(
                    f"client_tests has {len(client_tests)} entries for {self.num_clients} clients"
                )
            self._client_tests = _check_indices(
                "client_tests", client_tests, len(self._test_source)
            )

    def num_examples(self, client_id: int) -> int:
        self.check_client(client_id)
        return len(self.partition[client_id])

    def client_data(self, client_id: int) -> ClientData:
        self.check_client(client_id)
        return subset(self.train, self.partition[client_id])

    def test_data(self) -> ClientData | None:
        return self._test

    def client_test_data(self, client_id: int) -> ClientData | None:
        self.check_client(client_id)
        if self._client_tests is None or self._test_source is None:
            return None
        index = self._client_tests[client_id]
        return subset(self._test_source, index) if len(index) else None
