"""The upstream-compatible eviction (``kvcrush_ov.eviction.upstream``) on hand-computed cases.

Every expected value below is derived by hand from GenAI's C++ (see docs/upstream-eviction.md),
except the few marked "libstdc++", which record what GCC's ``std::sort`` / ``std::partial_sort`` /
``std::mt19937`` produce (ties and random bits cannot be derived by hand). The last tests drive
the real ``openvino_genai.ContinuousBatchingPipeline`` on the tiny model: its per-step KV block
usage (the only eviction effect its Python API exposes) and its exceptions must match ours.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvcrush_ov.eviction.base import EvictionInputs, EvictionPolicy, check_keep
from kvcrush_ov.eviction.upstream import (
    MT19937,
    UpstreamCacheEviction,
    UpstreamConfig,
    UpstreamError,
    UpstreamEviction,
    UpstreamKVCrush,
    UpstreamScoreState,
    libstdcxx_partial_sort_top,
    libstdcxx_sort,
    lowest_blocks,
    max_pool,
    prefill_chunks,
    score_aggregation_window,
)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


# ------------------------------------------------------------------------------------------
# Scheduling: SnapKV windows and prefill chunks
# ------------------------------------------------------------------------------------------


class TestWindow:
    def test_single_chunk_prompt_then_decode(self):
        assert score_aggregation_window(20, 0, 20, 8) == 8
        assert score_aggregation_window(20, 20, 1, 8) == 1
        assert score_aggregation_window(20, 57, 1, 8) == 1

    def test_chunked_prompt(self):
        # prompt 20, window 8 -> scored positions 12..19; chunks 7, 7, 6
        assert [score_aggregation_window(20, p, n, 8) for p, n in [(0, 7), (7, 7), (14, 6)]] \
            == [0, 2, 6]

    def test_window_longer_than_prompt(self):
        assert score_aggregation_window(5, 0, 5, 8) == 5
        assert score_aggregation_window(5, 5, 1, 8) == 1

    def test_snapkv_off_scores_every_query(self):
        assert score_aggregation_window(20, 0, 7, 0) == 7
        assert score_aggregation_window(20, 20, 1, 0) == 1

    def test_prefill_chunks(self):
        assert prefill_chunks(600) == [256, 256, 88]
        assert prefill_chunks(512, 256) == [256, 256]
        assert prefill_chunks(3, 256) == [3]


# ------------------------------------------------------------------------------------------
# Max pooling and score accumulation
# ------------------------------------------------------------------------------------------


class TestPooling:
    def test_forward_looking_window_truncated_at_the_end(self):
        x = f32(1, 5, 2, 0, 3, 0, 0, 0, 4)
        assert max_pool(x, 3).tolist() == [5, 5, 3, 3, 3, 0, 4, 4, 4]
        assert max_pool(x, 1).tolist() == x.tolist()

    def test_default_window_is_seven(self):
        x = np.zeros(12, np.float32)
        x[8] = 1.0
        # out[i] = max(x[i:i+7]) -> positions 2..8 see the spike
        assert max_pool(x).tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]

    def test_pooling_happens_per_step_after_dropping_the_start_area(self):
        st = UpstreamScoreState(num_layers=1, block_size=2, aggregation_mode="sum",
                                ignore_first_n_blocks=1)
        st.update([f32(100, 100, 0, 0, 0, 0, 0, 0, 0, 1)], 0)  # tokens 0-1 = start area
        assert st.scores[0].tolist() == [0, 1, 1, 1, 1, 1, 1, 1]
        st.update([f32(100, 100, 0, 0, 0, 0, 0, 0, 0, 0, 2)], 0)
        assert st.scores[0].tolist() == [0, 1, 3, 3, 3, 3, 3, 3, 2]


def state(mode: str, window: int) -> UpstreamScoreState:
    """One layer, block 2, start area = 1 block, no pooling (window 1) for hand arithmetic."""
    return UpstreamScoreState(num_layers=1, block_size=2, aggregation_mode=mode,
                              ignore_first_n_blocks=1, snapkv_window_size=window,
                              max_pool_window_size=1)


class TestAccumulation:
    def test_sum(self):
        st = state("sum", 0)
        st.update([f32(9, 9, 1, 2, 3)], 5)
        st.update([f32(9, 9, 1, 1, 1, 4)], 1)
        assert st.scores[0].tolist() == [2, 3, 4, 4]
        assert st.counters[0].size == 0
        assert st.normalised(0).tolist() == [2, 3, 4, 4]

    def test_norm_sum_without_snapkv_counts_as_if_added_one_by_one(self):
        st = state("norm_sum", 0)
        st.update([f32(9, 9, 1, 2, 3)], 3)
        assert st.counters[0].tolist() == [3, 2, 1]
        st.update([f32(9, 9, 1, 1, 1, 4)], 1)
        assert st.counters[0].tolist() == [4, 3, 2, 1]
        assert st.normalised(0).tolist() == [0.5, 1.0, 2.0, 4.0]

    def test_norm_sum_with_snapkv_window(self):
        st = state("norm_sum", 2)
        st.update([f32(9, 9, 1, 2, 3, 4)], 2)  # last 2 prompt queries scored
        assert st.counters[0].tolist() == [2, 2, 2, 1]
        st.update([f32(9, 9, 1, 2, 3, 4, 5)], 1)  # decode: every counter + 1, new token 1
        assert st.counters[0].tolist() == [3, 3, 3, 2, 1]
        assert st.scores[0].tolist() == [2, 4, 6, 8, 5]

    def test_norm_sum_window_split_over_two_chunks(self):
        st = state("norm_sum", 3)
        st.update([f32(9, 9, 1, 1, 1)], 0)  # chunk before the window: ignored
        assert st.scores[0].size == 0
        st.update([f32(9, 9, 1, 1, 1, 1, 1)], 1)  # 1 window query in this chunk
        assert st.counters[0].tolist() == [1, 1, 1, 1, 1]
        st.update([f32(9, 9, 1, 1, 1, 1, 1, 1, 1)], 2)  # window complete: +2, new 2, 1
        assert st.counters[0].tolist() == [3, 3, 3, 3, 3, 2, 1]
        assert st.num_registered_snapkv_scores == 3

    def test_removing_blocks_keeps_scores_aligned(self):
        st = state("norm_sum", 0)
        st.update([f32(9, 9, 1, 2, 3, 4, 5, 6)], 6)
        st.remove_blocks(0, [1])
        assert st.scores[0].tolist() == [1, 2, 5, 6]
        assert st.counters[0].tolist() == [6, 5, 2, 1]


# ------------------------------------------------------------------------------------------
# Trigger, areas and block selection
# ------------------------------------------------------------------------------------------


def small(**kw: object) -> UpstreamConfig:
    """B=2, start 1 block, recent 1 block, max 4 blocks (evictable area 2 blocks)."""
    args: dict = dict(start_size=2, recent_size=2, max_cache_size=8, block_size=2,
                      aggregation_mode="sum", snapkv_window_size=0, max_pool_window_size=1)
    args.update(kw)
    return UpstreamConfig(**args)


def feed(algo: UpstreamCacheEviction, cache_tokens: int, values: np.ndarray | None = None,
         window: int = 1) -> None:
    x = np.ones(cache_tokens, np.float32) if values is None else values
    algo.update([x] * algo.num_layers, window)


class TestTrigger:
    def test_config_derived_sizes(self):
        c = small()
        assert (c.evictable_size, c.start_blocks, c.recent_blocks, c.evictable_blocks) \
            == (4, 1, 1, 2)
        assert c.max_cache_size_after_eviction == 9

    def test_no_eviction_below_max_plus_one_block(self):
        algo = UpstreamCacheEviction(small(), 2)
        feed(algo, 9)
        assert algo.evictable_block_range() == (0, 0)
        assert [e.tolist() for e in algo.evict()] == [[], []]

    def test_first_full_block_past_the_arena_triggers(self):
        algo = UpstreamCacheEviction(small(), 1)
        feed(algo, 10)
        assert algo.evictable_block_range() == (1, 4)  # blocks 1..3; block 4 is recent
        assert algo.num_blocks_to_evict() == 1

    def test_partial_last_block_belongs_to_the_recent_area(self):
        algo = UpstreamCacheEviction(small(), 1)
        feed(algo, 11)
        assert algo.evictable_block_range() == (1, 4)
        feed(algo, 13)
        assert algo.evictable_block_range() == (1, 5)
        assert algo.num_blocks_to_evict() == 2
        assert len(algo.evict()[0]) == 2
        assert algo.state.tracked_tokens(0) + 2 == 9  # max_cache_size + (13 mod 2)

    def test_lowest_blocks_evicted_older_first_on_ties(self):
        assert lowest_blocks(np.array([3.0, 1.0, 2.0, 1.0]), 1).tolist() == [1]
        assert lowest_blocks(np.array([3.0, 1.0, 2.0, 1.0]), 3).tolist() == [1, 2, 3]
        assert lowest_blocks(np.array([1.0, 1.0, 1.0]), 2).tolist() == [0, 1]

    def test_sum_mode_block_choice_and_returned_indices(self):
        algo = UpstreamCacheEviction(small(), 1)
        # tracked blocks (after the start block): [5,5] [1,0] [2,2] [0,0] [9]
        feed(algo, 11, f32(7, 7, 5, 5, 1, 0, 2, 2, 0, 0, 9))
        assert algo.block_scores(0).tolist() == [10, 1, 4]
        assert algo.evict()[0].tolist() == [2]  # tracked block 1 + 1 start block
        assert algo.state.scores[0].tolist() == [5, 5, 2, 2, 0, 0, 9]

    def test_norm_sum_divides_by_lifetime_before_summing(self):
        algo = UpstreamCacheEviction(small(aggregation_mode="norm_sum"), 1)
        feed(algo, 9, np.r_[f32(0, 0), np.full(7, 2, np.float32)], window=9)
        # counters 7..1 -> normalised 2/7 .. 2/1; decode step adds token 10 and 1 to all
        feed(algo, 10, np.r_[f32(0, 0), np.zeros(7, np.float32), f32(8)])
        assert algo.state.counters[0].tolist() == [8, 7, 6, 5, 4, 3, 2, 1]
        assert algo.block_scores(0).tolist() == pytest.approx(
            [2 / 8 + 2 / 7, 2 / 6 + 2 / 5, 2 / 4 + 2 / 3])
        assert algo.evict()[0].tolist() == [1]  # the oldest tokens have the lowest average

    def test_layers_choose_independently_but_evict_the_same_count(self):
        algo = UpstreamCacheEviction(small(), 2)
        algo.update([f32(0, 0, 1, 1, 9, 9, 5, 5, 0, 0), f32(0, 0, 9, 9, 1, 1, 5, 5, 0, 0)], 1)
        assert [e.tolist() for e in algo.evict()] == [[1], [2]]

    def test_step_never_evicts_in_the_last_prefill_chunk(self):
        algo = UpstreamCacheEviction(small(), 1)
        ones = np.ones(20, np.float32)
        assert algo.step([ones], prompt_len=20, num_processed_tokens=0,
                         num_scheduled_tokens=20)[0].size == 0
        out = algo.step([np.ones(21, np.float32)], prompt_len=20, num_processed_tokens=20,
                        num_scheduled_tokens=1)
        assert len(out[0]) == 21 // 2 - 4  # down to max_cache_size + 1 partial token


# ------------------------------------------------------------------------------------------
# KVCrush
# ------------------------------------------------------------------------------------------

# 3 evictable blocks of 4 tokens; the 6 highest raw scores give the indicators
# block 0 [1,1,1,0], block 1 [0,1,0,0], block 2 [1,0,0,1]
CRUSH_SCORES = np.array([9, 8, 7, 0.1, 0.2, 6, 0.3, 0.4, 5, 0.5, 0.6, 4], np.float64)


class TestKVCrush:
    def test_indicators_mark_the_top_half_of_raw_scores(self):
        ind = UpstreamKVCrush.indicators(CRUSH_SCORES, 12)
        assert ind.tolist() == [1, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1]

    @pytest.mark.parametrize("mode, anchor, distances, keep1, keep2", [
        ("zeros", [0, 0, 0, 0], [3, 1, 2], [1], [1, 2]),
        ("ones", [1, 1, 1, 1], [1, 3, 2], [0], [0, 2]),
        ("alternating", [0, 1, 0, 1], [3, 1, 2], [1], [1, 2]),
        ("mean", [1, 1, 0, 0], [1, 1, 2], [0], [0, 1]),
    ])
    def test_deterministic_anchor_modes(self, mode, anchor, distances, keep1, keep2):
        crush = UpstreamKVCrush(1, mode, 4)
        ind = crush.indicators(CRUSH_SCORES, 12)
        a = crush.anchor(ind)
        assert a.tolist() == anchor
        assert crush.hamming(ind, a).tolist() == distances
        assert crush.retain(12, [0, 1, 2], CRUSH_SCORES) == keep1
        assert UpstreamKVCrush(2, mode, 4).retain(12, [0, 1, 2], CRUSH_SCORES) == keep2

    def test_only_blocks_evicted_by_score_are_eligible(self):
        crush = UpstreamKVCrush(1, "zeros", 4)
        assert crush.retain(12, [0, 2], CRUSH_SCORES) == [2]  # distances 3, 2

    def test_even_stride_over_the_distance_order(self):
        crush = UpstreamKVCrush(2, "zeros", 4)
        # sorted by distance: blocks 3, 2, 1, 0 -> stride 4 // 2 = 2 -> positions 0 and 2
        assert crush.representatives(np.array([3, 2, 1, 0]), [0, 1, 2, 3]) == [3, 1]
        # 5 eligible, budget 2 -> stride 2 -> picks sorted positions 0 and 2
        assert crush.representatives(np.array([0, 1, 2, 3, 4]), range(5)) == [0, 2]

    def test_applies_only_when_the_score_ranking_evicts_at_least_the_budget(self):
        crush = UpstreamKVCrush(3, "zeros", 4)
        assert not crush.applies(2) and crush.applies(3)
        assert not UpstreamKVCrush(0, "zeros", 4).applies(5)

    def test_random_anchor_is_the_top_bit_of_mt19937(self):
        r = MT19937(5489)
        assert [r.next_u32() for _ in range(3)] == [3499211612, 581869302, 3890346734]
        r = MT19937(42)
        legacy = np.random.RandomState(42).randint(0, 2**32, size=700, dtype=np.uint32)
        assert [r.next_u32() for _ in range(700)] == legacy.tolist()  # same mt19937 stream
        crush = UpstreamKVCrush(1, "random", 16, seed=42)
        # libstdc++ uniform_int_distribution<int>(0, 1) on std::mt19937(42)
        assert "".join(map(str, crush.anchor(np.zeros(0)).tolist())) == "0110111100000010"

    def test_budget_is_on_top_of_max_cache_size(self):
        cfg = small(kvcrush_budget=1, kvcrush_anchor="zeros")
        algo = UpstreamCacheEviction(cfg, 1)
        rng = np.random.default_rng(0)
        cache = processed = 0  # processed counts evicted tokens too, cache does not
        sizes = []
        for n in [12] + [1] * 20:
            cache += n
            out = algo.step([rng.random(cache).astype(np.float32)], prompt_len=12,
                            num_processed_tokens=processed, num_scheduled_tokens=n)
            processed += n
            cache -= 2 * len(out[0])
            sizes.append(cache)
        # after the first decode step: 8 + 1 KVCrush block + the odd token, then 10..11
        assert sizes[1] == 8 + 2 + 1
        assert min(sizes[1:]) == 10 and max(sizes[1:]) == 11

    def test_budget_larger_than_the_first_eviction_never_applies(self):
        cfg = small(kvcrush_budget=3, kvcrush_anchor="zeros")
        algo = UpstreamCacheEviction(cfg, 1)
        cache = 11  # first eviction removes 1 block < 3: KVCrush stays off for good
        feed(algo, cache)
        for _ in range(30):
            cache -= 2 * len(algo.evict()[0])
            cache += 1
            feed(algo, cache)
            assert cache <= 9 + 1


class TestLibstdcxx:
    """Tie orders recorded from GCC's libstdc++ (cannot be derived by hand)."""

    def test_sort_is_insertion_sort_up_to_16(self):
        d = [1, 0, 1, 0, 0, 1]
        assert libstdcxx_sort(range(6), lambda a, b: d[a] < d[b]) == [1, 3, 4, 0, 2, 5]

    def test_sort_is_unstable_above_16(self):
        d = [0] * 17
        assert libstdcxx_sort(range(17), lambda a, b: d[a] < d[b]) \
            == [8, 16, 15, 14, 13, 12, 11, 10, 9, 0, 7, 6, 5, 4, 3, 2, 1]

    def test_partial_sort_tie_choice(self):
        s = np.array([0, 0, 0, 0, 2, 2, 1, 0, 0], np.float64)
        assert np.flatnonzero(libstdcxx_partial_sort_top(s, 4)).tolist() == [1, 4, 5, 6]
        assert np.flatnonzero(libstdcxx_partial_sort_top(np.ones(6), 3)).tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------
