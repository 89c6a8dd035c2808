"""From the user's :class:`~kvcrush_ov.config.CacheEvictionConfig` to the engine's EvictionSpec."""

from __future__ import annotations

import json
from pathlib import Path

from kvcrush_ov.config import (
    NATIVE_DECODE_WINDOW,
    NATIVE_KERNEL_SIZE,
    NATIVE_POOLING,
    NATIVE_TAPER,
    CacheEvictionConfig,
    LESSConfig,
)
from kvcrush_ov.errors import ConfigError
from kvcrush_ov.eviction.base import EvictionPolicy
from kvcrush_ov.eviction.kvcrush import KVCrush
from kvcrush_ov.eviction.registry import POLICIES
from kvcrush_ov.eviction.spec import EvictionSpec
from kvcrush_ov.eviction.upstream import UpstreamEviction
from kvcrush_ov.kvzap.weights import KVzapWeights
from kvcrush_ov.kvzap.weights import default_path as default_kvzap_path
from kvcrush_ov.less.kernels import LESSWeights, default_weights_path

_POOLED = ("snapkv", "pyramidkv", "adakv")
__all__ = ["NATIVE_DECODE_WINDOW", "NATIVE_KERNEL_SIZE", "NATIVE_POOLING", "make_policy",
           "make_spec"]


def make_policy(cfg: CacheEvictionConfig) -> EvictionPolicy:
    """The importance policy named by ``cfg.importance``, wrapped in KVCrush if configured."""
    if cfg.importance == "upstream":  # the engine runs GenAI's exact algorithm (spec.genai)
        return UpstreamEviction(aggregation_mode=cfg.aggregation_mode)
    cls = POLICIES[cfg.importance]
    kwargs: dict = {}
    if cfg.importance in _POOLED:
        kwargs = {"aggregation_mode": cfg.aggregation_mode,
                  "pooling": cfg.pooling or NATIVE_POOLING,
                  "kernel_size": cfg.kernel_size or NATIVE_KERNEL_SIZE,
                  "offset": cfg.pooling_offset}
    elif cfg.importance in ("h2o", "kvzip", "kvzap"):
        kwargs = {"aggregation_mode": cfg.aggregation_mode}
    if cfg.importance in ("kvzip", "kvzap") and cfg.prefill_eviction:
        # each layer keeps its share: the model-wide allocation could give one layer more than
        # its KV pool holds while further parts of the prompt are read
        kwargs["scope"] = "layer"
    policy = cls(**kwargs)
    crush = cfg.kvcrush
    if crush is None or crush.budget == 0:
        return policy
    return KVCrush(importance=policy, share=float(crush.budget), anchor=crush.anchor_point_mode,
                   granularity=crush.granularity or "token", dynamic_split=crush.dynamic_split,
                   taper=None if crush.taper is False else NATIVE_TAPER)


def make_spec(cfg: CacheEvictionConfig, model_dir: str | Path | None = None) -> EvictionSpec:
    """Everything the native engine needs to evict as ``cfg`` says (``model_dir``: where the
    default LESS weights live, when ``cfg.less`` names none)."""
    seed = cfg.kvcrush.rng_seed if cfg.kvcrush is not None else 0
    upstream = cfg.importance == "upstream"  # GenAI's algorithm scores every decode step
    window = cfg.decode_window_size or min(NATIVE_DECODE_WINDOW, cfg.evict_interval)
    decode_window = None if upstream or window >= cfg.evict_interval else window  # None: all
    return EvictionSpec(policy=make_policy(cfg), max_cache_size=cfg.max_cache_size,
                        start_size=cfg.start_size, recent_size=cfg.recent_tokens(), mode=cfg.mode,
                        evict_interval=cfg.evict_interval, window=cfg.snapkv_window_size,
                        decode_window=decode_window, seed=seed, log=cfg.log,
                        genai=cfg if upstream else None, fastkv=cfg.fastkv,
                        prefill_eviction=cfg.prefill_eviction,
                        prefill_probe=cfg.probe_tokens(),
                        less=load_less(cfg.less, model_dir) if cfg.less is not None else None,
                        plain_prefill=cfg.plain_prefill,
                        kvzap=load_kvzap(model_dir) if cfg.importance == "kvzap" else None)


def load_kvzap(model_dir: str | Path | None) -> KVzapWeights:
    """The model's trained KVzap surrogate (``<model cache folder>/kvzap.npz``), checked against
    its config.json: ConfigError ``kvzap.weights`` when missing, malformed or another model's."""
    if model_dir is None:
        raise ConfigError("kvzap.weights", None, "a model folder (importance='kvzap' reads the "
                          "surrogate trained for the model)")
    weights = KVzapWeights.load(default_kvzap_path(model_dir))
    c = _model_config(model_dir)
    if c is not None:
        heads = int(c["num_attention_heads"])
        weights.check_model(int(c["num_hidden_layers"]), int(c["hidden_size"]),
                            int(c.get("num_key_value_heads") or heads))
    return weights


def _model_config(model_dir: str | Path | None) -> dict | None:
    """The exported model's config.json (None: no folder, or no file in it)."""
    config = Path(model_dir) / "config.json" if model_dir is not None else None
    return json.loads(config.read_text()) if config is not None and config.is_file() else None


def load_less(cfg: LESSConfig, model_dir: str | Path | None) -> LESSWeights:
    """The weights ``cfg`` names (or the model's default file), checked against the model's
    config.json when ``model_dir`` is given: ConfigError ``less.weights`` when missing,
    malformed or trained for another geometry."""
    if cfg.weights is None and model_dir is None:
        raise ConfigError("less.weights", None, "a path (no model folder to find the default in)")
    path = cfg.weights if cfg.weights is not None else default_weights_path(model_dir)
    weights = LESSWeights.load(path)
    c = _model_config(model_dir)
    if c is not None:
        heads = int(c["num_attention_heads"])
        weights.check_model(int(c["num_hidden_layers"]), heads,
                            int(c.get("num_key_value_heads") or heads),
                            int(c.get("head_dim") or int(c["hidden_size"]) // heads), str(path))
    return weights
