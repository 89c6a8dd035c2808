"""FastKV's token-selective propagation: the graph cut, the engine's split prefill, the config.

Graph: the front part's ``hidden_states`` equals the unsplit model's residual stream after the
split layer, and the back part fed with it gives the unsplit model's logits. Engine (tiny model,
f32 so that the cut adds no rounding): with every token propagated the greedy output equals the
run without FastKV; with a real rate the back layers hold exactly the propagated positions
(sinks, recent window and the ranked tokens), the total budget stays exact, decode positions
continue after the full prompt, and batching with ordinary sequences, forks and every cache
precision work.
"""

from __future__ import annotations

import math

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from conftest import refuses_bf16_here
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
from kvcrush_ov.eviction.fastkv import tsp_positions
from kvcrush_ov.transformations.fastkv import (
    HIDDEN,
    FastKVPatternError,
    residual_stream,
    split_at_layer,
)
from kvcrush_ov.transformations.paged import read_paged_model

F32 = {"KV_CACHE_PRECISION": "f32", "INFERENCE_PRECISION_HINT": "f32"}
GREEDY = GenerationConfig(max_new_tokens=12, ignore_eos=True)


# -- the graph cut ----------------------------------------------------------------------------

class _Part:
    """A compiled paged model with zeroed caches for every layer it has."""

    def __init__(self, model: ov.Model, caches: dict[str, ov.Tensor], num_blocks: int) -> None:
        self.compiled = ov.Core().compile_model(model, "CPU", F32)
        self.request = self.compiled.create_infer_request()
        self.names = {i.get_any_name() for i in self.compiled.inputs}
        for name in sorted(n for n in self.names if "_cache." in n):
            if name not in caches:
                port = self.compiled.input(name)
                dims = [num_blocks] + [d.get_length() for d in list(port.get_partial_shape())[1:]]
                caches[name] = ov.Tensor(port.get_element_type(), ov.Shape(dims))
                caches[name].data[...] = 0
            self.request.set_tensor(name, caches[name])

    def run(self, **inputs: np.ndarray) -> ov.InferRequest:
        for name, value in inputs.items():
            if name in self.names:
                self.request.set_tensor(name, ov.Tensor(np.array(value, copy=True)))
        self.request.infer()
        return self.request


def _prefill_inputs(n: int, blocks: int, seed: int = 0) -> dict[str, np.ndarray]:
    i32 = np.int32
    return {"input_ids": np.random.default_rng(seed).integers(3, 500, n).astype(np.int64),
            "position_ids": np.arange(n, dtype=np.int64), "past_lens": np.array([0], i32),
            "subsequence_begins": np.array([0, n], i32),
            "block_indices": np.arange(blocks, dtype=i32),
            "block_indices_begins": np.array([0, blocks], i32),
            "max_context_len": np.array(n, i32),
            "logits_indices": np.arange(n, dtype=np.int64)}


@pytest.mark.parametrize("split_layer", [0, 1, 2])
def test_front_hidden_and_back_logits_equal_the_unsplit_model(tiny_model, split_layer):
    n, blocks = 70, 3
    whole = read_paged_model(tiny_model, score_outputs=False, logits_indices=True)
    probe = whole.clone()  # the unsplit model with its residual stream after the split layer
    h = residual_stream(probe)[2 * split_layer + 2]
    probe.add_results([ops.result(h)])
    front, back = split_at_layer(whole, split_layer)
    assert HIDDEN not in {i.get_any_name() for i in front.inputs}
    assert HIDDEN in {i.get_any_name() for i in back.inputs}
    assert "logits" not in {o.get_any_name() for o in front.outputs}
    inputs = _prefill_inputs(n, blocks)
    ref = _Part(probe, {}, blocks).run(**inputs)
    ref_logits = np.array(ref.get_tensor("logits").data)
    ref_hidden = np.array(ref.get_output_tensor(len(probe.outputs) - 1).data)
    caches: dict[str, ov.Tensor] = {}
    hidden = np.array(_Part(front, caches, blocks).run(**inputs).get_tensor(HIDDEN).data)
    np.testing.assert_allclose(hidden, ref_hidden, rtol=1e-5, atol=1e-5)
    logits = _Part(back, caches, blocks).run(**inputs, hidden_states=hidden).get_tensor("logits")
    np.testing.assert_allclose(np.array(logits.data), ref_logits, rtol=1e-4, atol=1e-4)


