"""H2O (Zhang et al., NeurIPS 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference").

Heavy hitters: the candidates with the largest attention accumulated over every query so far
(``score_mode = "all"``), chosen per (layer, head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvcrush_ov.eviction.base import EvictionInputs, head_quotas, top_k_mask

AGGREGATION_MODES = ("sum", "norm_sum")


def check_aggregation_mode(owner: str, value: str) -> None:
    """Raise ValueError unless ``value`` is one of :data:`AGGREGATION_MODES`."""
    if value not in AGGREGATION_MODES:
        raise ValueError(f"{owner}.aggregation_mode={value!r}: allowed "
                         f"{', '.join(AGGREGATION_MODES)}")


@dataclass(frozen=True)
class H2O:
    """Keep the ``num_keep`` candidates with the highest accumulated attention per (layer, head).

    aggregation_mode: ``"sum"`` (accumulated attention) or ``"norm_sum"`` (divided by the number
        of queries that could see the token, which removes the bias towards old tokens).
    """

    name: ClassVar[str] = "h2o"
    score_mode: ClassVar[str] = "all"

    aggregation_mode: str = "sum"

    def __post_init__(self) -> None:
        check_aggregation_mode("H2O", self.aggregation_mode)

    def scores(self, inputs: EvictionInputs) -> np.ndarray:
        """float32 [L, H, N]: the ranked scores; -inf in padding."""
        return inputs.memo(("normalised", self.aggregation_mode),
                           lambda: inputs.normalised(self.aggregation_mode))

    def select(self, inputs: EvictionInputs, num_keep: int,
               rng: np.random.Generator) -> np.ndarray:
        """bool [L, H, N]: per (layer, head) top-``num_keep`` (ties: earlier candidate first)."""
        return top_k_mask(self.scores(inputs), head_quotas(inputs.lengths, num_keep))
