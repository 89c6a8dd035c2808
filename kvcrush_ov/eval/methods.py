"""The methods the accuracy harness compares, each a function of the total budget (a fraction of
the prompt). Every column keeps the same TOTAL number of cached tokens (KVCrush's share
included; backend genai's KVCrush blocks are translated on top of its max_cache_size)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvcrush_ov.config import (
    DEFAULT_RECENT,
    NATIVE_KERNEL_SIZE,
    NATIVE_PREFILL_PROBE,
    NATIVE_TAPER,
    CacheEvictionConfig,
    FastKVConfig,
    KVCrushConfig,
    LESSConfig,
)
from kvcrush_ov.eviction.kvzap import KVzap
from kvcrush_ov.eviction.kvzip import KVzip
from kvcrush_ov.eviction.kvzip_heads import KVzipHeads, load_or_calibrate


@dataclass(frozen=True)
class Method:
    """name: column label. backend: ``native`` (forked from one prefill) or ``genai``.
    make(budget) -> the eviction config for a total budget fraction. report: part of a run that
    names no ``--method`` (False: a tuning candidate, run only when named). policy: a tuning
    candidate's policy object, in place of the one its config names (a variant that has no
    config field); model_policy: the same, built from the model's folder (e.g. calibrated once
    per model)."""

    name: str
    backend: str
    make: Callable[[float], CacheEvictionConfig]
    report: bool = True
    policy: Callable[[], object] | None = None
    model_policy: Callable[[Path], object] | None = None


# The native columns score every decode step (as they did before the Pipeline's default became
# the 8 steps before each eviction), so stored results keep their meaning; the default itself is
# the column whose config is CacheEvictionConfig(max_cache_size=b): see default_method().
EVERY_STEP = CacheEvictionConfig().evict_interval


def _native(importance: str, crush: KVCrushConfig | None = None,
            **kw: object) -> Callable[[float], CacheEvictionConfig]:
    return lambda b: CacheEvictionConfig(max_cache_size=b, importance=importance, kvcrush=crush,
                                         decode_window_size=EVERY_STEP, **kw)


def _kvzip(crush: KVCrushConfig | None = None,
           **kw: object) -> Callable[[float], CacheEvictionConfig]:
    """A kvzip column with GenAI's 128 recent tokens (what every kvzip column kept before
    kvzip's default became 32: stored results keep their meaning)."""
    return _native("kvzip", crush, recent_size=DEFAULT_RECENT, **kw)


def _genai(crush: bool) -> Callable[[float], CacheEvictionConfig]:
    kv = KVCrushConfig(budget=0.25, granularity="block") if crush else None
    return lambda b: CacheEvictionConfig(max_cache_size=b, importance="snapkv", kvcrush=kv)


