"""Generic part of every eviction: budget, attention sinks, recent window, which rows stay.

A sequence's budget is its total number of cached tokens per (layer, KV head) on average:
``start_size`` sinks (positions < start_size) and the ``recent_size`` newest positions always stay;
the policy picks ``budget - sinks - recent`` tokens per (layer, head) on average from the rest
(the candidates). After an eviction the sequence holds exactly ``budget * L * H`` head-rows.

One implementation, in C++: ``kvcrush::plan_event`` (cpp/include/kvcrush/policy.hpp) orders the
rows by position, counts sinks and the recent window, gathers the candidates, calls the policy's
selection, checks its keep mask (``kvcrush::check_keep``) and maps the kept positions back to
rows. The selection is the C++ core's for a policy that :func:`runs_in_core` (no Python in the
event, without the GIL), else the policy's own ``select`` called back from C++ with the GIL
(:func:`plan_event` on the flat rows the evictor holds; :func:`plan_eviction` on per-(layer,
head) lists, for user-written policies, tests and kvcrush_ov.less.train).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from kvcrush_ov import _core
from kvcrush_ov.eviction.base import CorePolicy, EvictionInputs, EvictionPolicy
from kvcrush_ov.eviction.kvcrush import KVCrush
from kvcrush_ov.eviction.scores import SequenceScores

_PLANNERS = threading.local()  # plan_eviction's _core.EventPlanner, one per thread


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

    ``kvcrush::plan_event`` with ``policy.select`` as its selection (``policy.for_budget``
    first where the policy has one, as KVCrush does), whatever the policy: the answer that the
    evictor's :func:`plan_event` gives, with the policy's :class:`EvictionInputs` and keep mask
    kept in the decision. Raises ValueError for a budget below sinks + recent or above the
    cached tokens, ``_core.PlanError`` (an AssertionError) for an invalid keep mask
    (:func:`kvcrush_ov.eviction.base.check_keep`'s messages) or heads that disagree on the
    sinks / recent window, and whatever ``policy.select`` raises.
    """
    heads = len(positions[0])
    flat = [np.asarray(p, dtype=np.int64) for row in positions for p in row]
    offsets = np.zeros(len(flat) + 1, np.int64)
    np.cumsum([len(p) for p in flat], out=offsets[1:])
    seen: dict = {}
    # this thread's planner (its buffers kept between calls; a fresh one if a policy's select
    # plans an event itself)
    planner = _PLANNERS.__dict__.pop("planner", None) or _core.EventPlanner()
    try:
        rows = _plan_with_select(planner, np.concatenate(flat), offsets, heads, scores, policy,
                                 budget, start_size, recent_size, num_written, block_size, rng,
                                 seen)
    finally:
        _PLANNERS.planner = planner
    return EvictionDecision(rows.keep_rows(heads), rows.num_sinks, rows.num_recent,
                            rows.num_keep, seen.get("keep"), seen.get("positions"))


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
               block_size: int, rng: np.random.Generator,
               row_scale: np.ndarray | None = None) -> EventRows:
    """:func:`plan_eviction` in one C++ call on the flat rows a cache manager holds, in the
    buffers ``planner`` keeps between events: the core's selection for a policy that
    :func:`runs_in_core` (no Python during the event), else ``policy.select`` called back.

    positions: int64 [R] the rows' positions, table after table (table ``r`` = layer * H +
    head holds ``positions[offsets[r]:offsets[r + 1]]``, offsets int64 [L * H + 1], H =
    ``num_heads``); the other arguments as in :func:`plan_eviction` (the same draws from
    ``rng``, the same kept rows). ``row_scale`` f32 [R]: each row's score multiplied by it for
    this event only (KVzap's distance term, kvzap/weights.py).
    """
    if not runs_in_core(policy):
        return _plan_with_select(planner, positions, offsets, num_heads, scores, policy,
                                 budget, start_size, recent_size, num_written, block_size, rng,
                                 row_scale=row_scale)
    num_layers = (len(offsets) - 1) // num_heads
    acc, queries = _flat_scores(scores, offsets, num_heads, row_scale)
    bits = (policy.random_bits_for(num_layers, num_heads, block_size, rng)
            if isinstance(policy, KVCrush) else None)
    rows, rows_offsets, sinks, recent, keep = planner.plan(
        policy.core, positions, acc, offsets, queries, num_layers, num_heads, budget,
        start_size, recent_size, num_written, block_size, bits)
    return EventRows(rows, rows_offsets, sinks, recent, keep)


def _flat_scores(scores: SequenceScores | None, offsets: np.ndarray, num_heads: int,
                 row_scale: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """(acc f32 [R] aligned with the flat rows, times ``row_scale`` [R] if given, or None;
    the scored queries' positions)."""
    if scores is None:
        return None, np.zeros(0, np.int64)
    lens = np.diff(offsets).tolist()
    acc = np.concatenate([scores.aligned(r // num_heads, r % num_heads, n)[:n]
                          for r, n in enumerate(lens)]) if lens else np.zeros(0, np.float32)
    if row_scale is not None:
        if len(row_scale) != len(acc):
            raise ValueError(f"row_scale: {len(row_scale)} values for {len(acc)} rows")
        acc = (acc * row_scale).astype(np.float32, copy=False)
    return acc, scores.queries()


def _plan_with_select(planner: _core.EventPlanner, positions: np.ndarray, offsets: np.ndarray,
                      num_heads: int, scores: SequenceScores | None, policy: EvictionPolicy,
                      budget: int, start_size: int, recent_size: int, num_written: int,
                      block_size: int, rng: np.random.Generator,
                      seen: dict | None = None,
                      row_scale: np.ndarray | None = None) -> EventRows:
    """plan_event with ``policy.select`` as the selection (``_core.EventPlanner.plan_with``);
    ``seen`` (if given) receives the policy's ``keep`` and its inputs' ``positions``."""
    num_layers = (len(offsets) - 1) // num_heads
    acc, queries = _flat_scores(scores, offsets, num_heads, row_scale)
    who = getattr(policy, "name", type(policy).__name__)

    def select(cand_scores: np.ndarray, counts: np.ndarray, cand_positions: np.ndarray,
               lengths: np.ndarray, cand_block_size: int, num_keep: int) -> np.ndarray:
        inputs = EvictionInputs(cand_scores, counts, cand_positions, lengths, cand_block_size)
        chosen = (policy.for_budget(budget, num_keep, num_written)  # KVCrush: of the total
                  if hasattr(policy, "for_budget") else policy)
        keep = chosen.select(inputs, num_keep, rng)
        if seen is not None:
            seen["keep"], seen["positions"] = keep, cand_positions
        return keep

    rows, rows_offsets, sinks, recent, keep = planner.plan_with(
        select, who, np.ascontiguousarray(positions, dtype=np.int64), acc, offsets, queries,
        num_layers, num_heads, budget, start_size, recent_size, num_written, block_size)
    return EventRows(rows, rows_offsets, sinks, recent, keep)