def test_split_layer_range_and_pattern_errors(tiny_model):
    whole = read_paged_model(tiny_model, score_outputs=False, logits_indices=True)
    for bad in (-1, 3):  # tiny-random-llama has 4 layers: the back part needs one
        with pytest.raises(ValueError, match="split_layer"):
            split_at_layer(whole, bad)
    params = [ops.parameter([-1], np.int64), ops.parameter([-1], np.float32),
              ops.parameter([-1], np.float32)]
    for p, name in zip(params, ("input_ids", "key_cache.0", "key_cache.1"), strict=True):
        p.set_friendly_name(name)
    out = ops.add(ops.add(ops.convert(params[0], np.float32), params[1]), params[2])
    with pytest.raises(FastKVPatternError, match="embedding"):  # two layers, no decoder layers
        split_at_layer(ov.Model([ops.result(out)], params), 0)


def test_tsp_positions_hand_case():
    scores = np.zeros(20, np.float32)
    scores[7], scores[12] = 5.0, 3.0
    # sinks 0-1, recent 17-19; kernel 3 spreads 7 -> 6..8 and 12 -> 11..13; 4 ranked places:
    # 6, 7, 8 (pooled 5) then 11 (the earliest of the pooled 3s)
    got = tsp_positions(scores, 4, start_size=2, recent_size=3, kernel=3)
    assert got.tolist() == [0, 1, 6, 7, 8, 11, 17, 18, 19]
    assert tsp_positions(scores, 100, 2, 3, 3).tolist() == list(range(20))
    assert tsp_positions(scores[:4], 1, 2, 3, 3).tolist() == [0, 1, 2, 3]  # nothing to rank


# -- the engine ---------------------------------------------------------------------------------

def _spec(rate: float | None, budget: int | float = 0.5, **kw):
    return make_spec(CacheEvictionConfig(
        max_cache_size=budget, start_size=8, recent_size=16, kvcrush=None,
        fastkv=None if rate is None else FastKVConfig(tsp_rate=rate, **kw)))


def _engine(model, eviction, precision="f32", num_kv_blocks=0, mnbt=64) -> LLMEngine:
    return LLMEngine(model, "CPU", KVCacheConfig(precision=precision, num_kv_blocks=num_kv_blocks),
                     SchedulerConfig(max_num_batched_tokens=mnbt), context_length=2048,
                     eviction=eviction)


def _ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


def _run(eng: LLMEngine, prompts, on_step=None, cfg=GREEDY):
    seqs = [eng.add_request(p, cfg, set(), lambda x: "") for p in prompts]
    steps = 0
    eng.preemptions = 0
    while eng.has_unfinished():
        eng.preemptions += eng.step().num_preempted
        eng.check_invariants()
        if on_step is not None:
            on_step(eng, seqs)
        steps += 1
        assert steps < 3000, "no progress"
    assert all(p.num_used == 0 for p in eng.kv.pools), "blocks leaked"
    assert not eng.kv.splits, "split plans left behind"
    return [list(s.output_ids) for s in seqs], seqs


def test_every_token_propagated_equals_no_fastkv(tiny_model):
    prompts = [_ids(n, s) for s, n in enumerate((300, 45, 190, 20))]  # chunked by 64
    ref, _ = _run(_engine(tiny_model, _spec(None)), prompts)
    got, seqs = _run(_engine(tiny_model, _spec(1.0)), prompts)
    assert got == ref
    split = [s.extra["fastkv"] for s in seqs]
    assert [f["split"] for f in split] == [True, True, True, False]  # 20 <= sinks + recent
    assert all(f["back_tokens"] == f["prompt_tokens"] for f in split)


