"""FastKV's token selection at the split layer (Jo et al. 2025, "FastKV: KV Cache Compression
for Fast Long-Context Processing with Token-Selective Propagation").

At the split layer every prompt token gets the attention the prompt's last queries paid it,
summed over all query heads; the scores are pooled along the sequence and the best
``num_ranked`` tokens go on to the deeper layers, together with the tokens eviction always keeps
(the ``start_size`` sinks and the ``recent_size`` newest), in position order.
"""

from __future__ import annotations

import numpy as np

from kvcrush_ov.eviction.base import top_k_mask
from kvcrush_ov.eviction.snapkv import pool_scores


def tsp_positions(scores: np.ndarray, num_ranked: int, start_size: int, recent_size: int,
                  kernel: int, pooling: str = "max") -> np.ndarray:
    """int64 [K]: positions propagated past the split layer, increasing.

    scores: float [P] attention each prompt position received at the split layer (summed over
    heads and the scored queries). The first ``start_size`` and the last ``recent_size``
    positions always go; of the rest, the ``num_ranked`` with the highest pooled score
    (``pooling`` over a centred window of ``kernel``, see snapkv.pool_scores; ties: the earlier
    position). ``K = min(P, fixed + num_ranked)``.
    """
    scores = np.asarray(scores, dtype=np.float32)
    p = scores.shape[0]
    lo, hi = min(start_size, p), max(min(start_size, p), p - recent_size)
    keep = np.ones(p, bool)
    middle = hi - lo
    if middle and num_ranked < middle:
        pooled = pool_scores(scores[None, None, lo:hi], np.array([[middle]]), pooling, kernel)
        keep[lo:hi] = top_k_mask(pooled[0, 0], max(num_ranked, 0))
    return np.flatnonzero(keep).astype(np.int64)
