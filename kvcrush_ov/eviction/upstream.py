"""Upstream-compatible eviction: what OpenVINO GenAI 2026.4 ``ContinuousBatchingPipeline`` does.

Our own implementation (no code copied) of GenAI's ``CacheEvictionAlgorithm``,
``EvictionScoreManager``, ``SnapKVScoreAggregationCalculator`` and ``KVCrushAlgorithm``
(``src/cpp/src/continuous_batching/cache/cache_eviction.cpp`` and ``kvcrush.cpp``, read at
openvino.genai commit da1db864d2bc, version 2026.4.0.0; the eviction files are identical to tag
2026.3.0.0). The full specification with file:line citations is ``docs/upstream-eviction.md``.
Modes ``SUM`` and ``NORM_SUM`` are covered; ``ADAPTIVE_RKV`` and sparse-attention skips are not.

The algorithm runs in C++ (``cpp/include/kvcrush/upstream.hpp``, ``kvcrush::UpstreamCacheEviction``
and friends, through :mod:`kvcrush_ov._core`); this module is its Python face: the configuration,
the scheduling helpers and thin wrappers that keep the arrays' shapes and GenAI's exceptions.

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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from kvcrush_ov import _core
from kvcrush_ov.eviction.base import EvictionInputs

AGGREGATION_MODES = ("sum", "norm_sum")
ANCHOR_MODES = ("random", "zeros", "ones", "mean", "alternating")
MAX_POOL_WINDOW_SIZE = 7  # constexpr in GenAI's pipeline_impl.cpp
DEFAULT_MAX_NUM_BATCHED_TOKENS = 256  # SchedulerConfig default


class UpstreamError(RuntimeError):
    """Raised where GenAI's eviction code fails an OPENVINO_ASSERT (and GenAI's step() throws).

    C++: ``kvcrush::UpstreamError`` (``_core.UpstreamError``), re-raised as this class."""


@contextmanager
def _genai_asserts() -> Iterator[None]:
    """Re-raises the C++ core's ``UpstreamError`` as :class:`UpstreamError` (same message)."""
    try:
        yield
    except _core.UpstreamError as err:
        raise UpstreamError(str(err)) from None


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
    C++: ``kvcrush::score_aggregation_window``.
    """
    return _core.upstream_window(int(prompt_len), int(num_processed_tokens),
                                 int(num_scheduled_tokens), int(snapkv_window_size))


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
    dtype (float32 pools in float32, anything else in float64). ``window=1`` is the identity.
    C++: ``kvcrush::upstream_max_pool``.
    """
    x = np.asarray(scores)
    if x.dtype == np.float32:
        return _core.upstream_max_pool(np.ascontiguousarray(x).reshape(-1), int(window))
    out = _core.upstream_max_pool(np.ascontiguousarray(x, dtype=np.float64).reshape(-1),
                                  int(window))
    return out.astype(x.dtype, copy=False)


def lowest_blocks(block_scores: np.ndarray, num_blocks: int) -> np.ndarray:
    """int64 [num_blocks], ascending: the ``num_blocks`` smallest ``(score, index)`` pairs.

    GenAI's ``nth_element`` comparator orders by score then index, so among equal scores the
    lower (older) block is evicted first. C++: ``kvcrush::lowest_blocks``.
    """
    s = np.ascontiguousarray(block_scores, dtype=np.float64).reshape(-1)
    with _genai_asserts():
        return _core.lowest_blocks(s, int(num_blocks))


# --------------------------------------------------------------------------------------------
# libstdc++ behaviour that GenAI's Linux wheels inherit (ties and random bits)
# --------------------------------------------------------------------------------------------


