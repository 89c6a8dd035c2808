"""What the engine needs to know to evict: the policy, the budget and when to run it."""

from __future__ import annotations

from dataclasses import dataclass

from kvcrush_ov.config import CacheEvictionConfig, FastKVConfig, budget_tokens
from kvcrush_ov.eviction.base import EvictionPolicy
from kvcrush_ov.kvzap.weights import KVzapWeights
from kvcrush_ov.less.kernels import LESSWeights

EVICTION_MODES = ("prefill", "continuous")


@dataclass(frozen=True)
class EvictionSpec:
    """policy: picks candidates (see base.py). max_cache_size: total tokens per sequence (int)
    or a fraction of the prompt (float in (0, 1]). start_size / recent_size: sinks and recent
    window, always kept. mode: ``prefill`` evicts once, when the prompt is computed (SnapKV
    style); ``continuous`` also evicts while decoding, whenever a sequence has grown
    ``evict_interval`` tokens past its budget. window: the prompt's last ``window`` queries are
    scored for score_mode "window" (decode queries are scored in continuous mode: with
    ``decode_window`` set, only the last ``decode_window`` decode steps before each decode-time
    eviction; None scores every one).
    log: keep a per-request eviction log (which positions each layer / head kept, by which rule).
    genai: set for ``importance="upstream"``: the user's config, translated per request to
        GenAI's settings (eviction/genai_compat.py) and run by GenAI's own algorithm
        (eviction/upstream.py) instead of ``policy`` (engine/evictor.py's upstream path).
    fastkv: FastKV's token-selective propagation during prefill (engine/fastkv.py), or None.
    prefill_eviction: evict after every prompt chunk that leaves the sequence above its budget
        (each chunk's last ``window`` queries scored), not only once the prompt is read.
    prefill_probe: with ``prefill_eviction``, the prompt's last ``prefill_probe`` tokens run
        after each part of the prompt (then forgotten) and their last ``window`` queries score
        it instead (engine/replay.py); 0: each chunk's own last queries.
    less: trained LESS kernels (the engine folds evicted tokens into a per-sequence state and
        the graph mixes it into attention), or None.
    plain_prefill: unscored prompt chunks of whole block groups run the plain paged graph
        (engine/head_model_runner.py); read when the engine builds its runner.
    kvzap: KVzap's trained surrogate (``importance="kvzap"``): the engine's graphs predict
        every token's score from its hidden state (transformations/kvzap.py), or None.
    """

    policy: EvictionPolicy
    max_cache_size: int | float
    start_size: int
    recent_size: int
    mode: str = "prefill"
    evict_interval: int = 32
    window: int = 32
    decode_window: int | None = None
    seed: int = 0
    log: bool = False
    genai: CacheEvictionConfig | None = None
    fastkv: FastKVConfig | None = None
    prefill_eviction: bool = False
    prefill_probe: int = 0
    less: LESSWeights | None = None
    plain_prefill: bool = False
    kvzap: KVzapWeights | None = None

    def budget(self, prompt_tokens: int) -> int:
        """Tokens per layer and head after an eviction (never below sinks + recent)."""
        return max(budget_tokens(self.max_cache_size, prompt_tokens),
                   self.start_size + self.recent_size)
