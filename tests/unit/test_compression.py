"""Compression of client updates: wire format, error bounds from the maths, error
feedback's conservation law, schedules, the config, and the ``Compressed`` wrapper."""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import pytest
import torch
from _fl_helpers import (
    client_task,
    flat_params,
    linear_model,
    make_clients,
    no_server_requests,
    run_rounds,
    task_seed,
)

from roost.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientResult,
    Payload,
    Strategy,
    UpdateOutput,
    drive,
)
from roost.algorithms.fedavg import FedAvg, FedAvgConfig, FedAvgStrategy
from roost.algorithms.scaffold import Scaffold, ScaffoldConfig
from roost.compression import (
    EF_MEMORY,
    Compressed,
    CompressionConfig,
    CompressionSchedule,
    Compressor,
    compression_generator,
    error_feedback_step,
    qsgd,
    randk,
    topk,
    topk_qsgd,
)
from roost.compression.sparsify import num_kept
from roost.compression.wire import BITMAP, DENSE, HEADER, INDEX_ARRAY, index_encoding
from roost.params import FlatModel
from roost.registry import ConfigError, build_config


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=gen(seed))


def fsum_sq(values: torch.Tensor) -> float:
    """Correctly rounded Σ v² (math.fsum), so two sums of the same terms compare exactly."""
    return math.fsum(float(v) ** 2 for v in values.double())


# --------------------------------------------------------------------------- sizes


def test_nbytes_by_hand() -> None:
    # 32-byte header, then indices, then values.
    # top-k 10% of n = 1000: k = 100; uint16 indices would be 200 bytes, the bitmap
    # ⌈1000/8⌉ = 125 is smaller; values 4·100 = 400 → 32 + 125 + 400 = 557.
    assert topk(0.1).nbytes(1000) == 557
    # n = 100, k = 10: uint8 indices 10 bytes < bitmap 13 → 32 + 10 + 40 = 82.
    assert topk(0.1).nbytes(100) == 82
    # QSGD 4 bits, dense: 5 bits a value (4 level bits + sign), ⌈5000/8⌉ = 625 → 657 with
    # one norm; the format-2 default buckets of 512 values give ⌈1000/512⌉ = 2 norms, the
    # second 4 bytes after the header's (format 2 added buckets: was 657) → 661.
    assert qsgd(4, bucket_size=1000).nbytes(1000) == 657
    assert qsgd(4).nbytes(1000) == 661
    # top-10% then 8-bit QSGD: 32 + 125 (bitmap) + ⌈100·9/8⌉ = 113 → 270.
    assert topk_qsgd(0.1, 8).nbytes(1000) == 270
    # q = 32, ratio 1: header + 4n, no indices.
    assert qsgd(32).nbytes(1000) == 32 + 4000
    # n = 70000 > 2^16 → uint32 indices; k = 70: 280 bytes < bitmap 8750 → 32 + 280 + 280.
    assert topk(0.001).nbytes(70000) == 592
    # k = ⌈ratio·n⌉ with the ratio read as the decimal it prints as: 0.07·100 is 7,
    # although the binary product is 7.000000000000001.
    assert num_kept(100, 0.07) == 7
    assert num_kept(10, 0.01) == 1  # ⌈0.1⌉ = 1: a non-empty vector always sends something


SIZES = [0, 1, 2, 7, 8, 9, 31, 255, 256, 257, 1000, 4099, 65536, 65537, 70001]
COMPRESSORS = [
    topk(0.001),
    topk(0.01),
    topk(0.3),
    topk(1.0),
    randk(0.05),
    randk(0.5, rescale=True),
    qsgd(1),
    qsgd(3),
    qsgd(8, "nearest"),
    qsgd(16),
    qsgd(32),
    topk_qsgd(0.1, 8),
    topk_qsgd(0.02, 2, "nearest"),
    topk_qsgd(0.9, 13),
]


@pytest.mark.parametrize("c", COMPRESSORS, ids=lambda c: c.describe())
def test_encoded_length_equals_formula(c: Compressor) -> None:
    # nbytes(n) is known before compressing; it must be the real length for every n,
    # across the uint8/uint16/uint32 boundaries and the bitmap/array switch.
    for n in SIZES:
        message = c.encode(randn(n, seed=n), gen(n))
        assert len(message) == c.nbytes(n), n
        assert c.decode(message).shape == (n,)


