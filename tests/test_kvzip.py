"""KVzip on the engine (``importance="kvzip"``, engine/replay.py): the prompt, then a replay of
it scored query by query in small steps (max-combined), the replay forgotten, then one eviction
by the replay's scores and decoding as usual."""

from __future__ import annotations

import numpy as np
import pytest

from kvcrush_ov import (
    CacheEvictionConfig,
    ConfigError,
    FastKVConfig,
    GenerationConfig,
    KVCacheConfig,
    Pipeline,
)
from kvcrush_ov.config import SchedulerConfig
from kvcrush_ov.engine.engine import LLMEngine
from kvcrush_ov.engine.replay import ReplayState, replay_ids
from kvcrush_ov.eviction.factory import make_spec
from kvcrush_ov.eviction.kvzip import KVzip

REPEAT = [7, 8, 9, 10]
GREEDY = GenerationConfig(max_new_tokens=6, ignore_eos=True)


def _kvzip(budget=0.25, **kw) -> CacheEvictionConfig:
    return CacheEvictionConfig(max_cache_size=budget, importance="kvzip", kvcrush=None,
                               start_size=8, recent_size=16, mode="prefill", **kw)


def _engine(model, cfg, replay=True, context_length=2048) -> LLMEngine:
    return LLMEngine(model, "CPU", KVCacheConfig(precision="f32"),
                     SchedulerConfig(max_num_batched_tokens=64), context_length=context_length,
                     eviction=make_spec(cfg), replay_prompt=REPEAT if replay else None)


def _ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(11, 500, n).tolist()


def _kept(eng, seq) -> list[list[np.ndarray]]:
    return [[np.sort(p) for p in row] for row in eng.kv.tables[seq.seq_id].positions_all()]


def _replayed_parent(eng, prompt: list[int]):
    """The eval harness's way: a parked parent that keeps all, replayed once (eval.runner)."""
    from kvcrush_ov.eval.runner import _replay

    parent = eng.add_request(prompt, GenerationConfig(max_new_tokens=1), set(), lambda x: "",
                             keep_cache=True)
    eng.set_spec(parent, make_spec(CacheEvictionConfig(max_cache_size=10**9, kvcrush=None)))
    while eng.has_unfinished():
        eng.step()
    _replay(eng, parent, prompt, REPEAT, set(), lambda x: "")
    return parent


def test_the_engine_replays_then_evicts_like_the_eval_harness(tiny_model):
    """The engine's own replay keeps the same positions as the eval harness's shared-parent
    replay (eval.runner._replay + a branch evicting with the kvzip spec)."""

    prompt = _ids(300, 1)
    eng = _engine(tiny_model, _kvzip())
    seq = eng.add_request(prompt, GREEDY, set(), lambda x: "")
    before = eng.stats.tokens
    kept = None
    while eng.has_unfinished():
        eng.step()
        eng.check_invariants()
        if kept is None and seq.extra.get("evictions"):
            kept = _kept(eng, seq)
            t = eng.kv.tables[seq.seq_id]
            assert t.num_written == 300 and int(t.lens.sum()) == 75 * t.lens.size  # 25%
            assert int(t.lens.min()) >= 8 + 16  # sinks and recent window in every head
    # the prompt, the repeat prompt and the prompt again, the last prompt token again, decode
    assert eng.stats.tokens - before == 300 + 4 + 300 + 1 + 5
    assert seq.extra["evictions"] == 1 and seq.sampler.num_generated == 6
    assert seq.prompt_ids == prompt and seq.first_token_time > 0
    # the harness's way: a parent that keeps all, replayed once, a branch evicting by it
    parent = _replayed_parent(eng, prompt)
    branch = eng.continue_request(parent, prompt, GREEDY, set(), lambda x: "", branch=True,
                                  keep_cache=False)
    eng.set_spec(branch, make_spec(_kvzip()))
    branch.extra["replay"] = ReplayState(list(prompt), done=True)
    eng.step()  # the prompt's last token again, then the eviction
    got = _kept(eng, branch)
    assert all(np.array_equal(a, b) for ra, rb in zip(kept, got, strict=True)
               for a, b in zip(ra, rb, strict=True))


