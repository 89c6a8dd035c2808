"""KVCrush (Jha, Gobriel, Talamanova, Jain; Intel, 2025, "KVCrush: Key value cache size-reduction
using similarity in head-behaviour").

KVCrush wraps an importance policy. The importance policy keeps ``num_keep - k_crush`` candidates
per (layer, head); KVCrush spends the other ``k_crush`` on *representatives* of what the importance
policy evicted, so that every kind of token keeps a proxy in the cache:

1. Bits: for every candidate and KV head, 1 if the candidate is in the head's top half by the
   importance scores (rank < ``length // 2``, ties: earlier candidate first; for distinct scores
   this is "above the head's median"), else 0. Tokens are identified across the heads of a layer
   by *position* (heads may hold different positions after an earlier per-head eviction): a
   token's vector is its H bits, one per head of the layer.
2. Candidates of a layer: positions held by every head of the layer and kept by the importance
   policy in no head.
3. Anchor (same length as a vector): ``random`` (from ``rng``), ``zeros``, ``ones``, ``mean``
   (strict majority bit per coordinate over the layer's candidates; a tie gives 0) or
   ``alternating`` (0101... over the coordinates, starting with 0).
4. Hamming distance of every candidate to the anchor; candidates sorted by (distance, position).
5. ``k`` representatives at an even stride through that sorted list of ``n``: the ``i``-th pick
   is entry ``floor((i + 0.5) * n / k)``, the middle of the ``i``-th of ``k`` equal buckets.
   A representative is kept in every head of its layer, so each head keeps
   ``k_imp + k_crush = num_keep`` (plus whatever the importance policy moves between heads).

Block granularity (``granularity="block"``, for paged caches): a block is the ``block_size``
positions ``b * block_size .. (b + 1) * block_size - 1``; only blocks whose positions are *all*
candidates take part. A block's vector is the concatenation of its tokens' vectors (in position
order; ``block_size * H`` bits), anchors have that length, and representatives are whole blocks:
``k_crush // block_size`` of them per layer. The remainder ``k_crush % block_size`` goes to the
importance policy, so the budget stays exact.

Shortfall: if a layer has fewer candidates (or whole candidate blocks) than its KVCrush budget,
the missing tokens go back to the importance ranking: every head of that layer keeps its next
best not-yet-kept candidates by ``importance.scores`` (for the top-k policies this is exactly
what ``importance.select`` would add with a larger budget; overflow of a full head moves as in
``base.fit_budget``).

Beyond the paper:

- Multi-anchor (``anchor`` a tuple): every candidate joins the group of its nearest anchor (ties:
  the first anchor in the tuple); the layer's representatives are split across the groups in
  proportion to their sizes (largest remainder, ties: first group), then taken at the even
  stride inside each group sorted by (distance to the group's anchor, position).
- Dynamic split (``dynamic_split=True``): per layer ``l``, ``c_l`` = the fraction of the layer's
  importance mass (``max(scores, 0)`` summed over heads and candidates) that the importance
  policy's top-``k_imp`` picks capture. Concentrated layers give less to KVCrush, diffuse ones
  more: ``k_crush_l`` is proportional to ``w_l = 1 - c_l`` (uniform if every ``w_l`` is 0), i.e.
  ``share_l = clip(share * w_l / mean(w), 0, 1)`` renormalised: the ``L * k_crush`` tokens are
  apportioned by ``w`` with a cap of ``num_keep`` per layer (capped layers' excess re-spread
  over the others in proportion to ``w``; integer parts by largest remainder), so
  ``sum_l k_crush_l == L * k_crush`` exactly (with blocks: ``(L * k_crush) // block_size`` blocks
  are apportioned, the rest goes to importance). A layer's importance budget is then
  ``num_keep - k_crush_l``: the importance policy runs once at the smallest of these and every
  other layer tops up from ``importance.scores`` as for the shortfall.

Implementation: the whole selection runs in C++ (``kvcrush::select_keep`` in
cpp/include/kvcrush/policy.hpp, parallel over rows and layers); this module holds the
configuration (validated here, and again by ``_core.PolicyConfig``), draws the random anchors'
bits from the caller's ``np.random.Generator`` and exposes the kernels for tests.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvcrush_ov import _core
from kvcrush_ov.eviction.base import CorePolicy, EvictionInputs, top_k_mask
from kvcrush_ov.eviction.h2o import AGGREGATION_MODES
from kvcrush_ov.eviction.snapkv import SnapKV

ANCHORS = ("random", "zeros", "ones", "mean", "alternating")
GRANULARITIES = ("token", "block")


#: the importance policies KVCrush can wrap: the ones the C++ core runs
ScoredPolicy = CorePolicy


# --- the algorithm's steps, as small functions on arrays ---

def head_bits(scores: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """bool [L, H, N]: True for the top ``lengths // 2`` entries of every (layer, head).

    scores: float [L, H, N], -inf in padding; lengths: int [L, H].
    """
    return top_k_mask(scores, lengths // 2)


def match_heads(positions: np.ndarray,
                lengths: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Where every head holds the positions of head 0.

    positions: int [L, H, N] (increasing along N, -1 in padding); lengths: int [L, H].
    Returns ``idx`` int64 [L, H, N] and ``found`` bool [L, H, N]: head ``h`` of layer ``l`` holds
    position ``positions[l, 0, j]`` at entry ``idx[l, h, j]`` iff ``found[l, h, j]`` (``idx`` is
    0 where not found). ``idx`` is None when every head of every layer holds the same positions
    (then ``idx[l, h, j] == j`` and ``found`` is the valid mask). C++: ``kvcrush::match_heads``.
    """
    positions = np.ascontiguousarray(positions, dtype=np.int64)
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    got = _core.match_heads(positions, lengths)
    if got is None:
        return None, np.arange(positions.shape[2])[None, None, :] < lengths[:, :, None]
    return got[0], got[1]


