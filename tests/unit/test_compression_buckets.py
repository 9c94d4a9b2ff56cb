"""QSGD in buckets (Alistarh et al. 2017, §3): one norm per ``d`` consecutive quantised
values. Error bounds per bucket, the variance bound summed over buckets, unbiasedness,
``d >= n`` reproducing the single-norm quantiser bit for bit, the wire format's norms and
bucket size (exact length, strict decoding), a hand example, NaN buckets, the config."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from _fl_helpers import client_task, linear_model, make_clients

from roost.algorithms.base import Payload
from roost.algorithms.fedavg import FedAvg, FedAvgConfig
from roost.algorithms.teasq import TEASQConfig
from roost.compression import Compressed, CompressionConfig, Compressor, qsgd, topk_qsgd
from roost.compression.component import COMPRESSIONS
from roost.compression.quantize import (
    DEFAULT_BUCKET_SIZE,
    bucket_norms,
    dequantize,
    levels,
    num_buckets,
    quantize,
)
from roost.compression.wire import (
    HEADER,
    HEADER_NBYTES,
    Header,
    index_nbytes,
    message_nbytes,
    pack_message,
    unpack_message,
)
from roost.config import apply_overrides, load_config_source, resolve
from roost.params import FlatModel
from roost.registry import ConfigError, build_config


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(n: int, seed: int = 0) -> np.ndarray:
    return torch.randn(n, generator=gen(seed)).numpy()


def bucket_slices(n: int, d: int) -> list[slice]:
    return [slice(a, min(a + d, n)) for a in range(0, n, d)]


# ----------------------------------------------------------------- the old quantiser
# Verbatim the single-norm quantiser of format 1 (roost/compression/quantize.py before
# buckets), the reference for "bucket_size >= n changes nothing".


def _old_norm_up(x: np.ndarray) -> float:
    norm64 = float(np.linalg.norm(x.astype(np.float64)))
    with np.errstate(over="ignore"):  # (added: the "huge" case's overflow is expected)
        norm32 = np.float32(norm64)
    if float(norm32) < norm64:
        norm32 = np.nextafter(norm32, np.float32(np.inf))
    return float(norm32) if math.isfinite(float(norm32)) else math.nan


def old_quantize(
    x: np.ndarray, bits: int, rounding: str, generator: torch.Generator | None
) -> tuple[np.ndarray, float]:
    s = levels(bits)
    x = np.asarray(x, dtype=np.float32)
    norm = _old_norm_up(x)
    if math.isnan(norm) or norm == 0.0 or x.size == 0:
        return np.zeros(x.size, dtype=np.uint32), (norm if x.size else 0.0)
    r = np.abs(x.astype(np.float64)) * (s / norm)
    if rounding == "stochastic":
        assert generator is not None
        floor = np.floor(r)
        u = torch.rand(x.size, generator=generator, dtype=torch.float64).numpy()
        level = floor + (u < r - floor)
    else:
        level = np.floor(r + 0.5)
    level = np.minimum(level, s).astype(np.uint32)
    sign = ((x < 0) & (level > 0)).astype(np.uint32)
    return (sign << np.uint32(bits)) | level, norm


def old_dequantize(codes: np.ndarray, norm: float, bits: int) -> np.ndarray:
    s = levels(bits)
    codes = np.asarray(codes, dtype=np.uint32)
    level = (codes & np.uint32(s)).astype(np.float64)
    negative = (codes >> np.uint32(bits)) & np.uint32(1)
    values = level * (norm / s)
    values[negative.astype(bool)] *= -1.0
    return values.astype(np.float32)


def old_nbytes(n: int, k: int, bits: int) -> int:
    """Format 1's length: 32 + indices + values (one norm, in the header)."""
    values = 4 * k if bits == 32 else (k * (bits + 1) + 7) // 8
    return 32 + index_nbytes(n, k) + values


# ----------------------------------------------------------------- by hand


