"""Upstream-compatible eviction: what OpenVINO GenAI 2026.4 ``ContinuousBatchingPipeline`` does.

A numpy re-implementation (no code copied) of GenAI's ``CacheEvictionAlgorithm``,
``EvictionScoreManager``, ``SnapKVScoreAggregationCalculator`` and ``KVCrushAlgorithm``
(``src/cpp/src/continuous_batching/cache/cache_eviction.cpp`` and ``kvcrush.cpp``, read at
openvino.genai commit da1db864d2bc, version 2026.4.0.0; the eviction files are identical to tag
2026.3.0.0). The full specification with file:line citations is ``docs/upstream-eviction.md``.
Modes ``SUM`` and ``NORM_SUM`` are covered; ``ADAPTIVE_RKV`` and sparse-attention skips are not.

Units: ``T`` tokens, ``B`` = ``block_size`` tokens per KV block, ``L`` decoder layers. GenAI
tracks scores only for the tokens *after* the start area (``start_size`` tokens): "tracked"
token ``t`` is cache token ``start_size + t`` and "tracked" block ``b`` is logical block
``start_size // B + b`` of the sequence's current (compacted) block table.

What an engine must do to reproduce GenAI exactly (greedy, one sequence, ``apply_rotation=False``):

1. One :class:`UpstreamCacheEviction` per sequence, created before its first forward (its
   KVCrush RNG is ``std::mt19937(rng_seed)`` per sequence and persists across steps).
2. Prefill in GenAI's chunks: with dynamic split-fuse (the default), chunk ``i`` is
   ``min(max_num_batched_tokens, tokens left)`` (:func:`prefill_chunks`; default 256).
   Decode: one token per step.
3. Before each forward, put ``window = algo.window(prompt_len, num_processed, num_scheduled)``
   (:func:`score_aggregation_window`) into the PagedAttention input ``score_aggregation_window``
   of that sequence; ``num_processed`` = tokens processed before this forward (prompt + generated,
   *including* evicted ones). It is 0 for prefill chunks before the last ``snapkv_window_size``
   prompt tokens, the part of the window inside the chunk, and 1 in decode.
4. After the forward, take each layer's ``scores.L`` segment of the sequence: float32 [T_cache]
   with ``T_cache`` = tokens in its KV cache *including this step's*, in block-table order,
   summed over ALL query heads and over the last ``window`` queries of the step. Call
   ``algo.update(scores, window)`` (every step, prefill chunks included).
5. Only if the prompt had been fully processed *before* this forward (a decode step; GenAI never
   evicts in the step that runs the last prefill chunk), call ``algo.evict()``: a per-layer
   array of logical block indices. Remove those blocks from each layer's block table (the rest
   keep their order) and shrink the cache by ``B`` tokens per block. Positions are untouched:
   the next token keeps position ``num_processed`` (no RoPE rotation, no re-numbering).
   :meth:`UpstreamCacheEviction.step` does 4 and 5 in one call.
6. Then sample from this forward's logits. Eviction after a forward only affects later steps, so
   the first two generated tokens never see an evicted cache.

Eviction happens once the cache holds ``max_cache_size + B`` tokens or more; it leaves
``max_cache_size + (T_cache mod B)`` tokens, plus ``kvcrush_budget`` blocks once KVCrush applies
(which needs a single eviction of at least ``kvcrush_budget`` blocks; after that it re-applies at
every eviction). Like GenAI, :class:`UpstreamError` is raised for ``NORM_SUM`` with a SnapKV window
when ``start_size < prompt_len < start_size + snapkv_window_size`` (and for short prompts when
``snapkv_window_size > start_size + 2``): an engine should refuse these configurations up front.

:class:`UpstreamEviction` is the same selection squeezed into the stateless
:mod:`kvcrush_ov.eviction.base` contract; it is close, not exact (see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from kvcrush_ov.eviction.base import EvictionInputs

AGGREGATION_MODES = ("sum", "norm_sum")
ANCHOR_MODES = ("random", "zeros", "ones", "mean", "alternating")
MAX_POOL_WINDOW_SIZE = 7  # constexpr in GenAI's pipeline_impl.cpp
DEFAULT_MAX_NUM_BATCHED_TOKENS = 256  # SchedulerConfig default


class UpstreamError(RuntimeError):
    """Raised where GenAI's eviction code fails an OPENVINO_ASSERT (and GenAI's step() throws)."""


# --------------------------------------------------------------------------------------------
# Configuration and scheduling helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamConfig:
    """GenAI's ``CacheEvictionConfig`` (+ ``KVCrushConfig``) and the pipeline's block size.

    Sizes are in tokens except ``kvcrush_budget`` (blocks, kept ON TOP of ``max_cache_size``).
    ``start_size``, ``recent_size`` and ``max_cache_size`` must be non-zero multiples of
    ``block_size`` with ``max_cache_size > start_size + recent_size`` (GenAI asserts the same).
    """

    start_size: int
    recent_size: int
    max_cache_size: int
    aggregation_mode: str = "norm_sum"
    snapkv_window_size: int = 8
    block_size: int = 32
    kvcrush_budget: int = 0
    kvcrush_anchor: str = "random"
    kvcrush_seed: int = 0
    max_pool_window_size: int = MAX_POOL_WINDOW_SIZE

    def __post_init__(self) -> None:
        b = self.block_size
        if b < 1:
            raise ValueError(f"block_size={b} must be >= 1")
        for name in ("start_size", "recent_size", "max_cache_size"):
            v = getattr(self, name)
            if v <= 0 or v % b:
                raise ValueError(f"{name}={v} must be a non-zero multiple of block_size={b}")
        if self.max_cache_size <= self.start_size + self.recent_size:
            raise ValueError("max_cache_size must be larger than start_size + recent_size")
        if self.aggregation_mode not in AGGREGATION_MODES:
            raise ValueError(f"aggregation_mode={self.aggregation_mode!r}: allowed "
                             f"{', '.join(AGGREGATION_MODES)} (adaptive_rkv is not implemented)")
        if self.kvcrush_anchor not in ANCHOR_MODES:
            raise ValueError(f"kvcrush_anchor={self.kvcrush_anchor!r}: allowed "
                             f"{', '.join(ANCHOR_MODES)}")
        if self.snapkv_window_size < 0 or self.kvcrush_budget < 0 or self.kvcrush_seed < 0:
            raise ValueError("snapkv_window_size, kvcrush_budget and kvcrush_seed must be >= 0")
        if self.max_pool_window_size < 1:
            raise ValueError("max_pool_window_size must be >= 1")

    @property
    def evictable_size(self) -> int:
        """Tokens: ``max_cache_size - start_size - recent_size`` (minimum evictable area)."""
        return self.max_cache_size - self.start_size - self.recent_size

    @property
    def start_blocks(self) -> int:
        return self.start_size // self.block_size

    @property
    def recent_blocks(self) -> int:
        return self.recent_size // self.block_size

    @property
    def evictable_blocks(self) -> int:
        """Blocks of the evictable area kept after an eviction (KVCrush adds its budget)."""
        return self.evictable_size // self.block_size

    @property
    def max_cache_size_after_eviction(self) -> int:
        """Tokens: ``max_cache_size + block_size - 1``; eviction runs above this."""
        return self.max_cache_size + self.block_size - 1

    def throws_for_prompt(self, prompt_len: int) -> bool:
        """True if GenAI's NORM_SUM score bookkeeping throws for this prompt length (tokens).

        ``start_size < prompt_len < start_size + snapkv_window_size`` throws right after the
        prompt; ``prompt_len <= start_size`` throws once the cache holds ``start_size + 2``
        tokens when ``snapkv_window_size > start_size + 2``. Never with ``sum`` or window 0.
        """
        w, s = self.snapkv_window_size, self.start_size
        if self.aggregation_mode != "norm_sum" or w == 0:
            return False
        return s < prompt_len < s + w or (prompt_len <= s and w > s + 2)

    @classmethod
    def from_genai(cls, config: Any, block_size: int) -> UpstreamConfig:
        """Build from an ``openvino_genai.CacheEvictionConfig`` (duck-typed, not imported)."""
        mode = getattr(config.aggregation_mode, "name", str(config.aggregation_mode)).lower()
        kv = config.kvcrush_config
        anchor = getattr(kv.anchor_point_mode, "name", str(kv.anchor_point_mode)).lower()
        return cls(start_size=int(config.get_start_size()),
                   recent_size=int(config.get_recent_size()),
                   max_cache_size=int(config.get_max_cache_size()),
                   aggregation_mode=mode, snapkv_window_size=int(config.snapkv_window_size),
                   block_size=int(block_size), kvcrush_budget=int(kv.budget),
                   kvcrush_anchor=anchor, kvcrush_seed=int(kv.rng_seed))


def score_aggregation_window(prompt_len: int, num_processed_tokens: int,
                             num_scheduled_tokens: int, snapkv_window_size: int) -> int:
    """Queries (tokens) whose attention GenAI sums into ``scores.L`` for one forward.

    prompt_len: prompt tokens; num_processed_tokens: tokens processed before this forward;
    num_scheduled_tokens: tokens of this forward. Window 0 (SnapKV off): all scheduled tokens.
    Otherwise the overlap of this forward with the last ``snapkv_window_size`` prompt positions
    (0 before them), and every scheduled token once past them (1 per decode step).
    """
    if snapkv_window_size == 0:
        return num_scheduled_tokens
    first_scored = max(prompt_len - snapkv_window_size, 0)
    after = num_processed_tokens + num_scheduled_tokens
    if after <= first_scored:
        return 0
    if num_processed_tokens > first_scored:
        return num_scheduled_tokens
    return after - first_scored


def prefill_chunks(prompt_len: int,
                   max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS) -> list[int]:
    """Chunk sizes (tokens) of a lone prompt under dynamic split-fuse with enough KV blocks."""
    if prompt_len < 1 or max_num_batched_tokens < 1:
        raise ValueError("prompt_len and max_num_batched_tokens must be >= 1")
    full, rest = divmod(prompt_len, max_num_batched_tokens)
    return [max_num_batched_tokens] * full + ([rest] if rest else [])


def max_pool(scores: np.ndarray, window: int = MAX_POOL_WINDOW_SIZE) -> np.ndarray:
    """Forward-looking max pool over tokens: ``out[i] = max(scores[i : i + window])``.

    scores: [T] (one layer, one step); the window is truncated at the end. Returns [T], same
    dtype. ``window=1`` is the identity.
    """
    x = np.asarray(scores)
    if window <= 1 or x.size == 0:
        return x.copy()
    padded = np.concatenate([x, np.full(window - 1, -np.inf, dtype=x.dtype)])
    return np.lib.stride_tricks.sliding_window_view(padded, window).max(axis=-1)


def lowest_blocks(block_scores: np.ndarray, num_blocks: int) -> np.ndarray:
    """int64 [num_blocks], ascending: the ``num_blocks`` smallest ``(score, index)`` pairs.

    GenAI's ``nth_element`` comparator orders by score then index, so among equal scores the
    lower (older) block is evicted first.
    """
    s = np.asarray(block_scores, dtype=np.float64)
    if not 0 <= num_blocks <= s.size:
        raise UpstreamError(f"cannot evict {num_blocks} of {s.size} blocks")
    order = np.lexsort((np.arange(s.size), s))
    return np.sort(order[:num_blocks]).astype(np.int64)


# --------------------------------------------------------------------------------------------
# libstdc++ behaviour that GenAI's Linux wheels inherit (ties and random bits)
# --------------------------------------------------------------------------------------------

_Comp = Callable[[Any, Any], bool]
_SORT_THRESHOLD = 16  # libstdc++ _S_threshold


def _adjust_heap(a: list, first: int, hole: int, length: int, value: Any, comp: _Comp) -> None:
    top = child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if comp(a[first + child], a[first + child - 1]):
            child -= 1
        a[first + hole] = a[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        a[first + hole] = a[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and comp(a[first + parent], value):
        a[first + hole] = a[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    a[first + hole] = value


def _make_heap(a: list, first: int, last: int, comp: _Comp) -> None:
    length = last - first
    if length < 2:
        return
    parent = (length - 2) // 2
    while True:
        _adjust_heap(a, first, parent, length, a[first + parent], comp)
        if parent == 0:
            return
        parent -= 1


def _pop_heap(a: list, first: int, last: int, result: int, comp: _Comp) -> None:
    value = a[result]
    a[result] = a[first]
    _adjust_heap(a, first, 0, last - first, value, comp)


def _heap_select(a: list, first: int, middle: int, last: int, comp: _Comp) -> None:
    _make_heap(a, first, middle, comp)
    for i in range(middle, last):
        if comp(a[i], a[first]):
            _pop_heap(a, first, middle, i, comp)


def _sort_heap(a: list, first: int, last: int, comp: _Comp) -> None:
    while last - first > 1:
        last -= 1
        _pop_heap(a, first, last, last, comp)


def _insertion_sort(a: list, first: int, last: int, comp: _Comp) -> None:
    for i in range(first + 1, last):
        if comp(a[i], a[first]):
            val = a[i]
            a[first + 1:i + 1] = a[first:i]
            a[first] = val
        else:
            _linear_insert(a, i, comp)


def _linear_insert(a: list, last: int, comp: _Comp) -> None:
    val = a[last]
    nxt = last - 1
    while comp(val, a[nxt]):
        a[last] = a[nxt]
        last = nxt
        nxt -= 1
    a[last] = val


def _move_median_to_first(a: list, result: int, x: int, y: int, z: int, comp: _Comp) -> None:
    if comp(a[x], a[y]):
        pick = y if comp(a[y], a[z]) else (z if comp(a[x], a[z]) else x)
    elif comp(a[x], a[z]):
        pick = x
    else:
        pick = z if comp(a[y], a[z]) else y
    a[result], a[pick] = a[pick], a[result]


def _unguarded_partition(a: list, first: int, last: int, pivot: int, comp: _Comp) -> int:
    while True:
        while comp(a[first], a[pivot]):
            first += 1
        last -= 1
        while comp(a[pivot], a[last]):
            last -= 1
        if not first < last:
            return first
        a[first], a[last] = a[last], a[first]
        first += 1


def _introsort_loop(a: list, first: int, last: int, depth: int, comp: _Comp) -> None:
    while last - first > _SORT_THRESHOLD:
        if depth == 0:
            _heap_select(a, first, last, last, comp)
            _sort_heap(a, first, last, comp)
            return
        depth -= 1
        mid = first + (last - first) // 2
        _move_median_to_first(a, first, first + 1, mid, last - 1, comp)
        cut = _unguarded_partition(a, first + 1, last, first, comp)
        _introsort_loop(a, cut, last, depth, comp)
        last = cut


def libstdcxx_sort(items: Sequence[Any], comp: _Comp) -> list:
    """``std::sort`` as libstdc++ (GCC) implements it: introsort + final insertion sort.

    Not stable for more than 16 items; this reproduces its exact order of equal elements.
    """
    a = list(items)
    n = len(a)
    if n < 2:
        return a
    _introsort_loop(a, 0, n, 2 * (n.bit_length() - 1), comp)
    if n > _SORT_THRESHOLD:
        _insertion_sort(a, 0, _SORT_THRESHOLD, comp)
        for i in range(_SORT_THRESHOLD, n):
            _linear_insert(a, i, comp)
    else:
        _insertion_sort(a, 0, n, comp)
    return a


def libstdcxx_partial_sort_top(values: np.ndarray, k: int) -> np.ndarray:
    """bool [n]: the ``k`` indices ``std::partial_sort(idx, idx + k, end, s[i] > s[j])`` puts
    first (libstdc++ heap selection), i.e. the top ``k`` with libstdc++'s choice among ties."""
    s = np.asarray(values, dtype=np.float64)
    n = s.size
    mask = np.zeros(n, dtype=bool)
    if k <= 0:
        return mask
    if k >= n:
        mask[:] = True
        return mask
    part = np.partition(s, (n - k - 1, n - k))
    if part[n - k] != part[n - k - 1]:  # no tie across the cut: the set is unambiguous
        mask[s >= part[n - k]] = True
        return mask
    idx = list(range(n))
    sl = s.tolist()
    _heap_select(idx, 0, k, n, lambda i, j: sl[i] > sl[j])
    mask[idx[:k]] = True
    return mask