def test_every_index_encoding_is_exercised() -> None:
    assert index_encoding(1000, 1000) == DENSE
    assert index_encoding(1000, 100) == BITMAP  # 125 < 200
    assert index_encoding(1000, 62) == INDEX_ARRAY  # 124 < 125
    assert index_encoding(1000, 63) == BITMAP  # 126 > 125
    assert index_encoding(1000, 0) == INDEX_ARRAY  # k = 0: 0 bytes of indices


# --------------------------------------------------------------------------- top-k


def test_topk_by_hand_and_ties_to_lowest_index() -> None:
    # |x| = 0.5, 3, 2, 2, 1; k = ⌈0.4·5⌉ = 2: keep 3 (index 1), and of the tie 2 / −2 the
    # lower index 2. Error² = 0.5² + 2² + 1² = 5.25, exactly the dropped squares.
    x = torch.tensor([0.5, -3.0, 2.0, -2.0, 1.0])
    y = topk(0.4).compress(x)
    assert y.tolist() == [0.0, -3.0, 2.0, 0.0, 0.0]
    assert float(((x - y) ** 2).sum()) == 5.25
    # all equal: the first k
    assert topk(0.3).compress(torch.ones(10)).tolist() == [1.0] * 3 + [0.0] * 7


@pytest.mark.parametrize("ratio", [0.001, 0.05, 0.5, 0.999])
def test_topk_error_is_exactly_the_dropped_squares(ratio: float) -> None:
    # Kept values travel as float32 bit for bit and dropped ones become 0, so x − x̃ is
    # exactly x on the dropped set: ||x − x̃||² = Σ_{i∉S} x_i² with no rounding at all
    # (compared as correctly rounded fsums), and every kept |x_i| >= every dropped one.
    n = 5000
    x = randn(n, seed=3)
    y = topk(ratio).compress(x)
    kept = y != 0
    assert int(kept.sum()) == num_kept(n, ratio)
    assert torch.equal(y[kept], x[kept])
    assert fsum_sq(x - y) == fsum_sq(x[~kept])
    assert float(x[kept].abs().min()) >= float(x[~kept].abs().max())
    # and the bound ||x − x̃||² <= (1 − k/n) ||x||²
    assert fsum_sq(x - y) <= (1 - num_kept(n, ratio) / n) * fsum_sq(x)


def test_lossless_settings_return_the_identical_tensor() -> None:
    # ratio 1 and q = 32 send every float32 as is: decode(encode(x)) == x bit for bit,
    # including −0.0, subnormals and extremes.
    x = torch.cat([randn(997, seed=4), torch.tensor([-0.0, 1e-45, -3.4e38, 3.4e38])])
    for c in (topk(1.0), qsgd(32), Compressor()):
        y = c.compress(x)
        assert torch.equal(y, x)
        assert torch.equal(torch.signbit(y), torch.signbit(x))


# --------------------------------------------------------------------------- random-k


def test_randk_is_seeded_uniform_and_unbiased_when_rescaled() -> None:
    n, ratio, draws = 20, 0.25, 4000  # k = 5, P(i ∈ S) = 1/4
    x = randn(n, seed=5)
    c = randk(ratio, rescale=True)
    assert c.encode(x, gen(1)) == c.encode(x, gen(1))  # same seed, same message
    assert c.encode(x, gen(1)) != c.encode(x, gen(2))
    g = gen(7)
    ys = torch.stack([c.compress(x, g) for _ in range(draws)])
    assert all(int((y != 0).sum()) == 5 for y in ys[:50])
    # inclusion frequency: binomial, σ = sqrt(p(1−p)/T) = 0.00685; allow 5σ = 0.035
    freq = (ys != 0).double().mean(0)
    assert torch.all((freq - 0.25).abs() < 0.035), freq
    # rescaled by n/k = 4: E = x; Var((n/k) x_i 1[i∈S]) = 16 · p(1−p) x_i² = 3 x_i²,
    # σ of the mean = sqrt(3/T)|x_i| = 0.0274|x_i|; allow 5σ = 0.137|x_i|
    mean = ys.double().mean(0)
    assert torch.all((mean - x.double()).abs() <= 0.137 * x.double().abs()), mean - x
    # without rescale the kept values are x itself
    y = randk(ratio).compress(x, gen(3))
    assert torch.equal(y[y != 0], x[y != 0])


