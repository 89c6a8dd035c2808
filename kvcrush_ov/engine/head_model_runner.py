"""Model runner for the per-KV-head graph (``transformations/per_head.py``), used with eviction.

Every (sequence, KV head) pair is a subsequence of its own with per-layer block tables and
lengths, so layers and heads may hold different tokens after eviction. Two compiled graphs share
the cache tensors:

- the scored graph (head-major subsequences, ``scores.L`` outputs: per-head attention scores
  summed over the last ``score_aggregation_window[s]`` queries of each sequence) runs every step
  that needs scores and every step with a multi-token chunk (prefill; measured: score outputs
  cost a 256-token prefill chunk nothing, 0.99-1.00x);
- the decode graph (sequence-major subsequences, no score outputs) runs decode-only steps that
  need no scores: score outputs cost decode time, and sequence-major subsequences need no
  transposes (measured on Qwen2.5-0.5B at 1K context: 0.956x the head-major scoreless graph);
- optionally (``CacheEvictionConfig.plain_prefill``) the plain paged graph (no per-head
  rewrite, no score outputs) runs the prompt chunks nobody scores while every sequence of the step
  holds whole block groups (``HeadTable.plain_table``: head ``h`` of plain block ``g`` is
  head block ``g * H + h`` in every layer, so ``[blocks * H, 1, rows, cols]`` and the plain
  ``[blocks, H, rows, cols]`` are the same memory): the per-head graph's transposes and
  per-head tables cost a prompt about 9-13% of its prefill on the 16-core Xeon, for a second
  compiled copy of the weights (docs/performance.md).

Cache tensors per layer: per-head pools ``[num_head_blocks, 1, rows, cols]`` (``num_head_blocks``
= blocks * KV heads); rows / cols / element type are read from the compiled model.
"""

from __future__ import annotations

import time
from functools import cached_property
from pathlib import Path

import numpy as np
import openvino as ov

from kvcrush_ov import _core
from kvcrush_ov.engine.head_cache_manager import HeadTable, Move
from kvcrush_ov.engine.kv_codec import KEY, CacheLayout, FlatMoves, flatten_moves
from kvcrush_ov.engine.model_runner import ModelRunner
from kvcrush_ov.engine.query_scores import ReplayScorer
from kvcrush_ov.engine.scheduler import ScheduledChunk
from kvcrush_ov.errors import ConfigError
from kvcrush_ov.kvzap.weights import KVzapWeights
from kvcrush_ov.less.kernels import LESSWeights
from kvcrush_ov.transformations.kvzap import OUTPUT as KVZAP_OUTPUT
from kvcrush_ov.transformations.kvzap import add_kvzap
from kvcrush_ov.transformations.less import (
    LESS_TOKEN_INDEX,
    LESS_TOKEN_OFFSET,
    LESS_TOKEN_SEQ,
    add_less,
    probe_cache_types,
    set_cache_types,
    state_h_name,
    state_z_name,
)
from kvcrush_ov.transformations.paged import read_paged_model
from kvcrush_ov.transformations.per_head import (
    HEAD_SUBSEQUENCE_BEGINS,
    PerHeadLayout,
    block_indices_begins_name,
    block_indices_name,
    head_past_lens_name,
    to_per_head,
)
from kvcrush_ov.transformations.query_key import (
    add_query_key,
    attention_scale,
    key_name,
    query_name,
)

_I32 = np.int32
WINDOW = "score_aggregation_window"


def without_scores(model: ov.Model) -> ov.Model:
    """``model`` with its ``scores.L`` results removed (in place; returns it)."""
    for result in list(model.get_results()):
        if any(n.startswith("scores.") for n in result.output(0).get_names()):
            model.remove_result(result)
    model.validate_nodes_and_infer_types()
    return model


