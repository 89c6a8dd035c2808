"""``to_per_head`` versus the plain paged model, run on CPU.

Both models get the same steps: a prefill of two sequences (20 and 45 tokens) in one step, then
decode steps of one token per sequence (teacher-forced with the plain model's argmax). The plain
model uses caches [NB, Hkv, rows, cols] and shared block tables; the per-head model uses pools
[NB*Hkv, 1, rows, cols] per layer and tables per (layer, sequence, head) built by
``PerHeadLayout``; logical block ``b`` of head ``h`` maps to a physical block chosen by the test.
Logits must match and per-head scores summed over heads must equal the plain ``scores.L``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from openvino._offline_transformations import paged_attention_transformation

from kvcrush_ov.transformations.logits import add_logits_indices
from kvcrush_ov.transformations.paged import read_paged_model
from kvcrush_ov.transformations.per_head import (
    HEAD_SUBSEQUENCE_BEGINS,
    PerHeadLayout,
    PerHeadPatternError,
    block_indices_begins_name,
    block_indices_name,
    head_past_lens_name,
    to_per_head,
)

F32 = {"KV_CACHE_PRECISION": "f32", "INFERENCE_PRECISION_HINT": "f32"}
U8_F32 = {"KV_CACHE_PRECISION": "u8", "INFERENCE_PRECISION_HINT": "f32"}
LENGTHS = (20, 45)
NUM_BLOCKS = 6  # logical blocks per head in the plain cache
# Physical block of (layer, logical block, head) in the per-head pool.
Mapping = Callable[[int, int, int], int]


def _num_layers(compiled: ov.CompiledModel) -> int:
    return sum(1 for i in compiled.inputs if i.get_any_name().startswith("key_cache."))


class Runner:
    """A compiled model with zero-filled caches of ``num_blocks`` blocks (kept alive here)."""

    def __init__(self, core: ov.Core, model: ov.Model, num_blocks: int, props: dict) -> None:
        self.model = model
        self.compiled = core.compile_model(model, "CPU", props)
        self.request = self.compiled.create_infer_request()
        self.num_layers = _num_layers(self.compiled)
        self.caches: dict[str, ov.Tensor] = {}
        for layer in range(self.num_layers):
            for kind in ("key_cache", "value_cache"):
                name = f"{kind}.{layer}"
                port = self.compiled.input(name)
                dims = [num_blocks] + [d.get_length() for d in list(port.get_partial_shape())[1:]]
                tensor = ov.Tensor(port.get_element_type(), ov.Shape(dims))
                tensor.data[...] = 0
                self.caches[name] = tensor
                self.request.set_tensor(name, tensor)
        value_shape = self.caches["value_cache.0"].get_shape()
        self.cache_heads, self.block_size = value_shape[1], value_shape[2]
        self.vocab = self.compiled.output("logits").get_partial_shape()[2].get_length()

    def infer(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run; return logits [N, V] and ``scores.L`` per layer (copies)."""
        for name, value in inputs.items():
            self.request.set_tensor(name, ov.Tensor(np.array(value, order="C")))
        self.request.infer()
        logits = np.array(self.request.get_tensor("logits").data, copy=True)
        scores = [np.array(self.request.get_tensor(f"scores.{i}").data, copy=True)
                  for i in range(self.num_layers)]
        return logits.reshape(len(logits), -1), scores


def query_group(model: ov.Model) -> int:
    """G = query heads per KV head, from the plain model's first PagedAttention op."""
    pa = next(n for n in model.get_ordered_ops() if n.get_type_name() == "PagedAttentionExtension")
    rt = pa.get_rt_info()
    kv_width = int(rt["num_k_heads"].astype(int)) * int(rt["k_head_size"].astype(int))
    return pa.input_value(0).get_partial_shape()[1].get_length() // kv_width


def _common(ids: list[np.ndarray], past: list[int]) -> dict[str, np.ndarray]:
    pos = [np.arange(p, p + len(x), dtype=np.int64) for x, p in zip(ids, past, strict=True)]
    ends = np.cumsum([len(x) for x in ids])
    return {
        "input_ids": np.concatenate(ids).astype(np.int64),
        "position_ids": np.concatenate(pos),
        "logits_indices": (ends - 1).astype(np.int64),
    }


