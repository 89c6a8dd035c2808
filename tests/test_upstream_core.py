"""The C++ core of GenAI's eviction (cpp/include/kvcrush/upstream.hpp) through its wrapper.

Fast, no model. Expected values are derived by hand (or are the C++ standard's own constants);
the rest are properties every eviction must have. tests/test_upstream_policy.py holds the
behaviour recorded from GenAI itself.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvcrush_ov import _core
from kvcrush_ov.eviction.base import EvictionInputs, check_keep
from kvcrush_ov.eviction.upstream import (
    MT19937,
    UpstreamCacheEviction,
    UpstreamConfig,
    UpstreamError,
    UpstreamEviction,
    libstdcxx_sort,
    lowest_blocks,
    max_pool,
    prefill_chunks,
)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def small(**kw: object) -> UpstreamConfig:
    """B=2, start 1 block, recent 1 block, max 4 blocks; sum, no SnapKV window, no pooling."""
    args: dict = dict(start_size=2, recent_size=2, max_cache_size=8, block_size=2,
                      aggregation_mode="sum", snapkv_window_size=0, max_pool_window_size=1)
    args.update(kw)
    return UpstreamConfig(**args)


# ------------------------------------------------------------------------------------------
# std::mt19937 and the libstdc++ pieces
# ------------------------------------------------------------------------------------------


def test_mt19937_is_the_standard_engine():
    g = MT19937()  # default seed 5489: the standard requires the 10000th output
    assert [g.next_u32() for _ in range(10000)][-1] == 4123659995
    assert MT19937(2**32 + 7).next_u32() == MT19937(7).next_u32()  # seed mod 2**32
    g, h = MT19937(3), MT19937(3)
    assert [g.bit() for _ in range(64)] == [h.next_u32() >> 31 for _ in range(64)]


def test_libstdcxx_sort_sorts_and_permutes():
    rng = np.random.default_rng(0)
    for n in (0, 1, 5, 16, 17, 40, 300):
        keys = rng.integers(0, 4, n).tolist()
        out = libstdcxx_sort(range(n), lambda a, b, k=keys: k[a] < k[b])
        assert sorted(out) == list(range(n))
        assert [keys[i] for i in out] == sorted(keys)
        distinct = rng.permutation(n).tolist()
        assert libstdcxx_sort(distinct, lambda a, b: a < b) == sorted(distinct)


def test_libstdcxx_sort_comparator_errors_propagate():
    with pytest.raises(ZeroDivisionError):
        libstdcxx_sort(range(5), lambda a, b: 1 / 0)


def test_max_pool_propagates_nan_like_numpy():
    x = f32(1, np.nan, 0, 3)
    assert np.array_equal(max_pool(x, 2), f32(np.nan, np.nan, 3, 3), equal_nan=True)
    assert max_pool(x, 2).dtype == np.float32
    assert max_pool(np.arange(5), 3).tolist() == [2, 3, 4, 4, 4]  # ints pool in float64
    assert max_pool(np.zeros(0, np.float32)).size == 0


def test_lowest_blocks_orders_by_score_then_index():
    assert lowest_blocks(np.array([0.0, -0.0, 1.0, np.nan, -1.0]), 3).tolist() == [0, 1, 4]
    assert lowest_blocks(np.array([np.nan, 2.0]), 1).tolist() == [1]  # NaN last, as numpy
    with pytest.raises(UpstreamError, match="cannot evict 3 of 2 blocks"):
        lowest_blocks(np.zeros(2), 3)


# ------------------------------------------------------------------------------------------
# The per-sequence algorithm, by hand
# ------------------------------------------------------------------------------------------

# 13 cache tokens: start [7, 7], tracked blocks [5,5] [1,0] [0,6] [4,3], recent [9,9] + [9].
# Block sums [10, 1, 6, 7]: the ranking evicts tracked blocks 1 and 2 (4 evictable - 2).
# Indicators (top 4 of the first 8 raw scores 6, 5, 5, 4): [1,1] [0,0] [0,1] [1,0].
CACHE13 = f32(7, 7, 5, 5, 1, 0, 0, 6, 4, 3, 9, 9, 9)


@pytest.mark.parametrize("anchor, seed, evicted", [
    ("zeros", 0, [3]),        # distances 0 (block 1), 1 (block 2): block 1 stays
    ("ones", 0, [2]),         # distances 2, 1: block 2 stays
    ("mean", 0, [3]),         # offsets' means 2/4, 2/4: not > 0.5 -> zeros
    ("alternating", 0, [2]),  # anchor [0, 1]: distances 1, 0
    ("random", 5489, [3]),    # top bits of 3499211612, 581869302 -> [1, 0]: distances 1, 2
])
def test_kvcrush_keeps_one_of_the_ranked_blocks(anchor, seed, evicted):
    algo = UpstreamCacheEviction(small(kvcrush_budget=1, kvcrush_anchor=anchor,
                                       kvcrush_seed=seed), 1)
    algo.update([CACHE13], 1)
    assert algo.block_scores(0).tolist() == [10, 1, 6, 7]
    assert algo.evict()[0].tolist() == evicted
    assert algo.num_evicted_tokens == 2
    assert algo.state.tracked_tokens(0) == 9  # 8 + one KVCrush block + the odd token - 2 start


def test_random_anchor_stream_persists_across_layers_and_events():
    cfg = small(kvcrush_budget=1, kvcrush_anchor="random", kvcrush_seed=11)
    algo = UpstreamCacheEviction(cfg, 3)
    algo.update([CACHE13] * 3, 1)
    algo.evict()  # KVCrush applied in 3 layers: 3 * block_size draws
    ref = MT19937(11)
    for _ in range(3 * 2):
        ref.next_u32()
    assert algo.kvcrush.rng.next_u32() == ref.next_u32()  # a view of the C++ engine


def test_evicted_scores_and_counters_are_forgotten():
    algo = UpstreamCacheEviction(small(aggregation_mode="norm_sum"), 1)
    algo.update([CACHE13], 13)  # window 0: counters 11 .. 1
    assert algo.state.counters[0].tolist() == list(range(11, 0, -1))
    # normalised block sums: 5/11 + 5/10, 1/9 + 0/8, 0/7 + 6/6, 4/5 + 3/4
    assert algo.evict()[0].tolist() == [1, 2]
    assert algo.state.scores[0].tolist() == [0, 6, 4, 3, 9, 9, 9]
    assert algo.state.counters[0].tolist() == [7, 6, 5, 4, 3, 2, 1]


def test_steps_keep_the_cache_at_max_plus_partial_block():
    cfg = UpstreamConfig(start_size=8, recent_size=8, max_cache_size=32, block_size=4,
                         aggregation_mode="norm_sum", snapkv_window_size=4)
    algo = UpstreamCacheEviction(cfg, 2)
    rng = np.random.default_rng(5)
    prompt, cache, processed = 50, 0, 0
    for n in prefill_chunks(prompt, 16) + [1] * 40:
        cache += n
        out = algo.step([rng.random(cache, dtype=np.float32) for _ in range(2)],
                        prompt_len=prompt, num_processed_tokens=processed,
                        num_scheduled_tokens=n)
        assert len(out[0]) == len(out[1])  # every layer evicts the same count
        if processed < prompt:
            assert len(out[0]) == 0  # never after a prefill forward
        for blocks in out:
            assert (blocks >= 2).all() and (np.diff(blocks) > 0).all()  # start area stays
            assert (blocks < cache // 4 - 2).all()  # the recent area stays
        cache -= 4 * len(out[0])
        processed += n
        if len(out[0]):
            assert cache == 32 + cache % 4
        if processed >= prompt:  # scores are tracked from the SnapKV window on
            assert algo.state.tracked_tokens(0) == cache - 8
    assert algo.num_evicted_tokens == 2 * (processed - cache)  # summed over layers


def test_genai_asserts_raise_upstream_error():
    algo = UpstreamCacheEviction(UpstreamConfig(32, 32, 96, "norm_sum", 8, 32), 1)
    with pytest.raises(UpstreamError, match=r"\(1 tracked tokens, 8 SnapKV scores\)") as e:
        algo.step([np.ones(33, np.float32)], prompt_len=33, num_processed_tokens=0,
                  num_scheduled_tokens=33)
    assert isinstance(e.value, RuntimeError) and type(e.value) is UpstreamError
    algo = UpstreamCacheEviction(small(snapkv_window_size=2), 1)
    with pytest.raises(UpstreamError, match="may not be larger than the configured SnapKV"):
        algo.update([np.ones(5, np.float32)], 3)
    algo = UpstreamCacheEviction(small(), 1)
    algo.update([np.ones(6, np.float32)], 1)
    with pytest.raises(UpstreamError, match="scores shrank from 4 to 2 tokens"):
        algo.update([np.ones(4, np.float32)], 1)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="expected 2 layers, got 1"):
        UpstreamCacheEviction(small(), 2).update([np.ones(4, np.float32)], 1)
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        UpstreamCacheEviction(small(), 0)
    # the C++ constructor checks the config with UpstreamConfig's messages too
    with pytest.raises(ValueError, match="start_size=3 must be a non-zero multiple of "
                                         "block_size=2"):
        _core.UpstreamCacheEviction(start_size=3, recent_size=2, max_cache_size=8,
                                    aggregation_mode="sum", snapkv_window_size=0, block_size=2,
                                    kvcrush_budget=0, kvcrush_anchor="zeros", kvcrush_seed=0,
                                    max_pool_window_size=1, num_layers=1)


def test_float64_scores_are_rounded_to_float32_first():
    algo = UpstreamCacheEviction(small(), 1)
    algo.update([np.array([0, 0, 0.1, 1 / 3], np.float64)], 1)
    assert algo.state.scores[0].tolist() == [float(np.float32(0.1)), float(np.float32(1 / 3))]


# ------------------------------------------------------------------------------------------
# The stateless policy
# ------------------------------------------------------------------------------------------


def one_head(scores: list[float], counts: list[float], block_size: int = 2) -> EvictionInputs:
    n = len(scores)
    return EvictionInputs.from_lists([[np.array(scores, np.float32)]], [[np.arange(n) + 4]],
                                     [[np.array(counts, np.float32)]], block_size=block_size)


@pytest.mark.parametrize("mode, num_keep, expected", [
    # norm_sum values [1, 1, .5, .5, 2, 0, 2]: block sums [2, 1, 2], tail token kept
    ("norm_sum", 3, [0, 0, 0, 0, 1, 1, 1]),  # tie 2 = 2: the lower block goes
    ("norm_sum", 4, [0, 1, 0, 0, 1, 1, 1]),  # + 1 token of block 0 (tie: the later one)
    ("sum", 3, [1, 1, 0, 0, 0, 0, 1]),       # sums [8, 2, 6]
    ("sum", 1, [0, 0, 0, 0, 0, 0, 1]),       # the tail alone
    ("sum", 0, [0, 0, 0, 0, 0, 0, 0]),
])
def test_select_by_hand(mode, num_keep, expected):
    inp = one_head([4, 4, 1, 1, 6, 0, 2], [4, 4, 2, 2, 3, 3, 1])
    keep = UpstreamEviction(aggregation_mode=mode, pool_window=1).select(
        inp, num_keep, np.random.default_rng(0))
    assert keep[0, 0].astype(int).tolist() == expected


@pytest.mark.parametrize("shared", [True, False])
def test_select_draws_one_seed_per_group(shared):
    rng = np.random.default_rng(3)
    layers, heads, n = 2, 3, 40
    pos = [[np.arange(n) if shared else np.sort(rng.choice(200, n, replace=False))
            for _ in range(heads)] for _ in range(layers)]
    sc = [[rng.random(n).astype(np.float32) for _ in range(heads)] for _ in range(layers)]
    inp = EvictionInputs.from_lists(sc, pos, block_size=4)
    policy = UpstreamEviction(kvcrush_budget=2, kvcrush_anchor="random")
    g = np.random.default_rng(9)
    keep = policy.select(inp, 21, g)
    check_keep(keep, inp, 21, "upstream")
    ref = np.random.default_rng(9)
    for _ in range(layers * (1 if shared else heads)):
        ref.integers(0, 2**32)
    assert g.integers(0, 2**62) == ref.integers(0, 2**62)
    if shared:
        assert (keep == keep[:, :1]).all()
    # a deterministic anchor draws nothing
    g = np.random.default_rng(9)
    UpstreamEviction(kvcrush_budget=2, kvcrush_anchor="ones").select(inp, 21, g)
    assert g.integers(0, 2**62) == np.random.default_rng(9).integers(0, 2**62)


def test_select_rejects_a_budget_above_the_candidates():
    with pytest.raises(ValueError, match="num_keep=8 > 7 candidates"):
        UpstreamEviction().select(one_head([1] * 7, [1] * 7), 8, np.random.default_rng(0))