def libstdcxx_sort(items: Sequence[Any], comp: Callable[[Any, Any], bool]) -> list:
    """``std::sort`` as libstdc++ (GCC) implements it: introsort + final insertion sort.

    Not stable for more than 16 items; this reproduces its exact order of equal elements.
    C++: ``kvcrush::libstdcxx_sort`` (calls ``comp`` back for every comparison).
    """
    a = list(items)
    order = _core.libstdcxx_sort_order(len(a), lambda i, j: bool(comp(a[i], a[j])))
    return [a[i] for i in order]


def libstdcxx_partial_sort_top(values: np.ndarray, k: int) -> np.ndarray:
    """bool [n]: the ``k`` indices ``std::partial_sort(idx, idx + k, end, s[i] > s[j])`` puts
    first (libstdc++ heap selection), i.e. the top ``k`` with libstdc++'s choice among ties.
    C++: ``kvcrush::libstdcxx_partial_sort_top``."""
    s = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
    return _core.libstdcxx_partial_sort_top(s, int(k))


class MT19937:
    """``std::mt19937`` (32-bit Mersenne Twister, seeded with ``seed mod 2**32``): the C++
    standard's engine itself (``_core.MT19937``)."""

    def __init__(self, seed: int = 5489, *, _engine: Any = None) -> None:
        self._engine = _core.MT19937(int(seed) & 0xFFFFFFFF) if _engine is None else _engine

    def next_u32(self) -> int:
        return int(self._engine.next_u32())

    def bit(self) -> int:
        """``std::uniform_int_distribution<int>(0, 1)`` of libstdc++ >= 11 (Lemire): the top
        bit of one 32-bit draw (older libstdc++ differs only for draws 2**31 - 1 and >= 2**32 - 2;
        MSVC is not reproduced)."""
        return int(self._engine.bit())


# --------------------------------------------------------------------------------------------
# Score bookkeeping (EvictionScoreManager)
# --------------------------------------------------------------------------------------------


