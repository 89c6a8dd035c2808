"""Model runner for upstream-compatible eviction: GenAI's own graph with per-layer block tables.

GenAI evicts whole blocks, all heads of a layer together and the same number of blocks in every
layer, from head-summed scores. Reproducing its tokens needs its exact numbers, so this runner
uses the plain paged graph (the one GenAI runs: heads summed inside the kernel, cache
``[blocks, kv_heads, rows, cols]``) with one ``block_indices.L`` per layer; ``past_lens``,
``subsequence_begins`` and ``block_indices_begins`` stay shared, which holds because every layer
keeps the same number of blocks. Block tables come from the same HeadKVCacheManager with one
"head" per layer (a table block is a whole plain block), so the evictor works unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov

from kvcrush_ov.engine.head_cache_manager import HeadTable
from kvcrush_ov.engine.head_model_runner import HeadModelRunner, without_scores
from kvcrush_ov.transformations.paged import read_paged_model

_I32 = np.int32


class LayerModelRunner(HeadModelRunner):
    """Plain paged graph with per-layer block tables and head-summed scores."""

    #: The scoreless copy is the same plain graph: it runs any step without scores.
    decode_graph_one_token = False

    def _graphs(self, model_dir: Path) -> tuple[ov.Model, ov.Model]:
        self.table_heads = 1
        model = read_paged_model(model_dir / "openvino_model.xml", score_outputs=True,
                                 logits_indices=True, score_aggregation=True,
                                 per_layer_blocks=True)
        return model, without_scores(model.clone())

    def set_layout(self, req: ov.InferRequest, tables: list[HeadTable],
                   counts: list[int], decode: bool, layers: range | None = None) -> int:
        """The plain graph's shared tables (every layer; ``layers`` must be None here)."""
        if layers is not None:
            raise ValueError("the plain per-layer graph has no layer-range parts (FastKV)")
        lens = np.stack([t.lens[:, 0] for t in tables])  # [B, L], this step's tokens included
        if (lens != lens[:, :1]).any():
            raise AssertionError("per-layer tables must hold the same number of tokens")
        key = tuple(t.version for t in tables)
        if self._tables_key.get(id(req)) != key:
            begins = [0]
            for t in tables:
                begins.append(begins[-1] + len(t.blocks[0][0]))
            for layer in range(self.num_layers):
                flat = [b for t in tables for b in t.blocks[layer][0]]
                req.set_tensor(f"block_indices.{layer}", ov.Tensor(np.asarray(flat, dtype=_I32)))
            req.set_tensor("block_indices_begins", ov.Tensor(np.asarray(begins, dtype=_I32)))
            self._tables_key[id(req)] = key
        past = lens[:, 0] - np.asarray(counts, dtype=np.int64)
        self.inputs.put(req, "past_lens", past, _I32)
        self.inputs.put(req, "subsequence_begins", np.concatenate([[0], np.cumsum(counts)]), _I32)
        return int(lens.max())