def test_randomized_compressors_need_a_generator() -> None:
    with pytest.raises(ValueError, match=r"torch\.Generator"):
        randk(0.5).encode(randn(10))
    with pytest.raises(ValueError, match=r"torch\.Generator"):
        qsgd(4).encode(randn(10))
    qsgd(4, "nearest").encode(randn(10))  # deterministic: no generator needed
    topk(0.5).encode(randn(10))


# --------------------------------------------------------------------------- QSGD


def test_qsgd_by_hand() -> None:
    # x = (3, −4), ||x|| = 5. Two bits: s = 3, r = 3·|x|/5 = (1.8, 2.4).
    # Nearest: levels (2, 2) → x̃ = ±5·2/3 = (3.333…, −3.333…); errors 1/3, 2/3 <= 5/6.
    x = torch.tensor([3.0, -4.0])
    y = qsgd(2, "nearest").compress(x)
    assert y.tolist() == pytest.approx([10 / 3, -10 / 3], rel=1e-7)
    # One bit: s = 1, r = (0.6, 0.8): x̃_0 ∈ {0, 5} with P(5) = 0.6, x̃_1 ∈ {0, −5} with
    # P(−5) = 0.8; so only those values appear, and their means are 3 and −4.
    g = gen(11)
    ys = torch.stack([qsgd(1).compress(x, g) for _ in range(2000)])
    assert set(ys[:, 0].tolist()) == {0.0, 5.0} and set(ys[:, 1].tolist()) == {0.0, -5.0}
    # σ of the mean = 5·sqrt(p(1−p)/T) = 0.055 and 0.045; allow 5σ
    assert float(ys[:, 0].mean()) == pytest.approx(3.0, abs=0.28)
    assert float(ys[:, 1].mean()) == pytest.approx(-4.0, abs=0.23)


@pytest.mark.parametrize("bits", [1, 2, 5])
def test_qsgd_is_unbiased_and_within_one_level(bits: int) -> None:
    # Stochastic rounding to levels ||x||·l/s: each draw is within one level spacing,
    # |x̃_i − x_i| < ||x||/s, and E[x̃] = x. Var(x̃_i) = (||x||/s)² p(1−p) <= (||x||/2s)²,
    # so the mean of T draws is within 5σ = 5 ||x|| / (2 s √T) of x_i.
    n, draws = 16, 3000
    s = 2**bits - 1
    x = randn(n, seed=bits)
    norm = float(x.double().norm())
    g = gen(bits)
    ys = torch.stack([qsgd(bits).compress(x, g) for _ in range(draws)]).double()
    # the stored norm is rounded up to float32: slack of a few float32 ulps
    assert float((ys - x.double()).abs().max()) <= norm / s * (1 + 1e-6)
    tol = 5 * norm / (2 * s * math.sqrt(draws))
    assert float((ys.mean(0) - x.double()).abs().max()) <= tol


@pytest.mark.parametrize("bits", [1, 3, 8, 16])
def test_qsgd_nearest_error_at_most_half_a_level(bits: int) -> None:
    # Nearest rounding: |x̃_i − x_i| <= ||x||/(2s) (plus float32 rounding of x̃), and it
    # is deterministic.
    x = randn(3000, seed=bits)
    s = 2**bits - 1
    norm = float(x.double().norm())
    c = qsgd(bits, "nearest")
    y = c.compress(x)
    err = (y.double() - x.double()).abs()
    # slack: the stored norm is rounded up (relative 2^-24), and x̃ is rounded to float32
    assert float(err.max()) <= norm / (2 * s) * (1 + 1e-6) + 1e-7 * float(x.abs().max())
    assert c.encode(x) == c.encode(x)


