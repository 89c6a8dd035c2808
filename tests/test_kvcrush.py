"""KVCrush on small cases computed by hand (the algorithm is in kvcrush_ov/eviction/kvcrush.py)."""

from __future__ import annotations

import numpy as np
import pytest

from kvcrush_ov.eviction.base import EvictionInputs, check_keep
from kvcrush_ov.eviction.h2o import H2O
from kvcrush_ov.eviction.kvcrush import (
    KVCrush,
    apportion,
    hamming,
    head_bits,
    make_anchor,
    match_heads,
    pick_representatives,
    split_largest_remainder,
    stride_indices,
)


def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def kept_positions(inputs: EvictionInputs, mask: np.ndarray) -> list[list[set[int]]]:
    """[layer][head] -> the positions ``mask`` keeps."""
    num_layers, num_heads, _ = mask.shape
    return [[set(inputs.positions[la, h][mask[la, h]].tolist()) for h in range(num_heads)]
            for la in range(num_layers)]


def test_bits_are_the_median_split_of_each_head() -> None:
    scores = np.array([[[5, 1, 4, 2, 3], [1, 2, 3, 4, -np.inf]]], np.float32)
    lengths = np.array([[5, 4]])
    bits = head_bits(scores, lengths)
    assert bits[0, 0].tolist() == [True, False, True, False, False]  # above the median 3
    assert bits[0, 1].tolist() == [False, False, True, True, False]  # above 2.5; padding 0


def test_anchors() -> None:
    vectors = np.array([[[1, 0, 1], [0, 0, 1], [1, 1, 1]]], bool)  # [L=1, M=3, D=3]
    valid = np.array([[True, True, False]])
    assert make_anchor("zeros", vectors, valid, rng()).tolist() == [[False] * 3]
    assert make_anchor("ones", vectors, valid, rng()).tolist() == [[True] * 3]
    assert make_anchor("alternating", vectors, valid, rng()).tolist() == [[False, True, False]]
    # majority over the valid units: coordinate 0 is a 1-1 tie -> 0, coordinate 2 is 2-0 -> 1
    assert make_anchor("mean", vectors, valid, rng()).tolist() == [[False, False, True]]
    random = make_anchor("random", vectors, valid, rng())
    assert random.tolist() == rng().integers(0, 2, size=(1, 3), dtype=np.int8).astype(bool).tolist()
    with pytest.raises(ValueError, match="anchor"):
        make_anchor("middle", vectors, valid, rng())


def test_even_stride_indices() -> None:
    assert stride_indices(5, 2, np.arange(2)).tolist() == [1, 3]
    assert stride_indices(10, 3, np.arange(3)).tolist() == [1, 5, 8]
    assert stride_indices(4, 4, np.arange(4)).tolist() == [0, 1, 2, 3]
    assert stride_indices(7, 1, 0) == 3


# One layer, two heads holding positions 0..7. Importance = H2O with k_imp = 2:
#   head 0 scores 8 7 6 5 4 3 2 1 -> keeps {0, 1}; bits (top half) 1 1 1 1 0 0 0 0
#   head 1 scores 1 8 2 7 3 6 4 5 -> keeps {1, 3}; bits             0 1 0 1 0 1 0 1
# KVCrush candidates (kept in no head): 2 4 5 6 7 with vectors (h0, h1):
#   2:(1,0) 4:(0,0) 5:(0,1) 6:(0,0) 7:(0,1)
HEAD0 = [8, 7, 6, 5, 4, 3, 2, 1]
HEAD1 = [1, 8, 2, 7, 3, 6, 4, 5]


def two_heads() -> EvictionInputs:
    pos = np.arange(8)
    return EvictionInputs.from_lists([[np.array(HEAD0, np.float32), np.array(HEAD1, np.float32)]],
                                     [[pos, pos]])


@pytest.mark.parametrize(("anchor", "distances", "picks"), [
    # alternating (0,1): 2->2 4->1 5->0 6->1 7->0; sorted 5 7 4 6 2; stride of 5 by 2: 1, 3
    ("alternating", [2, 1, 0, 1, 0], {7, 6}),
    ("zeros", [1, 0, 1, 0, 1], {6, 5}),  # sorted 4 6 2 5 7
    ("ones", [1, 2, 1, 2, 1], {5, 4}),  # sorted 2 5 7 4 6
    ("mean", [1, 0, 1, 0, 1], {6, 5}),  # majority bits over the candidates: (0, 0)
])
def test_hamming_and_the_exact_picks(anchor: str, distances: list[int], picks: set[int]) -> None:
    inputs = two_heads()
    policy = KVCrush(H2O(), share=0.5, anchor=anchor)
    plan = policy.plan(inputs, 4, rng())
    candidates = [2, 4, 5, 6, 7]
    vectors = plan.bits[0].T[None, candidates]  # [1, 5, 2]
    anchor_bits = make_anchor(anchor, vectors, np.ones((1, 5), bool), rng())
    assert hamming(vectors, anchor_bits[None])[0, 0].tolist() == distances
    assert kept_positions(inputs, plan.crush) == [[picks, picks]]
    assert kept_positions(inputs, plan.importance) == [[{0, 1}, {1, 3}]]
    check_keep(plan.keep, inputs, 4, "kvcrush")