def test_tiny_example_by_hand() -> None:
    # x = (3, 4, 0, 1), buckets of 2: x_0 = (3, 4), ||x_0|| = 5; x_1 = (0, 1), ||x_1|| = 1
    # (both exact in float32, so the rounded-up norms are 5 and 1).
    x = np.array([3.0, 4.0, 0.0, 1.0], dtype=np.float32)
    assert bucket_norms(x, 2).tolist() == [5.0, 1.0]
    assert num_buckets(4, 2) == 2 and num_buckets(5, 2) == 3 and num_buckets(0, 2) == 0

    # One bit, s = 1: r = (3/5, 4/5 | 0, 1). Q(x)_0 ∈ {0, 5} (P(5) = 0.6), Q(x)_1 ∈ {0, 5}
    # (P(5) = 0.8), Q(x)_2 = 0 and Q(x)_3 = 1 always (r = 0 and 1 are levels).
    draws = 4000
    ys = np.stack(
        [dequantize(*quantize(x, 1, "stochastic", gen(seed), 2), 1, 2) for seed in range(draws)]
    ).astype(np.float64)
    assert set(ys[:, 0]) == {0.0, 5.0} and set(ys[:, 1]) == {0.0, 5.0}
    assert set(ys[:, 2]) == {0.0} and set(ys[:, 3]) == {1.0}
    # frequencies: σ = sqrt(p(1 − p)/T) = 0.0077 and 0.0063; allow 5σ
    assert np.mean(ys[:, 0] == 5.0) == pytest.approx(0.6, abs=0.039)
    assert np.mean(ys[:, 1] == 5.0) == pytest.approx(0.8, abs=0.032)
    # E||Q(x) − x||² = Σ (||x_b||/s)² p(1 − p) = 25·0.24 + 25·0.16 = 10 exactly. With one
    # norm ||x|| = √26 it would be Σ |x_i| (√26 − |x_i|) = 8√26 − 26 = 14.79, and
    # coordinate 3 would be 0 or √26 instead of exactly 1. Per draw the squared error is
    # 25 (B₀ − .6)² + 25 (B₁ − .8)²: σ of its mean over T = 4000 is 0.12; allow 5σ.
    err = ((ys - x.astype(np.float64)) ** 2).sum(1)
    assert err.mean() == pytest.approx(10.0, abs=0.6)
    single = np.stack(
        [dequantize(*quantize(x, 1, "stochastic", gen(seed)), 1) for seed in range(draws)]
    ).astype(np.float64)
    assert set(single[:, 3]) == {0.0, float(np.float32(math.sqrt(26)))}

    # Two bits, s = 3: r = (1.8, 2.4 | 0, 3). Stochastic: Q(x)_0 ∈ {5/3, 10/3},
    # Q(x)_1 ∈ {10/3, 5}, Q(x)_2 = 0, Q(x)_3 = 1. Nearest: levels (2, 2 | 0, 3), so
    # (10/3, 10/3, 0, 1), within half a level (5/6 and 1/6) of x.
    y = dequantize(*quantize(x, 2, "nearest", None, 2), 2, 2)
    assert y.tolist() == pytest.approx([10 / 3, 10 / 3, 0.0, 1.0], rel=1e-7)
    twos = np.stack(
        [dequantize(*quantize(x, 2, "stochastic", gen(s), 2), 2, 2) for s in range(200)]
    )
    assert set(twos[:, 0].tolist()) == {np.float32(5 / 3).item(), np.float32(10 / 3).item()}
    assert set(twos[:, 1].tolist()) == {np.float32(10 / 3).item(), 5.0}
    assert set(twos[:, 2].tolist()) == {0.0} and set(twos[:, 3].tolist()) == {1.0}

    # The message: n = k = 4 (dense, no indices), B = 2 norms: 5 in the header (offset
    # 24), 1 as the first 4 body bytes; codes of 3 bits (sign, 2 level bits) for levels
    # (2, 2, 0, 3): 010 010 000 011 + 4 zero bits = 0x48 0x30. 32 + 4 + 2 = 38 bytes.
    c = qsgd(2, "nearest", bucket_size=2)
    message = c.encode(torch.from_numpy(x))
    assert len(message) == 38 == c.nbytes(4) == message_nbytes(4, 4, 2, 2)
    assert struct.unpack_from("<f", message, 24) == (5.0,)
    assert struct.unpack_from("<I", message, 20) == (2,)  # the bucket size
    assert message[32:] == struct.pack("<f", 1.0) + bytes([0x48, 0x30])
    assert c.decode(message).tolist() == pytest.approx([10 / 3, 10 / 3, 0.0, 1.0], rel=1e-7)


# ----------------------------------------------------------------- error bounds


