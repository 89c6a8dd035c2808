"""LESS feature maps, state and mixed attention (Dong et al., ICML 2024): the numpy reference.

LESS keeps a constant-size state per (layer, KV head) for the tokens eviction dropped, and lets
every later query still attend to them through learned feature maps:

- ``phi(q) = |gelu(gelu(q W1 + b1) W2 + b2)|`` per query head (``q`` post-RoPE, ``[.., D]`` ->
  ``[.., F]``);
- ``psi(k) = |k1 + (k1 Wint) * s2|`` with ``k1 = |s1| * gelu(gelu(k W1 + b1) W2 + b2)``, per KV
  head (GQA: the ``G`` query heads of a group share their KV head's ``psi`` and state; each has
  its own ``phi``);
- state of one KV head: ``H`` [F, Dv] and ``z`` [F]; evicted keys / values fold in as
  ``z += sum_j psi(k_j)``, ``H += sum_j psi(k_j) v_j^T`` (about ``F * (Dv + 1)`` numbers, 4 tokens'
  worth for F = 8, D = Dv = 64);
- attention of query head ``h`` over kept tokens ``i`` and the state:
  ``o = (sum_i e^{s_i} v_i + phi(q)^T H) / (sum_i e^{s_i} + phi(q)^T z)``, ``s_i = scale q.k_i``,
  computed as ``a * o_kept + (1 - a) * N / Z`` where ``L = logsumexp(s)``, ``N = phi(q)^T H``,
  ``Z = phi(q)^T z`` and ``a = sigmoid(L - log Z)`` (``a = 1`` exactly when ``Z = 0``, chosen
  by a select, not by clamping ``Z``: an empty state changes nothing, even where every kept
  logit is very negative).

``gelu`` is the tanh approximation everywhere (numpy here, torch in training, OpenVINO's Gelu
tanh mode in the graph), so the three agree to rounding.

Weights (:class:`LESSWeights`) are one ``.npz`` file: per-layer stacks of the arrays below plus a
JSON ``meta`` (model geometry, training policy and budget, data hash, layers trained).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvcrush_ov.errors import ConfigError

FORMAT = "kvcrush-less/1"
_VERSIONS = itertools.count(1)
WEIGHTS_FILE = "less_weights.npz"
_F32 = np.float32

# name -> shape: L layers, Hq query heads, Hkv KV heads, D head dim, Y hidden, F features
ARRAYS: dict[str, tuple[str, ...]] = {
    "q_w1": ("L", "Hq", "D", "Y"), "q_b1": ("L", "Hq", "Y"),
    "q_w2": ("L", "Hq", "Y", "F"), "q_b2": ("L", "Hq", "F"),
    "k_w1": ("L", "Hkv", "D", "Y"), "k_b1": ("L", "Hkv", "Y"),
    "k_w2": ("L", "Hkv", "Y", "F"), "k_b2": ("L", "Hkv", "F"),
    "k_int": ("L", "Hkv", "F", "F"), "k_s1": ("L", "Hkv", "F"), "k_s2": ("L", "Hkv", "F"),
}


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (``torch.nn.functional.gelu(x, approximate='tanh')``)."""
    x = np.asarray(x, dtype=_F32)
    c = _F32(np.sqrt(2.0 / np.pi))
    inner = c * (x + _F32(0.044715) * x * x * x)
    return (_F32(0.5) * x * (_F32(1.0) + np.tanh(inner))).astype(_F32)


