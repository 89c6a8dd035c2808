"""User-facing configuration, in OpenVINO GenAI's vocabulary, validated at construction.

Every invalid value raises :class:`~kvcrush_ov.errors.ConfigError` naming the field and what is
allowed, before any model is loaded.

One deliberate difference from GenAI: :attr:`CacheEvictionConfig.max_cache_size` is the TOTAL
number of tokens cached per sequence, KVCrush's representatives included. GenAI keeps its
``KVCrushConfig.budget`` (in blocks) on top of ``max_cache_size``; the genai backend translates.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from kvcrush_ov.errors import ConfigError

KV_CACHE_PRECISIONS = ("u8", "u4", "bf16", "f32")
ANCHOR_POINT_MODES = ("random", "zeros", "ones", "mean", "alternating")
AGGREGATION_MODES = ("norm_sum", "sum")
IMPORTANCE_METHODS = ("snapkv", "h2o", "streaming", "pyramidkv", "adakv", "upstream", "kvzip",
                      "kvzap")
GENAI_IMPORTANCE = ("snapkv", "h2o")  # what backend "genai" can run
EVICTION_MODES = ("continuous", "prefill")
POOLINGS = ("max", "avg", "none")
NATIVE_POOLING = "avg"  # pooling=None on the native backend (RULER tuning seed, docs/eviction.md)
NATIVE_KERNEL_SIZE = 31  # kernel_size=None on the native backend (docs/eviction.md)
# decode_window_size=None on the native backend (capped at evict_interval): same RULER scores as
# scoring every decode step on both models' report sets, faster decode (docs/eviction.md)
NATIVE_DECODE_WINDOW = 8
GRANULARITIES = ("token", "block")
# KVCrushConfig.taper on the native backend: the KVCrush share grows linearly from 0 when the
# cache holds NATIVE_TAPER[0] of the sequence's tokens to the full ``budget`` at NATIVE_TAPER[1]
# (tuning seeds of both models, docs/results/ruler-tuning-share.md)
NATIVE_TAPER = (0.125, 0.5)
# CacheEvictionConfig.prefill_probe_size=None with prefill eviction (snapkv family): the
# prompt's last 64 tokens rank each part (RULER tuning seed, docs/eviction.md)
NATIVE_PREFILL_PROBE = 64
# CacheEvictionConfig.recent_size=None: GenAI's 128 newest tokens, but 32 for importance kvzip
# (a compressed context's end is not the question; tuning seed 7 of both models at 12.5%,
# docs/chat.md: SmolLM2 95.1 -> 98.4, Qwen2.5-0.5B 87.1 -> 94.5 % of the full cache)
DEFAULT_RECENT = 128
KVZIP_RECENT = 32
BACKENDS = ("genai", "native")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    """A finite int or float (NaN and +-inf are not numbers here; bools are not either)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "True or False")
    return value


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ConfigError(name, value, f"one of {', '.join(allowed)}")
    return value.lower()


def _int_at_least(name: str, value: object, low: int, hint: str = "") -> int:
    if not _is_int(value) or value < low:
        raise ConfigError(name, value, f"an integer >= {low}", hint)
    return value


@dataclass
class KVCacheConfig:
    """The paged KV cache.

    precision: ``u8`` (CPU default: keys quantized per channel inside each block, values per
        token), ``u4`` (u4 keys + u8 values), ``bf16``, or ``f32`` (also runs inference in f32).
    cache_size: cache memory in GB; 0 lets the cache grow on demand.
    num_kv_blocks: a fixed number of KV blocks (overrides cache_size when > 0).
    """

    precision: str = "u8"
    cache_size: float = 0.0
    num_kv_blocks: int = 0

    def __post_init__(self) -> None:
        self.precision = _choice("kv_cache.precision", self.precision, KV_CACHE_PRECISIONS)
        if not _is_number(self.cache_size) or self.cache_size < 0:
            raise ConfigError("kv_cache.cache_size", self.cache_size, "a number of GB >= 0")
        _int_at_least("kv_cache.num_kv_blocks", self.num_kv_blocks, 0)