# Configuration checks and GenAI's defects
# ------------------------------------------------------------------------------------------


class TestConfigAndDefects:
    @pytest.mark.parametrize("kw", [dict(start_size=3), dict(max_cache_size=4),
                                    dict(aggregation_mode="adaptive_rkv"),
                                    dict(kvcrush_anchor="median")])
    def test_invalid(self, kw):
        with pytest.raises(ValueError):
            small(**kw)

    def test_throws_for_prompt(self):
        c = UpstreamConfig(32, 32, 96, "norm_sum", 8, 32)
        assert [p for p in range(1, 60) if c.throws_for_prompt(p)] == list(range(33, 40))
        assert not UpstreamConfig(32, 32, 96, "sum", 8, 32).throws_for_prompt(35)
        assert UpstreamConfig(32, 32, 96, "norm_sum", 35, 32).throws_for_prompt(10)
        assert not UpstreamConfig(32, 32, 96, "norm_sum", 34, 32).throws_for_prompt(10)

    def test_prompt_inside_start_plus_window_raises_like_genai(self):
        algo = UpstreamCacheEviction(UpstreamConfig(32, 32, 96, "norm_sum", 8, 32), 1)
        with pytest.raises(UpstreamError, match="new_scores_size >= num_snapkv_scores"):
            algo.step([np.ones(33, np.float32)], prompt_len=33, num_processed_tokens=0,
                      num_scheduled_tokens=33)

    def test_window_longer_than_start_area_raises_at_start_plus_two(self):
        algo = UpstreamCacheEviction(UpstreamConfig(32, 32, 96, "norm_sum", 35, 32), 1)
        with pytest.raises(UpstreamError, match="m_num_registered_snapkv_aggregated_scores"):
            for cache in range(10, 40):
                n = 10 if cache == 10 else 1
                algo.step([np.ones(cache, np.float32)], prompt_len=10,
                          num_processed_tokens=cache - n, num_scheduled_tokens=n)
        assert cache == 34

    def test_from_genai(self):
        g = pytest.importorskip("openvino_genai")
        ev = g.CacheEvictionConfig(32, 64, 256, g.AggregationMode.SUM, False, 16,
                                   g.KVCrushConfig(2, g.KVCrushAnchorPointMode.MEAN, 7))
        c = UpstreamConfig.from_genai(ev, 32)
        assert (c.start_size, c.recent_size, c.max_cache_size, c.aggregation_mode,
                c.snapkv_window_size, c.kvcrush_budget, c.kvcrush_anchor, c.kvcrush_seed) \
            == (32, 64, 256, "sum", 16, 2, "mean", 7)


