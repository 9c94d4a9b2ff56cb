"""``default_rng([seed, purpose, j]).integers(n)`` for j = 1, 2, 3, ..., without building
a Generator per j.

An asynchronous run picks the client of its j-th dispatch with its own stream
``default_rng([seed, 6, j])`` (W3 in WORKLOADS.md; :mod:`roost.engine.asynchronous`), so
that a run's picks depend on nothing else. Building that Generator costs about 8 µs (a
``SeedSequence``, a ``PCG64``, a ``Generator``), more than a third of the engine's budget
per event. The first draw of each stream is what the pick uses, and all three steps are
fixed integer arithmetic, so :class:`StreamDraws` computes the first 64-bit output of
many consecutive streams at once with numpy:

1. ``SeedSequence`` (O'Neill's seed_seq design as numpy implements it,
   ``numpy/random/bit_generator.pyx``): the entropy words ``[seed, purpose, j]`` (each <
   2^32) are hashed into a pool of 4 32-bit words (``hashmix``/``mix`` with the constants
   ``INIT_A, MULT_A, MIX_MULT_L, MIX_MULT_R``), then ``generate_state(4, uint64)`` hashes
   the pool cyclically into 8 words (``INIT_B, MULT_B``);
2. ``PCG64(seed_seq)``: ``initstate = s0·2^64 + s1``, ``initseq = s2·2^64 + s3`` of those
   words; ``inc = 2·initseq + 1``; ``state = (inc + initstate)·M + inc`` (mod 2^128, with
   PCG's multiplier M), i.e. ``pcg_setseq_128_srandom_r``;
3. the first output: one more LCG step, then XSL-RR: ``rotr64(hi ^ lo, state >> 122)``.

``integers(n)`` (int64, ``n <= 2^32``) is numpy's buffered Lemire rejection on 32-bit
words: the first word is the output's low half, the second its high half;
``m = x·n``, accept ``m >> 32`` unless ``m mod 2^32 < (2^32 - n) mod n``. When both
words are rejected (probability below ``(n / 2^32)^2``), or the seed or ``n`` do not fit
these paths, the real Generator is built. The tests check equality with numpy on
hundreds of thousands of streams; numpy's stream layout is part of its compatibility
policy (``SeedSequence`` and ``PCG64`` outputs are stable across versions).
"""

from __future__ import annotations

import numpy as np

__all__ = ["LazyStream", "StreamDraws", "first_outputs"]

_M32 = np.uint64(0xFFFFFFFF)
_INIT_A = 0x43B0D7E5
_MULT_A = 0x931E8875
_INIT_B = 0x8B51F9DD
_MULT_B = 0x58F38DED
_MIX_MULT_L = np.uint32(0xCA01F9DD)
_MIX_MULT_R = np.uint32(0x4973F715)
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645
_BATCH = 1024


def _hashmix(value: np.ndarray, hash_const: int) -> tuple[np.ndarray, int]:
    value = value ^ np.uint32(hash_const)
    hash_const = (hash_const * _MULT_A) & 0xFFFFFFFF
    value = value * np.uint32(hash_const)
    return value ^ (value >> np.uint32(16)), hash_const


def _mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r: np.ndarray = (_MIX_MULT_L * x - _MIX_MULT_R * y).astype(np.uint32, copy=False)
    return r ^ (r >> np.uint32(16))


def _seed_words(entropy: list[np.ndarray]) -> list[np.ndarray]:
    """SeedSequence(entropy).generate_state(8, uint32), per element of the arrays."""
    n = len(entropy[0])
    zero = np.zeros(n, dtype=np.uint32)
    h = _INIT_A
    pool = []
    for i in range(4):
        pool_i, h = _hashmix(entropy[i] if i < len(entropy) else zero, h)
        pool.append(pool_i)
    for src in range(4):
        for dst in range(4):
            if src != dst:
                hashed, h = _hashmix(pool[src], h)
                pool[dst] = _mix(pool[dst], hashed)
    for src in range(4, len(entropy)):
        for dst in range(4):
            hashed, h = _hashmix(entropy[src], h)
            pool[dst] = _mix(pool[dst], hashed)
    out, hb = [], _INIT_B
    for i in range(8):
        v = pool[i % 4] ^ np.uint32(hb)
        hb = (hb * _MULT_B) & 0xFFFFFFFF
        v = v * np.uint32(hb)
        out.append(v ^ (v >> np.uint32(16)))
    return out


