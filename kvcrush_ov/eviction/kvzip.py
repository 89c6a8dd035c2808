"""KVzip (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction").

After the context is read, the model is asked to repeat it ("Repeat the previous context" and
the context itself, teacher-forced). A cached token's importance is the attention the replay's
queries give it (``score_mode = "replay"``: the engine scores every replay query, then drops the
replay from the cache), so what the model needs to reproduce the context stays, whatever the
question will be. Kept per (layer, head), top-k.

KVzip takes the maximum over the replay queries; OpenVINO's PagedAttention returns sums over a
step's scored queries, so the replay runs in steps of ``REPLAY_CHUNK`` queries and a token's
importance is the largest sum one step gave it (``SequenceScores(reduce="max")``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvcrush_ov.eviction.h2o import H2O

#: what the model is asked before the replayed context
REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n\n"
#: replay steps of this many queries, each step's attention a token gets combined by max
REPLAY_CHUNK = 16


@dataclass(frozen=True)
class KVzip(H2O):
    """H2O's selection over the accumulated attention of the context's replay."""

    name: ClassVar[str] = "kvzip"
    score_mode: ClassVar[str] = "replay"