def test_block_granularity_picks_whole_blocks() -> None:
    # 16 positions, blocks of 4, num_keep 8, share 0.5 -> k_crush 4 = one block, k_imp 4.
    # head 0 keeps 0-3, head 1 keeps 0,1,2,5: only blocks 2 (8-11) and 3 (12-15) are whole
    # candidates. Bits: head 0 top half = 0-3, 8-11; head 1 top half = 0,1,2,5, 8,10,12,14.
    # Block vectors (tokens in order, (h0, h1) each): block 2 = 11 10 11 10, block 3 = 01 00 01 00.
    h0 = [16, 15, 14, 13, 1, 2, 3, 4, 12, 11, 10, 9, 5, 6, 7, 8]
    h1 = [16, 15, 14, 1, 2, 13, 3, 4, 12, 5, 11, 6, 10, 7, 9, 8]
    pos = np.arange(16)
    inputs = EvictionInputs.from_lists([[np.array(h0, np.float32), np.array(h1, np.float32)]],
                                       [[pos, pos]], block_size=4)
    block2, block3 = set(range(8, 12)), set(range(12, 16))
    # alternating 01010101: block 2 at distance 6, block 3 at 2 -> sorted (3, 2) -> stride pick 1
    # ones: block 2 at 2, block 3 at 6 -> sorted (2, 3) -> block 3
    for anchor, want in [("alternating", block2), ("zeros", block2), ("ones", block3)]:
        plan = KVCrush(H2O(), share=0.5, anchor=anchor, granularity="block").plan(inputs, 8, rng())
        assert kept_positions(inputs, plan.crush) == [[want, want]], anchor
        assert kept_positions(inputs, plan.importance) == [[{0, 1, 2, 3}, {0, 1, 2, 5}]]
        check_keep(plan.keep, inputs, 8, anchor)
    # share 0.75 -> k_crush 6: one block (4), the remaining 2 go to importance (k_imp 4)
    plan = KVCrush(H2O(), share=0.75, granularity="block").plan(inputs, 8, rng())
    assert plan.crush_budget.tolist() == [4]
    assert kept_positions(inputs, plan.crush) == [[block2, block2]]


def test_multi_anchor_groups_and_split() -> None:
    # units 00 00 01 11 11 11; zeros/ones anchors; unit 2 ties (1, 1) -> the first anchor
    vectors = np.array([[[0, 0], [0, 0], [0, 1], [1, 1], [1, 1], [1, 1]]], bool)
    valid = np.ones((1, 6), bool)
    anchors = np.array([[[0, 0]], [[1, 1]]], bool)  # [A=2, L=1, D=2]
    # groups {0, 1, 2} and {3, 4, 5}; k=2 -> 1 + 1, middle of each group
    got = pick_representatives(vectors, valid, anchors, np.array([2]))
    assert np.flatnonzero(got[0]).tolist() == [1, 4]
    # k=3 -> 1.5 + 1.5: the tie of remainders goes to the first group: 2 + 1
    got = pick_representatives(vectors, valid, anchors, np.array([3]))
    assert np.flatnonzero(got[0]).tolist() == [0, 2, 4]
    # 3 over sizes 1 2 3: 0.5 1 1.5 -> floors 0 1 1, remainders tie -> first group
    assert split_largest_remainder(np.array([3]), np.array([[1, 2, 3]])).tolist() == [[1, 1, 1]]
    # 4 over 5 0 1: 3.33 0 0.67 -> 3 0 0, the largest remainder (0.67) takes the last one
    assert split_largest_remainder(np.array([4]), np.array([[5, 0, 1]])).tolist() == [[3, 0, 1]]