def _logical_tables(past: list[int], counts: list[int], block_size: int) -> list[list[int]]:
    """Plain block tables: sequence 0 -> [0..], sequence 1 after it (disjoint, increasing)."""
    tables, start = [], 0
    for p, n in zip(past, counts, strict=True):
        need = -(-(p + n) // block_size)
        tables.append(list(range(start, start + need)))
        start += -(-(max(LENGTHS) + 8) // block_size)
    return tables


def plain_inputs(plain: Runner, ids: list[np.ndarray], past: list[int]) -> dict[str, np.ndarray]:
    counts = [len(x) for x in ids]
    tables = _logical_tables(past, counts, plain.block_size)
    flat = [b for t in tables for b in t]
    assert max(flat) < NUM_BLOCKS
    return {
        **_common(ids, past),
        "past_lens": np.asarray(past, dtype=np.int32),
        "subsequence_begins": np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
        "block_indices": np.asarray(flat, dtype=np.int32),
        "block_indices_begins": np.concatenate(
            [[0], np.cumsum([len(t) for t in tables])]).astype(np.int32),
        "max_context_len": np.asarray(max(p + n for p, n in zip(past, counts, strict=True)),
                                      dtype=np.int32),
    }


def head_inputs(
    layout: PerHeadLayout, block_size: int, ids: list[np.ndarray], past: list[int],
    mapping: Mapping,
) -> dict[str, np.ndarray]:
    counts = [len(x) for x in ids]
    logical = _logical_tables(past, counts, block_size)
    tables = [[[[mapping(layer, b, h) for b in t] for h in range(layout.num_kv_heads)]
               for t in logical] for layer in range(layout.num_layers)]
    return {**_common(ids, past), **layout.inputs(counts, past, tables)}


def same_memory(hkv: int) -> Mapping:
    """Block b of head h -> b*Hkv + h: the per-head pool aliases the plain cache layout."""
    return lambda layer, b, h: b * hkv + h


def scrambled(hkv: int, num_layers: int, seed: int) -> Mapping:
    """A different random permutation of the pool in every layer (heads get unrelated blocks)."""
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(NUM_BLOCKS * hkv) for _ in range(num_layers)]
    return lambda layer, b, h: int(perms[layer][b * hkv + h])


def _greedy(logits: np.ndarray) -> list[np.ndarray]:
    return [np.asarray([t], dtype=np.int64) for t in logits.argmax(axis=1)]


def compare(
    plain: Runner, head: Runner, layout: PerHeadLayout, mappings: list[Mapping],
    logits_tol: float, score_rtol: float, score_atol: float,
    between_steps: Callable[[int], None] | None = None,
    window: tuple[int, ...] | None = None,
    sum_rtol: float = 1e-4,
    decode: tuple[Runner, PerHeadLayout] | None = None,
) -> dict[str, float]:
    """Prefill + len(mappings)-1 decode steps; mappings[i] is the per-head mapping of step i.

    ``window``: per-sequence score aggregation window (models converted with aggregation).
    ``decode``: another per-head runner (sharing ``head``'s caches) for the decode steps.
    """
    rng = np.random.default_rng(7)
    ids = [rng.integers(0, plain.vocab, size=n, dtype=np.int64) for n in LENGTHS]
    past = [0, 0]
    worst = {"logits": 0.0, "scores": 0.0}
    group = query_group(plain.model)
    for step, mapping in enumerate(mappings):
        if between_steps is not None and step > 0:
            between_steps(step)
        counts = [len(x) for x in ids]
        queries = [1] * len(ids) if window is None else [
            min(w, n) for w, n in zip(window, counts, strict=True)]
        extra = {} if window is None else {
            "score_aggregation_window": np.asarray(queries, dtype=np.int32)}
        ref_logits, ref_scores = plain.infer({**plain_inputs(plain, ids, past), **extra})
        runner, lay = decode if decode is not None and step > 0 else (head, layout)
        got_logits, got_scores = runner.infer({**head_inputs(lay, head.block_size, ids, past,
                                                             mapping), **extra})
        assert got_logits.shape == ref_logits.shape == (2, plain.vocab)
        assert np.isfinite(got_logits).all()
        np.testing.assert_allclose(got_logits, ref_logits, rtol=logits_tol, atol=logits_tol,
                                   err_msg=f"logits, step {step}")
        worst["logits"] = max(worst["logits"], float(np.abs(got_logits - ref_logits).max()))
        ctx = lay.context_lens(counts, past)
        for layer in range(layout.num_layers):
            assert got_scores[layer].shape == (int(ctx[layer].sum()),)
            parts = lay.split_scores(got_scores[layer], ctx[layer])
            summed = np.concatenate([np.sum(seg, axis=0) for seg in parts])
            assert summed.shape == ref_scores[layer].shape
            np.testing.assert_allclose(summed, ref_scores[layer], rtol=score_rtol,
                                       atol=score_atol, err_msg=f"scores.{layer}, step {step}")
            worst["scores"] = max(worst["scores"], float(
                np.max(np.abs(summed - ref_scores[layer]) / np.maximum(ref_scores[layer], 1e-6))))
            # Without score aggregation the scores are those of the last query of each
            # sequence: a head segment sums to G (its query heads' probabilities), the plain
            # segment to Hq; with a window of W queries to G*W. Heads must really differ.
            for s, q in enumerate(queries):
                for h in range(layout.num_kv_heads):
                    assert parts[s][h].sum() == pytest.approx(group * q, rel=sum_rtol)
            assert not np.allclose(parts[1][0], parts[1][1], rtol=1e-3, atol=1e-6)
        past = [p + n for p, n in zip(past, counts, strict=True)]
        ids = _greedy(ref_logits)
    return worst


def _read_with_aggregation(folder: Path) -> ov.Model:
    """Paged model with score outputs AND the score_aggregation_window [B] input."""
    model = ov.Core().read_model(folder / "openvino_model.xml")
    paged_attention_transformation(model, False, True, True, False, False, False, False)
    return add_logits_indices(model)


def make_runners(
    folder: Path, props: dict, extra_blocks: int = 0, aggregation: bool = False
) -> tuple[Runner, Runner, PerHeadLayout]:
    core = ov.Core()
    read = _read_with_aggregation if aggregation else read_paged_model
    plain = Runner(core, read(folder), NUM_BLOCKS, props)
    model = to_per_head(read(folder))
    layout = PerHeadLayout.from_model(model)
    head = Runner(core, model, NUM_BLOCKS * layout.num_kv_heads + extra_blocks, props)
    assert head.cache_heads == 1
    assert plain.cache_heads == layout.num_kv_heads
    assert layout.num_layers == plain.num_layers
    k_plain = plain.caches["key_cache.0"].get_shape()
    k_head = head.caches["key_cache.0"].get_shape()
    assert list(k_plain)[2:] == list(k_head)[2:]
    return plain, head, layout


# ---------------------------------------------------------------- graph


def test_inputs_and_rt_info(tiny_model: Path) -> None:
    model = to_per_head(read_paged_model(tiny_model))
    names = {n for i in model.inputs for n in i.get_names()}
    layout = PerHeadLayout.from_model(model)
    assert layout.num_kv_heads == 2 and layout.num_layers == 4  # tiny-random-llama
    assert HEAD_SUBSEQUENCE_BEGINS in names and "max_context_len" in names
    for layer in range(layout.num_layers):
        for name in (head_past_lens_name(layer), block_indices_name(layer),
                     block_indices_begins_name(layer), f"key_cache.{layer}"):
            assert name in names, name
    for old in ("past_lens", "subsequence_begins", "block_indices", "block_indices_begins"):
        assert old not in names  # nothing else consumes them in this export
    pas = [n for n in model.get_ordered_ops() if n.get_type_name() == "PagedAttentionExtension"]
    assert len(pas) == layout.num_layers
    for pa in pas:
        rt = pa.get_rt_info()
        assert int(rt["num_k_heads"].astype(int)) == 1
        assert int(rt["num_v_heads"].astype(int)) == 1
    with pytest.raises(PerHeadPatternError, match="already per-head"):
        to_per_head(model)


def test_keeps_old_inputs_that_are_still_consumed(tiny_model: Path) -> None:
    model = read_paged_model(tiny_model)
    past = next(p for p in model.get_parameters() if "past_lens" in p.output(0).get_names())
    model.add_results([ops.result(ops.reduce_max(past, ops.constant([0], ov.Type.i64)))])
    to_per_head(model)
    names = {n for i in model.inputs for n in i.get_names()}
    assert "past_lens" in names and "head_past_lens.0" in names
    assert "subsequence_begins" not in names and "block_indices" not in names
    ov.Core().compile_model(model, "CPU", F32)  # still a valid graph


def test_rejects_unconverted_and_scoreless(tiny_model: Path) -> None:
    with pytest.raises(PerHeadPatternError, match="no PagedAttentionExtension"):
        to_per_head(ov.Core().read_model(tiny_model / "openvino_model.xml"))
    with pytest.raises(PerHeadPatternError, match="scores output"):
        to_per_head(read_paged_model(tiny_model, score_outputs=False))
    x = ops.parameter([-1], ov.Type.f32, name="x")
    with pytest.raises(PerHeadPatternError, match="no PagedAttentionExtension"):
        to_per_head(ov.Model([ops.result(x)], [x], "empty"))


def test_layout_helpers() -> None:
    layout = PerHeadLayout(num_layers=2, num_kv_heads=3)
    begins = layout.subsequence_begins([4, 1])
    assert begins.tolist() == [0, 4, 5, 9, 10, 14, 15]
    past = np.array([[[8, 7, 6], [0, 1, 2]], [[3, 3, 3], [2, 2, 2]]])  # [L, B, Hkv]
    tables = [[[[10 * s + h] for h in range(3)] for s in range(2)] for _ in range(2)]
    tables[1][0][2] = [99, 98]
    got = layout.inputs([4, 1], past, tables)
    assert got[head_past_lens_name(0)].tolist() == [8, 0, 7, 1, 6, 2]  # j = h*B + s
    assert got[block_indices_name(1)].tolist() == [0, 10, 1, 11, 99, 98, 12]
    assert got[block_indices_begins_name(1)].tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert int(got["max_context_len"]) == 12
    ctx = layout.context_lens([4, 1], past)[0]  # [[12, 11, 10], [1, 2, 3]]
    scores = np.arange(int(ctx.sum()), dtype=np.float32)
    parts = layout.split_scores(scores, ctx)
    assert parts[0][0].tolist() == list(range(12))
    assert parts[1][0].tolist() == [12]
    assert parts[0][1].tolist() == list(range(13, 24))
    assert parts[1][2].tolist() == list(range(36, 39))
    with pytest.raises(ValueError, match="expected"):
        layout.split_scores(scores[:-1], ctx)


def test_layout_helpers_sequence_major() -> None:
    layout = PerHeadLayout(num_layers=1, num_kv_heads=3, sequence_major=True)
    assert layout.subsequence_begins([1, 1]).tolist() == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="one token per sequence"):
        layout.subsequence_begins([4, 1])
    past = np.array([[[8, 7, 6], [0, 1, 2]]])  # [L, B, Hkv]
    tables = [[[[10 * s + h] for h in range(3)] for s in range(2)]]
    tables[0][1][0] = [99, 98]
    got = layout.inputs([1, 1], past, tables)
    assert got[head_past_lens_name(0)].tolist() == [8, 7, 6, 0, 1, 2]  # j = s*Hkv + h
    assert got[block_indices_name(0)].tolist() == [0, 1, 2, 99, 98, 11, 12]
    assert got[block_indices_begins_name(0)].tolist() == [0, 1, 2, 3, 5, 6, 7]
    ctx = layout.context_lens([1, 1], past)[0]  # [[9, 8, 7], [1, 2, 3]]
    scores = np.arange(int(ctx.sum()), dtype=np.float32)
    parts = layout.split_scores(scores, ctx)
    assert parts[0][0].tolist() == list(range(9))
    assert parts[0][2].tolist() == list(range(17, 24))
    assert parts[1][0].tolist() == [24]
    assert parts[1][2].tolist() == [27, 28, 29]


