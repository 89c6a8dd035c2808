"""Generic part of every eviction: budget, attention sinks, recent window, which rows stay.

A sequence's budget is its total number of cached tokens per (layer, KV head) on average:
``start_size`` sinks (positions < start_size) and the ``recent_size`` newest positions always stay;
the policy picks ``budget - sinks - recent`` tokens per (layer, head) on average from the rest
(the candidates). After an eviction the sequence holds exactly ``budget * L * H`` head-rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvcrush_ov import _core
from kvcrush_ov.eviction.base import CorePolicy, EvictionInputs, EvictionPolicy, check_keep
from kvcrush_ov.eviction.kvcrush import KVCrush
from kvcrush_ov.eviction.scores import SequenceScores


@dataclass
class EvictionDecision:
    """keep_rows[l][h]: sorted row indices that stay; keep / positions: what the policy saw
    (rows in position order) and picked (for the eviction log); num_sinks / num_recent per
    (layer, head)."""

    keep_rows: list[list[np.ndarray]]
    num_sinks: int
    num_recent: int
    num_keep: int
    keep: np.ndarray | None = None
    positions: np.ndarray | None = None


def plan_eviction(positions: list[list[np.ndarray]], scores: SequenceScores | None,
                  policy: EvictionPolicy, budget: int, start_size: int, recent_size: int,
                  num_written: int, block_size: int, rng: np.random.Generator,
                  ) -> EvictionDecision:
    """Rows to keep for one sequence.

    positions[l][h]: int64 [n_lh] positions of the cached rows, in row order (increasing until
    an eviction filled holes; the policy always sees the rows in position order). budget: tokens
    per (layer, head) after eviction (>= sinks + recent present). num_written: positions written
    so far (the recent window is ``[num_written - recent_size, num_written)``).

    ``kvcrush::plan_event`` (cpp/include/kvcrush/policy.hpp) does the same steps in C++
    (tests/test_policy_core.py keeps the two in step); the evictor calls it through
    :func:`plan_event` with buffers kept between events for every policy that
    :func:`runs_in_core`, and this function for the others (and as the reference).
    """
    orders = _orders(positions)  # None: already in position order
    positions = [[p if o is None else p[o] for p, o in zip(prow, orow, strict=True)]
                 for prow, orow in zip(positions, orders, strict=True)]
    sinks = np.array([[np.searchsorted(p, start_size) for p in row] for row in positions])
    recent = np.array([[len(p) - np.searchsorted(p, num_written - recent_size) for p in row]
                       for row in positions])
    if (sinks != sinks[0, 0]).any() or (recent != recent[0, 0]).any():
        raise AssertionError("eviction: sinks / recent window differ between heads")
    n_sinks, n_recent = int(sinks[0, 0]), int(recent[0, 0])
    num_keep = budget - n_sinks - n_recent
    if num_keep < 0:
        raise ValueError(f"eviction budget {budget} < sinks {n_sinks} + recent {n_recent}")
    lens = {len(p) for row in positions for p in row}
    if len(lens) == 1:  # every (layer, head) holds as many rows: stack instead of padding
        inputs = _uniform_inputs(positions, orders, scores, n_sinks, n_recent, block_size)
    else:
        inputs = _ragged_inputs(positions, orders, scores, n_sinks, n_recent, block_size)
    if num_keep * inputs.lengths.size > int(inputs.lengths.sum()):
        raise ValueError(f"eviction: budget {budget} exceeds the cached tokens")
    if hasattr(policy, "for_budget"):  # KVCrush: its share is of the total budget
        policy = policy.for_budget(budget, num_keep, num_written)
    keep = policy.select(inputs, num_keep, rng)
    check_keep(keep, inputs, num_keep, getattr(policy, "name", type(policy).__name__))
    keep_rows = _kept_rows(orders, keep, inputs.lengths, n_sinks, n_recent)
    return EvictionDecision(keep_rows, n_sinks, n_recent, num_keep, keep, inputs.positions)


@dataclass
class EventRows:
    """What one event keeps, flat (``kvcrush::plan_event``): table ``r`` (= layer * H + head)
    keeps its rows ``rows[offsets[r]:offsets[r + 1]]`` (int64, sorted; offsets int64
    [L * H + 1]); num_sinks / num_recent / num_keep per (layer, head) as in
    :class:`EvictionDecision`."""

    rows: np.ndarray
    offsets: np.ndarray
    num_sinks: int
    num_recent: int
    num_keep: int

    def keep_rows(self, num_heads: int) -> list[list[np.ndarray]]:
        """rows split per [layer][head] (views), as :class:`EvictionDecision` holds them."""
        flat = np.split(self.rows, self.offsets[1:-1])
        return [flat[i:i + num_heads] for i in range(0, len(flat), num_heads)]


def runs_in_core(policy: EvictionPolicy) -> bool:
    """Whether ``kvcrush::plan_event`` plans for ``policy`` exactly as :func:`plan_eviction`:
    a policy of the C++ core whose ``select`` is the core's (KVCrush on top of one included)."""
    if isinstance(policy, KVCrush):
        return type(policy).select is KVCrush.select
    return isinstance(policy, CorePolicy) and type(policy).select is CorePolicy.select