# ------------------------------------------------------------------------------------------
# The base.py contract
# ------------------------------------------------------------------------------------------


class TestContractPolicy:
    def inputs(self) -> EvictionInputs:
        # 1 layer, 2 KV heads, 9 candidates (4 blocks of 2 + 1 trailing token)
        h0 = [5, 5, 1, 1, 3, 3, 0, 0, 7]
        h1 = [5, 5, 1, 0, 3, 3, 1, 1, 7]
        pos = list(range(10, 19))
        return EvictionInputs.from_lists([[np.array(h0, np.float32), np.array(h1, np.float32)]],
                                         [[np.array(pos), np.array(pos)]], block_size=2)

    def test_is_a_policy(self):
        assert isinstance(UpstreamEviction(), EvictionPolicy)
        assert UpstreamEviction.name == "upstream" and UpstreamEviction.score_mode == "window"

    def test_block_level_head_summed_exact_budget(self):
        inp = self.inputs()
        policy = UpstreamEviction(aggregation_mode="sum", pool_window=1)
        keep = policy.select(inp, 5, np.random.default_rng(0))
        check_keep(keep, inp, 5, "upstream")
        # head sums per block: [20, 3, 12, 2]; tail token kept, then the 2 best blocks
        assert keep[0, 0].tolist() == [1, 1, 0, 0, 1, 1, 0, 0, 1]
        assert (keep[0, 0] == keep[0, 1]).all()

    def test_remainder_comes_from_the_best_evicted_block(self):
        inp = self.inputs()
        keep = UpstreamEviction(aggregation_mode="sum", pool_window=1).select(
            inp, 4, np.random.default_rng(0))
        check_keep(keep, inp, 4, "upstream")
        # tail + block 0 + the better token of block 2 (tie: the later one)
        assert keep[0, 0].tolist() == [1, 1, 0, 0, 0, 1, 0, 0, 1]

    def test_kvcrush_budget_is_taken_from_the_kept_blocks(self):
        inp = self.inputs()
        keep = UpstreamEviction(aggregation_mode="sum", pool_window=1, kvcrush_budget=1,
                                kvcrush_anchor="ones").select(inp, 5, np.random.default_rng(0))
        check_keep(keep, inp, 5, "upstream")
        assert keep[0, 0, :2].all() and keep[0, 0, 8]  # best block by score + tail
        assert int(keep[0, 0, 2:8].sum()) == 2