# ---------------------------------------------------------------- numerics


def test_tiny_matches_plain_same_memory(tiny_model: Path) -> None:
    plain, head, layout = make_runners(tiny_model, F32)
    mapping = same_memory(layout.num_kv_heads)
    worst = compare(plain, head, layout, [mapping] * 3, 1e-5, 1e-5, 1e-7)
    print(f"\ntiny f32 worst |dlogits| {worst['logits']:.3g}, scores rel {worst['scores']:.3g}")
    # The pool aliases the plain layout: the per-head cache holds the same bytes.
    for name, tensor in plain.caches.items():
        np.testing.assert_allclose(head.caches[name].data.reshape(tensor.data.shape),
                                   tensor.data, rtol=1e-6, atol=1e-6, err_msg=name)


class PaddedRunner(Runner):
    """Runner whose ``block_indices.L`` carry trailing junk (valid block ids of other heads):
    what kvcrush_ov's HeadModelRunner leaves after a table shrinks (TableBuffers)."""

    calls = 0

    def infer(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        self.calls += 1  # junk of another length and order every step
        junk = np.roll(np.arange(self.calls + 3), self.calls)
        padded = {name: (np.concatenate([value, junk]).astype(np.int32)
                         if name.startswith("block_indices.") else value)
                  for name, value in inputs.items()}
        return super().infer(padded)


def test_tiny_padded_block_indices_match_plain(tiny_model: Path) -> None:
    """PagedAttention reads only block_indices[begins[j]:begins[j+1]]: padding changes
    nothing (the runner binds longer buffers once and rewrites them in place)."""
    plain, head, layout = make_runners(tiny_model, F32)
    head.__class__ = PaddedRunner
    mapping = scrambled(layout.num_kv_heads, layout.num_layers, seed=5)
    compare(plain, head, layout, [mapping] * 3, 1e-5, 1e-5, 1e-7)


def test_tiny_independent_head_tables(tiny_model: Path) -> None:
    """Random per-layer pool permutations; then head 0 of layer 1 moves to fresh blocks.

    After the prefill the contents of layer 1 / head 0 are copied to blocks beyond the
    permuted range and the old blocks are poisoned: the decode steps only match the plain model
    if the per-layer, per-head tables are honoured.
    """
    extra = NUM_BLOCKS
    plain, head, layout = make_runners(tiny_model, F32, extra_blocks=extra)
    hkv = layout.num_kv_heads
    base = scrambled(hkv, layout.num_layers, seed=3)
    pool = NUM_BLOCKS * hkv
    assert {base(1, b, h) for b in range(NUM_BLOCKS) for h in range(hkv)} == set(range(pool))

    def moved(layer: int, b: int, h: int) -> int:
        return pool + (extra - 1 - b) if (layer, h) == (1, 0) else base(layer, b, h)

    def relocate(step: int) -> None:
        if step != 1:
            return
        for kind in ("key_cache", "value_cache"):
            data = head.caches[f"{kind}.1"].data
            for b in range(NUM_BLOCKS):
                data[moved(1, b, 0)] = data[base(1, b, 0)]
                data[base(1, b, 0)] = np.float32(1e4)

    compare(plain, head, layout, [base, moved, moved], 1e-5, 1e-5, 1e-7, between_steps=relocate)
    # Control: the poisoned blocks are really read when the table points at them.
    with pytest.raises(AssertionError, match="logits"):
        compare(plain, head, layout, [base, base], 1e-5, 1e-5, 1e-7,
                between_steps=lambda step: relocate(1))


def sequence_major_runner(folder: Path, head: Runner, props: dict,
                          aggregation: bool = False) -> tuple[Runner, PerHeadLayout]:
    """The sequence-major conversion, bound to ``head``'s cache tensors."""
    read = _read_with_aggregation if aggregation else read_paged_model
    model = to_per_head(read(folder), sequence_major=True)
    layout = PerHeadLayout.from_model(model)
    assert layout.sequence_major
    assert not [n for n in model.get_ordered_ops()
                if n.get_type_name() == "Transpose" and "/per_head_" in n.get_friendly_name()]
    runner = Runner(ov.Core(), model, 1, props)
    runner.caches = head.caches
    for name, tensor in head.caches.items():
        runner.request.set_tensor(name, tensor)
    return runner, layout


def test_tiny_sequence_major_decode(tiny_model: Path) -> None:
    """Decode steps on the sequence-major graph (j = s*Hkv + h, no transposes) match the plain
    model, with scrambled per-layer tables; control: the head-major layout's inputs fail."""
    plain, head, layout = make_runners(tiny_model, F32, aggregation=True)
    decode = sequence_major_runner(tiny_model, head, F32, aggregation=True)
    mapping = scrambled(layout.num_kv_heads, layout.num_layers, seed=13)
    compare(plain, head, layout, [mapping] * 3, 1e-5, 1e-5, 1e-7, window=(3, 8), decode=decode)
    plain, head, layout = make_runners(tiny_model, F32, aggregation=True)
    wrong = (sequence_major_runner(tiny_model, head, F32, aggregation=True)[0], layout)
    with pytest.raises(AssertionError, match="step 1"):
        compare(plain, head, layout, [mapping] * 2, 1e-5, 1e-5, 1e-7, window=(3, 8),
                decode=wrong)


def test_tiny_score_aggregation_window(tiny_model: Path) -> None:
    """score_aggregation_window [B] is tiled per head: segments sum to G * window."""
    plain, head, layout = make_runners(tiny_model, F32, aggregation=True)
    names = {n for i in head.compiled.inputs for n in i.get_names()}
    assert "score_aggregation_window" in names
    mapping = scrambled(layout.num_kv_heads, layout.num_layers, seed=11)
    compare(plain, head, layout, [mapping] * 2, 1e-5, 1e-5, 1e-7, window=(3, 8))


def test_tiny_wrong_table_changes_logits(tiny_model: Path) -> None:
    """Control: giving head 1 the blocks of head 0 must change the result (tables matter)."""
    plain, head, layout = make_runners(tiny_model, F32)
    ok = same_memory(layout.num_kv_heads)

    def wrong(layer: int, b: int, h: int) -> int:
        return ok(layer, b, 0)

    with pytest.raises(AssertionError, match="logits, step 1"):
        compare(plain, head, layout, [ok, wrong], 1e-5, 1e-5, 1e-7)


@pytest.mark.real_model
def test_smollm2_matches_plain_f32(smollm2_fp16: Path) -> None:
    plain, head, layout = make_runners(smollm2_fp16, F32)
    worst = compare(plain, head, layout, [scrambled(layout.num_kv_heads, layout.num_layers, 5)]
                    * 3, 1e-4, 1e-5, 1e-7)
    print(f"\nSmolLM2 f32 worst |dlogits| {worst['logits']:.3g}, scores rel {worst['scores']:.3g}")


@pytest.mark.real_model
def test_smollm2_matches_plain_u8(smollm2_fp16: Path) -> None:
    """u8 cache (default group size) with f32 inference: quantization never crosses heads."""
    plain, head, layout = make_runners(smollm2_fp16, U8_F32)
    assert head.caches["key_cache.0"].get_element_type() == ov.Type.u8
    worst = compare(plain, head, layout, [same_memory(layout.num_kv_heads)] * 3, 1e-4, 1e-5, 1e-7)
    print(f"\nSmolLM2 u8 worst |dlogits| {worst['logits']:.3g}, scores rel {worst['scores']:.3g}")
    for name, tensor in plain.caches.items():
        assert np.array_equal(head.caches[name].data.reshape(tensor.data.shape), tensor.data), name


@pytest.mark.real_model
def test_smollm2_matches_plain_u8_bf16(smollm2_fp16: Path) -> None:
    """The CPU default (bf16 inference, u8 cache): same kernels per head, so (near) exact."""
    plain, head, layout = make_runners(smollm2_fp16, {"KV_CACHE_PRECISION": "u8"})
    worst = compare(plain, head, layout, [same_memory(layout.num_kv_heads)] * 3, 1e-3, 1e-5,
                    1e-7, sum_rtol=1e-2)
    print(f"\nSmolLM2 bf16/u8 worst |dlogits| {worst['logits']:.3g}, "
          f"scores rel {worst['scores']:.3g}")
