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
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from kvcrush_ov import _core
from kvcrush_ov.eviction.base import EvictionInputs, EvictionPolicy, fit_budget, top_k_mask
from kvcrush_ov.eviction.h2o import AGGREGATION_MODES
from kvcrush_ov.eviction.snapkv import SnapKV

ANCHORS = ("random", "zeros", "ones", "mean", "alternating")
GRANULARITIES = ("token", "block")


@runtime_checkable
class ScoredPolicy(EvictionPolicy, Protocol):
    """An importance policy KVCrush can wrap: it also tells the scores it ranks by."""

    def scores(self, inputs: EvictionInputs) -> np.ndarray:
        """float32 [L, H, N]: what ``select`` ranks by (higher is kept first); -inf in padding."""
        ...


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
    a valid index where not found). ``idx`` is None when every head of every layer holds the
    same positions (then ``idx[l, h, j] == j``).
    """
    num_layers, num_heads, n = positions.shape
    valid = np.arange(n)[None, None, :] < lengths[:, :, None]
    if (positions == positions[:, :1]).all() and (lengths == lengths[:, :1]).all():
        return None, valid
    # One layer at a time, a table position -> entry of every head ([H, P], P = max position + 2;
    # padding writes to the spare last column), read at head 0's positions.
    size = int(positions.max(initial=0)) + 2
    table = np.empty((num_heads, size), np.int64)
    entry = np.broadcast_to(np.arange(n), (num_heads, n))
    idx = np.zeros(positions.shape, np.int64)
    found = np.zeros(positions.shape, bool)
    for layer in range(num_layers):
        table.fill(-1)
        np.put_along_axis(table, np.where(valid[layer], positions[layer], size - 1), entry, 1)
        ref = np.where(valid[layer, :1], positions[layer, :1], size - 1)
        got = np.take_along_axis(table, np.broadcast_to(ref, (num_heads, n)), axis=1)
        found[layer] = (got >= 0) & valid[layer, :1]
        idx[layer] = np.maximum(got, 0)
    return idx, found


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


def block_starts(candidates: np.ndarray, positions: np.ndarray,
                 block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole candidate blocks of every layer, in position order.

    candidates: bool [L, N] over head 0's entries; positions: int [L, N] head 0's positions.
    Returns ``start`` int64 [L, B] (head-0 entry of the block's first token) and ``valid`` bool
    [L, B]: a block counts iff its ``block_size`` positions are all candidates.
    """
    num_layers, n = candidates.shape
    if n < block_size:
        return np.zeros((num_layers, 0), np.int64), np.zeros((num_layers, 0), bool)
    span = np.concatenate([np.zeros((num_layers, 1), np.int64), np.cumsum(candidates, -1)], -1)
    first = np.arange(n - block_size + 1)
    full = span[:, first + block_size] - span[:, first] == block_size
    full &= positions[:, first] % block_size == 0
    full &= positions[:, first + block_size - 1] - positions[:, first] == block_size - 1
    count = full.sum(axis=1)
    width = int(count.max(initial=0))
    start = np.argsort(~full, axis=1, kind="stable")[:, :width]
    return start, np.arange(width)[None, :] < count[:, None]


def top_up(kept: np.ndarray, scores: np.ndarray, lengths: np.ndarray,
           extra: np.ndarray) -> np.ndarray:
    """bool [L, H, N]: ``extra[l]`` more entries per head of layer ``l``, the best by ``scores``
    among those not ``kept`` (a full head's share moves as in ``base.fit_budget``)."""
    if not np.any(extra):
        return np.zeros_like(kept)
    spare = lengths - kept.sum(axis=-1)
    quota = fit_budget(np.broadcast_to(extra[:, None], spare.shape), spare)
    return top_k_mask(np.where(kept, -np.inf, scores), quota) & ~kept


