"""TEASQ-Fed: the cap and the cache weights by hand, the reductions of ALGORITHMS.md §5
(no trustworthy oracle exists: the paper body was not read), real upload sizes,
and learning on the quickstart with compression on."""

from __future__ import annotations

import math

import pytest
import torch
from _async_helpers import HandSystem, make_engine

from roost.algorithms import ALGORITHMS, TEASQ, TEASQConfig, TEASQStrategy
from roost.algorithms.asynchronous import Arrival, AsyncStrategy
from roost.algorithms.base import ClientResult, Contribution
from roost.compression import EF_MEMORY, topk_qsgd
from roost.config import RunConfig, apply_overrides, load_config_source, resolve
from roost.engine import Engine
from roost.engine.asynchronous import AsyncPolicy
from roost.registry import ConfigError
from roost.runner import run
from roost.system import HeterogeneousConfig, HeterogeneousSystem
from roost.system.model import ConstantConfig, ConstantSystem

MLP_PARAMS = 64 * 16 + 16 + 16 * 10 + 10  # make_engine's 64-16-10 MLP: 1210
PLAIN = {"compression": "none", "mu": 0.0}  # no compression, no proximal term
SYSTEM = HeterogeneousSystem(HeterogeneousConfig(speed_sigma=1.0), seed=0)


def _arrival(client: int, n: int, staleness: int) -> Arrival:
    return Arrival(client, 0, staleness, 0.0, 1.0, 1.0, n, n)


def _contribution(delta: list[float]) -> Contribution:
    c = Contribution()
    c.fold(ClientResult({"delta": torch.tensor(delta)}, 1.0), 0)
    return c


def _teasq(engine: Engine) -> TEASQStrategy:
    assert isinstance(engine.strategy, TEASQStrategy)
    return engine.strategy


def _cap(engine: Engine) -> int:
    """The engine's cap on tasks in flight."""
    assert isinstance(engine.policy, AsyncPolicy)
    return engine.policy.concurrency


def _capped(engine: Engine) -> list[int]:
    """Instrument engine.launch (as test_event_engine.py does): the tasks in flight after
    every dispatch."""
    seen: list[int] = []
    launch = engine.launch

    def counting(flight, payload):
        launch(flight, payload)
        seen.append(len(engine.flights))

    engine.launch = counting  # type: ignore[method-assign]
    return seen


def test_concurrency_cap_by_hand():
    # C = ⌈c·K⌉: 0.1·100 = 10; 0.25·10 = 2.5 -> 3; 0.1·5 = 0.5 -> 1; 1·7 = 7. The float
    # product 0.07·100 = 7.000000000000001 must give 7 (a bare ceil gives 8).
    assert math.ceil(0.07 * 100) == 8
    cases = [(0.1, 100, 10), (0.25, 10, 3), (0.1, 5, 1), (1.0, 7, 7), (0.07, 100, 7)]
    for c, k, cap in cases:
        strategy = TEASQStrategy(TEASQConfig(concurrency_fraction=c))
        strategy.initialize(torch.zeros(2), k)
        assert strategy.concurrency == cap, (c, k)
    # an explicit concurrency overrides c
    strategy = TEASQStrategy(TEASQConfig(concurrency_fraction=0.1, concurrency=7))
    strategy.initialize(torch.zeros(2), 100)
    assert strategy.concurrency == 7


def test_cache_weights_by_hand():
    # M = 3, a = 0.5; n = 10, 20, 30 with staleness 0, 3, 8: s = 1, 1/2, 1/3, so n·s = 10
    # each and ω = 1/3 each; Δ̃ = e1, e2, 3·e3 -> w = 0 + (1/3, 1/3, 1), version 1.
    strategy = TEASQStrategy(TEASQConfig(cache_size=3))
    strategy.initialize(torch.zeros(3), 10)
    deltas = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]
    arrivals = [_arrival(0, 10, 0), _arrival(1, 20, 3), _arrival(2, 30, 8)]
    assert strategy.arrivals_until_step() == 3
    stepped = [strategy.accept(a, _contribution(d)) for a, d in zip(arrivals, deltas, strict=True)]
    assert stepped == [False, False, True]
    metrics = strategy.server_step(1)
    assert strategy.version == 1
    assert strategy.params.tolist() == pytest.approx([1 / 3, 1 / 3, 1.0], abs=1e-7)
    assert metrics["update_norm"] == pytest.approx(math.sqrt(2 / 9 + 1), rel=1e-6)
    assert strategy.arrivals_until_step() == 3  # cache cleared

    # weighted=False: ω ∝ s = 1, 1/2, 1/3 (sum 11/6) -> 6/11, 3/11, 2/11; times 3 on e3
    strategy = TEASQStrategy(TEASQConfig(cache_size=3, weighted=False))
    strategy.initialize(torch.zeros(3), 10)
    for a, d in zip(arrivals, deltas, strict=True):
        strategy.accept(a, _contribution(d))
    strategy.server_step(1)
    assert strategy.params.tolist() == pytest.approx([6 / 11, 3 / 11, 6 / 11], abs=1e-7)