def test_the_replay_is_cut_to_the_models_context(tiny_model):
    assert replay_ids(list(range(100)), REPEAT, 150) == REPEAT + list(range(45))
    eng = _engine(tiny_model, _kvzip(), context_length=400)
    seq = eng.add_request(_ids(300, 2), GREEDY, set(), lambda x: "")
    while eng.has_unfinished():
        eng.step()
    assert seq.sampler.num_generated == 6 and seq.extra["evictions"] == 1


def test_kvzip_needs_a_replay_prompt_and_a_cache_for_the_replay(tiny_model):
    eng = _engine(tiny_model, _kvzip(), replay=False)
    with pytest.raises(ValueError, match="replay_prompt"):
        eng.add_request(_ids(50, 3), GREEDY, set(), lambda x: "")
    pipe = Pipeline(tiny_model, kv_cache=KVCacheConfig(precision="f32", num_kv_blocks=12),
                    eviction=_kvzip())
    with pytest.raises(ConfigError, match="prompt"):  # 300 tokens fit, their replay does not
        pipe.generate(" ".join(["word"] * 300), max_new_tokens=4, apply_chat_template=False)
    assert pipe.backend.engine.kv.tables == {}


def test_pipeline_kvzip_generates_and_a_second_chat_turn_reuses_the_cache(tiny_model):
    pipe = Pipeline(tiny_model, kv_cache=KVCacheConfig(precision="f32"), eviction=_kvzip(0.5))
    g = GenerationConfig(max_new_tokens=5, ignore_eos=True, apply_chat_template=False)
    out = pipe.generate(" ".join(["alpha beta"] * 100), g)
    assert out.metrics[0].num_evictions == 1 and out.metrics[0].num_generated_tokens == 5
    pipe.start_chat()
    pipe.generate(" ".join(["gamma delta"] * 100), g)
    r2 = pipe.generate(" epsilon", g)
    assert r2.metrics[0].num_cached_tokens > 150
    pipe.finish_chat()


def test_kvzip_allocations_keep_the_total_budget():
    """Model-wide (the default), per layer and per head: the same total, different shares."""
    from kvcrush_ov.eviction.base import EvictionInputs

    rng = np.random.default_rng(0)
    L, H, N = 3, 2, 40
    scores = rng.random((L, H, N)).astype(np.float32)
    scores[2] *= 5  # the last layer's replay attention is the strongest
    inputs = EvictionInputs(scores=scores, counts=np.ones((L, H, N), np.float32),
                            positions=np.broadcast_to(np.arange(N), (L, H, N)).copy(),
                            lengths=np.full((L, H), N, np.int64), block_size=4)
    rng2 = np.random.default_rng(0)
    per_model = KVzip().select(inputs, 10, rng2)
    per_layer = KVzip(scope="layer").select(inputs, 10, rng2)
    per_head = KVzip(alpha=None).select(inputs, 10, rng2)
    for mask in (per_model, per_layer, per_head):
        assert int(mask.sum()) == L * H * 10
    assert (per_head.sum(axis=2) == 10).all() and (per_layer.sum(axis=(1, 2)) == 20).all()
    assert per_model[2].sum() > 20 and (per_model.sum(axis=2) >= 2).all()  # the 0.2 floor


def test_kvzip_pooling_keeps_a_peaks_neighbours():
    """Max-pooled replay scores (``KVzip(pooling="max")``): the tokens next to a strongly
    attended one are kept with it; unpooled, only the peak beats the background."""
    from kvcrush_ov.eviction.base import EvictionInputs

    L, H, N = 1, 1, 64
    scores = np.linspace(0.5, 0.4, N, dtype=np.float32).reshape(L, H, N)
    scores[0, 0, 30] = 10.0  # a needle's first token
    inputs = EvictionInputs(scores=scores, counts=np.ones((L, H, N), np.float32),
                            positions=np.arange(N).reshape(L, H, N),
                            lengths=np.full((L, H), N, np.int64), block_size=4)
    plain = KVzip().select(inputs, 3, np.random.default_rng(0))[0, 0]
    pooled = KVzip(pooling="max", kernel_size=3).select(inputs, 3, np.random.default_rng(0))[0, 0]
    assert np.flatnonzero(plain).tolist() == [0, 1, 30]
    assert np.flatnonzero(pooled).tolist() == [29, 30, 31]


