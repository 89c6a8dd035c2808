"""Eviction while the prompt is read (``CacheEvictionConfig(prefill_eviction=True)``).

A request evicts after every prompt chunk that leaves it above its budget, so it holds at most
its budget + one chunk + a block per (layer, head): checked at every step against the request's
peak. A budget at or above the prompt changes nothing; a prompt longer than the whole cache
runs (and is refused, naming the prompt, without prefill eviction).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvcrush_ov import (
    CacheEvictionConfig,
    ConfigError,
    FastKVConfig,
    GenerationConfig,
    KVCacheConfig,
    Pipeline,
    SchedulerConfig,
)
from kvcrush_ov.engine.engine import LLMEngine
from kvcrush_ov.eviction.factory import make_spec

GREEDY = GenerationConfig(max_new_tokens=10, ignore_eos=True)
CHUNK = 64


def _cfg(budget, prefill_eviction=True, importance="snapkv", **kw) -> CacheEvictionConfig:
    return CacheEvictionConfig(max_cache_size=budget, start_size=8, recent_size=16,
                               importance=importance, prefill_eviction=prefill_eviction,
                               kvcrush=None, **kw)


def _engine(model, cfg: CacheEvictionConfig | None, num_kv_blocks: int = 0) -> LLMEngine:
    return LLMEngine(model, "CPU", KVCacheConfig(precision="f32", num_kv_blocks=num_kv_blocks),
                     SchedulerConfig(max_num_batched_tokens=CHUNK), context_length=2048,
                     eviction=None if cfg is None else make_spec(cfg))


def _ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


def _run(eng: LLMEngine, prompts, on_step=None):
    seqs = [eng.add_request(p, GREEDY, set(), lambda x: "") for p in prompts]
    while eng.has_unfinished():
        eng.step()
        eng.check_invariants()
        if on_step is not None:
            on_step(eng, seqs)
    assert all(p.num_used == 0 for p in getattr(eng.kv, "pools", [eng.pool]))
    return [list(s.output_ids) for s in seqs], seqs


@pytest.mark.parametrize("probe", [0, 40])
def test_a_budget_above_the_prompt_changes_nothing(tiny_model, probe):
    prompts = [_ids(n, n) for n in (300, 150, 40)]
    full, _ = _run(_engine(tiny_model, None), prompts)
    got, seqs = _run(_engine(tiny_model, _cfg(10**5, prefill_probe_size=probe)), prompts)
    assert got == full
    assert all(s.extra.get("evictions", 0) == 0 and "replay" not in s.extra for s in seqs)


def test_a_probe_of_the_prompts_end_ranks_each_part(tiny_model):
    """prefill_probe_size: after each part that leaves the request above its budget, the
    prompt's last 40 tokens run as a probe; the eviction that follows ranks by the probe's last
    snapkv_window_size queries alone (fresh scores), with the probe already forgotten; the last
    part is scored by its own last queries (the prompt's end). A shorter request beside it
    (within the budget) is answered as with a full cache."""
    budget, probe, window, n = 96, 40, 8, 400
    prompt = _ids(n, 5)
    cfg = _cfg(budget, prefill_probe_size=probe, snapkv_window_size=window)
    eng = _engine(tiny_model, cfg)
    seen, probed = [], []
    evict = eng.evictor.evict

    def recording(seq):
        state, t = seq.extra.get("replay"), eng.kv.tables[seq.seq_id]
        seen.append((state.end if state is not None and not state.done else n,
                     list(seq.extra["scores"].query_positions),
                     max(int(p.max()) for row in t.positions_all() for p in row)))
        evict(seq)

    def check(eng, seqs):
        state = seqs[0].extra.get("replay")
        if state is not None and state.replaying:
            assert seqs[0].prompt_ids == prompt[:state.end] + prompt[-probe:]
            probed.append(state.end)

    eng.evictor.evict = recording
    other = _ids(80, 6)
    (got, alone), seqs = _run(eng, [prompt, other], on_step=check)
    ends = [CHUNK * k for k in range(2, n // CHUNK + 1)]  # parts past the budget: probed
    assert sorted(set(probed)) == ends
    assert [s[0] for s in seen] == ends + [n]
    for end, queries, last in seen[:-1]:  # the probe's last window queries, at end + 32..39
        assert queries == list(range(end + probe - window, end + probe)) and last == end - 1
    assert seen[-1][1] == list(range(n - window, n)) and seen[-1][2] == n - 1
    assert seqs[0].extra["evictions"] == len(ends) + 1
    assert alone == _run(_engine(tiny_model, None), [other])[0][0]


@pytest.mark.parametrize("importance,probe", [("snapkv", 0), ("h2o", 0), ("adakv", 0),
                                              ("snapkv", 40), ("adakv", 40)])
def test_peak_stays_within_budget_plus_a_chunk(tiny_model, importance, probe):
    budget, p = 96, 700
    bound_rows = budget + CHUNK + probe + 32  # (+ the probe) + a block of rounding

    def per_head_bound(eng):
        return (math.ceil(bound_rows / eng.block_size) * eng.runner.head_block_bytes
                * eng.runner.num_layers * eng.runner.num_kv_heads)

    peaks = {}
    for on in (True, False):
        eng = _engine(tiny_model, _cfg(budget, prefill_eviction=on, importance=importance,
                                       prefill_probe_size=probe if on else 0))
        worst = []

        def check(eng, seqs, worst=worst):
            for s in seqs:  # after each step's eviction: never above the budget + a chunk
                t = eng.kv.tables.get(s.seq_id)
                if t is not None:
                    worst.append(int(t.lens.max()))

        _, seqs = _run(eng, [_ids(p, 1), _ids(300, 2)], on_step=check)
        peaks[on] = (max(s.extra["peak_kv_bytes"] for s in seqs), max(worst))
        if on:
            assert seqs[0].extra["evictions"] >= p // CHUNK - 3  # one per chunk past the budget
            assert peaks[on][0] <= per_head_bound(eng)
            assert peaks[on][1] <= bound_rows
    assert peaks[False][0] > peaks[True][0] and peaks[False][1] > bound_rows  # it can fail


def test_a_prompt_longer_than_the_cache_runs(tiny_model):
    blocks = 8  # 8 x 32 = 256 tokens of cache; the prompt is 1,200
    with pytest.raises(ConfigError, match="prompt"):
        _engine(tiny_model, _cfg(64, prefill_eviction=False), blocks).add_request(
            _ids(1200, 3), GREEDY, set(), lambda x: "")
    got, seqs = _run(_engine(tiny_model, _cfg(64), blocks), [_ids(1200, 3)])
    assert len(got[0]) == GREEDY.max_new_tokens and seqs[0].extra["evictions"] > 10


def test_pipeline_prompt_longer_than_the_cache(tiny_model):
    prompt = " ".join(f"w{i}" for i in range(260))  # about 1,000 tokens
    kv = KVCacheConfig(precision="f32", num_kv_blocks=10)
    sched = SchedulerConfig(max_num_batched_tokens=CHUNK)
    with pytest.raises(ConfigError, match="prompt"):
        Pipeline(tiny_model, kv_cache=kv, scheduler=sched,
                 eviction=_cfg(64, prefill_eviction=False)).generate(prompt, GREEDY)
    pipe = Pipeline(tiny_model, kv_cache=kv, scheduler=sched, eviction=_cfg(64))
    out = pipe.generate(prompt, GREEDY)
    m = out.metrics[0]
    assert m.num_input_tokens > 10 * 32 and m.num_generated_tokens == GREEDY.max_new_tokens
    assert 0 < m.peak_kv_bytes <= 10 * pipe.backend.engine.block_bytes
    # the budget itself must fit with a chunk: named before any work
    with pytest.raises(ConfigError, match="prefill eviction"):
        Pipeline(tiny_model, kv_cache=kv, scheduler=sched,
                 eviction=_cfg(300)).generate(prompt, GREEDY)


def test_bad_prefill_eviction_configs_are_named(tiny_model):
    with pytest.raises(ConfigError, match="eviction.prefill_eviction"):
        CacheEvictionConfig(prefill_eviction="yes")
    with pytest.raises(ConfigError, match="eviction.prefill_eviction"):
        CacheEvictionConfig(prefill_eviction=True, importance="upstream", kvcrush=None)
    with pytest.raises(ConfigError, match="eviction.prefill_eviction"):
        CacheEvictionConfig(prefill_eviction=True, fastkv=FastKVConfig())
    with pytest.raises(ConfigError, match="eviction.prefill_eviction"):
        Pipeline(tiny_model, eviction=CacheEvictionConfig(prefill_eviction=True),
                 backend="genai")
    for bad in (-1, 1.5, True, "64"):
        with pytest.raises(ConfigError, match="eviction.prefill_probe_size"):
            CacheEvictionConfig(prefill_eviction=True, prefill_probe_size=bad)
    with pytest.raises(ConfigError, match="prefill_probe_size=64 is invalid.*without prefill"):
        CacheEvictionConfig(prefill_probe_size=64)
    assert CacheEvictionConfig().probe_tokens() == 0  # None: the backend's own
    assert CacheEvictionConfig(prefill_eviction=True).probe_tokens() == 64
    assert CacheEvictionConfig(prefill_eviction=True, importance="h2o").probe_tokens() == 0
    assert CacheEvictionConfig(prefill_eviction=True, prefill_probe_size=0).probe_tokens() == 0
    for importance in ("h2o", "streaming", "kvzip"):
        with pytest.raises(ConfigError, match=f"0 with importance='{importance}'"):
            CacheEvictionConfig(prefill_eviction=True, prefill_probe_size=64,
                                importance=importance)


def test_pyramidkv_holds_its_fullest_layer_and_runs_on_a_cache_of_that_size(tiny_model):
    """PyramidKV's first layer keeps up to twice the average budget; each layer has its own KV
    pool, so the hold (admission, the cache it needs) counts that layer: a cache of exactly the
    hold runs a long prompt without preempting the request (which would read it again, and
    again). The hold counts the default probe of the prompt's end too."""
    from kvcrush_ov.cache_plan import prefill_eviction_hold
    from kvcrush_ov.config import NATIVE_PREFILL_PROBE

    sched = SchedulerConfig(max_num_batched_tokens=CHUNK)
    plain = prefill_eviction_hold(64, sched, 32, "continuous", 32, 10)
    assert plain == 64 + CHUNK + 32
    assert prefill_eviction_hold(64, sched, 32, "continuous", 32, 10, "pyramidkv") == plain + 64
    blocks = math.ceil((plain + 64 + NATIVE_PREFILL_PROBE) / 32)
    eng = _engine(tiny_model, _cfg(64, importance="pyramidkv"), blocks)
    got, seqs = _run(eng, [_ids(1200, 4)])
    assert len(got[0]) == GREEDY.max_new_tokens and eng.scheduler.num_preemptions == 0
    with pytest.raises(ConfigError, match="prompt"):  # one block less: refused, not looping
        _engine(tiny_model, _cfg(64, importance="pyramidkv"), blocks - 1).add_request(
            _ids(1200, 4), GREEDY, set(), lambda x: "")