def _scaled(n: int, d: int, seed: int) -> np.ndarray:
    """Gaussian values whose buckets differ in scale by up to 10^6, so that one bucket's
    norm says nothing about another's."""
    x = randn(n, seed).astype(np.float64)
    scales = np.random.default_rng(seed).permutation(10.0 ** np.linspace(-3, 3, num_buckets(n, d)))
    sizes = [sl.stop - sl.start for sl in bucket_slices(n, d)]
    return (x * np.repeat(scales, sizes)).astype(np.float32)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_every_coordinate_is_within_one_level_of_its_bucket(bits: int) -> None:
    # |Q(x)_i − x_i| < ||x_b||/s for i in bucket b, for every draw. Exactly in float64
    # from the codes, against the stored norm N_b (the smallest float32 >= ||x_b||, so
    # N_b <= ||x_b|| (1 + 2^-23)); the float32 value the decoder returns adds at most
    # 2^-24 |Q(x)_i| <= 2^-24 N_b.
    n, d, s = 5003, 100, 2**bits - 1
    for seed in range(20):
        x = _scaled(n, d, seed)
        codes, norms = quantize(x, bits, "stochastic", gen(seed), d)
        y = dequantize(codes, norms, bits, d).astype(np.float64)
        x64 = x.astype(np.float64)
        for b, sl in enumerate(bucket_slices(n, d)):
            exact = float(np.linalg.norm(x64[sl]))
            assert exact <= norms[b] <= exact * (1 + 2.0**-23)
            level = (codes[sl] & np.uint32(s)).astype(np.float64)
            sign = np.where(codes[sl] >> np.uint32(bits), -1.0, 1.0)
            value64 = sign * level * (float(norms[b]) / s)
            assert np.all(np.abs(value64 - x64[sl]) < float(norms[b]) / s)
            err = np.abs(y[sl] - x64[sl])
            assert np.all(err <= exact / s * (1 + 2.0**-23) + 2.0**-24 * float(norms[b]))
    # the point of buckets: the smallest bucket's errors are far below one level of the
    # whole vector's norm (10^-3 vs 10^3 scales)
    x = _scaled(n, d, 0)
    y = dequantize(*quantize(x, bits, "stochastic", gen(0), d), bits, d)
    small = int(np.argmin(bucket_norms(x, d)))
    sl = bucket_slices(n, d)[small]
    whole = float(np.linalg.norm(x.astype(np.float64)))
    assert float(np.abs(y[sl] - x[sl]).max()) < 1e-4 * whole / s


def _variance(x: np.ndarray, bits: int, d: int) -> tuple[float, float, float]:
    """``(bound, exact, σ)`` of ||Q(x) − x||² with buckets of ``d``: the Lemma 3.1 bound
    summed over buckets Σ_b min(d_b/s², √d_b/s) ||x_b||², the exact expectation
    Σ_i (N_b/s)² p_i (1 − p_i) (p_i = r_i − ⌊r_i⌋, from the stored norms), and the
    standard deviation of one draw's squared error (independent coordinates: each term
    a (B − p)², B ~ Bernoulli(p), a = (N_b/s)², has variance a² (E(B − p)⁴ − (p(1 − p))²))."""
    s = 2**bits - 1
    n = x.size
    x64 = x.astype(np.float64)
    norms = bucket_norms(x, d).astype(np.float64)
    sizes = np.array([sl.stop - sl.start for sl in bucket_slices(n, d)])
    bound = sum(
        min(c / s**2, math.sqrt(c) / s) * float(np.dot(x64[sl], x64[sl]))
        for c, sl in zip(sizes, bucket_slices(n, d), strict=True)
    )
    scale = np.repeat(norms, sizes)
    r = np.abs(x64) * s / scale
    p = r - np.floor(r)
    a = (scale / s) ** 2
    exact = float(np.sum(a * p * (1 - p)))
    m4 = p * (1 - p) ** 4 + (1 - p) * p**4
    sigma = math.sqrt(float(np.sum(a**2 * (m4 - (p * (1 - p)) ** 2))))
    return bound, exact, sigma


def test_mean_squared_error_is_within_the_per_bucket_bound() -> None:
    # x ~ N(0, 1)^20000, two bits (s = 3), T = 200 seeds. Measured:
    #                     bound Σ_b min(d_b/s², √d_b/s)||x_b||²   exact E       mean of 200
    #   d = 512           152,047  (7.53 ||x||²)                  101,012       100,930
    #   d = n (one norm)  951,653  (47.1 ||x||²)                  738,042       739,309
    # with ||x||² = 20,188: buckets of 512 cut the error 7.3-fold. The empirical mean is
    # within 5 σ/√T of the exact expectation (σ/√T = 120 and 2,726), below the bound.
    n, bits, draws = 20000, 2, 200
    x = randn(n, seed=0).astype(np.float32)
    x64 = x.astype(np.float64)
    assert float(np.dot(x64, x64)) == pytest.approx(20187.6, abs=0.1)
    means = {}
    for d in (512, n):
        bound, exact, sigma = _variance(x, bits, d)
        errs = []
        for seed in range(draws):
            codes, norms = quantize(x, bits, "stochastic", gen(seed), d)
            y = dequantize(codes, norms, bits, d).astype(np.float64)
            errs.append(float(np.sum((y - x64) ** 2)))
        mean = float(np.mean(errs))
        assert abs(mean - exact) <= 5 * sigma / math.sqrt(draws), (d, mean, exact)
        assert mean <= bound, (d, mean, bound)
        means[d] = (bound, exact, mean)
    assert means[512][0] == pytest.approx(152047, rel=1e-4)
    assert means[n][0] == pytest.approx(951653, rel=1e-4)
    assert means[512][2] < means[n][2] / 7