def test_propagated_positions_budget_and_decode_positions(tiny_model):
    rate, p = 0.2, 400
    spec = _spec(rate, budget=0.25)
    eng = _engine(tiny_model, spec)
    k = 8 + 16 + math.ceil(rate * p)
    seen = {}

    def check(eng, seqs):
        seq = seqs[0]
        t = eng.kv.tables.get(seq.seq_id)
        if t is None or seq.num_computed < p:
            return
        back = [t.positions_of(layer, h) for layer in range(2, 4) for h in range(2)]
        if "prompt" not in seen:  # right after the prompt (and its eviction)
            seen["prompt"] = [np.sort(b) for b in back]
            seen["front"] = int(t.lens[:2].sum())
            seen["total"] = int(t.lens.sum())
        seen["last"] = [np.sort(b) for b in back]

    _, seqs = _run(eng, [_ids(p, 7), _ids(90, 8)], on_step=check)
    info = seqs[0].extra["fastkv"]
    assert info["split"] and info["back_tokens"] == k and info["split_layer"] == 1
    budget = spec.budget(p)
    assert seen["total"] == budget * 4 * 2  # exact in total (back layers hold fewer: k < budget)
    for b in seen["prompt"]:
        assert len(b) == min(k, budget)
        assert set(range(8)) <= set(b.tolist())  # the sinks
        assert set(range(p - 16, p)) <= set(b.tolist())  # the recent window
    # decode appends positions p, p + 1, ... to every layer (continuous mode evicts later)
    assert any(set(range(p, p + 4)) <= set(b.tolist()) for b in seen["last"])


@pytest.mark.parametrize("precision", ["u8", "u4", "bf16", "f32"])
def test_every_precision_and_a_fork(tiny_model, precision):
    if precision == "bf16" and refuses_bf16_here(lambda: _engine(tiny_model, None, "bf16")):
        pytest.skip("no bf16 KV cache on this CPU")
    eng = _engine(tiny_model, _spec(0.3), precision=precision)
    seqs = [eng.add_request(_ids(n, n), GREEDY, set(), lambda x: "") for n in (260, 130)]
    forked = None
    while eng.has_unfinished():
        eng.step()
        eng.check_invariants()
        s = seqs[0]
        if forked is None and s.num_computed >= 260 and not s.is_finished:
            forked = eng.fork(s)
    assert forked is not None and len(forked.output_ids) == GREEDY.max_new_tokens
    assert all(len(s.output_ids) == GREEDY.max_new_tokens for s in seqs)
    assert all(p.num_used == 0 for p in eng.kv.pools)


def test_preempted_split_prefill_recomputes(tiny_model):
    """A sequence preempted in the middle of its split prefill (the scheduler's own preemption,
    as when a running sequence needs its blocks) recomputes from scratch, same output."""
    prompts = [_ids(600, s) for s in range(2)]
    ref, _ = _run(_engine(tiny_model, _spec(0.3)), prompts)
    eng = _engine(tiny_model, _spec(0.3))
    done = []

    def preempt_once(eng, seqs):
        s = seqs[0]
        if not done and 0 < s.num_computed < 600:
            eng.scheduler._preempt(s)
            done.append(s.num_computed)

    got, _ = _run(eng, prompts, on_step=preempt_once)
    assert done and got == ref


# -- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "field"), [
    ({"split_layer": -1}, "fastkv.split_layer"),
    ({"split_layer": 1.5}, "fastkv.split_layer"),
    ({"tsp_rate": 0.0}, "fastkv.tsp_rate"),
    ({"tsp_rate": 1.5}, "fastkv.tsp_rate"),
    ({"tsp_rate": float("nan")}, "fastkv.tsp_rate"),
    ({"kernel": 4}, "fastkv.kernel"),
    ({"kernel": 0}, "fastkv.kernel"),
    ({"pooling": "median"}, "fastkv.pooling"),
])
def test_bad_fastkv_config_is_named(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        FastKVConfig(**kwargs)


def test_fastkv_needs_a_window_policy_and_the_native_backend(tiny_model):
    with pytest.raises(ConfigError, match="eviction.importance"):
        CacheEvictionConfig(importance="h2o", fastkv=FastKVConfig())
    with pytest.raises(ConfigError, match="eviction.fastkv"):
        CacheEvictionConfig(fastkv=0.2)
    with pytest.raises(ConfigError, match="eviction.fastkv"):
        Pipeline(tiny_model, eviction=CacheEvictionConfig(fastkv=FastKVConfig()),
                 backend="genai")
    with pytest.raises(ConfigError, match=r"fastkv\.split_layer.*\[0, 2\]"):  # 4 layers
        Pipeline(tiny_model, eviction=CacheEvictionConfig(fastkv=FastKVConfig(split_layer=3)))