@dataclass
class LESSWeights:
    """Trained LESS kernels of one model (arrays: :data:`ARRAYS`; ``meta``: geometry + provenance).

    ``meta`` keys: ``format``, ``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``,
    ``hidden``, ``feature_dim``, ``layers_trained`` (layers ``0..n-1`` are trained; the rest are
    still at their initial, near-zero ``s1``), and free-form provenance (``model``, ``policy``,
    ``budget``, ``data_hash``, ...).
    """

    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    # ----------------------------------------------------------------- geometry
    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.meta["num_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.meta["num_kv_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.meta["head_dim"])

    @property
    def feature_dim(self) -> int:
        return int(self.meta["feature_dim"])

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def dims(self) -> dict[str, int]:
        m = self.meta
        return {"L": int(m["num_layers"]), "Hq": int(m["num_heads"]),
                "Hkv": int(m["num_kv_heads"]), "D": int(m["head_dim"]),
                "Y": int(m["hidden"]), "F": int(m["feature_dim"])}

    # ----------------------------------------------------------------- construction
    @classmethod
    def initial(cls, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                hidden: int = 64, feature_dim: int = 8, seed: int = 0, **provenance: object
                ) -> LESSWeights:
        """Untrained kernels as the authors initialise them (Kaiming-uniform linears, ``s1`` and
        ``s2`` at 1e-4, so ``psi`` starts near zero and LESS starts as a no-op)."""
        meta = {"format": FORMAT, "num_layers": num_layers, "num_heads": num_heads,
                "num_kv_heads": num_kv_heads, "head_dim": head_dim, "hidden": hidden,
                "feature_dim": feature_dim, "layers_trained": 0, **provenance}
        w = cls({}, meta)
        dims = w.dims()
        rng = np.random.default_rng(seed)
        for name, shape in ARRAYS.items():
            dims_ = tuple(dims[s] for s in shape)
            if name in ("k_s1", "k_s2"):
                arr = np.full(dims_, 1e-4, dtype=_F32)
            elif name == "k_int" or name.endswith(("w1", "w2")):
                fan_in = dims_[-2]
                bound = 1.0 / np.sqrt(fan_in)
                arr = rng.uniform(-bound, bound, dims_).astype(_F32)
            else:  # biases
                fan_in = dims["D"] if name.endswith("b1") else dims["Y"]
                bound = 1.0 / np.sqrt(fan_in)
                arr = rng.uniform(-bound, bound, dims_).astype(_F32)
            w.arrays[name] = arr
        w.validate()
        return w

    @classmethod
    def load(cls, path: str | Path) -> LESSWeights:
        """Read a weights file (ConfigError ``less.weights`` if missing or malformed)."""
        p = Path(path)
        if p.is_dir():
            p = p / WEIGHTS_FILE
        if not p.is_file():
            raise ConfigError("less.weights", str(path), "a LESS weights file (.npz) that exists "
                              "(train one with `kvcrush-ov less-train --model M`)")
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: np.asarray(z[k]) for k in z.files if k != "meta"}
                meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError("less.weights", str(path), "a LESS weights file written by "
                              "`kvcrush-ov less-train`", str(e)) from e
        w = cls(arrays, meta)
        w.validate(str(path))
        return w

    def save(self, path: str | Path) -> Path:
        """Write atomically (a temporary file renamed into place); returns the path."""
        self.validate()
        p = Path(path)
        if p.is_dir():
            p = p / WEIGHTS_FILE
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp.npz")
        np.savez(tmp, meta=np.array(json.dumps(self.meta, sort_keys=True)), **self.arrays)
        tmp.replace(p)
        return p

    def validate(self, where: str = "weights") -> None:
        """ConfigError ``less.weights`` unless every array has its shape from ``meta``."""
        if self.meta.get("format") != FORMAT:
            raise ConfigError("less.weights", where, f"a file of format {FORMAT!r}",
                              f"found format {self.meta.get('format')!r}")
        try:
            dims = self.dims()
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError("less.weights", where, "meta with num_layers, num_heads, "
                              "num_kv_heads, head_dim, hidden, feature_dim", str(e)) from e
        if dims["Hq"] % max(dims["Hkv"], 1) or min(dims.values()) < 1:
            raise ConfigError("less.weights", where, "positive sizes with num_heads a multiple "
                              "of num_kv_heads", str(dims))
        for name, shape in ARRAYS.items():
            want = tuple(dims[s] for s in shape)
            got = self.arrays.get(name)
            if got is None:
                raise ConfigError("less.weights", where, f"an array {name!r} of shape {want}")
            if got.shape != want or not np.issubdtype(got.dtype, np.floating):
                raise ConfigError("less.weights", where, f"{name} of shape {want} (float)",
                                  f"found {got.shape} {got.dtype}")
            if not np.isfinite(got).all():
                raise ConfigError("less.weights", where, f"finite values in {name}")
            self.arrays[name] = got.astype(_F32, copy=False)

    def check_model(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                    where: str = "weights") -> None:
        """ConfigError ``less.weights`` unless the kernels were trained for this geometry."""
        want = {"num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
                "head_dim": head_dim}
        got = {k: int(self.meta[k]) for k in want}
        if got != want:
            raise ConfigError("less.weights", where, f"weights trained for this model ({want})",
                              f"the file is for {got}")

    @property
    def active_layers(self) -> list[int]:
        """Layers whose state is on: a layer with ``k_s1 = 0`` (switched off by training) has
        ``psi = 0``, so its state stays empty and attention is exactly as without LESS; the graph
        gets no LESS op there and the engine folds nothing into it."""
        s1 = self.arrays["k_s1"]
        return [i for i in range(self.num_layers) if np.any(s1[i] != 0)]

    # ----------------------------------------------------------------- feature maps
    def phi(self, layer: int, q: np.ndarray) -> np.ndarray:
        """Query features: ``q`` f32 [..., Hq, D] -> [..., Hq, F] (non-negative)."""
        a = self.arrays
        h = gelu(np.einsum("...hd,hdy->...hy", q, a["q_w1"][layer]) + a["q_b1"][layer])
        return np.abs(gelu(np.einsum("...hy,hyf->...hf", h, a["q_w2"][layer]) + a["q_b2"][layer]))

    def psi(self, layer: int, head: int, k: np.ndarray) -> np.ndarray:
        """Key features of KV head ``head``: ``k`` f32 [n, D] -> [n, F] (non-negative)."""
        a = self.arrays
        h = gelu(np.asarray(k, _F32) @ a["k_w1"][layer, head] + a["k_b1"][layer, head])
        k1 = np.abs(a["k_s1"][layer, head]) * gelu(h @ a["k_w2"][layer, head]
                                                   + a["k_b2"][layer, head])
        return np.abs(k1 + (k1 @ a["k_int"][layer, head]) * a["k_s2"][layer, head]).astype(_F32)


