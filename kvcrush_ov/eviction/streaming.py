"""StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks").

StreamingLLM keeps the attention sinks and a recent window. The generic planner already keeps both,
so among the candidates this policy simply keeps the most recent ones: it extends the recent
window. It needs no attention scores (``score_mode = "none"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvcrush_ov.eviction.base import EvictionInputs, head_quotas


@dataclass(frozen=True)
class StreamingLLM:
    """Keep the ``num_keep`` most recent candidates of every (layer, head).

    If a head holds fewer than ``num_keep`` candidates, its shortfall goes to the other heads of
    the layer (then to other layers), see :func:`kvcrush_ov.eviction.base.head_quotas`.
    """

    name: ClassVar[str] = "streaming"
    score_mode: ClassVar[str] = "none"

    def scores(self, inputs: EvictionInputs) -> np.ndarray:
        """float32 [L, H, N]: recency (the candidate's position); -inf in padding."""
        return np.where(inputs.valid, inputs.positions, -np.inf).astype(np.float32)

    def select(self, inputs: EvictionInputs, num_keep: int,
               rng: np.random.Generator) -> np.ndarray:
        """bool [L, H, N]: the last ``quota`` valid entries of every (layer, head)."""
        quota = head_quotas(inputs.lengths, num_keep)
        idx = np.arange(inputs.shape[2])[None, None, :]
        lengths = inputs.lengths[:, :, None]
        return (idx < lengths) & (idx >= lengths - quota[:, :, None])
