"""Backend "genai": OpenVINO GenAI's C++ ContinuousBatchingPipeline with its cache eviction.

This is both a backend users can pick and the baseline our own engine is measured against. It
translates kvcrush-ov's configuration into GenAI's and guards against GenAI's known defects:

- the total budget is what is kept: GenAI keeps KVCrush's blocks ON TOP of max_cache_size, so
  ``max_cache_size = total - kvcrush_blocks * block_size``;
- budgets are whole blocks (GenAI asserts start / recent / max sizes are block multiples);
- a prompt whose length lies strictly between start_size and start_size + snapkv_window_size
  makes GenAI's NORM_SUM score bookkeeping throw and leak the request's blocks; such a prompt
  never needs eviction at prefill, so it runs with the SnapKV window off (window 0), which GenAI
  handles by counting tokens one by one;
- a u4 cache is refused: GenAI 2026.4.1 corrupted the heap (``double free or corruption``,
  SIGABRT / SIGSEGV) after a few requests in fuzzed u4 configurations, with and without
  eviction, and in none with u8 / f32;
- cache rotation (``apply_rotation``) is rejected: in GenAI 2026.4.1 it fails with chunked
  prefill, is refused with a u8 cache, and corrupted the heap on this project's machines with bf16
  AND f32 caches (``free(): invalid next size``), so no configuration is safe to offer.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from kvcrush_ov.backends.common import (
    Streamer,
    TextStream,
    cut_at_stop,
    encode,
    first_line,
    load_tokenizer,
)
from kvcrush_ov.config import (
    GENAI_IMPORTANCE,
    CacheEvictionConfig,
    GenerationConfig,
    KVCacheConfig,
    SchedulerConfig,
)
from kvcrush_ov.device import compile_properties
from kvcrush_ov.errors import CacheFullError, ConfigError, ModelError
from kvcrush_ov.eviction.genai_compat import GenAISettings, check_genai_algorithm, translate
from kvcrush_ov.model_info import ModelInfo, block_size_for
from kvcrush_ov.results import CacheMetrics, DecodedResults, RequestMetrics

_AGGREGATION = {"norm_sum": ov_genai.AggregationMode.NORM_SUM, "sum": ov_genai.AggregationMode.SUM}
_ANCHOR = {
    "random": ov_genai.KVCrushAnchorPointMode.RANDOM,
    "zeros": ov_genai.KVCrushAnchorPointMode.ZEROS,
    "ones": ov_genai.KVCrushAnchorPointMode.ONES,
    "mean": ov_genai.KVCrushAnchorPointMode.MEAN,
    "alternating": ov_genai.KVCrushAnchorPointMode.ALTERNATING,
}
_FINISH = {"STOP": "stop", "LENGTH": "length", "NONE": "cancelled"}
_MAX_PIPELINES = 3
# GenAI steps in a row that schedule nothing while requests wait: the pipeline is stalled (no
# running request will ever free memory for them), so the call fails instead of spinning
_STALL_STEPS = 100


def to_genai(ev: GenAISettings) -> ov_genai.CacheEvictionConfig:
    """GenAI's CacheEvictionConfig for translated settings."""
    kvcrush = None
    if ev.kvcrush_blocks > 0:
        kvcrush = ov_genai.KVCrushConfig(ev.kvcrush_blocks, _ANCHOR[ev.anchor_point_mode],
                                         ev.rng_seed)
    return ov_genai.CacheEvictionConfig(
        ev.start_size, ev.recent_size, ev.max_cache_size, _AGGREGATION[ev.aggregation_mode],
        ev.apply_rotation, ev.snapkv_window_size, kvcrush,
    )


def check_eviction(eviction: CacheEvictionConfig, kv_cache: KVCacheConfig, block: int) -> None:
    """Reject what GenAI cannot run, with the field named, before any model is loaded."""
    native_only = "with backend 'genai' (the native backend runs the others)"
    if eviction.importance not in GENAI_IMPORTANCE:
        raise ConfigError("eviction.importance", eviction.importance,
                          f"one of {', '.join(GENAI_IMPORTANCE)} {native_only}")
    if eviction.apply_rotation:
        raise ConfigError("eviction.apply_rotation", True,
                          "False with backend 'genai': GenAI 2026.4's key rotation corrupts the "
                          "heap or fails, whatever the cache precision")
    if eviction.prefill_eviction:
        raise ConfigError("eviction.prefill_eviction", True,
                          f"False {native_only}: GenAI evicts after the prompt only")
    if eviction.fastkv is not None:
        raise ConfigError("eviction.fastkv", eviction.fastkv,
                          f"None {native_only}: GenAI's pipeline cannot split the prefill")
    if eviction.less is not None:
        raise ConfigError("eviction.less", eviction.less,
                          f"None {native_only}: GenAI's attention has no LESS state")
    if eviction.plain_prefill:
        raise ConfigError("eviction.plain_prefill", True,
                          f"False {native_only}: GenAI's prefill runs its own graph")
    if eviction.log:
        raise ConfigError("eviction.log", True,
                          f"False {native_only}: GenAI does not report the positions it keeps")
    check_genai_algorithm(eviction, block, native_only)