@dataclass
class SchedulerConfig:
    """Continuous-batching scheduler knobs (same names as ``openvino_genai.SchedulerConfig``)."""

    max_num_batched_tokens: int = 256
    max_num_seqs: int = 256
    dynamic_split_fuse: bool = True
    enable_prefix_caching: bool = False

    def __post_init__(self) -> None:
        _int_at_least("scheduler.max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _int_at_least("scheduler.max_num_seqs", self.max_num_seqs, 1)
        _bool("scheduler.dynamic_split_fuse", self.dynamic_split_fuse)
        _bool("scheduler.enable_prefix_caching", self.enable_prefix_caching)


@dataclass
class KVCrushConfig:
    """KVCrush: keep representative tokens of each attention-behaviour group.

    budget: the SHARE of the total cache budget given to KVCrush's representatives, in [0, 1]
        (GenAI's ``KVCrushConfig.budget`` instead counts blocks kept on top of max_cache_size).
    anchor_point_mode: random, zeros, ones, mean or alternating; a tuple of several modes
        picks representatives per nearest-anchor group (multi-anchor; native backend only).
    rng_seed: seed of the random anchor.
    granularity: ``token`` (representative tokens; native backend only), ``block`` (whole
        blocks, as GenAI does) or None: the backend's own (token on native, block on genai).
    dynamic_split: give KVCrush a larger share in layers whose attention is spread out and a
        smaller one where it is concentrated (native backend only).
    taper: shrink KVCrush's share when the cache holds a small fraction of the sequence
        (``max_cache_size / tokens so far``): ``budget`` at 50% or more, nothing at 12.5% or
        less, linear in between (``NATIVE_TAPER``; on a RULER tuning seed a 25% share helped at
        a 50% budget and cost accuracy at 25% and 12.5%). None: the backend's own (on for
        native, off for genai); True (native backend only) or False.
    """

    budget: float = 0.25
    anchor_point_mode: str | tuple[str, ...] = "alternating"
    rng_seed: int = 0
    granularity: str | None = None
    dynamic_split: bool = False
    taper: bool | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.budget) or not 0.0 <= self.budget <= 1.0:
            raise ConfigError(
                "kvcrush.budget", self.budget, "a share of the total cache budget in [0, 1]",
                "unlike GenAI's KVCrushConfig.budget, this is not a block count",
            )
        modes = self.anchor_point_mode
        if isinstance(modes, (tuple, list)):
            if not modes:
                raise ConfigError("kvcrush.anchor_point_mode", modes,
                                  f"one of {', '.join(ANCHOR_POINT_MODES)} or a tuple of them")
            self.anchor_point_mode = tuple(
                _choice("kvcrush.anchor_point_mode", m, ANCHOR_POINT_MODES) for m in modes)
        else:
            self.anchor_point_mode = _choice(
                "kvcrush.anchor_point_mode", modes, ANCHOR_POINT_MODES
            )
        _int_at_least("kvcrush.rng_seed", self.rng_seed, 0)
        if self.granularity is not None:
            self.granularity = _choice("kvcrush.granularity", self.granularity, GRANULARITIES)
        _bool("kvcrush.dynamic_split", self.dynamic_split)
        if self.taper is not None and not isinstance(self.taper, bool):
            raise ConfigError("kvcrush.taper", self.taper,
                              "None (the backend's own), True or False")


FASTKV_IMPORTANCE = ("snapkv", "pyramidkv", "adakv")  # score the prompt's last queries
PROBE_IMPORTANCE = FASTKV_IMPORTANCE  # prefill_probe_size: the window-scored policies