class HandCache(AsyncStrategy):
    """The reference of the §5 reduction: keeps every arrival with its delta and, every
    M arrivals, applies Σ ω_j Δ_j with ω_j = n_j (1 + d_j)^(-1/2) / Σ n_i (1 + d_i)^(-1/2)
    recomputed from the Arrivals (and the uniform-weight model, for comparison)."""

    def __init__(self, cache: int, concurrency: int) -> None:
        super().__init__()
        self.concurrency = concurrency
        self.arrivals_per_step = self.cache = cache
        self.items: list[tuple[Arrival, torch.Tensor]] = []
        self.log: list[Arrival] = []
        self.uniform = torch.empty(0)

    def initialize(self, params, num_clients=0):
        super().initialize(params, num_clients)
        self.uniform = self.params.clone()

    def accept(self, arrival, contribution):
        self.items.append((arrival, contribution.mean("delta")))
        self.log.append(arrival)
        return len(self.items) == self.cache

    def arrivals_until_step(self):
        return self.cache - len(self.items)

    def server_step(self, step):
        raw = [a.num_examples * (1 + a.staleness) ** -0.5 for a, _ in self.items]
        total = sum(raw)
        update = sum(w / total * d.double() for w, (_, d) in zip(raw, self.items, strict=True))
        mean = sum(d.double() for _, d in self.items) / len(self.items)
        assert isinstance(update, torch.Tensor) and isinstance(mean, torch.Tensor)
        self.params = self.params + update.float()
        self.uniform = self.uniform + mean.float()
        self.version += 1
        self.items = []
        return {}


def test_no_compression_no_prox_full_cache_equals_buffered_async(monkeypatch):
    """ALGORITHMS.md §5: compression=none, μ = 0 and a cache as large as the tasks in
    flight (M = C = ⌈0.25 · 12⌉ = 3) is buffered asynchronous aggregation with
    ω ∝ n (1 + d)^(-1/2). The reference steps FedBuff's clients (plain local SGD deltas,
    the same dispatches and task seeds) with HandCache's by-hand weights on heterogeneous
    devices and Dirichlet client sizes; TEASQ-Fed must see the same Arrivals and reach the
    same model (float64 sums in another order, rounded to float32: 1e-6)."""
    run_cfg = RunConfig(rounds=8, clients=12, clients_per_round=3, eval_every=0)
    params = {**PLAIN, "concurrency_fraction": 0.25, "cache_size": 3}
    teasq, _ = make_engine(run_cfg, SYSTEM, "teasq", params, partition="dirichlet")
    strategy = _teasq(teasq)
    seen: list[Arrival] = []
    accept = strategy.accept

    def recording(arrival, contribution):
        seen.append(arrival)
        return accept(arrival, contribution)

    monkeypatch.setattr(strategy, "accept", recording)
    h = teasq.run()
    reference = HandCache(cache=3, concurrency=3)
    ref, _ = make_engine(run_cfg, SYSTEM, "fedbuff", strategy=reference, partition="dirichlet")
    ref.run()

    assert _cap(teasq) == 3
    assert seen == reference.log and len(seen) == 24  # 8 steps of M = 3
    assert h.series("clients") == [3] * 8
    assert max(h.series("staleness_max")) >= 1  # the staleness weights were exercised
    assert len({a.num_examples for a in seen}) > 3  # and the n_j differ
    diff = (teasq.strategy.params - reference.params).abs().max().item()
    assert diff < 1e-6
    # the weights matter: uniform averaging of the same deltas is far from it
    assert (teasq.strategy.params - reference.uniform).abs().max().item() > 1e-4