class TableBuffers:
    """One infer request's ``block_indices.L`` / ``block_indices_begins.L`` tensors, bound once
    (shared memory) and rewritten in place each step.

    PagedAttention reads only ``block_indices[begins[j]:begins[j + 1]]``, so the indices buffer
    may be longer than the tables (padded); a step calls ``set_tensor`` only when a layer's
    tables outgrow the buffer or the number of subsequences changes (measured on SmolLM2: 60
    calls a prefill step were 15 ms of a 3.3K-token prefill's 36-51 ms outside OpenVINO).
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.indices = np.zeros((num_layers, 0), np.int32)  # [L, capacity]
        self.begins = np.zeros((num_layers, 0), np.int32)  # [L, subsequences + 1]
        self.bound: set[int] = set()  # layers whose tensors view the current buffers

    def write(self, req: ov.InferRequest, layers: range, flats: list[list[int]],
              begins: np.ndarray) -> None:
        """``flats[i]`` / ``begins[i]`` [subsequences + 1]: layer ``layers[i]``'s tables."""
        need = max((len(f) for f in flats), default=0)
        if need > self.indices.shape[1]:
            cap = max(need, 2 * self.indices.shape[1], 16)
            self.indices = np.zeros((self.num_layers, cap), np.int32)
            self.bound.clear()
        if begins.shape[1] != self.begins.shape[1]:
            self.begins = np.zeros((self.num_layers, begins.shape[1]), np.int32)
            self.bound.clear()
        for i, layer in enumerate(layers):
            self.indices[layer, :len(flats[i])] = flats[i]
            self.begins[layer] = begins[i]
            if layer not in self.bound:
                req.set_tensor(block_indices_name(layer),
                               ov.Tensor(self.indices[layer], shared_memory=True))
                req.set_tensor(block_indices_begins_name(layer),
                               ov.Tensor(self.begins[layer], shared_memory=True))
                self.bound.add(layer)


