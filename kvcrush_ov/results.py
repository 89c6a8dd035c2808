"""What ``Pipeline.generate`` returns: texts plus per-request and cache metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """One request's timing and budget.

    num_generated_tokens: tokens the model generated, a final EOS included (token_ids of the
        results leave the EOS out).

    ttft_s: seconds from submission to the first generated token.
    tpot_s: mean seconds per generated token after the first.
    kv_budget_tokens: total cached tokens the eviction kept this request to (None: full cache).
    kvcrush_tokens: how many of those are KVCrush representatives.
    kv_bytes: KV-cache bytes this request held at its last step (native backend; with
        eviction: after it). peak_kv_bytes: the most it held at any step, before that step's
        eviction (native backend). num_evictions: eviction events (native backend).
    eviction_log: with ``CacheEvictionConfig(log=True)`` on the native backend, one
        ``EvictionRecord`` per eviction (kvcrush_ov.engine.evictor).
    fastkv: with ``CacheEvictionConfig(fastkv=...)``: ``split_layer``, ``prompt_tokens``,
        ``front_tokens`` / ``back_tokens`` (prompt tokens layers ``0..split_layer`` and the
        deeper layers processed), ``split`` (False with a ``reason`` when the prompt had
        nothing to rank), ``front_s`` / ``back_s`` (seconds in each part); None otherwise.
    num_cached_tokens: prompt tokens not computed by this request because a chat session's
        cache already held them (native backend, ``Pipeline.start_chat``); 0 otherwise.
    """

    num_input_tokens: int
    num_generated_tokens: int
    ttft_s: float
    tpot_s: float
    kv_budget_tokens: int | None = None
    kvcrush_tokens: int = 0
    num_preemptions: int = 0
    kv_bytes: int = 0
    peak_kv_bytes: int = 0
    num_evictions: int = 0
    eviction_log: list | None = None
    fastkv: dict | None = None
    num_cached_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.tpot_s if self.tpot_s > 0 else 0.0


@dataclass
class CacheMetrics:
    """KV-cache occupancy sampled after every engine step of one ``generate`` call.

    peak_*: the most the cache held at any step. final_*: what it held after the last step in
    which a request was still running (with eviction: the compressed size).
    """

    kv_block_bytes: int
    peak_kv_bytes: int = 0
    final_kv_bytes: int = 0

    @property
    def peak_kv_blocks(self) -> int:
        return round(self.peak_kv_bytes / self.kv_block_bytes)

    @property
    def final_kv_blocks(self) -> int:
        return round(self.final_kv_bytes / self.kv_block_bytes)


@dataclass
class DecodedResults:
    """Generated texts in prompt order, with their token ids, finish reasons and metrics."""

    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    metrics: list[RequestMetrics]
    cache: CacheMetrics
    generate_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.texts[0]

    def __str__(self) -> str:
        return self.texts[0] if len(self.texts) == 1 else "\n".join(self.texts)