# a fixed 25% share: the KVCrush columns keep the meaning they had before the taper
KVCRUSH = KVCrushConfig(budget=0.25, taper=False)

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("genai-snapkv", "genai", _genai(False)),
    Method("genai-kvcrush", "genai", _genai(True)),
    *[Method(n, "native", _native(n)) for n in ("streaming", "h2o", "snapkv", "pyramidkv",
                                                 "adakv")],
    *[Method(f"{n}+kvcrush", "native", _native(n, KVCRUSH))
      for n in ("streaming", "h2o", "snapkv", "pyramidkv", "adakv")],
    # FastKV: token-selective propagation during prefill (its own parent), then per-head SnapKV
    Method("fastkv", "native", _native("snapkv", fastkv=FastKVConfig())),
    Method("fastkv+kvcrush", "native", _native("snapkv", KVCRUSH, fastkv=FastKVConfig())),
    # KVzip: importance from the attention of the context's replay (query-agnostic). Every
    # kvzip column but kvzip-recent32 keeps GenAI's 128 recent tokens, as it did before the
    # config's kvzip default became 32 (CacheEvictionConfig.recent_size): stored results keep
    # their meaning; kvzip-recent32 is what CacheEvictionConfig(importance="kvzip") runs
    Method("kvzip", "native", _kvzip()),
    Method("kvzip+kvcrush", "native", _kvzip(KVCRUSH)),
    # KVzip's budgets split evenly per head, or shared by the heads of each layer (the default,
    # kvzip, shares them across the whole model)
    Method("kvzip-head", "native", _kvzip(), report=False,
           policy=lambda: KVzip(alpha=None)),
    Method("kvzip-ada", "native", _kvzip(), report=False,
           policy=lambda: KVzip(alpha=0.2, scope="layer")),
    # KVzip with a shorter recent window (of the context: the question comes later), so that
    # more of a small budget goes to the replay's picks; 32 became kvzip's default (tuning
    # seed 7 of both models, docs/chat.md)
    *[Method(f"kvzip-recent{n}", "native", _native("kvzip", recent_size=n), report=False)
      for n in (8, 32)],
    # KVzip's replay scores max-pooled over 3 / 7 tokens (SnapKV's smoothing): a needle's
    # neighbouring tokens share its score, so multi-token values stay whole
    *[Method(f"kvzip-max{k}", "native", _kvzip(), report=False,
             policy=lambda k=k: KVzip(pooling="max", kernel_size=k)) for k in (3, 7)],
    # KVzip's replay in steps of 64 / 256 queries instead of 16 (less TTFT; each its own replay)
    Method("kvzip-chunk64", "native", _kvzip(), report=False,
           policy=lambda: KVzip(replay_chunk=64)),
    Method("kvzip-chunk256", "native", _kvzip(), report=False,
           policy=lambda: KVzip(replay_chunk=256)),
    # KVzip's replay in steps of 256 queries scored beside the step (KVzip.replay_group): each
    # query's own attention (KVzip's maximum over queries, query256), or sums over aligned
    # groups of 16 queries (group16: the default's steps of 16, in fewer, larger steps)
    Method("kvzip-query256", "native", _native("kvzip"), report=False,
           policy=lambda: KVzip(replay_chunk=256, replay_group=1)),
    Method("kvzip-group16", "native", _native("kvzip"), report=False,
           policy=lambda: KVzip(replay_chunk=256, replay_group=16)),
    # KVzip with the prompt's last 16 / 32 queries (a question ending the prompt) scored after
    # the replay, max-combined with it (KVzip.question_window; the query-aware protocol)
    *[Method(f"kvzip-qw{n}", "native", _native("kvzip"), report=False,
             policy=lambda n=n: KVzip(question_window=n)) for n in (16, 32)],
    # KVzip's replay in lanes of 256 / 128 context tokens, all lanes in the same steps (eval
    # only: runner._replay_lanes; KVzip's chunked scoring, each lane blind to the others)
    *[Method(f"kvzip-lanes{n}", "native", _native("kvzip"), report=False) for n in (256, 128)],
    # KVzap: KVzip's ranking predicted per token from its hidden state by a linear surrogate
    # trained once per model (kvcrush-ov kvzap-train); no replay (recent 32, kvzip's default).
    # Not default columns: they need the trained surrogate (--method kvzap)
    Method("kvzap", "native", _native("kvzap"), report=False),
    Method("kvzap+kvcrush", "native", _native("kvzap", KVCRUSH), report=False),
    # KVzap with a longer recent window (query-aware: the question's tokens kept whole)
    *[Method(f"kvzap-recent{n}", "native", _native("kvzap", recent_size=n), report=False)
      for n in (64, 128)],
    # KVzap with the prompt's last 16 / 32 queries (a question ending the prompt) scored, a row
    # keeping the larger of its prediction and their attention (KVzap.question_window; in the
    # query-agnostic protocol the window is the context's end)
    *[Method(f"kvzap-qw{n}", "native", _native("kvzap"), report=False,
             policy=lambda n=n: KVzap(question_window=n)) for n in (16, 32)],
    # KVzap's predictions max- / mean-pooled over 3 tokens (a needle's neighbours share its
    # score), and Ada-KV's per-head share raised to a half (alpha 0.5: heads the surrogate
    # underrates keep more)
    *[Method(f"kvzap-{p}3", "native", _native("kvzap"), report=False,
             policy=lambda p=p: KVzap(pooling=p, kernel_size=3)) for p in ("max", "avg")],
    Method("kvzap-alpha05", "native", _native("kvzap"), report=False,
           policy=lambda: KVzap(alpha=0.5)),
    Method("kvzap-alpha0", "native", _native("kvzap"), report=False,
           policy=lambda: KVzap(alpha=0.0)),
    # KVzap's predictions allocated per layer (each layer its even share; KVzip's own scores
    # rank best model-wide, but the surrogate's levels may differ from layer to layer)
    Method("kvzap-layer", "native", _native("kvzap"), report=False,
           policy=lambda: KVzap(scope="layer")),
    # KVzap with part of the context replayed (the spans it scores highest; runner.
    # PARTIAL_REPLAY, eval only, query-agnostic protocol)
    *[Method(n, "native", _native("kvzap"), report=False)
      for n in ("kvzap-replay25", "kvzap-replay12", "kvzap-replay50", "kvzap-replay50q",
                "kvzap-replay50w128")],
    Method("kvzap-replay50+kvcrush", "native", _native("kvzap", KVCRUSH), report=False),
    # KVzap with the model's first quarter / third / half, or last quarter / half, of the layers
    # ranked by KVzip's whole replay (runner.LAYER_REPLAY; eval only, query-agnostic protocol)
    *[Method(n, "native", _native("kvzap"), report=False)
      for n in ("kvzap-early25", "kvzap-early33", "kvzap-early50", "kvzap-late25",
                "kvzap-late50")],
    # KVCrush's share on top of KVzap: the default config's taper, and half the budget
    Method("kvzap+kvcrush-taper", "native", _native("kvzap", KVCrushConfig()), report=False),
    Method("kvzap+kvcrush-share50", "native",
           _native("kvzap", KVCrushConfig(budget=0.5, taper=False)), report=False),
    Method("kvzap+kvcrush-share10", "native",
           _native("kvzap", KVCrushConfig(budget=0.1, taper=False)), report=False),
    # KVzip's context-independent variant: heads ranked once per model by a calibration replay
    # keep everything or only sinks + recent; no replay, no scores at run time
    Method("kvzip-heads", "native", _native("streaming"), report=False,
           model_policy=lambda d: KVzipHeads.from_array(load_or_calibrate(d))),
    # eviction during the prefill (each chunk past the budget, ranked by its own last queries),
    # against snapkv+kvcrush's once
    Method("snapkv+kvcrush-prefill", "native", _native("snapkv", KVCRUSH, prefill_eviction=True,
                                                       prefill_probe_size=0), report=False),
    # the same, each part ranked by a probe: the prompt's last N tokens (the question) run
    # after the part and are forgotten (CacheEvictionConfig.prefill_probe_size; 64, the
    # default, is the report column)
    *[Method(f"snapkv+kvcrush-prefill-probe{n}", "native",
             _native("snapkv", KVCRUSH, prefill_eviction=True, prefill_probe_size=n),
             report=n == NATIVE_PREFILL_PROBE) for n in (32, 64, 128)],
    # the same with KVzip's ranking: each chunk replayed, then evicted (engine/replay.py)
    Method("kvzip-prefill", "native", _kvzip(prefill_eviction=True), report=False),
    # FastKV's own ranking (max-pooling over 7) instead of the eviction's (avg over 31)
    Method("fastkv-max7", "native", _native("snapkv", fastkv=FastKVConfig(pooling="max", kernel=7)),
           report=False),
    # an earlier split (after layer 7, of Qwen2.5-0.5B's 24 / SmolLM2's 30): the prefill speed
    # issue 17 targets on Qwen2.5 (docs/performance.md), at what accuracy cost
    Method("fastkv+kvcrush-split7", "native",
           _native("snapkv", KVCRUSH, fastkv=FastKVConfig(split_layer=7)), report=False),
    Method("snapkv+kvcrush-multi", "native", _native("snapkv", KVCrushConfig(
        budget=0.25, anchor_point_mode=("zeros", "ones", "alternating"), taper=False))),
    Method("snapkv+kvcrush-dynamic", "native", _native("snapkv", KVCrushConfig(
        budget=0.25, dynamic_split=True, taper=False))),
    # a smaller KVCrush share (10% of the budget instead of 25%): long multi-token values keep
    # more importance picks at small budgets (Qwen2.5's report set, docs/eval.md)
    Method("snapkv+kvcrush-share10", "native",
           _native("snapkv", KVCrushConfig(budget=0.1, taper=False)), report=False),
    # a KVCrush share that scales with the budget: half the budget fraction (25% of the cache at
    # a 50% budget, 12.5% at 25%, 6.25% at 12.5%)
    Method("snapkv+kvcrush-scaled", "native",
           lambda b: _native("snapkv", KVCrushConfig(budget=b / 2, taper=False))(b), report=False),
    # the tuning candidate that became the default's taper (KVCrushConfig.taper), with the
    # share fixed from the budget fraction: 25% at a 50% budget, 8.3% at 25%, none at 12.5%
    Method("snapkv+kvcrush-taper", "native",
           lambda b: _native("snapkv", KVCrushConfig(budget=0.25 * min(1.0, max(0.0, (
               b - NATIVE_TAPER[0]) / (NATIVE_TAPER[1] - NATIVE_TAPER[0]))), taper=False))(b),
           report=False),
    # the pooling window ends at each token: a needle's value shares its key's score
    Method("snapkv+kvcrush-trailing", "native", _native(
        "snapkv", KVCRUSH, pooling_offset=NATIVE_KERNEL_SIZE // 2)),
    # snapkv+kvcrush scoring only the 8 decode steps before each decode-time eviction (the
    # Pipeline's default until the taper)
    Method("snapkv+kvcrush-decode8", "native", lambda b: CacheEvictionConfig(
        max_cache_size=b, kvcrush=KVCrushConfig(taper=False))),
    # the Pipeline's default: decode window 8, KVCrush's share tapered with the budget
    Method("snapkv+kvcrush-taper-decode8", "native",
           lambda b: CacheEvictionConfig(max_cache_size=b)),
    # LESS (docs/less.md) on top: run when named (they need the model's trained weights,
    # `kvcrush-ov less-train`)
    Method("snapkv+less", "native", _native("snapkv", less=LESSConfig()), report=False),
    Method("snapkv+kvcrush+less", "native", _native("snapkv", KVCRUSH, less=LESSConfig()),
           report=False),
    Method("default+less", "native",
           lambda b: CacheEvictionConfig(max_cache_size=b, less=LESSConfig()), report=False),
]}


# the methods of a run that names none (tuning candidates left out)
REPORT_METHODS = tuple(name for name, m in METHODS.items() if m.report)


def default_method() -> str:
    """The column that runs the Pipeline's default eviction config."""
    for m in METHODS.values():
        if m.backend == "native" and m.make(0.25) == CacheEvictionConfig(max_cache_size=0.25):
            return m.name
    raise AssertionError("no eval method runs the default CacheEvictionConfig")

DEFAULT_BUDGETS = (0.5, 0.25, 0.125)
