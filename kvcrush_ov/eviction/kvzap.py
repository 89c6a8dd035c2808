"""KVzap (Jegou et al., 2026, "KVzap: fast, adaptive and faithful KV cache pruning"):
KVzip's ranking without the replay.

A linear surrogate per layer, trained once per model on KVzip's replay scores
(kvcrush_ov/kvzap/train.py), predicts each token's importance per KV head from the hidden
state it enters the attention with. The engine's graphs output the prediction for every token
they compute (``score_mode = "surrogate"``, transformations/kvzap.py), so the prompt costs one
pass: no replay, no attention scores. The predicted scores are allocated as KVzip's (Ada-KV,
model-wide).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvcrush_ov.eviction.kvzip import KVzip


@dataclass(frozen=True)
class KVzap(KVzip):
    """KVzip's allocation of the surrogate's scores (``alpha``, ``scope``: see KVzip).
    ``question_window`` N > 1: the prompt's last N queries are scored as they are computed
    and a row keeps the larger of its prediction and their attention (engine/evictor.py;
    SnapKV's window on a question that ends the prompt; no replay, so nothing runs again)."""

    name: ClassVar[str] = "kvzap"
    score_mode: ClassVar[str] = "surrogate"
