"""Exponential backoff with jitter, for a node reconnecting to its server."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Delays ``initial_s · multiplier^k`` capped at ``max_s``, each scaled down by a random
    factor in ``[1 - jitter, 1]`` (so nodes that lost the server together do not return
    together). The sequence ends after ``max_attempts`` delays or once the delays add up
    to ``max_total_s``; None means no such bound.
    """

    initial_s: float = 0.1
    max_s: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.5
    max_attempts: int | None = None
    max_total_s: float | None = 300.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {self.initial_s}, {self.max_s}")
        if self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("need multiplier >= 1 and 0 <= jitter <= 1")
        if self.max_attempts is not None and self.max_attempts < 0:
            raise ValueError(f"max_attempts must be >= 0, got {self.max_attempts}")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The delays to sleep before each retry, in order."""
        rng = rng or random.Random()
        base, total, attempt = self.initial_s, 0.0, 0
        while self.max_attempts is None or attempt < self.max_attempts:
            delay = base * (1 - self.jitter * rng.random())
            if self.max_total_s is not None and total + delay > self.max_total_s:
                return
            yield delay
            total += delay
            attempt += 1
            base = min(self.max_s, base * self.multiplier)