class LESSState:
    """LESS state of one sequence: ``H`` f32 [L, Hkv, F, Dv] and ``z`` f32 [L, Hkv, F]."""

    def __init__(self, num_layers: int, num_kv_heads: int, feature_dim: int, v_dim: int) -> None:
        self.H = np.zeros((num_layers, num_kv_heads, feature_dim, v_dim), _F32)
        self.z = np.zeros((num_layers, num_kv_heads, feature_dim), _F32)
        self.num_folded = np.zeros((num_layers, num_kv_heads), np.int64)
        # the largest position folded so far (-1: none): a chat turn that rewrites the
        # conversation from an earlier position cannot take those tokens out of the sums
        self.max_position = -1
        # a new number, unique across states, at every fold: the runner re-sends a state to
        # the graph only when the (states, versions) of a step changed
        self.version = next(_VERSIONS)

    @property
    def empty(self) -> bool:
        return not self.num_folded.any()

    def fold(self, weights: LESSWeights, layer: int, head: int, keys: np.ndarray,
             values: np.ndarray, positions: np.ndarray | None = None) -> None:
        """Fold evicted ``keys`` f32 [n, D] (post-RoPE, as cached) and ``values`` [n, Dv] of
        the tokens at ``positions`` int64 [n] (recorded in :attr:`max_position`)."""
        if len(keys) == 0:
            return
        if positions is not None:
            self.max_position = max(self.max_position, int(np.max(positions)))
        p = weights.psi(layer, head, keys)  # [n, F]
        self.z[layer, head] += p.sum(axis=0)
        self.H[layer, head] += p.T @ np.asarray(values, _F32)
        self.num_folded[layer, head] += len(keys)
        self.version = next(_VERSIONS)

    def copy(self) -> LESSState:
        out = LESSState.__new__(LESSState)
        out.H, out.z, out.num_folded = self.H.copy(), self.z.copy(), self.num_folded.copy()
        out.max_position, out.version = self.max_position, self.version
        return out

    @property
    def nbytes(self) -> int:
        return self.H.nbytes + self.z.nbytes


def mixed_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float,
                    phi_q: np.ndarray, H: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Reference LESS attention of one query head: ``q`` [D], kept ``keys`` [n, D] and ``values``
    [n, Dv], ``phi_q`` [F], the KV head's state ``H`` [F, Dv], ``z`` [F] -> [Dv] (float64)."""
    s = scale * (np.asarray(keys, np.float64) @ np.asarray(q, np.float64))
    m = s.max()
    e = np.exp(s - m)
    num = e @ np.asarray(values, np.float64) + np.exp(-m) * (phi_q @ np.asarray(H, np.float64))
    den = e.sum() + np.exp(-m) * float(phi_q @ np.asarray(z, np.float64))
    return num / den


def default_weights_path(model_dir: str | Path, policy: str = "snapkv") -> Path:
    """Where ``kvcrush-ov less-train`` writes a model's weights by default: beside the model's
    exported folders, ``<model cache folder>/less/<policy>.npz``."""
    return Path(model_dir).parent / "less" / f"{policy}.npz"
