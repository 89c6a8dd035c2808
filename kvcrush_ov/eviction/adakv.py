"""Ada-KV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation
for Efficient LLM Inference").

The layer's budget is shared by its heads: the top scores across all heads of the layer win, so a
head whose attention is spread over many tokens gets more slots than one that attends to a few. A
safeguard floor keeps ``floor(alpha * num_keep)`` of every head's own best.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvcrush_ov.eviction.snapkv import SnapKV


@dataclass(frozen=True)
class AdaKV(SnapKV):
    """SnapKV scores with adaptive per-head budgets inside each layer.

    Per layer (budget ``H * num_keep``, or what ``base.head_quotas`` moves there when heads are
    short): every head first keeps its best ``min(floor(alpha * num_keep), length)``; the rest of
    the layer's budget goes to the highest remaining scores of all its heads together (ties: lower
    head, then earlier candidate). A head never keeps more than it holds.

    aggregation_mode, pooling, kernel_size and the scores: inherited from :class:`SnapKV`.
    Selection: the C++ core (``kvcrush::select_keep``, importance ``adakv``, scope ``layer``).
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

    def core_kwargs(self) -> dict:
        """See :meth:`CorePolicy.core_kwargs`."""
        return {**super().core_kwargs(), "alpha": float(self.alpha)}