def test_topk_then_qsgd_splits_its_error() -> None:
    # C = Q(TopK(x)): same support as top-k; ||x − C(x)||² = dropped² + quantisation² of
    # the kept values, and each kept error is below one level of the *kept* norm.
    n, ratio, bits = 2000, 0.05, 3
    x = randn(n, seed=8)
    y = topk_qsgd(ratio, bits).compress(x, gen(0))
    support = topk(ratio).compress(x) != 0
    assert torch.all(y[~support] == 0)
    kept_norm = float(x[support].double().norm())
    assert float((y[support] - x[support]).abs().max()) <= kept_norm / 7 * (1 + 1e-6)
    total = fsum_sq(x - y)
    assert total == pytest.approx(fsum_sq(x[~support]) + fsum_sq(x[support] - y[support]))


def test_non_finite_input_decodes_to_nan() -> None:
    # A diverged update must not be quantised into a finite one.
    x = torch.tensor([1.0, float("nan"), 2.0, 0.5])
    assert torch.isnan(qsgd(4).compress(x, gen())).all()
    # top-k ranks NaN above every number, so it is sent (k = 1 keeps only it)
    assert torch.isnan(topk(0.25).compress(x)).tolist() == [False, True, False, False]


# --------------------------------------------------------------------------- corrupt


def _with_crc(message: bytes) -> bytes:
    """``message`` with its CRC recomputed (to reach the checks behind the checksum)."""
    head, body = message[: HEADER.size], message[HEADER.size + 4 :]
    return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


def _patch(message: bytes, offset: int, data: bytes) -> bytes:
    return _with_crc(message[:offset] + data + message[offset + len(data) :])


def _set_one_more_bit(message: bytes, start: int) -> bytes:
    """Set exactly one clear bit at or after byte ``start`` (CRC fixed up)."""
    for i in range(start, len(message)):
        b = message[i]
        if b != 0xFF:
            return _patch(message, i, bytes([b | (~b & (b + 1))]))  # lowest clear bit
    raise AssertionError("no clear bit")


def test_corrupt_or_truncated_messages_raise_naming_the_problem() -> None:
    c = topk_qsgd(0.1, 8)  # n = 1000 → bitmap indices
    good = c.encode(randn(1000), gen())
    c.decode(good)
    cases = {
        "truncated message: 10 bytes, the header alone is 32": good[:10],
        # format 2 names the bucket size too (its norms are part of the length)
        "truncated message: 269 bytes, but n = 1000, k = 100, bits = 8, bucket_size = 512 "
        "imply 270": good[:-1],
        "over-long message: 271 bytes": good + b"\0",
        "CRC-32 mismatch": good[:100] + bytes([good[100] ^ 1]) + good[101:],
        "magic": b"XX" + good[2:],
        "format version 9": _patch(good, 2, b"\x09"),
        "bits 20": _patch(good, 5, b"\x14"),
        # format 2: k is a uint48 at bytes 14..19 (was a uint64 at 16..23)
        "k = 2000 kept coordinates exceeds n = 1000": _patch(
            good, 14, (2000).to_bytes(6, "little")
        ),
        "index encoding 1, but n = 1000, k = 100 imply 2": _patch(good, 4, b"\x01"),
        "negative quantisation norm": _patch(good, 24, struct.pack("<f", -1.0)),
        "bitmap has 101 set bits": _set_one_more_bit(good, 32),
    }
    for expected, message in cases.items():
        with pytest.raises(ValueError, match=expected):
            c.decode(message)
    # a valid message of other settings: k does not match this compressor's ratio
    with pytest.raises(ValueError, match=r"message k is 100, but .* sends 200"):
        topk_qsgd(0.2, 8).decode(good)
    with pytest.raises(ValueError, match="message bits is 8"):
        topk_qsgd(0.1, 4).decode(good)


def test_corrupt_index_array_and_padding_raise() -> None:
    # n = 100, k = 10: uint8 index array at bytes 32..41, then ⌈10·5/8⌉ = 7 value bytes
    # of which the last 6 bits are padding.
    c = topk_qsgd(0.1, 4)
    good = c.encode(randn(100), gen())
    assert len(good) == 32 + 10 + 7
    repeated = _patch(good, 33, good[32:33])  # second index = first
    with pytest.raises(ValueError, match=r"indices not strictly increasing in \[0, 100\)"):
        c.decode(repeated)
    with pytest.raises(ValueError, match="nonzero padding bits after the value codes"):
        c.decode(_patch(good, len(good) - 1, bytes([good[-1] | 1])))