@pytest.mark.parametrize(("other", "mu"), [("fedavg", 0.0), ("fedprox", 0.01)])
def test_one_cache_of_every_client_from_one_version_is_weighted_fedavg(other, mu):
    """Equal latencies, c = 1 and M = K = 5: every step caches all 5 clients' deltas from
    the same version (staleness 0, so ω_j = n_j / Σ n), which is FedAvg weighted by n_k
    (μ = 0) and FedProx with the same μ (the proximal term is FedProx's). w + Σ ω (y − w)
    against Σ ω y in float32: equal to 1e-6."""
    run_cfg = RunConfig(rounds=3, clients=5, clients_per_round=5, eval_every=0)
    system = ConstantSystem(ConstantConfig(duration_s=2.0))
    params = {"compression": "none", "mu": mu, "concurrency_fraction": 1.0, "cache_size": 5}
    teasq, _ = make_engine(run_cfg, system, "teasq", params, partition="dirichlet")
    h = teasq.run()
    avg, _ = make_engine(run_cfg, system, other, {"mu": mu} if mu else {}, partition="dirichlet")
    avg.run()
    assert h.series("virtual_time_s") == [2.0, 4.0, 6.0]
    assert h.series("staleness_max") == [0, 0, 0]
    assert (teasq.strategy.params - avg.strategy.params).abs().max().item() < 1e-6


def test_the_concurrency_cap_is_never_exceeded():
    """30 clients, default c = 0.1: C = ⌈3⌉ = 3. On heterogeneous devices the slots are
    refilled as results arrive, so 3 tasks are in flight after every dispatch after the
    first ones, never 4; concurrency=5 overrides c."""
    run_cfg = RunConfig(rounds=10, clients=30, clients_per_round=10, eval_every=0)
    engine, _ = make_engine(run_cfg, SYSTEM, "teasq")
    in_flight = _capped(engine)
    h = engine.run()
    assert _cap(engine) == 3
    assert in_flight[:2] == [1, 2] and set(in_flight[2:]) == {3}
    assert len(in_flight) == 3 + sum(h.series("clients")) - 1  # a refill per arrival but the last

    engine, _ = make_engine(run_cfg, SYSTEM, "teasq", {"concurrency": 5})
    in_flight = _capped(engine)
    engine.run()
    assert _cap(engine) == 5 and max(in_flight) == 5


def test_upload_bytes_are_the_compressors_message_sizes():
    """Top-k (s = 0.1) + 8-bit QSGD of the n = 1210 MLP parameters: k = ⌈121⌉ = 121 kept;
    indices as a bitmap ⌈1210/8⌉ = 152 bytes (< 121 uint16 = 242); values ⌈121·9/8⌉ =
    137 bytes (8 bits + sign); header 32: 321 bytes per task, against 4840 for float32.
    With the constant schedule every record's bytes_up is clients · 321, and the wrapper's
    measured message length (client_upload_bytes) is 321 too."""
    assert topk_qsgd(0.1, 8).nbytes(MLP_PARAMS) == 32 + 152 + 137 == 321
    run_cfg = RunConfig(rounds=4, clients=12, clients_per_round=4, eval_every=0)
    engine, _ = make_engine(run_cfg, SYSTEM, "teasq", {"schedule": "constant"})
    h = engine.run()
    assert engine.algorithm.upload_nbytes(MLP_PARAMS) == 321
    assert h.series("clients") == [5] * 4
    assert h.series("bytes_up") == [5 * 321] * 4
    assert h.series("client_upload_bytes") == [321.0] * 4


def test_a_tightening_schedule_shrinks_the_uploads_by_the_version():
    """schedule=tighten with γ_s = 0.5, T_q = 2: a task from version t sends
    s_t = 0.1 · 0.5^t, q_t = 8 − ⌊t/2⌋. By hand: t = 0: 321 bytes (above); t = 1: k =
    ⌈60.5⌉ = 61, 61 uint16 indices = 122 (< 152), ⌈61·9/8⌉ = 69 -> 223. Every record's
    bytes_up (the engine's, from upload_nbytes at dispatch) is the sum over its tasks of
    the compressor's nbytes at their start version, and equals the real messages' total."""
    params = {
        "schedule": "tighten",
        "ratio_gamma": 0.5,
        "bits_period": 2,
        "concurrency": 4,
        "cache_size": 3,
    }
    alg = ALGORITHMS.get("teasq").factory(ALGORITHMS.config("teasq", params))
    assert [alg.upload_nbytes(MLP_PARAMS, v) for v in (0, 1)] == [321, 32 + 122 + 69]
    run_cfg = RunConfig(rounds=5, clients=12, clients_per_round=4, eval_every=0)
    engine, _ = make_engine(run_cfg, SYSTEM, "teasq", params)
    strategy = _teasq(engine)
    starts: list[list[int]] = [[]]
    accept = strategy.accept

    def recording(arrival, contribution):
        starts[-1].append(arrival.start_version)
        stepped = accept(arrival, contribution)
        if stepped:
            starts.append([])
        return stepped

    strategy.accept = recording  # type: ignore[method-assign]
    h = engine.run()
    compression = strategy.cfg.compression_config()
    expected = []
    for versions in starts[:-1]:
        compressors = [compression.compressor(v) for v in versions]
        expected.append(sum(c.nbytes(MLP_PARAMS) for c in compressors if c is not None))
    assert h.series("bytes_up") == expected
    counts, means = h.series("clients"), h.series("client_upload_bytes")
    measured = [c * b for c, b in zip(counts, means, strict=True)]
    assert measured == pytest.approx(expected, abs=1e-9)
    assert expected[-1] < expected[0]  # later versions send less


