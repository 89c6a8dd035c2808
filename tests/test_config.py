"""Configuration validation: every bad value names its field and what is allowed."""

from __future__ import annotations

import pytest

from kvcrush_ov import (
    CacheEvictionConfig,
    ConfigError,
    GenerationConfig,
    KVCacheConfig,
    KVCrushConfig,
    SchedulerConfig,
)
from kvcrush_ov.backends.genai import translate
from kvcrush_ov.cli import parse_budget

BAD = [
    (KVCacheConfig, {"precision": "fp8"}, "kv_cache.precision", "u8, u4, bf16, f32"),
    (KVCacheConfig, {"cache_size": -1}, "kv_cache.cache_size", ">= 0"),
    (KVCacheConfig, {"num_kv_blocks": 2.5}, "kv_cache.num_kv_blocks", "integer"),
    (SchedulerConfig, {"max_num_seqs": 0}, "scheduler.max_num_seqs", ">= 1"),
    (KVCrushConfig, {"budget": 1.5}, "kvcrush.budget", "[0, 1]"),
    (KVCrushConfig, {"budget": 2}, "kvcrush.budget", "not a block count"),
    (KVCrushConfig, {"budget": -0.1}, "kvcrush.budget", "[0, 1]"),
    (KVCrushConfig, {"anchor_point_mode": "median"}, "kvcrush.anchor_point_mode", "alternating"),
    (KVCrushConfig, {"rng_seed": -3}, "kvcrush.rng_seed", ">= 0"),
    (KVCrushConfig, {"taper": "on"}, "kvcrush.taper", "None (the backend's own), True or False"),
    (CacheEvictionConfig, {"importance": "upstream", "kvcrush": KVCrushConfig(taper=True)},
     "kvcrush.taper", "importance='upstream'"),
    (CacheEvictionConfig, {"max_cache_size": 0}, "eviction.max_cache_size", "fraction"),
    (CacheEvictionConfig, {"max_cache_size": 1.5}, "eviction.max_cache_size", "(0, 1]"),
    (CacheEvictionConfig, {"max_cache_size": 0.0}, "eviction.max_cache_size", "(0, 1]"),
    (CacheEvictionConfig, {"max_cache_size": "half"}, "eviction.max_cache_size", "token count"),
    (CacheEvictionConfig, {"max_cache_size": 100}, "eviction.max_cache_size", "start_size"),
    (CacheEvictionConfig, {"start_size": -32}, "eviction.start_size", ">= 0"),
    (CacheEvictionConfig, {"importance": "magic"}, "eviction.importance", "snapkv, h2o"),
    (CacheEvictionConfig, {"aggregation_mode": "max"}, "eviction.aggregation_mode", "norm_sum"),
    (CacheEvictionConfig, {"kvcrush": 0.25}, "eviction.kvcrush", "KVCrushConfig"),
    (GenerationConfig, {"max_new_tokens": 0}, "max_new_tokens", ">= 1"),
    (GenerationConfig, {"temperature": 0}, "temperature", "> 0"),
    (GenerationConfig, {"top_p": 0}, "top_p", "(0, 1]"),
    (GenerationConfig, {"top_k": -1}, "top_k", ">= 0"),
    (GenerationConfig, {"rng_seed": -1}, "rng_seed", ">= 0"),
    (GenerationConfig, {"stop_strings": ("",)}, "stop_strings", "non-empty"),
    (GenerationConfig, {"do_sample": "yes"}, "do_sample", "True or False"),
]


@pytest.mark.parametrize("cls,kwargs,field,allowed", BAD,
                         ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _, _ in BAD])
def test_bad_value_names_field_and_allowed(cls, kwargs, field, allowed):
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    msg = str(info.value)
    assert info.value.field == field
    assert msg.startswith(f"{field}=")
    assert allowed in msg


def test_good_values_are_normalised():
    assert KVCacheConfig(precision="BF16").precision == "bf16"
    assert KVCrushConfig(anchor_point_mode="MEAN").anchor_point_mode == "mean"
    assert GenerationConfig(stop_strings="END").stop_strings == ("END",)


@pytest.mark.parametrize("text,value", [("25%", 0.25), ("0.125", 0.125), ("1024", 1024)])
def test_parse_budget(text, value):
    assert parse_budget(text) == value