# --------------------------------------------------------------------------- error feedback


def test_error_feedback_by_hand() -> None:
    # Δ = (3, −1, 2, 0.5) three times, top-1 (ratio 0.25), e_0 = 0:
    #   p_1 = (3, −1, 2, .5)  send (3, 0, 0, 0)  e_1 = (0, −1, 2, .5)
    #   p_2 = (3, −2, 4, 1)   send (0, 0, 4, 0)  e_2 = (3, −2, 0, 1)
    #   p_3 = (6, −3, 2, 1.5) send (6, 0, 0, 0)  e_3 = (0, −3, 2, 1.5)
    # Σ sent + e_3 = (9, −3, 6, 1.5) = 3Δ exactly (all values are dyadic: no rounding).
    delta = torch.tensor([3.0, -1.0, 2.0, 0.5])
    c = topk(0.25)
    memory = None
    sent, memories = [], []
    for _ in range(3):
        step = error_feedback_step(delta, memory, c.compress)
        sent.append(step.transmitted.tolist())
        memories.append(step.memory.tolist())
        memory = step.memory
    assert sent == [[3, 0, 0, 0], [0, 0, 4, 0], [6, 0, 0, 0]]
    assert memories == [[0, -1, 2, 0.5], [3, -2, 0, 1], [0, -3, 2, 1.5]]
    assert memory is not None
    assert torch.equal(torch.tensor(sent).sum(0) + memory, 3 * delta)


def test_error_feedback_conserves_the_sum_up_to_float_rounding() -> None:
    # Σ_t Δ̃_t + e_T = Σ_t Δ_t; in float32 each step rounds p_t = fl(Δ_t + e_{t−1}) and
    # e_t = fl(p_t − Δ̃_t), each by at most u = 2^-24 of its magnitude, so per coordinate
    # |Σ Δ̃ + e_T − Σ Δ| <= u Σ_t (|p_t| + |e_t|) (computed from the run itself).
    c = topk_qsgd(0.1, 3)
    g = gen(0)
    n, steps = 500, 20
    memory = None
    total_sent = torch.zeros(n, dtype=torch.float64)
    total_in = torch.zeros(n, dtype=torch.float64)
    bound = torch.zeros(n, dtype=torch.float64)
    for t in range(steps):
        delta = randn(n, seed=100 + t)
        step = error_feedback_step(delta, memory, lambda p: c.compress(p, g))
        memory = step.memory
        total_sent += step.transmitted.double()
        total_in += delta.double()
        bound += 2.0**-24 * (step.corrected.double().abs() + step.memory.double().abs())
    assert memory is not None
    gap = (total_sent + memory.double() - total_in).abs()
    assert torch.all(gap <= bound)
    assert float(gap.max()) > 0  # the rounding is real, the bound is what makes it exact


# --------------------------------------------------------------------------- schedule


