"""Every eviction policy through the same invariants (one matrix), plus per-policy behaviour.

Adding a policy: one line in ``IMPORTANCE`` (it then also runs under KVCrush) or, for a wrapper
variant, one line in ``POLICY_MATRIX``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from kvcrush_ov.eviction.adakv import AdaKV
from kvcrush_ov.eviction.base import (
    SCORE_MODES,
    EvictionInputs,
    EvictionPolicy,
    check_keep,
    fit_budget,
    head_quotas,
    top_k_mask,
    water_fill,
)
from kvcrush_ov.eviction.h2o import H2O
from kvcrush_ov.eviction.kvcrush import KVCrush
from kvcrush_ov.eviction.kvzap import KVzap
from kvcrush_ov.eviction.kvzip import KVzip
from kvcrush_ov.eviction.kvzip_heads import KVzipHeads, heads_path, load_or_calibrate
from kvcrush_ov.eviction.pyramidkv import PyramidKV, pyramid_budgets
from kvcrush_ov.eviction.registry import POLICIES
from kvcrush_ov.eviction.snapkv import SnapKV, _window_sums, pool_scores
from kvcrush_ov.eviction.streaming import StreamingLLM

Factory = Callable[[], EvictionPolicy]

IMPORTANCE: list[tuple[str, Factory]] = [
    ("streaming", StreamingLLM),
    ("h2o", H2O),
    ("h2o-norm_sum", lambda: H2O(aggregation_mode="norm_sum")),
    ("snapkv", SnapKV),
    ("snapkv-avg-k3", lambda: SnapKV(pooling="avg", kernel_size=3)),
    ("snapkv-nopool", lambda: SnapKV(pooling="none")),
    ("snapkv-trailing", lambda: SnapKV(pooling="avg", kernel_size=31, offset=15)),
    ("pyramidkv", PyramidKV),
    ("pyramidkv-beta2", lambda: PyramidKV(beta=2)),
    ("adakv", AdaKV),
    ("adakv-alpha0", lambda: AdaKV(alpha=0.0)),
    ("kvzip", KVzip),
    ("kvzap", KVzap),
]

POLICY_MATRIX: list[tuple[str, Factory]] = [
    *IMPORTANCE,
    *[(f"kvcrush[{name}]", lambda f=f: KVCrush(f())) for name, f in IMPORTANCE],
    *[(f"kvcrush[snapkv]-{a}", lambda a=a: KVCrush(SnapKV(), anchor=a))
      for a in ("random", "zeros", "ones", "mean")],
    ("kvcrush[h2o]-mean", lambda: KVCrush(H2O(), anchor="mean")),
    ("kvcrush[snapkv]-block", lambda: KVCrush(SnapKV(), granularity="block")),
    ("kvcrush[adakv]-block-random",
     lambda: KVCrush(AdaKV(), granularity="block", anchor="random", share=0.6)),
    ("kvcrush[pyramidkv]-block", lambda: KVCrush(PyramidKV(), granularity="block", share=0.5)),
    ("kvcrush[snapkv]-multi2", lambda: KVCrush(SnapKV(), anchor=("zeros", "ones"))),
    ("kvcrush[h2o]-multi3",
     lambda: KVCrush(H2O(), anchor=("mean", "alternating", "random"), share=0.5)),
    ("kvcrush[snapkv]-dynamic", lambda: KVCrush(SnapKV(), dynamic_split=True)),
    ("kvcrush[adakv]-dynamic", lambda: KVCrush(AdaKV(), dynamic_split=True, share=0.5)),
    ("kvcrush[streaming]-dynamic", lambda: KVCrush(StreamingLLM(), dynamic_split=True)),
    ("kvcrush[h2o]-dynamic-block-multi",
     lambda: KVCrush(H2O(), dynamic_split=True, granularity="block", anchor=("zeros", "ones"),
                     share=0.75)),
    ("kvcrush[snapkv]-taper", lambda: KVCrush(SnapKV(), taper=(0.125, 0.5))),
    ("kvcrush[snapkv]-share0", lambda: KVCrush(SnapKV(), share=0.0)),
    ("kvcrush[snapkv]-share1", lambda: KVCrush(SnapKV(), share=1.0)),
    ("kvcrush[h2o-norm_sum]-bits-sum",
     lambda: KVCrush(H2O(aggregation_mode="norm_sum"), aggregation_mode="sum")),
    ("kvzip-heads", lambda: KVzipHeads.from_array(np.arange(12.0)[::-1].reshape(4, 3))),
]


def make_inputs(kind: str, seed: int, num_layers: int = 4, num_heads: int = 3,
                block_size: int = 4) -> EvictionInputs:
    """Random candidates. ``aligned``: every head holds positions 0..47; ``gappy``: the same
    non-contiguous positions in every head; ``ragged``: each head drops ~10% of 0..63 on its own;
    ``short``: ragged with one head per layer much shorter (budget moves between heads)."""
    rng = np.random.default_rng(seed)
    scores, positions, counts = [], [], []
    for _ in range(num_layers):
        gaps = np.sort(rng.choice(80, size=40, replace=False))
        rows = []
        for h in range(num_heads):
            if kind == "aligned":
                pos = np.arange(48)
            elif kind == "gappy":
                pos = gaps
            else:
                pos = np.flatnonzero(rng.random(64) > 0.1)
                if kind == "short" and h == 1:
                    pos = pos[rng.random(len(pos)) < 0.3]
            rows.append(pos)
        positions.append(rows)
        scores.append([rng.exponential(size=len(p)).astype(np.float32) for p in rows])
        counts.append([rng.integers(1, 9, size=len(p)).astype(np.float32) for p in rows])
    return EvictionInputs.from_lists(scores, positions, counts, block_size=block_size)


CASES = [("aligned", 0), ("gappy", 1), ("ragged", 2), ("ragged", 3), ("short", 4)]


def budgets(inputs: EvictionInputs) -> list[int]:
    """0, 1, half the shortest head, the shortest head, and the largest feasible num_keep."""
    lengths = inputs.lengths
    shortest = int(lengths.min())
    most = int(lengths.sum()) // lengths.size
    return sorted({0, 1, shortest // 2, shortest, most})


def positions_of(inputs: EvictionInputs, mask: np.ndarray, layer: int, head: int) -> set[int]:
    return set(inputs.positions[layer, head][mask[layer, head]].tolist())


@pytest.mark.parametrize("case", CASES, ids=[f"{k}{s}" for k, s in CASES])
@pytest.mark.parametrize("factory", [f for _, f in POLICY_MATRIX],
                         ids=[name for name, _ in POLICY_MATRIX])
def test_policy_invariants(factory: Factory, case: tuple[str, int]) -> None:
    policy = factory()
    assert isinstance(policy, EvictionPolicy)
    assert policy.score_mode in SCORE_MODES and isinstance(policy.name, str)
    inputs = make_inputs(*case)
    before = [a.copy() for a in (inputs.scores, inputs.counts, inputs.positions, inputs.lengths)]
    for num_keep in budgets(inputs):
        keep = policy.select(inputs, num_keep, np.random.default_rng(7))
        check_keep(keep, inputs, num_keep, policy.name)  # shape, dtype, padding, exact budget
        again = policy.select(inputs, num_keep, np.random.default_rng(7))
        assert np.array_equal(keep, again), "not deterministic under the same seed"
        if isinstance(policy, KVCrush):
            check_kvcrush_plan(policy, inputs, num_keep, keep)
    after = (inputs.scores, inputs.counts, inputs.positions, inputs.lengths)
    unchanged = all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert unchanged, "inputs were modified"


def check_kvcrush_plan(policy: KVCrush, inputs: EvictionInputs, num_keep: int,
                       keep: np.ndarray) -> None:
    plan = policy.plan(inputs, num_keep, np.random.default_rng(7))
    assert np.array_equal(plan.keep, keep)
    assert not (plan.importance & plan.crush).any()
    assert np.array_equal(plan.importance | plan.crush, keep)
    assert plan.crush_budget.sum() <= inputs.shape[0] * num_keep
    num_layers, num_heads, _ = inputs.shape
    for layer in range(num_layers):
        picked = positions_of(inputs, plan.crush, layer, 0)
        assert len(picked) <= plan.crush_budget[layer]
        for head in range(num_heads):  # held and kept in every head of the layer
            assert positions_of(inputs, plan.crush, layer, head) == picked
            assert not picked & positions_of(inputs, plan.importance, layer, head)
        if policy.granularity == "block":
            blocks = {p // inputs.block_size for p in picked}
            assert len(picked) == len(blocks) * inputs.block_size


def test_registry_names() -> None:
    assert set(POLICIES) == {"streaming", "h2o", "snapkv", "pyramidkv", "adakv", "upstream",
                             "kvzip", "kvzap"}
    for name, cls in POLICIES.items():
        assert cls.name == name and cls.score_mode in SCORE_MODES
        if name != "upstream":  # GenAI's algorithm is not wrapped by our KVCrush
            assert callable(cls().scores)


@pytest.mark.parametrize(("factory", "field"), [
    (lambda: H2O(aggregation_mode="max"), "H2O.aggregation_mode"),
    (lambda: SnapKV(pooling="median"), "SnapKV.pooling"),
    (lambda: SnapKV(kernel_size=4), "SnapKV.kernel_size"),
    (lambda: SnapKV(kernel_size=7, offset=4), "SnapKV.offset"),
    (lambda: SnapKV(offset=-1), "SnapKV.offset"),
    (lambda: PyramidKV(beta=0.5), "PyramidKV.beta"),
    (lambda: AdaKV(alpha=1.5), "AdaKV.alpha"),
    (lambda: KVCrush(SnapKV(), share=1.2), "KVCrush.share"),
    (lambda: KVCrush(SnapKV(), anchor="middle"), "KVCrush.anchor"),
    (lambda: KVCrush(SnapKV(), anchor=()), "KVCrush.anchor"),
    (lambda: KVCrush(SnapKV(), granularity="page"), "KVCrush.granularity"),
    (lambda: KVCrush(SnapKV(), dynamic_split=1), "KVCrush.dynamic_split"),
    (lambda: KVCrush(SnapKV(), taper=(0.5, 0.5)), "KVCrush.taper"),
    (lambda: KVCrush(SnapKV(), taper=0.5), "KVCrush.taper"),
    (lambda: KVCrush(StreamingLLM(), aggregation_mode="sum"), "KVCrush.aggregation_mode"),
    (lambda: KVCrush(object()), "KVCrush.importance"),
])
def test_validation_names_the_field(factory: Factory, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        factory()


# --- shared helpers ---

def test_top_k_mask_matches_stable_argsort() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        values = rng.integers(0, 4, size=(3, 11)).astype(np.float32)
        values[rng.random(values.shape) < 0.2] = -np.inf
        k = rng.integers(0, 13, size=3)
        order = np.argsort(-values, axis=-1, kind="stable")
        ranks = np.argsort(order, axis=-1)
        assert np.array_equal(top_k_mask(values, k), ranks < k[:, None])


def test_water_fill_and_fit_budget() -> None:
    assert water_fill(7, np.array([5, 1, 3])).tolist() == [3, 1, 3]
    assert water_fill(8, np.array([5, 1, 3])).tolist() == [4, 1, 3]
    target = np.full((2, 2), 4)
    # row 0 moves 3 inside the row; row 1 is full, so its 4 go to the only entry with room
    assert fit_budget(target, np.array([[1, 12], [2, 2]])).tolist() == [[1, 11], [2, 2]]
    with pytest.raises(ValueError, match="exceeds"):
        fit_budget(target, np.array([[1, 10], [2, 2]]))
    assert head_quotas(np.array([[2, 9, 9]]), 5).tolist() == [[2, 7, 6]]


# --- per-policy behaviour ---

def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def one_head(scores: list[float], counts: list[float] | None = None) -> EvictionInputs:
    n = len(scores)
    return EvictionInputs.from_lists([[np.array(scores, np.float32)]], [[np.arange(n)]],
                                     None if counts is None else [[np.array(counts)]])


def test_h2o_keeps_the_top_scores() -> None:
    inputs = one_head([0.1, 0.5, 0.3, 0.9, 0.2])
    keep = H2O().select(inputs, 2, rng())
    assert keep[0, 0].tolist() == [False, True, False, True, False]
    inputs = one_head([4.0, 3.0, 1.0], counts=[8.0, 3.0, 1.0])  # norm_sum: 0.5, 1, 1
    assert H2O().select(inputs, 2, rng())[0, 0].tolist() == [True, True, False]
    assert H2O("norm_sum").select(inputs, 2, rng())[0, 0].tolist() == [False, True, True]


def test_snapkv_pooling_hand_case() -> None:
    values = np.array([[[1, 5, 2, 0, 0, 3]]], np.float32)  # entry 5 is padding
    lengths = np.array([[5]])
    mx = pool_scores(values, lengths, "max", 3)[0, 0]
    assert mx.tolist() == [5, 5, 5, 2, 0, -np.inf]
    avg = pool_scores(values, lengths, "avg", 3)[0, 0]
    np.testing.assert_allclose(avg[:5], [3, 8 / 3, 7 / 3, 2 / 3, 0], rtol=1e-6)
    assert avg[5] == -np.inf
    assert pool_scores(values, lengths, "none", 3)[0, 0, :5].tolist() == [1, 5, 2, 0, 0]
    # the neighbours of the peak win: pooled scores tie at 5, earlier first
    inputs = one_head([1, 5, 2, 0, 0])
    keep = SnapKV(kernel_size=3).select(inputs, 2, rng())
    assert keep[0, 0].tolist() == [True, True, False, False, False]


def test_pyramidkv_budgets_decrease_and_sum_exactly() -> None:
    assert pyramid_budgets(5, 10, 20).tolist() == [20, 15, 10, 5, 0]
    for num_layers, num_keep, beta in [(1, 7, 20), (4, 3, 20), (30, 17, 20), (7, 100, 2.5)]:
        got = pyramid_budgets(num_layers, num_keep, beta)
        assert got.sum() == num_layers * num_keep
        assert (np.diff(got) <= 0).all()
    # layer 0 holds only 3: its overflow moves to the other layers, same count in every head
    lengths = np.array([[3, 3], [50, 50], [50, 50]])
    assert PyramidKV().layer_budgets(lengths, 10).tolist() == [[3, 3], [19, 19], [8, 8]]


def test_adakv_moves_budget_to_the_head_with_higher_scores_and_keeps_the_floor() -> None:
    gen = np.random.default_rng(0)
    high = (0.5 + 0.1 * gen.random(10)).astype(np.float32)
    low = (0.01 * gen.random(10)).astype(np.float32)
    inputs = EvictionInputs.from_lists([[high, low]], [[np.arange(10), np.arange(10)]])

    def counts(alpha: float) -> list[int]:
        keep = AdaKV(pooling="none", alpha=alpha).select(inputs, 5, rng())
        return keep[0].sum(axis=-1).tolist()

    assert counts(0.2) == [9, 1]  # floor(0.2 * 5) = 1 for the low head
    assert counts(0.0) == [10, 0]
    assert counts(1.0) == [5, 5]
    keep = AdaKV(pooling="none", alpha=0.0).select(inputs, 5, rng())
    assert keep[0, 1].sum() == 0 and keep[0, 0].all()
    # never more than a head holds: the high head holds 6
    inputs = EvictionInputs.from_lists([[high[:6], low]], [[np.arange(6), np.arange(10)]])
    keep = AdaKV(pooling="none").select(inputs, 5, rng())
    assert keep[0].sum(axis=-1).tolist() == [6, 4]
    # the floor is a head's own best
    assert keep[0, 1, np.argmax(low)]


def test_streaming_keeps_the_latest() -> None:
    inputs = EvictionInputs.from_lists(
        [[np.zeros(5, np.float32), np.zeros(3, np.float32)]],
        [[np.array([1, 4, 6, 7, 9]), np.array([2, 3, 8])]])
    keep = StreamingLLM().select(inputs, 2, rng())
    assert positions_of(inputs, keep, 0, 0) == {7, 9}
    assert positions_of(inputs, keep, 0, 1) == {3, 8}
    keep = StreamingLLM().select(inputs, 4, rng())  # head 1 holds 3: its 4th goes to head 0
    assert positions_of(inputs, keep, 0, 0) == {1, 4, 6, 7, 9}
    assert positions_of(inputs, keep, 0, 1) == {2, 3, 8}


def test_sliding_max_equals_brute_force() -> None:
    from kvcrush_ov.eviction.snapkv import _sliding_max

    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 16, 100):
        for r in (1, 2, 3, 7, 15, 31):
            v = rng.random((2, 3, n)).astype(np.float32)
            ref = np.stack([v[..., max(0, j - r):j + r + 1].max(axis=-1) for j in range(n)], -1)
            assert np.array_equal(_sliding_max(v, r, r), ref), (n, r)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_offset_windows_equal_brute_force_dense_and_ragged(pooling) -> None:
    rng = np.random.default_rng(5)
    agg = np.max if pooling == "max" else np.mean
    for n, k in ((1, 3), (6, 3), (40, 31), (100, 7)):
        values = rng.random((2, 3, n)).astype(np.float32)
        r = k // 2
        for offset in sorted({0, 1, r}):
            for lengths in (np.full((2, 3), n), rng.integers(1, n + 1, size=(2, 3))):
                got = pool_scores(values, lengths, pooling, k, offset)
                for layer in range(2):
                    for h in range(3):
                        m = int(lengths[layer, h])
                        ref = [agg(values[layer, h, max(j - r - offset, 0):
                                          min(j + r - offset + 1, m)]) for j in range(m)]
                        np.testing.assert_allclose(got[layer, h, :m], ref, rtol=1e-5)
                        assert np.all(got[layer, h, m:] == -np.inf)


def test_trailing_window_spreads_a_peak_forward_only() -> None:
    values = np.zeros((1, 1, 12), np.float32)
    values[0, 0, 4] = 1.0
    got = pool_scores(values, np.array([[12]]), "max", 5, 2)[0, 0]
    assert np.flatnonzero(got).tolist() == [4, 5, 6, 7, 8]  # the peak and the 4 after it


def test_window_sums_keep_small_windows_accurate_next_to_a_large_score() -> None:
    # float32 prefix sums would subtract two numbers near 30 to get a window near 3e-5 and lose
    # it to rounding; each window must instead be accurate relative to its own size.
    v = np.full((1, 1, 4000), 1e-6, np.float32)
    v[0, 0, 10] = 30.0
    got = _window_sums(v, 15, 15)[0, 0]
    ref = np.array([v[0, 0, max(j - 15, 0):j + 16].astype(np.float64).sum() for j in range(4000)])
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert got.dtype == np.float32


def test_avg_pooling_equals_brute_force_dense_and_ragged() -> None:
    rng = np.random.default_rng(3)
    for n, k in ((1, 3), (5, 3), (40, 31), (100, 7), (64, 1)):
        values = rng.random((2, 3, n)).astype(np.float32)
        for lengths in (np.full((2, 3), n), rng.integers(0, n + 1, size=(2, 3))):
            got = pool_scores(values, lengths, "avg", k)
            r = k // 2
            for layer in range(2):
                for h in range(3):
                    m = int(lengths[layer, h])
                    ref = [values[layer, h, max(j - r, 0):min(j + r + 1, m)].mean()
                           for j in range(m)]
                    np.testing.assert_allclose(got[layer, h, :m], ref, rtol=1e-5)
                    assert np.all(got[layer, h, m:] == -np.inf)


def test_kvzip_heads_keeps_whole_heads_in_score_order() -> None:
    inputs = make_inputs("short", 4)  # head 1 of each layer much shorter
    scores = np.zeros((4, 3))
    scores[2, 1], scores[0, 2], scores[3, 0] = 3.0, 2.0, 1.0
    policy = KVzipHeads.from_array(scores)
    lengths = inputs.lengths
    num_keep = (int(lengths[2, 1]) + int(lengths[0, 2]) + 5) // 12 + 1  # two heads, then part
    keep = policy.select(inputs, num_keep, np.random.default_rng(0))
    check_keep(keep, inputs, num_keep, policy.name)
    total = 12 * num_keep
    assert keep[2, 1, :lengths[2, 1]].all() and keep[0, 2, :lengths[0, 2]].all()
    rest = total - int(lengths[2, 1]) - int(lengths[0, 2])
    n = int(lengths[3, 0])
    assert keep[3, 0].sum() == rest and keep[3, 0, n - rest:n].all()  # its newest candidates
    others = np.ones((4, 3), bool)
    others[2, 1] = others[0, 2] = others[3, 0] = False
    assert not keep[others].any()
    with pytest.raises(ValueError, match=r"head_scores: shape \(2, 3\)"):
        KVzipHeads.from_array(np.zeros((2, 3))).select(inputs, 1, np.random.default_rng(0))


def test_kvzip_heads_are_calibrated_once_and_kept_beside_the_model(tmp_path, monkeypatch):
    from kvcrush_ov.eviction import kvzip_heads

    calls = []

    def fake(model_dir):
        calls.append(model_dir)
        return np.arange(6.0).reshape(2, 3)

    monkeypatch.setattr(kvzip_heads, "calibrate", fake)
    model_dir = tmp_path / "Model" / "ov-fp16"
    first = load_or_calibrate(model_dir)
    again = load_or_calibrate(model_dir)
    assert len(calls) == 1 and heads_path(model_dir) == tmp_path / "Model" / "kvzip_heads.npy"
    assert np.array_equal(first, again) and again.shape == (2, 3)


@pytest.mark.parametrize(("field", "value"), [("num_docs", 0), ("doc_words", 2.5),
                                              ("start_size", -1), ("recent_size", True)])
def test_kvzip_heads_calibration_names_a_bad_argument_before_loading(field, value):
    from kvcrush_ov.errors import ConfigError
    from kvcrush_ov.eviction.kvzip_heads import calibrate

    with pytest.raises(ConfigError, match=field):
        calibrate("no-such-model-folder", **{field: value})
