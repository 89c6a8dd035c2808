"""Ada-KV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation
for Efficient LLM Inference").

The layer's budget is shared by its heads: the top scores across all heads of the layer win, so a
head whose attention is spread over many tokens gets more slots than one that attends to a few. A
safeguard floor keeps ``floor(alpha * num_keep)`` of every head's own best.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvcrush_ov.eviction.base import EvictionInputs, head_quotas, top_k_mask
from kvcrush_ov.eviction.snapkv import SnapKV


@dataclass(frozen=True)
class AdaKV(SnapKV):
    """SnapKV scores with adaptive per-head budgets inside each layer.

    Per layer (budget ``H * num_keep``, or what ``base.head_quotas`` moves there when heads are
    short): every head first keeps its best ``min(floor(alpha * num_keep), length)``; the rest of
    the layer's budget goes to the highest remaining scores of all its heads together (ties: lower
    head, then earlier candidate). A head never keeps more than it holds.

    aggregation_mode, pooling, kernel_size and the scores: inherited from :class:`SnapKV`.
    alpha: the safeguard floor in [0, 1] (Ada-KV's default 0.2).
    """

    name: ClassVar[str] = "adakv"
    score_mode: ClassVar[str] = "window"

    alpha: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"AdaKV.alpha={self.alpha!r}: allowed a number in [0, 1]")

    def select(self, inputs: EvictionInputs, num_keep: int,
               rng: np.random.Generator) -> np.ndarray:
        """bool [L, H, N]: floor per head, then the layer's top scores across heads."""
        return adaptive_select(self.scores(inputs), inputs, num_keep, self.alpha)


def adaptive_select(scores: np.ndarray, inputs: EvictionInputs, num_keep: int,
                    alpha: float, scope: str = "layer") -> np.ndarray:
    """Ada-KV's allocation of ``scores`` (float32 [L, H, N], -inf in padding): bool [L, H, N],
    every head's best ``floor(alpha * num_keep)``, then the top scores across the heads of each
    layer (``scope="layer"``) or of the whole model (``"model"``: layers' budgets move too)."""
    num_layers, num_heads, n = inputs.shape
    layer_budget = head_quotas(inputs.lengths, num_keep).sum(axis=1)
    floor = np.minimum(int(np.floor(alpha * num_keep)), inputs.lengths)
    keep = top_k_mask(scores, floor)
    rest = np.where(keep, -np.inf, scores)
    if scope == "model":
        extra = top_k_mask(rest.reshape(1, -1), np.array([layer_budget.sum() - floor.sum()]))
    else:
        extra = top_k_mask(rest.reshape(num_layers, num_heads * n),
                           layer_budget - floor.sum(axis=1))
    return keep | extra.reshape(inputs.shape)
