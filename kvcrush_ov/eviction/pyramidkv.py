"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling").

SnapKV's pooled window scores, with per-layer budgets that shrink linearly with depth: lower layers
attend broadly and keep more, upper layers attend to a few tokens and keep less.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvcrush_ov.eviction.base import EvictionInputs, fit_budget, top_k_mask
from kvcrush_ov.eviction.snapkv import SnapKV


def round_to_total(values: np.ndarray, total: int) -> np.ndarray:
    """int64 like ``values`` (>= 0): floors plus one for the largest remainders (ties: lower
    index first) so that the sum is exactly ``total``."""
    floor = np.floor(values).astype(np.int64)
    rest = int(total - floor.sum())
    order = np.argsort(-(values - floor), kind="stable")
    floor[order[:rest]] += 1
    return floor


def pyramid_budgets(num_layers: int, num_keep: int, beta: float) -> np.ndarray:
    """int64 [L]: PyramidKV's per-layer keep counts, summing to exactly ``L * num_keep``.

    Layer 0 gets ``max = 2 * num_keep - min``, the last layer ``min = num_keep / beta``, linear in
    between (the mean is ``num_keep``); rounded with :func:`round_to_total`.
    """
    if num_layers == 1:
        return np.array([num_keep], np.int64)
    low = num_keep / beta
    high = 2 * num_keep - low
    real = high - (high - low) * np.arange(num_layers) / (num_layers - 1)
    return round_to_total(real, num_layers * num_keep)


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV scores, ``pyramid_budgets`` per layer (the same count in every head of a layer).

    A layer whose shortest head holds fewer candidates than its budget keeps what it can; the
    overflow moves to the other layers (max-min fair, see ``base.fit_budget``), so the total is
    always ``L * H * num_keep``. Only if the layers cannot absorb it at equal per-head counts do
    heads of a layer get different counts.

    aggregation_mode, pooling, kernel_size and the scores: inherited from :class:`SnapKV`.
    beta: the pyramid's steepness (>= 1): the last layer keeps ``num_keep / beta`` per head.
    """

    name: ClassVar[str] = "pyramidkv"
    score_mode: ClassVar[str] = "window"

    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) \
                or not self.beta >= 1:
            raise ValueError(f"PyramidKV.beta={self.beta!r}: allowed a number >= 1")

    def layer_budgets(self, lengths: np.ndarray, num_keep: int) -> np.ndarray:
        """int64 [L, H]: keep count of every (layer, head); sums to ``L * H * num_keep``."""
        num_layers, num_heads = lengths.shape
        per_layer = pyramid_budgets(num_layers, num_keep, float(self.beta))
        room = lengths.min(axis=1)
        if num_layers * num_keep <= room.sum():
            per_layer = fit_budget(per_layer, room)
        return fit_budget(np.repeat(per_layer[:, None], num_heads, axis=1), lengths)

    def select(self, inputs: EvictionInputs, num_keep: int,
               rng: np.random.Generator) -> np.ndarray:
        """bool [L, H, N]: per (layer, head) top-``layer_budgets`` of the pooled scores."""
        if num_keep < 0:
            raise ValueError(f"num_keep={num_keep}: must be >= 0")
        return top_k_mask(self.scores(inputs), self.layer_budgets(inputs.lengths, num_keep))