@dataclass
class FastKVConfig:
    """FastKV's token-selective propagation (Jo et al. 2025): a faster prefill for long prompts.

    Layers ``0..split_layer`` process the whole prompt; at ``split_layer`` every prompt token is
    ranked by the attention of the prompt's last ``snapkv_window_size`` queries (summed over
    heads, max-pooled over ``kernel`` tokens), and only the best ``tsp_rate`` of the prompt plus
    the ``start_size`` sinks and ``recent_size`` newest tokens (which eviction always keeps)
    go on through the deeper layers, with their original positions. Decode is unchanged.

    split_layer: the last layer that sees every token; None is the middle, ``(N - 1) // 2`` of N
        layers (FastKV's 15 of 32, 17 of 36, 19 of 40). At most N - 2.
    tsp_rate: fraction of the prompt propagated (ranked tokens), in (0, 1]; 1.0 propagates
        every token (the same output as without FastKV).
    pooling / kernel: how the ranking scores are smoothed along the sequence (``max``, ``avg``
        or ``none``; an odd width). None is the eviction's own (native: ``avg`` over 31, chosen
        for SnapKV on a RULER tuning seed); FastKV's code max-pools over 7.
    """

    split_layer: int | None = None
    tsp_rate: float = 0.2
    pooling: str | None = None
    kernel: int | None = None

    def __post_init__(self) -> None:
        if self.split_layer is not None:
            _int_at_least("fastkv.split_layer", self.split_layer, 0)
        if not _is_number(self.tsp_rate) or not 0.0 < self.tsp_rate <= 1.0:
            raise ConfigError("fastkv.tsp_rate", self.tsp_rate,
                              "a fraction of the prompt in (0, 1]")
        if self.pooling is not None:
            self.pooling = _choice("fastkv.pooling", self.pooling, POOLINGS)
        if self.kernel is not None and _int_at_least("fastkv.kernel", self.kernel, 1) % 2 == 0:
            raise ConfigError("fastkv.kernel", self.kernel, "None or an odd integer >= 1")

    def layer_for(self, num_layers: int) -> int:
        """The split layer for a model of ``num_layers`` layers (ConfigError if out of range)."""
        layer = (num_layers - 1) // 2 if self.split_layer is None else self.split_layer
        if not 0 <= layer <= num_layers - 2:
            raise ConfigError("fastkv.split_layer", self.split_layer,
                              f"None or an integer in [0, {num_layers - 2}] (the model has "
                              f"{num_layers} layers)")
        return layer

    def num_propagated(self, prompt_len: int, fixed: int) -> int:
        """Rows the back layers get for a prompt of ``prompt_len`` tokens, ``fixed`` of them
        always propagated (sinks + recent)."""
        return min(prompt_len, fixed + math.ceil(self.tsp_rate * prompt_len))


@dataclass
class LESSConfig:
    """LESS (Dong et al. 2024): tokens eviction drops are folded into a small learned state per
    layer and KV head that later queries still attend to (docs/less.md).

    weights: a weights file written by ``kvcrush-ov less-train`` (.npz), or None for the model's
        default file (``<model cache folder>/less/snapkv.npz``). A missing file, or one trained
        for another model, is a ConfigError naming ``less.weights`` when the pipeline loads.
    """

    weights: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if self.weights is not None and not isinstance(self.weights, (str, os.PathLike)):
            raise ConfigError("less.weights", self.weights,
                              "None (the model's default file) or a path to a .npz file")


