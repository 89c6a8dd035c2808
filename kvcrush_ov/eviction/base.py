"""The contract every eviction policy implements (one small file per policy).

Generic code (``kvcrush_ov.eviction.planner``) owns the budget, the attention sinks
(``start_size`` first tokens) and the recent window (``recent_size`` last tokens), block
bookkeeping, compaction and freeing. A policy only sees the *candidates*: for each layer and KV
head, the cached tokens that are neither sinks nor recent, and picks which of them stay.

Notation: ``L`` layers, ``H`` KV heads, ``N`` the longest candidate list of any (layer, head).

:class:`EvictionInputs` (one sequence, one eviction event):

- ``scores``  float32 [L, H, N]: attention each candidate received, summed over the query heads of
  the KV head's group and over every *scored* query so far (which queries are scored is the
  policy's :attr:`EvictionPolicy.score_mode`). Padding entries are 0.
- ``counts``  float32 [L, H, N]: how many scored queries could see the candidate (for
  ``norm_sum`` normalisation: ``scores / counts``); 0 in padding.
- ``positions`` int64 [L, H, N]: the candidate's position in the sequence (increasing along N);
  -1 in padding. Heads may hold different positions after an earlier per-head eviction.
- ``lengths`` int64 [L, H]: valid candidates of each (layer, head): entries ``[:lengths[l, h]]``.
- ``block_size``: tokens per KV block (for block-granular policies).

A policy returns ``keep``: bool [L, H, N], True for every candidate that stays, False in padding,
with ``keep.sum() == L * H * num_keep`` exactly (``num_keep`` = candidates to keep per (layer,
head) on average; a policy may move budget between layers or heads, never exceed ``lengths``).
:func:`check_keep` verifies this; the planner (``kvcrush::plan_event``) checks every policy's
answer the same way.

The selection of every policy here runs in C++: ``kvcrush::select_keep``
(cpp/include/kvcrush/policy.hpp), whose configuration the Python classes are
(:class:`CorePolicy`), and for ``upstream`` (GenAI's algorithm) ``kvcrush::upstream_select`` and
``kvcrush::UpstreamCacheEviction`` (cpp/include/kvcrush/upstream.hpp).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from kvcrush_ov import _core

SCORE_MODES = ("none", "window", "all", "replay", "surrogate")


@dataclass(frozen=True)
class EvictionInputs:
    scores: np.ndarray  # float32 [L, H, N]
    counts: np.ndarray  # float32 [L, H, N]
    positions: np.ndarray  # int64 [L, H, N], -1 = padding
    lengths: np.ndarray  # int64 [L, H]
    block_size: int = 32
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    def memo(self, key: object, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """``compute()`` once per ``key`` for these inputs (e.g. a policy's pooled scores, needed
        by both KVCrush and the policy's own selection in one eviction)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.scores.shape  # type: ignore[return-value]

    @property
    def dense(self) -> bool:
        """True when every (layer, head) holds N candidates (no padding anywhere)."""
        return bool((self.lengths == self.scores.shape[2]).all())

    @property
    def valid(self) -> np.ndarray:
        """bool [L, H, N]: True on real candidates."""
        return np.arange(self.scores.shape[2])[None, None, :] < self.lengths[:, :, None]

    def normalised(self, aggregation_mode: str) -> np.ndarray:
        """float32 [L, H, N]: ``scores`` (``sum``) or ``scores / max(counts, 1)`` (``norm_sum``);
        padding is -inf so that it never wins a top-k (C++: ``kvcrush::policy_scores``)."""
        if aggregation_mode not in ("sum", "norm_sum"):
            raise ValueError(f"aggregation_mode={aggregation_mode!r}: allowed sum, norm_sum")
        return _core.policy_scores(_core.PolicyConfig(importance="h2o",
                                                      aggregation_mode=aggregation_mode),
                                   *self.core_args())

    def core_args(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """(scores f32, counts f32, positions i64, lengths i64, block_size): the arrays as the
        C++ policies take them (C-contiguous; converted once per inputs)."""
        def convert() -> tuple:
            return (np.ascontiguousarray(self.scores, dtype=np.float32),
                    np.ascontiguousarray(self.counts, dtype=np.float32),
                    np.ascontiguousarray(self.positions, dtype=np.int64),
                    np.ascontiguousarray(self.lengths, dtype=np.int64), int(self.block_size))
        return self.memo("core_args", convert)  # type: ignore[return-value]

    @classmethod
    def from_lists(cls, scores: list[list[np.ndarray]], positions: list[list[np.ndarray]],
                   counts: list[list[np.ndarray]] | None = None,
                   block_size: int = 32) -> EvictionInputs:
        """Pad ragged per-(layer, head) arrays ``[l][h] -> [n_lh]`` into an EvictionInputs."""
        num_layers, num_heads = len(scores), len(scores[0])
        lengths = np.array([[len(s) for s in row] for row in scores], dtype=np.int64)
        n = int(lengths.max()) if lengths.size else 0
        sc = np.zeros((num_layers, num_heads, n), np.float32)
        ct = np.zeros((num_layers, num_heads, n), np.float32)
        ps = np.full((num_layers, num_heads, n), -1, np.int64)
        for layer in range(num_layers):
            for h in range(num_heads):
                k = lengths[layer, h]
                sc[layer, h, :k] = scores[layer][h]
                ps[layer, h, :k] = positions[layer][h]
                ct[layer, h, :k] = 1.0 if counts is None else counts[layer][h]
        return cls(sc, ct, ps, lengths, block_size)


@runtime_checkable
class EvictionPolicy(Protocol):
    """A policy: which candidates stay. Implementations are small frozen dataclasses.

    name: the value users pass as ``CacheEvictionConfig(importance=...)``.
    score_mode: which queries' attention the engine accumulates for this policy:
        ``"none"`` (no scores needed: no score outputs are computed), ``"window"`` (the prompt's
        last ``window`` queries, then every decode query), ``"all"`` (every query, H2O) or
        ``"replay"`` (every query of a replay of the context after it, KVzip) or
        ``"surrogate"`` (no attention: every token's score predicted from its hidden state by
        the graph, KVzap).
    """

    name: ClassVar[str]
    score_mode: ClassVar[str]

    def select(self, inputs: EvictionInputs, num_keep: int,
               rng: np.random.Generator) -> np.ndarray:
        """bool [L, H, N] keep mask with exactly ``L * H * num_keep`` True (see module doc)."""
        ...


def importance_of(policy: EvictionPolicy) -> EvictionPolicy:
    """The importance policy of ``policy``: the one a KVCrush wraps, else ``policy`` itself."""
    return getattr(policy, "importance", policy)


def check_keep(keep: np.ndarray, inputs: EvictionInputs, num_keep: int, who: str) -> None:
    """Raise ``_core.PlanError`` (an AssertionError) unless ``keep`` is a valid answer of policy
    ``who``: bool of the inputs' shape, nothing kept in padding, exactly ``L * H * num_keep``
    kept. The check the planner runs on every policy's answer (C++: ``kvcrush::check_keep``)."""
    _core.check_keep(keep, np.ascontiguousarray(inputs.lengths, dtype=np.int64),
                     int(inputs.scores.shape[2]), int(num_keep), who)


def top_k_mask(values: np.ndarray, k: np.ndarray | int) -> np.ndarray:
    """bool mask of the ``k`` largest entries along the last axis (ties: lower index first).

    values: [..., N] (use -inf for entries that must not be picked; NaN ranks below every
    number); k: int or int array broadcastable to ``values.shape[:-1]`` (clipped to [0, N]).
    The same entries as the first ``k`` of ``np.argsort(-values, kind="stable")``; computed by
    the C++ core (``kvcrush::top_k_mask``, parallel over the rows).
    """
    values = np.asarray(values)
    shape = values.shape
    if not shape:
        raise ValueError("top_k_mask: values must have at least one axis")
    k_arr = np.broadcast_to(np.asarray(k, dtype=np.int64), shape[:-1])
    if values.dtype not in (np.float32, np.float64):
        floating = np.issubdtype(values.dtype, np.floating)
        values = values.astype(np.float64 if floating else np.int64)
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    keep = _core.top_k_mask(np.ascontiguousarray(values).reshape(rows, shape[-1]),
                            np.ascontiguousarray(k_arr).reshape(rows))
    return keep.reshape(shape)


# --- Budget arithmetic shared by the policies (C++: kvcrush/policy.hpp). ---

def water_fill(total: int, capacity: np.ndarray) -> np.ndarray:
    """int64 like ``capacity``: ``total`` units spread max-min fairly, never above ``capacity``.

    Every entry gets ``min(capacity, t)`` for the largest level ``t`` that fits, and the last
    few units go one each to the entries still below capacity, lowest flat index first.
    Raises ValueError if ``total`` exceeds ``capacity.sum()``. C++: ``kvcrush::water_fill``.
    """
    cap = np.asarray(capacity, dtype=np.int64)
    out = _core.water_fill(int(total), np.ascontiguousarray(cap).reshape(-1))
    return out.reshape(cap.shape)


def fit_budget(target: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """int64 [..., K]: ``target`` capped at ``capacity`` with the same total.

    What an entry cannot hold moves first to the other entries of its row (last axis), then,
    if the row is full, to every entry with room (both max-min fair, see :func:`water_fill`).
    Raises ValueError if ``target.sum() > capacity.sum()``. C++: ``kvcrush::fit_budget``.
    """
    target, capacity = np.broadcast_arrays(np.asarray(target, dtype=np.int64),
                                           np.asarray(capacity, dtype=np.int64))
    k = target.shape[-1] if target.ndim else 1
    out = _core.fit_budget(np.ascontiguousarray(target).reshape(-1, k),
                           np.ascontiguousarray(capacity).reshape(-1, k))
    return out.reshape(target.shape)


def head_quotas(lengths: np.ndarray, num_keep: int) -> np.ndarray:
    """int64 [L, H]: ``num_keep`` per (layer, head), moved within the layer (then across layers)
    where a head holds fewer candidates; sums to ``L * H * num_keep`` (ValueError if impossible).
    C++: ``kvcrush::head_quotas``.
    """
    if num_keep < 0:
        raise ValueError(f"num_keep={num_keep}: must be >= 0")
    return fit_budget(np.full(lengths.shape, num_keep, np.int64), lengths)


class CorePolicy:
    """Mixin of the policies the C++ core runs (``kvcrush::select_keep``): ``core_kwargs()``
    names the policy for ``_core.PolicyConfig``; ``scores`` and ``select`` call the core."""

    def core_kwargs(self) -> dict:
        """Keyword arguments of ``_core.PolicyConfig`` for this policy (without KVCrush)."""
        raise NotImplementedError

    @property
    def core(self) -> _core.PolicyConfig:
        """The validated C++ configuration, built on each use (microseconds; no C++ object
        outlives the call that needs it)."""
        return _core.PolicyConfig(**self.core_kwargs())

    def scores(self, inputs: EvictionInputs) -> np.ndarray:
        """float32 [L, H, N]: what ``select`` ranks by (higher is kept first); -inf in padding."""
        return inputs.memo(("scores", self), lambda: _core.policy_scores(self.core,
                                                                          *inputs.core_args()))

    def select(self, inputs: EvictionInputs, num_keep: int,
               rng: np.random.Generator) -> np.ndarray:
        """bool [L, H, N] keep mask with exactly ``L * H * num_keep`` True (see module doc)."""
        return _core.select_keep(self.core, *inputs.core_args(), int(num_keep))