class HeadModelRunner(ModelRunner):
    """Compiled per-head model (scored, and scoreless for decode steps) + per-head cache pools."""

    #: The decode graph accepts only steps with one token per sequence (sequence-major).
    decode_graph_one_token = True

    def _graphs(self, model_dir: Path) -> tuple[ov.Model, ov.Model]:
        """(scored graph for any step, scoreless decode graph); sets the layouts."""
        paged = read_paged_model(model_dir / "openvino_model.xml", score_outputs=True,
                                 logits_indices=True, score_aggregation=True)
        if self.kvzap is not None:  # every graph below predicts its tokens' KVzap scores
            k = self.kvzap
            add_kvzap(paged, k.weight, k.bias, k.weight2, k.bias2, k.skip)
        # clones share the read model's weights (a graph read again cost twice the memory)
        self._plain_graph = without_scores(paged.clone()) if self.plain_prefill else None
        decode = to_per_head(paged.clone(), sequence_major=True)
        model = to_per_head(paged)
        self.layout = PerHeadLayout.from_model(model)
        self.decode_layout = PerHeadLayout.from_model(decode)
        self.table_heads = self.layout.num_kv_heads
        return model, without_scores(decode)

    def _compile(self, model_dir: Path, device: str, props: dict) -> ov.CompiledModel:
        model, decode = self._graphs(model_dir)
        if self.less is not None:
            self._add_less(model, decode, device, props)
        self._scored_graph = model  # cloned by enable_query_keys (shares the weights)
        self.query_key_request: ov.InferRequest | None = None
        self.decode_compiled = self.core.compile_model(decode, device, props)
        self.decode_request = self.decode_compiled.create_infer_request()
        self.plain_request: ov.InferRequest | None = None
        plain = getattr(self, "_plain_graph", None)
        if plain is not None:
            self.plain_request = self.core.compile_model(plain, device,
                                                         props).create_infer_request()
            self._plain_graph = None
        self.plain_steps = 0
        self.score_infer_s = 0.0
        self.warmup_s = 0.0
        self.scored_steps = 0
        return self.core.compile_model(model, device, props)

    def __init__(self, model_dir: str | Path, device: str, precision: str,
                 properties: dict | None = None, less: LESSWeights | None = None,
                 plain_prefill: bool = False, kvzap: KVzapWeights | None = None) -> None:
        """``plain_prefill``: also compile the plain paged graph (a second compiled copy of
        the weights: +28% peak RSS on SmolLM2-135M) for the prompt chunks nobody scores.
        ``kvzap``: every graph also outputs KVzap's predicted scores of its tokens
        (transformations/kvzap.py), :attr:`last_kvzap` after each step."""
        if plain_prefill and less is not None:
            raise ConfigError("eviction.plain_prefill", True, "False with less")
        self.less = less
        self.kvzap = kvzap
        #: f32 [L, T, Hkv]: the last step's predicted log scores, tokens in step order
        self.last_kvzap: np.ndarray | None = None
        self.plain_prefill = plain_prefill
        super().__init__(model_dir, device, precision, properties)
        self.cache_heads = self.num_kv_heads  # heads inside one cache block (1 here)
        self.num_kv_heads = self.table_heads  # block tables per (sequence, layer)
        self.key_layout, self.value_layout = CacheLayout.from_compiled(self.compiled)
        self._tables_key: dict[int, tuple[int, ...]] = {}
        self._less_sent: dict[int, tuple] = {}  # per request: the states it holds
        self._past_buf: dict[int, np.ndarray] = {}
        self._table_bufs: dict[int, TableBuffers] = {}
        self._compactor = _core.CacheCompactor()  # apply_flat_moves' buffer, kept
        # per layer: [(u8 view, head, native layout)] of its key and value caches, made once
        # per allocation (building them cost 1.5 ms an event on SmolLM2's 30 layers)
        self._raw: dict[int, list[tuple[np.ndarray, int, object]]] = {}

    def _add_less(self, model: ov.Model, decode: ov.Model, device: str, props: dict) -> None:
        """LESS mixing in both graphs (transformations/less.py); the cache parameters get the
        types the plugin would give them (probed on a one-op graph)."""
        w = self.less
        hkv = self.layout.num_kv_heads
        pa_heads = (w.num_heads, hkv, w.head_dim)
        cfg_heads = (self.layout.num_kv_heads * w.group, self.layout.num_kv_heads, w.head_dim)
        if pa_heads != cfg_heads:
            raise ConfigError("less.weights", "LESS", f"weights trained for this model's heads "
                              f"{cfg_heads}", f"the file is for {pa_heads}")
        kt, kd, vt, vd = probe_cache_types(self.core, device, props, w.head_dim, w.head_dim,
                                           w.group)
        key_layout = CacheLayout.from_shape(KEY, kt.get_type_name(), kd[-2], kd[-1])
        for graph in (model, decode):  # one LESSMix op (kvcrush_ov._core) per active layer
            set_cache_types(graph, kt, kd, vt, vd)
            add_less(graph, w, key_layout)

    def _put_less(self, req: ov.InferRequest, chunks: list[ScheduledChunk]) -> None:
        """``less_token_*`` and, when a chunk's sequence has a LESS state, ``less_state_*.L``."""
        rows: list[int] = []
        seqs: list[int] = []
        offs: list[int] = []
        states = []
        t = 0
        for s, c in enumerate(chunks):
            st = c.seq.extra.get("less")
            active = st is not None and not st.empty
            states.append(st if active else None)
            if active:
                rows.extend(range(t, t + c.num_tokens))
                seqs.extend([s] * c.num_tokens)
                offs.extend(range(c.num_tokens))
            t += c.num_tokens
        put = self.inputs.put
        put(req, LESS_TOKEN_INDEX, rows, _I32)
        put(req, LESS_TOKEN_SEQ, seqs, _I32)
        put(req, LESS_TOKEN_OFFSET, offs, _I32)
        if not rows and id(req) in self._less_sent:
            return  # nothing reads the states
        sent = tuple(st.version if st is not None else None for st in states)
        if self._less_sent.get(id(req)) == sent:
            return  # the request still holds these states
        self._less_sent[id(req)] = sent
        w = self.less
        hkv, f, dv = self.layout.num_kv_heads, w.feature_dim, w.head_dim
        h_all = np.zeros((self.num_layers, len(chunks), hkv, f, dv), np.float32)
        z_all = np.zeros((self.num_layers, len(chunks), hkv, f), np.float32)
        for s, st in enumerate(states):
            if st is not None:
                h_all[:, s] = st.H
                z_all[:, s] = st.z
        for layer in w.active_layers:
            put(req, state_h_name(layer), h_all[layer], np.float32)
            put(req, state_z_name(layer), z_all[layer], np.float32)

    @cached_property
    def head_block_bytes(self) -> int:
        """Bytes of one head block (one KV head, ``block_size`` tokens) in one layer (the
        compiled model's cache types and shapes: computed once)."""
        k = ov.Tensor(self.key_type, [1, *self.key_shape]).get_byte_size()
        v = ov.Tensor(self.value_type, [1, *self.value_shape]).get_byte_size()
        return k + v

    @property
    def block_bytes(self) -> int:
        """Bytes of one full block (all heads, all layers), comparable with the plain runner."""
        return self.head_block_bytes * self.num_kv_heads * self.num_layers

    def allocate_cache(self, num_blocks: int) -> None:
        """``num_blocks`` full blocks = ``num_blocks * num_kv_heads`` table blocks per layer."""
        super().allocate_cache(num_blocks * self.num_kv_heads)
        self._raw = {}
        heads = self.num_kv_heads
        for layer, (kt, vt) in enumerate(self._caches):
            for req in (self.decode_request, self.query_key_request):
                if req is not None:
                    req.set_tensor(f"key_cache.{layer}", kt)
                    req.set_tensor(f"value_cache.{layer}", vt)
            if self.plain_request is not None:  # the same memory, [blocks, H, rows, cols]
                for name, t in ((f"key_cache.{layer}", kt), (f"value_cache.{layer}", vt)):
                    shape = list(t.get_shape())
                    self.plain_request.set_tensor(name, ov.Tensor(
                        t.data, ov.Shape([num_blocks, heads, *shape[2:]]),
                        t.get_element_type()))
        self._warm_decode_graph()

    def _warm_decode_graph(self) -> None:
        """Run the decode graph once on a dummy token written to head block 0 (zeroed again
        after): its first inference is slow (about 0.3 s on SmolLM2-135M), and would otherwise
        land on the first decode step of the first request. Its time: ``warmup_s``."""
        num_layers, heads = self.num_layers, self.num_kv_heads
        dummy = HeadTable([[[0] for _ in range(heads)] for _ in range(num_layers)],
                          np.ones((num_layers, heads), np.int64), version=-1)
        req = self.decode_request
        self.set_layout(req, [dummy], [1], decode=True)
        put = self.inputs.put
        put(req, "input_ids", [0], np.int64)
        put(req, "position_ids", [0], np.int64)
        put(req, "max_context_len", 1, _I32)
        put(req, "logits_indices", [0], np.int64)
        if self.less is not None:
            self._put_less(req, [])
        t0 = time.perf_counter()
        req.infer()
        if self.plain_request is not None:  # the plain graph's first inference too
            req = self.plain_request
            for name, value, dtype in (("past_lens", [0], _I32),
                                       ("subsequence_begins", [0, 1], _I32),
                                       ("block_indices", [0], _I32),
                                       ("block_indices_begins", [0, 1], _I32)):
                put(req, name, value, dtype)
            put(req, "input_ids", [0], np.int64)
            put(req, "position_ids", [0], np.int64)
            put(req, "max_context_len", 1, _I32)
            put(req, "logits_indices", [0], np.int64)
            put(req, WINDOW, [1], _I32)
            req.infer()
        self.warmup_s = time.perf_counter() - t0
        for kt, vt in self._caches:
            for t in (kt, vt):
                t.data.reshape(self.num_blocks, -1)[:heads] = 0  # plain block 0: head blocks

    def copy_head_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        """Copy-on-write: ``(layer, src, dst)`` head blocks, keys and values."""
        for layer, src, dst in copies:
            for t in self._caches[layer]:
                view = t.data.reshape(self.num_blocks, -1)
                view[dst] = view[src]

    def apply_moves(self, moves: list[Move]) -> None:
        """Compaction after eviction (see HeadKVCacheManager.compact); kv_codec re-quantizes
        u8 / u4 key blocks that receive rows from several blocks."""
        by_layer: dict[int, list[tuple[int, np.ndarray]]] = {}
        for layer, dst, sources in moves:
            by_layer.setdefault(layer, []).append((dst, sources))
        self.apply_flat_moves({layer: flatten_moves(m) for layer, m in by_layer.items()})

    def apply_flat_moves(self, moves: dict[int, FlatMoves]) -> None:
        """:meth:`apply_moves` with each layer's moves as arrays (what
        HeadKVCacheManager.compact_flat returns); all sources of a layer are read before any
        destination is written."""
        caches, heads, layouts, dst, offsets, pairs = [], [], [], [], [], []
        for layer, flat in moves.items():
            if not len(flat.dst):
                continue
            for raw, head, native in self._raw_heads(layer):
                caches.append(raw)
                heads.append(head)
                layouts.append(native)
                dst.append(flat.dst)
                offsets.append(flat.offsets)
                pairs.append(flat.pairs)
        if caches:  # one parallel pass over every layer's keys and values (C++)
            self._compactor.compact(caches, heads, layouts, dst, offsets, pairs, True)

    def _raw_heads(self, layer: int) -> list[tuple[np.ndarray, int, object]]:
        """(u8 view, head, native layout) of ``layer``'s key then value cache, per cache head
        (kv_codec.CacheLayout.raw_heads), kept until the cache is allocated again."""
        got = self._raw.get(layer)
        if got is None:
            got = []
            for layout, cache in zip((self.key_layout, self.value_layout), self._caches[layer],
                                     strict=True):
                for h in range(self.cache_heads):
                    raw, head = layout.raw_heads(cache, h if self.cache_heads > 1 else None)
                    got.append((raw, head, layout.native))
            self._raw[layer] = got
        return got

    def set_layout(self, req: ov.InferRequest, tables: list[HeadTable],
                    counts: list[int], decode: bool, layers: range | None = None) -> int:
        """Block tables, past lengths and subsequence begins in the subsequence order of the
        decode or the scored graph, for ``layers`` (all by default: a FastKV part has some);
        returns max_context_len."""
        layout = self.decode_layout if decode else self.layout
        layers = range(self.num_layers) if layers is None else layers
        self._set_tables(req, tables, layout, layers)
        lens = np.stack([t.lens[layers.start:layers.stop] for t in tables])  # [B, L', H]
        past = lens - np.asarray(counts, dtype=np.int64)[:, None, None]
        self._set_past(req, layout.order(past.transpose(1, 0, 2)), layers)
        self.inputs.put(req, HEAD_SUBSEQUENCE_BEGINS, layout.subsequence_begins(counts), _I32)
        return int(lens.max())

    def _set_tables(self, req: ov.InferRequest, tables: list[HeadTable],
                    layout: PerHeadLayout, layers: range) -> None:
        """block_indices.L / block_indices_begins.L, written in place into buffers the request
        holds (TableBuffers); rebuilt only when a table changed."""
        key = (tuple(t.version for t in tables), layers.start, layers.stop)
        if self._tables_key.get(id(req)) == key:
            return  # the request still holds these tables
        heads = range(self.num_kv_heads)
        pairs = ([(t, h) for t in tables for h in heads] if layout.sequence_major
                 else [(t, h) for h in heads for t in tables])
        # tables of whole groups (HeadTable.plain_table) are the same in every layer: one
        # layer's flat tables serve all (a prompt's chunks rebuilt 30 alike before)
        same = all(t.plain_table() is not None for t in tables)
        flats: list = []
        begins = np.zeros((len(layers), len(pairs) + 1), np.int64)
        for i, layer in enumerate(layers):
            if same and i:
                flats.append(flats[0])
                begins[i] = begins[0]
                continue
            flat: list[int] = []
            row = begins[i]
            for j, (t, h) in enumerate(pairs):
                flat.extend(t.blocks[layer][h])
                row[j + 1] = len(flat)
            flats.append(np.asarray(flat, np.int32) if same else flat)
        bufs = self._table_bufs.setdefault(id(req), TableBuffers(self.num_layers))
        bufs.write(req, layers, flats, begins)
        self._tables_key[id(req)] = key

    def _set_past(self, req: ov.InferRequest, past: np.ndarray, layers: range) -> None:
        """head_past_lens.L from ``past`` [L', B*H] (``layers``, subsequence order): written in
        place into tensors that share one buffer, so a step with the same batch shape makes no
        set_tensor call."""
        buf = self._past_buf.get(id(req))
        if buf is not None and buf.shape == past.shape:
            np.copyto(buf, past, casting="unsafe")
            return
        buf = np.ascontiguousarray(past, dtype=_I32)
        self._past_buf[id(req)] = buf
        for i, layer in enumerate(layers):
            req.set_tensor(head_past_lens_name(layer), ov.Tensor(buf[i], shared_memory=True))

    def enable_query_keys(self) -> ReplayScorer:
        """Compile (once) the scored graph with its queries and keys as outputs
        (transformations/query_key.py) and return the scorer of KVzip's grouped replay scores
        (engine/query_scores.py) that :meth:`run_heads` with ``query_keys=True`` feeds: a third
        compiled copy of the graph, made only when a policy asks for them (``replay_group``)."""
        if self.query_key_request is None:
            graph = add_query_key(self._scored_graph.clone())
            compiled = self.core.compile_model(graph, self.device, self.props)
            self.query_key_request = compiled.create_infer_request()
            for layer, (kt, vt) in enumerate(self._caches):
                self.query_key_request.set_tensor(f"key_cache.{layer}", kt)
                self.query_key_request.set_tensor(f"value_cache.{layer}", vt)
            width = compiled.output(query_name(0)).get_partial_shape()[-1].get_length()
            head = compiled.output(key_name(0)).get_partial_shape()[-1].get_length()
            self.query_scorer = ReplayScorer(
                self.core, self.device, self.props, self.num_layers, self.num_kv_heads,
                width // head, head, attention_scale(graph), self.read_keys)
        return self.query_scorer

    def read_keys(self, table: HeadTable, layer: int, head: int, count: int) -> np.ndarray:
        """f32 [count, D]: the first ``count`` cached keys of ``table``'s (layer, head) in row
        order, as PagedAttention reads them (dequantized)."""
        layout = self.key_layout
        blocks = layout.head_blocks(self._caches[layer][0])
        return layout.table_rows(blocks, table.blocks[layer][head], count)

    def _read_kvzap(self, req: ov.InferRequest) -> None:
        """:attr:`last_kvzap` from ``req``'s ``kvzap`` output (nothing without KVzap)."""
        if self.kvzap is None:
            return
        out = req.get_tensor(KVZAP_OUTPUT).data
        self.last_kvzap = np.array(out.reshape(out.shape[0], -1, out.shape[-1]))

    def run_heads(self, chunks: list[ScheduledChunk], tables: list[HeadTable],
                  windows: list[int] | None, query_keys: bool = False,
                  ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """One step. ``windows[i]``: queries of chunk i whose scores are summed (>= 1), or None
        when no sequence needs scores (then the decode graph runs if it accepts the step).
        ``query_keys`` (with windows, after :meth:`enable_query_keys`): the step also gives its
        queries and keys, :attr:`last_query_keys` ([L] f32 [Hkv*T, G*D], [L] f32 [Hkv*T, D],
        views valid until the next step).

        Returns logits [sampling chunks, vocab] and, with windows, ``scores.L`` per layer (flat,
        segments ordered j = h*B + s, each ``lens[l, h] + num_tokens`` long: see per_head.py).
        """
        if query_keys and (windows is None or self.query_key_request is None):
            raise ValueError("run_heads(query_keys=True) needs windows and enable_query_keys()")
        if windows is None and self.plain_request is not None:
            plains = [t.plain_table() for t in tables]
            # a prompt chunk of whole-group tables (decode-only steps: the decode graph); such
            # a table was only ever appended to, so its rows are positions 0..start+tokens
            if (all(p is not None for p in plains)
                    and sum(c.num_tokens for c in chunks) > len(chunks)):
                self.plain_steps += 1  # its scores are dropped (without_scores)
                logits = self._run_paged(self.plain_request, chunks, plains,
                                         {WINDOW: ([1] * len(chunks), _I32)})
                self._read_kvzap(self.plain_request)
                return logits, None
        ids: list[int] = []
        pos: list[int] = []
        counts: list[int] = []
        sample_at: list[int] = []
        total = 0
        for c in chunks:
            end = c.start + c.num_tokens
            ids.extend(c.seq.token_slice(c.start, end))
            pos.extend(range(c.start, end))
            counts.append(c.num_tokens)
            total += c.num_tokens
            if c.sample:
                sample_at.append(total - 1)
        decode = windows is None and (not self.decode_graph_one_token or total == len(chunks))
        req = (self.decode_request if decode else
               self.query_key_request if query_keys else self.request)
        max_ctx = self.set_layout(req, tables, counts, decode)
        put = self.inputs.put
        put(req, "input_ids", ids, np.int64)
        put(req, "position_ids", pos, np.int64)
        put(req, "max_context_len", max_ctx, _I32)
        put(req, "logits_indices", sample_at, np.int64)
        if self.less is not None:
            self._put_less(req, chunks)
        if not decode:  # scores nobody asked for (a prefill chunk) are computed and dropped
            put(req, WINDOW, windows if windows is not None else [1] * len(chunks), _I32)
        t0 = time.perf_counter()
        req.infer()
        dt = time.perf_counter() - t0
        self.infer_s += dt
        logits = req.get_tensor("logits").data.reshape(len(sample_at), self.vocab_size)
        self._read_kvzap(req)
        if windows is None:
            return logits, None
        self.score_infer_s += dt
        self.scored_steps += 1
        scores = [np.array(req.get_tensor(f"scores.{layer}").data)
                  for layer in range(self.num_layers)]
        if query_keys:
            self.last_query_keys = (
                [req.get_tensor(query_name(layer)).data for layer in range(self.num_layers)],
                [req.get_tensor(key_name(layer)).data for layer in range(self.num_layers)])
        return logits, scores