@dataclass
class CacheEvictionConfig:
    """Which tokens a sequence keeps once its cache outgrows the budget.

    max_cache_size: the total number of cached tokens per sequence (start + recent + important
        + KVCrush), either an integer number of tokens or a float in (0, 1] meaning a fraction of
        the prompt's tokens. With the genai backend it is rounded down to whole KV blocks.
    start_size: attention-sink tokens at the start that are always kept.
    recent_size: most recent tokens that are always kept. None: 128 (GenAI's default), or 32
        with ``importance="kvzip"`` or ``"kvzap"`` (the end of a context compressed without its
        question is not where the answer is; RULER tuning seed, docs/chat.md). See
        :meth:`recent_tokens`.
    importance: how the rest is ranked (docs/eviction.md): ``snapkv`` (attention of the
        prompt's last ``snapkv_window_size`` queries, pooled, per head; then accumulated while
        decoding), ``h2o`` (attention accumulated over every query), ``streaming`` (no scores:
        the most recent tokens, StreamingLLM), ``pyramidkv`` (SnapKV with per-layer budgets
        shrinking with depth), ``adakv`` (SnapKV with per-head budgets), ``kvzip`` (the
        attention of a replay of the prompt, query-agnostic; the prefill costs about 4.5x, see
        docs/chat.md), ``kvzap`` (KVzip's scores predicted per token from its hidden state by
        a linear surrogate trained once per model with ``kvcrush-ov kvzap-train``: no replay,
        query-agnostic) or ``upstream`` (what GenAI's CacheEvictionConfig does: block-level,
        head-summed). Backend genai runs snapkv and h2o only.
    aggregation_mode: ``norm_sum`` (accumulated score divided by each token's lifetime) or ``sum``.
    apply_rotation: re-rotate keys after eviction (rejected by both backends for now).
    kvcrush: KVCrush representatives on top of the importance method, or None.
    mode: ``continuous`` (evict after the prompt, then whenever a sequence has grown
        ``evict_interval`` tokens past its budget, like GenAI) or ``prefill`` (once, right after
        the prompt, SnapKV style; the cache then grows while decoding). Native backend; genai
        is always continuous.
    evict_interval: tokens a sequence may grow past its budget before the next eviction
        (continuous mode). 1 keeps the budget exactly at every step, at a selection per token.
    pooling / kernel_size: how snapkv-family scores are smoothed along the sequence (``max``,
        ``avg`` or ``none``; an odd width). None is the backend's own: on native ``avg`` over 31,
        chosen on a RULER tuning seed (15 kept the key words but cut multi-token needle values;
        max-pooling spends small budgets on plateaus around a few peaks: docs/eviction.md);
        GenAI's fixed max over 7 on genai.
    pooling_offset: how many tokens the pooling window's centre lies before each token, from 0
        (centred) to ``kernel_size // 2`` (the window ends at the token, so the tokens right
        after an attended one share its score: a needle's value after its key). Native only.
    decode_window_size: continuous mode, snapkv-family policies: only the last
        ``decode_window_size`` decode steps before each decode-time eviction are scored (the
        graph's score outputs cost decode time; the other steps run the graph without them);
        at most ``evict_interval``, which scores every decode step.
        None is the backend's own: on native the last 8 steps (``min(8, evict_interval)``;
        same accuracy as every step on the RULER harness, docs/eviction.md); on genai every
        step, as GenAI does (genai accepts only None).
    log: keep a per-request eviction log (kept positions per layer and head, and why).
    fastkv: FastKV's token-selective propagation during prefill (:class:`FastKVConfig`), or
        None. Native backend, importance snapkv / pyramidkv / adakv.
    prefill_eviction: also evict while the prompt is read: after every prompt chunk that leaves
        the sequence above its budget, using what the policy knows so far (each chunk's last
        ``snapkv_window_size`` queries for the snapkv family, every query for h2o; kvzip
        replays each chunk and ranks by that). A request then holds at most about budget + one
        chunk (kvzip: + the chunk's replay), so a prompt longer than the whole cache can run.
        Native backend; not with ``importance="upstream"`` or ``fastkv``.
    prefill_probe_size: with ``prefill_eviction``, the snapkv family (snapkv, pyramidkv,
        adakv) ranks each part of the prompt by a *probe*: the prompt's last
        ``prefill_probe_size`` tokens (where the question usually is) run after the part and
        are forgotten again, and their last ``snapkv_window_size`` queries score every cached
        token, as SnapKV's window does once the whole prompt is read. A request holds at most
        this many tokens more. 0: each chunk's own last queries (which have not seen the
        question). None is the backend's own: 64 with prefill eviction and a snapkv-family
        importance (RULER tuning seed, docs/eviction.md), else 0.
    less: LESS on top of the eviction (:class:`LESSConfig`), or None. Native backend; not with
        ``importance="upstream"`` or ``fastkv``.
    plain_prefill: the prompt chunks nobody scores (all but the chunk SnapKV's window reads,
        while nothing is evicted yet) run the plain paged graph on the same cache memory
        instead of the per-KV-head graph. It costs a second compiled copy of the weights (peak
        RSS +28% on SmolLM2-135M, +30% on Qwen2.5-0.5B) and saves the per-head graph's prefill
        overhead: TTFT 1.10x -> 1.01x the full cache's on a 16-core Xeon, nothing measurable on
        2 cores (docs/performance.md). Native backend; not with ``importance="upstream"``,
        ``fastkv`` or ``less`` (they run graphs of their own).
    """

    max_cache_size: int | float = 0.25
    start_size: int = 32
    recent_size: int | None = None
    importance: str = "snapkv"
    aggregation_mode: str = "norm_sum"
    snapkv_window_size: int = 32
    apply_rotation: bool = False
    kvcrush: KVCrushConfig | None = field(default_factory=KVCrushConfig)
    mode: str = "continuous"
    evict_interval: int = 32
    pooling: str | None = None
    kernel_size: int | None = None
    pooling_offset: int = 0
    decode_window_size: int | None = None
    log: bool = False
    fastkv: FastKVConfig | None = None
    prefill_eviction: bool = False
    prefill_probe_size: int | None = None
    less: LESSConfig | None = None
    plain_prefill: bool = False

    def __post_init__(self) -> None:
        m = self.max_cache_size
        if _is_int(m):
            if m < 1:
                raise ConfigError("eviction.max_cache_size", m,
                                  "a token count >= 1 or a fraction of the prompt in (0, 1]")
        elif isinstance(m, float):
            if not (math.isfinite(m) and 0.0 < m <= 1.0):
                raise ConfigError("eviction.max_cache_size", m,
                                  "a token count >= 1 or a fraction of the prompt in (0, 1]")
        else:
            raise ConfigError("eviction.max_cache_size", m,
                              "a token count >= 1 or a fraction of the prompt in (0, 1]")
        _int_at_least("eviction.start_size", self.start_size, 0)
        if self.recent_size is not None:
            _int_at_least("eviction.recent_size", self.recent_size, 0)
        _int_at_least("eviction.snapkv_window_size", self.snapkv_window_size, 0)
        self.importance = _choice("eviction.importance", self.importance, IMPORTANCE_METHODS)
        self.aggregation_mode = _choice(
            "eviction.aggregation_mode", self.aggregation_mode, AGGREGATION_MODES
        )
        _bool("eviction.apply_rotation", self.apply_rotation)
        self.mode = _choice("eviction.mode", self.mode, EVICTION_MODES)
        _int_at_least("eviction.evict_interval", self.evict_interval, 1)
        if self.pooling is not None:
            self.pooling = _choice("eviction.pooling", self.pooling, POOLINGS)
        if self.kernel_size is not None and (
                _int_at_least("eviction.kernel_size", self.kernel_size, 1) % 2 == 0):
            raise ConfigError("eviction.kernel_size", self.kernel_size, "an odd integer >= 1")
        half = (self.kernel_size or NATIVE_KERNEL_SIZE) // 2
        if _int_at_least("eviction.pooling_offset", self.pooling_offset, 0) > half:
            raise ConfigError("eviction.pooling_offset", self.pooling_offset,
                              f"an integer in [0, kernel_size // 2 = {half}]")
        if self.decode_window_size is not None and _int_at_least(
                "eviction.decode_window_size", self.decode_window_size, 1) > self.evict_interval:
            raise ConfigError("eviction.decode_window_size", self.decode_window_size,
                              f"None or an integer in [1, evict_interval = "
                              f"{self.evict_interval}]")
        _bool("eviction.log", self.log)
        if self.kvcrush is not None and not isinstance(self.kvcrush, KVCrushConfig):
            raise ConfigError("eviction.kvcrush", self.kvcrush, "a KVCrushConfig or None")
        if self.fastkv is not None:
            if not isinstance(self.fastkv, FastKVConfig):
                raise ConfigError("eviction.fastkv", self.fastkv, "a FastKVConfig or None")
            if self.importance not in FASTKV_IMPORTANCE:
                raise ConfigError("eviction.importance", self.importance,
                                  f"one of {', '.join(FASTKV_IMPORTANCE)} with fastkv (its split "
                                  "layer ranks tokens by the prompt's last queries)")
        if _bool("eviction.prefill_eviction", self.prefill_eviction):
            if self.importance == "upstream":
                raise ConfigError("eviction.prefill_eviction", True,
                                  "False with importance='upstream' (GenAI's algorithm evicts "
                                  "after the prompt only)")
            if self.fastkv is not None:
                raise ConfigError("eviction.prefill_eviction", True,
                                  "False with fastkv (FastKV's split prefill chooses the deeper "
                                  "layers' tokens itself)")
        if self.prefill_probe_size is not None and _int_at_least(
                "eviction.prefill_probe_size", self.prefill_probe_size, 0):
            if not self.prefill_eviction:
                raise ConfigError("eviction.prefill_probe_size", self.prefill_probe_size,
                                  "0 without prefill_eviction (the probe ranks the parts of a "
                                  "prompt read with prefill eviction)")
            if self.importance not in PROBE_IMPORTANCE:
                raise ConfigError("eviction.prefill_probe_size", self.prefill_probe_size,
                                  f"0 with importance={self.importance!r} (a probe scores for "
                                  f"{', '.join(PROBE_IMPORTANCE)})")
        if self.less is not None:
            if not isinstance(self.less, LESSConfig):
                raise ConfigError("eviction.less", self.less, "a LESSConfig or None")
            if self.importance == "upstream":
                raise ConfigError("eviction.less", self.less, "None with importance='upstream' "
                                  "(GenAI's algorithm runs without LESS)")
            if self.fastkv is not None:
                raise ConfigError("eviction.less", self.less, "None with fastkv (not supported "
                                  "together yet)")
        if _bool("eviction.plain_prefill", self.plain_prefill):
            own = ("importance='upstream'" if self.importance == "upstream"
                   else "fastkv" if self.fastkv is not None
                   else "less" if self.less is not None else None)
            if own is not None:
                raise ConfigError("eviction.plain_prefill", True,
                                  f"False with {own} (it runs prompt chunks on graphs of its "
                                  "own)")
        if self.importance == "upstream" and self.kvcrush is not None and self.kvcrush.taper:
            raise ConfigError("kvcrush.taper", True, "None or False with importance='upstream' "
                              "(GenAI's algorithm keeps a fixed share)")
        if _is_int(m) and m < self.start_size + self.recent_tokens():
            raise ConfigError(
                "eviction.max_cache_size", m,
                f"at least start_size + recent_size = {self.start_size + self.recent_tokens()} "
                "tokens",
            )

    def recent_tokens(self) -> int:
        """recent_size with None resolved: the newest tokens eviction always keeps."""
        if self.recent_size is not None:
            return self.recent_size
        return KVZIP_RECENT if self.importance in ("kvzip", "kvzap") else DEFAULT_RECENT

    def probe_tokens(self) -> int:
        """prefill_probe_size with None resolved: the probe each part of the prompt gets
        (0: none)."""
        if self.prefill_probe_size is not None:
            return self.prefill_probe_size
        return (NATIVE_PREFILL_PROBE if self.prefill_eviction
                and self.importance in PROBE_IMPORTANCE else 0)

    def total_tokens(self, prompt_tokens: int) -> int:
        """The requested total budget in tokens for a prompt of ``prompt_tokens`` tokens."""
        return budget_tokens(self.max_cache_size, prompt_tokens)