def apportion(total: int, weights: np.ndarray, cap: int) -> np.ndarray:
    """int64 [L]: ``total`` split in proportion to ``weights`` (>= 0; uniform if all 0), at most
    ``cap`` each (the excess of a capped entry is re-spread over the others in proportion)."""
    w = np.where(np.asarray(weights, np.float64) > 0, weights, 0.0)
    w = w if w.sum() > 0 else np.ones_like(w)
    real = np.zeros_like(w)
    free = np.ones(w.shape, bool)
    while free.any():
        left = total - real[~free].sum()
        wf = np.where(free, w, 0.0)
        wf = wf if wf.sum() > 0 else free.astype(np.float64)
        real = np.where(free, left * wf / wf.sum(), real)
        over = free & (real >= cap)
        if not over.any():
            break
        real[over] = cap
        free &= ~over
    out = np.minimum(np.floor(real), cap).astype(np.int64)
    frac = np.where(out < cap, real - out, -np.inf)
    return out + top_k_mask(frac, total - int(out.sum()))


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

    importance: the importance policy (it must expose ``scores(inputs)``); default SnapKV().
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
        if not isinstance(imp, ScoredPolicy):
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
        ``num_written`` tokens (``share``, tapered if ``taper`` is set)."""
        if self.taper is None or num_written <= 0:
            return self.share
        low, high = self.taper
        return self.share * min(1.0, max(0.0, (total / num_written - low) / (high - low)))

    def for_budget(self, total: int, num_keep: int, num_written: int = 0) -> KVCrush:
        """This policy with ``share`` read as a share of the TOTAL budget ``total`` (sinks and
        recent window included, as ``KVCrushConfig.budget`` is; tapered by the fraction of the
        ``num_written`` tokens kept, see ``taper``), turned into the share of the ``num_keep``
        candidates it actually splits."""
        if num_keep <= 0:
            return self
        out = copy.copy(self)  # already validated: skip __post_init__
        share = self.share_for(total, num_written)
        object.__setattr__(out, "share", min(1.0, share * total / num_keep))
        object.__setattr__(out, "taper", None)
        return out

    def select(self, inputs: EvictionInputs, num_keep: int,
               rng: np.random.Generator) -> np.ndarray:
        """bool [L, H, N]: :meth:`plan`'s ``keep``."""
        return self.plan(inputs, num_keep, rng).keep

    def bit_scores(self, inputs: EvictionInputs) -> np.ndarray:
        """float32 [L, H, N]: the scores the bits are taken from (see ``aggregation_mode``)."""
        imp = self.importance
        if self.aggregation_mode is not None:
            imp = dataclasses.replace(imp, aggregation_mode=self.aggregation_mode)  # type: ignore[type-var]
        return imp.scores(inputs)

    def plan(self, inputs: EvictionInputs, num_keep: int,
             rng: np.random.Generator) -> KVCrushPlan:
        """Run KVCrush and return every intermediate decision (see :class:`KVCrushPlan`)."""
        if num_keep < 0:
            raise ValueError(f"num_keep={num_keep}: must be >= 0")
        unit = inputs.block_size if self.granularity == "block" else 1
        scores = self.importance.scores(inputs)
        units = self._crush_units(inputs, scores, num_keep, unit, rng)
        k_imp = num_keep - unit * units
        base = int(k_imp.min(initial=num_keep))
        imp = self.importance.select(inputs, base, rng)
        imp |= top_up(imp, scores, inputs.lengths, k_imp - base)

        bit_scores = scores if self.aggregation_mode is None else self.bit_scores(inputs)
        bits = head_bits(bit_scores, inputs.lengths)
        idx, found = match_heads(inputs.positions, inputs.lengths)
        aligned = idx is None  # every head of every layer holds the same positions
        held_all = found.all(axis=1)
        imp_by_pos = imp if aligned else np.take_along_axis(imp, idx, axis=2)
        kept_any = (imp_by_pos & found).any(axis=1)
        vectors = (bits if aligned else np.take_along_axis(bits, idx, axis=2)).transpose(0, 2, 1)
        chosen = self._choose(vectors, held_all & ~kept_any, inputs, units, unit, rng)

        crush = chosen[:, None, :] & found
        if not aligned:
            layer, head, j = np.nonzero(crush)
            crush = np.zeros_like(imp)
            crush[layer, head, idx[layer, head, j]] = True
        short = unit * units - chosen.sum(axis=1)
        imp |= top_up(imp | crush, scores, inputs.lengths, short)
        return KVCrushPlan(imp | crush, imp, crush, unit * units, bits)

    def _crush_units(self, inputs: EvictionInputs, scores: np.ndarray, num_keep: int,
                     unit: int, rng: np.random.Generator) -> np.ndarray:
        """int64 [L]: KVCrush budget of every layer in units (tokens or blocks)."""
        num_layers = inputs.shape[0]
        k_crush = int(np.floor(self.share * num_keep + 0.5))
        if not self.dynamic_split:
            return np.full(num_layers, k_crush // unit, np.int64)
        picks = self.importance.select(inputs, num_keep - k_crush, rng)
        mass = np.where(np.isfinite(scores), np.maximum(scores, 0.0), 0.0)
        layer_mass = mass.sum(axis=(1, 2))
        captured = np.where(picks, mass, 0.0).sum(axis=(1, 2))
        concentration = np.where(layer_mass > 0, captured / np.maximum(layer_mass, 1e-30), 0.0)
        cap = num_keep // unit
        total = min((num_layers * k_crush) // unit, num_layers * cap)
        return apportion(total, 1.0 - concentration, cap)

    def _choose(self, vectors: np.ndarray, candidates: np.ndarray, inputs: EvictionInputs,
                units: np.ndarray, unit: int, rng: np.random.Generator) -> np.ndarray:
        """bool [L, N] over head 0's entries: the representatives' tokens."""
        if self.granularity == "token":
            unit_vectors, valid = vectors, candidates
        else:
            start, valid = block_starts(candidates, inputs.positions[:, 0], unit)
            tokens = start[:, :, None] + np.arange(unit)  # [L, B, unit]
            layer = np.arange(vectors.shape[0])[:, None, None]
            unit_vectors = vectors[layer, tokens].reshape(*start.shape, unit * vectors.shape[2])
        anchors = np.stack([make_anchor(kind, unit_vectors, valid, rng) for kind in self.anchors])
        chosen_units = pick_representatives(unit_vectors, valid, anchors, units)
        if self.granularity == "token":
            return chosen_units
        chosen = np.zeros_like(candidates)
        layer, b = np.nonzero(chosen_units)
        chosen[layer[:, None], start[layer, b][:, None] + np.arange(unit)] = True
        return chosen
