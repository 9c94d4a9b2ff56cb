"""The refill picks' batched draws against numpy's own streams.

Oracle: ``np.random.default_rng([seed, purpose, j]).integers(n)``, the rule W3
(WORKLOADS.md) and the asynchronous policy state; the batched path must give the same
integer for every stream, including the rare rejections of Lemire's method.
"""

from __future__ import annotations

import numpy as np
import pytest

from roost.engine.draws import LazyStream, StreamDraws, first_outputs


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 - 1])
def test_first_outputs_are_pcg64_seeded_by_seed_sequence(seed):
    js = np.arange(1, 3001, dtype=np.uint64)
    want = [
        int(np.random.PCG64(np.random.SeedSequence([seed, 6, int(j)])).random_raw()) for j in js
    ]
    assert first_outputs(seed, 6, js).tolist() == want


@pytest.mark.parametrize(
    "n",
    [1, 2, 3, 7, 100, 70_000, 1_000_003, 2**31 - 1, 2**31 + 1, 3 * 2**30, 2**32 - 1, 2**32],
)
def test_integers_equal_numpy_for_every_stream(n):
    """n near 2^31 or 3·2^30 rejects a 32-bit word a third to a half of the time, so both
    words of the first output are rejected in about 1 stream in 4 to 9: those must fall
    back to the Generator and still agree."""
    draws = StreamDraws(3, 6)
    got = [draws.integers(j, n) for j in range(1, 2001)]
    want = [int(np.random.default_rng([3, 6, j]).integers(n)) for j in range(1, 2001)]
    assert got == want
    if n in (2**31 + 1, 3 * 2**30):
        assert draws.fallbacks > 50  # the rejection path was exercised
    if n < 2**20:
        assert draws.fallbacks == 0  # (n / 2^32)^2 < 1e-6 per stream


def test_many_streams_with_random_bounds_and_a_seed_past_32_bits():
    rng = np.random.default_rng(0)
    for seed in (0, 2**40 + 5):  # the second is not on the fast path
        draws = StreamDraws(seed, 6)
        ns = rng.integers(1, 500_000, 20_000)
        got = [draws.integers(j, int(n)) for j, n in enumerate(ns, 1)]
        want = [int(np.random.default_rng([seed, 6, j]).integers(n)) for j, n in enumerate(ns, 1)]
        assert got == want
        assert draws.fallbacks == (0 if seed == 0 else 20_000)


def test_a_lazy_stream_continues_exactly_like_numpys():
    """A strategy that draws more than once gets numpy's stream: the first integers(n)
    is replayed into the real Generator before anything else is drawn."""
    draws = StreamDraws(0, 6)
    lazy = LazyStream(draws, 17)
    real = np.random.default_rng([0, 6, 17])
    assert lazy.integers(1000) == int(real.integers(1000))
    assert lazy.random() == real.random()
    assert lazy.integers(5, 9, size=3).tolist() == real.integers(5, 9, size=3).tolist()
    other = LazyStream(draws, 18)  # used as a Generator from the start
    assert other.choice(10, 3, replace=False).tolist() == (
        np.random.default_rng([0, 6, 18]).choice(10, 3, replace=False).tolist()
    )
