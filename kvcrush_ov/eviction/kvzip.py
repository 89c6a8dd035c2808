"""KVzip (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction").

After the context is read, the model is asked to repeat it ("Repeat the previous context" and
the context itself, teacher-forced). A cached token's importance is the attention the replay's
queries give it (``score_mode = "replay"``: the engine scores every replay query, then drops the
replay from the cache), so what the model needs to reproduce the context stays, whatever the
question will be. Kept per (layer, head), top-k.

KVzip takes the maximum over the replay queries; OpenVINO's PagedAttention returns sums over a
step's scored queries, so by default the replay runs in steps of ``REPLAY_CHUNK`` queries and a
token's importance is the largest sum one step gave it (``SequenceScores(reduce="max")``).
``replay_group=N`` computes the sums of aligned groups of N queries beside the step instead (the
step's queries and keys as graph outputs: engine/query_scores.py), so a replay step can be
large while the scores stay those of steps of N (N = 1: KVzip's own maximum over queries).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from kvcrush_ov.eviction.base import importance_of
from kvcrush_ov.eviction.h2o import H2O
from kvcrush_ov.eviction.snapkv import check_pooling

#: what the model is asked before the replayed context
REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n\n"
#: replay steps of this many queries, each step's attention a token gets combined by max
REPLAY_CHUNK = 16


@dataclass(frozen=True)
class KVzip(H2O):
    """Ada-KV's allocation of the replay's scores (every head keeps its best ``alpha`` share of
    an even split; the rest of the budget goes to the best scores of all heads of the model,
    ``scope="model"``, as KVzip ranks, or of each layer, ``"layer"``); ``alpha=None``: the top
    replay scores per (layer, head), an even split (H2O's selection).

    Defaults chosen on the tuning seed (7; docs/chat.md): SmolLM2, query-agnostic RULER niah
    tasks, 3 samples each, % of the full cache at 25% / 12.5%: per head 43 / -, per layer
    78 / 38, model-wide 100 / 100."""

    name: ClassVar[str] = "kvzip"
    score_mode: ClassVar[str] = "replay"

    alpha: float | None = 0.2
    scope: str = "model"
    #: queries per replay step (a row's score: the largest sum one step gave it)
    replay_chunk: int = REPLAY_CHUNK
    #: None: a row's replay score is the largest sum of one step's queries (PagedAttention's
    #: scores, steps of ``replay_chunk``); N: the largest sum over an aligned group of N
    #: replay queries, computed beside the step from its queries and keys
    #: (engine/query_scores.py), so a step of ``replay_chunk`` (a multiple of N) scores as
    #: steps of N would (N = 1: KVzip's own maximum over single queries)
    replay_group: int | None = None
    #: the replay scores smoothed along the sequence before the allocation (as SnapKV's:
    #: ``"max"``, ``"avg"`` or ``"none"``, KVzip's own; odd ``kernel_size``); needs ``alpha``
    pooling: str = "none"
    kernel_size: int = 7
    #: the prompt's last this many queries run again once the replay is forgotten, scored in
    #: one step, a row keeping the larger of its replay score and their attention (SnapKV's
    #: observation window: when a question ends the prompt, what it reads stays); 1: only the
    #: last token, which runs again anyway to give the first token's logits
    question_window: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_pooling("KVzip", self.pooling, self.kernel_size)
        if self.pooling != "none" and self.alpha is None:
            raise ValueError(f"KVzip.pooling={self.pooling!r}: allowed only with alpha set "
                             "(alpha=None is H2O's unpooled top-k)")
        if self.scope not in ("layer", "model"):
            raise ValueError(f"KVzip.scope={self.scope!r}: allowed layer, model")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(
                self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"KVzip.alpha={self.alpha!r}: allowed None or a number in [0, 1]")
        if (isinstance(self.replay_chunk, bool) or not isinstance(self.replay_chunk, int)
                or self.replay_chunk < 1):
            raise ValueError(f"KVzip.replay_chunk={self.replay_chunk!r}: allowed an integer >= 1")
        g = self.replay_group
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1
                              or self.replay_chunk % g):
            raise ValueError(f"KVzip.replay_group={g!r}: allowed None or an integer >= 1 that "
                             f"divides replay_chunk={self.replay_chunk}")
        if (isinstance(self.question_window, bool) or not isinstance(self.question_window, int)
                or self.question_window < 1):
            raise ValueError(f"KVzip.question_window={self.question_window!r}: allowed an "
                             "integer >= 1")

    def core_kwargs(self) -> dict:
        """See :meth:`CorePolicy.core_kwargs`: H2O's top-k for ``alpha=None``, else Ada-KV's
        allocation of the unpooled scores over ``scope`` (the C++ core runs both)."""
        if self.alpha is None:
            return super().core_kwargs()
        return {"importance": "adakv", "aggregation_mode": self.aggregation_mode,
                "pooling": self.pooling, "kernel_size": self.kernel_size,
                "alpha": float(self.alpha), "scope": self.scope}


def replay_chunk(policy) -> int:
    """Queries per replay step of a replaying ``policy`` (KVzip's, or the KVzip that a KVCrush
    wraps)."""
    return int(getattr(importance_of(policy), "replay_chunk", REPLAY_CHUNK))


def replay_group(policy) -> int | None:
    """The query group a replaying ``policy`` (KVzip, or the KVzip a KVCrush wraps) scores by
    beside the step (``replay_group``; None: the step's own sums)."""
    return getattr(importance_of(policy), "replay_group", None)


def question_window(policy) -> int:
    """Prompt queries a replaying ``policy`` scores after its replay (KVzip's
    ``question_window``, or that of the KVzip a KVCrush wraps)."""
    return int(getattr(importance_of(policy), "question_window", 1))


def with_kvzip(policy, **changes):
    """``policy`` (KVzip, or a KVCrush around it) with KVzip's fields ``changes`` replaced."""
    inner = importance_of(policy)
    if inner is not policy:
        return replace(policy, importance=replace(inner, **changes))
    return replace(policy, **changes)


def with_replay_chunk(policy, chunk: int):
    """``policy`` (KVzip, or a KVCrush around it) with the replay run in steps of ``chunk``."""
    return with_kvzip(policy, replay_chunk=chunk)


def with_replay_group(policy, group: int | None, chunk: int | None = None):
    """``policy`` (KVzip, or a KVCrush around it) with ``replay_group=group`` (and
    ``replay_chunk=chunk`` when given)."""
    return with_kvzip(policy, replay_group=group,
                      **({} if chunk is None else {"replay_chunk": chunk}))