def test_kvzip_with_fastkv_is_refused_by_name():
    with pytest.raises(ConfigError, match="eviction.importance"):
        CacheEvictionConfig(importance="kvzip", fastkv=FastKVConfig())


def _run_all(eng, seqs, on_step=None) -> None:
    while eng.has_unfinished():
        eng.step()
        eng.check_invariants()
        if on_step is not None:
            on_step()
    assert all(s.sampler.num_generated == GREEDY.max_new_tokens for s in seqs)


def test_prefill_eviction_replays_each_part_and_holds_budget_plus_a_part_and_its_replay(
        tiny_model):
    """kvzip + prefill_eviction: parts of one scheduler step (64) are read, replayed (the
    repeat prompt and the part, scored), forgotten, then the cache is evicted to the budget;
    the request never holds more than budget + a part + the part's replay."""
    prompt = _ids(300, 11)
    eng = _engine(tiny_model, _kvzip(prefill_eviction=True))
    seq = eng.add_request(prompt, GREEDY, set(), lambda x: "")
    assert seq.prompt_ids == prompt[:64]  # the first part
    before, peak = eng.stats.tokens, []
    _run_all(eng, [seq], lambda: peak.append(float(eng.kv.tables[seq.seq_id].lens.mean())
                                             if seq.seq_id in eng.kv.tables else 0))
    # 5 parts (64 x 4 + 44), each replayed after the repeat prompt; the last token; decode
    assert eng.stats.tokens - before == 300 + 5 * 4 + 300 + 1 + 5
    assert seq.extra["evictions"] == 4  # after parts 2, 3, 4 (above 75 tokens) and the end
    assert seq.prompt_ids == prompt and seq.output_ids
    assert max(peak) <= 75 + 64 + 4 + 64 < 300  # budget, a part, its replay (per layer, head)
    assert eng.scheduler.num_preemptions == 0
    # each layer keeps its share (a model-wide allocation could outgrow a layer's pool)
    assert eng.evictor.spec_of(seq).policy.scope == "layer"
    whole = _engine(tiny_model, _kvzip())
    other = whole.add_request(prompt, GREEDY, set(), lambda x: "")
    peak_whole = []
    _run_all(whole, [other], lambda: peak_whole.append(
        float(whole.kv.tables[other.seq_id].lens.mean()) if other.seq_id in whole.kv.tables
        else 0))
    assert max(peak_whole) > 500  # most of the prompt and its whole replay


def test_one_part_is_the_whole_replay(tiny_model):
    """A prompt within one scheduler step: the part-wise replay is KVzip's whole replay (the
    same kept positions and tokens, with the per-layer allocation prefill eviction uses)."""
    import dataclasses

    prompt = _ids(60, 12)
    got = []
    for pe in (False, True):
        eng = _engine(tiny_model, _kvzip(0.5, prefill_eviction=pe))
        if not pe:
            eng.evictor.spec = dataclasses.replace(eng.evictor.spec, policy=KVzip(scope="layer"))
        seq = eng.add_request(prompt, GREEDY, set(), lambda x: "")
        kept = []

        def grab(eng=eng, seq=seq, kept=kept):
            if not kept and seq.extra.get("evictions"):
                kept.append(_kept(eng, seq))
        _run_all(eng, [seq], grab)
        got.append((list(seq.output_ids), kept[0]))
    (out_a, kept_a), (out_b, kept_b) = got
    assert out_a == out_b
    assert all(np.array_equal(a, b) for ra, rb in zip(kept_a, kept_b, strict=True)
               for a, b in zip(ra, rb, strict=True))


def test_a_preempted_part_wise_replay_starts_again_and_gives_the_same_tokens(tiny_model):
    prompt = _ids(200, 13)
    eng = _engine(tiny_model, _kvzip(prefill_eviction=True))
    want = eng.add_request(prompt, GREEDY, set(), lambda x: "")
    _run_all(eng, [want])
    seq = eng.add_request(prompt, GREEDY, set(), lambda x: "")
    for _ in range(8):  # into the second part's replay
        eng.step()
    state = seq.extra["replay"]
    assert state.start == 64 and not state.done
    eng.scheduler._preempt(seq)  # what the scheduler does when memory runs out
    eng.replay.restart(seq)  # what the engine's step does for every preempted sequence
    assert seq.prompt_ids == prompt[:64] and seq.extra["replay"].start == 0
    _run_all(eng, [seq])
    assert list(seq.output_ids) == list(want.output_ids)