def test_bucketed_quantisation_is_unbiased() -> None:
    # E[Q(x)] = x: 48 values in buckets of 8 at scales 10^-3 .. 10^3 (a bucket of 0 among
    # them), one bit (s = 1), T = 4000 seeds. Var(Q(x)_i) = (N_b/s)² p(1 − p), so the
    # mean of T draws has σ_i = (N_b/s) sqrt(p_i(1 − p_i)/T) <= N_b/(2s√T); every
    # coordinate's mean is within 5 σ_i of x_i (exactly x_i where σ_i = 0: on a level).
    n, d, bits, draws = 48, 8, 1, 4000
    x = _scaled(n, d, 7)
    x[16:24] = 0.0
    x64 = x.astype(np.float64)
    c = qsgd(bits, bucket_size=d)
    ys = np.stack(
        [c.compress(torch.from_numpy(x), gen(seed)).numpy() for seed in range(draws)]
    ).astype(np.float64)
    norms = np.repeat(bucket_norms(x, d).astype(np.float64), d)
    r = np.divide(np.abs(x64), norms, out=np.zeros(n), where=norms > 0) * (2**bits - 1)
    p = r - np.floor(r)
    sigma = norms * np.sqrt(p * (1 - p) / draws)
    gap = np.abs(ys.mean(0) - x64)
    # + 1e-6 |x_i|: the decoded float32 values' rounding (2^-24 relative), averaged
    assert np.all(gap <= 5 * sigma + 1e-6 * np.abs(x64)), gap / np.maximum(sigma, 1e-30)
    assert np.all(ys[:, 16:24] == 0.0)
    # the smallest nonzero bucket (scale 10^-3) is as unbiased, on its own scale: with one
    # norm its values would be 0 or ±||x|| (10^6 times larger), its σ that much larger
    bucket_of = np.arange(n) // d
    smallest = int(np.argmin(np.where(norms[::d] > 0, norms[::d], np.inf)))
    mine = bucket_of == smallest
    assert float(sigma[mine].max()) < 1e-4 * float(sigma.max())
    assert np.all(gap[mine] <= 5 * sigma[mine] + 1e-6 * np.abs(x64[mine]))


# ----------------------------------------------------------------- d >= n changes nothing


VECTORS = {
    "gaussian": lambda: randn(1000, 1),
    "odd": lambda: randn(777, 2) * 1e-3,
    "zeros": lambda: np.zeros(50, dtype=np.float32),
    "empty": lambda: np.zeros(0, dtype=np.float32),
    "one": lambda: np.array([-2.5], dtype=np.float32),
    "nan": lambda: np.array([1.0, np.nan, 2.0], dtype=np.float32),
    "inf": lambda: np.array([1.0, -np.inf], dtype=np.float32),
    "huge": lambda: np.full(4, 3e38, dtype=np.float32),  # the norm overflows float32
    "subnormal": lambda: np.array([1e-45, -3e-42, 0.0, 7e-39], dtype=np.float32),
    "levels": lambda: np.array([3.0, -4.0, 0.0, 12.0], dtype=np.float32),  # ||x|| = 13
}


