"""SnapKV (Li et al., NeurIPS 2024, "SnapKV: LLM Knows What You are Looking for Before
Generation").

Scores are the attention of an observation window (the prompt's last queries, then every decode
query: ``score_mode = "window"``), smoothed along the sequence by a 1-D pooling so that the
neighbours of an important token stay with it, then top-k per (layer, head).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvcrush_ov import _core
from kvcrush_ov.eviction.base import CorePolicy
from kvcrush_ov.eviction.h2o import check_aggregation_mode

POOLINGS = ("max", "avg", "none")


def _sliding_max(v: np.ndarray, before: int, after: int) -> np.ndarray:
    """float32 [..., N]: max over ``[j - before, j + after]`` along the last axis (outside the
    array counts as -inf), in O(N log w): maxima of power-of-two spans, then two overlapping
    spans per window. C++: ``kvcrush::sliding_max``, parallel over the rows."""
    return _pool_rows(_core.sliding_max, v, before, after)


def _window_sums(v: np.ndarray, before: int, after: int) -> np.ndarray:
    """float32 [..., N]: sum over ``[j - before, j + after]`` along the last axis (outside the
    array counts as 0), in O(N log w): sums of power-of-two spans, then one span per set bit of
    the width ``w = before + after + 1`` (widest first). Every window is summed on its own (no
    prefix-sum differences), so each result is accurate to float32 rounding relative to itself,
    however small it is. C++: ``kvcrush::window_sums``, parallel over the rows."""
    return _pool_rows(_core.window_sums, v, before, after)


def _pool_rows(kernel: Callable[[np.ndarray, int, int], np.ndarray], v: np.ndarray,
               before: int, after: int) -> np.ndarray:
    """``kernel`` on ``v`` [..., N] viewed as float32 rows [R, N]."""
    shape = v.shape
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    flat = np.ascontiguousarray(v, dtype=np.float32).reshape(rows, shape[-1])
    return kernel(flat, int(before), int(after)).reshape(shape)


def pool_scores(values: np.ndarray, lengths: np.ndarray, pooling: str,
                kernel_size: int, offset: int = 0) -> np.ndarray:
    """float32 [L, H, N]: ``values`` pooled along N over a window of ``kernel_size``.

    values: float [L, H, N] (padding ignored); lengths: int [L, H] valid entries per row.
    The window of entry ``j`` is ``[j - r - offset, j + r - offset]`` (``r = kernel_size // 2``,
    ``0 <= offset <= r``) clipped to the row's valid entries, so padding never leaks in and the
    output has the input's length: ``max`` takes the window's maximum, ``avg`` its mean over
    the valid entries in it, ``none`` copies. ``offset = 0`` centres the window; ``offset = r``
    ends it at ``j``, so an entry receives the scores of the entries just before it. Padding
    is -inf in the output. C++: ``kvcrush::pool_scores``, parallel over the rows.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}: allowed {', '.join(POOLINGS)}")
    shape = values.shape
    n = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(rows, n)
    lens = np.ascontiguousarray(np.broadcast_to(np.asarray(lengths, np.int64), shape[:-1]))
    return _core.pool_scores(flat, lens.reshape(rows), pooling, int(kernel_size),
                             int(offset)).reshape(shape)


def check_pooling(owner: str, pooling: str, kernel_size: int, offset: int = 0) -> None:
    """Raise ValueError unless ``pooling``, ``kernel_size`` (odd, >= 1) and ``offset``
    (0 .. kernel_size // 2) are valid."""
    if pooling not in POOLINGS:
        raise ValueError(f"{owner}.pooling={pooling!r}: allowed {', '.join(POOLINGS)}")
    if (isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1
            or kernel_size % 2 == 0):
        raise ValueError(f"{owner}.kernel_size={kernel_size!r}: allowed an odd integer >= 1")
    if (isinstance(offset, bool) or not isinstance(offset, int)
            or not 0 <= offset <= kernel_size // 2):
        raise ValueError(f"{owner}.offset={offset!r}: allowed an integer in "
                         f"[0, kernel_size // 2 = {kernel_size // 2}]")


@dataclass(frozen=True)
class SnapKV(CorePolicy):
    """Per (layer, head) top-``num_keep`` of the pooled window attention (ties: earlier
    candidate first; budget moved between heads by ``base.head_quotas``).

    ``scores`` (float32 [L, H, N], -inf in padding): :func:`pool_scores` of
    :meth:`EvictionInputs.normalised`. Selection and scores: the C++ core
    (``kvcrush::select_keep``, importance ``snapkv``).

    aggregation_mode: ``"sum"`` or ``"norm_sum"`` (see :meth:`EvictionInputs.normalised`).
    pooling: ``"max"`` (SnapKV's default), ``"avg"`` or ``"none"``.
    kernel_size: odd pooling window (default 7, as in SnapKV).
    offset: how far the window's centre lies before each token (0 = centred; ``kernel_size //
        2`` = the window ends at the token, so tokens right after an attended one, such as a
        needle's value after its key, share its score).
    """

    name: ClassVar[str] = "snapkv"
    score_mode: ClassVar[str] = "window"

    aggregation_mode: str = "sum"
    pooling: str = "max"
    kernel_size: int = 7
    offset: int = 0

    def __post_init__(self) -> None:  # shared by the SnapKV-scored policies that subclass it
        owner = type(self).__name__
        check_aggregation_mode(owner, self.aggregation_mode)
        check_pooling(owner, self.pooling, self.kernel_size, self.offset)

    def core_kwargs(self) -> dict:
        """See :meth:`CorePolicy.core_kwargs` (the subclasses' importance is their name)."""
        return {"importance": self.name, "aggregation_mode": self.aggregation_mode,
                "pooling": self.pooling, "kernel_size": self.kernel_size, "offset": self.offset}