# ------------------------------------------------------------------------------------------
# Black box: GenAI's per-step KV block usage and exceptions
# ------------------------------------------------------------------------------------------

NUM_KV_BLOCKS = 100


def genai_run(model, prompt_len: int, *, budget: int = 0, chunk: int = 256, window: int = 8,
              max_new_tokens: int = 40) -> tuple[list[int], int | None]:
    """Blocks in use at each step (scheduler's view: this step's tokens included) and the step
    that threw (1-based), if any."""
    g = pytest.importorskip("openvino_genai")
    ov = pytest.importorskip("openvino")
    sc = g.SchedulerConfig()
    sc.enable_prefix_caching = False
    sc.use_cache_eviction = True
    sc.num_kv_blocks = NUM_KV_BLOCKS
    sc.max_num_batched_tokens = chunk
    sc.cache_eviction_config = g.CacheEvictionConfig(
        32, 32, 96, g.AggregationMode.NORM_SUM, False, window,
        g.KVCrushConfig(budget, g.KVCrushAnchorPointMode.ALTERNATING))
    pipe = g.ContinuousBatchingPipeline(str(model), sc, "CPU", {})
    gc = g.GenerationConfig()
    gc.max_new_tokens = max_new_tokens
    gc.ignore_eos = True
    handle = pipe.add_request(0, ov.Tensor(np.full((1, prompt_len), 5, dtype=np.int64)), gc)
    used: list[int] = []  # (dropping ``handle`` would cancel the request)
    try:
        while pipe.has_non_finished_requests():
            pipe.step()
            used.append(round(pipe.get_metrics().cache_usage * NUM_KV_BLOCKS / 100))
    except RuntimeError:
        return used, len(used) + 1
    assert handle.get_status() == g.GenerationStatus.FINISHED
    return used, None