@pytest.mark.parametrize("name", sorted(VECTORS))
@pytest.mark.parametrize("bits", [1, 2, 8, 16])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_bucket_of_n_or_more_is_the_single_norm_quantiser_bit_for_bit(
    name: str, bits: int, rounding: str
) -> None:
    # Same codes, same norm (bit pattern, NaN included), same decoded float32s, and the
    # generator left in the same state (the same uniforms were drawn), for d = n, n + 1,
    # 2^32 − 1 and None (one bucket).
    x = VECTORS[name]()
    n = x.size
    ref_gen, ref_after = gen(5), None
    ref_codes, ref_norm = old_quantize(x, bits, rounding, ref_gen)
    ref_after = torch.rand(3, generator=ref_gen, dtype=torch.float64)
    ref_values = old_dequantize(ref_codes, ref_norm, bits)
    for d in (max(n, 1), n + 1, 2**32 - 1, None):
        g = gen(5)
        codes, norms = quantize(x, bits, rounding, g, d)  # type: ignore[arg-type]
        assert codes.dtype == np.uint32 and np.array_equal(codes, ref_codes)
        if n:
            assert norms.shape == (1,)
            assert norms.tobytes() == np.float32(ref_norm).tobytes()
        else:
            assert norms.shape == (0,)
        assert torch.equal(torch.rand(3, generator=g, dtype=torch.float64), ref_after)
        values = dequantize(codes, norms, bits, d)
        assert values.tobytes() == ref_values.tobytes()


def test_bucket_of_k_or_more_gives_the_format_1_length_and_values() -> None:
    # Through the compressor: a message of one bucket is exactly as long as format 1's
    # (its norm sits in the header as before) and decodes to the same values.
    for n, ratio, bits in [(1000, 0.1, 8), (4810, 0.1, 8), (70001, 0.001, 3), (300, 1.0, 4)]:
        x = randn(n, seed=n)
        c = topk_qsgd(ratio, bits, bucket_size=10**6) if ratio < 1 else qsgd(bits, bucket_size=n)
        k = c.kept(n)
        message = c.encode(torch.from_numpy(x), gen(1))
        assert len(message) == c.nbytes(n) == old_nbytes(n, k, bits)
        kept = np.sort(np.argsort(-np.abs(x), kind="stable")[:k]) if k < n else np.arange(n)
        codes, norm = old_quantize(x[kept], bits, "stochastic", gen(1))
        expected = np.zeros(n, dtype=np.float32)
        expected[kept] = old_dequantize(codes, norm, bits)
        assert c.decode(message).numpy().tobytes() == expected.tobytes()
    # the default bucket (512) is one bucket for the TEASQ-Fed quickstart's k = 481
    assert topk_qsgd(0.1, 8).nbytes(4810) == old_nbytes(4810, 481, 8) == 1176


def test_each_bucket_is_quantised_on_its_own_with_its_own_uniforms() -> None:
    # Coordinate i uses the i-th uniform of the task's stream whatever d: bucket b's codes
    # are the single-norm quantiser's on x_b with the generator advanced past the
    # coordinates before it. (Integer values: every sum of squares is exact, so the
    # norms agree whichever way they are summed.)
    rng = np.random.default_rng(3)
    x = rng.integers(-40, 41, size=1000).astype(np.float32)
    x[100:200] = 0.0  # a zero bucket draws (and discards) its uniforms too
    for d in (1, 7, 100, 512):
        codes, norms = quantize(x, 3, "stochastic", gen(9), d)
        for b, sl in enumerate(bucket_slices(x.size, d)):
            g = gen(9)
            if sl.start:
                torch.rand(sl.start, generator=g, dtype=torch.float64)
            ref_codes, ref_norm = old_quantize(x[sl], 3, "stochastic", g)
            if ref_norm == 0.0:  # the old quantiser draws nothing for a zero vector
                assert np.all(codes[sl] == 0) and norms[b] == 0.0
                continue
            assert np.array_equal(codes[sl], ref_codes), (d, b)
            assert norms[b] == ref_norm


# ----------------------------------------------------------------- the wire


def _formula(n: int, k: int, bits: int, d: int) -> int:
    """32 + indices + 4 (⌈k/d⌉ − 1) + ⌈k (q + 1)/8⌉, written out independently."""
    extra = max(math.ceil(k / d) - 1, 0) if bits != 32 else 0
    values = 4 * k if bits == 32 else math.ceil(k * (bits + 1) / 8)
    return 32 + index_nbytes(n, k) + 4 * extra + values


SIZES = [0, 1, 2, 7, 8, 255, 256, 257, 511, 512, 513, 1000, 1025, 4099, 65537]


