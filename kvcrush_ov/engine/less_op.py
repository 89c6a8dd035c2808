"""``LESSMix``: one layer's LESS attention mixing, an OpenVINO custom op (two hosts, one kernel).

PagedAttention returns only its normalised output; LESS needs the log-sum-exp ``L`` of the
logits over the keys each query sees in the cache. ``LESSMix`` reads those keys straight from the
cache tensor (every format :mod:`kvcrush_ov.engine.kv_codec` decodes; the plugin hands it the
cache memory itself, no copy) through the per-head block tables, and returns the mixed rows
``a * o_kept + (1 - a) * N / Z`` (``N, Z`` from ``phi(q)`` and the state; ``a = sigmoid(L - log
Z)``, exactly 1 when ``Z = 0``). The work is C++ (``kvcrush::less_mix``, cpp/src/less.cpp).

It runs in one of two hosts, chosen by :class:`LESSNodes`:

- the native op of the extension library (cpp/ext/less_mix_op.cpp, ``libkvcrush_ov_ext``), where
  it was built (``scripts/setup.sh`` builds it against the installed openvino wheel);
- :class:`LESSMix` below, a Python ``ov.Op`` calling the same kernel through ``_core``, where it
  was not (e.g. ``pip wheel .`` without OpenVINO's C++ runtime). It costs a call into Python per
  layer and step.

Inputs (see :mod:`kvcrush_ov.transformations.less`): 0 ``q`` f32 [T, Hq*D] (every token of the
step), 1 the kept output f32 [T, Hq*Dv], 2 ``less_token_index`` i32 [M] (the rows to mix),
3 ``key_cache.L`` (per-head pool ``[NB, 1, rows, cols]``), 4 ``head_past_lens.L`` [J],
5 ``block_indices.L``, 6 ``block_indices_begins.L`` [J+1], 7 ``less_token_seq`` [M],
8 ``less_token_offset`` [M], 9 ``scale`` [], 10 ``less_state_H.L`` [B, Hkv, F, Dv],
11 ``less_state_z.L`` [B, Hkv, F], 12..15 phi's w1 [Hq, D, Y], b1 [Hq, Y], w2 [Hq, Y, F],
b2 [Hq, F]. ``J = B * Hkv`` subsequences, head-major (``j = h*B + s``) or sequence-major
(``j = s*Hkv + h``); token ``m`` sees rows ``0 .. past[j] + offset[m]`` of subsequence ``j``
(its own key included, causal). Output: f32 [T, Hq*Dv], input 1 with its rows ``idx`` mixed
(one op per layer selects the rows too: every op of a decode step costs a dispatch).
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


def _geometry(layout: CacheLayout) -> dict:
    """The op's attributes describing the key cache (kvcrush::BlockLayout, KeyFormat)."""
    n = layout.native
    return {"format": 0 if layout.by_channel else _FORMATS[layout.precision],
            "by_channel": bool(n.by_channel), "levels": n.levels, "block_size": n.block_size,
            "head_dim": n.head_dim, "head_block_bytes": n.head_block_bytes,
            "header_bytes": n.header_bytes, "row_bytes": n.row_bytes}


class LESSMix(ov.Op):
    """The Python host of ``LESSMix`` (module doc): the same kernel as the native op."""

    def __init__(self, inputs: list[ov.Output] | None = None,
                 attrs: dict | None = None) -> None:
        # set first: the base constructor validates. Plain values only: the op may outlive the
        # interpreter's modules (a held binding object would be reported leaked)
        self.attrs = dict(attrs or {})
        super().__init__(self, inputs)

    def validate_and_infer_types(self) -> None:
        self.set_output_type(0, ov.Type.f32, self.get_input_partial_shape(1))

    def clone_with_new_inputs(self, new_inputs: list[ov.Output]) -> LESSMix:
        return LESSMix(new_inputs, self.attrs)

    def has_evaluate(self) -> bool:
        return True

    def evaluate(self, outputs: list[ov.Tensor], inputs: list[ov.Tensor]) -> bool:
        q, o = inputs[0].data, inputs[1].data
        idx = np.ascontiguousarray(inputs[2].data, dtype=np.int32)
        outputs[0].set_shape(list(inputs[1].get_shape()))
        a = self.attrs
        geometry = (int(a["by_channel"]), a["levels"], a["block_size"], a["head_dim"],
                    a["head_block_bytes"], a["header_bytes"], a["row_bytes"])
        cache = inputs[3]
        blocks = cache.data.reshape(-1).view(np.uint8).reshape(int(cache.get_shape()[0]), -1)
        # the kernel selects, checks and mixes the rows (as the native op does)
        outputs[0].data[...] = _core.less_mix(
            blocks, geometry, a["format"], q, o, idx, a["num_kv_heads"], a["group"],
            float(inputs[9].data), *(inputs[k].data for k in range(4, 9)),
            a["sequence_major"], *(inputs[k].data for k in (12, 13, 14, 15)),
            inputs[10].data, inputs[11].data)
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
    loaded until the last of them is gone."""
    factory = NodeFactory()
    factory.add_extension(library)
    return factory


class LESSNodes:
    """Builds a layer's ``LESSMix`` node (transformations/less.py's ``LESSNodes``): native when
    the extension library was built, else the Python host. ``native``: None picks, True requires
    the library, False forces the Python host."""

    def __init__(self, layout: CacheLayout, num_kv_heads: int, group: int,
                 native: bool | None = None) -> None:
        self.layout, self.num_kv_heads, self.group = layout, num_kv_heads, group
        lib = native_library() if native is not False else None
        if native and lib is None:
            raise FileNotFoundError(f"{_EXT_NAME} was not built (see cpp/CMakeLists.txt)")
        self.library = lib
        self._nodes = _node_factory(str(lib)) if lib is not None else None

    @property
    def native(self) -> bool:
        return self._nodes is not None

    def mix(self, inputs: list[ov.Output], sequence_major: bool) -> ov.Node:
        attrs = {"num_kv_heads": self.num_kv_heads, "group": self.group,
                 "sequence_major": sequence_major, **_geometry(self.layout)}
        if self._nodes is None:
            return LESSMix(inputs, attrs)
        return self._nodes.create("LESSMix", inputs, attrs)
