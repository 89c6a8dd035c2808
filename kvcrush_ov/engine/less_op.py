"""LESS's custom OpenVINO ops: the native ones of the extension library (cpp/ext/:
``LESSMix``, ``KeptLogSumExp``) built through :class:`LESSNodes`, and the Python
``KeptLogSumExp`` below, the fallback where the library was not built.

PagedAttention returns only its normalised output; LESS needs ``L = logsumexp_i(scale q.k_i)``
over the keys a query sees in the cache. This op reads the keys straight from the cache tensor
(any precision :mod:`kvcrush_ov.engine.kv_codec` decodes; the plugin hands it the cache memory
itself, no copy) through the per-head block tables. The work is C++ (``kvcrush::kept_lse``,
cpp/src/less.cpp: parallel over (token, KV head)), shared by both implementations.

Inputs (see :mod:`kvcrush_ov.transformations.less`): 0 ``q`` f32 [M, Hq*D] (selected tokens),
1 ``key_cache.L`` (per-head pool ``[NB, 1, rows, cols]``), 2 ``head_past_lens.L`` [J],
3 ``block_indices.L``, 4 ``block_indices_begins.L`` [J+1], 5 ``less_token_seq`` [M],
6 ``less_token_offset`` [M], 7 ``scale`` [], 8 the PagedAttention output (ordering only).
``J = B * Hkv`` subsequences, head-major (``j = h*B + s``) or sequence-major (``j = s*Hkv + h``).
Output: f32 [M, Hq]: token ``m``, query head ``h*G + g`` -> the log-sum-exp over rows
``0 .. past[j] + offset[m]`` of subsequence ``j`` (its own key included, causal).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import openvino as ov
from openvino.utils.node_factory import NodeFactory

from kvcrush_ov import _core
from kvcrush_ov.engine.kv_codec import CacheLayout

_FORMATS = {"f32": 1, "f16": 2, "bf16": 3}  # kvcrush::KeyFormat of plain key rows


class KeptLogSumExp(ov.Op):
    """Log-sum-exp of ``scale * q . k`` over each selected token's cached keys (module doc)."""

    def __init__(self, inputs: list[ov.Output] | None = None, layout: CacheLayout | None = None,
                 num_kv_heads: int = 1, group: int = 1, sequence_major: bool = False) -> None:
        # set first: the base constructor validates (output shape). The layout is kept as plain
        # fields: the op outlives the interpreter's modules (a held C++ object would leak)
        self.geometry = None if layout is None else (layout.kind, layout.precision, layout.rows,
                                                     layout.cols, layout.block_size)
        self.num_kv_heads = num_kv_heads
        self.group = group
        self.sequence_major = sequence_major
        self._geometry: tuple[int, ...] | None = None
        self._format = 0
        super().__init__(self, inputs)

    def validate_and_infer_types(self) -> None:
        heads = self.num_kv_heads * self.group
        self.set_output_type(0, ov.Type.f32, ov.PartialShape([-1, heads]))

    def clone_with_new_inputs(self, new_inputs: list[ov.Output]) -> KeptLogSumExp:
        return KeptLogSumExp(new_inputs, self._layout(), self.num_kv_heads, self.group,
                             self.sequence_major)

    def _layout(self) -> CacheLayout | None:
        return None if self.geometry is None else CacheLayout.from_shape(*self.geometry)

    def has_evaluate(self) -> bool:
        return True

    def evaluate(self, outputs: list[ov.Tensor], inputs: list[ov.Tensor]) -> bool:
        q = inputs[0].data
        m = q.shape[0]
        outputs[0].set_shape([m, self.num_kv_heads * self.group])
        if m == 0:
            return True
        if self._geometry is None:  # plain integers: the C++ BlockLayout is built per call
            layout = self._layout()
            n = layout.native
            self._geometry = (int(n.by_channel), n.levels, n.block_size, n.head_dim,
                              n.head_block_bytes, n.header_bytes, n.row_bytes)
            self._format = 0 if layout.by_channel else _FORMATS[layout.precision]
        cache = inputs[1]
        blocks = cache.data.reshape(-1).view(np.uint8).reshape(int(cache.get_shape()[0]), -1)
        outputs[0].data[...] = _core.kept_lse(
            blocks, self._geometry, self._format, q, self.num_kv_heads, self.group,
            float(inputs[7].data), inputs[2].data, inputs[3].data, inputs[4].data,
            inputs[5].data, inputs[6].data, self.sequence_major)
        return True


_EXT_NAME = {"win32": "kvcrush_ov_ext.dll", "darwin": "libkvcrush_ov_ext.dylib"}.get(
    sys.platform, "libkvcrush_ov_ext.so")


def native_library() -> Path | None:
    """The OpenVINO extension library built with the package (cpp/ext/, beside the compiled
    module kvcrush_ov._core), or None where it was not built (no OpenVINO C++ at build time)."""
    path = Path(_core.__file__).parent / _EXT_NAME
    return path if path.is_file() else None


@functools.cache
def _node_factory(library: str) -> NodeFactory:
    """One NodeFactory per extension library for the whole process, never released: the nodes
    it creates (and every compiled model holding them) run code of the library, which must stay
    loaded until the last of them is gone; a factory owned by a runner could be collected (and
    unload the library) before the runner's compiled models (a segfault at their destruction)."""
    factory = NodeFactory()
    factory.add_extension(library)
    return factory


class LESSNodes:
    """Builds a layer's LESS nodes (transformations/less.py's ``LESSNodes``): with the extension
    library built, one native ``LESSMix`` per layer (``fused``: no call into Python per layer
    and step); else the Python :class:`KeptLogSumExp` inside graph ops. ``native``: None picks,
    True requires the library, False forces the Python op."""

    def __init__(self, layout: CacheLayout, num_kv_heads: int, group: int,
                 native: bool | None = None) -> None:
        self.layout, self.num_kv_heads, self.group = layout, num_kv_heads, group
        lib = native_library() if native is not False else None
        if native and lib is None:
            raise FileNotFoundError(f"{_EXT_NAME} was not built (see cpp/CMakeLists.txt)")
        self.library = lib
        self._nodes = _node_factory(str(lib)) if lib is not None else None

    @property
    def fused(self) -> bool:
        return self._nodes is not None

    def _attrs(self, sequence_major: bool) -> dict:
        n = self.layout.native
        return {"num_kv_heads": self.num_kv_heads, "group": self.group,
                "sequence_major": sequence_major,
                "format": 0 if self.layout.by_channel else _FORMATS[self.layout.precision],
                "by_channel": bool(n.by_channel), "levels": n.levels,
                "block_size": n.block_size, "head_dim": n.head_dim,
                "head_block_bytes": n.head_block_bytes, "header_bytes": n.header_bytes,
                "row_bytes": n.row_bytes}

    def lse(self, inputs: list[ov.Output], sequence_major: bool) -> ov.Node:
        """KeptLogSumExp: native when the library is loaded, else the Python op."""
        if self._nodes is None:
            return KeptLogSumExp(inputs, self.layout, self.num_kv_heads, self.group,
                                 sequence_major)
        return self._nodes.create("KeptLogSumExp", inputs, self._attrs(sequence_major))

    def mix(self, inputs: list[ov.Output], sequence_major: bool) -> ov.Node:
        """LESSMix (native only)."""
        if self._nodes is None:
            raise RuntimeError("LESSMix needs the extension library")
        return self._nodes.create("LESSMix", inputs, self._attrs(sequence_major))