def test_shortfall_goes_back_to_importance() -> None:
    # Heads hold different positions; only 0, 1, 2 are held by both. num_keep 4, share 0.5:
    # H2O keeps 0,1 (head 0) and 6,7 (head 1): the one candidate left is position 2, so KVCrush
    # keeps 2 in both heads and its missing slot goes to each head's next best: 3 and 8.
    inputs = EvictionInputs.from_lists(
        [[np.array([6, 5, 4, 3, 2, 1], np.float32), np.array([1, 2, 0.5, 6, 5, 4], np.float32)]],
        [[np.arange(6), np.array([0, 1, 2, 6, 7, 8])]])
    plan = KVCrush(H2O(), share=0.5).plan(inputs, 4, rng())
    assert kept_positions(inputs, plan.crush) == [[{2}, {2}]]
    assert kept_positions(inputs, plan.importance) == [[{0, 1, 3}, {6, 7, 8}]]
    check_keep(plan.keep, inputs, 4, "kvcrush")


def test_match_heads_by_position() -> None:
    positions = np.array([[[0, 2, 4, 6], [2, 3, 4, -1]]])
    idx, found = match_heads(positions, np.array([[4, 3]]))
    assert found[0, 1].tolist() == [False, True, True, False]
    assert idx[0, 1, 1:3].tolist() == [0, 2]
    aligned = np.array([[[0, 2, 4], [0, 2, 4]]])
    assert match_heads(aligned, np.array([[3, 3]]))[0] is None


def test_dynamic_split_gives_diffuse_layers_more() -> None:
    # layer 0: one dominant token (top-2 captures 101/107), layer 1: uniform (captures 2/8).
    # w = (0.056, 0.75): the 4 KVCrush tokens (2 layers * round(0.5 * 4)) split 0.28 / 3.72 -> 0 / 4
    scores = [[np.array([100, 1, 1, 1, 1, 1, 1, 1], np.float32)], [np.ones(8, np.float32)]]
    inputs = EvictionInputs.from_lists(scores, [[np.arange(8)], [np.arange(8)]])
    plan = KVCrush(H2O(), share=0.5, dynamic_split=True).plan(inputs, 4, rng())
    assert plan.crush_budget.tolist() == [0, 4]
    assert plan.crush[0].sum() == 0 and plan.crush[1].sum() == 4
    check_keep(plan.keep, inputs, 4, "kvcrush")
    assert apportion(10, np.array([1.0, 1.0, 8.0]), 5).tolist() == [3, 2, 5]
    assert apportion(3, np.zeros(3), 5).tolist() == [1, 1, 1]


def test_bit_scores_can_use_another_aggregation() -> None:
    inputs = EvictionInputs.from_lists([[np.array([4, 3, 1], np.float32)]], [[np.arange(3)]],
                                       counts=[[np.array([8, 3, 1], np.float32)]])
    policy = KVCrush(H2O("norm_sum"), aggregation_mode="sum")
    assert np.array_equal(policy.bit_scores(inputs), H2O("sum").scores(inputs))
    assert KVCrush(H2O("norm_sum")).score_mode == "all"
    assert KVCrush(H2O(), anchor=["zeros", "ones"]).anchor == ("zeros", "ones")


@pytest.mark.parametrize("kept,written,share", [
    (512, 1024, 0.25), (600, 1000, 0.25), (256, 1024, 0.25 / 3), (128, 1024, 0.0),
    (100, 1024, 0.0), (5, 0, 0.25),
])
def test_taper_shrinks_the_share_with_the_kept_fraction(kept: int, written: int,
                                                        share: float) -> None:
    policy = KVCrush(H2O(), share=0.25, taper=(0.125, 0.5))
    assert policy.share_for(kept, written) == pytest.approx(share)
    assert KVCrush(H2O(), share=0.25).share_for(kept, written) == 0.25  # no taper
    tapered = policy.for_budget(kept, kept // 2, written)
    assert tapered.share == pytest.approx(min(1.0, share * kept / (kept // 2)))
    assert tapered.taper is None


def test_tapered_to_nothing_keeps_what_the_importance_policy_keeps() -> None:
    gen = np.random.default_rng(3)
    scores = [[gen.random(64).astype(np.float32) for _ in range(3)] for _ in range(2)]
    inputs = EvictionInputs.from_lists(scores, [[np.arange(64)] * 3] * 2)
    plain = H2O().select(inputs, 16, rng())
    policy = KVCrush(H2O(), share=0.25, taper=(0.125, 0.5))
    assert np.array_equal(policy.for_budget(16, 16, 256).select(inputs, 16, rng()), plain)
    untapered = policy.for_budget(16, 16, 32).select(inputs, 16, rng())  # ratio 0.5: full share
    assert not np.array_equal(untapered, plain)
    assert np.array_equal(untapered, KVCrush(H2O(), share=0.25).for_budget(16, 16)
                          .select(inputs, 16, rng()))