class UpstreamScoreState:
    """Per-sequence, per-layer accumulated scores of the tracked tokens (after the start area).

    scores[l]: float64 [T_l] accumulated max-pooled scores; counters[l]: int64 [T_l] lifetime
    counters (``norm_sum`` only, else empty); ``T_l`` = cache tokens of layer ``l`` minus
    ``ignore_first_n_blocks * block_size``. All layers normally have the same ``T``.
    ``scores`` and ``counters`` are copies of the C++ state (``kvcrush::UpstreamScoreState``);
    pass them to the constructor to start from a given state.
    """

    def __init__(self, num_layers: int, block_size: int, aggregation_mode: str = "norm_sum",
                 ignore_first_n_blocks: int = 0, snapkv_window_size: int = 0,
                 max_pool_window_size: int = MAX_POOL_WINDOW_SIZE,
                 num_registered_snapkv_scores: int = 0,
                 scores: Sequence[np.ndarray] | None = None,
                 counters: Sequence[np.ndarray] | None = None, *, _core_state: Any = None) -> None:
        if aggregation_mode not in AGGREGATION_MODES:
            raise ValueError(f"aggregation_mode={aggregation_mode!r}")
        self.num_layers = int(num_layers)
        self.block_size = int(block_size)
        self.aggregation_mode = aggregation_mode
        self.ignore_first_n_blocks = int(ignore_first_n_blocks)
        self.snapkv_window_size = int(snapkv_window_size)
        self.max_pool_window_size = int(max_pool_window_size)
        if _core_state is not None:  # a view of an UpstreamCacheEviction's state
            self._core = _core_state
            return
        self._core = _core.UpstreamScoreState(
            num_layers=self.num_layers, block_size=self.block_size,
            aggregation_mode=aggregation_mode, ignore_first_n_blocks=self.ignore_first_n_blocks,
            snapkv_window_size=self.snapkv_window_size,
            max_pool_window_size=self.max_pool_window_size)
        self._core.num_registered_snapkv_scores = int(num_registered_snapkv_scores)
        for layer, sc in enumerate(scores or []):
            ct = counters[layer] if counters else np.zeros(0, np.int64)
            self._core.set_layer(layer, np.ascontiguousarray(sc, dtype=np.float64),
                                 np.ascontiguousarray(ct, dtype=np.int64))

    @property
    def norm(self) -> bool:
        return self.aggregation_mode == "norm_sum"

    @property
    def num_registered_snapkv_scores(self) -> int:
        """SnapKV window queries registered so far (all layers; stops at the window size)."""
        return int(self._core.num_registered_snapkv_scores)

    @property
    def scores(self) -> list[np.ndarray]:
        """L arrays float64 [T_l]: the accumulated max-pooled scores (copies)."""
        return [self._core.scores(layer) for layer in range(self.num_layers)]

    @property
    def counters(self) -> list[np.ndarray]:
        """L arrays int64 [T_l] (empty with ``sum``): the lifetime counters (copies)."""
        return [self._core.counters(layer) for layer in range(self.num_layers)]

    def tracked_tokens(self, layer: int) -> int:
        """Tokens whose scores are tracked in ``layer`` (the cache minus the start area)."""
        return int(self._core.tracked_tokens(layer))

    def update(self, layer_scores: Sequence[np.ndarray], num_snapkv_scores: int) -> None:
        """Register one forward's scores (``register_new_token_scores``).

        layer_scores: L arrays float32 [T_cache] (``scores.L`` of the sequence: every cached
        token, this step's included, summed over all query heads and over the last
        ``num_snapkv_scores`` queries); num_snapkv_scores: the ``score_aggregation_window``
        requested for this forward (queries). Drops the first ``ignore_first_n_blocks`` blocks,
        max-pools the rest (window ``max_pool_window_size``) and adds it to the running sums.
        """
        _update(self._core, self.num_layers, layer_scores, num_snapkv_scores)

    def normalised(self, layer: int) -> np.ndarray:
        """float64 [T]: ``scores / counters`` (norm_sum) or ``scores`` (sum)."""
        with _genai_asserts():
            return self._core.normalised(layer)

    def remove_blocks(self, layer: int, tracked_blocks: Sequence[int]) -> None:
        """Drop tracked blocks (ascending indices counted from the end of the start area)."""
        self._core.remove_blocks(layer, [int(b) for b in np.asarray(tracked_blocks).reshape(-1)])


def _update(core: Any, num_layers: int, layer_scores: Sequence[np.ndarray],
            num_snapkv_scores: int) -> None:
    """``update`` of a C++ state / algorithm: L arrays cast to float32 [T_cache]."""
    if len(layer_scores) != num_layers:
        raise ValueError(f"expected {num_layers} layers, got {len(layer_scores)}")
    arrays = [np.ascontiguousarray(x, dtype=np.float32).reshape(-1) for x in layer_scores]
    with _genai_asserts():
        core.update(arrays, int(num_snapkv_scores))


# --------------------------------------------------------------------------------------------
# KVCrush (KVCrushAlgorithm)
# --------------------------------------------------------------------------------------------