def plan_event(planner: _core.EventPlanner, positions: np.ndarray, offsets: np.ndarray,
               num_heads: int, scores: SequenceScores | None, policy: EvictionPolicy,
               budget: int, start_size: int, recent_size: int, num_written: int,
               block_size: int, rng: np.random.Generator) -> EventRows:
    """:func:`plan_eviction` in one C++ call on the flat rows a cache manager holds, in the
    buffers ``planner`` keeps between events (for a policy :func:`runs_in_core`).

    positions: int64 [R] the rows' positions, table after table (table ``r`` = layer * H +
    head holds ``positions[offsets[r]:offsets[r + 1]]``, offsets int64 [L * H + 1], H =
    ``num_heads``); the other arguments as in :func:`plan_eviction` (the same draws from
    ``rng``, the same kept rows).
    """
    num_layers = (len(offsets) - 1) // num_heads
    acc, queries = None, np.zeros(0, np.int64)
    if scores is not None:
        lens = np.diff(offsets).tolist()
        acc = np.concatenate([scores.aligned(r // num_heads, r % num_heads, n)[:n]
                              for r, n in enumerate(lens)])
        queries = scores.queries()
    bits = (policy.random_bits_for(num_layers, num_heads, block_size, rng)
            if isinstance(policy, KVCrush) else None)
    rows, rows_offsets, sinks, recent, keep = planner.plan(
        policy.core, positions, acc, offsets, queries, num_layers, num_heads, budget,
        start_size, recent_size, num_written, block_size, bits)
    return EventRows(rows, rows_offsets, sinks, recent, keep)


def _order(p: np.ndarray) -> np.ndarray | None:
    """Row order that sorts positions ``p`` (None when they already are)."""
    return None if bool(np.all(p[1:] > p[:-1])) else np.argsort(p, kind="stable")


def _orders(positions: list[list[np.ndarray]]) -> list[list[np.ndarray | None]]:
    """:func:`_order` of every (layer, head); one batched sort when all hold as many rows."""
    flat = [p for row in positions for p in row]
    heads = len(positions[0])
    if len({len(p) for p in flat}) != 1 or len(flat[0]) < 2:
        return [[_order(p) for p in row] for row in positions]
    stacked = np.stack(flat)  # [L*H, n]
    unsorted = np.any(stacked[:, 1:] <= stacked[:, :-1], axis=1)
    if not unsorted.any():
        return [[None] * heads for _ in positions]
    order = np.argsort(stacked, axis=1, kind="stable")
    return [[order[i * heads + h] if unsorted[i * heads + h] else None for h in range(heads)]
            for i in range(len(positions))]


def _kept_rows(orders: list[list[np.ndarray | None]], keep: np.ndarray, lengths: np.ndarray,
               n_sinks: int, n_recent: int) -> list[list[np.ndarray]]:
    """Sorted kept rows per (layer, head): keep [L, H, cand] marks the ``lengths[l, h]``
    candidates in position order (padding after them); sinks and the recent window stay."""
    cmax = keep.shape[2]
    mask = np.ones((*keep.shape[:2], n_sinks + cmax + n_recent), bool)  # in position order
    mask[:, :, n_sinks:n_sinks + cmax] = keep
    out = []
    for layer, row_orders in enumerate(orders):
        row = []
        for h, o in enumerate(row_orders):
            cand = int(lengths[layer, h])
            kept = mask[layer, h, :n_sinks + cand + n_recent]
            kept[n_sinks + cand:] = True  # the recent window, over any padding
            if o is not None:  # back to row order: row o[i] holds the i-th position
                by_row = np.empty_like(kept)
                by_row[o] = kept
                kept = by_row
            row.append(np.flatnonzero(kept))
        out.append(row)
    return out


def _aligned(scores: SequenceScores, layer: int, h: int, n: int,
             order: np.ndarray | None) -> np.ndarray:
    """Accumulated scores of (layer, h) in position order."""
    acc = scores.aligned(layer, h, n)
    return acc if order is None else acc[order]


def _uniform_inputs(positions: list[list[np.ndarray]], orders: list[list[np.ndarray | None]],
                    scores: SequenceScores | None, n_sinks: int, n_recent: int,
                    block_size: int) -> EvictionInputs:
    num_layers, num_heads = len(positions), len(positions[0])
    n = len(positions[0][0])
    lo, hi = n_sinks, n - n_recent
    pos = np.stack([p[lo:hi] for row in positions for p in row]).reshape(
        num_layers, num_heads, hi - lo)
    if scores is None:
        sc = np.zeros(pos.shape, np.float32)
        ct = np.ones(pos.shape, np.float32)
    else:
        sc = np.stack([_aligned(scores, layer, h, n, orders[layer][h])[lo:hi]
                       for layer in range(num_layers) for h in range(num_heads)]
                      ).reshape(pos.shape)
        ct = scores.counts(pos.reshape(-1)).reshape(pos.shape)
    lengths = np.full((num_layers, num_heads), hi - lo, np.int64)
    return EvictionInputs(sc, ct, pos, lengths, block_size)


def _ragged_inputs(positions: list[list[np.ndarray]], orders: list[list[np.ndarray | None]],
                   scores: SequenceScores | None, n_sinks: int, n_recent: int,
                   block_size: int) -> EvictionInputs:
    num_layers, num_heads = len(positions), len(positions[0])
    cand_scores, cand_counts, cand_pos = [], [], []
    for layer in range(num_layers):
        s_row, c_row, p_row = [], [], []
        for h in range(num_heads):
            p = positions[layer][h]
            lo, hi = n_sinks, len(p) - n_recent
            acc = (_aligned(scores, layer, h, len(p), orders[layer][h])[lo:hi]
                   if scores is not None else np.zeros(hi - lo, np.float32))
            s_row.append(acc)
            c_row.append(scores.counts(p[lo:hi]) if scores is not None
                         else np.ones(hi - lo, np.float32))
            p_row.append(p[lo:hi])
        cand_scores.append(s_row)
        cand_counts.append(c_row)
        cand_pos.append(p_row)
    return EvictionInputs.from_lists(cand_scores, cand_pos, cand_counts, block_size)