def test_parse_budget_rejects_garbage():
    with pytest.raises(ConfigError, match="--budget"):
        parse_budget("lots")


class TestTranslateToGenAI:
    """The total number of cached tokens a user asks for is what GenAI keeps."""

    def test_kvcrush_blocks_come_out_of_the_total(self):
        ev = CacheEvictionConfig(max_cache_size=1024, kvcrush=KVCrushConfig(budget=0.25))
        up = translate(ev, prompt_tokens=4000, max_new_tokens=16, block=32)
        assert up.total_tokens == 1024
        assert up.kvcrush_blocks == 8
        assert up.max_cache_size + up.kvcrush_blocks * 32 == 1024

    def test_fraction_of_prompt_rounds_down_to_blocks(self):
        ev = CacheEvictionConfig(max_cache_size=0.25, kvcrush=None)
        up = translate(ev, prompt_tokens=3364, max_new_tokens=32, block=32)
        assert up.total_tokens == 832 and up.max_cache_size == 832 and up.kvcrush_blocks == 0

    def test_no_eviction_when_everything_fits(self):
        ev = CacheEvictionConfig(max_cache_size=1024)
        assert translate(ev, prompt_tokens=900, max_new_tokens=100, block=32) is None
        assert translate(ev, prompt_tokens=1000, max_new_tokens=100, block=32) is not None

    def test_small_fraction_is_clamped_to_the_minimum(self):
        ev = CacheEvictionConfig(max_cache_size=0.1, start_size=32, recent_size=32)
        up = translate(ev, prompt_tokens=500, max_new_tokens=8, block=32)
        assert up.total_tokens == 96  # start + recent + one block
        assert up.max_cache_size - up.start_size - up.recent_size >= 32

    @pytest.mark.parametrize("length", range(1, 81))
    def test_defect_window_is_switched_off_only_where_needed(self, length):
        ev = CacheEvictionConfig(max_cache_size=96, start_size=32, recent_size=32,
                                 snapkv_window_size=32)
        up = translate(ev, prompt_tokens=length, max_new_tokens=100, block=32)
        assert up is not None
        assert up.snapkv_window_size == (0 if 32 < length < 64 else 32)

    def test_h2o_uses_no_snapkv_window(self):
        ev = CacheEvictionConfig(max_cache_size=256, importance="h2o")
        assert translate(ev, 1000, 8, 32).snapkv_window_size == 0


def test_default_eviction_is_snapkv_avg31_with_kvcrush_on_native():
    """The default chosen on the RULER tuning seed (docs/results/ruler-tuning-smollm2.md)."""
    from kvcrush_ov.eviction.factory import make_policy
    from kvcrush_ov.eviction.kvcrush import KVCrush
    from kvcrush_ov.eviction.snapkv import SnapKV

    policy = make_policy(CacheEvictionConfig())
    assert isinstance(policy, KVCrush) and type(policy.importance) is SnapKV
    assert policy.importance.kernel_size == 31 and policy.importance.pooling == "avg"
    assert policy.share == 0.25 and policy.taper == (0.125, 0.5)
    assert policy.anchor == "alternating" and policy.granularity == "token"
    assert make_policy(CacheEvictionConfig(kvcrush=KVCrushConfig(taper=False))).taper is None


def test_recent_window_defaults_to_32_for_kvzip_only():
    """recent_size=None: GenAI's 128, 32 with kvzip (tuning seed 7 of both models, docs/chat.md);
    an explicit value wins, and the checks and the engine's spec use the resolved one."""
    from kvcrush_ov.eviction.factory import make_spec

    assert CacheEvictionConfig().recent_tokens() == 128
    assert CacheEvictionConfig(importance="h2o").recent_tokens() == 128
    kvzip = CacheEvictionConfig(importance="kvzip")
    assert kvzip.recent_size is None and kvzip.recent_tokens() == 32
    assert CacheEvictionConfig(importance="kvzip", recent_size=128).recent_tokens() == 128
    assert make_spec(kvzip).recent_size == 32
    assert make_spec(CacheEvictionConfig()).recent_size == 128
    # 64 tokens: too few for 32 sinks + 128 recent, enough for kvzip's 32 + 32
    CacheEvictionConfig(max_cache_size=64, importance="kvzip")
    with pytest.raises(ConfigError, match="start_size \\+ recent_size = 160"):
        CacheEvictionConfig(max_cache_size=64)