def _mul64(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The full 128-bit product of uint64 arrays, as (high, low) words."""
    a_lo, a_hi = a & _M32, a >> np.uint64(32)
    b_lo, b_hi = b & _M32, b >> np.uint64(32)
    ll = a_lo * b_lo
    lh = a_lo * b_hi
    hl = a_hi * b_lo
    hh = a_hi * b_hi
    mid = (ll >> np.uint64(32)) + (lh & _M32) + (hl & _M32)
    lo = (ll & _M32) | (mid << np.uint64(32))
    hi = hh + (lh >> np.uint64(32)) + (hl >> np.uint64(32)) + (mid >> np.uint64(32))
    return hi, lo


def _mul128(
    a_hi: np.ndarray, a_lo: np.ndarray, b_hi: np.ndarray, b_lo: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    hi, lo = _mul64(a_lo, b_lo)
    return hi + a_hi * b_lo + a_lo * b_hi, lo


def _add128(
    a_hi: np.ndarray, a_lo: np.ndarray, b_hi: np.ndarray, b_lo: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    lo = a_lo + b_lo
    return a_hi + b_hi + (lo < a_lo).astype(np.uint64), lo


def first_outputs(seed: int, purpose: int, js: np.ndarray) -> np.ndarray:
    """The first 64-bit output of ``PCG64(SeedSequence([seed, purpose, j]))`` per ``j``
    (``seed``, ``purpose`` and every ``j`` in [0, 2^32))."""
    n = len(js)
    words = _seed_words(
        [
            np.full(n, seed, dtype=np.uint32),
            np.full(n, purpose, dtype=np.uint32),
            np.asarray(js, dtype=np.uint32),
        ]
    )
    w = [x.astype(np.uint64) for x in words]
    s = [w[2 * k] | (w[2 * k + 1] << np.uint64(32)) for k in range(4)]  # little-endian view
    init_hi, init_lo = s[0], s[1]
    seq_hi, seq_lo = s[2], s[3]
    inc_hi = (seq_hi << np.uint64(1)) | (seq_lo >> np.uint64(63))
    inc_lo = (seq_lo << np.uint64(1)) | np.uint64(1)
    m_hi = np.full(n, _PCG_MULT >> 64, dtype=np.uint64)
    m_lo = np.full(n, _PCG_MULT & ((1 << 64) - 1), dtype=np.uint64)
    with np.errstate(over="ignore"):
        # srandom: state = 0; step; state += initstate; step; then the draw's own step
        st_hi, st_lo = inc_hi, inc_lo  # 0 * M + inc
        st_hi, st_lo = _add128(st_hi, st_lo, init_hi, init_lo)
        for _ in range(2):
            st_hi, st_lo = _mul128(st_hi, st_lo, m_hi, m_lo)
            st_hi, st_lo = _add128(st_hi, st_lo, inc_hi, inc_lo)
    value = st_hi ^ st_lo
    rot = st_hi >> np.uint64(58)
    return (value >> rot) | (value << ((np.uint64(64) - rot) & np.uint64(63)))


class StreamDraws:
    """``integers(j, n)`` = ``default_rng([seed, purpose, j]).integers(n)``, computed from
    first outputs precomputed in batches of consecutive ``j`` (see the module docstring)."""

    def __init__(self, seed: int, purpose: int) -> None:
        self.seed, self.purpose = int(seed), int(purpose)
        self._fast = 0 <= self.seed < 2**32 and 0 <= self.purpose < 2**32
        self._start = -1
        self._outputs: list[int] = []
        self.fallbacks = 0  # draws that built the Generator

    def _output(self, j: int) -> int:
        k = j - self._start
        if self._start < 0 or not 0 <= k < len(self._outputs):
            self._start = j
            js = np.arange(j, j + _BATCH, dtype=np.uint64)
            self._outputs = first_outputs(self.seed, self.purpose, js).tolist()
            k = 0
        return self._outputs[k]

    def integers(self, j: int, n: int) -> int:
        if n < 1:
            raise ValueError(f"cannot draw from an empty range (n={n})")
        if not (self._fast and 0 <= j < 2**32 - _BATCH and n <= 2**32):
            return self._slow(j, n)
        if n == 1:
            return 0
        raw = self._output(j)
        threshold = (2**32 - n) % n
        for x in (raw & 0xFFFFFFFF, raw >> 32):
            m = x * n
            if (m & 0xFFFFFFFF) >= threshold:
                return m >> 32
        return self._slow(j, n)

    def _slow(self, j: int, n: int) -> int:
        self.fallbacks += 1
        return int(np.random.default_rng([self.seed, self.purpose, j]).integers(n))


class LazyStream:
    """Stands for ``default_rng([seed, purpose, j])`` where a strategy expects a
    Generator: a first call ``integers(n)`` comes from :class:`StreamDraws`; anything
    else builds the real Generator (replaying that first draw, so the stream continues
    exactly as numpy's would)."""

    def __init__(self, draws: StreamDraws, j: int) -> None:
        self._draws, self._j = draws, j
        self._first: int | None = None  # n of the fast first draw
        self._rng: np.random.Generator | None = None

    def integers(self, *args: object, **kwargs: object) -> object:
        if self._rng is None and self._first is None and not kwargs and len(args) == 1:
            (n,) = args
            if isinstance(n, (int, np.integer)) and not isinstance(n, bool):
                self._first = int(n)
                return self._draws.integers(self._j, int(n))
        return self.generator().integers(*args, **kwargs)  # type: ignore[call-overload]

    def generator(self) -> np.random.Generator:
        if self._rng is None:
            d = self._draws
            self._rng = np.random.default_rng([d.seed, d.purpose, self._j])
            if self._first is not None:
                self._rng.integers(self._first)
        return self._rng

    def __getattr__(self, name: str) -> object:
        return getattr(self.generator(), name)
