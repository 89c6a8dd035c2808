"""Backend "native": kvcrush-ov's own continuous-batching engine (kvcrush_ov.engine)."""

from __future__ import annotations

import time

import numpy as np

from kvcrush_ov.backends.common import Streamer, TextStream, encode, first_line, load_tokenizer
from kvcrush_ov.config import (
    CacheEvictionConfig,
    GenerationConfig,
    KVCacheConfig,
    SchedulerConfig,
)
from kvcrush_ov.engine.engine import LLMEngine
from kvcrush_ov.engine.sequence import Sequence
from kvcrush_ov.errors import ConfigError, KVCrushError, ModelError
from kvcrush_ov.eviction.factory import make_spec
from kvcrush_ov.eviction.genai_compat import check_genai_algorithm
from kvcrush_ov.eviction.kvzip import REPEAT_PROMPT
from kvcrush_ov.eviction.registry import POLICIES
from kvcrush_ov.model_info import ModelInfo, block_size_for
from kvcrush_ov.results import CacheMetrics, DecodedResults, RequestMetrics


def check_eviction(eviction: CacheEvictionConfig | None, block: int = 32) -> None:
    """Reject what the native engine cannot run, naming the field, before loading anything.
    ``importance="upstream"`` runs GenAI's algorithm, with GenAI's limits (``block``: the
    device's KV block size)."""
    if eviction is None:
        return
    if eviction.apply_rotation:
        raise ConfigError("eviction.apply_rotation", True,
                          "False with backend 'native' (key re-rotation is not implemented)")
    if eviction.importance not in POLICIES:
        raise ConfigError("eviction.importance", eviction.importance,
                          f"one of {', '.join(POLICIES)} with backend 'native'")
    if eviction.importance == "upstream":
        check_genai_algorithm(eviction, block, "with importance='upstream' (GenAI's algorithm)")