class UpstreamKVCrush:
    """GenAI's KVCrush: keeps ``budget`` of the blocks the score ranking wants to evict.

    Stateful only through its ``std::mt19937`` (RANDOM anchors draw ``block_size`` bits per
    call). Token arrays are [n] with ``n = num_evictable_blocks * block_size`` (tracked tokens
    of the evictable area); block indices are tracked-block indices.
    C++: ``kvcrush::UpstreamKVCrush``.
    """

    def __init__(self, budget: int, anchor_mode: str, block_size: int, seed: int = 0, *,
                 _core_crush: Any = None) -> None:
        if anchor_mode not in ANCHOR_MODES:
            raise ValueError(f"anchor_mode={anchor_mode!r}: allowed {', '.join(ANCHOR_MODES)}")
        self.budget = int(budget)
        self.anchor_mode = anchor_mode
        self.block_size = int(block_size)
        self._core = _core_crush if _core_crush is not None else _core.UpstreamKVCrush(
            budget=self.budget, anchor_mode=anchor_mode, block_size=self.block_size,
            seed=int(seed) & 0xFFFFFFFF)

    @property
    def rng(self) -> MT19937:
        """The KVCrush's own ``std::mt19937`` (a view: drawing from it advances KVCrush)."""
        return MT19937(_engine=self._core.rng)

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
        return self._core.anchor(np.ascontiguousarray(indicators, dtype=np.uint8).reshape(-1))

    def hamming(self, indicators: np.ndarray, anchor: np.ndarray) -> np.ndarray:
        """int64 [n // block_size]: Hamming distance of each block's indicators to the anchor."""
        return self._core.hamming(np.ascontiguousarray(indicators, dtype=np.uint8).reshape(-1),
                                  np.ascontiguousarray(anchor, dtype=np.uint8).reshape(-1))

    def representatives(self, distances: np.ndarray, eligible: Sequence[int]) -> list[int]:
        """Tracked blocks to keep: the eligible blocks (ascending) sorted by distance with
        libstdc++ ``std::sort`` (unstable above 16), then every ``len // budget``-th from 0."""
        return self._core.representatives([int(d) for d in np.asarray(distances).reshape(-1)],
                                          [int(e) for e in eligible])

    def retain(self, num_tokens: int, evicted: Sequence[int], raw_scores: np.ndarray) -> list[int]:
        """Tracked blocks among ``evicted`` that KVCrush keeps (``budget`` of them).

        num_tokens: tokens of the evictable area (``num_evictable_blocks * block_size``);
        evicted: tracked blocks chosen by score (ascending); raw_scores: float64 [T] the
        layer's raw accumulated scores (indicators use the first ``num_tokens``).
        """
        raw = np.ascontiguousarray(raw_scores, dtype=np.float64).reshape(-1)
        return self._core.retain(int(num_tokens), [int(e) for e in evicted], raw)


# --------------------------------------------------------------------------------------------
# The per-sequence algorithm (CacheEvictionAlgorithm)
# --------------------------------------------------------------------------------------------


