"""Training of the LESS kernels of one model (``kvcrush-ov less-train``), in torch on the CPU.

The recipe of Dong et al. (2024), scaled down to a laptop:

* the base model is frozen (the Hugging Face checkpoint the project converted,
  ``<cache>/models/<name>/hf``); a forward pre-hook on every layer's attention recomputes the
  post-RoPE ``q`` [Hq, n, D], ``k`` / ``v`` [Hkv, n, D] from the module's own projections;
* data: sequences of ``seq_len`` tokens of text the project already fetched that is not a RULER
  sample (Paul Graham's essays, the SQuAD and HotpotQA paragraphs), split into train / validation
  by a hash of each document;
* eviction is simulated as the engine runs the policy LESS is paired with, by the engine's own
  code: for ``snapkv``, the default :class:`~kvcrush_ov.config.CacheEvictionConfig` without
  KVCrush (:data:`ENGINE`; the ``snapkv+less`` column). A random prefix of ``p`` tokens (uniform
  in [seq_len / 2, seq_len - QUERIES]) is the prompt: its last :data:`WINDOW`
  (``snapkv_window_size``) queries score every key (softmax in f32, summed over the window and
  the group's query heads), the planner (:func:`kvcrush_ov.eviction.planner.plan_eviction`)
  keeps the :data:`SINKS` (``start_size``) first and :data:`RECENT` (``recent_size``) last
  tokens and lets the policy (:func:`kvcrush_ov.eviction.factory.make_policy`: SnapKV,
  ``norm_sum``, avg-pooled over :data:`KERNEL_SIZE` = ``NATIVE_KERNEL_SIZE``, centred, per KV
  head) pick the rest of the TOTAL budget ``EvictionSpec.budget(p)`` (``max(int(budget * p),
  sinks + recent)`` tokens per KV head, sinks and recent included); the rest of the prefix is
  evicted into the LESS state. :data:`SIMULATION` versions this recipe (a resumed file must
  share it);
* the :data:`QUERIES` queries after the prefix attend to the kept prefix, to the tokens from ``p``
  up to themselves and to the state; the loss is the MSE between the layer's frozen ``o_proj`` of
  that output and of the full-cache attention output;
* one layer at a time (layers are independent given the frozen model), Adam, a fixed number of
  steps, the parameters with the best validation loss kept (a layer where none beats ignoring
  the state gets ``k_s1 = 0``, an exact no-op, listed in ``meta["off_layers"]``); the weights
  file is saved after every layer (``meta["layers_trained"]``) so that an interrupted run
  resumes where it stopped (same configuration and data hash, else a ConfigError naming the
  field; ``restart`` starts over).

Everything the loss needs that does not depend on the kernels (the kept part's output and
log-sum-exp, the evicted keys / values, the target) is computed once while the model runs and
spilled to a temporary folder under the cache (``<cache>/tmp/.collect-<pid>-*``; the evicted
keys / values in float16, about 3,500 x Hkv x D of each per layer and sequence at seq_len 4096),
so memory stays that of one layer's data. Each layer's files go once loaded, the folder when
the run ends, and a folder left by a run that was killed goes when the next run starts.

torch and transformers are imported inside the functions: ``kvcrush_ov`` imports without them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from kvcrush_ov.config import CacheEvictionConfig
from kvcrush_ov.errors import ConfigError, ModelError
from kvcrush_ov.eviction.factory import make_policy, make_spec
from kvcrush_ov.eviction.planner import plan_eviction
from kvcrush_ov.eviction.scores import SequenceScores
from kvcrush_ov.eviction.spec import EvictionSpec
from kvcrush_ov.less.kernels import ARRAYS, LESSWeights, default_weights_path

POLICIES = ("snapkv",)
# the eviction simulated: the engine's default without KVCrush (its taper gives KVCrush no share
# at a 12.5% budget anyway); every constant below is read from it, none duplicated
ENGINE = CacheEvictionConfig(kvcrush=None)
_POLICY = make_policy(ENGINE)
SINKS = ENGINE.start_size  # first tokens eviction always keeps (32)
RECENT = ENGINE.recent_tokens()  # most recent tokens eviction always keeps (128)
WINDOW = ENGINE.snapkv_window_size  # SnapKV's observation window: the prompt's last queries (32)
KERNEL_SIZE = _POLICY.kernel_size  # the native pooling (NATIVE_KERNEL_SIZE = 31)
POOLING = _POLICY.pooling  # NATIVE_POOLING ("avg")
POOLING_OFFSET = _POLICY.offset  # 0: centred
AGGREGATION = _POLICY.aggregation_mode  # "norm_sum" (the window's scores / 32: same ranking)
# version of the simulation recipe (bump when it changes: a file trained otherwise never resumes)
# 1: 4 sinks, 8-query window, avg over 7, budget counting the selected tokens only (no field)
# 2: the engine's planner and policy, total budget; evicted keys / values spilled as float16
SIMULATION = 2
QUERIES = 64  # queries trained on per sequence: the positions right after the prefix
# the shortest prefix (seq_len // 2) must hold more than the sinks and the recent window, which
# the engine always keeps, and the longest (seq_len - QUERIES) must not be shorter
MIN_SEQ_LEN = max(2 * QUERIES, 2 * (SINKS + RECENT + 1))
_BLOCK_SIZE = 32  # tokens per KV block, for the planner (only block-granular policies read it)
SPILL_DTYPE = "float16"  # the evicted keys / values on disk (float32 where float16 overflows)
VAL_BUCKETS = 8  # a document is validation when its hash % VAL_BUCKETS == 0
CHUNK = 8  # sequences per spill file
SOURCES = ("essays", "squad", "hotpotqa")

# meta fields a resumed run must share with the file (checked in this order; flag for errors)
_RESUME_FIELDS = {"model": "--model", "policy": "--policy", "budget": "--budget",
                  "seq_len": "--seq-len", "sequences": "--sequences", "steps": "--steps",
                  "hidden": "--hidden", "feature_dim": "--features", "seed": "--seed",
                  "lr": "lr", "batch": "batch", "simulation": "simulation", "sinks": "sinks",
                  "recent": "recent", "window": "window", "kernel_size": "kernel_size",
                  "pooling": "pooling", "pooling_offset": "pooling_offset",
                  "aggregation_mode": "aggregation_mode", "queries": "queries",
                  "prefix_range": "prefix_range", "data_hash": "data_hash"}


def _say(msg: str) -> None:
    print(f"[less-train] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """What ``kvcrush-ov less-train`` trains; :meth:`check` names the flag of a bad value.

    budget: the engine's TOTAL budget as a fraction of the prompt (the prefix), sinks and recent
        window included, as ``CacheEvictionConfig.max_cache_size``;
    sequences: training sequences (validation gets ``max(2, sequences // 8)`` more, from other
        documents); steps: Adam steps per layer (``batch`` sequences each); layers: train at most
        this many more layers in this run (None: all the rest); out: the weights file (default
        :func:`kvcrush_ov.less.kernels.default_weights_path` of the model); restart: ignore an
        existing file instead of resuming it.
    """

    model: str
    policy: str = "snapkv"
    budget: float = 0.125
    seq_len: int = 4096  # the deployment length: 1024-token training hurt on 4K prompts
    sequences: int = 64
    steps: int = 300
    hidden: int = 64
    features: int = 8
    seed: int = 0
    out: str | Path | None = None
    restart: bool = False
    layers: int | None = None
    lr: float = 1e-3
    batch: int = 8

    @property
    def val_sequences(self) -> int:
        return max(2, self.sequences // 8)

    def check(self) -> None:
        def integer(name: str, value: object, low: int, high: int | None = None) -> None:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
            if not ok or (high is not None and value > high):
                raise ConfigError(name, value, f"an integer >= {low}"
                                  + (f" and <= {high}" if high is not None else ""))

        if not isinstance(self.model, (str, Path)) or not str(self.model).strip():
            raise ConfigError("--model", self.model, "a registry name or a Hugging Face "
                              "checkpoint folder")
        if self.policy not in POLICIES:
            raise ConfigError("--policy", self.policy, f"one of {', '.join(POLICIES)}")
        if (isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int)
                or self.seq_len < MIN_SEQ_LEN):
            raise ConfigError("--seq-len", self.seq_len, f"an integer >= {MIN_SEQ_LEN} (half "
                              f"of it, the shortest prefix, must exceed the {SINKS} sinks + "
                              f"{RECENT} recent tokens the engine always keeps)")
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, float) or not 0.0 < b < 1.0:
            raise ConfigError("--budget", b, "a fraction of the prefix in (0, 1), e.g. 0.125")
        integer("--sequences", self.sequences, 1)
        integer("--steps", self.steps, 1)
        integer("--hidden", self.hidden, 1)
        integer("--features", self.features, 1)
        integer("--seed", self.seed, 0)
        if self.layers is not None:
            integer("--layers", self.layers, 1)
        integer("batch", self.batch, 1)
        if not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1:
            raise ConfigError("lr", self.lr, "a learning rate in (0, 1)")
        if not isinstance(self.restart, bool):
            raise ConfigError("--restart", self.restart, "True or False")
        if self.out is not None and Path(self.out).is_dir():
            raise ConfigError("--out", str(self.out), "a file path (.npz), not a folder")


def resolve_model(model: str | Path) -> tuple[str, Path]:
    """(name, Hugging Face checkpoint folder) of a registry name or a checkpoint folder."""
    from kvcrush_ov.models import store
    from kvcrush_ov.models.registry import get_spec

    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ConfigError("--model", str(model), "a registry name or a Hugging Face "
                              "checkpoint folder (with config.json)")
        name = folder.parent.name if folder.name == "hf" else folder.name
        return name, folder
    try:
        spec = get_spec(str(model))
    except ConfigError as e:
        raise ConfigError("--model", model, e.allowed + ", or a Hugging Face checkpoint "
                          "folder") from None
    hf = store.hf_dir(spec.name)
    if not store.is_complete(hf):
        raise ModelError(f"model={spec.name!r}: no Hugging Face checkpoint at {hf}; fetch the "
                         f"model first: kvcrush-ov models fetch {spec.name}")
    return spec.name, hf


# ---------------------------------------------------------------------------- data
def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@lru_cache(maxsize=1)
def documents() -> dict[str, tuple[str, ...]]:
    """Training text by source: whole essays, SQuAD contexts, HotpotQA paragraphs (title +
    sentences), each deduplicated and ordered by sha256 (independent of the files' order).
    Questions and answers are never used."""
    from kvcrush_ov.data import essays
    from kvcrush_ov.eval.ruler_data import ruler_dir

    folder = ruler_dir()
    squad = json.loads((folder / "squad.json").read_text(encoding="utf-8"))["data"]
    hotpot = json.loads((folder / "hotpotqa.json").read_text(encoding="utf-8"))
    docs = {"essays": set(essays().values()),
            "squad": {p["context"] for d in squad for p in d["paragraphs"]},
            "hotpotqa": {f"{t}\n{''.join(s)}" for d in hotpot for t, s in d["context"]}}
    return {k: tuple(sorted((t for t in v if t.strip()), key=_sha)) for k, v in docs.items()}


def _is_val(text: str) -> bool:
    return int(_sha(text)[:8], 16) % VAL_BUCKETS == 0


def _chunks(tokenizer, docs: tuple[str, ...], length: int) -> Iterator[list[int]]:
    """``length``-token pieces of the documents' tokens joined in order (blank line between)."""
    buf: list[int] = []
    for doc in docs:
        buf.extend(tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"])
        while len(buf) >= length:
            yield buf[:length]
            buf = buf[length:]


def prefix_range(seq_len: int) -> tuple[int, int]:
    """Shortest and longest prefix (both included) of a ``seq_len``-token sequence: at seq_len
    4096, 2048..4032 tokens, so that 1,792..3,528 are evicted at a 12.5% budget (a RULER-4K
    prompt evicts about 3,400)."""
    return seq_len // 2, seq_len - QUERIES


@dataclass
class Data:
    """Token ids ``train`` [N, seq_len] / ``val`` [M, seq_len] (int64), prefix lengths, hash."""

    train: np.ndarray
    val: np.ndarray
    train_prefix: np.ndarray
    val_prefix: np.ndarray
    data_hash: str
    sources: dict[str, int] = field(default_factory=dict)


def build_data(tokenizer, seq_len: int, sequences: int, val_sequences: int, seed: int) -> Data:
    """Sequences drawn round-robin from the sources (a source that runs dry is skipped), the
    validation ones from validation documents only; prefix lengths from ``seed``."""
    docs = documents()
    out: dict[str, list[list[int]]] = {}
    sources: dict[str, int] = {}
    for split, want in (("train", sequences), ("val", val_sequences)):
        streams = {s: _chunks(tokenizer, tuple(d for d in docs[s]
                                               if _is_val(d) == (split == "val")), seq_len)
                   for s in SOURCES}
        rows: list[list[int]] = []
        while len(rows) < want and streams:
            for s in list(streams):
                if len(rows) == want:
                    break
                try:
                    rows.append(next(streams[s]))
                    sources[f"{split}_{s}"] = sources.get(f"{split}_{s}", 0) + 1
                except StopIteration:
                    del streams[s]
        if len(rows) < want:
            raise ConfigError("--sequences", sequences, f"at most about {len(rows)} "
                              f"{split} sequences of {seq_len} tokens (the data runs out)")
        out[split] = rows
    train = np.asarray(out["train"], np.int64)
    val = np.asarray(out["val"], np.int64)
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(train, "<i8").tobytes())
    h.update(np.ascontiguousarray(val, "<i8").tobytes())
    lo, hi = prefix_range(seq_len)
    prefix = [np.random.default_rng([seed, i]).integers(lo, hi + 1, size=n)
              for i, n in ((1, len(train)), (2, len(val)))]
    return Data(train, val, prefix[0].astype(np.int64), prefix[1].astype(np.int64),
                h.hexdigest(), sources)


# ---------------------------------------------------------------------------- feature maps (torch)
def gelu(x):
    import torch

    return torch.nn.functional.gelu(x, approximate="tanh")


def phi(p: dict, q):
    """Query features of one layer: ``q`` [..., Hq, n, D] -> [..., Hq, n, F] (``p``: the layer's
    arrays of :data:`ARRAYS`, without the layer axis); as :meth:`LESSWeights.phi`."""
    h = gelu(q @ p["q_w1"] + p["q_b1"][:, None, :])
    return (gelu(h @ p["q_w2"] + p["q_b2"][:, None, :])).abs()


def psi(p: dict, k):
    """Key features of one layer: ``k`` [..., Hkv, n, D] -> [..., Hkv, n, F]; as
    :meth:`LESSWeights.psi` for every KV head at once."""
    h = gelu(k @ p["k_w1"] + p["k_b1"][:, None, :])
    k1 = p["k_s1"].abs()[:, None, :] * gelu(h @ p["k_w2"] + p["k_b2"][:, None, :])
    return (k1 + (k1 @ p["k_int"]) * p["k_s2"][:, None, :]).abs()


def less_attention(o_kept, lse, phi_q, H, z):
    """LESS output of every query head: the kept part's output ``o_kept`` [..., Hq, n, Dv] and
    log-sum-exp ``lse`` [..., Hq, n], ``phi_q`` [..., Hq, n, F], the KV heads' state ``H``
    [..., Hkv, F, Dv] and ``z`` [..., Hkv, F] (query head h reads KV head h // G) ->
    [..., Hq, n, Dv]: ``a * o_kept + (1 - a) * N / Z`` with ``a = sigmoid(lse - log Z)``, and
    ``a = 1`` exactly where ``Z = 0`` (an empty or switched-off state changes nothing, however
    small ``lse`` is: clamping ``Z`` at a tiny value instead gives ``a < 1`` once ``lse`` is
    below about -52, which Qwen2.5's first layer reaches)."""
    import torch

    g = phi_q.shape[-3] // H.shape[-3]
    Hq = H.repeat_interleave(g, dim=-3)
    zq = z.repeat_interleave(g, dim=-2)
    N = phi_q @ Hq
    Z = (phi_q @ zq.unsqueeze(-1)).squeeze(-1)
    some = Z > 0
    Z = torch.where(some, Z, 1.0)
    a = torch.where(some, torch.sigmoid(lse - Z.log()), 1.0)
    return a.unsqueeze(-1) * o_kept + (1 - a).unsqueeze(-1) * (N / Z.unsqueeze(-1))


# ---------------------------------------------------------------------------- capture
class _Stop(Exception):
    """Raised by the hook of the last layer needed: the rest of the forward is skipped."""


def attention_modules(model) -> list:
    """The ``self_attn`` module of every decoder layer (ModelError if the model lacks them or
    uses sliding-window attention, which the LESS recipe does not cover)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ModelError(f"{type(model).__name__}: no decoder layers (model.layers) found")
    mods = [layer.self_attn for layer in layers]
    for m in mods:
        if not all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            raise ModelError(f"{type(m).__name__}: not a q/k/v/o_proj attention module")
        if getattr(m, "sliding_window", None):
            raise ModelError(f"{type(m).__name__}: sliding-window attention is not supported")
    return mods


def recompute_qkv(module, hidden_states, position_embeddings):
    """Post-RoPE ``q`` [Hq, n, D], ``k`` / ``v`` [Hkv, n, D] (f32) of batch row 0, from the
    attention module's own projections and its modeling module's ``apply_rotary_pos_emb``."""
    rope = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise ModelError(f"{type(module).__module__} has no apply_rotary_pos_emb")
    b, n, _ = hidden_states.shape
    d = module.head_dim
    q = module.q_proj(hidden_states).view(b, n, -1, d)
    k = module.k_proj(hidden_states).view(b, n, -1, d)
    if hasattr(module, "q_norm"):  # Qwen3-style per-head norms, before RoPE
        q, k = module.q_norm(q), module.k_norm(k)
    v = module.v_proj(hidden_states).view(b, n, -1, d).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q[0].float(), k[0].float(), v[0].float()


def _hook(modules: list, layers: list[int], fn: Callable, stop: bool = True) -> list:
    """Pre-hooks calling ``fn(layer, module, q, k, v)`` on ``layers``; with ``stop``, the last
    one ends the forward (raises :class:`_Stop`). Returns the handles."""
    last = max(layers) if stop else -1

    def make(i: int):
        def pre(module, args, kwargs):
            hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            pe = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            fn(i, module, *recompute_qkv(module, hs, pe))
            if i == last:
                raise _Stop
        return pre

    return [modules[i].register_forward_pre_hook(make(i), with_kwargs=True) for i in layers]


def capture_qkv(model, input_ids, layers: list[int] | None = None) -> dict[int, tuple]:
    """``{layer: (q, k, v)}`` of one sequence ``input_ids`` [1, n] (post-RoPE, f32)."""
    import torch

    modules = attention_modules(model)
    layers = list(range(len(modules))) if layers is None else list(layers)
    got: dict[int, tuple] = {}
    handles = _hook(modules, layers, lambda i, m, q, k, v: got.__setitem__(i, (q, k, v)),
                    stop=False)
    try:
        with torch.no_grad():
            getattr(model, "model", model)(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return got


def _grouped_scores(q, k, start: int, end: int, scale: float):
    """Causal ``scale * q.k`` of the queries at ``[start, end)`` against keys ``[0, end)``, as
    [Hkv, G, end - start, end] (query head h = KV head h // G), -inf above the diagonal."""
    import torch

    hq, _, d = q.shape
    hkv = k.shape[0]
    g, m = hq // hkv, end - start
    s = q[:, start:end].reshape(hkv, g * m, d) @ k[:, :end].transpose(1, 2)
    s = s.mul_(scale).view(hkv, g, m, end)
    tri = torch.ones(m, m, dtype=torch.bool).triu_(1)
    s[..., start:].masked_fill_(tri, float("-inf"))
    return s


def engine_spec(budget: float) -> EvictionSpec:
    """The engine's eviction spec of :data:`ENGINE` at a total budget of ``budget`` (a fraction
    of the prompt): its policy, sinks, recent window, observation window and budget rule."""
    return make_spec(dataclasses.replace(ENGINE, max_cache_size=budget))


def window_scores(q, k, p: int, window: int, scale: float) -> np.ndarray:
    """float32 [Hkv, p]: the attention every key of the prompt ``[0, p)`` receives from its last
    ``window`` queries (softmax over the keys each sees, in f32), summed over those queries and
    the group's query heads: what the engine's scored graph accumulates for a KV head."""
    import torch

    a = torch.softmax(_grouped_scores(q, k, p - window, p, scale), dim=-1)  # [Hkv, G, W, p]
    return a.sum((1, 2)).numpy()


def snapkv_evicted(q, k, p: int, spec: EvictionSpec, scale: float):
    """Positions [Hkv, E] (ascending, int64) of the prompt ``[0, p)`` that the engine's eviction
    ``spec`` (:func:`engine_spec`) drops per KV head, with ``q`` [Hq, n, D], ``k`` [Hkv, n, D]
    post-RoPE and ``n >= p``: the last ``spec.window`` queries' scores (:func:`window_scores`)
    go into a :class:`SequenceScores` as the engine accumulates them, and the engine's own
    planner and policy choose at its budget ``spec.budget(p)`` (sinks and recent window
    included). ``E`` is the same for every head (SnapKV gives every head the same quota); 0
    when the prompt fits the budget (the engine does not evict then)."""
    import torch

    hkv = k.shape[0]
    budget = spec.budget(p)
    if p <= budget:
        return torch.zeros(hkv, 0, dtype=torch.int64)
    window = min(spec.window, p)
    acc = SequenceScores(1, hkv)
    for h, row in enumerate(window_scores(q, k, p, window, scale)):
        acc.add(0, h, row)
    acc.add_queries(p - window, window)
    rows = np.arange(p, dtype=np.int64)
    decision = plan_eviction([[rows] * hkv], acc, spec.policy, budget, spec.start_size,
                             spec.recent_size, p, _BLOCK_SIZE, np.random.default_rng(spec.seed))
    gone = [np.setdiff1d(rows, kept, assume_unique=True) for kept in decision.keep_rows[0]]
    if len({len(g) for g in gone}) != 1:
        raise AssertionError(f"eviction: heads evict {[len(g) for g in gone]} tokens")
    return torch.from_numpy(np.stack(gone))


def _spill(x):
    """``x`` as :data:`SPILL_DTYPE` where every value fits (else unchanged, float32)."""
    import torch

    h = x.to(getattr(torch, SPILL_DTYPE))
    return h if bool(torch.isfinite(h).all()) else x


def _example(module, q, k, v, p: int, spec: EvictionSpec) -> dict:
    """What training needs of one layer and sequence (nothing here depends on the kernels):
    the queries ``q`` [Hq, QUERIES, D] after the prefix, the output ``o_kept`` and log-sum-exp
    ``lse`` of their attention without the evicted tokens, the evicted keys / values ``ek`` /
    ``ev`` [Hkv, E, D] (as :data:`SPILL_DTYPE`), and the target: ``o_proj`` of the full
    attention output."""
    import torch

    hq, _, d = q.shape
    hkv, dv = k.shape[0], v.shape[-1]
    scale = float(module.scaling)
    ev_idx = snapkv_evicted(q, k, p, spec, scale)
    n = p + QUERIES
    s = _grouped_scores(q, k, p, n, scale).view(hkv, -1, n)  # [Hkv, G * QUERIES, n]
    m = s.amax(-1, keepdim=True)
    e = s.sub_(m).exp_()
    full = (e @ v[:, :n]) / e.sum(-1, keepdim=True)
    keep = torch.ones(hkv, n)
    keep.scatter_(1, ev_idx, 0.0)
    e.mul_(keep[:, None, :])
    den = e.sum(-1, keepdim=True)
    o_kept = ((e @ v[:, :n]) / den).view(hq, QUERIES, dv)
    lse = (m + den.log()).view(hq, QUERIES)
    target = module.o_proj(full.view(hq, QUERIES, dv).transpose(0, 1).reshape(QUERIES, hq * dv))
    return {"q": q[:, p:n].clone(), "o_kept": o_kept, "lse": lse,
            "ek": _spill(k.gather(1, ev_idx[:, :, None].expand(-1, -1, d))),
            "ev": _spill(v.gather(1, ev_idx[:, :, None].expand(-1, -1, dv))),
            "target": target.detach().clone()}


def _collect(model, layers: list[int], data: Data, budget: float, work: Path) -> float:
    """Run every sequence once; spill each layer's examples to ``work`` in chunks. Seconds."""
    import torch

    modules = attention_modules(model)
    spec = engine_spec(budget)
    seqs = ([("train", ids, int(p)) for ids, p in zip(data.train, data.train_prefix, strict=True)]
            + [("val", ids, int(p)) for ids, p in zip(data.val, data.val_prefix, strict=True)])
    buf: dict[int, list] = {i: [] for i in layers}
    cur: dict = {}

    def on_layer(i, module, q, k, v):
        ex = _example(module, q, k, v, cur["p"], spec)
        ex["split"] = cur["split"]
        buf[i].append(ex)

    def flush(chunk: int) -> None:
        for i in layers:
            if buf[i]:
                torch.save(buf[i], work / f"layer{i:03d}-{chunk:05d}.pt")
                buf[i] = []

    t0 = time.perf_counter()
    handles = _hook(modules, layers, on_layer)
    base = getattr(model, "model", model)
    try:
        with torch.no_grad():
            for n, (split, ids, p) in enumerate(seqs):
                cur.update(split=split, p=p)
                with contextlib.suppress(_Stop):
                    base(input_ids=torch.from_numpy(ids)[None])
                if (n + 1) % CHUNK == 0 or n + 1 == len(seqs):
                    flush(n // CHUNK)
                    _say(f"collected {n + 1}/{len(seqs)} sequences, layers {layers[0]}.."
                         f"{layers[-1]} ({time.perf_counter() - t0:.0f} s)")
    finally:
        for h in handles:
            h.remove()
    return time.perf_counter() - t0


def _stack(examples: list[dict]) -> dict:
    """Examples of one split -> batched float32 tensors; the evicted keys / values padded to the
    longest (``em`` [S, 1, E, 1] masks the padding)."""
    import torch

    e = max(x["ek"].shape[1] for x in examples)
    out = {k: torch.stack([x[k] for x in examples]) for k in ("q", "o_kept", "lse", "target")}
    for key in ("ek", "ev"):
        out[key] = torch.stack([torch.nn.functional.pad(x[key].float(),
                                                        (0, 0, 0, e - x[key].shape[1]))
                                for x in examples])
    out["em"] = torch.stack([(torch.arange(e) < x["ek"].shape[1]).float()[None, :, None]
                             for x in examples])
    return out


def _load_layer(work: Path, layer: int, remove: bool = False) -> tuple[dict, dict]:
    """The layer's (train, validation) batches from the spill; ``remove``: delete its files."""
    import torch

    exs: list[dict] = []
    files = sorted(work.glob(f"layer{layer:03d}-*.pt"))
    for f in files:
        exs.extend(torch.load(f, weights_only=True))
    if remove:
        for f in files:
            f.unlink()
    return (_stack([x for x in exs if x["split"] == "train"]),
            _stack([x for x in exs if x["split"] == "val"]))


_SPILL_PREFIX = ".collect-"


def _remove_stale_spills(root: Path) -> None:
    """Delete the spill folders under ``root`` of runs whose process is gone (killed before its
    own clean-up ran); folders of live processes stay."""
    for d in root.glob(f"{_SPILL_PREFIX}*"):
        m = re.fullmatch(rf"{re.escape(_SPILL_PREFIX)}(\d+)-.*", d.name)
        if m is None or not d.is_dir():
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            _say(f"removed {d} (left by process {pid}, which is gone)")
        except PermissionError:
            pass  # alive, someone else's


# ---------------------------------------------------------------------------- training
def layer_output(params: dict, batch: dict, o_proj, use_less: bool = True):
    """``o_proj`` of the LESS attention output [S, QUERIES, hidden] of a batch (with
    ``use_less=False``: of the kept part alone, i.e. the state ignored)."""
    o = batch["o_kept"]
    if use_less:
        ps = psi(params, batch["ek"]) * batch["em"]  # [S, Hkv, E, F]
        z = ps.sum(2)
        H = ps.transpose(-1, -2) @ batch["ev"]  # [S, Hkv, F, Dv]
        o = less_attention(o, batch["lse"], phi(params, batch["q"]), H, z)
    s, hq, nq, dv = o.shape
    return o_proj(o.transpose(1, 2).reshape(s, nq, hq * dv))


def _trim(batch: dict) -> dict:
    """``batch`` with the evicted keys / values cut to its own longest (the split is padded to
    the longest of all its sequences: padding only costs time)."""
    e = int(batch["em"].sum(2).max())
    return {**batch, **{k: batch[k][:, :, :e] for k in ("ek", "ev", "em")}}


def _mse(params: dict, batch: dict, o_proj, use_less: bool = True):
    import torch

    return torch.nn.functional.mse_loss(layer_output(params, batch, o_proj, use_less),
                                        batch["target"])


@dataclass
class LayerResult:
    layer: int
    train_loss: float
    val_loss: float
    val_loss_initial: float
    val_loss_noless: float
    best_step: int
    seconds: float
    off: bool = False  # the state is switched off (k_s1 = 0): nothing trained beat ignoring it

    @property
    def gap_recovered(self) -> float:
        return 1.0 - self.val_loss / self.val_loss_noless if self.val_loss_noless > 0 else 0.0


def train_layer(weights: LESSWeights, layer: int, train: dict, val: dict, o_proj,
                steps: int, lr: float, batch: int, seed: int) -> LayerResult:
    """Adam on the layer's kernels for ``steps`` steps; the parameters with the best validation
    loss (the initial ones included) are written back into ``weights``. When even those do no
    better than ignoring the state, the layer's state is switched off instead: ``k_s1 = 0``
    makes ``psi`` and so ``z`` zero, and ``Z = 0`` leaves attention exactly as without LESS
    (the authors' near-zero initial ``s1`` is not quite a no-op where ``phi`` is large)."""
    import torch

    t0 = time.perf_counter()
    params = {n: torch.nn.Parameter(torch.from_numpy(weights.arrays[n][layer].copy()))
              for n in ARRAYS}
    opt = torch.optim.Adam(params.values(), lr=lr)
    gen = torch.Generator().manual_seed(seed * 100_003 + layer)
    n = train["q"].shape[0]
    with torch.no_grad():
        best = initial = float(_mse(params, val, o_proj))
        noless = float(_mse(params, val, o_proj, use_less=False))
    best_params = {k: v.detach().clone() for k, v in params.items()}
    best_step, recent, every = 0, [], max(1, steps // 10)
    order = torch.randperm(n, generator=gen)
    pos = 0
    for step in range(1, steps + 1):
        if pos + min(batch, n) > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch]
        pos += len(idx)
        loss = _mse(params, _trim({k: v[idx] for k, v in train.items()}), o_proj)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent.append(float(loss.detach()))
        if step % every == 0 or step == steps:
            with torch.no_grad():
                v = float(_mse(params, val, o_proj))
            if math.isfinite(v) and v < best:
                best, best_step = v, step
                best_params = {k: p.detach().clone() for k, p in params.items()}
    off = not best < noless
    if off:
        best_params["k_s1"] = torch.zeros_like(best_params["k_s1"])
        with torch.no_grad():
            best = float(_mse(best_params, val, o_proj))
        best_step = -1
    for k, v in best_params.items():
        weights.arrays[k][layer] = v.numpy()
    tail = recent[-every:]
    return LayerResult(layer, sum(tail) / len(tail), best, initial, noless, best_step,
                       time.perf_counter() - t0, off)


# ---------------------------------------------------------------------------- the run
@dataclass
class TrainResult:
    path: Path
    layers: list[LayerResult]
    layers_trained: int
    num_layers: int
    collect_seconds: float = 0.0


def _provenance(cfg: TrainConfig, name: str, data: Data) -> dict:
    import torch
    import transformers

    return {"model": name, "policy": cfg.policy, "budget": cfg.budget, "seq_len": cfg.seq_len,
            "sequences": cfg.sequences, "val_sequences": cfg.val_sequences, "steps": cfg.steps,
            "seed": cfg.seed, "lr": cfg.lr, "batch": cfg.batch, "simulation": SIMULATION,
            "sinks": SINKS, "recent": RECENT, "window": WINDOW, "kernel_size": KERNEL_SIZE,
            "pooling": POOLING, "pooling_offset": POOLING_OFFSET,
            "aggregation_mode": AGGREGATION,
            "budget_rule": "max(int(budget * p), sinks + recent) per KV head, all included",
            "spill_dtype": SPILL_DTYPE, "queries": QUERIES,
            "prefix_range": list(prefix_range(cfg.seq_len)),
            "data_hash": data.data_hash, "data_sources": data.sources,
            "torch": torch.__version__, "transformers": transformers.__version__}


def _resume(path: Path, want: dict, geometry: dict) -> LESSWeights:
    """The existing file when it was trained with the same configuration; else ConfigError
    naming the first differing field."""
    w = LESSWeights.load(path)
    w.check_model(**geometry, where=str(path))
    for key, flag in _RESUME_FIELDS.items():
        have, new = w.meta.get(key), want[key]
        if have != new:
            raise ConfigError(flag, new, f"{have!r} to resume {path} (its meta field {key!r}); "
                              "or --restart to train anew")
    return w


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume training) the LESS kernels of ``cfg.model``; see the module docstring."""
    cfg.check()
    name, hf = resolve_model(cfg.model)
    # default: <cache>/models/<name>/less/<policy>.npz, where the pipeline looks for it
    out = Path(cfg.out).expanduser() if cfg.out is not None else default_weights_path(
        hf if hf.name == "hf" else hf / "hf", cfg.policy)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from kvcrush_ov.models import store

    hf_logging.disable_progress_bar()
    mc = AutoConfig.from_pretrained(str(hf))
    mc = getattr(mc, "text_config", mc)
    hq = int(mc.num_attention_heads)
    geometry = {"num_layers": int(mc.num_hidden_layers), "num_heads": hq,
                "num_kv_heads": int(getattr(mc, "num_key_value_heads", None) or hq),
                "head_dim": int(getattr(mc, "head_dim", None) or mc.hidden_size // hq)}
    ctx = int(getattr(mc, "max_position_embeddings", cfg.seq_len))
    if cfg.seq_len > ctx:
        raise ConfigError("--seq-len", cfg.seq_len, f"an integer in [{MIN_SEQ_LEN}, {ctx}] "
                          f"(the model's context)")

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(hf))
    data = build_data(tok, cfg.seq_len, cfg.sequences, cfg.val_sequences, cfg.seed)
    _say(f"{name}: {len(data.train)} train + {len(data.val)} validation sequences of "
         f"{cfg.seq_len} tokens ({time.perf_counter() - t0:.0f} s), data_hash "
         f"{data.data_hash[:12]}")
    prov = _provenance(cfg, name, data)
    want = {**prov, "hidden": cfg.hidden, "feature_dim": cfg.features}
    if out.is_file() and not cfg.restart:
        weights = _resume(out, want, geometry)
        _say(f"resuming {out}: {weights.meta['layers_trained']}/{geometry['num_layers']} "
             "layers trained")
    else:
        weights = LESSWeights.initial(**geometry, hidden=cfg.hidden, feature_dim=cfg.features,
                                      seed=cfg.seed,
                                      **{k: v for k, v in prov.items() if k != "seed"})
        weights.meta["seed"] = cfg.seed
    meta = weights.meta
    for key in ("seconds_per_layer", "train_loss", "val_loss", "val_loss_initial",
                "val_loss_noless", "best_step", "off_layers"):
        meta.setdefault(key, [])
    meta.update(torch=prov["torch"], transformers=prov["transformers"])
    num_layers = geometry["num_layers"]
    start = int(meta["layers_trained"])
    stop = num_layers if cfg.layers is None else min(num_layers, start + cfg.layers)
    result = TrainResult(out, [], start, num_layers)
    if start >= stop:
        _say(f"all {num_layers} layers already trained: {out}")
        return result

    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = list(range(start, stop))
    o_projs = {i: m.o_proj for i, m in enumerate(attention_modules(model)) if i in layers}
    work_root = store.home() / "tmp"
    work_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_spills(work_root)
    work = Path(tempfile.mkdtemp(prefix=f"{_SPILL_PREFIX}{os.getpid()}-", dir=work_root))
    try:
        result.collect_seconds = _collect(model, layers, data, cfg.budget, work)
        meta["collect_seconds"] = meta.get("collect_seconds", 0.0) + result.collect_seconds
        del model
        for i in layers:
            tr, va = _load_layer(work, i, remove=True)
            r = train_layer(weights, i, tr, va, o_projs.pop(i), cfg.steps, cfg.lr, cfg.batch,
                            cfg.seed)
            for key, v in (("seconds_per_layer", round(r.seconds, 2)),
                           ("train_loss", r.train_loss), ("val_loss", r.val_loss),
                           ("val_loss_initial", r.val_loss_initial),
                           ("val_loss_noless", r.val_loss_noless), ("best_step", r.best_step)):
                meta[key].append(v)
            if r.off:
                meta["off_layers"].append(i)
            meta["layers_trained"] = i + 1
            weights.save(out)
            result.layers.append(r)
            result.layers_trained = i + 1
            _say(f"layer {i + 1}/{num_layers}: train {r.train_loss:.3e}, val {r.val_loss:.3e} "
                 f"(no LESS {r.val_loss_noless:.3e}, gap recovered "
                 f"{100 * r.gap_recovered:.1f}%{'; state off' if r.off else ''}), "
                 f"{r.seconds:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result
