"""kvcrush-ov: KVCrush KV-cache compression for LLM inference with OpenVINO."""

from kvcrush_ov.config import (
    CacheEvictionConfig,
    FastKVConfig,
    GenerationConfig,
    KVCacheConfig,
    KVCrushConfig,
    LESSConfig,
    SchedulerConfig,
)
from kvcrush_ov.errors import ChatError, ConfigError, FetchError, KVCrushError, ModelError
from kvcrush_ov.pipeline import Pipeline
from kvcrush_ov.results import CacheMetrics, DecodedResults, RequestMetrics

__version__ = "0.1.0"

__all__ = [
    "CacheEvictionConfig",
    "CacheMetrics",
    "ChatError",
    "ConfigError",
    "DecodedResults",
    "FastKVConfig",
    "LESSConfig",
    "FetchError",
    "GenerationConfig",
    "KVCacheConfig",
    "KVCrushConfig",
    "KVCrushError",
    "ModelError",
    "Pipeline",
    "RequestMetrics",
    "SchedulerConfig",
]
