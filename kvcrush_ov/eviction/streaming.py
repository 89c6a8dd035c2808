"""StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks").

StreamingLLM keeps the attention sinks and a recent window. The generic planner already keeps both,
so among the candidates this policy simply keeps the most recent ones: it extends the recent
window. It needs no attention scores (``score_mode = "none"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvcrush_ov.eviction.base import CorePolicy


@dataclass(frozen=True)
class StreamingLLM(CorePolicy):
    """Keep the ``num_keep`` most recent candidates of every (layer, head).

    If a head holds fewer than ``num_keep`` candidates, its shortfall goes to the other heads of
    the layer (then to other layers), see :func:`kvcrush_ov.eviction.base.head_quotas`.
    ``scores`` (float32 [L, H, N]) is the recency: the candidate's position, -inf in padding.
    Selection and scores: the C++ core (``kvcrush::select_keep``, importance ``streaming``).
    """

    name: ClassVar[str] = "streaming"
    score_mode: ClassVar[str] = "none"

    def core_kwargs(self) -> dict:
        """See :meth:`CorePolicy.core_kwargs`."""
        return {"importance": "streaming"}