def budget_tokens(max_cache_size: int | float, prompt_tokens: int) -> int:
    """Tokens of a budget given as a token count (int) or a fraction of the prompt (float)."""
    m = max_cache_size
    return int(m) if _is_int(m) else max(1, int(m * prompt_tokens))


@dataclass
class GenerationConfig:
    """Per-call generation settings (names as in ``openvino_genai.GenerationConfig``).

    Greedy unless ``do_sample``; sampling uses temperature, top_p, top_k and rng_seed.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    rng_seed: int = 0
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    apply_chat_template: bool = True

    def __post_init__(self) -> None:
        _int_at_least("max_new_tokens", self.max_new_tokens, 1)
        for name in ("do_sample", "include_stop_str_in_output", "ignore_eos",
                     "apply_chat_template"):
            _bool(name, getattr(self, name))
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise ConfigError("temperature", self.temperature, "a number > 0")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p", self.top_p, "a number in (0, 1]")
        _int_at_least("top_k", self.top_k, 0, "0 disables top-k")
        _int_at_least("rng_seed", self.rng_seed, 0)
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ConfigError("repetition_penalty", self.repetition_penalty, "a number > 0")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        if not isinstance(self.stop_strings, (tuple, list, set, frozenset)):
            raise ConfigError("stop_strings", self.stop_strings,
                              "a string or a list / tuple / set of non-empty strings")
        self.stop_strings = tuple(self.stop_strings)
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise ConfigError("stop_strings", s, "non-empty strings")