class UpstreamCacheEviction:
    """GenAI's per-sequence ``CacheEvictionAlgorithm`` (SUM / NORM_SUM, optional KVCrush).

    Logical block indices are positions in the sequence's current block table (after earlier
    evictions); ``evict`` returns the same number of blocks for every layer.
    C++: ``kvcrush::UpstreamCacheEviction`` (``state`` and ``kvcrush`` are views of its parts).
    """

    def __init__(self, config: UpstreamConfig, num_layers: int) -> None:
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        self.config = config
        self.num_layers = num_layers
        c = config
        self._core = _core.UpstreamCacheEviction(
            start_size=c.start_size, recent_size=c.recent_size, max_cache_size=c.max_cache_size,
            aggregation_mode=c.aggregation_mode, snapkv_window_size=c.snapkv_window_size,
            block_size=c.block_size, kvcrush_budget=c.kvcrush_budget,
            kvcrush_anchor=c.kvcrush_anchor, kvcrush_seed=c.kvcrush_seed & 0xFFFFFFFF,
            max_pool_window_size=c.max_pool_window_size, num_layers=num_layers)
        self.state = UpstreamScoreState(
            num_layers=num_layers, block_size=c.block_size, aggregation_mode=c.aggregation_mode,
            ignore_first_n_blocks=c.start_blocks, snapkv_window_size=c.snapkv_window_size,
            max_pool_window_size=c.max_pool_window_size, _core_state=self._core.state)
        self.kvcrush = UpstreamKVCrush(c.kvcrush_budget, c.kvcrush_anchor, c.block_size,
                                       _core_crush=self._core.kvcrush)

    @property
    def num_evicted_tokens(self) -> int:
        """Tokens evicted so far, summed over the layers (each evicts the same number)."""
        return int(self._core.num_evicted_tokens)

    def window(self, prompt_len: int, num_processed_tokens: int, num_scheduled_tokens: int) -> int:
        """``score_aggregation_window`` to request for this forward (queries)."""
        return self._core.window(int(prompt_len), int(num_processed_tokens),
                                 int(num_scheduled_tokens))

    def update(self, layer_scores: Sequence[np.ndarray], num_snapkv_scores: int) -> None:
        """Register one forward's ``scores.L`` (L arrays float32 [T_cache]); see
        :meth:`UpstreamScoreState.update`."""
        _update(self._core, self.num_layers, layer_scores, num_snapkv_scores)

    def evictable_block_range(self, layer: int = 0) -> tuple[int, int]:
        """Logical blocks ``[begin, end)`` that may be evicted now, ``(0, 0)`` if none.

        ``begin = start_size / B``; ``end = floor(cache_tokens / B) - recent_size / B``, so a
        partially filled last block belongs to the recent area.
        """
        return tuple(self._core.evictable_block_range(layer))  # type: ignore[return-value]

    def num_blocks_to_evict(self, layer: int = 0) -> int:
        """Blocks the score ranking evicts now: evictable blocks minus ``evictable_size / B``."""
        return int(self._core.num_blocks_to_evict(layer))

    def block_scores(self, layer: int) -> np.ndarray:
        """float64 [num_evictable_blocks]: per block, the sequential sum over its tokens of the
        normalised score (``scores / counters`` or ``scores``), evictable area only."""
        with _genai_asserts():
            return self._core.block_scores(layer)

    def evict(self) -> list[np.ndarray]:
        """Per layer, int64 ascending logical block indices to drop now (maybe empty).

        Forgets their scores. Must be called only after decode forwards (see module doc).
        """
        with _genai_asserts():
            return self._core.evict()

    def step(self, layer_scores: Sequence[np.ndarray], *, prompt_len: int,
             num_processed_tokens: int, num_scheduled_tokens: int) -> list[np.ndarray]:
        """After a forward: ``update`` with this forward's window, then ``evict`` if the prompt
        was complete before it (``num_processed_tokens >= prompt_len``), else no blocks.

        layer_scores: L arrays float32 [T_cache]. Returns per layer int64 logical block indices
        to drop (see :meth:`evict`).
        """
        if len(layer_scores) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers, got {len(layer_scores)}")
        arrays = [np.ascontiguousarray(x, dtype=np.float32).reshape(-1) for x in layer_scores]
        with _genai_asserts():
            return self._core.step(arrays, prompt_len=int(prompt_len),
                                   num_processed_tokens=int(num_processed_tokens),
                                   num_scheduled_tokens=int(num_scheduled_tokens))


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
    anchors are seeded from ``rng`` (GenAI's per-sequence mt19937 stream cannot be kept here),
    one ``rng.integers(0, 2**32)`` per selection group in order. C++: ``kvcrush::upstream_select``.
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
        scores, counts, positions, lengths, block_size = inputs.core_args()
        num_layers, num_heads, _ = inputs.shape
        shared = _core.upstream_shared_layers(positions, lengths)
        draws = self.kvcrush_budget > 0 and self.kvcrush_anchor == "random"
        seeds = []  # one per selection group: a shared layer, else each head
        for layer in range(num_layers):
            for h in ([0] if shared[layer] else range(num_heads)):
                m = int(lengths[layer, h])
                if num_keep > m:
                    raise ValueError(f"num_keep={num_keep} > {m} candidates")
                seeds.append(int(rng.integers(0, 2**32)) if draws else 0)
        with _genai_asserts():
            return _core.upstream_select(self.aggregation_mode, self.pool_window,
                                         self.kvcrush_budget, self.kvcrush_anchor, scores,
                                         counts, positions, lengths, block_size, int(num_keep),
                                         np.asarray(seeds, dtype=np.uint32))
