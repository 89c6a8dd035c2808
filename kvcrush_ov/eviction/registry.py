"""Importance policies by the name users pass as ``CacheEvictionConfig(importance=...)``.

KVCrush (:class:`kvcrush_ov.eviction.kvcrush.KVCrush`) is not listed: it wraps any of these.
"""

from __future__ import annotations

from kvcrush_ov.eviction.adakv import AdaKV
from kvcrush_ov.eviction.h2o import H2O
from kvcrush_ov.eviction.kvzap import KVzap
from kvcrush_ov.eviction.kvzip import KVzip
from kvcrush_ov.eviction.pyramidkv import PyramidKV
from kvcrush_ov.eviction.snapkv import SnapKV
from kvcrush_ov.eviction.streaming import StreamingLLM
from kvcrush_ov.eviction.upstream import UpstreamEviction

POLICIES: dict[str, type] = {
    StreamingLLM.name: StreamingLLM,
    H2O.name: H2O,
    SnapKV.name: SnapKV,
    PyramidKV.name: PyramidKV,
    AdaKV.name: AdaKV,
    UpstreamEviction.name: UpstreamEviction,
    KVzip.name: KVzip,
    KVzap.name: KVzap,
}
