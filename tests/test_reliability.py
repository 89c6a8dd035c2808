"""Reliability on the tiny model: many concurrent requests under cache pressure give their
sequential outputs, a prefill-mode budget above the prompt keeps everything, a failing call
leaves nothing behind, and a streamer never sees text the result does not have."""

from __future__ import annotations

import numpy as np
import pytest

from kvcrush_ov import (
    CacheEvictionConfig,
    ConfigError,
    KVCacheConfig,
    Pipeline,
    SchedulerConfig,
)
from kvcrush_ov.fuzz import prompt_text


def _prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [prompt_text(int(w), seed * 1000 + i)
            for i, w in enumerate(rng.integers(5, 400, size=n))]


@pytest.mark.parametrize("precision", ["u8", "f32"])
@pytest.mark.parametrize("eviction", [None, CacheEvictionConfig(max_cache_size=0.5)],
                         ids=["full", "evict"])
def test_64_concurrent_requests_under_cache_pressure_all_complete(tiny_model, precision,
                                                                  eviction):
    """64 prompts of 5..400 words at once on a cache that holds about a fifth of them: all
    complete, none is lost or duplicated, nothing is left behind. With an f32 cache each greedy
    output equals its run alone; with u8 the plugin's quantized-cache attention (and bf16
    inference, where the CPU has it) depends on what else runs in a step, so a few outputs
    may differ (docs/reliability.md, measured on SmolLM2), as they do on GenAI."""
    pipe = Pipeline(tiny_model, kv_cache=KVCacheConfig(precision=precision, num_kv_blocks=160),
                    eviction=eviction, scheduler=SchedulerConfig(max_num_batched_tokens=256))
    prompts = _prompts(64)
    g = dict(max_new_tokens=12, ignore_eos=True, apply_chat_template=False)
    batch = pipe.generate(prompts, **g)
    assert len(batch.token_ids) == 64 and all(len(t) == 12 for t in batch.token_ids)
    assert batch.finish_reasons == ["length"] * 64
    need = sum(-(-m.num_input_tokens // 32) for m in batch.metrics)
    assert need > 4 * 160  # the cache could not hold them all at once
    eng = pipe.backend.engine
    assert eng.sequences == {} and eng.blocks_held == 0
    if precision == "f32":
        for i, p in enumerate(prompts):
            assert pipe.generate(p, **g).token_ids[0] == batch.token_ids[i], f"prompt {i}"


def test_u4_output_does_not_depend_on_the_step_size(tiny_model):
    """u4 prompt chunks end on KV block boundaries: a prompt gives the same greedy tokens with
    max_num_batched_tokens 48, 100 and 256 (a u4 key block written in two parts was quantized
    twice and the output changed with the step size: docs/reliability.md, SmolLM2)."""
    prompts = [prompt_text(n, n) for n in (40, 150, 338, 420, 565, 700)]
    g = dict(max_new_tokens=24, ignore_eos=True, apply_chat_template=False)
    outs = {}
    for step in (48, 100, 256):
        pipe = Pipeline(tiny_model, kv_cache=KVCacheConfig(precision="u4"), eviction=None,
                        scheduler=SchedulerConfig(max_num_batched_tokens=step))
        outs[step] = [pipe.generate(p, **g).token_ids[0] for p in prompts]
    assert outs[48] == outs[100] == outs[256]


def test_prefill_mode_budget_above_the_prompt_keeps_everything(tiny_model):
    """mode='prefill' with a token budget larger than the prompt evicts nothing (it used to be
    refused at generate time): the output is the full cache's."""
    prompt = prompt_text(60, 3)
    full = Pipeline(tiny_model, eviction=None).generate(prompt, max_new_tokens=16,
                                                        ignore_eos=True)
    pipe = Pipeline(tiny_model, eviction=CacheEvictionConfig(max_cache_size=4096,
                                                             mode="prefill"))
    out = pipe.generate(prompt, max_new_tokens=16, ignore_eos=True)
    assert out.token_ids == full.token_ids
    assert out.metrics[0].num_evictions == 0 and out.metrics[0].kv_budget_tokens is None


def test_a_failing_call_leaves_no_sequence_behind(tiny_model, monkeypatch):
    """Whatever fails inside generate, the call's sequences leave the engine (a stalled engine
    used to keep 1, 2, 5, 8, 12 sequences over successive calls)."""
    pipe = Pipeline(tiny_model, eviction=CacheEvictionConfig(max_cache_size=64, start_size=4,
                                                             recent_size=8))
    eng = pipe.backend.engine

    def broken_step():
        raise RuntimeError("injected")

    for _ in range(3):
        with monkeypatch.context() as m:
            m.setattr(eng, "step", broken_step)
            with pytest.raises(RuntimeError, match="injected"):
                pipe.generate(["one prompt", "another one"], max_new_tokens=4)
        assert eng.sequences == {} and not eng.has_unfinished()
    assert eng.blocks_held == 0
    out = pipe.generate("still works", max_new_tokens=4, ignore_eos=True)
    assert out.metrics[0].num_generated_tokens == 4


def test_a_batch_with_one_bad_prompt_queues_nothing(tiny_model):
    pipe = Pipeline(tiny_model, eviction=None)
    long = "word " * 3000
    with pytest.raises(ConfigError) as info:
        pipe.generate(["fine", long], max_new_tokens=4)
    assert info.value.field == "prompts[1]"
    assert pipe.backend.engine.sequences == {} and not pipe.backend.engine.has_unfinished()


def test_a_stalled_genai_pipeline_fails_instead_of_spinning():
    """GenAI's loop: a pipeline that keeps a request waiting and schedules nothing (its cache
    cannot take it) ends the call with CacheFullError after _STALL_STEPS idle steps, and a step
    that schedules a request resets the count."""
    from types import SimpleNamespace

    from kvcrush_ov.backends import genai as gb
    from kvcrush_ov.errors import CacheFullError
    from kvcrush_ov.results import CacheMetrics

    class Stalled:
        def __init__(self, busy: int) -> None:
            self.steps, self.busy = 0, busy  # the first `busy` steps schedule the request

        def has_non_finished_requests(self) -> bool:
            assert self.steps < 10 * gb._STALL_STEPS, "the loop never gave up"
            return True

        def step(self) -> None:
            self.steps += 1

        def get_metrics(self):
            return SimpleNamespace(requests=1, scheduled_requests=int(self.steps <= self.busy),
                                   cache_usage=0.0, kv_cache_size_in_bytes=0)

    for busy in (0, 30):
        pipe = Stalled(busy)
        with pytest.raises(CacheFullError, match="scheduled none of its 1 waiting"):
            gb.GenAIBackend._drain(pipe, {}, [[]], ["cancelled"], [0.0], [0.0],
                                   CacheMetrics(kv_block_bytes=1), None, 0.0)
        assert pipe.steps == busy + gb._STALL_STEPS