def ours_run(prompt_len: int, *, budget: int = 0, chunk: int = 256, window: int = 8,
             max_new_tokens: int = 40) -> tuple[list[int], int | None]:
    cfg = UpstreamConfig(32, 32, 96, "norm_sum", window, 32, kvcrush_budget=budget,
                         kvcrush_anchor="alternating")
    algo = UpstreamCacheEviction(cfg, 2)
    rng = np.random.default_rng(1)
    cache = processed = 0
    used: list[int] = []
    for n in prefill_chunks(prompt_len, chunk) + [1] * (max_new_tokens - 1):
        cache += n
        used.append(math.ceil(cache / 32))
        try:
            out = algo.step([rng.random(cache).astype(np.float32) for _ in range(2)],
                            prompt_len=prompt_len, num_processed_tokens=processed,
                            num_scheduled_tokens=n)
        except UpstreamError:
            return used[:-1], len(used)
        cache -= 32 * len(out[0])
        processed += n
    return used, None


@pytest.mark.parametrize("prompt_len, budget, chunk", [
    (200, 0, 256),  # first eviction after the first decode step, then 4 blocks
    (200, 2, 256),  # KVCrush keeps 2 blocks on top
    (200, 3, 256),  # 3 blocks evicted by score >= budget 3: KVCrush keeps them all
    (200, 4, 256),  # 3 < budget 4: KVCrush never applies
    (200, 0, 64),   # chunked prefill
    (40, 0, 256),   # no eviction before the cache holds max_cache_size + block_size
])
def test_block_usage_matches_genai(tiny_model, prompt_len, budget, chunk):
    theirs = genai_run(tiny_model, prompt_len, budget=budget, chunk=chunk, max_new_tokens=80)
    assert ours_run(prompt_len, budget=budget, chunk=chunk, max_new_tokens=80) == theirs


@pytest.mark.parametrize("prompt_len, window, step", [(33, 8, 1), (39, 8, 1), (40, 8, None),
                                                      (10, 35, 25), (10, 34, None)])
def test_exceptions_match_genai(tiny_model, prompt_len, window, step):
    theirs = genai_run(tiny_model, prompt_len, window=window)
    assert theirs[1] == step
    assert ours_run(prompt_len, window=window) == theirs