@pytest.mark.parametrize("bits", [1, 3, 8, 16, 32])
@pytest.mark.parametrize("d", [1, 2, 7, 512, 10**6])
def test_message_length_is_the_formula_and_round_trips(bits: int, d: int) -> None:
    # For every n, kept fraction and sparsifier: len(message) == nbytes(n) ==
    # message_nbytes(n, k, bits, d) == the formula, and the message decodes to the
    # quantiser's values (bucket by bucket, in the order sent), with the quantiser's norms
    # and codes coming back out of unpack_message bit for bit.
    compressors = [
        Compressor("none", 1.0, bits, bucket_size=d),
        Compressor("topk", 0.01, bits, bucket_size=d),
        Compressor("topk", 0.3, bits, "nearest", bucket_size=d),
        Compressor("randk", 0.3, bits, rescale=True, bucket_size=d),
    ]
    for c in compressors:
        for n in SIZES:
            x = randn(n, seed=n + bits)
            k = c.kept(n)
            message = c.encode(torch.from_numpy(x), gen(n))
            wire_d = d if bits != 32 else 0
            assert len(message) == c.nbytes(n) == message_nbytes(n, k, bits, wire_d), (c, n)
            assert len(message) == _formula(n, k, bits, d), (c, n)
            header, indices, norms, values = unpack_message(message)
            assert (header.n, header.k, header.bucket_size) == (n, k, wire_d)
            received = c.decode(message).numpy()
            if bits == 32:
                assert norms.size == 0
                continue
            sent = x if indices is None else x[indices]
            if c.rescale and k < n:
                sent = (sent.astype(np.float64) * (n / k)).astype(np.float32)
            g = gen(n)
            if c.sparsifier == "randk" and k < n:
                torch.randperm(n, generator=g)  # the indices' draw comes first
            codes, ref_norms = quantize(sent, bits, c.rounding, g, d)
            assert norms.tobytes() == ref_norms.tobytes()
            assert np.array_equal(values, codes)
            expected = dequantize(codes, ref_norms, bits, d)
            got = received if indices is None else received[indices]
            assert got.tobytes() == expected.tobytes()
            assert norms.size == num_buckets(k, d)


def test_message_nbytes_by_hand() -> None:
    # n = 10000, top-10% (k = 1000; bitmap 1250 < 2000 uint16), 4 bits (5 per value,
    # ⌈5000/8⌉ = 625): buckets of 512 → 2 norms, one in the header: 32 + 1250 + 4 + 625.
    assert topk_qsgd(0.1, 4).nbytes(10000) == 32 + 1250 + 4 + 625 == 1911
    # buckets of 100 → 10 norms: 9 after the header, 36 bytes
    assert topk_qsgd(0.1, 4, bucket_size=100).nbytes(10000) == 32 + 1250 + 36 + 625
    # buckets of 1 → one norm per value: 999 · 4 more bytes (then 4 + 5/8 bytes a value,
    # worse than float32's 4: small buckets only pay for very low bit widths)
    assert topk_qsgd(0.1, 4, bucket_size=1).nbytes(10000) == 32 + 1250 + 3996 + 625
    # a last, shorter bucket: k = 1000 in buckets of 300 → 300, 300, 300, 100: 4 norms
    assert topk_qsgd(0.1, 4, bucket_size=300).nbytes(10000) == 32 + 1250 + 12 + 625
    # raw float32 values carry no norm: the bucket size changes nothing
    assert Compressor("topk", 0.1, bucket_size=3).nbytes(10000) == 32 + 1250 + 4000
    assert message_nbytes(0, 0, 8, 512) == 32  # nothing sent: no bucket, header norm 0


# ----------------------------------------------------------------- corrupt messages


def _with_crc(message: bytes) -> bytes:
    head, body = message[: HEADER.size], message[HEADER.size + 4 :]
    return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


def _patch(message: bytes, offset: int, data: bytes) -> bytes:
    return _with_crc(message[:offset] + data + message[offset + len(data) :])