class NativeBackend:
    name = "native"

    def __init__(self, info: ModelInfo, device: str, kv_cache: KVCacheConfig,
                 eviction: CacheEvictionConfig | None, scheduler: SchedulerConfig) -> None:
        self.info = info
        self.eviction = eviction
        self.tokenizer = load_tokenizer(info)
        check_eviction(eviction, block_size_for(device))
        spec = make_spec(eviction, info.path) if eviction is not None else None
        try:
            repeat = self.tokenizer.encode(REPEAT_PROMPT, add_special_tokens=False)
            self.engine = LLMEngine(info.path, device, kv_cache, scheduler, info.context_length,
                                    eviction=spec,
                                    replay_prompt=[int(i) for i in repeat.input_ids.data[0]])
        except RuntimeError as e:
            raise ModelError(f"model={str(info.path)!r} could not be loaded on {device}: "
                             f"{first_line(e)}") from None
        self.block_bytes = self.engine.block_bytes
        eos = {int(self.tokenizer.get_eos_token_id())}
        self.eos_token_ids = eos

    def encode(self, prompt: str, apply_chat_template: bool) -> np.ndarray:
        return encode(self.tokenizer, prompt, apply_chat_template)

    def _detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if ids else ""

    def add_request(self, prompt_ids: list[int], g: GenerationConfig) -> Sequence:
        """Queue one tokenized request on the engine (stepping it is the caller's job)."""
        return self.engine.add_request(prompt_ids, g, self.eos_token_ids, self._detokenize)

    def run(self, inputs: list[np.ndarray], g: GenerationConfig,
            streamer: Streamer | None) -> DecodedResults:
        t_start = time.perf_counter()
        seqs: list[Sequence] = []
        try:
            for x in inputs:
                seqs.append(self.add_request(x[0].tolist(), g))
            return self._run(seqs, g, streamer, t_start)
        finally:  # whatever happened, no sequence of this call stays in the engine
            for s in seqs:
                self.engine.abort(s)
                self.engine.sequences.pop(s.seq_id, None)

    def run_chat(self, inputs: list[np.ndarray], g: GenerationConfig,
                 streamer: Streamer | None, session: Sequence | None, branch: bool
                 ) -> tuple[DecodedResults, Sequence | None]:
        """One chat turn (``branch`` False: one input, the whole conversation) continuing the
        parked ``session`` (None: the first turn), or ``branch``: each input asked of a fork of
        the session, which stays as it was. Returns the results and the session to keep
        (None if the turn failed: the next turn recomputes the conversation)."""
        eng = self.engine
        t_start = time.perf_counter()
        seqs: list[Sequence] = []
        ok = False
        try:
            for x in inputs:
                ids = x[0].tolist()
                if session is None:
                    seqs.append(eng.add_request(ids, g, self.eos_token_ids, self._detokenize,
                                                keep_cache=not branch))
                else:
                    seqs.append(eng.continue_request(session, ids, g, self.eos_token_ids,
                                                     self._detokenize, branch=branch,
                                                     keep_cache=not branch))
            res = self._run(seqs, g, streamer, t_start)
            ok = True
        finally:
            for s in seqs:
                if not (ok and s.extra.get("keep_cache")):
                    eng.release(s)
            if not ok and session is not None and not branch:
                eng.release(session)
        return res, (session if branch else seqs[0])

    def release(self, session: Sequence) -> None:
        """Free a chat session's cache."""
        self.engine.release(session)

    def _run(self, seqs: list[Sequence], g: GenerationConfig, streamer: Streamer | None,
             t_start: float) -> DecodedResults:
        eng = self.engine
        stream = None if streamer is None else TextStream(
            self.tokenizer, streamer, g.stop_strings, g.include_stop_str_in_output)
        cache = CacheMetrics(kv_block_bytes=self.block_bytes)
        stopped: set[int] = set()
        idle = 0
        while eng.has_unfinished():
            out = eng.step()
            idle = idle + 1 if out.num_tokens == 0 else 0
            if idle > 3:  # cannot happen while requests are checked first; never hang if it does
                raise KVCrushError("the native engine made no progress for 4 steps: "
                                   f"{eng.pool.num_free} of {eng.num_blocks} KV blocks free")
            used = round(out.blocks_held * self.block_bytes)
            before = round(out.blocks_before_eviction * self.block_bytes)
            cache.peak_kv_bytes = max(cache.peak_kv_bytes, used, before)
            if out.new_tokens:
                cache.final_kv_bytes = used
            if stream is not None:
                tok = out.new_tokens.get(seqs[0].seq_id)
                finished = seqs[0].is_finished
                if tok is not None and not finished and stream.push([tok]):
                    eng.abort(seqs[0], seqs[0].extra.get("keep_cache", False))
                    stopped.add(seqs[0].seq_id)
        metrics, texts, ids, reasons = [], [], [], []
        for s in seqs:
            k = s.sampler.num_generated  # EOS included: it was generated
            first = s.first_token_time - t_start if s.first_token_time else 0.0
            tpot = (s.last_token_time - s.first_token_time) / (s.sampler.num_generated - 1) \
                if s.sampler.num_generated > 1 else 0.0
            budget = s.extra.get("budget")
            metrics.append(RequestMetrics(
                num_input_tokens=len(s.prompt_ids), num_generated_tokens=k, ttft_s=first,
                tpot_s=tpot, num_preemptions=s.num_preemptions,
                kv_budget_tokens=budget if s.extra.get("evictions") else None,
                kvcrush_tokens=s.extra.get("kvcrush_tokens", 0),
                kv_bytes=s.extra.get("kv_bytes", 0), num_evictions=s.extra.get("evictions", 0),
                peak_kv_bytes=s.extra.get("peak_kv_bytes", 0),
                eviction_log=s.extra.get("eviction_log"), fastkv=s.extra.get("fastkv"),
                num_cached_tokens=s.extra.get("cached_tokens", 0)))
            texts.append(s.sampler.output_text())
            ids.append(list(s.output_ids))
            reasons.append("cancelled" if s.seq_id in stopped
                           else (s.sampler.finish_reason or "cancelled"))
        if stream is not None and seqs[0].seq_id not in stopped:
            stream.finish(texts[0])
        return DecodedResults(texts=texts, token_ids=ids, finish_reasons=reasons,
                              metrics=metrics, cache=cache,
                              generate_s=time.perf_counter() - t_start)