def test_schedules_by_hand() -> None:
    # tighten: s_t = max(0.02, 0.1·0.5^t) = 0.1, 0.05, 0.025, 0.02;
    #          q_t = max(2, 8 − ⌊t/10⌋): 8 for t < 10, 7 at 10, 2 from t = 60 on.
    s = CompressionSchedule("tighten", 0.1, 8, 0.5, 0.02, 10, 2)
    assert [s.ratio_at(t) for t in range(4)] == [0.1, 0.05, 0.025, 0.02]
    assert [s.bits_at(t) for t in (0, 9, 10, 59, 60, 1000)] == [8, 8, 7, 3, 2, 2]
    # relax: s_t = min(0.3, 0.1·0.5^{−t}) = 0.1, 0.2, 0.3; q_t = min(6, 4 + ⌊t/5⌋)
    r = CompressionSchedule("relax", 0.1, 4, 0.5, 0.3, 5, 6)
    assert [r.ratio_at(t) for t in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert [r.bits_at(t) for t in (0, 4, 5, 14, 15)] == [4, 4, 5, 6, 6]
    assert CompressionSchedule("constant", 0.1, 8).bits_at(10**6) == 8
    with pytest.raises(ValueError, match="tightening"):
        CompressionSchedule("tighten", 0.1, 8, 0.5, 0.2, 10, 2)


def test_config_compressor_and_size_follow_the_schedule() -> None:
    cfg = CompressionConfig(
        method="topk_qsgd",
        ratio=0.1,
        bits=8,
        schedule="tighten",
        ratio_gamma=0.5,
        ratio_limit=0.02,
        bits_period=10,
        bits_limit=2,
    )
    c0, c1, c30 = cfg.compressor(0), cfg.compressor(1), cfg.compressor(30)
    assert c0 == topk_qsgd(0.1, 8) and c1 == topk_qsgd(0.05, 8) and c30 == topk_qsgd(0.02, 5)
    alg = Compressed(FedAvg(FedAvgConfig()), cfg)
    # n = 1000 at version 30: k = 20, uint16 array 40 < bitmap 125; ⌈20·6/8⌉ = 15 → 87
    assert alg.upload_nbytes(1000, version=30) == 32 + 40 + 15 == c30.nbytes(1000)
    assert alg.upload_nbytes(1000) == 270  # version 0: as test_nbytes_by_hand


# --------------------------------------------------------------------------- config


def test_config_errors_name_field_value_and_allowed() -> None:
    # Each error is "field=value: what is allowed" (ConfigError, as every roost config).
    cases = [
        ({"method": "zip"}, "method=zip: allowed: none, topk, randk, qsgd, topk_qsgd"),
        ({"method": "topk", "ratio": 0}, "ratio=0: must be a number in (0, 1]"),
        ({"method": "qsgd", "bits": 17}, "bits=17: must be an integer in 1..16, or 32"),
        ({"bits": True}, "bits=True: must be an integer"),
        ({"error_feedback": True}, "error_feedback=True: needs a compressing method"),
        ({"method": "topk", "rescale": True}, "rescale=True: only applies to method=randk"),
        ({"rounding": "floor"}, "rounding=floor: allowed: stochastic, nearest"),
        (
            {"method": "topk", "schedule": "tighten", "ratio_limit": 0.5},
            "ratio_limit=0.5: schedule=tighten decays the kept fraction down to s_min: "
            "needs <= ratio (0.1)",
        ),
        (
            {"method": "qsgd", "schedule": "relax", "bits": 8, "bits_limit": 4},
            "bits_limit=4: schedule=relax raises the bits up to q_max: needs >= bits (8)",
        ),
        ({"bits_period": 0}, "bits_period=0: must be an integer >= 1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError) as err:
            CompressionConfig(**kwargs)
        assert str(err.value).startswith(message), (kwargs, str(err.value))
    # the command-line path: strings are coerced and errors carry the key as typed
    cfg = build_config(CompressionConfig, {"method": "topk_qsgd", "bits": "4"}, "c")
    assert cfg.compressor() == topk_qsgd(0.1, 4)
    with pytest.raises(ConfigError) as err:
        build_config(CompressionConfig, {"method": "topk", "ratio": "2"}, "c")
    assert str(err.value) == "c.ratio=2: must be a number in (0, 1] (the kept fraction)"


# --------------------------------------------------------------------------- wrapper


def _clients() -> list:
    return make_clients([12, 7, 20], 4, 3, seed=1)


def test_wrapper_with_method_none_is_fedavg_exactly() -> None:
    # method=none returns the inner result untouched: three rounds give the same model
    # bit for bit, and the upload is FedAvg's 4n bytes (n = 4·3 + 3 = 15 → 60).
    cfg = FedAvgConfig(batch_size=5, lr=0.1)
    plain = run_rounds(FedAvg(cfg), linear_model(4, 3, seed=2), _clients(), 3)
    alg = Compressed(FedAvg(cfg), CompressionConfig())
    wrapped = run_rounds(alg, linear_model(4, 3, seed=2), _clients(), 3)
    assert torch.equal(wrapped.params, plain.params)
    assert alg.upload_nbytes(15) == 60 and alg.client_state_spec(15) == {}


def test_wrapper_with_lossless_topk_is_fedavg_up_to_the_float32_delta() -> None:
    # top-k with ratio 1 and float32 values is lossless: it transmits d = fl(w − w^t) bit
    # for bit, and the server gets s = fl(w^t + d), exactly what any float32 *delta*
    # upload gives. s == w wherever the subtraction was exact (always when
    # w^t/2 <= w <= 2 w^t, Sterbenz); elsewhere, with u = 2^-24,
    #     s − w = (w − w^t) ε₁ (1 + ε₂) + w ε₂,  |ε| <= u  ⇒  |s − w| <= u (|w − w^t| + |w|)(1 + u).
    # So the model is FedAvg's only up to that rounding: bit-exact equality with FedAvg is
    # impossible for a float32 delta (a coordinate moving from 0.033 to 0.015 needs more
    # bits in w − w^t than float32 has). SCAFFOLD, which uploads a delta itself, is
    # bit-exact (test below).
    cfg = FedAvgConfig(batch_size=5, lr=0.1)
    alg = Compressed(FedAvg(cfg), CompressionConfig(method="topk", ratio=1.0))
    assert alg.upload_nbytes(15) == 32 + 4 * 15  # header + 4n, no indices

    u = 2.0**-24
    inexact = 0
    for cid, data in enumerate(_clients()):
        payload = Payload(flat_params(linear_model(4, 3, seed=2)), 0)
        model = FlatModel(linear_model(4, 3, seed=2))
        w = client_task(FedAvg(cfg), model, data, payload, cid, 1).result.tensors["params"]
        w = w.clone()
        s = client_task(alg, model, data, payload, cid, 1).result.tensors["params"]
        w0 = payload.params
        d = w - w0
        assert torch.equal(s, w0 + d)
        exact = d.double() == w.double() - w0.double()
        sterbenz = ((w0 / 2 <= w) & (w <= 2 * w0)) | ((2 * w0 <= w) & (w <= w0 / 2))
        assert torch.all(exact[sterbenz])
        assert torch.equal(s[exact], w[exact])
        inexact += int((s != w).sum())
        bound = u * (d.double().abs() + w.double().abs()) * (1 + u)
        assert torch.all((s.double() - w.double()).abs() <= bound)
    # the rounding is real: some of the 45 client coordinates differ (how many depends on
    # the trained models' last bits, i.e. on the CPU's BLAS kernels: 3 measured on one
    # machine, 2 on another), and each is within the bound above
    assert 1 <= inexact <= 45 // 3

    # Three rounds: the server models agree to a few float32 ulps (|w| < 0.5, so one ulp
    # is <= 3e-8; measured: 1 ulp on 2-3 of the 15 coordinates).
    plain = run_rounds(FedAvg(cfg), linear_model(4, 3, seed=2), _clients(), 3)
    wrapped = run_rounds(alg, linear_model(4, 3, seed=2), _clients(), 3)
    assert torch.allclose(wrapped.params, plain.params, rtol=0, atol=1e-7)


def test_wrapper_sends_what_the_compressor_decodes_and_keeps_the_residual() -> None:
    # topk_qsgd with error feedback, two tasks of client 1 (n = 15): recompute each task's
    # message independently (same inner FedAvg task, same compression generator) and
    # check the returned model is w^t + decode(encode(Δ + e)), the state is e' = p − Δ̃,
    # and the metrics are the message's real length and ||p − Δ̃|| / ||p||.
    cfg = FedAvgConfig(batch_size=5, lr=0.1)
    comp = CompressionConfig(method="topk_qsgd", ratio=0.4, bits=3, error_feedback=True)
    alg = Compressed(FedAvg(cfg), comp)
    assert alg.client_state_spec(15) == {EF_MEMORY: 15}
    c = comp.compressor()
    assert c is not None
    data = _clients()[1]
    model = FlatModel(linear_model(4, 3, seed=2))
    reference = FlatModel(linear_model(4, 3, seed=2))
    payload = Payload(model.params.clone(), version=0)
    states: dict[int, Any] = {}
    memory = torch.zeros(15)
    for rnd in (1, 2):
        out = client_task(alg, model, data, payload, 1, rnd, states)
        w = client_task(FedAvg(cfg), reference, data, payload, 1, rnd).result.tensors["params"]
        p = (w - payload.params) + memory
        message = c.encode(p, compression_generator(task_seed(1, rnd)))
        received = c.decode(message)
        assert torch.equal(out.result.tensors["params"], payload.params + received)
        assert torch.equal(states[1][EF_MEMORY], p - received)
        # k = 6 of 15: bitmap ⌈15/8⌉ = 2 < 6 uint8 indices; ⌈6·4/8⌉ = 3 value bytes
        assert out.metrics["upload_bytes"] == len(message) == alg.upload_nbytes(15) == 32 + 2 + 3
        assert out.metrics["compression_error"] == pytest.approx(
            float((p - received).norm() / p.norm()), rel=1e-6
        )
        assert "train_loss" in out.metrics
        memory = states[1][EF_MEMORY]
        assert float(memory.norm()) > 0  # something was held back


def test_wrapper_on_scaffold_compresses_delta_and_keeps_both_states() -> None:
    # SCAFFOLD uploads "delta" and "control_delta": only delta is compressed; the upload
    # is 4n (control_delta, float32) + the message; client state holds "control" and
    # "ef_memory". With ratio 1 and q = 32 (lossless) two rounds equal plain SCAFFOLD.
    cfg = ScaffoldConfig(batch_size=5, lr=0.1)
    n = 15
    lossy = Compressed(
        Scaffold(cfg), CompressionConfig(method="topk", ratio=0.2, error_feedback=True)
    )
    assert lossy.client_state_spec(n) == {"control": n, EF_MEMORY: n}
    # k = ⌈0.2·15⌉ = 3: bitmap ⌈15/8⌉ = 2 < 3 uint8 indices; 4·3 = 12 value bytes
    assert lossy.upload_nbytes(n) == 4 * n + 32 + 2 + 12
    strategy = run_rounds(lossy, linear_model(4, 3, seed=2), _clients(), 2)
    assert torch.isfinite(strategy.params).all()

    plain = run_rounds(Scaffold(cfg), linear_model(4, 3, seed=2), _clients(), 2)
    lossless = Compressed(Scaffold(cfg), CompressionConfig(method="topk", ratio=1.0))
    again = run_rounds(lossless, linear_model(4, 3, seed=2), _clients(), 2)
    assert torch.equal(again.params, plain.params)


class _Fetching(Algorithm):
    """A generator procedure: asks the server for a tensor mid-task, returns params + it."""

    def make_strategy(self) -> Strategy:
        return FedAvgStrategy()

    def update(self, ctx: Any, model: Any, data: Any, payload: Any, state: Any) -> Any:
        shift = yield "fetch"
        return UpdateOutput(ClientResult({"params": payload.params + shift}, 1.0), None, {})


def test_wrapper_drives_generator_procedures() -> None:
    # The wrapped procedure is still a generator; driven with shift = (3, −1, 2, 0.5) and
    # top-1 compression the server gets w + (3, 0, 0, 0).
    alg = Compressed(_Fetching(FedAvgConfig()), CompressionConfig(method="topk", ratio=0.25))
    w = torch.tensor([1.0, 1.0, 1.0, 1.0])
    ctx = ClientContext(0, 1, 5, 1, gen())
    out = alg.update(ctx, None, None, Payload(w, 0), None)  # type: ignore[arg-type]
    assert not isinstance(out, UpdateOutput)
    done = drive(out, lambda request: torch.tensor([3.0, -1.0, 2.0, 0.5]))
    assert done.result.tensors["params"].tolist() == [4.0, 1.0, 1.0, 1.0]
    # k = 1 of 4: one uint8 index ties the 1-byte bitmap (a tie sends the array); 4 value bytes
    assert done.metrics["upload_bytes"] == 32 + 1 + 4


def test_wrapper_rejects_results_without_params_or_delta() -> None:
    class _Odd(_Fetching):
        def update(self, ctx: Any, model: Any, data: Any, payload: Any, state: Any) -> Any:
            return UpdateOutput(ClientResult({"d": payload.params}, 1.0), None, {})

    alg = Compressed(_Odd(FedAvgConfig()), CompressionConfig(method="topk", ratio=0.5))
    ctx = ClientContext(0, 1, 5, 1, gen())
    with pytest.raises(TypeError, match=r"'params' or 'delta'; _Odd returns \['d'\]"):
        out = alg.update(ctx, None, None, Payload(torch.ones(4), 0), None)  # type: ignore[arg-type]
        drive(out, no_server_requests)