def test_a_queued_part_wise_request_given_another_spec_gets_its_prompt_back(tiny_model):
    prompt = _ids(200, 14)
    eng = _engine(tiny_model, _kvzip(prefill_eviction=True))
    seq = eng.add_request(prompt, GREEDY, set(), lambda x: "")
    assert len(seq.prompt_ids) == 64
    eng.set_spec(seq, make_spec(CacheEvictionConfig(max_cache_size=0.25, kvcrush=None)))
    assert seq.prompt_ids == prompt and "replay" not in seq.extra
    _run_all(eng, [seq])
    assert seq.extra["evictions"] >= 1


def test_pipeline_kvzip_prompt_longer_than_the_cache(tiny_model):
    """A prompt longer than the whole cache (16 blocks): refused by name without prefill
    eviction (the prompt and its replay must fit), answered with it."""
    cfg = dict(max_cache_size=48, importance="kvzip", kvcrush=None, start_size=8,
               recent_size=16)
    kv = KVCacheConfig(precision="f32", num_kv_blocks=16)
    sched = SchedulerConfig(max_num_batched_tokens=64)
    text = " ".join(f"w{i}" for i in range(400))
    g = GenerationConfig(max_new_tokens=4, ignore_eos=True, apply_chat_template=False)
    with pytest.raises(ConfigError, match="prompt"):
        Pipeline(tiny_model, kv_cache=kv, scheduler=sched,
                 eviction=CacheEvictionConfig(**cfg)).generate(text, g)
    pipe = Pipeline(tiny_model, kv_cache=kv, scheduler=sched,
                    eviction=CacheEvictionConfig(**cfg, prefill_eviction=True))
    out = pipe.generate(text, g)
    m = out.metrics[0]
    assert m.num_input_tokens > 16 * pipe.backend.engine.block_size
    assert m.num_generated_tokens == 4 and m.num_evictions >= 2
    assert pipe.backend.engine.scheduler.num_preemptions == 0


def test_kvzip_selection_options():
    with pytest.raises(ValueError, match="KVzip.alpha"):
        KVzip(alpha=2.0)
    with pytest.raises(ValueError, match="KVzip.scope"):
        KVzip(alpha=0.2, scope="global")
    for bad in (0, 2.5, True, "16"):
        with pytest.raises(ValueError, match="KVzip.replay_chunk"):
            KVzip(replay_chunk=bad)
    with pytest.raises(ValueError, match="KVzip.pooling"):
        KVzip(pooling="median")
    with pytest.raises(ValueError, match="KVzip.kernel_size"):
        KVzip(pooling="max", kernel_size=4)
    with pytest.raises(ValueError, match="KVzip.pooling='max': allowed only with alpha"):
        KVzip(alpha=None, pooling="max")
    for bad in (0, 3, True, "1"):
        with pytest.raises(ValueError, match="KVzip.replay_group=.*divides replay_chunk=16"):
            KVzip(replay_group=bad)


