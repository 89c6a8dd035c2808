"""FastKV's token-selective propagation in the engine: the prefill of split sequences.

A sequence whose spec has ``fastkv`` gets a :class:`SplitPlan` when it is queued (if its prompt
has tokens to rank): while its prompt is computed, its chunks run through the *front* part
(layers ``0..L``, transformations/fastkv.py) only, and the front's output rows (the residual
stream after layer ``L``) are kept. The step that completes the prompt ranks the prompt's
tokens at layer ``L`` (eviction/fastkv.py), and the *back* part (layers ``L+1..``, logits)
runs on the chosen rows with their original positions. Other sequences of the same step go
through both parts with all their tokens, so continuous batching goes on; steps without a split
sequence's prompt run the ordinary graphs. Decode is unchanged: the back layers simply hold
fewer rows (their positions are recorded in the sequence's table).

Counters per sequence (``seq.extra["fastkv"]``): the split layer, the tokens the front layers
and the back layers processed for the prompt, and the seconds spent in each part.
"""

from __future__ import annotations

import time

import numpy as np
import openvino as ov

from kvcrush_ov.config import FastKVConfig
from kvcrush_ov.engine.head_cache_manager import HeadKVCacheManager, HeadTable, SplitPlan
from kvcrush_ov.engine.head_model_runner import WINDOW, HeadModelRunner
from kvcrush_ov.engine.scheduler import ScheduledChunk
from kvcrush_ov.engine.sequence import Sequence
from kvcrush_ov.eviction.base import importance_of
from kvcrush_ov.eviction.fastkv import tsp_positions
from kvcrush_ov.eviction.scores import SequenceScores
from kvcrush_ov.eviction.spec import EvictionSpec
from kvcrush_ov.transformations.fastkv import HIDDEN, split_at_layer
from kvcrush_ov.transformations.paged import read_paged_model
from kvcrush_ov.transformations.per_head import PerHeadLayout, to_per_head

_I32 = np.int32


def fixed_tokens(prompt_len: int, spec: EvictionSpec) -> int:
    """Prompt tokens always propagated: the sinks and the recent window (eviction keeps them)."""
    sinks = min(prompt_len, spec.start_size)
    return sinks + min(prompt_len - sinks, spec.recent_size)


def tsp_pooling(spec: EvictionSpec) -> tuple[str, int]:
    """(pooling, kernel) of the split layer's ranking: FastKVConfig's, else the policy's own."""
    own = importance_of(spec.policy)  # KVCrush wraps the importance policy
    pooling = spec.fastkv.pooling or getattr(own, "pooling", "max")
    kernel = spec.fastkv.kernel or getattr(own, "kernel_size", 7)
    return pooling, kernel


