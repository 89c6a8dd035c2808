"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling").

SnapKV's pooled window scores, with per-layer budgets that shrink linearly with depth: lower layers
attend broadly and keep more, upper layers attend to a few tokens and keep less.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvcrush_ov import _core
from kvcrush_ov.eviction.snapkv import SnapKV


def pyramid_budgets(num_layers: int, num_keep: int, beta: float) -> np.ndarray:
    """int64 [L]: PyramidKV's per-layer keep counts, summing to exactly ``L * num_keep``.

    Layer 0 gets ``max = 2 * num_keep - min``, the last layer ``min = num_keep / beta``, linear in
    between (the mean is ``num_keep``); floors plus one for the largest remainders (ties: lower
    layer). C++: ``kvcrush::pyramid_budgets``.
    """
    return _core.pyramid_budgets(int(num_layers), int(num_keep), float(beta))


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV scores, ``pyramid_budgets`` per layer (the same count in every head of a layer).

    A layer whose shortest head holds fewer candidates than its budget keeps what it can; the
    overflow moves to the other layers (max-min fair, see ``base.fit_budget``), so the total is
    always ``L * H * num_keep``. Only if the layers cannot absorb it at equal per-head counts do
    heads of a layer get different counts.

    aggregation_mode, pooling, kernel_size and the scores: inherited from :class:`SnapKV`.
    Selection: the C++ core (``kvcrush::select_keep``, importance ``pyramidkv``).
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
        """int64 [L, H]: keep count of every (layer, head); sums to ``L * H * num_keep``.
        C++: ``kvcrush::pyramid_layer_budgets``."""
        return _core.pyramid_layer_budgets(np.ascontiguousarray(lengths, dtype=np.int64),
                                           int(num_keep), float(self.beta))

    def core_kwargs(self) -> dict:
        """See :meth:`CorePolicy.core_kwargs`."""
        return {**super().core_kwargs(), "beta": float(self.beta)}