def make_anchor(kind: str, vectors: np.ndarray, valid: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """bool [L, D]: one anchor per layer (C++: ``kvcrush::make_anchor``).

    vectors: bool [L, M, D] unit vectors; valid: bool [L, M] the layer's candidates (for
    ``mean``: strict majority per coordinate, a tie gives 0). ``random`` draws its bits from
    ``rng`` (int8 0/1, shape [L, D]); no other kind uses ``rng``. ValueError names ``anchor``
    for an unknown kind.
    """
    random_bits = None
    if kind == "random":
        shape = (vectors.shape[0], vectors.shape[2])
        random_bits = rng.integers(0, 2, size=shape, dtype=np.int8).astype(bool)
    return _core.make_anchor(kind, _bools(vectors), _bools(valid), random_bits)


def hamming(vectors: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """int64 [A, L, M]: Hamming distance of every unit vector [L, M, D] to anchors [A, L, D]
    (C++: ``kvcrush::hamming``)."""
    return _core.hamming(_bools(vectors), _bools(anchors))


def stride_indices(n: int | np.ndarray, k: int | np.ndarray,
                   i: int | np.ndarray) -> np.ndarray:
    """``floor((i + 0.5) * n / k)``: the ``i``-th of ``k`` even-stride picks in a list of ``n``
    (``0 <= i < k <= n``; distinct and increasing in ``i``). Arrays broadcast; C++:
    ``kvcrush::stride_index``."""
    n_, k_, i_ = np.broadcast_arrays(*(np.asarray(x, dtype=np.int64) for x in (n, k, i)))
    out = _core.stride_indices(*(np.ascontiguousarray(x).reshape(-1) for x in (n_, k_, i_)))
    return out.reshape(n_.shape)


def split_largest_remainder(total: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """int64 [..., A]: ``total`` [...] split over groups of ``sizes`` [..., A] in proportion to
    size (largest remainder, ties: first group); never above a group's size when
    ``total <= sizes.sum(-1)``. C++: ``kvcrush::split_largest_remainder``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = np.broadcast_to(np.asarray(total, dtype=np.int64), sizes.shape[:-1])
    rows = int(np.prod(sizes.shape[:-1], dtype=np.int64))
    out = _core.split_largest_remainder(np.ascontiguousarray(total).reshape(rows),
                                        np.ascontiguousarray(sizes).reshape(rows, sizes.shape[-1]))
    return out.reshape(sizes.shape)


def pick_representatives(vectors: np.ndarray, valid: np.ndarray, anchors: np.ndarray,
                         k: np.ndarray) -> np.ndarray:
    """bool [L, M]: ``min(k[l], candidates)`` representatives of every layer.

    vectors: bool [L, M, D]; valid: bool [L, M] candidates (units in position order);
    anchors: bool [A, L, D]; k: int [L]. Each unit joins its nearest anchor's group (ties: first
    anchor); ``k`` is split over the groups by :func:`split_largest_remainder`; inside a group
    units are sorted by (distance, position) and taken at :func:`stride_indices`. C++:
    ``kvcrush::pick_representatives``, parallel over layers.
    """
    k = np.ascontiguousarray(np.broadcast_to(np.asarray(k, dtype=np.int64), valid.shape[:1]))
    return _core.pick_representatives(_bools(vectors), _bools(valid), _bools(anchors), k)


def _bools(a: np.ndarray) -> np.ndarray:
    """``a`` as a C-contiguous bool array (no copy when it already is one)."""
    return np.ascontiguousarray(a, dtype=bool)


def apportion(total: int, weights: np.ndarray, cap: int) -> np.ndarray:
    """int64 [L]: ``total`` split in proportion to ``weights`` (>= 0; uniform if all 0), at most
    ``cap`` each (the excess of a capped entry is re-spread over the others in proportion).
    float32 weights are computed in float32 as numpy would, others in float64. C++:
    ``kvcrush::apportion``."""
    w = np.asarray(weights)
    w = np.ascontiguousarray(w, dtype=np.float32 if w.dtype == np.float32 else np.float64)
    return _core.apportion(int(total), w, int(cap))


# --- the policy ---

@dataclass(frozen=True)
class KVCrushPlan:
    """Everything :meth:`KVCrush.plan` decided (all [L, H, N] over the candidates).

    keep: the answer (``importance | crush``). importance: the importance policy's picks with the
    top-ups. crush: the representatives (the same positions in every head of a layer).
    crush_budget: int [L] tokens per head planned for KVCrush in each layer (before shortfall).
    bits: the head-behaviour bits.
    """

    keep: np.ndarray
    importance: np.ndarray
    crush: np.ndarray
    crush_budget: np.ndarray
    bits: np.ndarray


@dataclass(frozen=True)
class KVCrush:
    """KVCrush on top of an importance policy (see the module docstring for the algorithm).

    importance: the importance policy, one the C++ core runs (:class:`CorePolicy`: streaming,
        h2o, snapkv, pyramidkv, adakv, kvzip); default SnapKV().
    share: fraction of ``num_keep`` given to KVCrush representatives, in [0, 1] (default 0.25;
        ``k_crush = floor(share * num_keep + 0.5)``).
    anchor: one of ``random``, ``zeros``, ``ones``, ``mean``, ``alternating`` (default), or a
        non-empty tuple of them (multi-anchor; a list is converted to a tuple).
    granularity: ``token`` (default) or ``block`` (whole ``inputs.block_size`` blocks).
    dynamic_split: per-layer KVCrush budgets from attention concentration (default False).
    aggregation_mode: scores for the bits: None (default: exactly the importance policy's
        scores), or ``sum`` / ``norm_sum`` (the importance policy's scores recomputed with that
        aggregation; upstream GenAI uses ``sum`` here while ranking with ``norm_sum``).
    taper: None (default: ``share`` always) or ``(low, high)`` with 0 <= low < high: in
        :meth:`for_budget`, ``share`` times ``clip((ratio - low) / (high - low), 0, 1)`` where
        ratio = total budget / tokens written.
    """

    name: ClassVar[str] = "kvcrush"

    importance: ScoredPolicy = dataclasses.field(default_factory=SnapKV)
    share: float = 0.25
    anchor: str | tuple[str, ...] = "alternating"
    granularity: str = "token"
    dynamic_split: bool = False
    aggregation_mode: str | None = None
    taper: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        imp = self.importance
        if not isinstance(imp, CorePolicy):
            raise ValueError(f"KVCrush.importance={imp!r}: allowed an eviction policy with a "
                             "scores(inputs) method (streaming, h2o, snapkv, pyramidkv, adakv)")
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) \
                or not 0.0 <= self.share <= 1.0:
            raise ValueError(f"KVCrush.share={self.share!r}: allowed a number in [0, 1]")
        if isinstance(self.anchor, list):  # a list from a config file: keep it hashable
            object.__setattr__(self, "anchor", tuple(self.anchor))
        anchors = self.anchors
        if not anchors or any(a not in ANCHORS for a in anchors):
            raise ValueError(f"KVCrush.anchor={self.anchor!r}: allowed one of "
                             f"{', '.join(ANCHORS)} or a non-empty tuple of them")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"KVCrush.granularity={self.granularity!r}: allowed "
                             f"{', '.join(GRANULARITIES)}")
        if not isinstance(self.dynamic_split, bool):
            raise ValueError(f"KVCrush.dynamic_split={self.dynamic_split!r}: allowed True, False")
        if self.taper is not None and not (
                isinstance(self.taper, tuple) and len(self.taper) == 2
                and all(isinstance(x, (int, float)) for x in self.taper)
                and 0.0 <= self.taper[0] < self.taper[1]):
            raise ValueError(f"KVCrush.taper={self.taper!r}: allowed None or (low, high) with "
                             "0 <= low < high")
        if self.aggregation_mode is not None:
            if self.aggregation_mode not in AGGREGATION_MODES:
                raise ValueError(f"KVCrush.aggregation_mode={self.aggregation_mode!r}: allowed "
                                 f"None, {', '.join(AGGREGATION_MODES)}")
            if not hasattr(imp, "aggregation_mode"):
                raise ValueError(f"KVCrush.aggregation_mode={self.aggregation_mode!r}: allowed "
                                 f"only None with importance={imp.name!r} (it has no "
                                 "aggregation_mode)")

    @property
    def score_mode(self) -> str:
        """The importance policy's (KVCrush needs no other scores)."""
        return self.importance.score_mode

    @property
    def anchors(self) -> tuple[str, ...]:
        return self.anchor if isinstance(self.anchor, tuple) else (self.anchor,)

    def share_for(self, total: int, num_written: int) -> float:
        """The share of the total budget KVCrush gets when the cache keeps ``total`` of
        ``num_written`` tokens (``share``, tapered if ``taper`` is set). C++:
        ``kvcrush::tapered_share``."""
        return self.core.share_for(int(total), int(num_written))

    def for_budget(self, total: int, num_keep: int, num_written: int = 0) -> KVCrush:
        """This policy with ``share`` read as a share of the TOTAL budget ``total`` (sinks and
        recent window included, as ``KVCrushConfig.budget`` is; tapered by the fraction of the
        ``num_written`` tokens kept, see ``taper``), turned into the share of the ``num_keep``
        candidates it actually splits. C++: ``kvcrush::for_budget``."""
        if num_keep <= 0:
            return self
        share = self.core.share_for_budget(int(total), int(num_keep), int(num_written))
        out = copy.copy(self)  # already validated: skip __post_init__
        object.__setattr__(out, "share", share)
        object.__setattr__(out, "taper", None)
        return out

    @property
    def core(self) -> _core.PolicyConfig:
        """The validated C++ configuration, built on each use (microseconds)."""
        return _core.PolicyConfig(
            **self.importance.core_kwargs(), kvcrush=True, share=float(self.share),
            anchors=list(self.anchors), granularity=self.granularity,
            dynamic_split=self.dynamic_split,
            taper=None if self.taper is None else tuple(float(x) for x in self.taper),
            bit_aggregation=self.aggregation_mode)

    def random_bits(self, inputs: EvictionInputs, rng: np.random.Generator) -> np.ndarray | None:
        """bool [R, L, D]: the bits of the R random anchors (in ``anchors`` order), drawn from
        ``rng`` as int8 0/1 of shape [L, D] each (D = H, or ``block_size * H`` for blocks);
        None without a random anchor."""
        num_layers, num_heads, _ = inputs.shape
        return self.random_bits_for(num_layers, num_heads, inputs.block_size, rng)

    def random_bits_for(self, num_layers: int, num_heads: int, block_size: int,
                        rng: np.random.Generator) -> np.ndarray | None:
        """:meth:`random_bits` for L layers, H heads and blocks of ``block_size``."""
        d = self.core.anchor_bits(num_heads, block_size)
        draws = [rng.integers(0, 2, size=(num_layers, d), dtype=np.int8).astype(bool)
                 for kind in self.anchors if kind == "random"]
        return np.stack(draws) if draws else None

    def select(self, inputs: EvictionInputs, num_keep: int,
               rng: np.random.Generator) -> np.ndarray:
        """bool [L, H, N]: :meth:`plan`'s ``keep`` (C++: ``kvcrush::select_keep``)."""
        if num_keep < 0:
            raise ValueError(f"num_keep={num_keep}: must be >= 0")
        return _core.select_keep(self.core, *inputs.core_args(), int(num_keep),
                                 self.random_bits(inputs, rng))

    def scores(self, inputs: EvictionInputs) -> np.ndarray:
        """float32 [L, H, N]: the importance policy's scores."""
        return self.importance.scores(inputs)

    def bit_scores(self, inputs: EvictionInputs) -> np.ndarray:
        """float32 [L, H, N]: the scores the bits are taken from (see ``aggregation_mode``)."""
        if self.aggregation_mode is None:
            return self.importance.scores(inputs)
        return _core.policy_scores(self.importance.core, *inputs.core_args(),
                                   self.aggregation_mode)

    def plan(self, inputs: EvictionInputs, num_keep: int,
             rng: np.random.Generator) -> KVCrushPlan:
        """Run KVCrush and return every intermediate decision (see :class:`KVCrushPlan`)."""
        if num_keep < 0:
            raise ValueError(f"num_keep={num_keep}: must be >= 0")
        keep, imp, crush, budget, bits = _core.kvcrush_plan(
            self.core, *inputs.core_args(), int(num_keep), self.random_bits(inputs, rng))
        return KVCrushPlan(keep, imp, crush, budget, bits)
