"""The C++ selection kernels (kvcrush_ov._core, through kvcrush_ov.eviction) against small
pure-numpy references written here, on random inputs full of ties, small and large enough for
the kernels to run on several threads."""

from __future__ import annotations

import numpy as np
import pytest

from kvcrush_ov import _core
from kvcrush_ov.eviction.base import top_k_mask
from kvcrush_ov.eviction.kvcrush import (
    hamming,
    make_anchor,
    pick_representatives,
    split_largest_remainder,
    stride_indices,
)
from kvcrush_ov.eviction.snapkv import _sliding_max, _window_sums

# --- the references: plain numpy / Python, one obvious way each ---


def ref_top_k(values: np.ndarray, k: np.ndarray) -> np.ndarray:
    """bool [..., N]: the first k of a stable argsort by decreasing value (NaN last)."""
    order = np.argsort(-values, axis=-1, kind="stable")
    ranks = np.argsort(order, axis=-1, kind="stable")
    return ranks < np.asarray(k)[..., None]


def ref_split(total: int, sizes: list[int]) -> list[int]:
    whole = max(sum(sizes), 1)
    out = [total * s // whole for s in sizes]
    rest = [total * s % whole for s in sizes]
    for g in sorted(range(len(sizes)), key=lambda g: (-rest[g], g))[:total - sum(out)]:
        out[g] += 1
    return out


def ref_pick(vectors: np.ndarray, valid: np.ndarray, anchors: np.ndarray,
             k: np.ndarray) -> np.ndarray:
    """bool [L, M]: KVCrush's representatives, one layer and one group at a time."""
    num_layers, m, _ = vectors.shape
    chosen = np.zeros((num_layers, m), bool)
    for layer in range(num_layers):
        units = np.flatnonzero(valid[layer]).tolist()
        dist = [[int((vectors[layer, j] != a[layer]).sum()) for j in units] for a in anchors]
        group = [min(range(len(anchors)), key=lambda a, i=i: (dist[a][i], a))
                 for i in range(len(units))]
        sizes = [group.count(a) for a in range(len(anchors))]
        per_group = ref_split(min(int(k[layer]), len(units)), sizes)
        for a, picks in enumerate(per_group):
            members = sorted((dist[a][i], j) for i, j in enumerate(units) if group[i] == a)
            for i in range(picks):
                chosen[layer, members[(2 * i + 1) * len(members) // (2 * picks)][1]] = True
    return chosen


# --- top-k ---

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32, np.float16])
def test_top_k_mask_matches_a_stable_sort(dtype: type) -> None:
    rng = np.random.default_rng(1)
    for trial in range(300):
        rows, n = rng.integers(1, 6), rng.integers(0, 40)
        values = rng.integers(-3, 4, size=(rows, n)).astype(dtype)  # many ties
        if np.issubdtype(dtype, np.floating):
            values[rng.random(values.shape) < 0.15] = -np.inf
            values[rng.random(values.shape) < 0.05] = np.inf
            if trial % 3 == 0:
                values[rng.random(values.shape) < 0.1] = np.nan
        k = rng.integers(-2, n + 3, size=rows)
        want = ref_top_k(values, np.clip(k, 0, n))
        assert np.array_equal(top_k_mask(values, k), want), (values, k)


def test_top_k_mask_on_many_threads_and_any_shape() -> None:
    rng = np.random.default_rng(2)
    values = rng.integers(0, 50, size=(3, 8, 9000)).astype(np.float32)  # > 1 thread's work
    k = rng.integers(0, 9000, size=(3, 8))
    assert np.array_equal(top_k_mask(values, k), ref_top_k(values, k))
    assert np.array_equal(top_k_mask(values, 100), ref_top_k(values, np.full((3, 8), 100)))
    assert top_k_mask(np.array([3.0, 1.0, 3.0]), 2).tolist() == [True, False, True]
    assert top_k_mask(np.zeros((2, 0)), 3).shape == (2, 0)
    assert top_k_mask(np.zeros((0, 5)), 3).shape == (0, 5)
    transposed = values[0].T  # not contiguous
    assert np.array_equal(top_k_mask(transposed, 3), ref_top_k(transposed, np.full(9000, 3)))


# --- KVCrush's steps ---

def random_units(rng: np.random.Generator, num_layers: int, m: int, d: int,
                 num_anchors: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vectors = rng.random((num_layers, m, d)) < rng.uniform(0.2, 0.8)
    valid = rng.random((num_layers, m)) < rng.uniform(0.3, 1.0)
    anchors = rng.random((num_anchors, num_layers, d)) < 0.5
    return vectors, valid, anchors


def test_hamming_and_mean_anchor_match_numpy() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        vectors, valid, anchors = random_units(rng, rng.integers(1, 4), rng.integers(0, 30),
                                               rng.integers(1, 12), rng.integers(1, 4))
        want = (vectors[None] ^ anchors[:, :, None, :]).sum(axis=-1)
        assert np.array_equal(hamming(vectors, anchors), want)
        ones = (vectors & valid[:, :, None]).sum(axis=1)
        mean = make_anchor("mean", vectors, valid, np.random.default_rng(0))
        assert np.array_equal(mean, 2 * ones > valid.sum(axis=1)[:, None])
        num_layers, _, d = vectors.shape
        alternating = make_anchor("alternating", vectors, valid, np.random.default_rng(0))
        assert np.array_equal(alternating, np.tile(np.arange(d) % 2 == 1, (num_layers, 1)))


def test_split_and_stride_match_python() -> None:
    rng = np.random.default_rng(4)
    for _ in range(300):
        sizes = rng.integers(0, 6, size=rng.integers(1, 5)).tolist()
        total = int(rng.integers(0, sum(sizes) + 1))
        assert split_largest_remainder(np.array([total]), np.array([sizes]))[0].tolist() \
            == ref_split(total, sizes)
    n, k = np.array([5, 10, 7]), np.array([2, 3, 1])
    assert stride_indices(n[:, None], k[:, None], np.arange(3)).tolist() \
        == [[(2 * i + 1) * a // (2 * b) for i in range(3)] for a, b in zip(n, k, strict=True)]


@pytest.mark.parametrize("d", [1, 2, 3, 12])
def test_pick_representatives_matches_the_reference(d: int) -> None:
    rng = np.random.default_rng(10 + d)
    for _ in range(120):
        num_layers, m, num_anchors = rng.integers(1, 4), rng.integers(0, 40), rng.integers(1, 4)
        vectors, valid, anchors = random_units(rng, num_layers, m, d, num_anchors)
        k = rng.integers(0, m + 3, size=num_layers)
        assert np.array_equal(pick_representatives(vectors, valid, anchors, k),
                              ref_pick(vectors, valid, anchors, k))


def test_pick_representatives_on_many_threads() -> None:
    rng = np.random.default_rng(5)
    vectors, valid, anchors = random_units(rng, 6, 6000, 4, 2)  # > 1 thread's work
    k = rng.integers(0, 3000, size=6)
    assert np.array_equal(pick_representatives(vectors, valid, anchors, k),
                          ref_pick(vectors, valid, anchors, k))


# --- pooling ---

def ref_window_sums(v: np.ndarray, before: int, after: int) -> np.ndarray:
    """The documented order, in numpy: power-of-two span sums, then one span per set bit of the
    width (widest first) added to the running sum."""
    n, w = v.shape[-1], before + after + 1
    x = np.concatenate([np.zeros((*v.shape[:-1], before), np.float32), v,
                        np.zeros((*v.shape[:-1], after), np.float32)], axis=-1)
    spans = [x]
    while 2 ** len(spans) <= w:
        half = 2 ** (len(spans) - 1)
        spans.append(spans[-1][..., :-half] + spans[-1][..., half:])
    out, start = None, 0
    for b in reversed(range(len(spans))):
        if w >> b & 1:
            part = spans[b][..., start:start + n]
            out = part.copy() if out is None else out + part
            start += 2 ** b
    return out


@pytest.mark.parametrize("n", [1, 7, 64, 4100])
def test_window_sums_bit_for_bit_and_sliding_max_exact(n: int) -> None:
    rng = np.random.default_rng(n)
    v = rng.dirichlet(np.ones(n), size=(3, 4)).astype(np.float32)
    v[..., ::5] *= 1e-6  # magnitudes far apart: the summation order shows
    for before, after in [(0, 0), (1, 1), (3, 0), (15, 15), (30, 0), (31, 31), (5, 9)]:
        assert np.array_equal(_window_sums(v, before, after), ref_window_sums(v, before, after))
        padded = np.pad(v, [(0, 0), (0, 0), (before, after)], constant_values=-np.inf)
        ref = np.lib.stride_tricks.sliding_window_view(padded, before + after + 1, -1).max(-1)
        got = _sliding_max(v, before, after)
        assert np.array_equal(got, ref) and got.dtype == np.float32
    with pytest.raises(ValueError, match="^window: allowed before >= 0"):
        _window_sums(v, -1, 2)


# --- errors name the field ---

def test_invalid_arguments_name_the_field() -> None:
    vectors, valid = np.zeros((2, 5, 3), bool), np.ones((2, 5), bool)
    with pytest.raises(ValueError, match="anchor='middle': allowed random, zeros"):
        make_anchor("middle", vectors, valid, np.random.default_rng(0))
    with pytest.raises(ValueError, match="^anchors: allowed shape"):
        hamming(vectors, np.zeros((1, 3, 3), bool))
    with pytest.raises(ValueError, match="^valid: allowed shape"):
        pick_representatives(vectors, valid[:, :4], np.zeros((1, 2, 3), bool), np.array([1, 1]))
    with pytest.raises(ValueError, match=r"^k\[1\]=-1: allowed an integer >= 0"):
        pick_representatives(vectors, valid, np.zeros((1, 2, 3), bool), np.array([1, -1]))
    with pytest.raises(ValueError, match="^k: allowed one entry per row"):
        _core.top_k_mask(np.zeros((2, 3), np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="^total=-1"):
        split_largest_remainder(np.array([-1]), np.array([[1, 2]]))
