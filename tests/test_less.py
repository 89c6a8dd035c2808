"""LESS on the native engine: weights file, state folding, the graph's mixed attention against a
numpy reference, and the no-op cases (tiny-random-llama; plumbing, not accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from kvcrush_ov.config import (
    CacheEvictionConfig,
    GenerationConfig,
    KVCacheConfig,
    LESSConfig,
    SchedulerConfig,
)
from kvcrush_ov.device import compile_properties
from kvcrush_ov.engine.engine import LLMEngine
from kvcrush_ov.engine.kv_codec import KEY, VALUE, CacheLayout
from kvcrush_ov.errors import ConfigError
from kvcrush_ov.eviction.factory import make_spec
from kvcrush_ov.less.kernels import LESSState, LESSWeights, mixed_attention
from kvcrush_ov.transformations.less import (
    LESS_TOKEN_INDEX,
    LESS_TOKEN_OFFSET,
    LESS_TOKEN_SEQ,
    add_less,
    less_mix_model,
    probe_cache_types,
    set_cache_types,
    state_h_name,
    state_z_name,
)
from kvcrush_ov.transformations.paged import read_paged_model
from kvcrush_ov.transformations.per_head import (
    HEAD_SUBSEQUENCE_BEGINS,
    block_indices_begins_name,
    block_indices_name,
    head_past_lens_name,
    to_per_head,
)

GREEDY = GenerationConfig(max_new_tokens=8, ignore_eos=True)


def _geometry(model: Path) -> tuple[int, int, int, int]:
    cfg = json.loads((model / "config.json").read_text())
    hq = cfg["num_attention_heads"]
    return (cfg["num_hidden_layers"], hq, cfg["num_key_value_heads"],
            cfg.get("head_dim") or cfg["hidden_size"] // hq)


def _weights(model: Path, s1: float = 1.0, seed: int = 1) -> LESSWeights:
    """Random kernels with a large ``s1`` so that the state matters (untrained: plumbing only)."""
    w = LESSWeights.initial(*_geometry(model), hidden=16, feature_dim=4, seed=seed)
    w.arrays["k_s1"][:] = s1
    return w


def _engine(model: Path, precision: str, less: str | Path | None, budget: int = 64,
            ) -> LLMEngine:
    ev = CacheEvictionConfig(max_cache_size=budget, start_size=8, recent_size=16,
                             importance="snapkv", kvcrush=None, log=True,
                             less=None if less is None else LESSConfig(less))
    return LLMEngine(model, "CPU", KVCacheConfig(precision=precision),
                     SchedulerConfig(max_num_batched_tokens=64), context_length=2048,
                     eviction=make_spec(ev, model))


def _run(eng: LLMEngine, ids: list[int]):
    seq = eng.add_request(ids, GREEDY, set(), lambda x: "")
    while eng.has_unfinished():
        eng.step()
        eng.check_invariants()
    return seq


def _ids(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


# ------------------------------------------------------------------------- weights and config


def test_weights_roundtrip_and_rejections(tiny_model: Path, tmp_path: Path) -> None:
    w = _weights(tiny_model)
    path = w.save(tmp_path / "w.npz")
    back = LESSWeights.load(path)
    assert back.meta == w.meta
    for k, a in w.arrays.items():
        np.testing.assert_array_equal(back.arrays[k], a)
    with pytest.raises(ConfigError, match="less.weights"):
        LESSWeights.load(tmp_path / "missing.npz")
    bad = dict(w.arrays)
    bad["q_w1"] = bad["q_w1"][:, :, :-1]
    np.savez(tmp_path / "bad.npz", meta=np.array(json.dumps(w.meta)), **bad)
    with pytest.raises(ConfigError, match="less.weights.*q_w1"):
        LESSWeights.load(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="less.weights"):
        LESSWeights.load(tmp_path / "junk.npz")
    with pytest.raises(ConfigError, match="less.weights"):
        LESSConfig(weights=3)
    with pytest.raises(ConfigError, match="eviction.less"):
        CacheEvictionConfig(importance="upstream", less=LESSConfig(path))


def test_weights_for_another_model_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    layers, hq, hkv, d = _geometry(tiny_model)
    other = LESSWeights.initial(layers, hq, hkv, d * 2, hidden=8, feature_dim=4)
    path = other.save(tmp_path / "other.npz")
    with pytest.raises(ConfigError, match="less.weights"):
        _engine(tiny_model, "f32", path)


# ------------------------------------------------------------------------- engine behaviour


def test_empty_state_changes_nothing(tiny_model: Path, tmp_path: Path) -> None:
    """Nothing evicted, or psi == 0 (s1 = 0): the same tokens as the run without LESS."""
    path = _weights(tiny_model).save(tmp_path / "w.npz")
    zero = _weights(tiny_model, s1=0.0).save(tmp_path / "zero.npz")
    short, long = _ids(40), _ids(200)
    plain = _engine(tiny_model, "f32", None)
    less = _engine(tiny_model, "f32", path)
    quiet = _engine(tiny_model, "f32", zero)
    a, b = _run(plain, short), _run(less, short)
    assert b.extra.get("less") is None and b.output_ids == a.output_ids
    a, c = _run(plain, long), _run(quiet, long)
    assert c.extra["evictions"] >= 1 and c.extra["less"].empty  # every layer switched off
    assert not c.extra["less"].z.any()
    assert c.output_ids == a.output_ids


def test_switched_off_layers_get_no_op_and_no_state(tiny_model: Path, tmp_path: Path) -> None:
    """A layer with ``k_s1 = 0`` (training switched it off) gets no LESS op in the graph and
    nothing folded; the other layers still mix their state."""
    w = _weights(tiny_model)
    w.arrays["k_s1"][0] = 0.0
    layers = w.num_layers
    assert w.active_layers == list(range(1, layers))
    g = to_per_head(read_paged_model(tiny_model / "openvino_model.xml", score_outputs=True,
                                     logits_indices=True, score_aggregation=True))
    add_less(g, w, CacheLayout.from_shape(KEY, "f32", 32, w.head_dim))
    mixed = [n.get_friendly_name() for n in g.get_ordered_ops()
             if n.get_friendly_name().endswith("/less_out")]
    assert len(mixed) == layers - 1
    names = {n for p in g.get_parameters() for n in p.output(0).get_names()}
    assert state_h_name(0) not in names and state_z_name(0) not in names
    assert state_h_name(1) in names
    seq = _run(_engine(tiny_model, "f32", w.save(tmp_path / "w.npz")), _ids(200))
    st: LESSState = seq.extra["less"]
    assert seq.extra["evictions"] >= 1
    assert not st.num_folded[0].any() and st.num_folded[1:].all()


@pytest.mark.parametrize("precision", ["f32", "u8"])
def test_state_folds_exactly_the_evicted_tokens(tiny_model: Path, tmp_path: Path,
                                               precision: str) -> None:
    """The engine's state equals psi / v of the evicted positions, read from a full-cache run
    (f32: the same K / V; u8: within the quantization of the tokens' blocks)."""
    w = _weights(tiny_model)
    path = w.save(tmp_path / "w.npz")
    ids = _ids(120, seed=3)
    eng = _engine(tiny_model, precision, path)
    # two tokens: the prompt's eviction runs after the first one is handed out (GenAI's order)
    seq = eng.add_request(ids, GenerationConfig(max_new_tokens=2, ignore_eos=True), set(),
                          lambda x: "")
    # full K / V of the prompt: a run that never evicts, its cache parked when it finishes
    ref = _engine(tiny_model, precision, None, budget=10_000)
    rseq = ref.add_request(ids, GenerationConfig(max_new_tokens=1, ignore_eos=True), set(),
                           lambda x: "", keep_cache=True)
    while ref.has_unfinished():
        ref.step()
    runner, t = ref.runner, ref.kv.tables[rseq.seq_id]
    while eng.has_unfinished():
        eng.step()
    state: LESSState = seq.extra["less"]
    kept = seq.extra["eviction_log"][0].kept  # [l][h] positions
    layers, _, hkv, _ = _geometry(tiny_model)
    tol = 1e-5 if precision == "f32" else 2e-2
    for layer in range(layers):
        kt, vt = runner.cache_tensors(layer)
        kb, vb = runner.key_layout.head_blocks(kt), runner.value_layout.head_blocks(vt)
        for h in range(hkv):
            pos = t.positions_of(layer, h)
            gone = np.flatnonzero(~np.isin(pos[:len(ids)], kept[layer][h]))
            assert len(gone) == len(ids) - len(kept[layer][h])
            keys = runner.key_layout.table_rows(kb, t.blocks[layer][h], 0, gone)
            values = runner.value_layout.table_rows(vb, t.blocks[layer][h], 0, gone)
            p = w.psi(layer, h, keys)
            np.testing.assert_allclose(state.z[layer, h], p.sum(0), rtol=tol, atol=tol)
            np.testing.assert_allclose(state.H[layer, h], p.T @ values, rtol=tol,
                                       atol=tol * np.abs(p.T @ values).max())
            assert state.num_folded[layer, h] == len(gone)


def test_less_changes_decoding_after_eviction(tiny_model: Path, tmp_path: Path) -> None:
    path = _weights(tiny_model).save(tmp_path / "w.npz")
    ids = _ids(200, seed=0)
    a = _run(_engine(tiny_model, "f32", None), ids)
    b = _run(_engine(tiny_model, "f32", path), ids)
    assert b.extra["evictions"] >= 1
    assert b.output_ids[0] == a.output_ids[0]  # the first token comes from the prefill
    assert b.output_ids != a.output_ids


# ------------------------------------------------------------------------- the graph itself


class _Graph:
    """The tiny model's per-head graph with LESS and layer 0's selected queries and mixed
    output as extra outputs; one sequence, per-head tables fed by hand."""

    def __init__(self, model: Path, w: LESSWeights, precision: str) -> None:
        core = ov.Core()
        props = compile_properties("CPU", precision)
        g = to_per_head(read_paged_model(model / "openvino_model.xml", score_outputs=True,
                                         logits_indices=True, score_aggregation=True))
        kt, kd, vt, vd = probe_cache_types(core, "CPU", props, w.head_dim, w.head_dim, w.group)
        self.key = CacheLayout.from_shape(KEY, kt.get_type_name(), kd[-2], kd[-1])
        self.value = CacheLayout.from_shape(VALUE, vt.get_type_name(), vd[-2], vd[-1])
        set_cache_types(g, kt, kd, vt, vd)
        add_less(g, w, self.key)
        pa0 = next(n for n in g.get_ordered_ops() if n.get_type_name() == "PagedAttentionExtension"
                   and "key_cache.0" in n.input_value(3).get_names())
        out0 = next(n for n in g.get_ordered_ops()
                    if n.get_friendly_name() == f"{pa0.get_friendly_name()}/less_out")
        # out0 = LESSMix(q, out, idx, ...) (or a Convert of it); its first input is q
        mixed = out0 if out0.get_type_name() == "LESSMix" else out0.input_value(0).get_node()
        assert mixed.get_type_name() == "LESSMix"
        g.add_outputs([mixed.input_value(0), out0.output(0)])
        self.compiled = core.compile_model(g, "CPU", props)
        self.req = self.compiled.create_infer_request()
        self.layers, self.w = w.num_layers, w
        nb = 16
        self.caches = []
        for layer in range(self.layers):
            k = ov.Tensor(kt, [nb, *kd])
            v = ov.Tensor(vt, [nb, *vd])
            k.data[...] = 0
            v.data[...] = 0
            self.req.set_tensor(f"key_cache.{layer}", k)
            self.req.set_tensor(f"value_cache.{layer}", v)
            self.caches.append((k, v))

    def step(self, ids: list[int], start: int, tables: list[list[list[int]]],
             past: np.ndarray, less: LESSState | None) -> list[np.ndarray]:
        """``tables[l][h]`` blocks, ``past[l, h]`` cached rows; all tokens LESS-active when
        ``less`` is given. Returns (q_sel [M, Hq*D], out [T, Hq*Dv]) of layer 0."""
        n, hkv = len(ids), self.w.num_kv_heads
        r = self.req
        r.set_tensor("input_ids", ov.Tensor(np.asarray(ids, np.int64)))
        r.set_tensor("position_ids", ov.Tensor(np.arange(start, start + n, dtype=np.int64)))
        r.set_tensor("max_context_len", ov.Tensor(np.array(int(past.max()) + n, np.int32)))
        r.set_tensor("logits_indices", ov.Tensor(np.array([n - 1], np.int64)))
        r.set_tensor("score_aggregation_window", ov.Tensor(np.array([1], np.int32)))
        r.set_tensor(HEAD_SUBSEQUENCE_BEGINS,
                     ov.Tensor(np.arange(hkv + 1, dtype=np.int32) * n))
        for layer in range(self.layers):
            r.set_tensor(head_past_lens_name(layer), ov.Tensor(past[layer].astype(np.int32)))
            flat = [b for h in range(hkv) for b in tables[layer][h]]
            begins = np.cumsum([0] + [len(tables[layer][h]) for h in range(hkv)])
            r.set_tensor(block_indices_name(layer), ov.Tensor(np.asarray(flat, np.int32)))
            r.set_tensor(block_indices_begins_name(layer),
                         ov.Tensor(begins.astype(np.int32)))
            h_state = np.zeros((1, hkv, self.w.feature_dim, self.w.head_dim), np.float32)
            z_state = np.zeros((1, hkv, self.w.feature_dim), np.float32)
            if less is not None:
                h_state[0], z_state[0] = less.H[layer], less.z[layer]
            r.set_tensor(state_h_name(layer), ov.Tensor(h_state))
            r.set_tensor(state_z_name(layer), ov.Tensor(z_state))
        m = n if less is not None else 0
        r.set_tensor(LESS_TOKEN_INDEX, ov.Tensor(np.arange(m, dtype=np.int32)))
        r.set_tensor(LESS_TOKEN_SEQ, ov.Tensor(np.zeros(m, np.int32)))
        r.set_tensor(LESS_TOKEN_OFFSET, ov.Tensor(np.arange(m, dtype=np.int32)))
        r.infer()
        return [np.array(r.get_tensor(o).data) for o in self.compiled.outputs[-2:]]

    def rows(self, layer: int, h: int, table: list[int], count: int) -> tuple[np.ndarray, ...]:
        k, v = self.caches[layer]
        return (self.key.table_rows(self.key.head_blocks(k), table, count),
                self.value.table_rows(self.value.head_blocks(v), table, count))

    def write(self, layer: int, table: list[int], keys: np.ndarray, values: np.ndarray) -> None:
        """Write ``keys`` / ``values`` [n, D] densely into ``table`` (f32 cache only)."""
        k, v = self.caches[layer]
        kb = k.data.reshape(k.get_shape()[0], -1, self.w.head_dim)
        vb = v.data.reshape(v.get_shape()[0], -1, self.w.head_dim)
        for i in range(len(keys)):
            blk, row = table[i // self.key.block_size], i % self.key.block_size
            kb[blk, row], vb[blk, row] = keys[i], values[i]


def test_graph_mixes_kept_attention_and_state_like_numpy(tiny_model: Path) -> None:
    """Prefill 48 tokens, evict by hand (f32 cache), fold the evicted rows, then a 2-token
    chunk with LESS: layer 0's output equals the numpy reference over kept rows + the chunk's
    own rows (causal) + the state, for every query head."""
    w = _weights(tiny_model)
    layers, hq, hkv, d = _geometry(tiny_model)
    g = _Graph(tiny_model, w, "f32")
    ids = _ids(50, seed=7)
    bs = g.key.block_size
    full = [[[2 * h, 2 * h + 1] for h in range(hkv)] for _ in range(layers)]
    g.step(ids[:48], 0, full, np.zeros((layers, hkv), int), None)
    rng = np.random.default_rng(0)
    state = LESSState(layers, hkv, w.feature_dim, d)
    new_tables = [[[8 + 2 * h] for h in range(hkv)] for _ in range(layers)]
    kept_n = np.zeros((layers, hkv), int)
    for layer in range(layers):
        for h in range(hkv):
            keys, values = g.rows(layer, h, full[layer][h], 48)
            keep = np.sort(rng.choice(48, size=20 + h, replace=False))
            gone = np.setdiff1d(np.arange(48), keep)
            state.fold(w, layer, h, keys[gone], values[gone])
            g.write(layer, new_tables[layer][h] + [9 + 2 * h], keys[keep], values[keep])
            new_tables[layer][h].append(9 + 2 * h)
            kept_n[layer, h] = len(keep)
    assert kept_n.max() + 2 <= 2 * bs
    q, out = g.step(ids[48:50], 48, new_tables, kept_n, state)
    assert q.shape == (2, hq * d) and out.shape == (2, hq * d)
    scale = 1.0 / np.sqrt(d)
    grp = hq // hkv
    phi = w.phi(0, q.reshape(2, hq, d))
    for h in range(hkv):
        keys, values = g.rows(0, h, new_tables[0][h], int(kept_n[0, h]) + 2)
        for t in range(2):
            n = int(kept_n[0, h]) + t + 1  # causal: the chunk's second token sees the first
            for gq in range(grp):
                head = h * grp + gq
                qv = q[t, head * d:(head + 1) * d]
                want = mixed_attention(qv, keys[:n], values[:n], scale, phi[t, head],
                                       state.H[0, h], state.z[0, h])
                np.testing.assert_allclose(out[t, head * d:(head + 1) * d], want, rtol=1e-4,
                                           atol=1e-5)
    # a selected token with an empty state gets exactly PagedAttention's output
    empty = LESSState(layers, hkv, w.feature_dim, d)
    _, out_empty = g.step(ids[48:50], 48, new_tables, kept_n, empty)
    _, out_plain = g.step(ids[48:50], 48, new_tables, kept_n, None)
    np.testing.assert_array_equal(out_empty, out_plain)
    # and the state really moved the output away from plain attention over the kept rows
    keys, values = g.rows(0, 0, new_tables[0][0], int(kept_n[0, 0]) + 1)
    s = scale * keys @ q[0, :d]
    plain = np.exp(s - s.max()) @ values / np.exp(s - s.max()).sum()
    assert np.abs(out[0, :d] - plain).max() > 1e-3


def test_batched_sequences_match_each_alone(tiny_model: Path, tmp_path: Path) -> None:
    """Two LESS sequences decoding in the same steps (each with its own state; one evicts and
    one does not) give the tokens each gives alone: states and kept keys stay per sequence."""
    path = _weights(tiny_model).save(tmp_path / "w.npz")
    a_ids, b_ids, c_ids = _ids(200, seed=0), _ids(190, seed=11), _ids(40, seed=12)
    gen = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    alone = []
    for x in (a_ids, b_ids, c_ids):
        eng = _engine(tiny_model, "f32", path)
        seq = eng.add_request(x, gen, set(), lambda x: "")
        while eng.has_unfinished():
            eng.step()
        alone.append(seq.output_ids)
    eng = _engine(tiny_model, "f32", path)
    seqs = [eng.add_request(x, gen, set(), lambda x: "") for x in (a_ids, b_ids, c_ids)]
    together = 0
    while eng.has_unfinished():
        eng.step()
        together += sum(1 for s in seqs[:2] if s.extra.get("less") is not None
                        and not s.is_finished) == 2
    assert together >= 8  # steps in which both LESS states were live
    assert seqs[0].extra["less"] is not None and seqs[2].extra.get("less") is None
    assert [s.output_ids for s in seqs] == alone


_KEY_ROWS = {"f32": 0, "f16": 0, "bf16": 0, "u8": 8, "u4": 16}  # header rows of a key block


@pytest.mark.parametrize(("precision", "sequence_major"),
                         [("f32", False), ("f32", True), ("bf16", True), ("f16", False),
                          ("u8", True), ("u4", False)])
def test_less_mix_op_reads_each_sequences_own_table(precision: str,
                                                    sequence_major: bool) -> None:
    """The op alone, 3 sequences x 2 KV heads with their own tables, lengths and states (the
    second one empty), 1-2 selected tokens each: every (token, query head) row is the numpy
    mixing of the kept output with the state, over the log-sum-exp of its own rows, the keys
    as kv_codec decodes them from every cache format; an empty state returns the kept row."""
    d, g, hkv, bs, b, f = 8, 2, 2, 32, 3, 4
    hq = hkv * g
    layout = CacheLayout.from_shape(KEY, precision, bs + _KEY_ROWS[precision], d)
    rng = np.random.default_rng(0)
    cache = np.stack([layout.encode_block(rng.standard_normal((bs, d)).astype(np.float32))
                      .reshape(-1).view(np.uint8) for _ in range(12)])
    past = rng.integers(5, 40, size=(b, hkv))
    tables = {(s, h): rng.permutation(12)[:2].tolist() for s in range(b) for h in range(hkv)}
    order = ([(s, h) for s in range(b) for h in range(hkv)] if sequence_major
             else [(s, h) for h in range(hkv) for s in range(b)])
    flat = [blk for key in order for blk in tables[key]]
    begins = np.cumsum([0] + [len(tables[key]) for key in order])
    past_j = np.array([past[key] for key in order])
    seq = np.array([0, 2, 2, 1])
    off = np.array([0, 0, 1, 0])
    q = rng.standard_normal((4, hq * d)).astype(np.float32)
    kept = rng.standard_normal((4, hq * d)).astype(np.float32)
    # a fifth token, row 1, that is not selected: the op must leave its row as it is
    other = np.random.default_rng(9).standard_normal((2, hq * d)).astype(np.float32)
    q, kept = np.insert(q, 1, other[0], axis=0), np.insert(kept, 1, other[1], axis=0)
    idx = np.array([0, 2, 3, 4], np.int32)
    w = LESSWeights.initial(1, hq, hkv, d, hidden=6, feature_dim=f, seed=3)
    state_h = rng.random((b, hkv, f, d)).astype(np.float32)
    state_z = rng.random((b, hkv, f)).astype(np.float32) * 50
    state_h[1], state_z[1] = 0, 0  # sequence 1: nothing evicted
    a = w.arrays
    params = [ov.opset13.parameter([-1], ov.Type.f32) for _ in range(16)]
    op = less_mix_model(params, layout, hkv, g, sequence_major).get_results()[0].input_value(0)
    op = op.get_node()
    assert op.get_type_name() == "LESSMix"
    attrs = op.get_attributes()
    assert (attrs["num_kv_heads"], attrs["group"], attrs["sequence_major"]) == (
        hkv, g, sequence_major)
    assert (attrs["head_block_bytes"], attrs["block_size"], attrs["by_channel"]) == (
        layout.native.head_block_bytes, layout.native.block_size, layout.by_channel)
    out = ov.Tensor(ov.Type.f32, [5, hq * d])
    ins = [ov.Tensor(x) for x in (
        q, kept, idx, cache, past_j.astype(np.int32), np.asarray(flat, np.int32),
        begins.astype(np.int32), seq.astype(np.int32), off.astype(np.int32),
        np.array(0.5, np.float32), state_h, state_z, a["q_w1"][0], a["q_b1"][0],
        a["q_w2"][0], a["q_b2"][0])]
    assert op.evaluate([out], ins)
    np.testing.assert_array_equal(out.data[1], kept[1])  # not selected: unchanged
    phi = w.phi(0, q[idx].reshape(4, hq, d)).astype(np.float64)
    for i, row in enumerate(idx):
        for h in range(hkv):
            s = int(seq[i])
            n = int(past[s, h]) + int(off[i]) + 1
            rows = layout.table_rows(cache, tables[(s, h)], n)
            for gq in range(g):
                head = h * g + gq
                got = out.data[row, head * d:(head + 1) * d]
                o = kept[row, head * d:(head + 1) * d]
                z = phi[i, head] @ state_z[s, h]
                if s == 1:
                    np.testing.assert_array_equal(got, o)
                    continue
                x = 0.5 * rows.astype(np.float64) @ q[row, head * d:(head + 1) * d]
                lse = x.max() + np.log(np.exp(x - x.max()).sum())
                mix = 1.0 / (1.0 + z * np.exp(-lse))
                want = mix * o + (1 - mix) * (phi[i, head] @ state_h[s, h]) / z
                assert 0.05 < mix < 0.95  # both parts count in this check
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the kernel checks the rows before it writes: outside 0..T-1, or not increasing
    for bad, what in (([0, 5], "outside 0..4"), ([2, 0], "strictly increasing")):
        ins[2] = ov.Tensor(np.array(bad, np.int32))
        ins[7], ins[8] = ov.Tensor(seq[:2].astype(np.int32)), ov.Tensor(off[:2].astype(np.int32))
        with pytest.raises(Exception, match=f"less_token_index.*{what}"):
            op.evaluate([out], ins)


def test_engines_dropped_in_any_order_run_and_free_cleanly(tiny_model: Path,
                                                          tmp_path: Path) -> None:
    """The LESSMix code lives in kvcrush_ov._core, loaded for the whole process: engines (and
    their compiled models holding LESSMix nodes) dropped in any order, with another one built
    in between, run and free cleanly (an extension library unloaded under live compiled models
    once crashed the CI run at their destruction)."""
    import gc

    path = _weights(tiny_model).save(tmp_path / "w.npz")
    ids = _ids(200, seed=0)
    first = _engine(tiny_model, "f32", path)
    want = _run(first, ids).output_ids
    second = _engine(tiny_model, "f32", path)
    del first
    gc.collect()
    assert _run(second, ids).output_ids == want
    del second
    gc.collect()
    assert _run(_engine(tiny_model, "f32", path), ids).output_ids == want


def test_fold_accumulates_into_its_own_layer_and_head() -> None:
    """Two LESSState.fold calls sum psi / psi v^T of all their rows into one (layer, head) and
    touch nothing else (scales away from the near-zero initial ones: every part of psi counts)."""
    w = LESSWeights.initial(2, 6, 2, 16, hidden=12, feature_dim=5, seed=4)
    rng = np.random.default_rng(5)
    for name in ("k_s1", "k_s2", "k_b2"):
        w.arrays[name] = rng.normal(0, 1, w.arrays[name].shape).astype(np.float32)
    keys = rng.normal(0, 2, (300, 16)).astype(np.float32)
    values = rng.normal(0, 1, (300, 16)).astype(np.float32)
    st = LESSState(2, 2, 5, 16)
    st.fold(w, 1, 0, keys[:200], values[:200])
    st.fold(w, 1, 0, keys[200:], values[200:])
    p = w.psi(1, 0, keys).astype(np.float64)
    np.testing.assert_allclose(st.z[1, 0], p.sum(0), rtol=2e-5)
    np.testing.assert_allclose(st.H[1, 0], p.T @ values, rtol=2e-5, atol=2e-5 * np.abs(p).sum())
    assert not st.z[0].any() and not st.H[:, 1].any() and st.num_folded[1, 0] == 300


def test_chat_rewrite_of_folded_tokens_recomputes(tiny_model: Path, tmp_path: Path) -> None:
    """A turn that keeps the conversation reuses the cache and its LESS state; a turn that
    rewrites positions LESS has folded (sums that cannot give them back) recomputes the whole
    conversation and gives a fresh run's greedy tokens."""
    path = _weights(tiny_model).save(tmp_path / "w.npz")
    eng = _engine(tiny_model, "f32", path)
    first = eng.add_request(_ids(120, seed=4), GREEDY, set(), lambda x: "", keep_cache=True)
    while eng.has_unfinished():
        eng.step()
    state: LESSState = first.extra["less"]
    assert 8 <= state.max_position < 120 - 16  # evicted: past the sinks, before the recent
    # the same conversation and a new message: only the new tokens are computed
    keep = first.all_ids[:first.num_computed] + _ids(20, seed=5)
    tokens = eng.stats.tokens
    a = eng.continue_request(first, keep, GREEDY, set(), lambda x: "", branch=True)
    while eng.has_unfinished():
        eng.step()
    assert eng.stats.rewrites_recomputed == 0
    assert eng.stats.tokens - tokens == 20 + GREEDY.max_new_tokens - 1  # new ones + decode
    assert a.extra["less"].max_position >= state.max_position  # the state carried on
    # a rewrite from before the last folded position
    cut = state.max_position - 1
    rewrite = first.all_ids[:cut] + _ids(30, seed=6)
    b = eng.continue_request(first, rewrite, GREEDY, set(), lambda x: "", branch=True)
    while eng.has_unfinished():
        eng.step()
        eng.check_invariants()
    assert eng.stats.rewrites_recomputed == 1
    fresh = _run(_engine(tiny_model, "f32", path), rewrite)
    assert b.extra["evictions"] >= 1 and b.output_ids == fresh.output_ids
