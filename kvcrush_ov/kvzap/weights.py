"""KVzap's trained surrogate (kvcrush_ov/kvzap/train.py): one small model per decoder layer (a
linear map, or an MLP with an optional linear skip) from the normalised input of the attention
to the log importance of the token's key, per KV head."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvcrush_ov.errors import ConfigError

#: a model's surrogate, beside its exported folders (as kvzip_heads.npy and LESS's weights)
KVZAP_FILE = "kvzap.npz"


def default_path(model_dir: str | Path) -> Path:
    """``<model cache folder>/kvzap.npz`` for an exported model folder ``model_dir``."""
    return Path(model_dir).parent / KVZAP_FILE


@dataclass(frozen=True, eq=False)
class KVzapWeights:
    """Linear: ``weight`` f32 [L, D, Hkv], ``bias`` [L, Hkv]. MLP (``hidden`` set):
    ``weight`` is the first layer [L, D, Y], ``bias`` [L, Y], then GELU (erf) and ``weight2``
    [L, Y, Hkv], ``bias2`` [L, Hkv]; with ``skip`` [L, D, Hkv] the MLP's output is added to
    ``x @ skip`` (a residual MLP on a linear map). ``meta``: how it was trained.

    ``position`` f32 [L, K, Hkv] (optional): a term of the token's distance to the sequence's
    end added to every prediction when the cache is ranked, ``sum_k position[l, k, h] *
    log(d) ** (k + 1)`` with ``d = written - position`` (1 for the last token written), since
    KVzip's scores follow the distance to the context's end, which no hidden state can know
    while the prompt is read (:meth:`log_offset`)."""

    weight: np.ndarray
    bias: np.ndarray
    target: str = "kvzip"
    path: str = ""
    meta: dict = field(default_factory=dict)
    weight2: np.ndarray | None = None
    bias2: np.ndarray | None = None
    skip: np.ndarray | None = None
    position: np.ndarray | None = None

    def __post_init__(self) -> None:
        w, b = self.weight, self.bias
        arrays = [w, b]
        ok = w.ndim == 3 and b.shape == (w.shape[0], w.shape[2])
        if self.weight2 is not None or self.bias2 is not None:
            w2, b2 = self.weight2, self.bias2
            ok = ok and w2 is not None and b2 is not None and w2.ndim == 3 and \
                w2.shape[:2] == (w.shape[0], w.shape[2]) and b2.shape == (w.shape[0], w2.shape[2])
            arrays += [x for x in (w2, b2) if x is not None]
        if self.skip is not None:
            ok = ok and self.weight2 is not None and \
                self.skip.shape == (w.shape[0], w.shape[1], self.weight2.shape[2])
            arrays.append(self.skip)
        if self.position is not None:
            p = self.position
            ok = ok and p.ndim == 3 and p.shape[1] >= 1 and \
                p.shape[::2] == (w.shape[0], self.num_kv_heads)
            arrays.append(p)
        if not ok:
            raise ConfigError("kvzap.weights", self.path or "arrays",
                              "weight [L, D, Hkv] and bias [L, Hkv], or an MLP's weight "
                              "[L, D, Y], bias [L, Y], weight2 [L, Y, Hkv], bias2 [L, Hkv] "
                              "and optionally skip [L, D, Hkv]; position [L, K, Hkv] (got "
                              f"{[tuple(x.shape) for x in arrays]})")
        if not all(np.isfinite(x).all() for x in arrays):
            raise ConfigError("kvzap.weights", self.path or "arrays", "finite numbers")

    @property
    def hidden(self) -> int | None:
        """The MLP's hidden width, None for a linear surrogate."""
        return None if self.weight2 is None else int(self.weight.shape[2])

    @property
    def num_layers(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @property
    def num_kv_heads(self) -> int:
        last = self.weight if self.weight2 is None else self.weight2
        return int(last.shape[2])

    @classmethod
    def load(cls, path: str | Path) -> KVzapWeights:
        """From a ``kvzap.npz`` (train.save); ConfigError ``kvzap.weights`` when it is missing
        or malformed, naming how to make one."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError("kvzap.weights", str(path),
                              "a trained surrogate: run `kvcrush-ov kvzap-train --model MODEL "
                              "--recipe` (the measured one; --device cuda on a GPU) or, in "
                              "minutes on a CPU, `kvcrush-ov kvzap-train --model MODEL`")
        try:
            with np.load(path, allow_pickle=False) as z:
                two = {k: np.asarray(z[k], np.float32)
                       for k in ("weight2", "bias2", "skip", "position") if k in z}
                return cls(np.asarray(z["weight"], np.float32), np.asarray(z["bias"], np.float32),
                           str(z["target"]), str(path), json.loads(str(z["meta"])), **two)
        except (KeyError, ValueError, OSError) as err:
            raise ConfigError("kvzap.weights", str(path),
                              f"a kvzap.npz written by kvcrush-ov kvzap-train ({err})") from None

    def log_offset(self, positions: np.ndarray, offsets: np.ndarray, written: int) -> np.ndarray:
        """f32 [R]: the position term of every cached row (0 without ``position``).
        ``positions`` int64 [R] the rows' positions, table after table (table ``r = layer *
        Hkv + head`` holds ``positions[offsets[r]:offsets[r + 1]]``, ``offsets`` [L * Hkv + 1]);
        ``written``: the sequence's tokens so far (a row at ``written - 1`` is at distance 1)."""
        positions = np.asarray(positions, np.int64)
        if self.position is None:
            return np.zeros(len(positions), np.float32)
        tables = self.num_layers * self.num_kv_heads
        if len(offsets) != tables + 1:
            raise ValueError(f"log_offset: offsets has {len(offsets)} entries, {tables + 1} "
                             "expected (L * Hkv + 1)")
        logd = np.log(np.maximum(written - positions, 1)).astype(np.float32)  # [R]
        coef = self.position.transpose(0, 2, 1).reshape(tables, -1)  # [L * Hkv, K]
        per_row = np.repeat(coef, np.diff(offsets), axis=0)  # [R, K]
        out = np.zeros(len(positions), np.float32)
        power = np.ones_like(logd)
        for k in range(coef.shape[1]):
            power = power * logd
            out += per_row[:, k] * power
        return out

    def check_model(self, num_layers: int, hidden_size: int, num_kv_heads: int) -> None:
        """ConfigError when trained for another geometry."""
        want = (num_layers, hidden_size, num_kv_heads)
        have = (self.num_layers, self.hidden_size, self.num_kv_heads)
        if have != want:
            raise ConfigError("kvzap.weights", self.path or "arrays",
                              f"a surrogate of shape (layers, hidden, KV heads) = {want}; this "
                              f"one is {have} (trained for another model)")