def check_kv_cache(kv_cache: KVCacheConfig) -> None:
    """GenAI 2026.4.1 corrupts the heap with a u4 cache (with or without eviction)."""
    if kv_cache.precision == "u4":
        raise ConfigError("kv_cache.precision", "u4",
                          "u8, bf16 or f32 with backend 'genai': GenAI 2026.4.1 corrupts the "
                          "heap with a u4 cache (found by kvcrush-ov fuzz, docs/reliability.md); "
                          "the native backend runs u4")


def check_scheduler(scheduler: SchedulerConfig) -> None:
    """GenAI's scheduler asserts this at the first step; name it before any loading."""
    if not scheduler.dynamic_split_fuse \
            and scheduler.max_num_batched_tokens < scheduler.max_num_seqs:
        raise ConfigError("scheduler.max_num_batched_tokens", scheduler.max_num_batched_tokens,
                          f"at least scheduler.max_num_seqs = {scheduler.max_num_seqs} with "
                          "dynamic_split_fuse=False on backend 'genai' (GenAI's scheduler "
                          "requires it; or lower max_num_seqs)")


class GenAIBackend:
    """Runs requests on GenAI ContinuousBatchingPipelines, one per distinct eviction setting."""

    name = "genai"

    def __init__(self, info: ModelInfo, device: str, kv_cache: KVCacheConfig,
                 eviction: CacheEvictionConfig | None, scheduler: SchedulerConfig) -> None:
        self.info, self.device = info, device
        self.kv_cache, self.eviction, self.scheduler = kv_cache, eviction, scheduler
        self.block_size = block_size_for(device)
        if eviction is not None:
            check_eviction(eviction, kv_cache, self.block_size)
        self.block_bytes = info.kv_block_bytes(kv_cache.precision, self.block_size)
        self._pipelines: OrderedDict[GenAISettings | None, ov_genai.ContinuousBatchingPipeline]
        self._pipelines = OrderedDict()
        self.tokenizer = load_tokenizer(info)
        # Compile once now, so a corrupt model fails at construction, not on first use.
        self._pipeline(None)

    # -- pipelines -------------------------------------------------------------------------
    def _scheduler_config(self, ev: GenAISettings | None) -> ov_genai.SchedulerConfig:
        sc = ov_genai.SchedulerConfig()
        s, k = self.scheduler, self.kv_cache
        sc.max_num_batched_tokens = s.max_num_batched_tokens
        sc.max_num_seqs = s.max_num_seqs
        sc.dynamic_split_fuse = s.dynamic_split_fuse
        sc.enable_prefix_caching = s.enable_prefix_caching
        if k.num_kv_blocks:
            sc.num_kv_blocks = k.num_kv_blocks
        elif k.cache_size:
            sc.cache_size = int(np.ceil(k.cache_size))
        if ev is not None:
            sc.use_cache_eviction = True
            sc.cache_eviction_config = to_genai(ev)
        return sc

    def _pipeline(self, ev: GenAISettings | None) -> ov_genai.ContinuousBatchingPipeline:
        if ev in self._pipelines:
            self._pipelines.move_to_end(ev)
            return self._pipelines[ev]
        while len(self._pipelines) >= _MAX_PIPELINES:
            self._pipelines.popitem(last=False)
        try:
            pipe = ov_genai.ContinuousBatchingPipeline(
                str(self.info.path), self._scheduler_config(ev), self.device,
                compile_properties(self.device, self.kv_cache.precision),
            )
        except RuntimeError as e:
            raise ModelError(f"model={str(self.info.path)!r} could not be loaded on "
                             f"{self.device}: {first_line(e)}") from None
        self._pipelines[ev] = pipe
        return pipe

    # -- requests --------------------------------------------------------------------------
    def encode(self, prompt: str, apply_chat_template: bool) -> np.ndarray:
        """Token ids [1, T] (int64) of ``prompt``, through the chat template when asked."""
        return encode(self.tokenizer, prompt, apply_chat_template)

    def _genai_config(self, g: GenerationConfig) -> ov_genai.GenerationConfig:
        c = ov_genai.GenerationConfig()
        c.max_new_tokens = g.max_new_tokens
        c.do_sample = g.do_sample
        if g.do_sample:
            c.temperature = float(g.temperature)
            c.top_p = float(g.top_p)
            if g.top_k > 0:
                c.top_k = g.top_k
            c.rng_seed = g.rng_seed
        c.repetition_penalty = float(g.repetition_penalty)
        if g.stop_strings:
            c.stop_strings = set(g.stop_strings)
        c.include_stop_str_in_output = g.include_stop_str_in_output
        c.ignore_eos = g.ignore_eos
        c.eos_token_id = self.tokenizer.get_eos_token_id()
        return c

    def plan(self, prompt_len: int, g: GenerationConfig) -> GenAISettings | None:
        if self.eviction is None:
            return None
        return translate(self.eviction, prompt_len, g.max_new_tokens, self.block_size)

    @staticmethod
    def _drain(pipe, handles, ids, finish, first, last, cache, stream, t_start) -> bool:
        """Step ``pipe`` until its requests finish, collecting their tokens; True if the
        streamer asked to stop."""
        user_stop = False
        idle = 0
        while pipe.has_non_finished_requests():
            pipe.step()
            now = time.perf_counter()
            m = pipe.get_metrics()
            idle = idle + 1 if m.scheduled_requests == 0 else 0
            if idle >= _STALL_STEPS:
                raise CacheFullError(
                    f"GenAI's pipeline scheduled none of its {m.requests} waiting request(s) in "
                    f"{_STALL_STEPS} steps in a row: its KV cache cannot take them (set "
                    "kv_cache.num_kv_blocks or kv_cache.cache_size, or send fewer at once)")
            used = int(round(m.cache_usage / 100.0 * m.kv_cache_size_in_bytes))
            cache.peak_kv_bytes = max(cache.peak_kv_bytes, used)
            cache.final_kv_bytes = used
            for i, h in handles.items():
                if not h.can_read():
                    continue
                for out in h.read().values():
                    new = list(out.generated_ids)
                    if new and not ids[i]:
                        first[i] = now - t_start
                    if new:
                        last[i] = now - t_start
                    ids[i].extend(new)
                    reason = out.finish_reason.name
                    if reason != "NONE":
                        finish[i] = _FINISH.get(reason, reason.lower())
                    if stream and new and stream.push(new):
                        h.stop()
                        finish[i] = "cancelled"
                        user_stop = True
        return user_stop

    def run(self, inputs: list[np.ndarray], g: GenerationConfig,
            streamer: Streamer | None) -> DecodedResults:
        """Generate for already-encoded, already-validated prompts ([1, T] int64 each)."""
        plans = [self.plan(x.shape[1], g) for x in inputs]
        groups: OrderedDict[GenAISettings | None, list[int]] = OrderedDict()
        for i, p in enumerate(plans):
            groups.setdefault(p, []).append(i)
        n = len(inputs)
        ids: list[list[int]] = [[] for _ in range(n)]
        finish = ["cancelled"] * n
        first = [0.0] * n
        last = [0.0] * n
        cache = CacheMetrics(kv_block_bytes=self.block_bytes)
        gconf = self._genai_config(g)
        stream = None if streamer is None else TextStream(
            self.tokenizer, streamer, g.stop_strings, g.include_stop_str_in_output)
        user_stop = False
        t_start = time.perf_counter()
        for plan, members in groups.items():
            pipe = self._pipeline(plan)
            handles = {i: pipe.add_request(i, ov.Tensor(inputs[i]), gconf) for i in members}
            try:
                user_stop |= self._drain(pipe, handles, ids, finish, first, last, cache, stream,
                                         t_start)
            except BaseException:
                for h in handles.values():
                    h.stop()
                self._pipelines.pop(plan, None)  # a pipeline that threw is not used again
                raise
            for i, h in handles.items():  # GenAI ends a request whose every token belongs to a
                # stop string with no output at all: it stopped, it was not cancelled
                if finish[i] == "cancelled" and not (user_stop and stream) \
                        and h.get_status().name == "FINISHED":
                    finish[i] = "stop"
        metrics = []
        for i, x in enumerate(inputs):
            k = len(ids[i])
            tpot = (last[i] - first[i]) / (k - 1) if k > 1 else 0.0
            p = plans[i]
            metrics.append(RequestMetrics(
                num_input_tokens=int(x.shape[1]), num_generated_tokens=k, ttft_s=first[i],
                tpot_s=tpot, kv_budget_tokens=p.total_tokens if p else None,
                kvcrush_tokens=p.kvcrush_blocks * self.block_size if p else 0,
            ))
        eos = self.tokenizer.get_eos_token_id()
        for t in ids:  # like the native backend: the EOS token is not part of the output
            if t and t[-1] == eos and not g.ignore_eos:
                t.pop()
        texts = [self.tokenizer.decode(t) if t else "" for t in ids]
        if g.stop_strings and not g.include_stop_str_in_output:  # as the native backend does
            texts = [cut_at_stop(t, g.stop_strings) for t in texts]
        if stream and not user_stop:
            stream.finish(texts[0])
        return DecodedResults(texts=texts, token_ids=ids, finish_reasons=finish, metrics=metrics,
                              cache=cache, generate_s=time.perf_counter() - t_start)

