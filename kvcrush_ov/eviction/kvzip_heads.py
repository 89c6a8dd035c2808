"""KVzip's context-independent variant: which heads keep the context, chosen once per model.

KVzip (Kim et al., 2025) also ranks whole heads: the attention a head gives the context while
the model repeats it, measured once on calibration text, tells the heads that copy from far
back (they keep every token) from the ones that read their neighbours (they keep the sinks and
the recent window). Nothing is replayed at run time and no score is computed (``score_mode``
``"none"``), so the prompt costs what the per-head graph costs.

- :func:`calibrate`: KVzip's own replay scores (``importance="kvzip"``, engine/replay.py) on
  ``num_docs`` essay excerpts; a head's score is the mean replay score of its context tokens
  (the ``start_size`` sinks and the ``recent_size`` newest left out), averaged over the
  excerpts. float64 [L, H].
- :class:`KVzipHeads`: heads in the order of their score keep all their candidates until the
  budget is spent (the last one its newest candidates); every other head keeps none.

A tuning candidate of the eval (``kvzip-heads``, query-agnostic protocol); its selection runs in
Python (the planner's policy callback), not in the C++ core.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from kvcrush_ov.eviction.base import EvictionInputs

#: calibration: essay excerpts of this many words (about 2,900 SmolLM2 tokens each)
DOC_WORDS = 2200
#: where a model's head scores are kept, beside its exported folders
HEADS_FILE = "kvzip_heads.npy"


@dataclass(frozen=True)
class KVzipHeads:
    """``head_scores`` [L][H] (tuples, from :func:`calibrate`): the larger, the earlier a head
    keeps all of its candidates."""

    name: ClassVar[str] = "kvzip-heads"
    score_mode: ClassVar[str] = "none"

    head_scores: tuple[tuple[float, ...], ...]

    @classmethod
    def from_array(cls, scores: np.ndarray) -> KVzipHeads:
        """From float [L, H] scores."""
        return cls(tuple(tuple(float(x) for x in row) for row in np.asarray(scores)))

    def select(self, inputs: EvictionInputs, num_keep: int,
               rng: np.random.Generator) -> np.ndarray:
        """bool [L, H, N]: whole heads in score order (ties: lower layer, then head, first)."""
        num_layers, num_heads, n = inputs.shape
        scores = np.asarray(self.head_scores, dtype=np.float64)
        if scores.shape != (num_layers, num_heads):
            raise ValueError(f"KVzipHeads.head_scores: shape {scores.shape}, the cache has "
                             f"{(num_layers, num_heads)} (layers, KV heads)")
        keep = np.zeros((num_layers, num_heads, n), bool)
        remaining = num_layers * num_heads * int(num_keep)
        for flat in np.argsort(-scores.ravel(), kind="stable"):
            if remaining <= 0:
                break
            layer, head = divmod(int(flat), num_heads)
            have = int(inputs.lengths[layer, head])
            take = min(have, remaining)
            keep[layer, head, have - take:have] = True  # candidates are in position order
            remaining -= take
        return keep


def heads_path(model_dir: str | Path) -> Path:
    """``<model cache folder>/kvzip_heads.npy`` (beside the exported folders, like LESS's)."""
    return Path(model_dir).parent / HEADS_FILE


def calibrate(model: str | Path, num_docs: int = 3, start_size: int = 32,
              recent_size: int = 128, doc_words: int = DOC_WORDS) -> np.ndarray:
    """float64 [L, H]: each head's mean KVzip replay score over ``num_docs`` essay excerpts (see
    the module docstring). Runs its own native Pipeline on CPU. Bad arguments raise
    ConfigError naming the field before any model is loaded."""
    from kvcrush_ov.errors import ConfigError

    for field, value, low in (("num_docs", num_docs, 1), ("start_size", start_size, 0),
                              ("recent_size", recent_size, 0), ("doc_words", doc_words, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(field, value, f"an integer >= {low}")
    from kvcrush_ov.config import CacheEvictionConfig, GenerationConfig
    from kvcrush_ov.data import essays
    from kvcrush_ov.pipeline import Pipeline

    pipe = Pipeline(model, eviction=CacheEvictionConfig(importance="kvzip", max_cache_size=0.5,
                                                        start_size=start_size,
                                                        recent_size=recent_size))
    engine = pipe.backend.engine
    caught: list[list[list[np.ndarray]]] = []
    evict = engine.evictor.evict

    def watch(seq) -> None:  # the replay's scores, just before they are used
        state = seq.extra.get("scores")
        if state is not None:
            caught.append([[a.copy() for a in row] for row in state.acc])
        evict(seq)

    engine.evictor.evict = watch
    words = " ".join(essays().values()).split()
    g = GenerationConfig(max_new_tokens=2, ignore_eos=True, apply_chat_template=False)
    for i in range(num_docs):
        pipe.generate(" ".join(words[i * doc_words:(i + 1) * doc_words]), g)
    if len(caught) != num_docs:
        raise RuntimeError(f"kvzip_heads.calibrate: {len(caught)} replays for {num_docs} texts")
    out = np.zeros((len(caught[0]), len(caught[0][0])))
    for acc in caught:
        for layer, row in enumerate(acc):
            for head, a in enumerate(row):
                out[layer, head] += float(np.mean(a[start_size:len(a) - recent_size]))
    return out / num_docs


def load_or_calibrate(model_dir: str | Path) -> np.ndarray:
    """The head scores kept beside the model, calibrated (and kept) on first use."""
    path = heads_path(model_dir)
    if path.exists():
        return np.load(path)
    scores = calibrate(model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.partial.npy")  # one per process
    np.save(tmp, scores)
    tmp.replace(path)  # atomic: a reader sees the old file or the whole new one
    return scores