@pytest.mark.parametrize("chunk,crush", [(16, False), (64, False), (64, True)])
def test_the_replay_runs_in_steps_of_the_policys_replay_chunk(tiny_model, chunk, crush):
    """The replay's steps hold ``replay_chunk`` queries, aligned to multiples of it: a 300-token
    prompt in 64-token steps is 5 steps, its 304-token replay (positions 300 to 604) 20 steps
    of up to 16 or 6 of up to 64 (also when KVCrush wraps KVzip)."""
    import dataclasses

    from kvcrush_ov.eviction.kvcrush import KVCrush
    from kvcrush_ov.eviction.kvzip import replay_chunk, with_replay_chunk

    spec = make_spec(_kvzip())
    policy = with_replay_chunk(KVCrush(importance=spec.policy) if crush else spec.policy, chunk)
    assert replay_chunk(policy) == chunk
    spec = dataclasses.replace(spec, policy=policy)
    eng = LLMEngine(tiny_model, "CPU", KVCacheConfig(precision="f32"),
                    SchedulerConfig(max_num_batched_tokens=64), context_length=2048,
                    eviction=spec, replay_prompt=REPEAT)
    seq = eng.add_request(_ids(300, 1), GREEDY, set(), lambda x: "")
    steps = 0
    while not seq.extra.get("evictions"):
        eng.step()
        steps += 1
    # prompt, replay, then the prompt's last token again (the eviction follows it)
    assert steps == 5 + (-(-604 // chunk) - 300 // chunk) + 1
    while eng.has_unfinished():
        eng.step()
    assert seq.sampler.num_generated == 6


def test_the_replay_does_not_depend_on_what_runs_beside_it(tiny_model):
    """Replay steps are aligned to 16 positions whatever shares the step, so a KVzip request
    keeps the same positions and tokens alone and batched with others (f32)."""
    prompt = _ids(260, 5)
    eng = _engine(tiny_model, _kvzip())
    alone = eng.add_request(prompt, GREEDY, set(), lambda x: "")
    while eng.has_unfinished():
        eng.step()
    want = list(alone.output_ids)
    others = [eng.add_request(_ids(n, n), GREEDY, set(), lambda x: "") for n in (50, 37)]
    seq = eng.add_request(prompt, GREEDY, set(), lambda x: "")
    others.append(eng.add_request(_ids(45, 9), GREEDY, set(), lambda x: ""))
    kept = None
    while eng.has_unfinished():
        eng.step()
        if kept is None and seq.extra.get("evictions"):
            kept = _kept(eng, seq)
    assert list(seq.output_ids) == want
    assert all(o.sampler.num_generated == 6 for o in others)


def test_replay_steps_are_aligned_whatever_budget_is_left():
    """A sequence with ``max_chunk`` (KVzip's replay) runs in steps ending on multiples of it;
    a step with less budget left than that waits (so its scores do not depend on the batch)."""
    from kvcrush_ov.engine.block_pool import BlockPool
    from kvcrush_ov.engine.kv_cache_manager import KVCacheManager
    from kvcrush_ov.engine.scheduler import Scheduler
    from kvcrush_ov.engine.sequence import Sequence

    sch = Scheduler(KVCacheManager(BlockPool(64), 16), max_num_batched_tokens=64,
                    max_num_seqs=4)
    seq = Sequence(seq_id=0, prompt_ids=list(range(100)), num_computed=37)
    seq.extra["max_chunk"] = 16
    assert sch._chunk(seq, 64) == 11  # up to position 48
    assert sch._chunk(seq, 5) == 0  # not a piece of a step
    seq.num_computed = 96
    assert sch._chunk(seq, 64) == 4  # the end of the known tokens
    small = Scheduler(KVCacheManager(BlockPool(64), 16), max_num_batched_tokens=8,
                      max_num_seqs=4)
    seq.num_computed = 37
    assert small._chunk(seq, 8) == 3  # capped by the step size: never waits forever


def test_kvzip_heads_calibration_ranks_heads_by_their_replay_attention(tiny_model):
    """One replay per text; a head's score is the mean replay score of its context tokens."""
    from kvcrush_ov.eviction.kvzip_heads import KVzipHeads, calibrate

    scores = calibrate(tiny_model, num_docs=2, doc_words=150, start_size=4, recent_size=8)
    info = Pipeline(tiny_model).info
    assert scores.shape == (info.num_layers, info.num_kv_heads)
    assert np.isfinite(scores).all() and (scores >= 0).all() and scores.max() > 0
    assert len(np.unique(scores)) > 1  # heads differ
    KVzipHeads.from_array(scores)  # a valid policy


def test_a_replay_in_one_lane_is_the_replay_and_lanes_score_every_row(tiny_model):
    """The eval's lane replay (a tuning candidate): one lane as long as the context scores
    exactly as the sequential replay; shorter lanes run together and score every context row."""
    from kvcrush_ov.eval.runner import _parent_config, _replay, _replay_lanes

    ids = _ids(300, 5)
    got = []
    for lane in (None, 300, 64):
        eng = _engine(tiny_model, _kvzip())
        parent = eng.add_request(ids, GenerationConfig(max_new_tokens=1), set(), lambda t: "",
                                 keep_cache=True)
        eng.set_spec(parent, make_spec(_parent_config("all")))
        while eng.has_unfinished():
            eng.step()
        if lane is None:
            _replay(eng, parent, ids, REPEAT, set(), lambda t: "", 16)
        else:
            _replay_lanes(eng, parent, ids, REPEAT, set(), lambda t: "", 16, lane)
        acc = parent.extra["scores"].acc
        got.append(np.array([[acc[layer][h][:300] for h in range(len(acc[0]))]
                             for layer in range(len(acc))]))
    np.testing.assert_allclose(got[1], got[0], rtol=1e-5, atol=1e-6)
    assert (got[2] > 0).all() and not np.allclose(got[2], got[0])


@pytest.mark.parametrize("window", [1, 8])
def test_question_window_scores_the_prompts_end_after_the_replay(tiny_model, window):
    """KVzip(question_window=N): after the replay the prompt's last N tokens run again, scored
    in one step and max-combined with the replay's scores; the engine's own replay and the
    eval harness's branch (continue_request(recompute=N)) keep the same positions. (On the
    random model no window attention outweighs the replay's: which rows it keeps on a real
    model is the eval's tuning candidate kvzip-qw<N>.)"""
    import dataclasses

    from kvcrush_ov.engine.replay import recompute_len

    prompt = _ids(300, 3)
    spec = dataclasses.replace(make_spec(_kvzip(0.125)), policy=KVzip(question_window=window))
    assert recompute_len(spec, len(prompt)) == window
    eng = _engine(tiny_model, _kvzip())
    seq = eng.add_request(prompt, GREEDY, set(), lambda x: "")
    eng.set_spec(seq, spec)
    before = eng.stats.tokens
    kept = None
    while eng.has_unfinished():
        eng.step()
        if kept is None and seq.extra.get("evictions"):
            kept = _kept(eng, seq)
    assert eng.stats.tokens - before == 300 + 4 + 300 + window + 5
    parent = _replayed_parent(eng, prompt)
    branch = eng.continue_request(parent, prompt, GREEDY, set(), lambda x: "", branch=True,
                                  keep_cache=False, recompute=window)
    eng.set_spec(branch, spec)
    branch.extra["replay"] = ReplayState(list(prompt), done=True)
    assert branch.num_computed == 300 - window
    scored = []
    windows = eng.evictor.windows
    eng.evictor.windows = lambda chunks: scored.append(windows(chunks)) or scored[-1]
    eng.step()  # the prompt's last tokens again, all scored, then the eviction
    assert scored == [[window]] and branch.extra["evictions"] == 1
    got = _kept(eng, branch)
    assert all(np.array_equal(a, b) for ra, rb in zip(kept, got, strict=True)
               for a, b in zip(ra, rb, strict=True))


def test_question_window_and_recompute_are_checked(tiny_model):
    with pytest.raises(ValueError, match="question_window"):
        KVzip(question_window=0)
    with pytest.raises(ValueError, match="question_window"):
        KVzip(question_window=True)
    eng = _engine(tiny_model, _kvzip())
    parent = eng.add_request(_ids(40, 1), GenerationConfig(max_new_tokens=1), set(),
                             lambda x: "", keep_cache=True)
    while eng.has_unfinished():
        eng.step()
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="recompute"):
            eng.continue_request(parent, _ids(40, 1), GREEDY, set(), lambda x: "",
                                 branch=True, recompute=bad)
    assert set(eng.sequences) == {parent.seq_id}  # nothing was started


def _replay_scores(eng, prompt, chunk, group=None):
    from kvcrush_ov.eval.runner import _replay

    parent = eng.add_request(prompt, GenerationConfig(max_new_tokens=1), set(), lambda x: "",
                             keep_cache=True)
    eng.set_spec(parent, make_spec(CacheEvictionConfig(max_cache_size=10**9, kvcrush=None)))
    while eng.has_unfinished():
        eng.step()
    _replay(eng, parent, prompt, REPEAT, set(), lambda x: "", chunk=chunk, group=group)
    acc = parent.extra["scores"]
    scores = np.stack([[acc.aligned(layer, h, len(prompt))[:len(prompt)]
                        for h in range(eng.runner.num_kv_heads)]
                       for layer in range(eng.runner.num_layers)])
    eng.release(parent)
    return scores


@pytest.mark.parametrize("group", [1, 16])
def test_grouped_replay_scores_in_large_steps_equal_steps_of_the_group(tiny_model, group):
    """replay_group=N: a replay in steps of 64 queries scores every row as a replay in steps of
    N does (each row the largest sum over N aligned queries; N = 1: KVzip's maximum over single
    queries; f32), where the step's own sums over 64 do not. The context's keys are read from
    the cache once per replay."""
    prompt = _ids(201, 3)  # the replay starts off a multiple of 16: a partial first group
    eng = _engine(tiny_model, _kvzip())
    steps = _replay_scores(eng, prompt, group)
    summed = _replay_scores(eng, prompt, 64)
    grouped = _replay_scores(eng, prompt, 64, group)
    np.testing.assert_allclose(grouped, steps, rtol=1e-5, atol=1e-7)
    assert np.abs(summed - steps).max() > 0.1
    layers, heads = eng.runner.num_layers, eng.runner.num_kv_heads
    assert eng.runner.query_scorer.decoded_rows == 201 * layers * heads


@pytest.mark.parametrize("parts", [False, True])
def test_the_engine_replays_in_large_steps_as_in_steps_of_its_group(tiny_model, parts):
    """The engine's own replay (importance="kvzip") with replay_group=16 in steps of 64 keeps
    the positions and greedy tokens of the replay in steps of 16 (f32), in fewer steps, also
    part by part with prefill eviction (heads then hold different rows before each part's
    replay); KVCrush around KVzip passes the option on."""
    import dataclasses

    from kvcrush_ov.eviction.kvcrush import KVCrush
    from kvcrush_ov.eviction.kvzip import replay_group, with_replay_group

    spec = make_spec(_kvzip(prefill_eviction=parts))
    runs = []
    for chunk, group in ((16, None), (64, 16)):
        policy = with_replay_group(spec.policy, group, chunk)
        eng = LLMEngine(tiny_model, "CPU", KVCacheConfig(precision="f32"),
                        SchedulerConfig(max_num_batched_tokens=64), context_length=2048,
                        eviction=dataclasses.replace(spec, policy=policy), replay_prompt=REPEAT)
        seq = eng.add_request(_ids(300 if parts else 150, 4), GREEDY, set(), lambda x: "")
        steps, kept = 0, None
        while eng.has_unfinished():
            eng.step()
            steps += 1
            eng.check_invariants()
            if kept is None and seq.extra.get("evictions"):
                kept = _kept(eng, seq)
        runs.append((kept, list(seq.output_ids), steps))
    (kept16, out16, steps16), (kept64, out64, steps64) = runs
    assert all(np.array_equal(a, b) for ra, rb in zip(kept16, kept64, strict=True)
               for a, b in zip(ra, rb, strict=True))
    assert out64 == out16
    if parts:  # 5 parts, each replayed (68 tokens) in 5-6 steps of 16 or 2-3 of 64
        assert kept64[0][0].size < 300 and steps16 - steps64 >= 10
    else:  # the replay (positions 150 to 304) in 10 steps of 16 or 3 of 64, the rest alike
        assert steps16 - steps64 == 10 - 3
    assert replay_group(with_replay_group(KVCrush(importance=spec.policy), 16, 64)) == 16


def test_grouped_replay_scores_on_a_fastkv_engine_are_refused_by_name(tiny_model):
    """FastKV's split steps give no queries and keys: a request given a grouped KVzip spec on
    an engine built with FastKV is refused before any work, naming the field."""
    import dataclasses

    from kvcrush_ov.eviction.kvzip import with_replay_group

    eng = LLMEngine(tiny_model, "CPU", KVCacheConfig(precision="f32"),
                    SchedulerConfig(max_num_batched_tokens=64), context_length=2048,
                    eviction=make_spec(CacheEvictionConfig(importance="snapkv",
                                                           fastkv=FastKVConfig())),
                    replay_prompt=REPEAT)
    seq = eng.add_request(_ids(100, 5), GREEDY, set(), lambda x: "")
    spec = make_spec(_kvzip())
    grouped = dataclasses.replace(spec, policy=with_replay_group(spec.policy, 16, 64))
    with pytest.raises(ConfigError, match="eviction.policy") as err:
        eng.set_spec(seq, grouped)
    assert "replay_group=None with fastkv" in str(err.value)
    assert eng.runner.query_key_request is None and seq.num_computed == 0