class MT19937:
    """``std::mt19937`` (32-bit Mersenne Twister, seeded with ``seed mod 2**32``)."""

    def __init__(self, seed: int = 5489) -> None:
        mt = [seed & 0xFFFFFFFF]
        for i in range(1, 624):
            prev = mt[-1]
            mt.append((1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
        self._mt = mt
        self._index = 624

    def _twist(self) -> None:
        mt = self._mt
        for i in range(624):
            y = (mt[i] & 0x80000000) | (mt[(i + 1) % 624] & 0x7FFFFFFF)
            v = mt[(i + 397) % 624] ^ (y >> 1)
            mt[i] = v ^ 0x9908B0DF if y & 1 else v
        self._index = 0

    def next_u32(self) -> int:
        if self._index >= 624:
            self._twist()
        y = self._mt[self._index]
        self._index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        return y & 0xFFFFFFFF

    def bit(self) -> int:
        """``std::uniform_int_distribution<int>(0, 1)`` of libstdc++ >= 11 (Lemire): the top
        bit of one 32-bit draw (older libstdc++ differs only for draws 2**31 - 1 and >= 2**32 - 2;
        MSVC is not reproduced)."""
        return self.next_u32() >> 31


# --------------------------------------------------------------------------------------------
# Score bookkeeping (EvictionScoreManager)
# --------------------------------------------------------------------------------------------


@dataclass
class UpstreamScoreState:
    """Per-sequence, per-layer accumulated scores of the tracked tokens (after the start area).

    scores[l]: float64 [T_l] accumulated max-pooled scores; counters[l]: int64 [T_l] lifetime
    counters (``norm_sum`` only, else empty); ``T_l`` = cache tokens of layer ``l`` minus
    ``ignore_first_n_blocks * block_size``. All layers normally have the same ``T``.
    """

    num_layers: int
    block_size: int
    aggregation_mode: str = "norm_sum"
    ignore_first_n_blocks: int = 0
    snapkv_window_size: int = 0
    max_pool_window_size: int = MAX_POOL_WINDOW_SIZE
    num_registered_snapkv_scores: int = 0
    scores: list[np.ndarray] = field(default_factory=list)
    counters: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.aggregation_mode not in AGGREGATION_MODES:
            raise ValueError(f"aggregation_mode={self.aggregation_mode!r}")
        if not self.scores:
            self.scores = [np.zeros(0, np.float64) for _ in range(self.num_layers)]
            self.counters = [np.zeros(0, np.int64) for _ in range(self.num_layers)]

    @property
    def norm(self) -> bool:
        return self.aggregation_mode == "norm_sum"

    def tracked_tokens(self, layer: int) -> int:
        """Tokens whose scores are tracked in ``layer`` (the cache minus the start area)."""
        return int(self.scores[layer].size)

    def update(self, layer_scores: Sequence[np.ndarray], num_snapkv_scores: int) -> None:
        """Register one forward's scores (``register_new_token_scores``).

        layer_scores: L arrays float32 [T_cache] (``scores.L`` of the sequence: every cached
        token, this step's included, summed over all query heads and over the last
        ``num_snapkv_scores`` queries); num_snapkv_scores: the ``score_aggregation_window``
        requested for this forward (queries). Drops the first ``ignore_first_n_blocks`` blocks,
        max-pools the rest (window ``max_pool_window_size``) and adds it to the running sums.
        """
        if len(layer_scores) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers, got {len(layer_scores)}")
        w = self.snapkv_window_size
        if self.num_registered_snapkv_scores < w:
            if num_snapkv_scores + self.num_registered_snapkv_scores > w:
                raise UpstreamError("Total number of aggregated SnapKV scores during prefill phase "
                                    "may not be larger than the configured SnapKV window size")
            self.num_registered_snapkv_scores += num_snapkv_scores
        skip = self.ignore_first_n_blocks * self.block_size
        for layer, raw in enumerate(layer_scores):
            x = np.asarray(raw, dtype=np.float32).reshape(-1)
            if x.size <= skip:
                return  # GenAI returns from the whole call (all layers have the same length)
            pooled = max_pool(x[skip:], self.max_pool_window_size).astype(np.float64)
            if self.scores[layer].size == 0:
                self._initial(layer, pooled, num_snapkv_scores)
            else:
                self._accumulate(layer, pooled)

    def _initial(self, layer: int, pooled: np.ndarray, n: int) -> None:
        w = self.snapkv_window_size
        if w != 0 and n == 0:
            return  # before the SnapKV window: nothing meaningful yet
        self.scores[layer] = pooled.copy()
        if not self.norm:
            return
        size = pooled.size
        if w == 0:
            counter = np.arange(size, 0, -1, dtype=np.int64)
        else:
            if size < n:
                raise UpstreamError("Check 'new_scores_size >= num_snapkv_scores' failed "
                                    f"({size} tracked tokens, {n} SnapKV scores)")
            counter = np.full(size, n, dtype=np.int64)
            counter[size - n:] = np.arange(n, 0, -1)
        self.counters[layer] = counter

    def _accumulate(self, layer: int, pooled: np.ndarray) -> None:
        old = self.scores[layer]
        if pooled.size < old.size:
            raise UpstreamError(f"scores shrank from {old.size} to {pooled.size} tokens")
        acc = np.zeros(pooled.size, np.float64)
        acc[:old.size] = old
        acc += pooled
        self.scores[layer] = acc
        if self.norm:
            self._adjust_counters(layer, old.size, pooled.size)

    def _adjust_counters(self, layer: int, old: int, new: int) -> None:
        counter = np.zeros(new, np.int64)
        counter[:old] = self.counters[layer][:old]
        reg, w = self.num_registered_snapkv_scores, self.snapkv_window_size
        num_new = new - old
        if w == 0 or reg == w:
            counter += num_new
            counter[old:] = num_new - np.arange(num_new)
        else:
            if new < reg:
                raise UpstreamError("Check 'new_size_in_tokens >= "
                                    "m_num_registered_snapkv_aggregated_scores' failed "
                                    f"({new} tracked tokens, {reg} SnapKV scores)")
            counter[:new - reg] = reg
            counter[new - reg:] = np.arange(reg, 0, -1)
        self.counters[layer] = counter

    def normalised(self, layer: int) -> np.ndarray:
        """float64 [T]: ``scores / counters`` (norm_sum) or ``scores`` (sum)."""
        if self.norm:
            return self.scores[layer] / self.counters[layer].astype(np.float64)
        return self.scores[layer].copy()

    def remove_blocks(self, layer: int, tracked_blocks: Sequence[int]) -> None:
        """Drop tracked blocks (ascending indices counted from the end of the start area)."""
        blocks = np.asarray(tracked_blocks, dtype=np.int64)
        if blocks.size == 0:
            return
        keep = np.ones(self.scores[layer].size, dtype=bool)
        for b in blocks.tolist():
            keep[b * self.block_size:(b + 1) * self.block_size] = False
        self.scores[layer] = self.scores[layer][keep]
        if self.norm:
            self.counters[layer] = self.counters[layer][keep]


# --------------------------------------------------------------------------------------------
# KVCrush (KVCrushAlgorithm)
# --------------------------------------------------------------------------------------------


class UpstreamKVCrush:
    """GenAI's KVCrush: keeps ``budget`` of the blocks the score ranking wants to evict.

    Stateful only through its ``std::mt19937`` (RANDOM anchors draw ``block_size`` bits per
    call). Token arrays are [n] with ``n = num_evictable_blocks * block_size`` (tracked tokens
    of the evictable area); block indices are tracked-block indices.
    """

    def __init__(self, budget: int, anchor_mode: str, block_size: int, seed: int = 0) -> None:
        if anchor_mode not in ANCHOR_MODES:
            raise ValueError(f"anchor_mode={anchor_mode!r}: allowed {', '.join(ANCHOR_MODES)}")
        self.budget = int(budget)
        self.anchor_mode = anchor_mode
        self.block_size = int(block_size)
        self.rng = MT19937(int(seed))

    def applies(self, num_evicted_blocks: int) -> bool:
        """GenAI runs KVCrush only if ``budget > 0`` and ``num_evicted_blocks >= budget``."""
        return self.budget > 0 and num_evicted_blocks >= self.budget

    @staticmethod
    def indicators(raw_scores: np.ndarray, num_tokens: int) -> np.ndarray:
        """uint8 [num_tokens]: 1 for the ``num_tokens // 2`` highest RAW accumulated scores
        (not normalised) of the first ``num_tokens`` tracked tokens, libstdc++ tie choice."""
        top = libstdcxx_partial_sort_top(np.asarray(raw_scores)[:num_tokens], num_tokens // 2)
        return top.astype(np.uint8)

    def anchor(self, indicators: np.ndarray) -> np.ndarray:
        """uint8 [block_size]: the anchor point; ``mean`` sets bit ``j`` iff more than half of
        the blocks have indicator 1 at offset ``j``; ``random`` consumes ``block_size`` draws."""
        b = self.block_size
        mode = self.anchor_mode
        if mode == "zeros":
            return np.zeros(b, np.uint8)
        if mode == "ones":
            return np.ones(b, np.uint8)
        if mode == "alternating":
            return (np.arange(b) % 2).astype(np.uint8)
        if mode == "mean":
            ind = np.asarray(indicators, dtype=np.int64)
            nb = ind.size // b
            sums = ind[:nb * b].reshape(nb, b).sum(axis=0)
            return (sums / nb > 0.5).astype(np.uint8)
        return np.array([self.rng.bit() for _ in range(b)], dtype=np.uint8)

    def hamming(self, indicators: np.ndarray, anchor: np.ndarray) -> np.ndarray:
        """int64 [n // block_size]: Hamming distance of each block's indicators to the anchor."""
        b = self.block_size
        ind = np.asarray(indicators, dtype=np.int64)
        nb = ind.size // b
        diff = ind[:nb * b].reshape(nb, b) != np.asarray(anchor, dtype=np.int64)[None, :]
        return diff.sum(axis=1).astype(np.int64)

    def representatives(self, distances: np.ndarray, eligible: Sequence[int]) -> list[int]:
        """Tracked blocks to keep: the eligible blocks (ascending) sorted by distance with
        libstdc++ ``std::sort`` (unstable above 16), then every ``len // budget``-th from 0."""
        d = np.asarray(distances).tolist()
        chosen = set(int(e) for e in eligible)
        filtered = [i for i in range(len(d)) if i in chosen]
        if not filtered or self.budget <= 0:
            return []
        ordered = libstdcxx_sort(filtered, lambda a, b: d[a] < d[b])
        k = min(len(ordered), self.budget)
        step = len(ordered) // k
        return [ordered[i * step] for i in range(k)]

    def retain(self, num_tokens: int, evicted: Sequence[int], raw_scores: np.ndarray) -> list[int]:
        """Tracked blocks among ``evicted`` that KVCrush keeps (``budget`` of them).

        num_tokens: tokens of the evictable area (``num_evictable_blocks * block_size``);
        evicted: tracked blocks chosen by score (ascending); raw_scores: float64 [T] the
        layer's raw accumulated scores (indicators use the first ``num_tokens``).
        """
        ind = self.indicators(raw_scores, num_tokens)
        anchor = self.anchor(ind)
        return self.representatives(self.hamming(ind, anchor), evicted)


# --------------------------------------------------------------------------------------------
# The per-sequence algorithm (CacheEvictionAlgorithm)
# --------------------------------------------------------------------------------------------


class UpstreamCacheEviction:
    """GenAI's per-sequence ``CacheEvictionAlgorithm`` (SUM / NORM_SUM, optional KVCrush).

    Logical block indices are positions in the sequence's current block table (after earlier
    evictions); ``evict`` returns the same number of blocks for every layer.
    """

    def __init__(self, config: UpstreamConfig, num_layers: int) -> None:
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        self.config = config
        self.num_layers = num_layers
        self.state = UpstreamScoreState(
            num_layers=num_layers, block_size=config.block_size,
            aggregation_mode=config.aggregation_mode, ignore_first_n_blocks=config.start_blocks,
            snapkv_window_size=config.snapkv_window_size,
            max_pool_window_size=config.max_pool_window_size)
        self.kvcrush = UpstreamKVCrush(config.kvcrush_budget, config.kvcrush_anchor,
                                       config.block_size, config.kvcrush_seed)
        self.num_evicted_tokens = 0

    def window(self, prompt_len: int, num_processed_tokens: int, num_scheduled_tokens: int) -> int:
        """``score_aggregation_window`` to request for this forward (queries)."""
        return score_aggregation_window(prompt_len, num_processed_tokens, num_scheduled_tokens,
                                        self.config.snapkv_window_size)

    def update(self, layer_scores: Sequence[np.ndarray], num_snapkv_scores: int) -> None:
        """Register one forward's ``scores.L`` (L arrays float32 [T_cache]); see
        :meth:`UpstreamScoreState.update`."""
        self.state.update(layer_scores, num_snapkv_scores)

    def evictable_block_range(self, layer: int = 0) -> tuple[int, int]:
        """Logical blocks ``[begin, end)`` that may be evicted now, ``(0, 0)`` if none.

        ``begin = start_size / B``; ``end = floor(cache_tokens / B) - recent_size / B``, so a
        partially filled last block belongs to the recent area.
        """
        c = self.config
        length = c.start_size + self.state.tracked_tokens(layer)
        if length <= c.max_cache_size_after_eviction:
            return (0, 0)
        return (c.start_blocks, length // c.block_size - c.recent_blocks)

    def num_blocks_to_evict(self, layer: int = 0) -> int:
        """Blocks the score ranking evicts now: evictable blocks minus ``evictable_size / B``."""
        begin, end = self.evictable_block_range(layer)
        return max(end - begin - self.config.evictable_blocks, 0)

    def block_scores(self, layer: int) -> np.ndarray:
        """float64 [num_evictable_blocks]: per block, the sequential sum over its tokens of the
        normalised score (``scores / counters`` or ``scores``), evictable area only."""
        begin, end = self.evictable_block_range(layer)
        nb, b = end - begin, self.config.block_size
        if nb == 0:
            return np.zeros(0, np.float64)
        vals = self.state.normalised(layer)[:nb * b].reshape(nb, b)
        return np.cumsum(vals, axis=1)[:, -1]

    def evict(self) -> list[np.ndarray]:
        """Per layer, int64 ascending logical block indices to drop now (maybe empty).

        Forgets their scores. Must be called only after decode forwards (see module doc).
        """
        c = self.config
        out: list[np.ndarray] = []
        for layer in range(self.num_layers):
            if c.start_size + self.state.tracked_tokens(layer) <= c.max_cache_size_after_eviction:
                out.append(np.zeros(0, np.int64))
                continue
            scores = self.block_scores(layer)
            evicted = lowest_blocks(scores, self.num_blocks_to_evict(layer)).tolist()
            if self.kvcrush.applies(len(evicted)):
                kept = set(self.kvcrush.retain(scores.size * c.block_size, evicted,
                                               self.state.scores[layer]))
                evicted = [e for e in evicted if e not in kept]
            self.num_evicted_tokens += len(evicted) * c.block_size
            self.state.remove_blocks(layer, evicted)
            out.append(np.asarray(evicted, dtype=np.int64) + c.start_blocks)
        return out

    def step(self, layer_scores: Sequence[np.ndarray], *, prompt_len: int,
             num_processed_tokens: int, num_scheduled_tokens: int) -> list[np.ndarray]:
        """After a forward: ``update`` with this forward's window, then ``evict`` if the prompt
        was complete before it (``num_processed_tokens >= prompt_len``), else no blocks.

        Returns per layer int64 logical block indices to drop (see :meth:`evict`).
        """
        self.update(layer_scores, self.window(prompt_len, num_processed_tokens,
                                              num_scheduled_tokens))
        if num_processed_tokens < prompt_len:
            return [np.zeros(0, np.int64) for _ in range(self.num_layers)]
        return self.evict()


# --------------------------------------------------------------------------------------------
# The same selection in the generic (stateless) policy contract
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamEviction:
    """GenAI's block selection inside the :mod:`kvcrush_ov.eviction.base` contract.

    Per layer: scores summed over KV heads (when all heads of the layer hold the same
    candidates, else per head), max-pooled over the candidate axis, normalised
    (``scores / counts`` averaged over heads for ``norm_sum``), summed per block of
    ``block_size`` candidates, then the lowest ``(score, index)`` blocks go. The keep mask is
    identical across the heads of a layer. Differences from GenAI, which this contract cannot
    express: pooling runs on the accumulated scores (GenAI pools every step before summing, and
    its pooling window also reaches into the recent area), and the budget is exact here.
    Budget rules: a trailing partial block (``n mod B`` candidates) is kept first, as GenAI's
    recent area absorbs it; then ``(num_keep - tail) // B`` whole blocks; a remainder of ``r``
    tokens comes from the best evicted block (its ``r`` best tokens). KVCrush
    (``kvcrush_budget`` blocks) is taken OUT of those whole blocks: the score ranking keeps
    ``whole - budget`` and KVCrush picks ``budget`` of the rest as GenAI does; ``random``
    anchors are seeded from ``rng`` (GenAI's per-sequence mt19937 stream cannot be kept here).
    """

    name: ClassVar[str] = "upstream"
    score_mode: ClassVar[str] = "window"

    aggregation_mode: str = "norm_sum"
    pool_window: int = MAX_POOL_WINDOW_SIZE
    kvcrush_budget: int = 0
    kvcrush_anchor: str = "random"

    def __post_init__(self) -> None:
        if self.aggregation_mode not in AGGREGATION_MODES:
            raise ValueError(f"aggregation_mode={self.aggregation_mode!r}")
        if self.kvcrush_anchor not in ANCHOR_MODES:
            raise ValueError(f"kvcrush_anchor={self.kvcrush_anchor!r}")
        if self.kvcrush_budget < 0 or self.pool_window < 1:
            raise ValueError("kvcrush_budget must be >= 0 and pool_window >= 1")

    def select(self, inputs: EvictionInputs, num_keep: int,
               rng: np.random.Generator) -> np.ndarray:
        """bool [L, H, N] keep mask, ``num_keep`` per (layer, head), block-level per layer."""
        num_layers, num_heads, _ = inputs.shape
        keep = np.zeros(inputs.shape, dtype=bool)
        for layer in range(num_layers):
            n = inputs.lengths[layer]
            pos = inputs.positions[layer]
            shared = bool((n == n[0]).all()) and all(
                np.array_equal(pos[h, :n[0]], pos[0, :n[0]]) for h in range(num_heads))
            groups = [list(range(num_heads))] if shared else [[h] for h in range(num_heads)]
            for heads in groups:
                m = int(n[heads[0]])
                if num_keep > m:
                    raise ValueError(f"num_keep={num_keep} > {m} candidates")
                sc = inputs.scores[layer, heads, :m].astype(np.float64).sum(axis=0)
                ct = inputs.counts[layer, heads, :m].astype(np.float64).mean(axis=0)
                draws = self.kvcrush_budget > 0 and self.kvcrush_anchor == "random"
                seed = int(rng.integers(0, 2**32)) if draws else 0
                mask = self._select_one(sc, ct, num_keep, inputs.block_size, seed)
                keep[layer, heads, :m] = mask[None, :]
        return keep

    def _select_one(self, scores: np.ndarray, counts: np.ndarray, num_keep: int,
                    block_size: int, seed: int) -> np.ndarray:
        n = scores.size
        keep = np.zeros(n, dtype=bool)
        if num_keep <= 0:
            return keep
        pooled = max_pool(scores, self.pool_window)
        vals = pooled / np.maximum(counts, 1.0) if self.aggregation_mode == "norm_sum" else pooled
        nb = n // block_size
        tail = n - nb * block_size
        if num_keep <= tail:
            keep[n - num_keep:] = True
            return keep
        keep[nb * block_size:] = True
        whole, rem = divmod(num_keep - tail, block_size)
        if nb == 0:
            return keep
        block_scores = np.cumsum(vals[:nb * block_size].reshape(nb, block_size), axis=1)[:, -1]
        budget = min(self.kvcrush_budget, whole)
        evicted = lowest_blocks(block_scores, nb - whole + budget).tolist()
        crush = UpstreamKVCrush(budget, self.kvcrush_anchor, block_size, seed)
        if crush.applies(len(evicted)):
            kept = set(crush.retain(nb * block_size, evicted, pooled))
            evicted = [e for e in evicted if e not in kept]
        dropped = set(evicted)
        for b in range(nb):
            if b not in dropped:
                keep[b * block_size:(b + 1) * block_size] = True
        if rem:
            best = max(evicted, key=lambda b: (block_scores[b], b))
            part = vals[best * block_size:(best + 1) * block_size]
            order = np.lexsort((-np.arange(block_size), -part))[:rem]
            keep[best * block_size + order] = True
        return keep