def test_corrupt_bucket_fields_raise_naming_the_problem() -> None:
    # qsgd 2 bits in buckets of 2 of 6 values: norms at header 24..27 (bucket 0) and body
    # 32..39 (buckets 1, 2), then ⌈6·3/8⌉ = 3 code bytes: 43 bytes.
    c = qsgd(2, bucket_size=2)
    x = torch.tensor([3.0, -4.0, 0.5, 0.25, -1.0, 2.0])
    good = c.encode(x, gen())
    assert len(good) == 32 + 8 + 3
    c.decode(good)
    cases = {
        "corrupt header: bucket size 0 \\(quantised values need a bucket size >= 1\\)": _patch(
            good, 20, struct.pack("<I", 0)
        ),
        # a norms array shorter than the bucket size implies: the header's bucket size 1
        # means 6 norms, 5 · 4 = 20 bytes after the header, where the message has 8
        "truncated message: 43 bytes, but n = 6, k = 6, bits = 2, bucket_size = 1 imply 55; "
        "the norms array of the 6 buckets would end at byte 52": _patch(
            good, 20, struct.pack("<I", 1)
        ),
        # cut inside the norms array
        "truncated message: 37 bytes, .* imply 43; the norms array of the 3 buckets would "
        "end at byte 40": good[:37],
        "truncated message: 42 bytes, but n = 6, k = 6, bits = 2, bucket_size = 2 imply 43$": (
            good[:-1]
        ),
        "over-long message: 44 bytes": good + b"\0",
        "negative quantisation norm -1.0 of bucket 0": _patch(good, 24, struct.pack("<f", -1)),
        "negative quantisation norm -2.0 of bucket 2": _patch(good, 36, struct.pack("<f", -2)),
        "quantisation norm inf of bucket 1 \\(a norm is a finite number >= 0, or NaN": _patch(
            good, 32, struct.pack("<f", math.inf)
        ),
        "quantisation norm inf of bucket 0": _patch(good, 24, struct.pack("<f", math.inf)),
        "CRC-32 mismatch": good[:33] + bytes([good[33] ^ 1]) + good[34:],
        "unsupported format version 1 \\(this decoder reads 2\\)": _patch(good, 2, b"\x01"),
        "k = 7 kept coordinates exceeds n = 6": _patch(good, 14, (7).to_bytes(6, "little")),
    }
    for expected, message in cases.items():
        with pytest.raises(ValueError, match=expected):
            c.decode(message)
    # a valid message of another bucket size
    with pytest.raises(ValueError, match=r"message bucket_size is 2, but .*bucket=3.* sends 3"):
        qsgd(2, bucket_size=3).decode(good)
    # raw float32 values have no buckets and no norm
    raw = Compressor("topk", 0.5).encode(x)
    Compressor("topk", 0.5).decode(raw)
    with pytest.raises(ValueError, match="bucket size 7 with bits 32"):
        Compressor("topk", 0.5).decode(_patch(raw, 20, struct.pack("<I", 7)))
    with pytest.raises(ValueError, match=r"norm 1\.5 with bits 32"):
        Compressor("topk", 0.5).decode(_patch(raw, 24, struct.pack("<f", 1.5)))
    # nothing sent (n = 0): no bucket, so the header's norm must be 0
    empty = qsgd(2).encode(torch.zeros(0), gen())
    assert len(empty) == 32 and qsgd(2).decode(empty).shape == (0,)
    with pytest.raises(ValueError, match=r"norm 2\.0 with k = 0"):
        qsgd(2).decode(_patch(empty, 24, struct.pack("<f", 2.0)))


def test_packing_and_dequantising_check_the_norm_count() -> None:
    header = Header(0, 0, 4, 0, 10, 10, 4)  # 10 values in buckets of 4: 3 norms
    codes = np.zeros(10, dtype=np.uint32)
    with pytest.raises(ValueError, match=r"10 values in buckets of 4 need 3 norm\(s\), got 2"):
        pack_message(header, None, np.ones(2, dtype=np.float32), codes)
    with pytest.raises(ValueError, match=r"bucket size must be in 1\.\.2\^32 - 1, got 0"):
        pack_message(Header(0, 0, 4, 0, 10, 10, 0), None, np.ones(1), codes)
    message = pack_message(header, None, np.ones(3, dtype=np.float32), codes)
    assert len(message) == HEADER_NBYTES + 8 + 7
    with pytest.raises(ValueError, match=r"10 codes in buckets of 4 need 3 norm\(s\), got 1"):
        dequantize(codes, np.ones(1), 4, 4)
    with pytest.raises(ValueError, match="bucket_size must be >= 1, got 0"):
        quantize(np.ones(3), 4, "nearest", None, 0)


# ----------------------------------------------------------------- non-finite buckets