def test_error_feedback_is_client_state_and_follows_the_method():
    # default: top-k + QSGD with error feedback -> one model-sized residual per client;
    # compression=none keeps nothing (its error_feedback=True default is then ignored)
    alg = ALGORITHMS.get("teasq").factory(TEASQConfig())
    assert alg.client_state_spec(100) == {EF_MEMORY: 100}
    plain = TEASQ(TEASQConfig(compression="none"))
    assert plain.client_state_spec(100) == {} and plain.upload_nbytes(100) == 400
    assert TEASQ(TEASQConfig(error_feedback=False)).client_state_spec(100) == {}
    run_cfg = RunConfig(rounds=3, clients=12, clients_per_round=4, eval_every=0)
    engine, _ = make_engine(run_cfg, SYSTEM, "teasq", {"concurrency": 4})
    engine.run()
    store = engine.state_store
    assert store is not None
    kept = [store.get(c) for c in range(12)]
    assert sum(s is not None and EF_MEMORY in s for s in kept) >= 4


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError) as err:
        ALGORITHMS.config("teasq", {"compression": "zip"})
    assert str(err.value).startswith("algorithm.compression=zip: allowed: none, topk")
    with pytest.raises(ConfigError) as err:
        ALGORITHMS.config("teasq", {"ratio": "0"})
    assert str(err.value).startswith("algorithm.ratio=0: must be a number in (0, 1]")
    for key, value in [("concurrency_fraction", "0"), ("cache_size", "0"), ("mu", "-1")]:
        with pytest.raises(ConfigError) as err:
            ALGORITHMS.config("teasq", {key: value})
        assert err.value.key == f"algorithm.{key}"
    defaults = TEASQConfig()
    assert (defaults.concurrency_fraction, defaults.cache_size, defaults.mu) == (0.1, 5, 0.01)
    assert (defaults.compression, defaults.ratio, defaults.bits) == ("topk_qsgd", 0.1, 8)
    assert (defaults.staleness_a, defaults.ratio_gamma, defaults.error_feedback) == (
        0.5,
        0.99,
        True,
    )


def test_a_cache_timer_steps_before_the_cache_is_full():
    """Two clients, both in flight, c0 1 s and c1 3 s; M = 10 never fills; the timer is
    2.5 s. c0 arrives at 1 and 2 (1, 2 < 2.5 s since the start); at t = 3 c1 (dispatched
    first) arrives 3 s after the start -> step 1 with 3 results; c0's arrival at 3 (from
    v0, dispatched at 2) is cached. c0 again at 4 and 5; c1 (from v1) at 6, 3 s after
    step 1 -> step 2 with 4 results, the first of them 1 version stale."""
    run_cfg = RunConfig(rounds=2, clients=2, clients_per_round=2, eval_every=0)
    params = {"concurrency": 2, "cache_size": 10, "cache_timeout_s": 2.5}
    engine, _ = make_engine(run_cfg, HandSystem({0: 1.0, 1: 3.0}), "teasq", params)
    h = engine.run()
    assert h.series("virtual_time_s") == [3.0, 6.0]
    assert h.series("clients") == [3, 4]
    assert h.series("staleness_max") == [0, 1]


def test_learns_on_the_quickstart_with_compression_on():
    """The quickstart (digits, 100 Dirichlet clients, heterogeneous devices, the preset's
    lr 0.2, B 10, E 5) with TEASQ-Fed's defaults: C = 10 in flight, M = 5, top-10% +
    8-bit QSGD with error feedback, tightening. Measured (seed 0): 0.886 at 30 steps
    (150 arrivals; FedBuff K = 10 reaches 0.886 at 30 steps = 300 arrivals), 0.919 at
    60; from 0.10 at step 1. Each upload is 1176 bytes at version 0 against 19240 for
    float32 (n = 4810). Threshold 0.8: room for other machines' rounding."""
    overrides = ["algorithm=teasq", "rounds=30", "eval_every=5"]
    cfg = resolve(apply_overrides(load_config_source("quickstart"), overrides))
    assert cfg.config("algorithm").lr == 0.2
    history = run(cfg)
    assert history.final["accuracy"] >= 0.8
    assert history.records[0]["client_upload_bytes"] == 1176.0
    assert all(r["bytes_up"] <= r["clients"] * 1176 for r in history.records)
