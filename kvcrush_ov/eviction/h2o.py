"""H2O (Zhang et al., NeurIPS 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference").

Heavy hitters: the candidates with the largest attention accumulated over every query so far
(``score_mode = "all"``), chosen per (layer, head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvcrush_ov.eviction.base import CorePolicy

AGGREGATION_MODES = ("sum", "norm_sum")


def check_aggregation_mode(owner: str, value: str) -> None:
    """Raise ValueError unless ``value`` is one of :data:`AGGREGATION_MODES`."""
    if value not in AGGREGATION_MODES:
        raise ValueError(f"{owner}.aggregation_mode={value!r}: allowed "
                         f"{', '.join(AGGREGATION_MODES)}")


@dataclass(frozen=True)
class H2O(CorePolicy):
    """Keep the ``num_keep`` candidates with the highest accumulated attention per (layer, head)
    (ties: earlier candidate first; budget moved between heads by ``base.head_quotas``).

    aggregation_mode: ``"sum"`` (accumulated attention) or ``"norm_sum"`` (divided by the number
        of queries that could see the token, which removes the bias towards old tokens).
    ``scores`` (float32 [L, H, N], -inf in padding): :meth:`EvictionInputs.normalised`.
    Selection and scores: the C++ core (``kvcrush::select_keep``, importance ``h2o``).
    """

    name: ClassVar[str] = "h2o"
    score_mode: ClassVar[str] = "all"

    aggregation_mode: str = "sum"

    def __post_init__(self) -> None:
        check_aggregation_mode("H2O", self.aggregation_mode)

    def core_kwargs(self) -> dict:
        """See :meth:`CorePolicy.core_kwargs`."""
        return {"importance": "h2o", "aggregation_mode": self.aggregation_mode}