class TokenPropagation:
    """The front / back graphs of one split layer and the per-step work of split sequences."""

    def __init__(self, runner: HeadModelRunner, kv: HeadKVCacheManager, split_layer: int) -> None:
        self.runner, self.kv = runner, kv
        self.split_layer = split_layer
        n = runner.num_layers
        self.front_layers, self.back_layers = range(0, split_layer + 1), range(split_layer + 1, n)
        paged = read_paged_model(runner.model_dir / "openvino_model.xml", score_outputs=True,
                                 logits_indices=True, score_aggregation=True)
        front, back = split_at_layer(to_per_head(paged), split_layer)
        core = runner.core
        self.front = core.compile_model(front, runner.device, runner.props).create_infer_request()
        self.back = core.compile_model(back, runner.device, runner.props).create_infer_request()
        self.layout = PerHeadLayout(n, runner.num_kv_heads)
        self._cache_set = False

    def _bind_caches(self) -> None:
        """The parts write the runner's cache tensors (allocated after construction)."""
        for req, layers in ((self.front, self.front_layers), (self.back, self.back_layers)):
            for layer in layers:
                kt, vt = self.runner.cache_tensors(layer)
                req.set_tensor(f"key_cache.{layer}", kt)
                req.set_tensor(f"value_cache.{layer}", vt)
        self._cache_set = True

    # ------------------------------------------------------------------ per request
    def plan(self, seq: Sequence, spec: EvictionSpec) -> None:
        """Register ``seq`` for a split prefill when its prompt has tokens to rank (a spec
        without fastkv unregisters it). Call before its first chunk is scheduled."""
        cfg: FastKVConfig | None = spec.fastkv
        if cfg is None:
            self.forget(seq)
            seq.extra.pop("fastkv", None)
            return
        if cfg.layer_for(self.runner.num_layers) != self.split_layer:
            raise ValueError(f"fastkv.split_layer: this engine's graphs are cut after layer "
                             f"{self.split_layer}, not {cfg.layer_for(self.runner.num_layers)}")
        p = len(seq.prompt_ids)
        fixed = fixed_tokens(p, spec)
        info = {"split_layer": self.split_layer, "prompt_tokens": p, "front_tokens": p,
                "back_tokens": p, "split": False, "front_s": 0.0, "back_s": 0.0}
        seq.extra["fastkv"] = info
        if p - fixed <= 0:
            info["reason"] = "no prompt tokens besides the sinks and the recent window"
            return
        k = cfg.num_propagated(p, fixed)
        info.update(split=True, back_tokens=k)
        self.kv.splits[seq.seq_id] = SplitPlan(self.split_layer + 1, p, k)

    def forget(self, seq: Sequence) -> None:
        self.kv.splits.pop(seq.seq_id, None)
        seq.extra.pop("fastkv_hidden", None)

    def splits(self, c: ScheduledChunk) -> bool:
        """Whether chunk ``c`` is part of a split sequence's prompt."""
        plan = self.kv.splits.get(c.seq.seq_id)
        return plan is not None and c.start < plan.prompt_len

    # ------------------------------------------------------------------ per step
    def run(self, chunks: list[ScheduledChunk], tables: list[HeadTable],
            windows: list[int] | None, spec_of) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step with at least one split prompt chunk. Returns logits [sampling chunks, V]
        and ``scores.l`` of every layer (the back layers' segments only for the sequences that
        went through the back part: the others hold no rows there yet)."""
        if not self._cache_set:
            self._bind_caches()
        wins = list(windows) if windows is not None else [0] * len(chunks)
        final = [self.splits(c) and c.start + c.num_tokens >= self.kv.splits[
            c.seq.seq_id].prompt_len for c in chunks]
        for i, c in enumerate(chunks):  # the split layer's ranking needs the last queries
            if final[i] and not wins[i]:
                wins[i] = min(spec_of(c.seq).window or 1, c.num_tokens)
        t0 = time.perf_counter()
        hidden, front_scores = self._front(chunks, tables, wins)
        t1 = time.perf_counter()
        back_items = []  # (chunk index, hidden rows [n, 1, D], positions [n])
        offset = 0
        for i, c in enumerate(chunks):
            rows = hidden[offset:offset + c.num_tokens]
            offset += c.num_tokens
            positions = np.arange(c.start, c.start + c.num_tokens, dtype=np.int64)
            if not self.splits(c):
                back_items.append((i, rows, positions))
                continue
            store = c.seq.extra
            if c.start == 0:
                store["fastkv_hidden"] = []
            store["fastkv_hidden"].append(np.array(rows))
            if final[i]:
                chosen = self._select(i, c, tables, front_scores, spec_of(c.seq))
                every = np.concatenate(store.pop("fastkv_hidden"))
                self.kv.set_positions(c.seq.seq_id, self.split_layer + 1, chosen)
                back_items.append((i, every[chosen], chosen))
        logits, back_scores = self._back(chunks, tables, wins, back_items)
        t2 = time.perf_counter()
        for i, c in enumerate(chunks):
            info = c.seq.extra.get("fastkv")
            if info is not None and self.splits(c):
                info["front_s"] += (t1 - t0) * c.num_tokens / max(offset, 1)
                if final[i]:
                    info["back_s"] += t2 - t1
        return logits, front_scores + back_scores

    def _select(self, i: int, c: ScheduledChunk, tables: list[HeadTable],
                front_scores: list[np.ndarray], spec: EvictionSpec) -> np.ndarray:
        """Positions chunk ``i``'s sequence propagates: ranked by the split layer's attention
        (this step's queries plus any scored in its earlier chunks)."""
        layer = self.split_layer
        lens = np.stack([t.lens[layer] for t in tables])  # [B, H]
        segs = self.layout.split_scores(front_scores[layer], lens)[i]
        total = np.sum(segs, axis=0, dtype=np.float32)
        earlier: SequenceScores | None = c.seq.extra.get("scores")
        if earlier is not None:
            for h in range(len(segs)):
                acc = earlier.acc[layer][h][:len(total)]
                total[:len(acc)] += acc
        plan = self.kv.splits[c.seq.seq_id]
        pooling, kernel = tsp_pooling(spec)
        return tsp_positions(total, plan.num_propagated - fixed_tokens(plan.prompt_len, spec),
                             spec.start_size, spec.recent_size, kernel, pooling)

    def _part_inputs(self, req: ov.InferRequest, tables: list[HeadTable], counts: list[int],
                     positions: np.ndarray, wins: list[int], layers: range) -> None:
        runner = self.runner
        max_ctx = runner.set_layout(req, tables, counts, decode=False, layers=layers)
        put = runner.inputs.put
        put(req, "position_ids", positions, np.int64)
        put(req, "max_context_len", max_ctx, _I32)
        put(req, WINDOW, wins, _I32)

    def _front(self, chunks: list[ScheduledChunk], tables: list[HeadTable],
               wins: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        ids: list[int] = []
        pos: list[int] = []
        for c in chunks:
            ids.extend(c.seq.token_slice(c.start, c.start + c.num_tokens))
            pos.extend(range(c.start, c.start + c.num_tokens))
        req = self.front
        self._part_inputs(req, tables, [c.num_tokens for c in chunks], np.asarray(pos), wins,
                          self.front_layers)
        self.runner.inputs.put(req, "input_ids", ids, np.int64)
        self._infer(req)
        hidden = req.get_tensor(HIDDEN).data
        scores = [np.array(req.get_tensor(f"scores.{layer}").data)
                  for layer in self.front_layers]
        return hidden, scores

    def _back(self, chunks: list[ScheduledChunk], tables: list[HeadTable], wins: list[int],
              items: list[tuple[int, np.ndarray, np.ndarray]]
              ) -> tuple[np.ndarray, list[np.ndarray]]:
        vocab = self.runner.vocab_size
        if not items:  # only split prompt chunks before their last one: nothing goes on
            return (np.zeros((0, vocab), np.float32),
                    [np.zeros(0, np.float32) for _ in self.back_layers])
        idx = [i for i, _, _ in items]
        counts = [len(p) for _, _, p in items]
        sample_at, total = [], 0
        for i, n in zip(idx, counts, strict=True):
            total += n
            if chunks[i].sample:
                sample_at.append(total - 1)
        req = self.back
        self._part_inputs(req, [tables[i] for i in idx], counts,
                          np.concatenate([p for _, _, p in items]),
                          [min(wins[i], n) for i, n in zip(idx, counts, strict=True)],
                          self.back_layers)
        put = self.runner.inputs.put
        put(req, HIDDEN, np.concatenate([h for _, h, _ in items]), np.float32)
        put(req, "logits_indices", sample_at, np.int64)
        self._infer(req)
        logits = req.get_tensor("logits").data.reshape(len(sample_at), vocab)
        scores = [np.array(req.get_tensor(f"scores.{layer}").data)
                  for layer in self.back_layers]
        return logits, scores

    def _infer(self, req: ov.InferRequest) -> None:
        t0 = time.perf_counter()
        req.infer()
        self.runner.infer_s += time.perf_counter() - t0
