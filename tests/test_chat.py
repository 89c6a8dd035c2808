"""Chat sessions on a compressed cache: ``Pipeline.start_chat`` / ``finish_chat`` and the
engine's ``continue_request``.

A parked session keeps its KV cache (as eviction left it) between turns; a turn computes only
the tokens after the longest prefix the cache holds (engine counters), forgets cached positions
past a divergence, and gives the same greedy tokens as a fresh run over the same cache (without
eviction: as a fresh run of the whole conversation). Parked caches are given up first when
memory runs short, and the next turn then recomputes.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvcrush_ov import (
    CacheEvictionConfig,
    ConfigError,
    GenerationConfig,
    KVCacheConfig,
    Pipeline,
    SchedulerConfig,
)
from kvcrush_ov.engine.engine import LLMEngine
from kvcrush_ov.errors import ChatError
from kvcrush_ov.eviction.factory import make_spec

GREEDY = GenerationConfig(max_new_tokens=8, ignore_eos=True)


def _cfg(budget) -> CacheEvictionConfig:
    return CacheEvictionConfig(max_cache_size=budget, start_size=8, recent_size=16,
                               importance="snapkv", kvcrush=None)


def _engine(model, cfg: CacheEvictionConfig | None, num_kv_blocks: int = 0) -> LLMEngine:
    return LLMEngine(model, "CPU", KVCacheConfig(precision="f32", num_kv_blocks=num_kv_blocks),
                     SchedulerConfig(max_num_batched_tokens=64), context_length=2048,
                     eviction=None if cfg is None else make_spec(cfg))


def _ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


def _drain(eng: LLMEngine) -> None:
    while eng.has_unfinished():
        eng.step()
        eng.check_invariants()


def _fresh(eng: LLMEngine, ids: list[int]) -> list[int]:
    seq = eng.add_request(ids, GREEDY, set(), lambda x: "")
    _drain(eng)
    return list(seq.output_ids)


def _turn(eng: LLMEngine, session, ids: list[int], branch: bool = False):
    seq = eng.continue_request(session, ids, GREEDY, set(), lambda x: "", branch=branch,
                               keep_cache=not branch)
    _drain(eng)
    return seq


@pytest.mark.parametrize("budget", [None, 10**5], ids=["plain", "per-head"])
def test_a_turn_computes_only_new_tokens_and_equals_a_fresh_run(tiny_model, budget):
    """Without eviction (plain graph, or a budget above everything) the second turn's tokens
    equal a fresh run of the whole conversation, and only its new tokens are computed."""
    eng = _engine(tiny_model, None if budget is None else _cfg(budget))
    p1, p2 = _ids(200, 1), _ids(30, 2)
    s = eng.add_request(p1, GREEDY, set(), lambda x: "", keep_cache=True)
    _drain(eng)
    assert eng.scheduler.parked == [s] and s.num_computed == 200 + 8 - 1
    conversation = p1 + list(s.output_ids) + p2
    before = eng.stats.tokens
    s2 = _turn(eng, s, conversation)
    assert s2 is s and s.extra["cached_tokens"] == 207
    # the turn ran its 31 new tokens (the last answer token + p2) and 7 decode steps
    assert eng.stats.tokens - before == len(conversation) - 207 + 7
    got = list(s.output_ids)
    eng.release(s)
    assert eng.kv.tables == {}
    assert got == _fresh(eng, conversation)


def test_a_diverging_turn_forgets_the_cached_positions_after_the_divergence(tiny_model):
    for budget in (None, 10**5):
        eng = _engine(tiny_model, None if budget is None else _cfg(budget))
        p1 = _ids(150, 3)
        s = eng.add_request(p1, GREEDY, set(), lambda x: "", keep_cache=True)
        _drain(eng)
        rewritten = p1[:90] + _ids(40, 4)  # the conversation changed at position 90
        _turn(eng, s, rewritten)
        assert s.extra["cached_tokens"] == 90
        table = eng.kv.tables[s.seq_id]
        if budget is not None:
            assert table.num_written == len(rewritten) + 7
            assert all(len(np.unique(p)) == len(p) for row in table.positions_all() for p in row)
        got = list(s.output_ids)
        eng.release(s)
        assert got == _fresh(eng, rewritten), budget


def test_compressed_session_turns_and_branches(tiny_model):
    """With eviction the second turn continues the compressed cache (held <= budget after the
    prompt), and asking the same question on a branch (a fork sharing the parked cache) gives
    the same tokens; branches leave the session untouched and free their blocks."""
    eng = _engine(tiny_model, _cfg(0.25))
    p1 = _ids(400, 5)
    s = eng.add_request(p1, GREEDY, set(), lambda x: "", keep_cache=True)
    _drain(eng)
    t = eng.kv.tables[s.seq_id]
    assert s.extra["evictions"] == 1 and t.lens.max() <= 100 + 8
    conversation = p1 + list(s.output_ids) + _ids(60, 6)
    used = [p.num_used for p in eng.kv.pools]
    branches = [_turn(eng, s, conversation, branch=True) for _ in range(2)]
    assert [p.num_used for p in eng.kv.pools] == used  # branches freed, the session as it was
    assert branches[0].output_ids == branches[1].output_ids
    before = eng.stats.tokens
    _turn(eng, s, conversation)
    assert list(s.output_ids) == list(branches[0].output_ids)
    assert eng.stats.tokens - before == 61 + 7  # the document was not recomputed
    # the new budget follows the longer conversation: 25% of it after this turn's prompt
    assert s.extra["budget"] == len(conversation) // 4
    assert eng.kv.tables[s.seq_id].lens.max() <= len(conversation) // 4 + 8


def test_memory_pressure_drops_a_parked_cache_and_the_next_turn_recomputes(tiny_model):
    eng = _engine(tiny_model, None, num_kv_blocks=13)  # 13 blocks of 32 tokens = 416 tokens
    assert eng.block_size == 32
    p1 = _ids(200, 7)
    s = eng.add_request(p1, GREEDY, set(), lambda x: "", keep_cache=True)
    _drain(eng)
    other = _ids(300, 8)  # needs more than what the parked session leaves free
    assert _fresh(eng, other)
    assert eng.scheduler.num_dropped_sessions == 1 and s.seq_id not in eng.kv.tables
    conversation = p1 + list(s.output_ids) + _ids(20, 9)
    _turn(eng, s, conversation)
    assert s.extra["cached_tokens"] == 0  # recomputed: same tokens as a fresh run
    got = list(s.output_ids)
    eng.release(s)
    assert got == _fresh(eng, conversation)


def test_a_released_or_running_sequence_cannot_continue(tiny_model):
    eng = _engine(tiny_model, None)
    s = eng.add_request(_ids(40, 1), GREEDY, set(), lambda x: "")
    with pytest.raises(ValueError, match="keep_cache"):
        eng.continue_request(s, _ids(50, 2), GREEDY, set(), lambda x: "")
    _drain(eng)  # finished without keep_cache: its cache is gone
    with pytest.raises(ValueError, match="keep_cache"):
        eng.continue_request(s, _ids(50, 2), GREEDY, set(), lambda x: "")


# -- Pipeline.start_chat / finish_chat ------------------------------------------------------

def test_pipeline_chat_misuse_is_named(tiny_model):
    pipe = Pipeline(tiny_model, kv_cache=KVCacheConfig(precision="f32"))
    with pytest.raises(ChatError, match=r"finish_chat\(\): no chat is open"):
        pipe.finish_chat()
    with pytest.raises(ConfigError, match="system_message"):
        pipe.start_chat(system_message=3)
    up = Pipeline(tiny_model, eviction=CacheEvictionConfig(max_cache_size=0.5,
                                                           importance="upstream", kvcrush=None))
    with pytest.raises(ConfigError, match="eviction.importance"):
        up.start_chat()


def test_pipeline_chat_turns_reuse_the_cache(tiny_model):
    pipe = Pipeline(tiny_model, kv_cache=KVCacheConfig(precision="f32"),
                    eviction=CacheEvictionConfig(max_cache_size=0.5, start_size=8,
                                                 recent_size=16))
    g = GenerationConfig(max_new_tokens=6, ignore_eos=True, apply_chat_template=False)
    pipe.start_chat()
    r1 = pipe.generate(" ".join(["alpha beta gamma"] * 60), g)
    r2 = pipe.generate(" delta epsilon", g)
    assert r1.metrics[0].num_cached_tokens == 0 and r1.metrics[0].num_evictions == 1
    m = r2.metrics[0]
    # the random model's answer may re-tokenize differently where it meets the prompt
    assert m.num_cached_tokens >= r1.metrics[0].num_input_tokens - 4
    assert m.num_input_tokens - m.num_cached_tokens < 24
    hist = pipe.chat_history
    assert [h["role"] for h in hist] == ["user", "assistant"] * 2
    br = pipe.generate([" one", " two"], g)
    assert len(br.texts) == 2 and pipe.chat_history == hist  # branches leave it as it was
    stop = []
    pipe.generate(" zeta", g, streamer=lambda t: stop.append(t) or True)  # cut short
    r4 = pipe.generate(" eta", g)
    assert r4.metrics[0].num_cached_tokens > m.num_input_tokens  # the cut turn's cache kept
    eng = pipe.backend.engine
    assert len(eng.scheduler.parked) == 1
    pipe.finish_chat()
    assert eng.kv.tables == {} and pipe.chat_history == []
    assert pipe.generate("plain again", g).metrics[0].num_cached_tokens == 0


def test_genai_backend_chat_recomputes_the_conversation(tiny_model):
    pipe = Pipeline(tiny_model, backend="genai", eviction=None)
    g = GenerationConfig(max_new_tokens=4, apply_chat_template=False)
    pipe.start_chat("system text.")
    pipe.generate(" first", g)
    r = pipe.generate(" second", g)
    assert r.metrics[0].num_cached_tokens == 0 and len(pipe.chat_history) == 5
    pipe.finish_chat()


@pytest.mark.real_model
def test_smollm2_second_turn_equals_the_whole_conversation_run_fresh(smollm2_fp16):
    """With the real chat template: the second turn reuses the first turn's cache and, without
    eviction (f32), answers as a fresh run of the rendered conversation does."""
    from kvcrush_ov.chat import conversation_ids
    from kvcrush_ov.data import essays

    doc = " ".join(" ".join(essays().values()).split()[:300])
    pipe = Pipeline(smollm2_fp16, kv_cache=KVCacheConfig(precision="f32"), eviction=None)
    g = GenerationConfig(max_new_tokens=16)
    pipe.start_chat("You are a helpful assistant.")
    pipe.generate(doc + "\n\nWhat is this text about?", g)
    r2 = pipe.generate("Give it a title.", g)
    hist = pipe.chat_history
    pipe.finish_chat()
    m = r2.metrics[0]
    assert m.num_input_tokens - m.num_cached_tokens < 20
    ids = conversation_ids(pipe.tokenizer, hist[:-1], True)
    assert len(ids) == m.num_input_tokens
    text = pipe.tokenizer.decode(ids, skip_special_tokens=False)
    fresh = pipe.generate(text, g, apply_chat_template=False)
    assert fresh.metrics[0].num_input_tokens == len(ids)
    assert fresh.texts[0] == r2.texts[0]


# -- the query-agnostic protocol: compress the context, then ask ----------------------------

def test_a_branch_evicts_the_context_before_its_question_and_nothing_after(tiny_model):
    """continue_request(branch, eviction=spec, evict_turn=False): the context is compressed
    exactly as a request of the context alone would be (the question has no say), and the
    question and answer are all kept."""
    spec = make_spec(_cfg(0.25))
    ctx, question = _ids(320, 11), _ids(24, 12)
    eng = _engine(tiny_model, _cfg(10**9))
    alone = eng.add_request(ctx, GenerationConfig(max_new_tokens=1), set(), lambda x: "",
                            keep_cache=True)
    eng.set_spec(alone, spec)
    _drain(eng)
    want = [[np.sort(p) for p in row] for row in eng.kv.tables[alone.seq_id].positions_all()]
    eng.release(alone)
    parent = eng.add_request(ctx, GenerationConfig(max_new_tokens=1), set(), lambda x: "",
                             keep_cache=True)
    _drain(eng)  # the parent keeps everything (budget 10**9)
    branch = eng.continue_request(parent, ctx + question, GREEDY, set(), lambda x: "",
                                  branch=True, keep_cache=False, eviction=spec,
                                  evict_turn=False)
    got = [[np.sort(p) for p in row] for row in eng.kv.tables[branch.seq_id].positions_all()]
    assert all(np.array_equal(a, b) for ra, rb in zip(want, got, strict=True)
               for a, b in zip(ra, rb, strict=True))
    assert branch.extra["evictions"] == 1 and branch.extra["budget"] == 80
    eng.step()
    eng.check_invariants()
    while eng.has_unfinished():
        eng.step()
    t = eng.kv.tables  # the branch is gone; the parent holds its whole context
    assert int(t[parent.seq_id].lens.min()) == 320
    assert branch.extra["evictions"] == 1 and branch.sampler.num_generated == 8


def test_kvzip_replay_scores_the_context_and_leaves_no_replay_in_the_cache(tiny_model):
    from kvcrush_ov.eval.runner import _replay
    from kvcrush_ov.eviction.kvzip import REPLAY_CHUNK

    eng = _engine(tiny_model, _cfg(10**9))
    ctx = _ids(200, 13)
    parent = eng.add_request(ctx, GenerationConfig(max_new_tokens=1), set(), lambda x: "",
                             keep_cache=True)
    _drain(eng)
    steps = eng.stats.tokens
    _replay(eng, parent, ctx, [7, 8, 9], set(), lambda x: "")
    assert eng.stats.tokens - steps == 3 + 200  # the repeat prompt and the context again
    scores = parent.extra["scores"]
    assert scores.reduce == "max" and "max_chunk" not in parent.extra
    assert len(scores.acc[0][0]) == 200 + 3 + 200 and scores.acc[0][0][:200].min() > 0
    kv = make_spec(CacheEvictionConfig(max_cache_size=0.25, importance="kvzip", kvcrush=None,
                                       start_size=8, recent_size=16))
    branch = eng.continue_request(parent, ctx + [5, 6], GREEDY, set(), lambda x: "",
                                  branch=True, keep_cache=False, eviction=kv, evict_turn=False)
    t = eng.kv.tables[branch.seq_id]
    assert t.num_written == 200 and int(t.lens.sum()) == 50 * t.lens.size  # 25% kept
    assert max(int(p.max()) for row in t.positions_all() for p in row) < 200
    _drain(eng)
    assert REPLAY_CHUNK <= 32