def test_nan_in_one_bucket_decodes_to_nan_there_only() -> None:
    # buckets of 4; bucket 1 holds a NaN, bucket 2 an inf: their norms are NaN, their
    # codes 0, and they decode to NaN (the server sees a diverged update); buckets 0 and 3
    # decode as if the bad buckets were zeros (same uniforms, coordinate by coordinate).
    x = randn(16, seed=4)
    x[5] = np.nan
    x[10] = np.inf
    c = qsgd(3, bucket_size=4)
    y = c.compress(torch.from_numpy(x), gen(2)).numpy()
    assert np.isnan(y[4:12]).all()
    assert np.isfinite(y[:4]).all() and np.isfinite(y[12:]).all()
    codes, norms = quantize(x, 3, "stochastic", gen(2), 4)
    assert np.isnan(norms[1:3]).all() and np.all(codes[4:12] == 0)
    clean = x.copy()
    clean[4:12] = 0.0
    z = c.compress(torch.from_numpy(clean), gen(2)).numpy()
    assert y[:4].tobytes() == z[:4].tobytes() and y[12:].tobytes() == z[12:].tobytes()
    # a bucket whose norm overflows float32 is NaN too
    big = np.array([1.0, 2.0, 3e38, 3e38], dtype=np.float32)
    assert np.isnan(bucket_norms(big, 2)).tolist() == [False, True]
    # top-k ranks NaN above every number: the kept NaN's bucket decodes to NaN
    x = randn(2000, seed=5)
    x[1234] = np.nan
    y = topk_qsgd(0.1, 8, bucket_size=16).compress(torch.from_numpy(x), gen()).numpy()
    assert np.isnan(y[1234])
    assert 0 < int(np.isnan(y).sum()) <= 16  # its bucket: at most 16 kept values


# ----------------------------------------------------------------- the settings


def test_bucket_size_setting_is_validated_and_passed_on() -> None:
    # the default is QSGD's 512, on the config, the component and TEASQ-Fed
    assert DEFAULT_BUCKET_SIZE == 512
    assert CompressionConfig().bucket_size == 512 and TEASQConfig().bucket_size == 512
    assert COMPRESSIONS.get("qsgd").config_cls().bucket_size == 512
    assert qsgd(8) == qsgd(8, bucket_size=512) and topk_qsgd(0.1, 8).bucket_size == 512
    cfg = CompressionConfig(method="qsgd", bits=4, bucket_size=64)
    assert cfg.compressor() == qsgd(4, bucket_size=64)
    cfg = CompressionConfig(method="topk_qsgd", bucket_size=64)
    assert cfg.compressor() == topk_qsgd(0.1, 8, bucket_size=64)
    # the non-quantising methods ignore it
    assert CompressionConfig(method="topk", bucket_size=64).compressor() == Compressor("topk", 0.1)
    assert TEASQConfig(bucket_size=64).compression_config().bucket_size == 64

    for value in (0, -1, True, 2**32, 1.5):
        with pytest.raises(ConfigError) as err:
            CompressionConfig(method="qsgd", bucket_size=value)  # type: ignore[arg-type]
        assert str(err.value).startswith(f"bucket_size={value!r}: must be an integer >= 1")
    with pytest.raises(ValueError, match=r"bucket_size must be an integer in 1\.\.4294967295"):
        Compressor("none", 1.0, 8, bucket_size=0)
    # the command line: strings coerced, errors name the key as typed
    built = build_config(CompressionConfig, {"method": "qsgd", "bucket_size": "128"}, "c")
    assert built.compressor() == qsgd(8, bucket_size=128)
    quickstart = load_config_source("quickstart")
    tree = apply_overrides(quickstart, ["compression=topk_qsgd", "compression.bucket_size=64"])
    assert resolve(tree).config("compression").bucket_size == 64
    for overrides, key in [
        (["compression=qsgd", "compression.bucket_size=0"], "compression.bucket_size"),
        (["algorithm=teasq", "algorithm.bucket_size=0"], "algorithm.bucket_size"),
    ]:
        with pytest.raises(ConfigError) as err:
            resolve(apply_overrides(quickstart, overrides))
        assert str(err.value).startswith(f"{key}=0: must be an integer >= 1"), str(err.value)
    with pytest.raises(ConfigError, match=r"compression\.bucket_size=64"):  # not a topk field
        resolve(apply_overrides(quickstart, ["compression=topk", "compression.bucket_size=64"]))


def test_the_wrapper_uploads_the_bucketed_message() -> None:
    # FedAvg on a 4 → 3 linear model (n = 15), 4-bit QSGD in buckets of 4: 4 norms (3
    # after the header), ⌈15·5/8⌉ = 10 code bytes: 32 + 12 + 10 = 54 bytes, measured and
    # announced alike.
    alg = Compressed(
        FedAvg(FedAvgConfig(batch_size=5, lr=0.1)),
        CompressionConfig(method="qsgd", bits=4, bucket_size=4),
    )
    assert alg.upload_nbytes(15) == 32 + 12 + 10
    data = make_clients([12], 4, 3, seed=1)[0]
    model = FlatModel(linear_model(4, 3, seed=2))
    payload = Payload(model.params.clone(), 0)
    out = client_task(alg, model, data, payload, 0, 1)
    assert out.metrics["upload_bytes"] == 54
    assert 0 < out.metrics["compression_error"] < 1
