"""Turns a scheduled batch into the paged-attention graph's input tensors and runs it.

The model is converted at load time (kvcrush_ov.transformations) to OpenVINO's PagedAttention
form with a ``logits_indices`` input, so logits are computed only for the positions that sample.
The runner owns the KV cache tensors: per layer ``key_cache.L`` / ``value_cache.L`` of shape
[num_blocks, kv_heads, rows, cols], with rows / cols / element type read from the compiled model
(u8 keys carry 8 extra rows of per-channel scales, u8 values 8 extra columns of per-token ones).
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from pathlib import Path

import numpy as np
import openvino as ov

from kvcrush_ov.device import compile_properties
from kvcrush_ov.engine.scheduler import ScheduledChunk
from kvcrush_ov.transformations.paged import read_paged_model

_I32 = np.int32


class InputBuffers:
    """Input tensors kept alive between steps and written in place.

    A step whose input has the same shape as the last one copies the values into the buffer the
    request already holds (no new ov.Tensor, no set_tensor call); a new shape allocates a new
    buffer once. Buffers are per (request, input name).
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, str], np.ndarray] = {}

    def put(self, req: ov.InferRequest, name: str, values: object, dtype: type) -> None:
        arr = np.asarray(values, dtype=dtype)
        key = (id(req), name)
        buf = self._bufs.get(key)
        if buf is not None and buf.shape == arr.shape:
            np.copyto(buf, arr)
            return
        buf = np.array(arr, dtype=dtype, copy=True)
        self._bufs[key] = buf
        req.set_tensor(name, ov.Tensor(buf, shared_memory=True))


class ModelRunner:
    """Compiled paged model + KV cache tensors.

    model_dir: exported model folder. precision: u8 / u4 / bf16 / f32.
    """

    def __init__(self, model_dir: str | Path, device: str, precision: str,
                 properties: dict | None = None) -> None:
        self.core = ov.Core()
        props = compile_properties(device, precision, properties)
        self.model_dir, self.device, self.props = Path(model_dir), device, props
        self.compiled = self._compile(Path(model_dir), device, props)
        self.request = self.compiled.create_infer_request()
        self.num_layers = sum(1 for i in self.compiled.inputs
                              if i.get_any_name().startswith("key_cache."))
        k = self.compiled.input("key_cache.0")
        v = self.compiled.input("value_cache.0")
        self.key_shape = [d.get_length() for d in list(k.get_partial_shape())[1:]]
        self.value_shape = [d.get_length() for d in list(v.get_partial_shape())[1:]]
        self.key_type, self.value_type = k.get_element_type(), v.get_element_type()
        self.block_size = self.value_shape[1]  # values: [kv_heads, block_size, cols]
        self.num_kv_heads = self.value_shape[0]
        self.vocab_size = self.compiled.output("logits").get_partial_shape()[2].get_length()
        self.infer_s = 0.0  # seconds spent inside OpenVINO, for the benchmark's overhead figure
        self.inputs = InputBuffers()
        self.num_blocks = 0
        self._caches: list[tuple[ov.Tensor, ov.Tensor]] = []

    def _compile(self, model_dir: Path, device: str, props: dict) -> ov.CompiledModel:
        model = read_paged_model(model_dir / "openvino_model.xml", score_outputs=False,
                                 logits_indices=True)
        return self.core.compile_model(model, device, props)

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes across all layers (keys + values), as allocated here."""
        k = ov.Tensor(self.key_type, [1, *self.key_shape]).get_byte_size()
        v = ov.Tensor(self.value_type, [1, *self.value_shape]).get_byte_size()
        return (k + v) * self.num_layers

    def allocate_cache(self, num_blocks: int) -> None:
        """Allocate (zeroed) cache tensors for ``num_blocks`` blocks in every layer."""
        self.num_blocks = num_blocks
        self._caches = []
        for layer in range(self.num_layers):
            kt = ov.Tensor(self.key_type, [num_blocks, *self.key_shape])
            vt = ov.Tensor(self.value_type, [num_blocks, *self.value_shape])
            kt.data[...] = 0  # fresh tensors hold garbage
            vt.data[...] = 0
            self.request.set_tensor(f"key_cache.{layer}", kt)
            self.request.set_tensor(f"value_cache.{layer}", vt)
            self._caches.append((kt, vt))

    def cache_tensors(self, layer: int) -> tuple[ov.Tensor, ov.Tensor]:
        """(key_cache.L, value_cache.L) of ``layer``, for another graph writing the same cache."""
        return self._caches[layer]

    def copy_blocks(self, copies: Seq[tuple[int, int]]) -> None:
        """Copy whole blocks (all layers, keys and values): copy-on-write after a fork."""
        for kt, vt in self._caches:
            for t in (kt, vt):
                # a per-block view; u4 tensors expose packed bytes as a flat array
                view = t.data.reshape(self.num_blocks, -1)
                for src, dst in copies:
                    view[dst] = view[src]

    def run(self, chunks: list[ScheduledChunk], tables: list[list[int]]) -> np.ndarray:
        """Run one step; return logits [num sampling chunks, vocab] (float32), in chunk order.

        chunks[i] writes ``num_tokens`` tokens at positions ``start..``; tables[i] is its block
        table covering ``start + num_tokens`` tokens.
        """
        return self._run_paged(self.request, chunks, tables)

    def _run_paged(self, r: ov.InferRequest, chunks: list[ScheduledChunk],
                   tables: Seq[Seq[int]], extra: dict[str, tuple] | None = None) -> np.ndarray:
        """:meth:`run` on request ``r`` of a plain paged graph; ``extra``: more inputs,
        ``name -> (values, dtype)``."""
        ids: list[int] = []
        pos: list[int] = []
        past, begins, blocks, block_begins, sample_at = [], [0], [], [0], []
        max_ctx = 0
        for c, table in zip(chunks, tables, strict=True):
            end = c.start + c.num_tokens
            ids.extend(c.seq.token_slice(c.start, end))
            pos.extend(range(c.start, end))
            past.append(c.start)
            begins.append(begins[-1] + c.num_tokens)
            blocks.extend(table)
            block_begins.append(len(blocks))
            max_ctx = max(max_ctx, end)
            if c.sample:
                sample_at.append(begins[-1] - 1)
        put = self.inputs.put
        put(r, "input_ids", ids, np.int64)
        put(r, "position_ids", pos, np.int64)
        put(r, "past_lens", past, _I32)
        put(r, "subsequence_begins", begins, _I32)
        put(r, "block_indices", blocks, _I32)
        put(r, "block_indices_begins", block_begins, _I32)
        put(r, "max_context_len", max_ctx, _I32)
        put(r, "logits_indices", sample_at, np.int64)
        for name, (values, dtype) in (extra or {}).items():
            put(r, name, values, dtype)
        t0 = time.perf_counter()
        r.infer()
        self.infer_s += time.perf_counter() - t0
        logits = r.get_tensor("logits").data
        return logits.reshape(len(sample_at), self.vocab_size)
